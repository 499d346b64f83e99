#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("quant_linear", &ferry::quant_linear, "x @ dequantize(W).T over tile-packed quant blocks");
  mod.def("quant_rows", &ferry::quant_rows, "rows of dequantize(W) (an embedding lookup)");
  mod.def("paged_decode_attention", &ferry::paged_decode_attention,
          "decode attention read in place from the paged KV cache");
}
