// The CUDA ops as torch functions (csrc/cuda/*.cpp) and their pybind11 registration.
// Optional outputs come back as None where they were not asked for.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace distilbert_fast {
namespace cuda_ops {

using MaybeTensors = std::vector<c10::optional<at::Tensor>>;

// (y, z, mean, rstd); z, mean, rstd only with save_for_backward.
MaybeTensors residual_layernorm_forward(const at::Tensor& x,
                                        const c10::optional<at::Tensor>& residual,
                                        const c10::optional<at::Tensor>& x_bias,
                                        const at::Tensor& weight, const at::Tensor& bias,
                                        double eps, double dropout_p, int64_t seed,
                                        bool save_for_backward);
// (dx, dresidual, dweight, dbias, dx_bias); the last four as asked for.
MaybeTensors residual_layernorm_backward(const at::Tensor& dy, const at::Tensor& z,
                                         const at::Tensor& weight, const at::Tensor& mean,
                                         const at::Tensor& rstd, double dropout_p, int64_t seed,
                                         bool need_dresidual, bool need_dweight, bool need_dbias,
                                         bool need_dx_bias);

at::Tensor bias_activation_forward(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                                   int64_t activation);
// (dx, dbias); dbias only with need_dbias.
MaybeTensors bias_activation_backward(const at::Tensor& dy, const at::Tensor& x,
                                      const c10::optional<at::Tensor>& bias, int64_t activation,
                                      bool need_dbias);

// (out, lse); lse only with save_for_backward.
MaybeTensors attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& key_padding_mask,
                               const c10::optional<at::Tensor>& head_mask, double scale,
                               double dropout_p, int64_t seed, bool save_for_backward);
// (dq, dk, dv, dhead_mask); dhead_mask only with need_dhead_mask (and a head_mask).
MaybeTensors attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& out, const at::Tensor& dout,
                                const c10::optional<at::Tensor>& key_padding_mask,
                                const c10::optional<at::Tensor>& head_mask,
                                const at::Tensor& lse, double scale, double dropout_p,
                                int64_t seed, bool need_dhead_mask);

}  // namespace cuda_ops

void init_cuda_ops(pybind11::module_& m);

}  // namespace distilbert_fast
