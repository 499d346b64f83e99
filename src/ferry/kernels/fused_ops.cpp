// Fused float32 elementwise ops of a llama layer: RMSNorm (with the residual add), rotary
// embedding in place on the fused q/k/v output, and SiLU(gate) * up. Each replaces several small
// PyTorch ops whose dispatch cost dominates at decode batch sizes.
//
// They compute what the Hugging Face reference computes, in the same float32 operations where the
// order is fixed (rotary: q * cos + rotate_half(q) * sin; RMSNorm: weight * (x * rsqrt(mean(x^2) +
// eps))); the sum of squares and exp may differ from PyTorch's in the last bit.

#include "kernels.h"
#include "simd_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace ferry {
namespace {

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 &&
                  x.stride(1) == 1,
              name, " must be a float32 CPU [T, N] tensor with contiguous rows");
}

float sum_of_squares(const float* x, int64_t n) {
  int64_t i = 0;
  float total = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  total = _mm512_reduce_add_ps(acc);
#elif defined(FERRY_VECTOR)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    acc0 = _mm256_fmadd_ps(v0, v0, acc0);
    acc1 = _mm256_fmadd_ps(v1, v1, acc1);
  }
  total = reduce_add_ps(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

void rms_norm_row(const float* x, const float* w, int64_t n, float eps, float* out) {
  const float inv = 1.0f / std::sqrt(sum_of_squares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "weight must be a contiguous float32 [N] tensor");
  const int64_t t = x.size(0), n = x.size(1);
  at::Tensor out = at::empty({t, n}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      rms_norm_row(xp + r * ldx, w, n, static_cast<float>(eps), op + r * n);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& y,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(y, "y");
  TORCH_CHECK(x.sizes() == y.sizes(), "x and y must have the same shape");
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.numel() == x.size(1),
              "weight must be a contiguous float32 [N] tensor");
  const int64_t t = x.size(0), n = x.size(1);
  at::Tensor sum = at::empty({t, n}, x.options());
  at::Tensor out = at::empty({t, n}, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* yp = y.data_ptr<float>();
  float* sp = sum.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t ldx = x.stride(0), ldy = y.stride(0);
  at::parallel_for(0, t, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* s = sp + r * n;
      for (int64_t i = 0; i < n; ++i) s[i] = xp[r * ldx + i] + yp[r * ldy + i];
      rms_norm_row(s, w, n, static_cast<float>(eps), op + r * n);
    }
  });
  return {sum, out};
}

void rotary_qkv_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                 int64_t kv_heads, int64_t head_dim) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(head_dim % 2 == 0 && qkv.size(1) == (heads + 2 * kv_heads) * head_dim,
              "qkv must hold q, k and v heads of an even head_dim");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat &&
                  cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes() && cos.size(0) == qkv.size(0) &&
                  cos.size(1) == head_dim,
              "cos and sin must be contiguous float32 [T, head_dim] tensors");
  const int64_t t = qkv.size(0), ld = qkv.stride(0), half = head_dim / 2;
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, t, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* c = cp + r * head_dim;
      const float* s = sp + r * head_dim;
      for (int64_t h = 0; h < heads + kv_heads; ++h) {  // q heads, then k heads
        float* x = base + r * ld + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half];
          x[i] = a * c[i] + (-b) * s[i];
          x[i + half] = b * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  const int64_t t = gate_up.size(0), n = gate_up.size(1) / 2, ld = gate_up.stride(0);
  at::Tensor out = at::empty({t, n}, gate_up.options());
  const float* gp = gate_up.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, t * n, 4096, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t r = i / n, c0 = i % n;
      const int64_t c1 = std::min(n, c0 + (end - i));
      const float* g = gp + r * ld;
      const float* u = g + n;
      float* o = op + r * n;
      int64_t c = c0;
#if defined(__AVX512F__)
      const __m512 one = _mm512_set1_ps(1.0f);
      for (; c + 16 <= c1; c += 16) {
        const __m512 gv = _mm512_loadu_ps(g + c);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(one, e));
        _mm512_storeu_ps(o + c, _mm512_mul_ps(silu, _mm512_loadu_ps(u + c)));
      }
#elif defined(FERRY_VECTOR)
      const __m256 one = _mm256_set1_ps(1.0f);
      for (; c + 8 <= c1; c += 8) {
        const __m256 gv = _mm256_loadu_ps(g + c);
        const __m256 e = exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        const __m256 silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(o + c, _mm256_mul_ps(silu, _mm256_loadu_ps(u + c)));
      }
#endif
      for (; c < c1; ++c) o[c] = (g[c] / (1.0f + std::exp(-g[c]))) * u[c];
      i += c1 - c0;
    }
  });
  return out;
}

}  // namespace ferry
