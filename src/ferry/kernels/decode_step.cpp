// A whole decode step of a Llama-family decoder in one native call (float32 CPU).
//
// At batch 1 a step of SmolLM2-135M reads ~110 MB of packed weights: ~8 ms of memory traffic on
// two cores, yet the Python layer loop issues ~20 tensor ops per layer, each paying the
// interpreter, the dispatcher and a fresh output tensor; over 30 layers that was as much time as
// the matmuls. DecodeStack holds every layer's weights and runs the layer loop here, calling the
// same kernels in the same order as the Python path (ferry/model/llama.py), so its result is
// bit-identical to it; the step runs without the GIL, so the server's event loop keeps streaming.
//
// Only steps whose rows are all single-token decodes come here (decode attention reads the paged
// cache in place); anything else (prefill chunks, sliding windows, soft-capping, q/k norms,
// sandwich norms, GeGLU) stays on the Python path.

#include "decode_step.h"

#include "kernels.h"

#include <cstring>
#include <optional>
#include <utility>
#include <vector>

namespace ferry {

LinearSpec::LinearSpec(std::vector<at::Tensor> codes, std::vector<at::Tensor> d,
                       std::vector<at::Tensor> m, std::vector<int64_t> qtypes,
                       std::vector<int64_t> out_features, std::optional<at::Tensor> dense,
                       std::optional<at::Tensor> bias, int64_t bf16_rows,
                       std::vector<at::Tensor> bf16_weights)
    : codes_(std::move(codes)), d_(std::move(d)), m_(std::move(m)),
      bf16_weights_(std::move(bf16_weights)), qtypes_(std::move(qtypes)),
      out_features_(std::move(out_features)), dense_(std::move(dense)), bias_(std::move(bias)),
      bf16_rows_(bf16_rows) {
  const size_t parts = codes_.size();
  TORCH_CHECK(bf16_weights_.empty() || bf16_weights_.size() == parts,
              "kept bfloat16 weights come one per packed part, or not at all");
  for (size_t i = 0; i < bf16_weights_.size(); ++i) {
    TORCH_CHECK(bf16_weights_[i].scalar_type() == at::kBFloat16 && bf16_weights_[i].dim() == 2 &&
                    bf16_weights_[i].size(1) == out_features_[i],
                "a kept bfloat16 weight must be [in, out] bfloat16");
  }
  TORCH_CHECK(d_.size() == parts && m_.size() == parts && qtypes_.size() == parts &&
                  out_features_.size() == parts,
              "a packed linear needs codes, d, m, type and rows for every part");
  TORCH_CHECK((parts == 0) == dense_.has_value(),
              "a linear layer is either packed parts or one dense weight");
  if (dense_) {
    TORCH_CHECK(dense_->scalar_type() == at::kFloat && dense_->dim() == 2,
                "a dense weight must be float32 [out, in]");
  }
}

at::Tensor LinearSpec::operator()(const at::Tensor& x) const {
  const bool bf16 = bf16_rows_ > 0 && x.size(0) >= bf16_rows_;
  const at::Tensor xb = bf16 ? x.to(at::kBFloat16) : at::Tensor();
  // one part: the kernel's product, float32 or (many rows) bfloat16 over the kept or the
  // dequantized weight
  auto part = [&](size_t i) {
    if (bf16) {
      const at::Tensor wt = bf16_weights_.empty()
                                ? dequantize_t_bf16(codes_[i], d_[i], m_[i], qtypes_[i],
                                                    out_features_[i], x.size(1))
                                : bf16_weights_[i];
      return at::mm(xb, wt).to(at::kFloat);
    }
    return quant_linear(x, codes_[i], d_[i], m_[i], qtypes_[i], out_features_[i]);
  };
  at::Tensor y;
  if (dense_) {
    y = at::linear(x, *dense_);
  } else if (codes_.size() == 1) {
    y = part(0);
  } else {
    std::vector<at::Tensor> parts;
    parts.reserve(codes_.size());
    for (size_t i = 0; i < codes_.size(); ++i) parts.push_back(part(i));
    y = at::cat(parts, -1);
  }
  return bias_ ? y + *bias_ : y;
}

DecodeStack::DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, double scale)
    : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), scale_(scale) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim > 0,
              "query heads must be a positive multiple of KV heads");
}

void DecodeStack::add_layer(at::Tensor input_norm, at::Tensor post_norm, double eps,
                            LinearSpec qkv, LinearSpec o, LinearSpec gate_up, LinearSpec down) {
  layers_.push_back(Layer{std::move(input_norm), std::move(post_norm), eps, std::move(qkv),
                          std::move(o), std::move(gate_up), std::move(down)});
}

// Each new token's k and v (columns of the fused qkv rows) copied to its cache slot.
void DecodeStack::write_kv(const at::Tensor& qkv, at::Tensor& k_cache, at::Tensor& v_cache,
                           const int64_t* slots, int64_t tokens) const {
  const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
  const int64_t row = qkv.stride(0);
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const float* src = qkv.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t t = 0; t < tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot ", slots[t], " out of range");
    std::memcpy(kc + slots[t] * kv_size, src + t * row + q_size, kv_size * sizeof(float));
    std::memcpy(vc + slots[t] * kv_size, src + t * row + q_size + kv_size,
                kv_size * sizeof(float));
  }
}

at::Tensor DecodeStack::forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin,
                                const std::vector<at::Tensor>& k_caches,
                                const std::vector<at::Tensor>& v_caches,
                                const at::Tensor& slot_mapping, const at::Tensor& block_table,
                                const at::Tensor& context_lens) const {
  const int64_t t = x.size(0);
  TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
              "one K and one V cache per layer");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                  slot_mapping.numel() == t,
              "slot_mapping must be a contiguous int64 [T] tensor");
  const int64_t q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (size_t i = 0; i < layers_.size(); ++i) {
    const Layer& layer = layers_[i];
    at::Tensor k_cache = k_caches[i], v_cache = v_caches[i];
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                    k_cache.scalar_type() == at::kFloat && k_cache.size(2) * k_cache.size(3) == kv_size,
                "KV caches must be contiguous float32 [blocks, block_size, Hkv, D]");
    at::Tensor qkv = layer.qkv(rms_norm(x, layer.input_norm, layer.eps));
    rotary_qkv_(qkv, cos, sin, heads_, kv_heads_, head_dim_);
    write_kv(qkv, k_cache, v_cache, slots, t);
    const at::Tensor q = qkv.narrow(1, 0, q_size).view({t, heads_, head_dim_});
    const at::Tensor attn = paged_decode_attention(q, k_cache, v_cache, block_table, context_lens,
                                                   scale_);
    auto [residual, h] = add_rms_norm(x, layer.o(attn.view({t, q_size})), layer.post_norm,
                                      layer.eps);
    x = residual + layer.down(silu_mul(layer.gate_up(h)));
  }
  return x;
}

}  // namespace ferry
