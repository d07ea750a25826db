// Shared maths of the GSPN CPU kernels (gspn_cpu.cpp: the line scan; gspn_mix.cpp: the fused layer).
// Header-only, internal linkage: each translation unit gets its own inlined copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Geometry of one scan direction over an H x W plane (see gspn/ops/directions.py).
struct Geometry {
  int64_t H, W;
  int64_t L, P;  // number of lines, line length
  bool vertical, reverse;
  int64_t chunk;  // 0: global
  Geometry(int direction, int64_t h, int64_t w, int64_t chunk_size)
      : H(h), W(w), vertical(direction <= 1), reverse(direction == 1 || direction == 3), chunk(chunk_size) {
    L = vertical ? H : W;
    P = vertical ? W : H;
  }
  // Image index along the scan axis of scan-order line l.
  int64_t img(int64_t l) const { return reverse ? L - 1 - l : l; }
  // Whether line l enters a new tile (the state is reset to zero there).
  bool starts(int64_t l) const {
    if (l == 0) return true;
    if (chunk <= 0) return false;
    const int64_t i = img(l);
    return reverse ? (i + 1) % chunk == 0 : i % chunk == 0;
  }
};

// ---------------------------------------------------------------------------------------------
// Stability–context normalisation (same formula as gspn/ops/stabilize.py):
//   s_k = sigmoid(a_k); w_k = s_k / sum_{valid j} s_j for valid k, 0 for a missing neighbour.
// A missing neighbour's logit (left at p = 0, right at p = P - 1) is never read into a result:
// its weight and sigmoid are exactly 0 and its gradient exactly 0, whatever it holds (NaN, ±Inf).

// exp(x) for x <= 0, float32: Cody–Waite reduction and a degree-6 polynomial; branch-free so the
// compiler vectorises it (libm's expf is not vectorised without -ffast-math).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * (x * x) + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}
inline double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
inline T sigmoid(T a) {
  const T t = exp_nonpositive(-std::abs(a));
  const T inv = T(1) / (T(1) + t);
  return a >= T(0) ? inv : t * inv;
}

template <typename T>
constexpr T tiny_sum();
template <>
constexpr float tiny_sum<float>() { return 1e-30f; }
template <>
constexpr double tiny_sum<double>() { return 1e-300; }

// Normalise one line of logits into weights (wl, wm, wr) and keep the sigmoids (sl, sm, sr).
template <typename T>
void normalize_line(int64_t P, const T* __restrict__ al, const T* __restrict__ am, const T* __restrict__ ar,
                    T* __restrict__ wl, T* __restrict__ wm, T* __restrict__ wr, T* __restrict__ sl,
                    T* __restrict__ sm, T* __restrict__ sr) {
  int underflow = 0;
#pragma omp simd reduction(| : underflow)
  for (int64_t p = 0; p < P; ++p) {
    // Missing neighbours get weight 0: selected, not multiplied (0 * NaN would be NaN).
    const T vl = p > 0 ? sigmoid(al[p]) : T(0);
    const T vm = sigmoid(am[p]);
    const T vr = p < P - 1 ? sigmoid(ar[p]) : T(0);
    const T sum = vl + vm + vr;
    underflow |= sum < tiny_sum<T>();
    const T inv = T(1) / std::max(sum, tiny_sum<T>());
    sl[p] = vl;
    sm[p] = vm;
    sr[p] = vr;
    wl[p] = vl * inv;
    wm[p] = vm * inv;
    wr[p] = vr * inv;
  }
  if (!underflow) return;
  // All valid sigmoids below ~1e-30: sigmoid(a) == exp(a) to working precision, so the weights
  // are the softmax of the valid logits.
  for (int64_t p = 0; p < P; ++p) {
    if (sl[p] + sm[p] + sr[p] >= tiny_sum<T>()) continue;
    const bool has_l = p > 0, has_r = p < P - 1;
    T m = am[p];
    if (has_l) m = std::max(m, al[p]);
    if (has_r) m = std::max(m, ar[p]);
    const T el = has_l ? std::exp(al[p] - m) : T(0), em = std::exp(am[p] - m), er = has_r ? std::exp(ar[p] - m) : T(0);
    const T inv = T(1) / (el + em + er);
    wl[p] = el * inv;
    wm[p] = em * inv;
    wr[p] = er * inv;
  }
}

// Turn gradients w.r.t. the normalised weights (in gl, gm, gr) into gradients w.r.t. the logits:
//   d a_k = w_k (1 - s_k) (g_k - sum_j g_j w_j),   exactly 0 for a missing neighbour.
template <typename T>
void normalize_line_vjp(int64_t P, const T* __restrict__ wl, const T* __restrict__ wm, const T* __restrict__ wr,
                        const T* __restrict__ sl, const T* __restrict__ sm, const T* __restrict__ sr,
                        T* __restrict__ gl, T* __restrict__ gm, T* __restrict__ gr) {
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) {
    const T dot = gl[p] * wl[p] + gm[p] * wm[p] + gr[p] * wr[p];
    const T dl = wl[p] * (T(1) - sl[p]) * (gl[p] - dot);
    const T dr = wr[p] * (T(1) - sr[p]) * (gr[p] - dot);
    gl[p] = p > 0 ? dl : T(0);
    gm[p] = wm[p] * (T(1) - sm[p]) * (gm[p] - dot);
    gr[p] = p < P - 1 ? dr : T(0);
  }
}

}  // namespace
