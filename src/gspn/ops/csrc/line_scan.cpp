// Fast CPU backend of the GSPN line scan: forward and adjoint (backward) recurrences.
//
// Built on first use by gspn/ops/_cpu.py with the system C++ compiler
// (-O3 -march=native -fopenmp) and loaded with ctypes; no PyTorch headers are involved.
//
// Semantics are those of gspn/ops/line_scan/reference.py. In the line frame of a direction (lines l in scan
// order, positions p along the perpendicular axis):
//   h[l,p] = lam x + w_left h[l-1,p-1] + w_mid h[l-1,p] + w_right h[l-1,p+1]
//   a[l,p] = g[l,p] + w_left[l+1,p+1] a[l+1,p+1] + w_mid[l+1,p] a[l+1,p] + w_right[l+1,p-1] a[l+1,p-1]
//
// Memory layout: every tensor slice (b, c) is a dense row-major H x W plane; the batch and channel
// strides are free (0 for a batch-shared parameter), and parameter channel = c / chan_div (channel
// groups). Vertical scans ("tb", "bt") walk contiguous rows directly. Horizontal scans ("lr", "rl")
// would read one float per cache line, so they move a strip of STRIP columns of every tensor into
// line-major buffers (a small transpose that stays in L2), scan there, and write the strip back.
// Work is parallel over (b, c) slices with OpenMP.
//
// Unused gates (every gate of a line that starts a tile; w_left at p = 0 and w_right at p = P - 1)
// are never read into a result and get exactly zero gradient, whatever they hold (NaN, ±Inf).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "gspn_common.h"

namespace {

constexpr int64_t STRIP = 16;  // columns per horizontal strip: one 64-byte cache line of float32
constexpr int64_t SMALL_PLANE = 1024;  // planes of at most this many pixels are normalised in one call

struct TensorArg {
  void* data;
  int64_t stride_b;
  int64_t stride_c;
  int64_t chan_div;  // parameter channel = c / chan_div
};

template <typename T>
inline T* slice_ptr(const TensorArg& t, int64_t b, int64_t c) {
  return static_cast<T*>(t.data) + b * t.stride_b + (c / t.chan_div) * t.stride_c;
}


// ---------------------------------------------------------------------------------------------
// One line of the forward recurrence. prev == nullptr: the line starts a tile.
template <typename T>
void forward_line(int64_t P, T* __restrict__ h, const T* __restrict__ prev, const T* __restrict__ x,
                  const T* __restrict__ lam, const T* __restrict__ wl, const T* __restrict__ wm,
                  const T* __restrict__ wr) {
  if (prev == nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) h[p] = lam[p] * x[p];
    return;
  }
  if (P == 1) {
    h[0] = lam[0] * x[0] + wm[0] * prev[0];
    return;
  }
  h[0] = lam[0] * x[0] + wm[0] * prev[0] + wr[0] * prev[1];
#pragma omp simd
  for (int64_t p = 1; p < P - 1; ++p)
    h[p] = lam[p] * x[p] + wl[p] * prev[p - 1] + wm[p] * prev[p] + wr[p] * prev[p + 1];
  h[P - 1] = lam[P - 1] * x[P - 1] + wl[P - 1] * prev[P - 2] + wm[P - 1] * prev[P - 1];
}

#if defined(__AVX512F__)
// forward_line for float32 with AVX-512, 16 positions per vector (the last vector masked). NORM: the
// gates are logits, normalised here in registers on the way (no weight buffer, parameters read
// once); otherwise they are the weights. A neighbour outside the line is a masked-off lane: neither
// its gate nor its h is read.
template <bool NORM>
void forward_line16(int64_t P, float* __restrict__ h, const float* __restrict__ prev, const float* __restrict__ x,
                    const float* __restrict__ lam, const float* __restrict__ gl, const float* __restrict__ gm,
                    const float* __restrict__ gr) {
  // N vectors of 16 positions at a time, every step issued for all N (the normalisation is a long
  // dependency chain per vector: interleaving two keeps the vector units busy).
  const auto vectors = [&](auto group, int64_t p00) GSPN_LAMBDA_INLINE {
    constexpr int N = decltype(group)::value;
    __mmask16 act[N], has_l[N], has_r[N];
    __m512 hv[N], a[N][3];
    for (int n = 0; n < N; ++n) {
      const int64_t p0 = p00 + 16 * n;
      act[n] = P - p0 >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (P - p0)) - 1u);
      hv[n] = _mm512_mul_ps(_mm512_maskz_loadu_ps(act[n], lam + p0), _mm512_maskz_loadu_ps(act[n], x + p0));
    }
    if (prev != nullptr) {
      for (int n = 0; n < N; ++n) {
        const int64_t p0 = p00 + 16 * n;
        has_l[n] = p0 == 0 ? __mmask16(act[n] & 0xFFFEu) : act[n];
        has_r[n] = P - 1 - p0 < 16 ? __mmask16(act[n] & ~(1u << (P - 1 - p0))) : act[n];
        a[n][0] = _mm512_maskz_loadu_ps(has_l[n], gl + p0);
        a[n][1] = _mm512_maskz_loadu_ps(act[n], gm + p0);
        a[n][2] = _mm512_maskz_loadu_ps(has_r[n], gr + p0);
      }
      if (NORM) {
        __m512 w[N][3], s[N][3];
        __mmask16 under[N];
        stability_weights16<false, N>(a, has_l, has_r, w, s, under);
        for (int n = 0; n < N; ++n) {
          const int64_t p0 = p00 + 16 * n;
          under[n] &= act[n];
          if (under[n]) {  // rare: all valid sigmoids underflowed
            alignas(64) float wb[3][16];
            for (int k = 0; k < 3; ++k) _mm512_store_ps(wb[k], w[n][k]);
            for (int64_t j = 0; j < 16; ++j)
              if ((under[n] >> j) & 1)
                softmax_weights(gl[p0 + j], gm[p0 + j], gr[p0 + j], p0 + j > 0, p0 + j < P - 1, wb[0][j], wb[1][j],
                                wb[2][j]);
            for (int k = 0; k < 3; ++k) w[n][k] = _mm512_load_ps(wb[k]);
          }
          for (int k = 0; k < 3; ++k) a[n][k] = w[n][k];
        }
      }
      for (int n = 0; n < N; ++n) {
        const int64_t p0 = p00 + 16 * n;
        hv[n] = _mm512_fmadd_ps(a[n][0], _mm512_maskz_loadu_ps(has_l[n], prev + p0 - 1), hv[n]);
        hv[n] = _mm512_fmadd_ps(a[n][1], _mm512_maskz_loadu_ps(act[n], prev + p0), hv[n]);
        hv[n] = _mm512_fmadd_ps(a[n][2], _mm512_maskz_loadu_ps(has_r[n], prev + p0 + 1), hv[n]);
      }
    }
    for (int n = 0; n < N; ++n) _mm512_mask_storeu_ps(h + p00 + 16 * n, act[n], hv[n]);
  };
  int64_t p0 = 0;
  for (; p0 + 16 < P; p0 += 32) vectors(std::integral_constant<int, 2>(), p0);
  if (p0 < P) vectors(std::integral_constant<int, 1>(), p0);
}
#endif

// Lines at least this long are scanned with the gate normalisation fused into the line (float32,
// AVX-512); shorter ones (4 or 8 pixels: most lanes of a 16-vector would idle) are normalised
// several lines to a vector first.
constexpr int64_t FUSED_MIN_LINE = 12;

// Gate weights of one line as seen by the kernels (normalised weights, or the raw inputs).
template <typename T>
struct LineWeights {
  const T* l;
  const T* m;
  const T* r;
};

// One line of the adjoint recurrence. next_a == nullptr: line l+1 starts a tile (or does not
// exist); prev_h == nullptr: line l starts a tile, so its gates receive no gradient.
template <typename T>
void backward_line(int64_t P, const T* __restrict__ g, const T* __restrict__ next_a, LineWeights<T> next_w,
                   const T* __restrict__ prev_h, const T* __restrict__ x, const T* __restrict__ lam,
                   T* __restrict__ a, T* __restrict__ dx, bool accumulate_dx, T* __restrict__ dlam,
                   T* __restrict__ dwl, T* __restrict__ dwm, T* __restrict__ dwr) {
  if (next_a == nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) a[p] = g[p];
  } else if (P == 1) {
    a[0] = g[0] + next_w.m[0] * next_a[0];
  } else {
    const T* __restrict__ nl = next_w.l;
    const T* __restrict__ nm = next_w.m;
    const T* __restrict__ nr = next_w.r;
    a[0] = g[0] + nl[1] * next_a[1] + nm[0] * next_a[0];
#pragma omp simd
    for (int64_t p = 1; p < P - 1; ++p)
      a[p] = g[p] + nl[p + 1] * next_a[p + 1] + nm[p] * next_a[p] + nr[p - 1] * next_a[p - 1];
    a[P - 1] = g[P - 1] + nm[P - 1] * next_a[P - 1] + nr[P - 2] * next_a[P - 2];
  }
  if (accumulate_dx) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) dx[p] += lam[p] * a[p];
  } else {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) dx[p] = lam[p] * a[p];
  }
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) dlam[p] = x[p] * a[p];
  if (prev_h == nullptr) {
#pragma omp simd
    for (int64_t p = 0; p < P; ++p) dwl[p] = dwm[p] = dwr[p] = T(0);
    return;
  }
  dwl[0] = T(0);
  dwr[P - 1] = T(0);
#pragma omp simd
  for (int64_t p = 1; p < P; ++p) dwl[p] = a[p] * prev_h[p - 1];
#pragma omp simd
  for (int64_t p = 0; p < P; ++p) dwm[p] = a[p] * prev_h[p];
#pragma omp simd
  for (int64_t p = 0; p < P - 1; ++p) dwr[p] = a[p] * prev_h[p + 1];
}

// ---------------------------------------------------------------------------------------------
// Strip transposes for the horizontal scans: columns [c0, c0+n) of a row-major H x W plane
// <-> n contiguous lines of length H. float32 with AVX-512 uses 16x16 in-register transposes.
template <typename T>
void gather_columns(const T* __restrict__ src, int64_t H, int64_t W, int64_t c0, int64_t n, T* __restrict__ dst) {
  for (int64_t r0 = 0; r0 < H; r0 += 16) {
    const int64_t r1 = std::min(r0 + 16, H);
    for (int64_t q = 0; q < n; ++q)
      for (int64_t r = r0; r < r1; ++r) dst[q * H + r] = src[r * W + c0 + q];
  }
}

template <typename T>
void scatter_columns(const T* __restrict__ src, int64_t H, int64_t W, int64_t c0, int64_t n, T* __restrict__ dst,
                     bool accumulate) {
  for (int64_t r0 = 0; r0 < H; r0 += 16) {
    const int64_t r1 = std::min(r0 + 16, H);
    for (int64_t r = r0; r < r1; ++r) {
      T* __restrict__ row = dst + r * W + c0;
      if (accumulate) {
        for (int64_t q = 0; q < n; ++q) row[q] += src[q * H + r];
      } else {
        for (int64_t q = 0; q < n; ++q) row[q] = src[q * H + r];
      }
    }
  }
}

#if defined(__AVX512F__)
template <>
void gather_columns<float>(const float* __restrict__ src, int64_t H, int64_t W, int64_t c0, int64_t n,
                           float* __restrict__ dst) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << n) - 1u);
  for (int64_t r0 = 0; r0 < H; r0 += 16) {
    const int64_t rows = std::min<int64_t>(16, H - r0);
    const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1u);
    __m512 v[16];
    for (int64_t i = 0; i < 16; ++i)
      v[i] = i < rows ? _mm512_maskz_loadu_ps(col_mask, src + (r0 + i) * W + c0) : _mm512_setzero_ps();
    transpose16x16(v);
    for (int64_t q = 0; q < n; ++q) _mm512_mask_storeu_ps(dst + q * H + r0, row_mask, v[q]);
  }
}

template <>
void scatter_columns<float>(const float* __restrict__ src, int64_t H, int64_t W, int64_t c0, int64_t n,
                            float* __restrict__ dst, bool accumulate) {
  const __mmask16 col_mask = static_cast<__mmask16>((1u << n) - 1u);
  for (int64_t r0 = 0; r0 < H; r0 += 16) {
    const int64_t rows = std::min<int64_t>(16, H - r0);
    const __mmask16 row_mask = static_cast<__mmask16>((1u << rows) - 1u);
    __m512 v[16];
    for (int64_t q = 0; q < 16; ++q)
      v[q] = q < n ? _mm512_maskz_loadu_ps(row_mask, src + q * H + r0) : _mm512_setzero_ps();
    transpose16x16(v);
    for (int64_t i = 0; i < rows; ++i) {
      float* row = dst + (r0 + i) * W + c0;
      if (accumulate) v[i] = _mm512_add_ps(v[i], _mm512_maskz_loadu_ps(col_mask, row));
      if (!accumulate && n == 16 && (reinterpret_cast<uintptr_t>(row) & 63) == 0)
        _mm512_stream_ps(row, v[i]);  // a whole cache line: skip the read-for-ownership
      else
        _mm512_mask_storeu_ps(row, col_mask, v[i]);
    }
  }
  _mm_sfence();  // order the streaming stores before the data is read by another thread
}
#endif

// ---------------------------------------------------------------------------------------------
// Forward drivers (one (b, c) slice).

enum FwdArg { F_X, F_LAM, F_WL, F_WM, F_WR, F_OUT, F_COUNT };

template <typename T, bool NORM>
struct ForwardWorker {
  const Geometry& geo;
  std::vector<T> buf;  // horizontal strips and normalised weights

  // float32 with AVX-512 and NORM: lines go through forward_line16, and lines of FUSED_MIN_LINE or
  // more normalise their gates in it; shorter ones get normalised weights from a pass over many lines.
#if defined(__AVX512F__)
  static constexpr bool SIMD16 = std::is_same<T, float>::value;
#else
  static constexpr bool SIMD16 = false;
#endif
  bool fused() const { return SIMD16 && NORM && geo.P >= FUSED_MIN_LINE; }

  // One line: raw gates (weights if !NORM, logits normalised on the way if fused()) or normalised
  // weights (already_normalised).
  void line(int64_t P, T* h, const T* prev, const T* x, const T* lam, LineWeights<T> w, bool already_normalised) {
#if defined(__AVX512F__)
    if constexpr (SIMD16) {
      if (!NORM) {  // raw weights: the plain (auto-vectorised) loop is as fast or faster (measured)
        forward_line(P, h, prev, x, lam, w.l, w.m, w.r);
        return;
      }
      if (NORM && !already_normalised)
        forward_line16<true>(P, h, prev, x, lam, w.l, w.m, w.r);
      else
        forward_line16<false>(P, h, prev, x, lam, w.l, w.m, w.r);
      return;
    }
#endif
    (void)already_normalised;
    forward_line(P, h, prev, x, lam, w.l, w.m, w.r);
  }

  explicit ForwardWorker(const Geometry& g) : geo(g) {
    // vertical: normalisation scratch (6 lines, or 6 planes for a small plane); horizontal: 6 strips,
    // 6 strips of normalised weights and sigmoids, and a carried line.
    const int64_t vertical = 6 * (whole_plane() ? geo.H * geo.W : geo.P);
    buf.resize(static_cast<size_t>(geo.vertical ? vertical : (F_COUNT * STRIP + 6 * STRIP + 1) * geo.H));
  }

  // Small planes are normalised in one call (many short lines per vector block) before the scan.
  bool whole_plane() const { return NORM && !fused() && geo.H * geo.W <= SMALL_PLANE; }

  // Weights of one line, normalised into `scratch` (6 * P values) if NORM and not fused().
  LineWeights<T> weights(const T* al, const T* am, const T* ar, T* scratch) {
    if (!NORM || fused()) return {al, am, ar};
    const int64_t P = geo.P;
    normalize_line<T, false>(P, al, am, ar, scratch, scratch + P, scratch + 2 * P, nullptr, nullptr, nullptr);
    return {scratch, scratch + P, scratch + 2 * P};
  }

  void run(const T* const* in, T* out) {
    if (geo.vertical)
      run_vertical(in, out);
    else
      run_horizontal(in, out);
  }

  void run_vertical(const T* const* in, T* out) {
    const int64_t W = geo.W, HW = geo.H * geo.W;
    T* scratch = buf.data();
    const bool whole = whole_plane();
    if (whole)
      normalize_lines<T, false>(geo.H, W, in[F_WL], in[F_WM], in[F_WR], scratch, scratch + HW, scratch + 2 * HW,
                                nullptr, nullptr, nullptr);
    for (int64_t l = 0; l < geo.L; ++l) {
      const int64_t off = geo.img(l) * W;
      const T* prev = geo.starts(l) ? nullptr : out + geo.img(l - 1) * W;
      const LineWeights<T> w = whole ? LineWeights<T>{scratch + off, scratch + HW + off, scratch + 2 * HW + off}
                                     : weights(in[F_WL] + off, in[F_WM] + off, in[F_WR] + off, scratch);
      line(W, out + off, prev, in[F_X] + off, in[F_LAM] + off, w, whole || (NORM && !fused()));
    }
  }

  void run_horizontal(const T* const* in, T* out) {
    const int64_t H = geo.H, W = geo.W, S = STRIP * H;
    T* strip[F_COUNT];
    for (int k = 0; k < F_COUNT; ++k) strip[k] = buf.data() + k * S;
    T* norm = buf.data() + F_COUNT * S;  // 6 strips: normalised weights (3) and sigmoids (3)
    T* carry = norm + 6 * S;             // last line (scan order) of the previous strip
    const int64_t num_strips = (W + STRIP - 1) / STRIP;
    for (int64_t j = 0; j < num_strips; ++j) {
      const int64_t s = geo.reverse ? num_strips - 1 - j : j;
      const int64_t c0 = s * STRIP, n = std::min(STRIP, W - c0);
      for (int k = 0; k < F_OUT; ++k) gather_columns(in[k], H, W, c0, n, strip[k]);
      if (NORM && !fused())  // the strip's n lines in one call
        normalize_lines<T, false>(n, H, strip[F_WL], strip[F_WM], strip[F_WR], norm, norm + S, norm + 2 * S,
                                  nullptr, nullptr, nullptr);
      for (int64_t i = 0; i < n; ++i) {
        const int64_t q = geo.reverse ? n - 1 - i : i;  // column c0 + q, in scan order
        const int64_t c = c0 + q;
        const int64_t l = geo.reverse ? W - 1 - c : c;
        const T* prev = nullptr;
        if (!geo.starts(l)) prev = i == 0 ? carry : strip[F_OUT] + (geo.reverse ? q + 1 : q - 1) * H;
        const bool normalised = NORM && !fused();
        const LineWeights<T> w = normalised ? LineWeights<T>{norm + q * H, norm + S + q * H, norm + 2 * S + q * H}
                                      : LineWeights<T>{strip[F_WL] + q * H, strip[F_WM] + q * H, strip[F_WR] + q * H};
        line(H, strip[F_OUT] + q * H, prev, strip[F_X] + q * H, strip[F_LAM] + q * H, w, normalised);
      }
      const int64_t q_last = geo.reverse ? 0 : n - 1;
      std::memcpy(carry, strip[F_OUT] + q_last * H, sizeof(T) * H);
      scatter_columns(strip[F_OUT], H, W, c0, n, out, false);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Backward drivers (one (b, c) slice).

enum BwdArg { B_G, B_H, B_X, B_LAM, B_WL, B_WM, B_WR, B_DX, B_DLAM, B_DWL, B_DWM, B_DWR, B_COUNT };

template <typename T, bool NORM>
struct BackwardWorker {
  const Geometry& geo;
  bool accumulate_dx;
  std::vector<T> buf;

  BackwardWorker(const Geometry& g, bool acc) : geo(g), accumulate_dx(acc) {
    // vertical: 2 adjoint lines and 2 x 6 weight/sigmoid lines (or 6 planes for a small plane);
    // horizontal: 12 tensor strips, the adjoint strip, 6 strips of weights/sigmoids, and 5 carried
    // lines (adjoint, weights, h).
    const int64_t vertical = 2 * geo.P + (whole_plane() ? 6 * geo.H * geo.W : 12 * geo.P);
    buf.resize(static_cast<size_t>(geo.vertical ? vertical : ((B_COUNT + 7) * STRIP + 5) * geo.H));
  }

  bool whole_plane() const { return NORM && geo.H * geo.W <= SMALL_PLANE; }

  // VJP of the normalisation on the gate gradients of `count` lines of P positions stored one after
  // another from line `first`, skipping lines that start a tile (their gates keep zero gradients).
  // `is_start(i)` tells whether stored line i starts a tile; runs of other lines go in one call.
  template <typename IsStart>
  void vjp_runs(int64_t count, int64_t P, const T* norm, int64_t stride, T* const* grads, IsStart is_start) {
    int64_t i = 0;
    while (i < count) {
      if (is_start(i)) {
        ++i;
        continue;
      }
      int64_t end = i + 1;
      while (end < count && !is_start(end)) ++end;
      const int64_t off = i * P;
      normalize_lines_vjp(end - i, P, norm + off, norm + stride + off, norm + 2 * stride + off,
                          norm + 3 * stride + off, norm + 4 * stride + off, norm + 5 * stride + off,
                          grads[0] + off, grads[1] + off, grads[2] + off);
      i = end;
    }
  }

  void run(const T* const* in, T* const* out) {
    if (geo.vertical)
      run_vertical(in, out);
    else
      run_horizontal(in, out);
  }

  void run_vertical(const T* const* in, T* const* out) {
    const int64_t P = geo.P, W = geo.W, HW = geo.H * geo.W;
    T* a_cur = buf.data();
    T* a_next = a_cur + P;
    T* w_cur = a_next + P;  // 6 * P: weights and sigmoids of line l
    T* w_next = w_cur + 6 * P;  // 6 * P: of line l+1
    T* plane = a_next + P;  // small plane: 6 * HW weights and sigmoids of every line
    const bool whole = whole_plane();
    if (whole)
      normalize_lines(geo.H, W, in[B_WL], in[B_WM], in[B_WR], plane, plane + HW, plane + 2 * HW, plane + 3 * HW,
                      plane + 4 * HW, plane + 5 * HW);
    LineWeights<T> next_w{nullptr, nullptr, nullptr};
    for (int64_t l = geo.L - 1; l >= 0; --l) {
      const int64_t off = geo.img(l) * W;
      LineWeights<T> cur_w{in[B_WL] + off, in[B_WM] + off, in[B_WR] + off};
      if (whole) {
        cur_w = {plane + off, plane + HW + off, plane + 2 * HW + off};
      } else if (NORM) {
        normalize_line(P, cur_w.l, cur_w.m, cur_w.r, w_cur, w_cur + P, w_cur + 2 * P, w_cur + 3 * P,
                       w_cur + 4 * P, w_cur + 5 * P);
        cur_w = {w_cur, w_cur + P, w_cur + 2 * P};
      }
      const bool has_next = l + 1 < geo.L && !geo.starts(l + 1);
      const T* prev_h = geo.starts(l) ? nullptr : in[B_H] + geo.img(l - 1) * W;
      backward_line(P, in[B_G] + off, has_next ? a_next : nullptr, next_w, prev_h, in[B_X] + off,
                    in[B_LAM] + off, a_cur, out[B_DX - B_DX] + off, accumulate_dx, out[B_DLAM - B_DX] + off,
                    out[B_DWL - B_DX] + off, out[B_DWM - B_DX] + off, out[B_DWR - B_DX] + off);
      if (NORM && !whole && prev_h != nullptr)  // a line that starts a tile keeps its zero gate gradients
        normalize_line_vjp(P, cur_w.l, cur_w.m, cur_w.r, w_cur + 3 * P, w_cur + 4 * P, w_cur + 5 * P,
                           out[B_DWL - B_DX] + off, out[B_DWM - B_DX] + off, out[B_DWR - B_DX] + off);
      std::swap(a_cur, a_next);
      if (NORM && !whole) {
        std::swap(w_cur, w_next);
        next_w = {w_next, w_next + P, w_next + 2 * P};
      } else {
        next_w = cur_w;
      }
    }
    if (whole) {  // rows in image order; row r is scan line img(r) (img is its own inverse)
      T* grads[3] = {out[B_DWL - B_DX], out[B_DWM - B_DX], out[B_DWR - B_DX]};
      vjp_runs(geo.H, W, plane, HW, grads, [&](int64_t r) { return geo.starts(geo.img(r)); });
    }
  }

  void run_horizontal(const T* const* in, T* const* out) {
    const int64_t H = geo.H, W = geo.W, S = STRIP * H;
    T* strip[B_COUNT];
    for (int k = 0; k < B_COUNT; ++k) strip[k] = buf.data() + k * S;
    T* adj = buf.data() + B_COUNT * S;
    T* norm = adj + S;            // 6 strips: normalised weights (3) and sigmoids (3) if NORM
    T* carry_a = norm + 6 * S;    // adjoint of the first line (scan order) of the previous strip
    T* carry_w = carry_a + H;     // its weights, 3 * H
    T* h_column = carry_w + 3 * H;  // h of the line before this strip, in scan order
    const int64_t num_strips = (W + STRIP - 1) / STRIP;
    for (int64_t j = num_strips - 1; j >= 0; --j) {  // strips in reverse scan order
      const int64_t s = geo.reverse ? num_strips - 1 - j : j;
      const int64_t c0 = s * STRIP, n = std::min(STRIP, W - c0);
      for (int k = B_G; k <= B_WR; ++k) gather_columns(in[k], H, W, c0, n, strip[k]);
      // The line preceding this strip in scan order (column c0-1 for lr, c0+n for rl).
      const int64_t c_before = geo.reverse ? c0 + n : c0 - 1;
      if (c_before >= 0 && c_before < W) gather_columns(in[B_H], H, W, c_before, 1, h_column);
      if (NORM)  // the strip's n lines in one call
        normalize_lines(n, H, strip[B_WL], strip[B_WM], strip[B_WR], norm, norm + S, norm + 2 * S, norm + 3 * S,
                        norm + 4 * S, norm + 5 * S);
      LineWeights<T> w_of[STRIP];
      for (int64_t q = 0; q < n; ++q)
        w_of[q] = NORM ? LineWeights<T>{norm + q * H, norm + S + q * H, norm + 2 * S + q * H}
                       : LineWeights<T>{strip[B_WL] + q * H, strip[B_WM] + q * H, strip[B_WR] + q * H};
      for (int64_t i = n - 1; i >= 0; --i) {  // lines of the strip in reverse scan order
        const int64_t q = geo.reverse ? n - 1 - i : i;
        const int64_t c = c0 + q;
        const int64_t l = geo.reverse ? W - 1 - c : c;
        const bool has_next = l + 1 < geo.L && !geo.starts(l + 1);
        const T* next_a = nullptr;
        LineWeights<T> next_w{nullptr, nullptr, nullptr};
        if (has_next) {
          if (i == n - 1) {
            next_a = carry_a;
            next_w = {carry_w, carry_w + H, carry_w + 2 * H};
          } else {
            const int64_t qn = geo.reverse ? q - 1 : q + 1;
            next_a = adj + qn * H;
            next_w = w_of[qn];
          }
        }
        const T* prev_h = nullptr;
        if (!geo.starts(l)) prev_h = i == 0 ? h_column : strip[B_H] + (geo.reverse ? q + 1 : q - 1) * H;
        T* o[5];
        for (int k = 0; k < 5; ++k) o[k] = strip[B_DX + k] + q * H;
        backward_line(H, strip[B_G] + q * H, next_a, next_w, prev_h, strip[B_X] + q * H, strip[B_LAM] + q * H,
                      adj + q * H, o[0], false, o[1], o[2], o[3], o[4]);
      }
      if (NORM) {  // the strip's lines in column order; column c0 + q is scan line l(c0 + q)
        T* grads[3] = {strip[B_DWL], strip[B_DWM], strip[B_DWR]};
        vjp_runs(n, H, norm, S, grads, [&](int64_t q) {
          const int64_t c = c0 + q;
          return geo.starts(geo.reverse ? W - 1 - c : c);
        });
      }
      const int64_t q_first = geo.reverse ? n - 1 : 0;  // first line of the strip in scan order
      std::memcpy(carry_a, adj + q_first * H, sizeof(T) * H);
      std::memcpy(carry_w, w_of[q_first].l, sizeof(T) * H);
      std::memcpy(carry_w + H, w_of[q_first].m, sizeof(T) * H);
      std::memcpy(carry_w + 2 * H, w_of[q_first].r, sizeof(T) * H);
      scatter_columns(strip[B_DX], H, W, c0, n, out[0], accumulate_dx);
      for (int k = 1; k < 5; ++k) scatter_columns(strip[B_DX + k], H, W, c0, n, out[k], false);
    }
  }
};

template <typename T, bool NORM>
void forward_impl(const Geometry& geo, int64_t B, int64_t C, int nthreads, const TensorArg* args) {
#pragma omp parallel num_threads(resolve_threads(nthreads))
  {
    ForwardWorker<T, NORM> worker(geo);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const T* in[F_OUT];
      for (int k = 0; k < F_OUT; ++k) in[k] = slice_ptr<T>(args[k], b, c);
      worker.run(in, slice_ptr<T>(args[F_OUT], b, c));
    }
  }
}

template <typename T, bool NORM>
void backward_impl(const Geometry& geo, int64_t B, int64_t C, bool accumulate_dx, int nthreads,
                   const TensorArg* args) {
#pragma omp parallel num_threads(resolve_threads(nthreads))
  {
    BackwardWorker<T, NORM> worker(geo, accumulate_dx);
#pragma omp for schedule(dynamic, 1)
    for (int64_t bc = 0; bc < B * C; ++bc) {
      const int64_t b = bc / C, c = bc % C;
      const T* in[B_DX];
      T* out[5];
      for (int k = 0; k < B_DX; ++k) in[k] = slice_ptr<T>(args[k], b, c);
      for (int k = 0; k < 5; ++k) out[k] = slice_ptr<T>(args[B_DX + k], b, c);
      worker.run(in, out);
    }
  }
}

}  // namespace

extern "C" {

int gspn_cpu_abi_version() { return 1; }

// dtype: 0 = float32, 1 = float64. direction: 0 tb, 1 bt, 2 lr, 3 rl. chunk: 0 = global.
// args: x, lam, w_left, w_mid, w_right, out.
int gspn_scan_forward(int dtype, int direction, int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk,
                      int normalize, int nthreads, const TensorArg* args) {
  if (direction < 0 || direction > 3 || H <= 0 || W <= 0) return 1;
  const Geometry geo(direction, H, W, chunk);
  if (dtype == 0)
    normalize ? forward_impl<float, true>(geo, B, C, nthreads, args) : forward_impl<float, false>(geo, B, C, nthreads, args);
  else if (dtype == 1)
    normalize ? forward_impl<double, true>(geo, B, C, nthreads, args)
              : forward_impl<double, false>(geo, B, C, nthreads, args);
  else
    return 2;
  return 0;
}

// args: grad, h, x, lam, w_left, w_mid, w_right, dx, dlam, dw_left, dw_mid, dw_right.
int gspn_scan_backward(int dtype, int direction, int64_t B, int64_t C, int64_t H, int64_t W, int64_t chunk,
                       int normalize, int accumulate_dx, int nthreads, const TensorArg* args) {
  if (direction < 0 || direction > 3 || H <= 0 || W <= 0) return 1;
  const Geometry geo(direction, H, W, chunk);
  const bool acc = accumulate_dx != 0;
  if (dtype == 0)
    normalize ? backward_impl<float, true>(geo, B, C, acc, nthreads, args)
              : backward_impl<float, false>(geo, B, C, acc, nthreads, args);
  else if (dtype == 1)
    normalize ? backward_impl<double, true>(geo, B, C, acc, nthreads, args)
              : backward_impl<double, false>(geo, B, C, acc, nthreads, args);
  else
    return 2;
  return 0;
}

// Ask the kernel to back the 2 MiB-aligned interior of a fresh, untouched buffer with huge pages:
// first-touch page faults dominate a memory-bound scan's time on large outputs otherwise.
int gspn_advise_hugepages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t huge = uintptr_t(1) << 21;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + huge - 1) & ~(huge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + static_cast<uintptr_t>(nbytes)) & ~(huge - 1);
  if (end > begin) return madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)nbytes;
#endif
  return 0;
}

}  // extern "C"
