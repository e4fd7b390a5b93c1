// Torch launchers of the masked attention kernels (kernels/cuda/attention.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda_ops.h"

namespace distilbert_fast {
namespace cuda_ops {

namespace {

struct AttnShape {
  int batch, heads, seq, head_dim;
};

// q (batch, heads, seq, head_dim) and the tensors that must match it; returns the shape.
AttnShape check_attention_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const c10::optional<at::Tensor>& key_padding_mask) {
  check_cuda(q, "q");
  kernel_dtype(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 4, "q must have shape (batch, heads, seq, head_dim), got ",
                    shape_str(q.sizes()));
  check_like(k, q, "k", "q");
  check_shape(k, q.sizes(), "k");
  check_like(v, q, "v", "q");
  check_shape(v, q.sizes(), "v");
  TORCH_CHECK_VALUE(q.size(3) <= cuda::kMaxHeadDim, "q's head_dim must be <= ",
                    cuda::kMaxHeadDim, " for the cuda attention kernels, got ", q.size(3));
  TORCH_CHECK_VALUE(q.size(0) * q.size(1) <= 65535, "batch * heads must be <= 65535, got ",
                    q.size(0) * q.size(1));
  TORCH_CHECK_VALUE(q.size(2) <= INT32_MAX / 2, "seq too long: ", q.size(2));
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    check_cuda(m, "key_padding_mask");
    TORCH_CHECK_VALUE(m.device() == q.device(), "key_padding_mask must be on ", q.device(),
                      ", got ", m.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "key_padding_mask must be a bool tensor, got ",
                     m.scalar_type());
    check_shape(m, {q.size(0), q.size(2)}, "key_padding_mask");
  }
  return {static_cast<int>(q.size(0)), static_cast<int>(q.size(1)), static_cast<int>(q.size(2)),
          static_cast<int>(q.size(3))};
}

c10::optional<at::Tensor> head_mask_floats(const c10::optional<at::Tensor>& head_mask,
                                           const at::Tensor& q) {
  if (!head_mask.has_value()) return c10::nullopt;
  return float_vector(*head_mask, q.size(1), q, "head_mask");
}

const bool* mask_ptr(const c10::optional<at::Tensor>& m) {
  return m.has_value() ? m->data_ptr<bool>() : nullptr;
}

}  // namespace

MaybeTensors attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const c10::optional<at::Tensor>& key_padding_mask,
                               const c10::optional<at::Tensor>& head_mask, double scale,
                               double dropout_p, int64_t seed, bool save_for_backward) {
  const AttnShape s = check_attention_inputs(q, k, v, key_padding_mask);
  check_dropout(dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q);
  at::Tensor out = at::empty_like(q);
  c10::optional<at::Tensor> lse;
  if (save_for_backward) lse = at::empty({s.batch, s.heads, s.seq}, q.options().dtype(at::kFloat));
  check_launch(cuda::attention_forward(kernel_dtype(q, "q"), q.data_ptr(), k.data_ptr(),
                                       v.data_ptr(), mask_ptr(key_padding_mask),
                                       ptr_or_null<const float>(hm), out.data_ptr(),
                                       ptr_or_null<float>(lse), s.batch, s.heads, s.seq,
                                       s.head_dim, static_cast<float>(scale),
                                       static_cast<float>(dropout_p), static_cast<uint64_t>(seed),
                                       c10::cuda::getCurrentCUDAStream()),
               "attention_forward");
  return {out, lse};
}

MaybeTensors attention_backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& out, const at::Tensor& dout,
                                const c10::optional<at::Tensor>& key_padding_mask,
                                const c10::optional<at::Tensor>& head_mask,
                                const at::Tensor& lse, double scale, double dropout_p,
                                int64_t seed, bool need_dhead_mask) {
  const AttnShape s = check_attention_inputs(q, k, v, key_padding_mask);
  check_like(out, q, "out", "q");
  check_shape(out, q.sizes(), "out");
  check_like(dout, q, "grad_out", "q");
  check_shape(dout, q.sizes(), "grad_out");
  check_cuda(lse, "lse");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, "lse must be float32, got ", lse.scalar_type());
  check_shape(lse, {s.batch, s.heads, s.seq}, "lse");
  check_dropout(dropout_p);
  const c10::cuda::CUDAGuard guard(q.device());
  const c10::optional<at::Tensor> hm = head_mask_floats(head_mask, q);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(q), dv = at::empty_like(q);
  const auto fopts = q.options().dtype(at::kFloat);
  at::Tensor delta = at::empty({s.batch, s.heads, s.seq}, fopts);
  c10::optional<at::Tensor> dhead_rows;
  if (need_dhead_mask && hm.has_value()) dhead_rows = at::empty({s.batch, s.heads, s.seq}, fopts);
  check_launch(cuda::attention_backward(
                   kernel_dtype(q, "q"), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   out.data_ptr(), dout.data_ptr(), mask_ptr(key_padding_mask),
                   ptr_or_null<const float>(hm), lse.data_ptr<float>(), dq.data_ptr(),
                   dk.data_ptr(), dv.data_ptr(), delta.data_ptr<float>(),
                   ptr_or_null<float>(dhead_rows), s.batch, s.heads, s.seq, s.head_dim,
                   static_cast<float>(scale), static_cast<float>(dropout_p),
                   static_cast<uint64_t>(seed), c10::cuda::getCurrentCUDAStream()),
               "attention_backward");
  c10::optional<at::Tensor> dhead_mask;
  if (dhead_rows.has_value()) dhead_mask = dhead_rows->sum(at::IntArrayRef{0, 2});  // (heads,)
  return {dq, dk, dv, dhead_mask};
}

}  // namespace cuda_ops
}  // namespace distilbert_fast
