// Torch launchers of the bias + activation kernels (kernels/cuda/bias_act.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <string>

#include "checks.h"
#include "cuda_ops.h"

namespace distilbert_fast {
namespace cuda_ops {

namespace {

// The activation by name, as distilbert_fast.ops.ACTIVATIONS spells it (and cpu_* take it).
cuda::Activation to_activation(const std::string& name) {
  if (name == "gelu") return cuda::Activation::kGelu;
  if (name == "gelu_new") return cuda::Activation::kGeluNew;
  if (name == "relu") return cuda::Activation::kRelu;
  if (name == "silu") return cuda::Activation::kSilu;
  TORCH_CHECK_VALUE(false, "activation must be one of gelu, gelu_new, relu, silu, got '", name,
                    "'");
}

// bias: x's dtype and device, shape (x.size(-1),), contiguous.
void check_bias(const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  if (!bias.has_value()) return;
  check_like(*bias, x, "bias", "x");
  check_shape(*bias, {x.size(-1)}, "bias");
}

}  // namespace

at::Tensor bias_activation_fwd(const at::Tensor& x, const c10::optional<at::Tensor>& bias,
                              const std::string& activation) {
  const cuda::Activation act = to_activation(activation);
  check_cuda(x, "x");
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a scalar");
  check_bias(bias, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  check_launch(cuda::bias_activation_forward(dtype, act, x.data_ptr(),
                                             ptr_or_null<const void>(bias), y.data_ptr(),
                                             x.numel() / cols, cols,
                                             c10::cuda::getCurrentCUDAStream()),
               "bias_activation_fwd");
  return y;
}

MaybeTensors bias_activation_bwd(const at::Tensor& dy, const at::Tensor& x,
                                 const c10::optional<at::Tensor>& bias,
                                 const std::string& activation, bool need_dbias) {
  const cuda::Activation act = to_activation(activation);
  check_cuda(x, "x");
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a scalar");
  check_like(dy, x, "grad_out", "x");
  check_shape(dy, x.sizes(), "grad_out");
  check_bias(bias, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t cols = x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  at::Tensor dx = at::empty_like(x);
  c10::optional<at::Tensor> dbias;
  at::Tensor workspace;
  const auto fopts = x.options().dtype(at::kFloat);
  if (need_dbias) {
    dbias = at::empty({cols}, fopts);
    workspace = at::empty(
        {static_cast<int64_t>(cuda::bias_activation_backward_workspace(rows, cols))}, fopts);
  }
  if (cols == 0) return {dx, dbias};
  check_launch(cuda::bias_activation_backward(
                   dtype, act, dy.data_ptr(), x.data_ptr(), ptr_or_null<const void>(bias),
                   dx.data_ptr(), ptr_or_null<float>(dbias),
                   need_dbias ? workspace.data_ptr<float>() : nullptr, rows, cols,
                   c10::cuda::getCurrentCUDAStream()),
               "bias_activation_bwd");
  return {dx, dbias};
}

}  // namespace cuda_ops
}  // namespace distilbert_fast
