// Fused GSPN layer on CPU: parameter generation, the four scans, gating and merge in one pass.
//
// Semantics are those of gspn/ops/gspn_mix/reference.py (the reference composition). With the merge weights
// folded in by the caller (u'_k = m_k u_k, D = sum_k m_k D_k), for a (b, channel block):
//   y = (D z) x + sum_k (U'_k z) h_k,   h_k = scan_k(x; lam = L_k z, gates = stabilize(G_k z))
// where z is the proxy (S values per pixel). No per-pixel parameter map is ever stored: every
// pixel's 3 gate logits, lam and u are generated from z in registers right where the scan needs
// them.
//
// Layout: channels-last. y, dx, the gradient: (B, H, W, Cp) with Cp a multiple of LANES (the caller
// pads); z: (B, H, W, S); x channels-last like y, or planar (B, Cp, H, W) when C needs no padding.
// A work item is one batch element and one block of LANES channels, so every pixel update is
// LANES-wide vector work and the edge conditions of a pixel (first/last position of its line) are
// the same for all lanes. Weights are packed per block:
//   w: (nblk, 4 directions, 5 kinds [gate left, gate mid, gate right, lam, u'], S, LANES)
//   d: (nblk, S, LANES)
// Backward recomputes each direction's h (one block, one direction at a time: H*W*LANES values per
// thread, in a scratch buffer the caller allocates) instead of storing the four hidden maps, then
// runs the adjoint scan with the parameters regenerated again. Partial sums go to per-item buffers
// (deterministic, no atomics):
//   dz_part (nblk, B, H, W, S), dw_part (B, nblk, 4, 5, S, LANES), dd_part (B, nblk, S, LANES).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "gspn_common.h"

namespace {

constexpr int64_t LANES = 16;
constexpr int KINDS = 5;  // gate left, gate mid, gate right, lam, u'
enum Kind { K_L, K_M, K_R, K_LAM, K_U };

struct MixShape {
  int64_t B, Cp, H, W, S, chunk;
  int64_t x_sb, x_sc, x_sp;  // strides of x: batch, channel, pixel (channels-last: x_sc == 1)
  int64_t nblk() const { return Cp / LANES; }
  int64_t pixels() const { return H * W; }
};

// Pixel index (row * W + col) of position q on scan-order line l.
inline int64_t pixel_of(const Geometry& geo, int64_t l, int64_t q) {
  const int64_t i = geo.img(l);
  return geo.vertical ? i * geo.W + q : q * geo.W + i;
}

// acc[k][j] = sum_s w[k][s][j] z[s] for kinds K0 .. K0+NK-1 of one direction's packed weights.
template <typename T, int K0, int NK>
inline void generate(const T* __restrict__ w, const T* __restrict__ z, int64_t S, T (&acc)[KINDS][LANES]) {
  T a[NK][LANES] = {};
  for (int64_t s = 0; s < S; ++s) {
    const T zs = z[s];
    for (int k = 0; k < NK; ++k) {
      const T* __restrict__ row = w + ((K0 + k) * S + s) * LANES;
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) a[k][j] += row[j] * zs;
    }
  }
  for (int k = 0; k < NK; ++k)
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) acc[K0 + k][j] = a[k][j];
}

#if defined(__AVX512F__)
// generate for float32 with 16 lanes, all kinds, N pixels at once (proxies z[n]), into registers:
// g[n][k] = sum_s w[k][s] z[n][s]. Every weight vector is loaded once for the N pixels, and the
// N * KINDS accumulator chains are independent.
template <int N>
GSPN_INLINE void generate16(const float* __restrict__ w, const float* const (&z)[N], int64_t S,
                            __m512 (&g)[N][KINDS]) {
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < KINDS; ++k) g[n][k] = _mm512_setzero_ps();
  for (int64_t s = 0; s < S; ++s) {
    __m512 zs[N];
    for (int n = 0; n < N; ++n) zs[n] = _mm512_set1_ps(z[n][s]);
    for (int k = 0; k < KINDS; ++k) {
      const __m512 wv = _mm512_loadu_ps(w + (k * S + s) * LANES);
      for (int n = 0; n < N; ++n) g[n][k] = _mm512_fmadd_ps(wv, zs[n], g[n][k]);
    }
  }
}

// The 16 lane sums of 16 vectors, r[i] = sum_j v[i][j], by a shuffle-and-add tree (15 additions of
// whole vectors instead of 16 separate horizontal reductions).
GSPN_INLINE __m512 lane_sums16(const __m512 (&v)[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit blocks: a[i] = [v[i] (2 partial blocks), v[i + 8] (2)]
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // b[i] = [v[i], v[i + 8], v[i + 4], v[i + 12]], one block each
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // within blocks: pairs of partial sums of b[i] and b[i + 2]
    c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(b[i], b[i + 2], _MM_SHUFFLE(3, 2, 3, 2)));
  // lane 4k + m: the sum of block k of b[0], b[2], b[1], b[3] (m = 0..3); back to v's order
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15), d);
}
#endif

// Sum of the LANES values of u, as a fixed tree (an `omp simd` reduction without -ffast-math is a
// serial chain of scalar adds here).
template <typename T>
inline T lane_sum(const T (&u)[LANES]) {
  static_assert(LANES == 16, "the tree below sums 16 lanes");
  T r8[8], r4[4];
#pragma omp simd
  for (int j = 0; j < 8; ++j) r8[j] = u[j] + u[j + 8];
#pragma omp simd
  for (int j = 0; j < 4; ++j) r4[j] = r8[j] + r8[j + 4];
  return (r4[0] + r4[2]) + (r4[1] + r4[3]);
}

// Stability-context weights of one pixel (all lanes share the pixel's edge conditions HL/HR: whether
// the left/right neighbour exists), as gspn_common.h's stability_weights; with KEEP also the
// sigmoids (for the VJP).
template <typename T, bool HL, bool HR, bool KEEP>
inline void normalize_lanes(const T (&acc)[KINDS][LANES], T (&w)[3][LANES], T (&s)[3][LANES]) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && LANES == 16) {  // the 16-lane intrinsics of gspn_common.h
    __m512 w0, w1, w2, s0, s1, s2;
    const __mmask16 under =
        stability_weights16<KEEP>(_mm512_loadu_ps(acc[K_L]), _mm512_loadu_ps(acc[K_M]), _mm512_loadu_ps(acc[K_R]),
                                  HL ? 0xFFFF : 0, HR ? 0xFFFF : 0, w0, w1, w2, s0, s1, s2);
    _mm512_storeu_ps(w[0], w0);
    _mm512_storeu_ps(w[1], w1);
    _mm512_storeu_ps(w[2], w2);
    if (KEEP) {
      _mm512_storeu_ps(s[0], s0);
      _mm512_storeu_ps(s[1], s1);
      _mm512_storeu_ps(s[2], s2);
    }
    for (int64_t j = 0; under != 0 && j < LANES; ++j)
      if ((under >> j) & 1) softmax_weights(acc[K_L][j], acc[K_M][j], acc[K_R][j], HL, HR, w[0][j], w[1][j], w[2][j]);
    return;
  }
#endif
  int underflow = 0;
#pragma omp simd reduction(| : underflow)
  for (int64_t j = 0; j < LANES; ++j) {
    const T sum = stability_weights<T, KEEP>(acc[K_L][j], acc[K_M][j], acc[K_R][j], HL, HR, w[0][j], w[1][j],
                                             w[2][j], s[0][j], s[1][j], s[2][j]);
    underflow |= sum < tiny_sum<T>();
  }
  if (!underflow) return;
  for (int64_t j = 0; j < LANES; ++j) {
    T w0, w1, w2, s0, s1, s2;
    if (stability_weights<T, false>(acc[K_L][j], acc[K_M][j], acc[K_R][j], HL, HR, w0, w1, w2, s0, s1, s2) <
        tiny_sum<T>())
      softmax_weights(acc[K_L][j], acc[K_M][j], acc[K_R][j], HL, HR, w[0][j], w[1][j], w[2][j]);
  }
}

template <typename T, bool KEEP>
inline void normalize_lanes(const T (&acc)[KINDS][LANES], bool has_l, bool has_r, T (&w)[3][LANES],
                            T (&s)[3][LANES]) {
  if (has_l && has_r)
    normalize_lanes<T, true, true, KEEP>(acc, w, s);
  else if (has_l)
    normalize_lanes<T, true, false, KEEP>(acc, w, s);
  else if (has_r)
    normalize_lanes<T, false, true, KEEP>(acc, w, s);
  else
    normalize_lanes<T, false, false, KEEP>(acc, w, s);
}

#if defined(__AVX512F__)
// Stability weights w (and with KEEP the sigmoids s) of N pixels from their generated gate logits
// g[n][K_L .. K_R], 16 lanes each; lanes whose valid sigmoids all underflowed take the softmax
// fallback of normalize_lanes.
template <bool KEEP>
__attribute__((noinline)) void fallback_weights16(const float* g, bool has_l, bool has_r, __m512* w, __m512* s) {
  float acc[KINDS][LANES], gw[3][LANES], gs[3][LANES];
  std::memcpy(acc, g, sizeof(acc));
  normalize_lanes<float, KEEP>(acc, has_l, has_r, gw, gs);
  for (int k = 0; k < 3; ++k) {
    w[k] = _mm512_loadu_ps(gw[k]);
    if (KEEP) s[k] = _mm512_loadu_ps(gs[k]);
  }
}

template <bool KEEP, int N>
GSPN_INLINE void pixel_weights16(const __m512 (&g)[N][KINDS], const __mmask16 (&has_l)[N],
                                 const __mmask16 (&has_r)[N], __m512 (&w)[N][3], __m512 (&s)[N][3]) {
  __m512 a[N][3];
  __mmask16 under[N];
  for (int n = 0; n < N; ++n)
    for (int k = 0; k < 3; ++k) a[n][k] = g[n][K_L + k];
  stability_weights16<KEEP, N>(a, has_l, has_r, w, s, under);
  for (int n = 0; n < N; ++n)
    if (__builtin_expect(under[n] != 0, 0)) {  // rare: out of line, off the hot path's registers
      alignas(64) float gbuf[KINDS][LANES];
      for (int k = 0; k < KINDS; ++k) _mm512_store_ps(gbuf[k], g[n][k]);
      fallback_weights16<KEEP>(gbuf[0], has_l[n] != 0, has_r[n] != 0, w[n], s[n]);
    }
}
#endif

// The LANES channels of x at one pixel of a work item's block. x may be channels-last (LANES
// consecutive values per pixel) or planar (NCHW: one H x W plane per channel, read with a stride).
template <typename T>
struct XChannelsLast {
  const T* data;  // the block's first channel at pixel 0
  int64_t pixel_stride;
  inline void prefetch(int64_t pix) const { __builtin_prefetch(data + pix * pixel_stride); }
  inline void load(int64_t pix, T (&v)[LANES]) const {
    const T* __restrict__ p = data + pix * pixel_stride;
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) v[j] = p[j];
  }
};

template <typename T>
struct XPlanar {
  const T* data;  // the block's first channel at pixel 0
  int64_t plane_stride;
  inline void prefetch(int64_t) const {}
  inline void load(int64_t pix, T (&v)[LANES]) const {
    const T* __restrict__ p = data + pix;
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) v[j] = p[j * plane_stride];
  }
};

// Columns [c0, c0 + n) (n <= LANES) of a planar x block staged channels-last, strip[(col * H + row) *
// LANES + channel]: a column scan then reads one contiguous vector per pixel instead of LANES values
// from LANES planes a whole row apart (each a cache miss once the planes outgrow L1).
template <typename T>
void stage_columns(const XPlanar<T>& x, int64_t H, int64_t W, int64_t c0, int64_t n, T* __restrict__ strip) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && LANES == 16) {
    for (int64_t r = 0; r < H; ++r) stage_pixels16(x.data + r * W + c0, x.plane_stride, n, strip + r * LANES, H * LANES);
    return;
  }
#endif
  for (int64_t r = 0; r < H; ++r) {
    T tile[LANES][LANES];  // [channel][column]
    for (int64_t j = 0; j < LANES; ++j) {
      const T* __restrict__ src = x.data + j * x.plane_stride + r * W + c0;
      for (int64_t col = 0; col < n; ++col) tile[j][col] = src[col];
    }
    for (int64_t col = 0; col < n; ++col) {
      T* __restrict__ dst = strip + (col * H + r) * LANES;
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) dst[j] = tile[j][col];
    }
  }
}

// Pixels [p0, p0 + n) of a planar x block staged channels-last, dst[q * LANES + channel]: a row scan
// (or the skip term) then reads one contiguous vector per pixel instead of LANES strided values.
template <typename T>
void stage_pixels(const XPlanar<T>& x, int64_t p0, int64_t n, T* __restrict__ dst) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value && LANES == 16) {
    for (int64_t q = 0; q < n; q += LANES)
      stage_pixels16(x.data + p0 + q, x.plane_stride, std::min(LANES, n - q), dst + q * LANES, LANES);
    return;
  }
#endif
  for (int64_t q = 0; q < n; ++q) x.load(p0 + q, *reinterpret_cast<T(*)[LANES]>(dst + q * LANES));
}

// What a forward scan pass does with y (the block's output, `stride` values per pixel):
//   Y_NONE  nothing (the backward's recomputation, which stores h instead),
//   Y_INIT  y = (D z) x + u' h  (the first pass also computes the merged skip term),
//   Y_ADD   y += u' h,
//   Y_FINAL out = y + u' h  (the last pass writes the final result, out_stride values per pixel; out
//           may be y itself).
enum YMode { Y_NONE, Y_INIT, Y_ADD, Y_FINAL };

template <typename T>
struct YTarget {
  T* y = nullptr;
  int64_t stride = 0;
  T* out = nullptr;
  int64_t out_stride = 0;
  const T* d = nullptr;  // the block's merged skip weights (S x LANES), for Y_INIT
};

// The y update of one pixel: u = u' of the pixel, h its hidden state, xp its x (Y_INIT only).
template <int MODE, typename T>
inline void update_y(const YTarget<T>& yt, int64_t pix, const T* zp, int64_t S, const T* xp, const T* u,
                     const T* h) {
  T* __restrict__ yp = yt.y + pix * yt.stride;
  if constexpr (MODE == Y_INIT) {
    T dz[LANES] = {};
    for (int64_t s = 0; s < S; ++s) {
      const T zs = zp[s];
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) dz[j] += yt.d[s * LANES + j] * zs;
    }
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) yp[j] = dz[j] * xp[j] + u[j] * h[j];
  } else if constexpr (MODE == Y_ADD) {
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) yp[j] += u[j] * h[j];
  } else if constexpr (MODE == Y_FINAL) {
    T* __restrict__ op = yt.out + pix * yt.out_stride;
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) op[j] = yp[j] + u[j] * h[j];
  }
}

// One direction's scan of one block. `line` holds 2 * (P + 2) * LANES values (two lines with a zero
// lane-vector on each side). With STORE, every h is also written to hbuf (pixel-major, LANES per
// pixel) for the backward; MODE says what happens to y (YMode).
template <typename T, int MODE, bool STORE, typename X>
void scan_direction(const MixShape& sh, const Geometry& geo, const X& x, const T* z, const T* w,
                    const YTarget<T>& yt, T* hbuf, T* line, T* strip = nullptr) {
  constexpr bool ACCUMULATE = MODE != Y_NONE;
  const int64_t P = geo.P, S = sh.S;
  // Planar x in a column scan: read through LANES-column strips staged channels-last (`strip`,
  // LANES * H * LANES values).
  constexpr bool PLANAR = std::is_same<X, XPlanar<T>>::value;
  const bool staged = PLANAR && !geo.vertical && strip != nullptr;
  // Planar x in a row scan: each row staged channels-last into `strip` (W * LANES values) first.
  const bool row_staged = PLANAR && geo.vertical && strip != nullptr;
  int64_t staged_c0 = -1;
  T* prev = line + LANES;
  T* cur = line + (P + 2) * LANES + LANES;
  std::fill(line, line + 2 * (P + 2) * LANES, T(0));
  T acc[KINDS][LANES];
  T gw[3][LANES], gs[3][LANES];
  for (int64_t l = 0; l < geo.L; ++l) {
    const bool start = geo.starts(l);
    // Column scans step through memory a whole image row per pixel: fetch the next line's data
    // while this line is computed (the hardware prefetchers do not follow page-crossing strides).
    const bool prefetch = !geo.vertical && l + 1 < geo.L;
    const int64_t column = geo.img(l), c0 = column / LANES * LANES;
    if (staged && c0 != staged_c0) {
      if constexpr (PLANAR) stage_columns(x, sh.H, sh.W, c0, std::min(LANES, sh.W - c0), strip);
      staged_c0 = c0;
    }
    if constexpr (PLANAR)
      if (row_staged) stage_pixels(x, geo.img(l) * sh.W, sh.W, strip);
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value && LANES == 16) {
      // float32 with AVX-512: the generated values and the weights stay in registers, and pixels go
      // two at a time (one pixel's update is a ~100-cycle dependency chain of ~110 instructions, about
      // what the core's scheduler holds: alone it would leave the vector units half idle).
      if (!start) {
        const auto pixels = [&](auto group, int64_t q0) GSPN_LAMBDA_INLINE {
          constexpr int N = decltype(group)::value;
          int64_t pix[N];
          const float* zp[N];
          const float* xq[N];
          alignas(64) float xbuf[N][LANES];
          __mmask16 has_l[N], has_r[N];
          for (int n = 0; n < N; ++n) {
            const int64_t q = q0 + n;
            pix[n] = pixel_of(geo, l, q);
            if (prefetch) {
              const int64_t next = pixel_of(geo, l + 1, q);
              x.prefetch(next);
              __builtin_prefetch(z + next * S);
              if (ACCUMULATE) __builtin_prefetch(yt.y + next * yt.stride, 1);
            }
            zp[n] = z + pix[n] * S;
            if (staged) {
              xq[n] = strip + ((column - c0) * sh.H + q) * LANES;
            } else if (row_staged) {
              xq[n] = strip + q * LANES;
            } else {
              x.load(pix[n], xbuf[n]);
              xq[n] = xbuf[n];
            }
            has_l[n] = q > 0 ? 0xFFFF : 0;
            has_r[n] = q < P - 1 ? 0xFFFF : 0;
          }
          __m512 g[N][KINDS], gwv[N][3], gsv[N][3];
          generate16<N>(w, zp, S, g);
          pixel_weights16<false, N>(g, has_l, has_r, gwv, gsv);
          __m512 hv[N];
          for (int n = 0; n < N; ++n) hv[n] = _mm512_mul_ps(g[n][K_LAM], _mm512_loadu_ps(xq[n]));
          for (int k = 0; k < 3; ++k)  // neighbours q - 1, q, q + 1 on the previous line
            for (int n = 0; n < N; ++n)
              hv[n] = _mm512_fmadd_ps(gwv[n][k], _mm512_loadu_ps(prev + (q0 + n + k - 1) * LANES), hv[n]);
          __m512 base[N];  // Y_INIT: the skip term (D z) x; otherwise y
          if constexpr (MODE == Y_INIT) {
            for (int n = 0; n < N; ++n) base[n] = _mm512_setzero_ps();
            for (int64_t s = 0; s < S; ++s) {
              const __m512 dv = _mm512_loadu_ps(yt.d + s * LANES);
              for (int n = 0; n < N; ++n) base[n] = _mm512_fmadd_ps(dv, _mm512_set1_ps(zp[n][s]), base[n]);
            }
            for (int n = 0; n < N; ++n) base[n] = _mm512_mul_ps(base[n], _mm512_loadu_ps(xq[n]));
          } else if constexpr (ACCUMULATE) {
            for (int n = 0; n < N; ++n) base[n] = _mm512_loadu_ps(yt.y + pix[n] * yt.stride);
          }
          for (int n = 0; n < N; ++n) {
            _mm512_storeu_ps(cur + (q0 + n) * LANES, hv[n]);
            if constexpr (ACCUMULATE) {
              float* yp = MODE == Y_FINAL ? yt.out + pix[n] * yt.out_stride : yt.y + pix[n] * yt.stride;
              _mm512_storeu_ps(yp, _mm512_add_ps(base[n], _mm512_mul_ps(g[n][K_U], hv[n])));
            }
            if (STORE) _mm512_storeu_ps(hbuf + pix[n] * LANES, hv[n]);
          }
        };
        int64_t q = 0;
        for (; q + 2 <= P; q += 2) pixels(std::integral_constant<int, 2>(), q);
        if (q < P) pixels(std::integral_constant<int, 1>(), q);
        std::swap(prev, cur);
        continue;
      }
    }
#endif
    for (int64_t q = 0; q < P; ++q) {
      const int64_t pix = pixel_of(geo, l, q);
      if (prefetch) {
        const int64_t next = pixel_of(geo, l + 1, q);
        x.prefetch(next);
        __builtin_prefetch(z + next * S);
        if (ACCUMULATE) __builtin_prefetch(yt.y + next * yt.stride, 1);
      }
      const T* zp = z + pix * S;
      T xp[LANES];
      if (staged)
        std::memcpy(xp, strip + ((column - c0) * sh.H + q) * LANES, sizeof(T) * LANES);
      else if (row_staged)
        std::memcpy(xp, strip + q * LANES, sizeof(T) * LANES);
      else
        x.load(pix, xp);
      T* __restrict__ hq = cur + q * LANES;
      if (start) {
        generate<T, K_LAM, 2>(w, zp, S, acc);
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j) hq[j] = acc[K_LAM][j] * xp[j];
      } else {
        const T* __restrict__ pl = prev + (q - 1) * LANES;
        const T* __restrict__ pm = prev + q * LANES;
        const T* __restrict__ pr = prev + (q + 1) * LANES;
        generate<T, 0, KINDS>(w, zp, S, acc);
        normalize_lanes<T, false>(acc, q > 0, q < P - 1, gw, gs);
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j)
          hq[j] = acc[K_LAM][j] * xp[j] + gw[0][j] * pl[j] + gw[1][j] * pm[j] + gw[2][j] * pr[j];
      }
      update_y<MODE>(yt, pix, zp, S, xp, acc[K_U], hq);
      if (STORE) std::memcpy(hbuf + pix * LANES, hq, sizeof(T) * LANES);
    }
    std::swap(prev, cur);
  }
}

// Backward of the skip term; initialises dx, this block's dz and dd.
template <typename T, typename X>
void skip_backward(const MixShape& sh, const X& x, const T* z, const T* d, const T* gy, T* dx, T* dz, T* dd) {
  const int64_t S = sh.S;
  std::fill(dd, dd + S * LANES, T(0));
  for (int64_t p = 0; p < sh.pixels(); ++p) {
    const T* zp = z + p * S;
    T xp[LANES];
    x.load(p, xp);
    const T* __restrict__ gp = gy + p * sh.Cp;
    T* __restrict__ dxp = dx + p * sh.Cp;
    T acc[LANES] = {};
    T e[LANES];
    for (int64_t s = 0; s < S; ++s) {
      const T zs = zp[s];
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) acc[j] += d[s * LANES + j] * zs;
    }
#pragma omp simd
    for (int64_t j = 0; j < LANES; ++j) {
      dxp[j] = gp[j] * acc[j];
      e[j] = gp[j] * xp[j];
    }
    for (int64_t s = 0; s < S; ++s) {
      const T zs = zp[s];
      T* __restrict__ dds = dd + s * LANES;
      const T* __restrict__ ds = d + s * LANES;
      T u[LANES];
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) {
        dds[j] += e[j] * zs;
        u[j] = ds[j] * e[j];
      }
      dz[p * S + s] = lane_sum(u);
    }
  }
}

// Adjoint scan of one direction of one block, h of the direction already in hbuf. Adds to dx, dz
// and this direction's dw (5 kinds x S x LANES). `line` holds 6 * (P + 2) * LANES values: the
// scattered adjoint contributions (w_left a, w_mid a, w_right a) of the next line and of this one.
template <typename T, typename X>
void scan_direction_backward(const MixShape& sh, const Geometry& geo, const X& x, const T* z, const T* w,
                             const T* gy, const T* hbuf, T* dx, T* dz, T* dw, T* line) {
  const int64_t P = geo.P, S = sh.S, stride = (P + 2) * LANES;
  std::fill(line, line + 6 * stride, T(0));
  T* next = line + LANES;           // 3 lines: contributions of line l+1 (read)
  T* cur = line + 3 * stride + LANES;  // 3 lines: contributions of line l (written)
  T acc[KINDS][LANES];
  T gw[3][LANES], gs[3][LANES];
  T d[KINDS][LANES];  // gradients w.r.t. the generated values (gate logits, lam, u')
  for (int64_t l = geo.L - 1; l >= 0; --l) {
    const bool start = geo.starts(l);
    const bool has_next = l + 1 < geo.L && !geo.starts(l + 1);
    const bool prefetch = !geo.vertical && l >= 1;
#if defined(__AVX512F__)
    if constexpr (std::is_same<T, float>::value && LANES == 16) {
      // float32 with AVX-512: the loop below in registers, pixels two at a time (as in scan_direction).
      const auto pixels = [&](auto group, int64_t q0) GSPN_LAMBDA_INLINE {
        constexpr int N = decltype(group)::value;
        int64_t pix[N];
        const float* zp[N];
        alignas(64) float xbuf[N][LANES];
        __mmask16 has_l[N], has_r[N];
        for (int n = 0; n < N; ++n) {
          const int64_t q = q0 + n;
          pix[n] = pixel_of(geo, l, q);
          if (prefetch) {  // column scans: the next line's data, a whole image row apart per pixel
            const int64_t nxt = pixel_of(geo, l - 1, q);
            __builtin_prefetch(gy + nxt * sh.Cp);
            __builtin_prefetch(dx + nxt * sh.Cp, 1);
            __builtin_prefetch(z + nxt * S);
            x.prefetch(nxt);
            if (l >= 2) __builtin_prefetch(hbuf + pixel_of(geo, l - 2, q) * LANES);
          }
          zp[n] = z + pix[n] * S;
          x.load(pix[n], xbuf[n]);
          has_l[n] = q > 0 ? 0xFFFF : 0;
          has_r[n] = q < P - 1 ? 0xFFFF : 0;
        }
        __m512 g[N][KINDS], dv[N][KINDS], a[N];
        generate16<N>(w, zp, S, g);
        for (int n = 0; n < N; ++n) {
          const __m512 gyv = _mm512_loadu_ps(gy + pix[n] * sh.Cp);
          a[n] = _mm512_mul_ps(gyv, g[n][K_U]);
          dv[n][K_U] = _mm512_mul_ps(gyv, _mm512_loadu_ps(hbuf + pix[n] * LANES));
        }
        if (has_next)
          for (int n = 0; n < N; ++n) {
            const int64_t q = q0 + n;
            const __m512 nl = _mm512_loadu_ps(next + (q + 1) * LANES), nm = _mm512_loadu_ps(next + stride + q * LANES);
            const __m512 nr = _mm512_loadu_ps(next + 2 * stride + (q - 1) * LANES);
            a[n] = _mm512_add_ps(a[n], _mm512_add_ps(_mm512_add_ps(nl, nm), nr));
          }
        for (int n = 0; n < N; ++n) {
          float* dxp = dx + pix[n] * sh.Cp;
          _mm512_storeu_ps(dxp, _mm512_add_ps(_mm512_loadu_ps(dxp), _mm512_mul_ps(g[n][K_LAM], a[n])));
          dv[n][K_LAM] = _mm512_mul_ps(_mm512_load_ps(xbuf[n]), a[n]);
        }
        if (start) {
          for (int n = 0; n < N; ++n)
            for (int k = 0; k < 3; ++k) {
              dv[n][K_L + k] = _mm512_setzero_ps();
              _mm512_storeu_ps(cur + k * stride + (q0 + n) * LANES, _mm512_setzero_ps());
            }
        } else {
          __m512 wv[N][3], sv[N][3];
          pixel_weights16<true, N>(g, has_l, has_r, wv, sv);
          const __m512 one = _mm512_set1_ps(1.0f);
          for (int n = 0; n < N; ++n) {
            const int64_t q = q0 + n;
            __m512 gk[3];  // a times the previous line's h at q - 1, q, q + 1
            gk[0] = has_l[n] ? _mm512_mul_ps(a[n], _mm512_loadu_ps(hbuf + pixel_of(geo, l - 1, q - 1) * LANES))
                             : _mm512_setzero_ps();
            gk[1] = _mm512_mul_ps(a[n], _mm512_loadu_ps(hbuf + pixel_of(geo, l - 1, q) * LANES));
            gk[2] = has_r[n] ? _mm512_mul_ps(a[n], _mm512_loadu_ps(hbuf + pixel_of(geo, l - 1, q + 1) * LANES))
                             : _mm512_setzero_ps();
            const __m512 dot01 = _mm512_add_ps(_mm512_mul_ps(gk[0], wv[n][0]), _mm512_mul_ps(gk[1], wv[n][1]));
            const __m512 dot = _mm512_add_ps(dot01, _mm512_mul_ps(gk[2], wv[n][2]));
            for (int k = 0; k < 3; ++k) {
              dv[n][K_L + k] = _mm512_mul_ps(_mm512_mul_ps(wv[n][k], _mm512_sub_ps(one, sv[n][k])),
                                             _mm512_sub_ps(gk[k], dot));
              _mm512_storeu_ps(cur + k * stride + q * LANES, _mm512_mul_ps(wv[n][k], a[n]));
            }
          }
        }
        // dw[k][s] += d[k] z[s]; dz[s] += sum_k sum_j w[k][s][j] d[k][j], the lane sums 16 at a time
        constexpr int64_t SG = LANES / N;  // values of s per lane_sums16
        for (int64_t s0 = 0; s0 < S; s0 += SG) {
          const int64_t ns = std::min(SG, S - s0);
          __m512 u[LANES];
          for (int64_t i = 0; i < LANES; ++i) u[i] = _mm512_setzero_ps();
          for (int64_t si = 0; si < ns; ++si) {
            const int64_t s = s0 + si;
            __m512 zs[N];
            for (int n = 0; n < N; ++n) zs[n] = _mm512_set1_ps(zp[n][s]);
            for (int k = 0; k < KINDS; ++k) {
              float* drow = dw + (k * S + s) * LANES;
              __m512 dsum = _mm512_loadu_ps(drow);
              for (int n = 0; n < N; ++n) dsum = _mm512_fmadd_ps(dv[n][k], zs[n], dsum);
              _mm512_storeu_ps(drow, dsum);
              const __m512 row = _mm512_loadu_ps(w + (k * S + s) * LANES);
              for (int n = 0; n < N; ++n) u[n * SG + si] = _mm512_fmadd_ps(row, dv[n][k], u[n * SG + si]);
            }
          }
          alignas(64) float sums[LANES];
          _mm512_store_ps(sums, lane_sums16(u));
          for (int n = 0; n < N; ++n)
            for (int64_t si = 0; si < ns; ++si) dz[pix[n] * S + s0 + si] += sums[n * SG + si];
        }
      };
      int64_t q = 0;
      for (; q + 2 <= P; q += 2) pixels(std::integral_constant<int, 2>(), q);
      if (q < P) pixels(std::integral_constant<int, 1>(), q);
      std::swap(next, cur);
      continue;
    }
#endif
    for (int64_t q = 0; q < P; ++q) {
      const int64_t pix = pixel_of(geo, l, q);
      const T* zp = z + pix * S;
      T xp[LANES];
      x.load(pix, xp);
      const T* __restrict__ gp = gy + pix * sh.Cp;
      const T* __restrict__ hp = hbuf + pix * LANES;
      T* __restrict__ dxp = dx + pix * sh.Cp;
      generate<T, 0, KINDS>(w, zp, S, acc);
      T a[LANES];
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) {
        a[j] = gp[j] * acc[K_U][j];
        d[K_U][j] = gp[j] * hp[j];
      }
      if (has_next) {
        const T* __restrict__ nl = next + (q + 1) * LANES;
        const T* __restrict__ nm = next + stride + q * LANES;
        const T* __restrict__ nr = next + 2 * stride + (q - 1) * LANES;
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j) a[j] += nl[j] + nm[j] + nr[j];
      }
#pragma omp simd
      for (int64_t j = 0; j < LANES; ++j) {
        dxp[j] += acc[K_LAM][j] * a[j];
        d[K_LAM][j] = xp[j] * a[j];
      }
      T* __restrict__ cl = cur + q * LANES;
      T* __restrict__ cm = cur + stride + q * LANES;
      T* __restrict__ cr = cur + 2 * stride + q * LANES;
      if (start) {
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j) d[K_L][j] = d[K_M][j] = d[K_R][j] = cl[j] = cm[j] = cr[j] = T(0);
      } else {
        const bool has_l = q > 0, has_r = q < P - 1;
        normalize_lanes<T, true>(acc, has_l, has_r, gw, gs);
        const T zero[LANES] = {};
        const T* __restrict__ hl = has_l ? hbuf + pixel_of(geo, l - 1, q - 1) * LANES : zero;
        const T* __restrict__ hm = hbuf + pixel_of(geo, l - 1, q) * LANES;
        const T* __restrict__ hr = has_r ? hbuf + pixel_of(geo, l - 1, q + 1) * LANES : zero;
#pragma omp simd
        for (int64_t j = 0; j < LANES; ++j) {
          const T g0 = a[j] * hl[j], g1 = a[j] * hm[j], g2 = a[j] * hr[j];
          const T dot = g0 * gw[0][j] + g1 * gw[1][j] + g2 * gw[2][j];
          d[K_L][j] = gw[0][j] * (T(1) - gs[0][j]) * (g0 - dot);
          d[K_M][j] = gw[1][j] * (T(1) - gs[1][j]) * (g1 - dot);
          d[K_R][j] = gw[2][j] * (T(1) - gs[2][j]) * (g2 - dot);
          cl[j] = gw[0][j] * a[j];
          cm[j] = gw[1][j] * a[j];
          cr[j] = gw[2][j] * a[j];
        }
      }
      // dw[k][s] += d[k] z[s]; dz[s] += sum_k sum_j w[k][s][j] d[k][j]
      for (int64_t s = 0; s < S; ++s) {
        const T zs = zp[s];
        T u[LANES] = {};
        for (int k = 0; k < KINDS; ++k) {
          const T* __restrict__ row = w + (k * S + s) * LANES;
          T* __restrict__ drow = dw + (k * S + s) * LANES;
#pragma omp simd
          for (int64_t j = 0; j < LANES; ++j) {
            drow[j] += d[k][j] * zs;
            u[j] += row[j] * d[k][j];
          }
        }
        dz[pix * S + s] += lane_sum(u);
      }
    }
    std::swap(next, cur);
  }
}

template <typename T, template <typename> class XV>
XV<T> x_view(const T* x, const MixShape& sh, int64_t b, int64_t blk) {
  const T* data = x + b * sh.x_sb + blk * LANES * sh.x_sc;
  return XV<T>{data, std::is_same<XV<T>, XChannelsLast<T>>::value ? sh.x_sp : sh.x_sc};
}

template <typename T, template <typename> class XV>
void mix_forward_impl(const MixShape& sh, int nthreads, const T* x, const T* z, const T* w, const T* d, T* y) {
  const Geometry geos[4] = {Geometry(0, sh.H, sh.W, sh.chunk), Geometry(1, sh.H, sh.W, sh.chunk),
                            Geometry(2, sh.H, sh.W, sh.chunk), Geometry(3, sh.H, sh.W, sh.chunk)};
  const int64_t nblk = sh.nblk(), HW = sh.pixels();
  const int64_t wsize = 4 * KINDS * sh.S * LANES;
  // No more threads than work items: each thread allocates the buffers below (y_local: HW * LANES).
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(resolve_threads(nthreads), sh.B * nblk)));
#pragma omp parallel num_threads(threads)
  {
    std::vector<T> line(2 * (std::max(sh.H, sh.W) + 2) * LANES);
    // planar x: staged columns (LANES * H * LANES values) or rows (W * LANES)
    std::vector<T> strip(std::is_same<XV<T>, XPlanar<T>>::value ? std::max(LANES * sh.H, sh.W) * LANES : 0);
    // With several channel blocks, y is accumulated in a dense per-thread block buffer (HW * LANES values,
    // pixel stride LANES instead of Cp: 6x fewer pages and cache lines touched by the passes); the last
    // pass writes the result out.
    std::vector<T> y_local(nblk > 1 ? HW * LANES : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < sh.B * nblk; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      const XV<T> xb = x_view<T, XV>(x, sh, b, blk);
      const T* zb = z + b * HW * sh.S;
      T* yb = y + b * HW * sh.Cp + blk * LANES;
      const T* wb = w + blk * wsize;
      T* ya = y_local.empty() ? yb : y_local.data();
      const int64_t ys = y_local.empty() ? sh.Cp : LANES;
      const YTarget<T> yt{ya, ys, yb, sh.Cp, d + blk * sh.S * LANES};
      T* strip_data = strip.empty() ? nullptr : strip.data();
      // Passes in the order top-bottom (with the skip term), left-right, right-left, bottom-top (writing
      // out): the first and last are row scans, which touch y in memory order.
      const auto pass = [&](auto mode, int k) {
        scan_direction<T, decltype(mode)::value, false>(sh, geos[k], xb, zb, wb + k * KINDS * sh.S * LANES, yt,
                                                        nullptr, line.data(), strip_data);
      };
      pass(std::integral_constant<int, Y_INIT>(), 0);
      pass(std::integral_constant<int, Y_ADD>(), 2);
      pass(std::integral_constant<int, Y_ADD>(), 3);
      pass(std::integral_constant<int, Y_FINAL>(), 1);
    }
  }
}

// scratch: nthreads * H * W * LANES values (each thread's recomputed hidden state of one direction).
template <typename T, template <typename> class XV>
void mix_backward_impl(const MixShape& sh, int nthreads, const T* x, const T* z, const T* w, const T* d,
                       const T* gy, T* dx, T* dz_part, T* dw_part, T* dd_part, T* scratch) {
  const Geometry geos[4] = {Geometry(0, sh.H, sh.W, sh.chunk), Geometry(1, sh.H, sh.W, sh.chunk),
                            Geometry(2, sh.H, sh.W, sh.chunk), Geometry(3, sh.H, sh.W, sh.chunk)};
  const int64_t nblk = sh.nblk(), HW = sh.pixels();
  const int64_t wdir = KINDS * sh.S * LANES, wsize = 4 * wdir;
#pragma omp parallel num_threads(nthreads)
  {
    std::vector<T> line(6 * (std::max(sh.H, sh.W) + 2) * LANES);
#ifdef _OPENMP
    T* hbuf = scratch + static_cast<int64_t>(omp_get_thread_num()) * HW * LANES;
#else
    T* hbuf = scratch;
#endif
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < sh.B * nblk; ++item) {
      const int64_t b = item / nblk, blk = item % nblk;
      const int64_t off = b * HW * sh.Cp + blk * LANES;
      const XV<T> xb = x_view<T, XV>(x, sh, b, blk);
      const T* zb = z + b * HW * sh.S;
      const T* wb = w + blk * wsize;
      T* dz = dz_part + (blk * sh.B + b) * HW * sh.S;
      T* dw = dw_part + item * wsize;
      skip_backward(sh, xb, zb, d + blk * sh.S * LANES, gy + off, dx + off, dz, dd_part + item * sh.S * LANES);
      std::fill(dw, dw + wsize, T(0));
      for (int k = 0; k < 4; ++k) {
        scan_direction<T, Y_NONE, true>(sh, geos[k], xb, zb, wb + k * wdir, YTarget<T>{}, hbuf, line.data());
        scan_direction_backward(sh, geos[k], xb, zb, wb + k * wdir, gy + off, hbuf, dx + off, dz, dw + k * wdir,
                                line.data());
      }
    }
  }
}

template <typename T>
void mix_forward(const MixShape& sh, int nthreads, const void* x, const void* z, const void* w, const void* d,
                 void* y) {
  const auto args = std::make_tuple(static_cast<const T*>(x), static_cast<const T*>(z), static_cast<const T*>(w),
                                    static_cast<const T*>(d), static_cast<T*>(y));
  if (sh.x_sc == 1)
    std::apply([&](auto... a) { mix_forward_impl<T, XChannelsLast>(sh, nthreads, a...); }, args);
  else
    std::apply([&](auto... a) { mix_forward_impl<T, XPlanar>(sh, nthreads, a...); }, args);
}

template <typename T>
void mix_backward(const MixShape& sh, int nthreads, const void* x, const void* z, const void* w, const void* d,
                  const void* gy, void* dx, void* dz_part, void* dw_part, void* dd_part, void* scratch) {
  const auto args = std::make_tuple(static_cast<const T*>(x), static_cast<const T*>(z), static_cast<const T*>(w),
                                    static_cast<const T*>(d), static_cast<const T*>(gy), static_cast<T*>(dx),
                                    static_cast<T*>(dz_part), static_cast<T*>(dw_part), static_cast<T*>(dd_part),
                                    static_cast<T*>(scratch));
  if (sh.x_sc == 1)
    std::apply([&](auto... a) { mix_backward_impl<T, XChannelsLast>(sh, nthreads, a...); }, args);
  else
    std::apply([&](auto... a) { mix_backward_impl<T, XPlanar>(sh, nthreads, a...); }, args);
}

bool valid(const MixShape& sh) {
  const bool shape_ok = sh.B >= 0 && sh.Cp > 0 && sh.Cp % LANES == 0 && sh.H > 0 && sh.W > 0 && sh.S > 0;
  const bool x_ok = (sh.x_sc == 1 && sh.x_sp >= sh.Cp) || (sh.x_sp == 1 && sh.x_sc >= sh.H * sh.W);
  return shape_ok && x_ok && sh.chunk >= 0;
}

}  // namespace

extern "C" {

int gspn_mix_lanes() { return static_cast<int>(LANES); }

// dtype: 0 = float32, 1 = float64; chunk 0 = global. x: channels-last (x_sc == 1) or planar
// (x_sp == 1) with the given strides; the other buffers as in the header comment.
int gspn_mix_forward(int dtype, int64_t B, int64_t Cp, int64_t H, int64_t W, int64_t S, int64_t chunk,
                     int nthreads, int64_t x_sb, int64_t x_sc, int64_t x_sp, const void* x, const void* z,
                     const void* w, const void* d, void* y) {
  const MixShape sh{B, Cp, H, W, S, chunk, x_sb, x_sc, x_sp};
  if (!valid(sh)) return 1;
  if (dtype == 0)
    mix_forward<float>(sh, nthreads, x, z, w, d, y);
  else if (dtype == 1)
    mix_forward<double>(sh, nthreads, x, z, w, d, y);
  else
    return 2;
  return 0;
}

// nthreads: exactly the number of threads the scratch buffer (nthreads * H * W * LANES) serves.
int gspn_mix_backward(int dtype, int64_t B, int64_t Cp, int64_t H, int64_t W, int64_t S, int64_t chunk,
                      int nthreads, int64_t x_sb, int64_t x_sc, int64_t x_sp, const void* x, const void* z,
                      const void* w, const void* d, const void* gy, void* dx, void* dz_part, void* dw_part,
                      void* dd_part, void* scratch) {
  const MixShape sh{B, Cp, H, W, S, chunk, x_sb, x_sc, x_sp};
  if (!valid(sh) || nthreads < 1) return 1;
  if (dtype == 0)
    mix_backward<float>(sh, nthreads, x, z, w, d, gy, dx, dz_part, dw_part, dd_part, scratch);
  else if (dtype == 1)
    mix_backward<double>(sh, nthreads, x, z, w, d, gy, dx, dz_part, dw_part, dd_part, scratch);
  else
    return 2;
  return 0;
}

}  // extern "C"
