// Torch launchers of the residual + LayerNorm kernels (kernels/cuda/layernorm.cuh).
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda_ops.h"

namespace distilbert_fast {
namespace cuda_ops {

MaybeTensors residual_layernorm_fwd(const at::Tensor& x,
                                    const c10::optional<at::Tensor>& residual,
                                    const at::Tensor& weight, const at::Tensor& bias, double eps,
                                    const c10::optional<at::Tensor>& x_bias,
                                    const c10::optional<at::Tensor>& dropout_rng,
                                    double dropout_p, bool save_for_backward) {
  check_cuda(x, "x");
  const DType dtype = kernel_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least 1 dim, got a scalar");
  const int64_t cols = x.size(-1);
  TORCH_CHECK_VALUE(cols > 0 && cols <= INT32_MAX, "x's last dim must be in [1, 2^31), got ", cols);
  const int64_t rows = x.numel() / cols;
  // residual: (R, cols) rows with R dividing x's rows, row r of x adding row r % R (the cpu
  // kernels' rule: a residual broadcast over the batch is read in place)
  int64_t residual_rows = rows;
  if (residual.has_value()) {
    check_like(*residual, x, "residual", "x");
    residual_rows = residual->dim() == 2 ? residual->size(0) : 0;
    TORCH_CHECK_VALUE(residual->dim() == 2 && residual->size(1) == cols && residual_rows > 0 &&
                          rows % residual_rows == 0,
                      "residual must have shape (R, ", cols, ") with R dividing x's ", rows,
                      " rows, got ", shape_str(residual->sizes()));
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor w = float_vector(weight, cols, x, "weight");
  const at::Tensor b = float_vector(bias, cols, x, "bias");
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  c10::optional<at::Tensor> xb;
  if (x_bias.has_value()) xb = float_vector(*x_bias, cols, x, "x_bias");
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, x);

  at::Tensor y = at::empty_like(x);
  c10::optional<at::Tensor> z, mean, rstd;
  if (save_for_backward) {
    z = at::empty_like(x);
    mean = at::empty({rows}, x.options().dtype(at::kFloat));
    rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  }
  check_launch(cuda::residual_layernorm_forward(
                   dtype, x.data_ptr(), ptr_or_null<const void>(residual), residual_rows,
                   ptr_or_null<const float>(xb), w.data_ptr<float>(), b.data_ptr<float>(),
                   y.data_ptr(), ptr_or_null(z), ptr_or_null<float>(mean),
                   ptr_or_null<float>(rstd), rows, cols, static_cast<float>(eps),
                   static_cast<float>(dropout_p), rng, c10::cuda::getCurrentCUDAStream()),
               "residual_layernorm_fwd");
  return {y, z, mean, rstd};
}

MaybeTensors residual_layernorm_bwd(const at::Tensor& dy, const at::Tensor& z,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& dropout_rng,
                                    double dropout_p, const at::Tensor& mean,
                                    const at::Tensor& rstd, std::vector<bool> needs) {
  check_cuda(z, "z");
  const DType dtype = kernel_dtype(z, "z");
  check_like(dy, z, "grad_out", "z");
  check_shape(dy, z.sizes(), "grad_out");
  const int64_t* rng = dropout_rng_ptr(dropout_rng, dropout_p, z);
  TORCH_CHECK_VALUE(needs.size() == 5,
                    "needs must hold 5 flags (dx, dresidual, dweight, dbias, dx_bias), got ",
                    needs.size());
  const bool need_dresidual = needs[1], need_dweight = needs[2], need_dbias = needs[3];
  const bool need_dx_bias = needs[4];
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t cols = z.size(-1);
  const int64_t rows = z.numel() / cols;
  auto check_row_stat = [&](const at::Tensor& t, const char* name) {
    check_cuda(t, name);
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
    check_shape(t, {rows}, name);
  };
  check_row_stat(mean, "mean");
  check_row_stat(rstd, "rstd");
  const at::Tensor w = float_vector(weight, cols, z, "weight");

  at::Tensor dx = at::empty_like(z);
  c10::optional<at::Tensor> dresidual, dweight, dbias, dx_bias;
  const auto fopts = z.options().dtype(at::kFloat);
  if (need_dresidual) dresidual = at::empty_like(z);
  if (need_dweight) dweight = at::empty({cols}, fopts);
  if (need_dbias) dbias = at::empty({cols}, fopts);
  if (need_dx_bias) dx_bias = at::empty({cols}, fopts);
  at::Tensor workspace = at::empty(
      {static_cast<int64_t>(cuda::residual_layernorm_backward_workspace(rows, cols))}, fopts);
  check_launch(cuda::residual_layernorm_backward(
                   dtype, dy.data_ptr(), z.data_ptr(), w.data_ptr<float>(),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr(),
                   ptr_or_null(dresidual), ptr_or_null<float>(dweight),
                   ptr_or_null<float>(dbias), ptr_or_null<float>(dx_bias),
                   workspace.data_ptr<float>(), rows, cols, static_cast<float>(dropout_p), rng,
                   c10::cuda::getCurrentCUDAStream()),
               "residual_layernorm_bwd");
  // dx is always computed (the other gradients derive from it), returned only if asked for
  return {needs[0] ? c10::optional<at::Tensor>(dx) : c10::nullopt, dresidual, dweight, dbias,
          dx_bias};
}

}  // namespace cuda_ops
}  // namespace distilbert_fast
