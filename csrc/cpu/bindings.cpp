// The CPU kernels' Python entry points (distilbert_fast._C.cpu_*), registered by init_cpu_ops.
// Their signatures and contracts: cpu_ops.h.
#include <torch/extension.h>

#include "../ops_init.h"
#include "common.h"
#include "cpu_ops.h"

namespace distilbert_fast {

void init_cpu_ops(pybind11::module_& m) {
  m.def("cpu_residual_layernorm_fwd", &cpu::residual_layernorm_fwd,
        "y, mean, rstd = LayerNorm(dropout(x + x_bias) + residual) over rows of x (rows, dim)");
  m.def("cpu_residual_layernorm_bwd", &cpu::residual_layernorm_bwd,
        "dx, dresidual, dweight, dbias, dx_bias of cpu_residual_layernorm_fwd");
  m.def("cpu_bias_activation_fwd", &cpu::bias_activation_fwd,
        "act(x + bias) over rows of x (rows, cols); inplace=True writes it over x",
        pybind11::arg("x"), pybind11::arg("bias"), pybind11::arg("activation"),
        pybind11::arg("inplace") = false);
  m.def("cpu_bias_activation_bwd", &cpu::bias_activation_bwd,
        "dx, dbias of cpu_bias_activation_fwd");
  m.def(
      "cpu_empty",
      [](std::vector<int64_t> sizes, const at::Tensor& like) {
        TORCH_CHECK_VALUE(like.device().is_cpu(), "like must be a CPU tensor, got one on ", like.device());
        return cpu::empty_output(sizes, like.options());
      },
      "an uninitialised contiguous CPU tensor of like's dtype; from 1 MiB from the output cache, on huge pages");
  m.def("cpu_cached_output_bytes", &cpu::cached_output_bytes, "bytes of idle blocks in the output cache");
  m.def("cpu_release_cached_outputs", &cpu::release_cached_outputs,
        "frees the output cache's idle blocks; returns the bytes freed");
  m.def("cpu_masked_attention_fwd", &cpu::masked_attention_fwd,
        "out, lse of softmax(q k^T * scale, key padding) [dropout] [* head_mask] @ v");
  m.def("cpu_masked_attention_bwd", &cpu::masked_attention_bwd,
        "dq, dk, dv, dhead_mask of cpu_masked_attention_fwd");
  m.def("cpu_varlen_attention_fwd", &cpu::varlen_attention_fwd,
        "out, lse of attention within each packed sequence (q, k, v: total x heads x head_dim)");
  m.def("cpu_varlen_attention_bwd", &cpu::varlen_attention_bwd,
        "dq, dk, dv, dhead_mask of cpu_varlen_attention_fwd");
  m.def("cpu_bf16_matrix_units", &cpu::bf16_matrix_units,
        "whether bf16 brgemm runs on matrix units (AMX) here, as cpu_varlen_attention_bf16_fwd needs");
  m.def("cpu_varlen_attention_bf16_fwd", &cpu::varlen_attention_bf16_fwd,
        "out (bf16) of attention within each packed sequence, for inference, on the bf16 matrix units");
}

}  // namespace distilbert_fast
