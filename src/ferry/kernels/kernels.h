// ferry's CPU kernels, bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

namespace ferry {

// x [M, K] float32 @ dequantize(W).T -> [M, N]; W tile-packed (see quant_linear.cpp)
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& d,
                        const at::Tensor& m, int64_t qtype, int64_t n);

// rows `ids` of dequantize(W): [T, K]
at::Tensor quant_rows(const at::Tensor& ids, const at::Tensor& codes, const at::Tensor& d,
                      const at::Tensor& m, int64_t qtype, int64_t n, int64_t k);

// one query token per sequence against its paged K/V (see paged_attention.cpp)
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                  const at::Tensor& v_cache, const at::Tensor& block_table,
                                  const at::Tensor& context_lens, double scale);

}  // namespace ferry
