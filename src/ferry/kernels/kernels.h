// ferry's CPU kernels, bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace ferry {

// x [M, K] float32 @ dequantize(W).T -> [M, N]; W tile-packed (see quant_linear.cpp)
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d,
                        const at::Tensor& m, int64_t qtype, int64_t n);

// rows `ids` of dequantize(W): [T, K]
at::Tensor quant_rows(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& d,
                      const at::Tensor& m, int64_t qtype, int64_t n, int64_t k);

// dequantize(W).T [K, N] rounded to bfloat16 (for a bfloat16 GEMM over many rows)
at::Tensor dequantize_t_bf16(const at::Tensor& codes, const at::Tensor& d, const at::Tensor& m,
                           int64_t qtype, int64_t n, int64_t k);

// one query token per sequence against its paged K/V (see paged_attention.cpp)
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& context_lens, double scale);

// fused elementwise ops (see fused_ops.cpp)
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& y,
                                                const at::Tensor& weight, double eps);
void rotary_qkv_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads,
                 int64_t kv_heads, int64_t head_dim);
at::Tensor silu_mul(const at::Tensor& gate_up);

}  // namespace ferry
