// The C++ CPU kernels' entry points (csrc/cpu/*.cpp), declared once: bindings.cpp registers them
// as distilbert_fast._C.cpu_<op>_fwd / _bwd, and each defining file includes this header, so a
// definition that drifts from its declaration does not compile (see the pragma below).
// Named and ordered as the cuda backend's (csrc/cuda/cuda_ops.h), with the dropout keep-mask where
// those take the dropout state. Optional tensors are None on the Python side; a gradient not asked
// for comes back undefined (None). Checks raise ValueError / TypeError naming the argument. The
// accumulation dtype is float32 for float32 and bfloat16 inputs, float64 for float64.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

// Each defining file includes this header before its definitions: from here on an entry point
// defined without a matching declaration above is an error, instead of a new overload that the
// bindings would never call (and a symbol missing at import).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic error "-Wmissing-declarations"
#elif defined(__clang__)
#pragma clang diagnostic error "-Wmissing-prototypes"
#endif

namespace distilbert_fast {
namespace cpu {

// layernorm.cpp. (y, mean, rstd) of LayerNorm(dropout(x + x_bias) + residual) over the rows of x
// (rows, dim); residual (R, dim), R dividing rows, row r of x adding row r % R.
std::vector<at::Tensor> residual_layernorm_fwd(const at::Tensor& x,
                                               const c10::optional<at::Tensor>& residual,
                                               const at::Tensor& weight, const at::Tensor& bias,
                                               double eps, const c10::optional<at::Tensor>& x_bias,
                                               const c10::optional<at::Tensor>& keep,
                                               double dropout_p);
// (dx, dresidual, dweight, dbias, dx_bias), each as `needs` (5 flags, in that order) asks.
std::vector<at::Tensor> residual_layernorm_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                               const c10::optional<at::Tensor>& residual,
                                               const at::Tensor& weight,
                                               const c10::optional<at::Tensor>& x_bias,
                                               const c10::optional<at::Tensor>& keep,
                                               double dropout_p, const at::Tensor& mean,
                                               const at::Tensor& rstd, std::vector<bool> needs);

// bias_activation.cpp. act(x + bias) over the rows of x (rows, cols); inplace writes it over x.
at::Tensor bias_activation_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                               const std::string& activation, bool inplace);
// (dx, dbias); dbias only with need_dbias (and a bias).
std::vector<at::Tensor> bias_activation_bwd(const at::Tensor& grad_out, const at::Tensor& x,
                                            const c10::optional<at::Tensor>& bias,
                                            const std::string& activation, bool need_dbias);

// attention.cpp. Padded: q, k, v (batch, heads, seq, head_dim). (out, lse), both in the
// accumulation dtype; lse (batch, heads, seq).
std::vector<at::Tensor> masked_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale);
// (dq, dk, dv, dhead_mask); dhead_mask only with need_dhead_mask (and a head_mask).
std::vector<at::Tensor> masked_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const c10::optional<at::Tensor>& key_padding_mask,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale, bool need_dhead_mask);

// Varlen: q, k, v (total, heads, head_dim), strided views of one fused QKV projection allowed;
// cu_seqlens int32 (batch + 1,). (out, lse): out (total, heads, head_dim), lse
// (batch, heads, max_seqlen), both in the accumulation dtype.
std::vector<at::Tensor> varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                             int64_t max_seqlen,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale);
// (dq, dk, dv, dhead_mask) of varlen_attention_fwd, as masked_attention_bwd.
std::vector<at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                             const at::Tensor& k, const at::Tensor& v,
                                             const at::Tensor& out, const at::Tensor& lse,
                                             const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                             const c10::optional<at::Tensor>& head_mask,
                                             const c10::optional<at::Tensor>& keep,
                                             double dropout_p, double scale, bool need_dhead_mask);

// Whether this CPU and torch build run bf16 brgemm on matrix units (AMX), which
// varlen_attention_bf16_fwd needs.
bool bf16_matrix_units();
// Varlen attention forward for bf16 inference on the matrix units: q, k, v as varlen_attention_fwd
// (bfloat16, even head_dim); out (total, heads, head_dim) bfloat16. No lse: no backward follows.
at::Tensor varlen_attention_bf16_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale);

}  // namespace cpu
}  // namespace distilbert_fast
