#include <torch/extension.h>

#include "kernels.h"

namespace {

// Whether this build has the AVX-512 kernels. The portable loops are only a correctness fallback:
// slower than PyTorch's own ops, so the engine does not use a build without them.
bool vectorized() {
#if defined(__AVX512F__)
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("vectorized", &vectorized, "True when built with the AVX-512 kernels");
  mod.def("quant_linear", &ferry::quant_linear, "x @ dequantize(W).T over tile-packed quant blocks");
  mod.def("quant_rows", &ferry::quant_rows, "rows of dequantize(W) (an embedding lookup)");
  mod.def("paged_decode_attention", &ferry::paged_decode_attention,
          "decode attention read in place from the paged KV cache");
  mod.def("rms_norm", &ferry::rms_norm, "RMSNorm over rows");
  mod.def("add_rms_norm", &ferry::add_rms_norm, "(x + y, RMSNorm(x + y))");
  mod.def("rotary_qkv_", &ferry::rotary_qkv_, "rotate-half RoPE on q and k heads, in place");
  mod.def("silu_mul", &ferry::silu_mul, "SiLU(gate) * up from the fused gate/up output");
}
