// The vector layer of the native CPU kernels (sf_cpu.h includes it): a GCC vector type sized to
// the widest registers the build targets (AVX-512: 16 floats, AVX/AVX2: 8, otherwise 4), loads,
// stores, reductions and a vector exp.  One source for every instruction set: the compiler picks
// the instructions (FMA where present, since -ffp-contract=fast).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#define SF_CPU_X86 1
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define SF_CPU_VEC_BYTES 64
#elif defined(__AVX__)
#define SF_CPU_VEC_BYTES 32
#else
#define SF_CPU_VEC_BYTES 16
#endif

// Accumulator registers the product's register blocking may use (AVX-512 has 32 vector
// registers, AVX2 and SSE 16; a few stay free for operands).
#if defined(__AVX512F__)
#define SF_CPU_ACC_REGS 24
#else
#define SF_CPU_ACC_REGS 12
#endif

// Hidden, as the rest of sf_cpu.h: each kernel library keeps its own copy (see sf_cpu.h).
#pragma GCC visibility push(hidden)
namespace sf::cpu {

// ------------------------------------------------------------------ vectors --
template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(SF_CPU_VEC_BYTES)));
  typedef float unaligned __attribute__((vector_size(SF_CPU_VEC_BYTES), aligned(4)));
  typedef int32_t mask __attribute__((vector_size(SF_CPU_VEC_BYTES)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(SF_CPU_VEC_BYTES)));
  typedef double unaligned __attribute__((vector_size(SF_CPU_VEC_BYTES), aligned(8)));
  typedef int64_t mask __attribute__((vector_size(SF_CPU_VEC_BYTES)));
};

template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = SF_CPU_VEC_BYTES / sizeof(T);

template <typename T>
inline Vec<T> vload(const T* p) {
  return *reinterpret_cast<const typename VecOf<T>::unaligned*>(p);
}
template <typename T>
inline void vstore(T* p, Vec<T> v) {
  *reinterpret_cast<typename VecOf<T>::unaligned*>(p) = v;
}
template <typename T>
inline Vec<T> vsplat(T x) {
  return x - Vec<T>{};  // x - 0 == x for every x (0 + x is not, for -0): folds to a broadcast
}
template <typename T>
inline Vec<T> vmax(Vec<T> a, Vec<T> b) {
  return a > b ? a : b;
}
// The lanes combined by op, halving (log2(kLanes) shuffles and ops; a fixed order).
template <typename T, int S = kLanes<T> / 2, typename Op, size_t... I>
inline T hreduce(Vec<T> v, Op op, std::index_sequence<I...> lanes = {}) {
  if constexpr (sizeof...(I) == 0) {
    return hreduce<T, S>(v, op, std::make_index_sequence<kLanes<T>>{});
  } else {
    v = op(v, __builtin_shufflevector(v, v, int((I + S) % kLanes<T>)...));
    if constexpr (S > 1) return hreduce<T, S / 2>(v, op, lanes);
    else return v[0];
  }
}

// Sum of the lanes.
template <typename T>
inline T hsum(Vec<T> v) {
  return hreduce<T>(v, [](Vec<T> a, Vec<T> b) { return a + b; });
}

// Largest lane.
template <typename T>
inline T hmax(Vec<T> v) {
  return hreduce<T>(v, [](Vec<T> a, Vec<T> b) { return vmax<T>(a, b); });
}

// Lane o of fold_pair<G>(u, v): the sum of the two halves of a group of 2G lanes, groups of u
// first.  With u and v made of groups of 2G lanes, the result is made of groups of G lanes.
constexpr int fold_lane(int lanes, int g_size, int o, int half) {
  const int groups = lanes / (2 * g_size), g = o / g_size, w = o % g_size;
  return (g < groups ? g * 2 * g_size : lanes + (g - groups) * 2 * g_size) + w + half;
}
template <typename T, int G, size_t... I>
inline Vec<T> fold_pair(Vec<T> u, Vec<T> v, std::index_sequence<I...>) {
  return __builtin_shufflevector(u, v, fold_lane(kLanes<T>, G, int(I), 0)...) +
         __builtin_shufflevector(u, v, fold_lane(kLanes<T>, G, int(I), G)...);
}
// Lane t of the result = sum of the lanes of x[t], for kLanes<T> vectors x (overwritten): a
// transpose-and-add tree of kLanes - 1 shuffle pairs, instead of a horizontal sum per vector.
template <typename T, int G = kLanes<T> / 2>
inline Vec<T> hsum_lanes(Vec<T>* x) {
  constexpr int L = kLanes<T>;
  // 2G vectors in (each holds L / 2G of the sums, in groups of 2G lanes), G out.
#pragma GCC unroll 16
  for (int p = 0; p < G; ++p) x[p] = fold_pair<T, G>(x[2 * p], x[2 * p + 1], std::make_index_sequence<L>{});
  if constexpr (G > 1) return hsum_lanes<T, G / 2>(x);
  else return x[0];
}

// c0 r^n + c1 r^(n-1) + ... + cn lane by lane (Horner: one FMA per coefficient).
template <typename... C>
inline Vec<float> horner(Vec<float> r, float c0, C... cs) {
  Vec<float> p = vsplat(c0);
  ((p = p * r + cs), ...);
  return p;
}

// exp(x) lane by lane.  fp32: Cody-Waite reduction x = n ln2 + r and a degree-6 polynomial for
// e^r (Cephes' expf, relative error ~2 ulp on [-87.3, 88.3]), 2^n built in the exponent bits;
// -inf and x < -87.3 give 0 (flushed, as FTZ would), NaN stays NaN, x > 88.72 gives inf.  The
// kernels call it on x - rowmax <= 0.  fp64 calls std::exp per lane (fp64 serves gradcheck).
// e^r for the reduced argument |r| <= ln(2)/2: Cephes' expf polynomial (relative error ~1 ulp).
inline Vec<float> exp_reduced(Vec<float> r) {
  const Vec<float> p = horner(r, 1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                              1.6666665459e-1f, 5.0000001201e-1f);
  return p * r * r + r + 1.0f;
}

#if defined(__AVX512F__)
// AVX-512: n = round(x log2 e) by vrndscaleps and p 2^n by vscalefps, which also gives inf past the
// top of the range and 0 (denormals flushed) at the bottom.  The clamps keep -inf and inf out of
// the reduction (inf - inf); vmaxps / vminps return their second operand for a NaN, so NaN stays NaN.
template <bool kUpperClamp>
inline Vec<float> vexp_avx512(Vec<float> x) {
  __m512 xc = _mm512_max_ps(_mm512_set1_ps(-88.0f), x);
  if constexpr (kUpperClamp) xc = _mm512_min_ps(_mm512_set1_ps(88.8f), xc);
  const Vec<float> n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  Vec<float> r = Vec<float>(xc) - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const Vec<float> p = exp_reduced(r);
  return _mm512_scalef_ps(p, n);
}

inline Vec<float> vexp(Vec<float> x) { return vexp_avx512<true>(x); }
#else
inline Vec<float> vexp(Vec<float> x) {
  using V = Vec<float>;
  using I = VecOf<float>::mask;
  const V magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V xc = vmax<float>(vsplat(-87.5f), x < 88.3f ? x : vsplat(88.3f));  // 2^n stays normal
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V p = exp_reduced(r);
  const I bits = (reinterpret_cast<const I&>(t) - reinterpret_cast<const I&>(magic) + 127) << 23;
  V y = p * reinterpret_cast<const V&>(bits);
  y = x < -87.3f ? vsplat(0.0f) : y;
  y = x > 88.72f ? vsplat(std::numeric_limits<float>::infinity()) : y;
  return x != x ? x : y;  // NaN in, NaN out
}
#endif

inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp(x[i]);
  return x;
}

// exp(x) for x <= 0, the argument of a softmax once the row max (or the logsumexp) is subtracted:
// vexp without the overflow handling (a third fewer instructions).  -inf and x < -87.3 give 0,
// NaN stays NaN; x > 88.3 is outside its domain.
#if defined(__AVX512F__)
inline Vec<float> vexp_nonpositive(Vec<float> x) { return vexp_avx512<false>(x); }
#else
inline Vec<float> vexp_nonpositive(Vec<float> x) {
  using V = Vec<float>;
  using I = VecOf<float>::mask;
  const V magic = vsplat(12582912.0f);
  const V xc = x < -87.3f ? vsplat(-87.3f) : x;  // NaN passes through
  const V t = xc * 1.44269504088896341f + magic;
  const V n = t - magic;
  V r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const V p = exp_reduced(r);
  const I bits = (reinterpret_cast<const I&>(t) - (reinterpret_cast<const I&>(magic) - 127)) << 23;
  const V y = p * reinterpret_cast<const V&>(bits);
  return x < -87.3f ? vsplat(0.0f) : y;
}
#endif

inline Vec<double> vexp_nonpositive(Vec<double> x) { return vexp(x); }

// 2^x lane by lane for x <= 0: the softmax's exp with log2(e) folded into the logits (one
// multiply and the Cody-Waite reduction fewer than vexp_nonpositive).  x = n + r, |r| <= 1/2, 2^r by
// a degree-6 polynomial fitted for relative error (< 1e-7 in fp32), 2^n in the exponent bits.
// -inf and x < -126 give 0, NaN stays NaN; x > 0 is outside its domain.  fp64: std::exp2.
inline Vec<float> exp2_reduced(Vec<float> r) {
  return horner(r, 1.5345811e-4f, 1.3399931e-3f, 9.6184891e-3f, 5.5503286e-2f, 2.4022646e-1f, 6.9314718e-1f,
                1.0f);
}
#if defined(__AVX512F__)
inline Vec<float> vexp2_nonpositive(Vec<float> x) {
  // vmaxps returns its second operand for a NaN; vscalefps flushes 2^-127 to 0 (the kernels run
  // with flush-to-zero, FlushDenormals).
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-127.0f), x);
  const Vec<float> n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp2_reduced(Vec<float>(xc) - n), n);
}
#else
inline Vec<float> vexp2_nonpositive(Vec<float> x) {
  using V = Vec<float>;
  using I = VecOf<float>::mask;
  const V magic = vsplat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const V xc = x < -126.0f ? vsplat(-126.0f) : x;  // NaN passes through
  const V t = xc + magic;
  const V n = t - magic;
  const I bits = (reinterpret_cast<const I&>(t) - (reinterpret_cast<const I&>(magic) - 127)) << 23;
  const V y = exp2_reduced(xc - n) * reinterpret_cast<const V&>(bits);
  return x < -126.0f ? vsplat(0.0f) : y;
}
#endif

inline Vec<double> vexp2_nonpositive(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::exp2(x[i]);
  return x;
}

template <typename T>
constexpr T kLog2e = T(1.442695040888963407359924681001892137);
template <typename T>
constexpr T kLn2 = T(0.693147180559945309417232121458176568);

// log(x) lane by lane for x > 0 (Cephes' logf: mantissa in [sqrt(1/2), sqrt(2)), degree-8
// polynomial, ~1 ulp); x = 0 gives -inf, x = inf gives inf, NaN and x < 0 give NaN.  fp64: std::log.
inline Vec<float> vlog(Vec<float> x) {
  using V = Vec<float>;
  using I = VecOf<float>::mask;
  const I bits = reinterpret_cast<const I&>(x);
  I e = ((bits >> 23) & 0xff) - 126;
  const I mbits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  V m = reinterpret_cast<const V&>(mbits);
  const I small = m < 0.707106781186547524f;  // -1 where m < sqrt(1/2): use 2m, e - 1
  e += small;
  m = m + (small ? m : vsplat(0.0f)) - 1.0f;
  const V z = m * m;
  V y = horner(m, 7.0376836292e-2f, -1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f,
               -1.6668057665e-1f, 2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f);
  y = y * m * z;
  const V ef = __builtin_convertvector(e, V);
  y += ef * -2.12194440e-4f;
  y -= 0.5f * z;
  V r = m + y + ef * 0.693359375f;
  r = x == 0.0f ? vsplat(-std::numeric_limits<float>::infinity()) : r;
  r = x == std::numeric_limits<float>::infinity() ? x : r;
  return (x < 0.0f) | (x != x) ? vsplat(std::numeric_limits<float>::quiet_NaN()) : r;
}

inline Vec<double> vlog(Vec<double> x) {
  for (int i = 0; i < kLanes<double>; ++i) x[i] = std::log(x[i]);
  return x;
}

template <typename T>
inline T sexp(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return vexp(vsplat(x))[0];
  } else {
    return std::exp(x);
  }
}

}  // namespace sf::cpu
#pragma GCC visibility pop
