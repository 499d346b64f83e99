#include <torch/extension.h>

#include "decode_step.h"
#include "kernels.h"

#include <string>

namespace {

// The instruction set the kernels of this build were compiled for (see simd_math.h).
const char* isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "portable";
#endif
}

// Whether this build has vector kernels (AVX-512 or AVX2). The portable loops are only a
// correctness fallback: slower than PyTorch's own ops, so the engine does not use a build without
// them.
bool vectorized() { return std::string(isa()) != "portable"; }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("isa", &isa, "the kernels' instruction set: avx512, avx2 or portable");
  mod.def("vectorized", &vectorized, "True when built with vector (AVX-512 or AVX2) kernels");
  mod.def("quant_linear", &ferry::quant_linear, "x @ dequantize(W).T over tile-packed quant blocks");
  mod.def("dequantize_t_bf16", &ferry::dequantize_t_bf16,
          "dequantize(W).T rounded to bfloat16, for a bfloat16 GEMM");
  mod.def("quant_rows", &ferry::quant_rows, "rows of dequantize(W) (an embedding lookup)");
  mod.def("paged_decode_attention", &ferry::paged_decode_attention,
          "decode attention read in place from the paged KV cache");
  mod.def("rms_norm", &ferry::rms_norm, "RMSNorm over rows");
  mod.def("add_rms_norm", &ferry::add_rms_norm, "(x + y, RMSNorm(x + y))");
  mod.def("rotary_qkv_", &ferry::rotary_qkv_, "rotate-half RoPE on q and k heads, in place");
  mod.def("silu_mul", &ferry::silu_mul, "SiLU(gate) * up from the fused gate/up output");
  // NOTE: module_local: each instruction set's build is its own module with these same C++
  // types, and tests and benchmarks load several builds into one process.
  pybind11::class_<ferry::LinearSpec>(mod, "LinearSpec", pybind11::module_local())
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>,
                          std::vector<int64_t>, std::vector<int64_t>, std::optional<at::Tensor>,
                          std::optional<at::Tensor>, int64_t, std::vector<at::Tensor>>(),
           pybind11::arg("codes"), pybind11::arg("d"), pybind11::arg("m"), pybind11::arg("qtypes"),
           pybind11::arg("out_features"), pybind11::arg("dense"), pybind11::arg("bias"),
           pybind11::arg("bf16_rows"), pybind11::arg("bf16_weights") = std::vector<at::Tensor>());
  // NOTE: forward releases the GIL: a step takes milliseconds, in which the server streams.
  pybind11::class_<ferry::DecodeStack>(mod, "DecodeStack", pybind11::module_local())
      .def(pybind11::init<int64_t, int64_t, int64_t, double>())
      .def("add_layer", &ferry::DecodeStack::add_layer)
      .def("num_layers", &ferry::DecodeStack::num_layers)
      .def("forward", &ferry::DecodeStack::forward,
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
