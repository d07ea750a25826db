// Shared maths of the GSPN CPU kernels (line_scan.cpp: the line scan; gspn_mix.cpp: the fused layer).
// Header-only, internal linkage: each translation unit gets its own inlined copy.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

// The gate maths must be inlined into the vector loops that call it: an out-of-line call makes
// GCC run those loops one element at a time.
#if defined(__GNUC__)
#define GSPN_INLINE inline __attribute__((always_inline))
#define GSPN_LAMBDA_INLINE __attribute__((always_inline))
#else
#define GSPN_INLINE inline
#define GSPN_LAMBDA_INLINE
#endif

namespace {

// OpenMP team size for a requested thread count (<= 0: OpenMP's default).
inline int resolve_threads(int nthreads) {
#ifdef _OPENMP
  return nthreads > 0 ? nthreads : omp_get_max_threads();
#else
  (void)nthreads;
  return 1;
#endif
}

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
GSPN_INLINE float exp_nonpositive(float x) {
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
GSPN_INLINE double exp_nonpositive(double x) { return std::exp(x); }

template <typename T>
GSPN_INLINE T sigmoid(T a) {
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

// The stability-context weights of one position with one division (two with KEEP): with
// t_k = exp(-|a_k|), sigmoid(a_k) = n_k / d_k (n_k = 1 if a_k >= 0 else t_k, d_k = 1 + t_k), so
//   w_k = s_k / sum_j s_j = e_k / sum_j e_j,   e_k = n_k * prod_{j != k} d_j.
// A missing neighbour has n = 0 and d = 1, selected: its logit (even NaN) never enters. Returns
// sum_j e_j (the sum of the sigmoids times prod_j d_j, in [1, 8]) for the underflow test; with KEEP
// also the sigmoids s_k = e_k / prod_j d_j (the backward's VJP needs them).
template <typename T, bool KEEP>
GSPN_INLINE T stability_weights(T al, T am, T ar, bool has_l, bool has_r, T& wl, T& wm, T& wr, T& sl, T& sm, T& sr) {
  const T tl = exp_nonpositive(-std::abs(al)), tm = exp_nonpositive(-std::abs(am));
  const T tr = exp_nonpositive(-std::abs(ar));
  const T nl = has_l ? (al >= T(0) ? T(1) : tl) : T(0);
  const T nm = am >= T(0) ? T(1) : tm;
  const T nr = has_r ? (ar >= T(0) ? T(1) : tr) : T(0);
  const T dl = has_l ? T(1) + tl : T(1), dm = T(1) + tm, dr = has_r ? T(1) + tr : T(1);
  const T el = nl * (dm * dr), em = nm * (dl * dr), er = nr * (dl * dm);
  const T sum = el + em + er;
  const T inv = T(1) / std::max(sum, tiny_sum<T>());
  wl = el * inv;
  // A position without neighbours (a line of one pixel): its one weight is exactly 1 (em * inv can be
  // 1 - ulp), so the gradient of its logit is exactly 0, as in the reference. A NaN logit stays NaN.
  wm = !has_l && !has_r && am == am ? T(1) : em * inv;
  wr = er * inv;
  if (KEEP) {
    const T r = T(1) / (dl * dm * dr);
    sl = el * r;
    sm = em * r;
    sr = er * r;
  }
  return sum;
}

#if defined(__AVX512F__)
// ---------------------------------------------------------------------------------------------
// float32 with AVX-512: the same weights, 16 positions per vector, written with intrinsics. The
// auto-vectorised loops above run several times slower: GCC's code for them needs about twice the
// instructions (a two-uop rounding and a division per vector, blends for every select, and the
// edge tests as vector compares of positions).

// exp(-|a|) for 16 lanes, 0 in the lanes outside `keep`: reduction to |r| <= ln2/2 (n rounded with
// the 1.5 * 2^23 trick), a degree-5 polynomial fitted for relative error (9e-8 on the interval; under
// 1.5 ulp in all for |a| < 10), scaled by 2^n with vscalefps. -|a| is clamped at -87 first, so
// that ±inf gives e^-87 (a zero weight to working precision), not inf - inf; a NaN stays NaN.
// M independent vectors at a time (each step issued for all M before the next step, so that M
// dependency chains are in flight at once: one chain alone is latency-bound).
template <int M>
GSPN_INLINE void exp_neg_abs16(const __mmask16 (&keep)[M], const __m512 (&a)[M], __m512 (&t)[M]) {
  const __m512 magic = _mm512_set1_ps(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  __m512 x[M], n[M], r[M], y[M];
  for (int i = 0; i < M; ++i) {
    const __m512 neg = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(a[i]), _mm512_set1_epi32(INT32_MIN)));
    x[i] = _mm512_max_ps(_mm512_set1_ps(-87.0f), neg);  // vmaxps: the second operand if NaN
  }
  for (int i = 0; i < M; ++i)
    n[i] = _mm512_sub_ps(_mm512_fmadd_ps(x[i], _mm512_set1_ps(1.44269504088896341f), magic), magic);
  // r = x - n ln2 in one fused multiply-add with ln2 rounded to float: the error, |n| * 1.9e-9 (at most
  // 2.4e-7 relative at x = -87, 3e-8 for |x| < 10), stays far below exp's own sensitivity to a half-ulp
  // change of x (|x| * 6e-8).
  for (int i = 0; i < M; ++i) r[i] = _mm512_fnmadd_ps(n[i], _mm512_set1_ps(0.693147182464599609375f), x[i]);
  for (int i = 0; i < M; ++i)
    y[i] = _mm512_fmadd_ps(_mm512_set1_ps(8.290303e-3f), r[i], _mm512_set1_ps(4.1897915e-2f));
  for (int i = 0; i < M; ++i) y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(1.6667636e-1f));
  for (int i = 0; i < M; ++i) y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(4.999915e-1f));
  for (int i = 0; i < M; ++i) y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(9.999997e-1f));
  for (int i = 0; i < M; ++i) y[i] = _mm512_fmadd_ps(y[i], r[i], _mm512_set1_ps(1.0f));
  for (int i = 0; i < M; ++i) t[i] = _mm512_maskz_scalef_ps(keep[i], y[i], n[i]);
}

// stability_weights of 16 positions, the same formula: with t_k = exp(-|a_k|) (0 for a missing
// neighbour), n_k = 1 if a_k >= 0 else t_k (0 for a missing neighbour), d_k = 1 + t_k,
// e_k = n_k prod_{j != k} d_j, w_k = e_k / sum_j e_j (one reciprocal: a 14-bit estimate and a Newton
// step, within an ulp of the division at a fraction of its cost; sum_j e_j >= e_m >= e^-87 > 0).
// has_l / has_r: the lanes whose left / right neighbour exists; the others' logits never enter.
// Returns the lanes whose sum is below tiny_sum (for the softmax fallback). With KEEP also the
// sigmoids s_k = e_k / prod_j d_j.
//
// N independent groups of 16 positions at a time: a[n] = {left, mid, right logits}, w[n] and s[n]
// likewise, under[n] the fallback lanes of group n. Every step is issued for all N groups before the
// next, so the out-of-order core sees N chains (the results do not depend on N).
template <bool KEEP, int N>
GSPN_INLINE void stability_weights16(const __m512 (&a)[N][3], const __mmask16 (&has_l)[N],
                                     const __mmask16 (&has_r)[N], __m512 (&w)[N][3], __m512 (&s)[N][3],
                                     __mmask16 (&under)[N]) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  __mmask16 keep[3 * N];
  __m512 av[3 * N], t[3 * N];
  for (int n = 0; n < N; ++n) {
    keep[3 * n] = has_l[n];
    keep[3 * n + 1] = 0xFFFF;
    keep[3 * n + 2] = has_r[n];
    for (int k = 0; k < 3; ++k) av[3 * n + k] = a[n][k];
  }
  exp_neg_abs16<3 * N>(keep, av, t);
  for (int n = 0; n < N; ++n) {
    const __m512 tl = t[3 * n], tm = t[3 * n + 1], tr = t[3 * n + 2];
    const __m512 dl = _mm512_add_ps(one, tl), dm = _mm512_add_ps(one, tm), dr = _mm512_add_ps(one, tr);
    // e_k = n_k p_k with p_k = prod_{j != k} d_j: p_k where a_k >= 0, t_k p_k elsewhere (a_k < 0, NaN,
    // or a missing neighbour, whose t_k is 0) -- one masked multiply instead of a blend and a multiply.
    const __mmask16 ml = _mm512_kor(_mm512_cmp_ps_mask(a[n][0], zero, _CMP_NGE_UQ), _mm512_knot(has_l[n]));
    const __mmask16 mm = _mm512_cmp_ps_mask(a[n][1], zero, _CMP_NGE_UQ);
    const __mmask16 mr = _mm512_kor(_mm512_cmp_ps_mask(a[n][2], zero, _CMP_NGE_UQ), _mm512_knot(has_r[n]));
    const __m512 pl = _mm512_mul_ps(dm, dr), pm = _mm512_mul_ps(dl, dr), dlm = _mm512_mul_ps(dl, dm);
    const __m512 el = _mm512_mask_mul_ps(pl, ml, pl, tl), em = _mm512_mask_mul_ps(pm, mm, pm, tm);
    const __m512 er = _mm512_mask_mul_ps(dlm, mr, dlm, tr);
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(el, em), er);
    const __m512 r0 = _mm512_rcp14_ps(sum);
    const __m512 inv = _mm512_fmadd_ps(r0, _mm512_fnmadd_ps(sum, r0, one), r0);
    w[n][0] = _mm512_mul_ps(el, inv);
    w[n][1] = _mm512_mul_ps(em, inv);
    w[n][2] = _mm512_mul_ps(er, inv);
    // Lanes without neighbours (lines of one pixel): exactly 1, as in stability_weights.
    const __mmask16 alone = _mm512_knot(_mm512_kor(has_l[n], has_r[n]));
    if (alone)
      w[n][1] = _mm512_mask_mov_ps(w[n][1], _mm512_mask_cmp_ps_mask(alone, a[n][1], a[n][1], _CMP_ORD_Q), one);
    if (KEEP) {
      const __m512 prod = _mm512_mul_ps(dlm, dr);
      const __m512 q0 = _mm512_rcp14_ps(prod);
      const __m512 q = _mm512_fmadd_ps(q0, _mm512_fnmadd_ps(prod, q0, one), q0);
      s[n][0] = _mm512_mul_ps(el, q);
      s[n][1] = _mm512_mul_ps(em, q);
      s[n][2] = _mm512_mul_ps(er, q);
    }
    under[n] = _mm512_cmp_ps_mask(sum, _mm512_set1_ps(tiny_sum<float>()), _CMP_LT_OQ);
  }
}

// One group of 16 positions (N = 1 of the above).
template <bool KEEP>
GSPN_INLINE __mmask16 stability_weights16(__m512 al, __m512 am, __m512 ar, __mmask16 has_l, __mmask16 has_r,
                                          __m512& wl, __m512& wm, __m512& wr, __m512& sl, __m512& sm, __m512& sr) {
  const __m512 a[1][3] = {{al, am, ar}};
  const __mmask16 hl[1] = {has_l}, hr[1] = {has_r};
  __m512 w[1][3], s[1][3];
  __mmask16 under[1];
  stability_weights16<KEEP, 1>(a, hl, hr, w, s, under);
  wl = w[0][0];
  wm = w[0][1];
  wr = w[0][2];
  if (KEEP) {
    sl = s[0][0];
    sm = s[0][1];
    sr = s[0][2];
  }
  return under[0];
}

// In-register transpose of a 16 x 16 float tile: v[i][j] -> v[j][i].
inline void transpose16x16(__m512 (&v)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 e = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x88), f = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xdd);
    const __m512 g = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x88), h = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xdd);
    v[k] = _mm512_shuffle_f32x4(e, g, 0x88);
    v[8 + k] = _mm512_shuffle_f32x4(e, g, 0xdd);
    v[4 + k] = _mm512_shuffle_f32x4(f, h, 0x88);
    v[12 + k] = _mm512_shuffle_f32x4(f, h, 0xdd);
  }
}

// n <= 16 pixels (consecutive in each plane, from `src`) of 16 planes `plane_stride` apart, stored
// pixel-major: dst + q * dst_stride holds the 16 channels of pixel q.
GSPN_INLINE void stage_pixels16(const float* src, int64_t plane_stride, int64_t n, float* dst, int64_t dst_stride) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  __m512 v[16];
  for (int64_t j = 0; j < 16; ++j) v[j] = _mm512_maskz_loadu_ps(mask, src + j * plane_stride);
  transpose16x16(v);
  for (int64_t q = 0; q < n; ++q) _mm512_storeu_ps(dst + q * dst_stride, v[q]);
}

// Lanes j of a 16-block whose first element sits at position pos0 of lines of length P that are at
// position 0 (first) and P - 1 (last).
GSPN_INLINE void edge_masks16(int64_t pos0, int64_t P, uint32_t& first, uint32_t& last) {
  first = last = 0;
  for (int64_t j = pos0 == 0 ? 0 : P - pos0; j < 16; j += P) first |= 1u << j;
  for (int64_t j = P - 1 - pos0; j < 16; j += P) last |= 1u << j;
}
#endif

// All valid sigmoids below ~1e-30: sigmoid(a) == exp(a) to working precision, so the weights are
// the softmax of the valid logits (the direct formula would divide underflowed numbers).
template <typename T>
inline void softmax_weights(T al, T am, T ar, bool has_l, bool has_r, T& wl, T& wm, T& wr) {
  T m = am;
  if (has_l) m = std::max(m, al);
  if (has_r) m = std::max(m, ar);
  const T el = has_l ? std::exp(al - m) : T(0), em = std::exp(am - m), er = has_r ? std::exp(ar - m) : T(0);
  const T inv = T(1) / (el + em + er);
  wl = el * inv;
  wm = em * inv;
  wr = er * inv;
}

// Lines are processed in blocks of NORM_BLOCK positions through fixed-size local arrays: a loop of
// runtime length P is vectorised only for long lines (GCC runs short ones, e.g. the 4-16 pixel lines
// of deep stages and DiT grids, through its scalar epilogue), a fixed-length one always is.
constexpr int64_t NORM_BLOCK = 16;

template <typename T>
inline void load_block(const T* __restrict__ src, int64_t n, T (&dst)[NORM_BLOCK]) {
  if (n == NORM_BLOCK) {
#pragma omp simd
    for (int64_t j = 0; j < NORM_BLOCK; ++j) dst[j] = src[j];
  } else {
    for (int64_t j = 0; j < NORM_BLOCK; ++j) dst[j] = j < n ? src[j] : T(0);
  }
}

template <typename T>
inline void store_block(const T (&src)[NORM_BLOCK], int64_t n, T* __restrict__ dst) {
  if (n == NORM_BLOCK) {
#pragma omp simd
    for (int64_t j = 0; j < NORM_BLOCK; ++j) dst[j] = src[j];
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
  }
}

// Positions in their line of the NORM_BLOCK elements from `first` (whose position is pos0), for
// lines of length P stored one after another; returns the position of the next block's first element.
inline int64_t block_positions(int64_t pos0, int64_t P, int64_t (&pos)[NORM_BLOCK]) {
  int64_t q = pos0;
  for (int64_t j = 0; j < NORM_BLOCK; ++j) {
    pos[j] = q;
    q = q + 1 == P ? 0 : q + 1;
  }
  return q;
}

// Weights (and with KEEP sigmoids) of n <= NORM_BLOCK consecutive elements of one line, the first at
// position p0 of a line of P; FULL: n == NORM_BLOCK, read and written in place.
template <typename T, bool KEEP, bool FULL>
GSPN_INLINE int normalize_run(int64_t n, int64_t p0, int64_t P, const T* __restrict__ al, const T* __restrict__ am,
                              const T* __restrict__ ar, T* __restrict__ wl, T* __restrict__ wm, T* __restrict__ wr,
                              T* __restrict__ sl, T* __restrict__ sm, T* __restrict__ sr) {
  int underflow = 0;
  if (FULL) {
#pragma omp simd reduction(| : underflow)
    for (int64_t j = 0; j < NORM_BLOCK; ++j) {
      T s0, s1, s2;
      const T sum = stability_weights<T, KEEP>(al[j], am[j], ar[j], p0 + j > 0, p0 + j < P - 1, wl[j], wm[j], wr[j],
                                               s0, s1, s2);
      if (KEEP) {
        sl[j] = s0;
        sm[j] = s1;
        sr[j] = s2;
      }
      underflow |= sum < tiny_sum<T>();
    }
    return underflow;
  }
  T a[3][NORM_BLOCK], w[3][NORM_BLOCK], s[3][NORM_BLOCK];
  load_block(al, n, a[0]);
  load_block(am, n, a[1]);
  load_block(ar, n, a[2]);
#pragma omp simd reduction(| : underflow)
  for (int64_t j = 0; j < NORM_BLOCK; ++j) {
    const T sum = stability_weights<T, KEEP>(a[0][j], a[1][j], a[2][j], p0 + j > 0, p0 + j < P - 1, w[0][j], w[1][j],
                                             w[2][j], s[0][j], s[1][j], s[2][j]);
    underflow |= sum < tiny_sum<T>();  // elements past the end have logits 0: never
  }
  if (KEEP) {
    store_block(s[0], n, sl);
    store_block(s[1], n, sm);
    store_block(s[2], n, sr);
  }
  store_block(w[0], n, wl);
  store_block(w[1], n, wm);
  store_block(w[2], n, wr);
  return underflow;
}

#if defined(__AVX512F__)
// normalize_lines for float32 with AVX-512: the L * P values as one flat array in 16-blocks (the
// last one masked), each lane's edges from its position in its line.
template <bool KEEP>
void normalize_lines16(int64_t L, int64_t P, const float* __restrict__ al, const float* __restrict__ am,
                       const float* __restrict__ ar, float* __restrict__ wl, float* __restrict__ wm,
                       float* __restrict__ wr, float* __restrict__ sl, float* __restrict__ sm, float* __restrict__ sr) {
  const int64_t N = L * P;
  int64_t pos0 = 0;  // position in its line of element i
  for (int64_t i = 0; i < N; i += 16) {
    const __mmask16 act = N - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - i)) - 1u);
    uint32_t first, last;
    edge_masks16(pos0, P, first, last);
    const __m512 a0 = _mm512_maskz_loadu_ps(act, al + i), a1 = _mm512_maskz_loadu_ps(act, am + i);
    const __m512 a2 = _mm512_maskz_loadu_ps(act, ar + i);
    __m512 w0, w1, w2, s0, s1, s2;
    const __mmask16 under =
        stability_weights16<KEEP>(a0, a1, a2, __mmask16(~first), __mmask16(~last), w0, w1, w2, s0, s1, s2) & act;
    _mm512_mask_storeu_ps(wl + i, act, w0);
    _mm512_mask_storeu_ps(wm + i, act, w1);
    _mm512_mask_storeu_ps(wr + i, act, w2);
    if (KEEP) {
      _mm512_mask_storeu_ps(sl + i, act, s0);
      _mm512_mask_storeu_ps(sm + i, act, s1);
      _mm512_mask_storeu_ps(sr + i, act, s2);
    }
    if (under) {  // rare: all valid sigmoids underflowed
      for (int64_t j = 0; j < 16; ++j) {
        if (!((under >> j) & 1)) continue;
        const int64_t p = (pos0 + j) % P;
        softmax_weights(al[i + j], am[i + j], ar[i + j], p > 0, p < P - 1, wl[i + j], wm[i + j], wr[i + j]);
      }
    }
    pos0 += 16;
    if (pos0 >= P) pos0 = P > 16 ? pos0 - P : pos0 % P;
  }
}
#endif

// Normalise L lines of P logits stored one after another (line i at offset i * P) into weights
// (wl, wm, wr), and with KEEP the sigmoids (sl, sm, sr; untouched otherwise). Long lines go block
// by block; short lines (P < 2 * NORM_BLOCK) are batched several to a vector block.
template <typename T, bool KEEP = true>
void normalize_lines(int64_t L, int64_t P, const T* __restrict__ al, const T* __restrict__ am,
                     const T* __restrict__ ar, T* __restrict__ wl, T* __restrict__ wm, T* __restrict__ wr,
                     T* __restrict__ sl, T* __restrict__ sm, T* __restrict__ sr) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    normalize_lines16<KEEP>(L, P, al, am, ar, wl, wm, wr, sl, sm, sr);
    return;
  }
#endif
  const int64_t N = L * P;
  int underflow = 0;
  if (L == 1 || P >= 2 * NORM_BLOCK) {
    for (int64_t i = 0; i < N; i += P) {
      int64_t p0 = 0;
      for (; p0 + NORM_BLOCK <= P; p0 += NORM_BLOCK) {
        const int64_t o = i + p0;
        underflow |= normalize_run<T, KEEP, true>(NORM_BLOCK, p0, P, al + o, am + o, ar + o, wl + o, wm + o, wr + o,
                                                  sl + (KEEP ? o : 0), sm + (KEEP ? o : 0), sr + (KEEP ? o : 0));
      }
      if (p0 < P) {
        const int64_t o = i + p0;
        underflow |= normalize_run<T, KEEP, false>(P - p0, p0, P, al + o, am + o, ar + o, wl + o, wm + o, wr + o,
                                                   sl + (KEEP ? o : 0), sm + (KEEP ? o : 0), sr + (KEEP ? o : 0));
      }
    }
  } else {
    int64_t pos0 = 0;
    for (int64_t p0 = 0; p0 < N; p0 += NORM_BLOCK) {
      const int64_t n = std::min(NORM_BLOCK, N - p0);
      int64_t pos[NORM_BLOCK];
      pos0 = block_positions(pos0, P, pos);
      T a[3][NORM_BLOCK], w[3][NORM_BLOCK], s[3][NORM_BLOCK];
      load_block(al + p0, n, a[0]);
      load_block(am + p0, n, a[1]);
      load_block(ar + p0, n, a[2]);
#pragma omp simd reduction(| : underflow)
      for (int64_t j = 0; j < NORM_BLOCK; ++j) {
        const T sum = stability_weights<T, KEEP>(a[0][j], a[1][j], a[2][j], pos[j] > 0, pos[j] < P - 1, w[0][j],
                                                 w[1][j], w[2][j], s[0][j], s[1][j], s[2][j]);
        underflow |= sum < tiny_sum<T>();  // elements past the end have logits 0: never
      }
      if (KEEP) {
        store_block(s[0], n, sl + p0);
        store_block(s[1], n, sm + p0);
        store_block(s[2], n, sr + p0);
      }
      store_block(w[0], n, wl + p0);
      store_block(w[1], n, wm + p0);
      store_block(w[2], n, wr + p0);
    }
  }
  if (!underflow) return;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t p = i % P;
    T w0, w1, w2, s0, s1, s2;
    if (stability_weights<T, false>(al[i], am[i], ar[i], p > 0, p < P - 1, w0, w1, w2, s0, s1, s2) < tiny_sum<T>())
      softmax_weights(al[i], am[i], ar[i], p > 0, p < P - 1, wl[i], wm[i], wr[i]);
  }
}

template <typename T, bool KEEP = true>
void normalize_line(int64_t P, const T* __restrict__ al, const T* __restrict__ am, const T* __restrict__ ar,
                    T* __restrict__ wl, T* __restrict__ wm, T* __restrict__ wr, T* __restrict__ sl,
                    T* __restrict__ sm, T* __restrict__ sr) {
  normalize_lines<T, KEEP>(1, P, al, am, ar, wl, wm, wr, sl, sm, sr);
}

// Turn gradients w.r.t. the normalised weights (in gl, gm, gr) of L lines of P positions into
// gradients w.r.t. the logits:
//   d a_k = w_k (1 - s_k) (g_k - sum_j g_j w_j),   exactly 0 for a missing neighbour.
template <typename T>
void normalize_lines_vjp(int64_t L, int64_t P, const T* __restrict__ wl, const T* __restrict__ wm,
                         const T* __restrict__ wr, const T* __restrict__ sl, const T* __restrict__ sm,
                         const T* __restrict__ sr, T* __restrict__ gl, T* __restrict__ gm, T* __restrict__ gr) {
  const int64_t N = L * P;
  int64_t pos0 = 0;
  for (int64_t p0 = 0; p0 < N; p0 += NORM_BLOCK) {
    const int64_t n = std::min(NORM_BLOCK, N - p0);
    int64_t pos[NORM_BLOCK];
    pos0 = block_positions(pos0, P, pos);
    T w[3][NORM_BLOCK], s[3][NORM_BLOCK], g[3][NORM_BLOCK];
    load_block(wl + p0, n, w[0]);
    load_block(wm + p0, n, w[1]);
    load_block(wr + p0, n, w[2]);
    load_block(sl + p0, n, s[0]);
    load_block(sm + p0, n, s[1]);
    load_block(sr + p0, n, s[2]);
    load_block(gl + p0, n, g[0]);
    load_block(gm + p0, n, g[1]);
    load_block(gr + p0, n, g[2]);
#pragma omp simd
    for (int64_t j = 0; j < NORM_BLOCK; ++j) {
      const T dot = g[0][j] * w[0][j] + g[1][j] * w[1][j] + g[2][j] * w[2][j];
      const T dl = w[0][j] * (T(1) - s[0][j]) * (g[0][j] - dot);
      const T dr = w[2][j] * (T(1) - s[2][j]) * (g[2][j] - dot);
      g[1][j] = w[1][j] * (T(1) - s[1][j]) * (g[1][j] - dot);
      g[0][j] = pos[j] > 0 ? dl : T(0);
      g[2][j] = pos[j] < P - 1 ? dr : T(0);
    }
    store_block(g[0], n, gl + p0);
    store_block(g[1], n, gm + p0);
    store_block(g[2], n, gr + p0);
  }
}

template <typename T>
void normalize_line_vjp(int64_t P, const T* __restrict__ wl, const T* __restrict__ wm, const T* __restrict__ wr,
                        const T* __restrict__ sl, const T* __restrict__ sm, const T* __restrict__ sr,
                        T* __restrict__ gl, T* __restrict__ gm, T* __restrict__ gr) {
  normalize_lines_vjp(1, P, wl, wm, wr, sl, sm, sr, gl, gm, gr);
}

}  // namespace
