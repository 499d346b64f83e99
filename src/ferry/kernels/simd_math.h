// Vector exp shared by the kernels (AVX-512 only; callers keep a scalar std::exp path).
#pragma once

#if defined(__AVX512F__)
#include <immintrin.h>

namespace ferry {

// exp(x), Cephes' expf: relative error ~2e-7; saturates to 0 below -87.3 and to inf above 88.7.
inline __m512 exp_ps(__m512 x) {
  const __m512 too_big = _mm512_set1_ps(88.72283935546875f);
  const __mmask16 overflow = _mm512_cmp_ps_mask(x, too_big, _CMP_GT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.33654f)), too_big);
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(-2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  const __m512 result = _mm512_scalef_ps(y, fx);  // y * 2^fx
  return _mm512_mask_mov_ps(result, overflow, _mm512_set1_ps(__builtin_inff()));
}

}  // namespace ferry
#endif
