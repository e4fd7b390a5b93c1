// pybind11 registration of the CUDA ops (compiled only into CUDA builds, under WITH_CUDA).
#include "cuda_ops.h"

namespace distilbert_fast {

void init_cuda_ops(pybind11::module_& m) {
  using namespace cuda_ops;
  namespace py = pybind11;
  m.def("cuda_residual_layernorm_forward", &residual_layernorm_forward,
        "LayerNorm(dropout(x + x_bias) + residual) on CUDA -> (y, z, mean, rstd)", py::arg("x"),
        py::arg("residual"), py::arg("x_bias"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("dropout_p"), py::arg("seed"), py::arg("save_for_backward"));
  m.def("cuda_residual_layernorm_backward", &residual_layernorm_backward,
        "-> (dx, dresidual, dweight, dbias, dx_bias)", py::arg("grad_out"), py::arg("z"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("dropout_p"),
        py::arg("seed"), py::arg("need_dresidual"), py::arg("need_dweight"),
        py::arg("need_dbias"), py::arg("need_dx_bias"));
  m.def("cuda_bias_activation_forward", &bias_activation_forward, "act(x + bias) on CUDA",
        py::arg("x"), py::arg("bias"), py::arg("activation"));
  m.def("cuda_bias_activation_backward", &bias_activation_backward, "-> (dx, dbias)",
        py::arg("grad_out"), py::arg("x"), py::arg("bias"), py::arg("activation"),
        py::arg("need_dbias"));
  m.def("cuda_attention_forward", &attention_forward,
        "masked attention on CUDA -> (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("key_padding_mask"), py::arg("head_mask"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("save_for_backward"));
  m.def("cuda_attention_backward", &attention_backward, "-> (dq, dk, dv, dhead_mask)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
        py::arg("key_padding_mask"), py::arg("head_mask"), py::arg("lse"), py::arg("scale"),
        py::arg("dropout_p"), py::arg("seed"), py::arg("need_dhead_mask"));
}

}  // namespace distilbert_fast
