// The CUDA ops as torch functions (csrc/cuda/*.cpp) and their pybind11 registration.
// Optional outputs come back as None where they were not asked for.
#pragma once

#include <torch/extension.h>

#include <string>
#include <vector>

namespace distilbert_fast {
namespace cuda_ops {

using MaybeTensors = std::vector<c10::optional<at::Tensor>>;

// Named and ordered as the cpu backend's entry points (csrc/cpu/cpu_ops.h), with the dropout
// state where those take the keep mask: dropout_rng, an int64 (2,) CUDA tensor {seed, offset}
// read on the device (None without dropout). Checks raise ValueError / TypeError naming the
// argument.

// (y, z, mean, rstd); z, mean, rstd only with save_for_backward.
MaybeTensors residual_layernorm_fwd(const at::Tensor& x,
                                    const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, const at::Tensor& bias, double eps,
                                    const c10::optional<at::Tensor>& x_bias,
                                    const c10::optional<at::Tensor>& dropout_rng,
                                    double dropout_p, bool save_for_backward);
// (dx, dresidual, dweight, dbias, dx_bias), each as `needs` (5 flags, in that order) asks.
MaybeTensors residual_layernorm_bwd(const at::Tensor& dy, const at::Tensor& z,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& dropout_rng,
                                    double dropout_p, const at::Tensor& mean,
                                    const at::Tensor& rstd, std::vector<bool> needs);

at::Tensor bias_activation_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                              const std::string& activation);
// (dx, dbias); dbias only with need_dbias.
MaybeTensors bias_activation_bwd(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& bias,
                                 const std::string& activation, bool need_dbias);

// (out, lse); lse only with save_for_backward.
MaybeTensors masked_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool save_for_backward);
// (dq, dk, dv, dhead_mask); dhead_mask only with need_dhead_mask (and a head_mask).
MaybeTensors masked_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool need_dhead_mask);

// Varlen: q, k, v (total, heads, head_dim) with equal strides and a unit-stride head_dim;
// cu_seqlens int32 (batch + 1,); max_seqlen >= the longest sequence (not checked: that would read
// the device). (out, lse): out contiguous (total, heads, head_dim), lse float32 (heads, total).
MaybeTensors varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool save_for_backward);
// (dq, dk, dv, dhead_mask), dq, dk, dv contiguous (total, heads, head_dim).
MaybeTensors varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& cu_seqlens,
                                  int64_t max_seqlen, const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool need_dhead_mask);

}  // namespace cuda_ops

void init_cuda_ops(pybind11::module_& m);

}  // namespace distilbert_fast
