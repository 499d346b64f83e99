// Decode attention straight from the paged KV cache (float32, CPU).
//
// One query token per sequence. For each (sequence, KV head) the kernel walks the sequence's block
// table, so K/V are read once in place instead of being gathered into a padded copy first; the
// query heads that share the KV head (GQA) are served by the same pass.
//   q:       [B, H, D]                  k_cache, v_cache: [num_blocks, block_size, Hkv, D]
//   table:   [B, W] int64 block ids     context_lens: [B] int64 (tokens to attend, <= W * block_size)
//   out:     [B, H, D] = softmax(scale * q . K) . V

#include "kernels.h"
#include "simd_math.h"

#include <ATen/Parallel.h>


#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ferry {
namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // floats a vector; the vector path needs head_dim % kLanes == 0

inline float dot(const float* a, const float* b, int64_t d) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < d; i += 16) {
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// p[0:n] = exp(p - max); returns the sum
inline float exp_shift_sum(float* p, int64_t n, float max) {
  const __m512 m = _mm512_set1_ps(max);
  __m512 sum = _mm512_setzero_ps();
  int64_t t = 0;
  for (; t + 16 <= n; t += 16) {
    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(p + t), m));
    _mm512_storeu_ps(p + t, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (t < n) {
    const __mmask16 mask = static_cast<__mmask16>((1u << (n - t)) - 1);
    const __m512 e =
        exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, p + t), m));
    _mm512_mask_storeu_ps(p + t, mask, e);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
  }
  return _mm512_reduce_add_ps(sum);
}

// out[0:d] += w * v[0:d]
inline void axpy(float* out, float w, const float* v, int64_t d) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t i = 0; i < d; i += 16) {
    _mm512_storeu_ps(out + i, _mm512_fmadd_ps(wv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(out + i)));
  }
}

constexpr bool kVector = true;
#elif defined(__AVX2__) && defined(__FMA__)
constexpr int64_t kLanes = 8;

inline float dot(const float* a, const float* b, int64_t d) {
  // NOTE: two accumulators: head_dim 64 is eight FMAs, one dependency chain would wait on each
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  if (i < d) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  return reduce_add_ps(_mm256_add_ps(acc0, acc1));
}

inline float exp_shift_sum(float* p, int64_t n, float max) {
  const __m256 m = _mm256_set1_ps(max);
  __m256 sum = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(p + t), m));
    _mm256_storeu_ps(p + t, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (t < n) {  // lanes below n - t: all ones
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n - t)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_maskload_ps(p + t, mask), m));
    _mm256_maskstore_ps(p + t, mask, e);
    sum = _mm256_add_ps(sum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
  }
  return reduce_add_ps(sum);
}

inline void axpy(float* out, float w, const float* v, int64_t d) {
  const __m256 wv = _mm256_set1_ps(w);
  for (int64_t i = 0; i < d; i += 8) {
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
  }
}

constexpr bool kVector = true;
#else
constexpr int64_t kLanes = 1;
constexpr bool kVector = false;
#endif

inline float dot_scalar(const float* a, const float* b, int64_t d) {
  float acc = 0.0f;
  for (int64_t i = 0; i < d; ++i) acc += a[i] * b[i];
  return acc;
}

inline float exp_shift_sum_scalar(float* p, int64_t n, float max) {
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    p[t] = std::exp(p[t] - max);
    sum += p[t];
  }
  return sum;
}

inline void axpy_scalar(float* out, float w, const float* v, int64_t d) {
  for (int64_t i = 0; i < d; ++i) out[i] += w * v[i];
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.dim() == 3,
              "q must be a float32 CPU [B, H, D] tensor");
  TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 &&
                  k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.scalar_type() == at::kFloat && v_cache.is_contiguous(),
              "k_cache and v_cache must be contiguous float32 [blocks, block_size, Hkv, D]");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && block_table.dim() == 2 &&
                  context_lens.scalar_type() == at::kLong && context_lens.dim() == 1,
              "block_table must be int64 [B, W] and context_lens int64 [B]");
  const int64_t b = q.size(0), h = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "head_dim of q and the cache differ");
  TORCH_CHECK(hkv > 0 && h % hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_table.size(0) == b && context_lens.size(0) == b, "batch sizes differ");
  const at::Tensor qc = q.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens = context_lens.contiguous();
  const int64_t width = table.size(1);
  const int64_t* table_ptr = table.data_ptr<int64_t>();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(len_ptr[i] > 0 && len_ptr[i] <= width * block_size, "context length ",
                len_ptr[i], " does not fit a block table of width ", width);
    for (int64_t j = 0; j < (len_ptr[i] + block_size - 1) / block_size; ++j) {
      const int64_t blk = table_ptr[i * width + j];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "block id ", blk, " out of range");
    }
  }
  at::Tensor out = at::zeros_like(qc);
  const float* q_ptr = qc.data_ptr<float>();
  const float* k_ptr = k_cache.data_ptr<float>();
  const float* v_ptr = v_cache.data_ptr<float>();
  float* o_ptr = out.data_ptr<float>();
  const int64_t group = h / hkv;
  const bool vector = kVector && d % kLanes == 0;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t seq = item / hkv, g = item % hkv;
      const int64_t ctx = len_ptr[seq];
      const int64_t* blocks = table_ptr + seq * width;
      scores.resize(static_cast<size_t>(group * ctx));
      auto slot = [&](int64_t t) {  // offset of token t's K/V for head g
        return ((blocks[t / block_size] * block_size + t % block_size) * hkv + g) * d;
      };
      for (int64_t t = 0; t < ctx; ++t) {
        const float* kt = k_ptr + slot(t);
        for (int64_t j = 0; j < group; ++j) {
          const float* qh = q_ptr + (seq * h + g * group + j) * d;
#if defined(FERRY_VECTOR)
          const float s = vector ? dot(qh, kt, d) : dot_scalar(qh, kt, d);
#else
          const float s = dot_scalar(qh, kt, d);
#endif
          scores[j * ctx + t] = s * fscale;
        }
      }
      for (int64_t j = 0; j < group; ++j) {
        float* p = scores.data() + j * ctx;
        const float max = *std::max_element(p, p + ctx);
#if defined(FERRY_VECTOR)
        const float sum = vector ? exp_shift_sum(p, ctx, max) : exp_shift_sum_scalar(p, ctx, max);
#else
        const float sum = exp_shift_sum_scalar(p, ctx, max);
#endif
        const float inv = 1.0f / sum;
        float* o = o_ptr + (seq * h + g * group + j) * d;
        for (int64_t t = 0; t < ctx; ++t) {
#if defined(FERRY_VECTOR)
          if (vector) {
            axpy(o, p[t] * inv, v_ptr + slot(t), d);
            continue;
          }
#endif
          axpy_scalar(o, p[t] * inv, v_ptr + slot(t), d);
        }
      }
    }
  });
  return out;
}

}  // namespace ferry
