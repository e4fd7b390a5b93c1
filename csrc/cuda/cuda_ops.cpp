// pybind11 registration of the CUDA ops (compiled only into CUDA builds, under WITH_CUDA): the
// cpu ones' names and argument order (csrc/cpu/bindings.cpp), prefixed cuda_.
#include "cuda_ops.h"

namespace distilbert_fast {

void init_cuda_ops(pybind11::module_& m) {
  using namespace cuda_ops;
  namespace py = pybind11;
  m.def("cuda_residual_layernorm_fwd", &residual_layernorm_fwd,
        "LayerNorm(dropout(x + x_bias) + residual) on CUDA -> (y, z, mean, rstd)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("x_bias"), py::arg("dropout_rng"), py::arg("dropout_p"),
        py::arg("save_for_backward"));
  m.def("cuda_residual_layernorm_bwd", &residual_layernorm_bwd,
        "-> (dx, dresidual, dweight, dbias, dx_bias)", py::arg("grad_out"), py::arg("z"),
        py::arg("weight"), py::arg("dropout_rng"), py::arg("dropout_p"), py::arg("mean"),
        py::arg("rstd"), py::arg("needs"));
  m.def("cuda_bias_activation_fwd", &bias_activation_fwd, "act(x + bias) on CUDA", py::arg("x"),
        py::arg("bias"), py::arg("activation"));
  m.def("cuda_bias_activation_bwd", &bias_activation_bwd, "-> (dx, dbias)", py::arg("grad_out"),
        py::arg("x"), py::arg("bias"), py::arg("activation"), py::arg("need_dbias"));
  m.def("cuda_masked_attention_fwd", &masked_attention_fwd,
        "masked attention on CUDA -> (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("head_mask"), py::arg("dropout_rng"),
        py::arg("dropout_p"), py::arg("scale"), py::arg("save_for_backward"));
  m.def("cuda_masked_attention_bwd", &masked_attention_bwd, "-> (dq, dk, dv, dhead_mask)",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("key_padding_mask"), py::arg("head_mask"),
        py::arg("dropout_rng"), py::arg("dropout_p"), py::arg("scale"),
        py::arg("need_dhead_mask"));
  m.def("cuda_varlen_attention_fwd", &varlen_attention_fwd,
        "attention over packed sequences on CUDA -> (out, lse)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("head_mask"),
        py::arg("dropout_rng"), py::arg("dropout_p"), py::arg("scale"),
        py::arg("save_for_backward"));
  m.def("cuda_varlen_attention_bwd", &varlen_attention_bwd, "-> (dq, dk, dv, dhead_mask)",
        py::arg("grad_out"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"),
        py::arg("lse"), py::arg("cu_seqlens"), py::arg("max_seqlen"), py::arg("head_mask"),
        py::arg("dropout_rng"), py::arg("dropout_p"), py::arg("scale"),
        py::arg("need_dhead_mask"));
}

}  // namespace distilbert_fast
