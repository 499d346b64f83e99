// A whole decode step in one native call (see decode_step.cpp), bound to Python in bindings.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

namespace ferry {

// One linear layer: packed quant parts in output-row order (ferry.model.layers.linear), or a dense
// float32 weight; an optional bias. With bf16_rows > 0, a batch of at least that many rows runs in
// bfloat16 over the packed weights dequantized for the call (PackedWeight.bf16_rows), or over
// bf16_weights, their [in, out] bfloat16 copies kept by PackedWeight.keep_bf16 (one per part).
class LinearSpec {
 public:
  LinearSpec(std::vector<at::Tensor> codes, std::vector<at::Tensor> d, std::vector<at::Tensor> m,
             std::vector<int64_t> qtypes, std::vector<int64_t> out_features,
             std::optional<at::Tensor> dense, std::optional<at::Tensor> bias, int64_t bf16_rows,
             std::vector<at::Tensor> bf16_weights);
  at::Tensor operator()(const at::Tensor& x) const;  // [T, in] -> [T, out]

 private:
  std::vector<at::Tensor> codes_, d_, m_, bf16_weights_;
  std::vector<int64_t> qtypes_, out_features_;
  std::optional<at::Tensor> dense_, bias_;
  int64_t bf16_rows_;
};

// The decoder layers of a Llama-style model (RMSNorm, fused qkv with rotate-half RoPE, paged
// decode attention, SiLU-gated MLP), run over a batch of single-token decodes.
class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scale);
  void add_layer(at::Tensor input_norm, at::Tensor post_norm, double eps, LinearSpec qkv,
                 LinearSpec o, LinearSpec gate_up, LinearSpec down);
  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  // x: [B, hidden] embeddings -> [B, hidden] before the final norm; cos, sin: [B, head_dim]
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                     const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches, const at::Tensor& slot_mapping,
                     const at::Tensor& block_table, const at::Tensor& context_lens) const;

 private:
  struct Layer {
    at::Tensor input_norm, post_norm;
    double eps;
    LinearSpec qkv, o, gate_up, down;
  };
  void write_kv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                const int64_t* slots, int64_t tokens) const;

  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
  std::vector<Layer> layers_;
};

}  // namespace ferry
