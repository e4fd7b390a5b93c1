// Torch launchers of the attention kernels (kernels/cuda/attention.cuh): masked (padded) and
// varlen (packed tokens), which share the kernels through cuda::AttnLayout.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda_ops.h"

namespace distilbert_fast {
namespace cuda_ops {

namespace {

// Every entry point checks its arguments in their order, as the cpu ones do
// (csrc/cpu/attention.cpp): q, k, v; the layout (key_padding_mask, or cu_seqlens and
// max_seqlen); the backward's grad_out, out and lse; head_mask; dropout_p and dropout_rng.
void check_head_dim(const at::Tensor& q, int64_t batch_heads) {
  TORCH_CHECK_VALUE(q.size(-1) <= cuda::kMaxHeadDim, "q's head_dim must be <= ",
                    cuda::kMaxHeadDim, " for the cuda attention kernels, got ", q.size(-1));
  TORCH_CHECK_VALUE(batch_heads <= INT32_MAX, "batch * heads must be < 2^31, got ", batch_heads);
}

// q (batch, heads, seq, head_dim) and the tensors that must match it.
void check_masked_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& key_padding_mask) {
  check_cuda(q, "q");
  kernel_dtype(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have shape (batch, heads, seq, head_dim), got ",
                    shape_str(q.sizes()));
  check_like(k, q, "k", "q");
  check_shape(k, q.sizes(), "k");
  check_like(v, q, "v", "q");
  check_shape(v, q.sizes(), "v");
  check_head_dim(q, q.size(0) * q.size(1));
  TORCH_CHECK_VALUE(q.size(2) <= cuda::kMaxAttnSeq, "q's seq must be <= ", cuda::kMaxAttnSeq,
                    " for the cuda attention kernels, got ", q.size(2));
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    check_cuda(m, "key_padding_mask");
    TORCH_CHECK_VALUE(m.device() == q.device(), "key_padding_mask must be on ", q.device(),
                      ", got ", m.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "key_padding_mask must be a bool tensor, got ",
                     m.scalar_type());
    check_shape(m, {q.size(0), q.size(2)}, "key_padding_mask");
  }
}

// A (total, heads, head_dim) tensor of q's dtype and device whose head_dim is unit-stride (q, k
// and v: any token and head strides, e.g. views of one fused QKV GEMM output).
void check_token_major(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK_VALUE(t.device() == q.device(), name, " must be on ", q.device(), " like q, got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), name, " must have dtype ",
                   q.scalar_type(), " like q, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3, name, " must have shape (total_tokens, heads, head_dim), got ",
                    shape_str(t.sizes()));
  check_shape(t, q.sizes(), name);
  TORCH_CHECK_VALUE(t.stride(2) == 1 || t.size(2) <= 1, name,
                    " must have a unit-stride head_dim, got strides ", shape_str(t.strides()));
}

// q, k, v (total, heads, head_dim), with one pair of (token, head) strides between them.
void check_varlen_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& cu_seqlens, int64_t max_seqlen) {
  kernel_dtype(q, "q");
  check_token_major(q, q, "q");
  check_token_major(k, q, "k");
  check_token_major(v, q, "v");
  TORCH_CHECK_VALUE(k.strides() == q.strides() && v.strides() == q.strides(),
                    "q, k and v must have the same strides, got ", shape_str(q.strides()), ", ",
                    shape_str(k.strides()), " and ", shape_str(v.strides()));
  check_cuda(cu_seqlens, "cu_seqlens");
  TORCH_CHECK_VALUE(cu_seqlens.device() == q.device(), "cu_seqlens must be on ", q.device(),
                    ", got ", cu_seqlens.device());
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, "cu_seqlens must be an int32 tensor, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2,
                    "cu_seqlens must have shape (batch + 1,) with batch >= 1, got ",
                    shape_str(cu_seqlens.sizes()));
  TORCH_CHECK_VALUE(max_seqlen >= 1 && max_seqlen <= cuda::kMaxAttnSeq,
                    "max_seqlen must be in [1, ", cuda::kMaxAttnSeq,
                    "] for the cuda attention kernels, got ", max_seqlen);
  TORCH_CHECK_VALUE(q.size(0) <= INT32_MAX, "total_tokens must be < 2^31, got ", q.size(0));
  check_head_dim(q, (cu_seqlens.size(0) - 1) * q.size(1));
}

c10::optional<at::Tensor> head_mask_floats(const c10::optional<at::Tensor>& head_mask,
                                           const at::Tensor& q, int64_t heads) {
  if (!head_mask.has_value()) return c10::nullopt;
  return float_vector(*head_mask, heads, q, "head_mask");
}

const bool* mask_ptr(const c10::optional<at::Tensor>& m) {
  return m.has_value() ? m->data_ptr<bool>() : nullptr;
}

void check_lse(const at::Tensor& lse, at::IntArrayRef shape) {
  check_cuda(lse, "lse");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_shape(lse, shape, "lse");
}

// The forward of both layouts: out like `out_like`, lse of `stat_shape` when saved.
MaybeTensors attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const bool* mask, const c10::optional<at::Tensor>& hm,
                           const int64_t* rng, double dropout_p, double scale,
                           bool save_for_backward, const cuda::AttnLayout& layout, int batch,
                           int heads, at::Tensor out, at::IntArrayRef stat_shape) {
  c10::optional<at::Tensor> lse;
  if (save_for_backward) lse = at::empty(stat_shape, q.options().dtype(at::kFloat));
  check_launch(cuda::attention_forward(kernel_dtype(q, "q"), q.data_ptr(), k.data_ptr(),
                                       v.data_ptr(), mask, ptr_or_null<const float>(hm),
                                       out.data_ptr(), ptr_or_null<float>(lse), layout, batch,
                                       heads, static_cast<int>(q.size(-1)),
                                       static_cast<float>(scale), static_cast<float>(dropout_p),
                                       rng, c10::cuda::getCurrentCUDAStream()),
               "attention forward");
  return {out, lse};
}

// The backward of both layouts; dhead_rows (stat_shape) summed over all but `head_axis`.
MaybeTensors attention_bwd(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const bool* mask, const c10::optional<at::Tensor>& hm,
                           const int64_t* rng, double dropout_p, double scale,
                           bool need_dhead_mask, const cuda::AttnLayout& layout, int batch,
                           int heads, at::IntArrayRef stat_shape, int64_t head_axis) {
  at::Tensor dq = at::empty_like(out), dk = at::empty_like(out), dv = at::empty_like(out);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty(stat_shape, fopts);
  c10::optional<at::Tensor> dhead_rows;
  if (need_dhead_mask && hm.has_value()) dhead_rows = at::zeros(stat_shape, fopts);
  check_launch(cuda::attention_backward(
                   kernel_dtype(q, "q"), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   out.data_ptr(), dout.data_ptr(), mask, ptr_or_null<const float>(hm),
                   lse.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                   delta.data_ptr<float>(), ptr_or_null<float>(dhead_rows), layout, batch, heads,
                   static_cast<int>(q.size(-1)), static_cast<float>(scale),
                   static_cast<float>(dropout_p), rng, c10::cuda::getCurrentCUDAStream()),
               "attention backward");
  c10::optional<at::Tensor> dhead_mask;
  if (dhead_rows.has_value()) {  // (heads,): the sum over every other dim
    std::vector<int64_t> others;
    for (int64_t d = 0; d < static_cast<int64_t>(stat_shape.size()); ++d)
      if (d != head_axis) others.push_back(d);
    dhead_mask = dhead_rows->sum(at::IntArrayRef(others));
  }
  return {dq, dk, dv, dhead_mask};
}

}  // namespace

MaybeTensors masked_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool save_for_backward) {
  check_masked_inputs(q, k, v, key_padding_mask);
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q, q.size(1));
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, q);
  const int batch = static_cast<int>(q.size(0)), heads = static_cast<int>(q.size(1));
  const int seq = static_cast<int>(q.size(2));
  return attention_fwd(q, k, v, mask_ptr(key_padding_mask), hm, rng, dropout_p, scale,
                       save_for_backward,
                       cuda::padded_attention_layout(heads, seq, static_cast<int>(q.size(3))),
                       batch, heads, at::empty_like(q), {batch, heads, seq});
}

MaybeTensors masked_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse,
                                  const c10::optional<at::Tensor>& key_padding_mask,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool need_dhead_mask) {
  check_masked_inputs(q, k, v, key_padding_mask);
  check_like(grad_out, q, "grad_out", "q");
  check_shape(grad_out, q.sizes(), "grad_out");
  check_like(out, q, "out", "q");
  check_shape(out, q.sizes(), "out");
  const int batch = static_cast<int>(q.size(0)), heads = static_cast<int>(q.size(1));
  const int seq = static_cast<int>(q.size(2));
  check_lse(lse, {batch, heads, seq});
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q, heads);
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, q);
  return attention_bwd(grad_out, q, k, v, out, lse, mask_ptr(key_padding_mask), hm, rng,
                       dropout_p, scale, need_dhead_mask,
                       cuda::padded_attention_layout(heads, seq, static_cast<int>(q.size(3))),
                       batch, heads, {batch, heads, seq}, 1);
}

MaybeTensors varlen_attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& cu_seqlens, int64_t max_seqlen,
                                  const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool save_for_backward) {
  check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t total = q.size(0);
  const int heads = static_cast<int>(q.size(1)), head_dim = static_cast<int>(q.size(2));
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q, heads);
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, q);
  return attention_fwd(
      q, k, v, nullptr, hm, rng, dropout_p, scale, save_for_backward,
      cuda::varlen_attention_layout(cu_seqlens.data_ptr<int>(), static_cast<int>(max_seqlen),
                                    total, heads, head_dim, q.stride(0), q.stride(1)),
      static_cast<int>(cu_seqlens.size(0) - 1), heads,
      at::empty({total, heads, head_dim}, q.options()), {heads, total});
}

MaybeTensors varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                  const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                  const at::Tensor& lse, const at::Tensor& cu_seqlens,
                                  int64_t max_seqlen, const c10::optional<at::Tensor>& head_mask,
                                  const c10::optional<at::Tensor>& dropout_rng, double dropout_p,
                                  double scale, bool need_dhead_mask) {
  check_varlen_inputs(q, k, v, cu_seqlens, max_seqlen);
  check_like(grad_out, q, "grad_out", "q");
  check_shape(grad_out, q.sizes(), "grad_out");
  check_like(out, q, "out", "q");
  check_shape(out, q.sizes(), "out");
  const int64_t total = q.size(0);
  const int heads = static_cast<int>(q.size(1)), head_dim = static_cast<int>(q.size(2));
  check_lse(lse, {heads, total});
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q, heads);
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, q);
  return attention_bwd(
      grad_out, q, k, v, out, lse, nullptr, hm, rng, dropout_p, scale, need_dhead_mask,
      cuda::varlen_attention_layout(cu_seqlens.data_ptr<int>(), static_cast<int>(max_seqlen),
                                    total, heads, head_dim, q.stride(0), q.stride(1)),
      static_cast<int>(cu_seqlens.size(0) - 1), heads, {heads, total}, 0);
}

}  // namespace cuda_ops
}  // namespace distilbert_fast
