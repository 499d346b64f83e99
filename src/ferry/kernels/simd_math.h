// Vector exp and horizontal sums shared by the kernels (AVX-512, or AVX2 + FMA; callers keep a
// scalar std::exp path).
#pragma once

// FERRY_VECTOR: this build has the vector kernels (AVX-512, or AVX2 + FMA); without it each
// kernel runs its portable scalar loops.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define FERRY_VECTOR 1
#include <immintrin.h>

namespace ferry {

// Cephes' expf: exp(x) = 2^n * exp(r), n = round(x / ln 2), r = x - n ln 2 (in two parts).
constexpr float kExpHi = 88.72283935546875f;  // above: inf
constexpr float kExpLo = -87.33654f;          // below: clamped (about 1.2e-38)
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                               4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

#if defined(__AVX512F__)

// exp(x): relative error ~2e-7; saturates to 0 below -87.3 and to inf above 88.7.
inline __m512 exp_ps(__m512 x) {
  const __m512 too_big = _mm512_set1_ps(kExpHi);
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, too_big, _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(kExpLo)), too_big);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kLn2Lo), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly[i]));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  const __m512 result = _mm512_scalef_ps(y, fx);  // y * 2^fx
  return _mm512_mask_mov_ps(result, overflow, _mm512_set1_ps(__builtin_inff()));
}

#endif

// 2^n for integer n in [-126, 127], built in the exponent bits
inline __m256 pow2_ps(__m256i n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

// exp(x), the same polynomial as the AVX-512 exp_ps, eight lanes.
inline __m256 exp_ps(__m256 x) {
  const __m256 too_big = _mm256_set1_ps(kExpHi);
  const __m256 overflow = _mm256_cmp_ps(x, too_big, _CMP_GT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(kExpLo)), too_big);
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kLn2Lo), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly[i]));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  // NOTE: n = fx lies in [-126, 128] after the clamp, and 2^128 has no float32 exponent; two
  // factors 2^(n/2) and 2^(n - n/2), each a normal float, scale exactly as scalef does (the one
  // rounding, into the subnormals near the lower clamp, happens in the last product).
  const __m256i n = _mm256_cvtps_epi32(fx);
  const __m256i half = _mm256_srai_epi32(n, 1);
  const __m256 result = _mm256_mul_ps(_mm256_mul_ps(y, pow2_ps(half)),
                                      pow2_ps(_mm256_sub_epi32(n, half)));
  return _mm256_blendv_ps(result, _mm256_set1_ps(__builtin_inff()), overflow);
}

// the sum of v's eight lanes
inline float reduce_add_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace ferry
#endif
