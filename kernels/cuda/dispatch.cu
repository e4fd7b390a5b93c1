// The public entry points of distilbert_kernels.h: switch on the dtype and call the typed
// implementation that one of the <op>_<dtype>.cu files instantiates. Also the shared
// partial-sum reduction.
#include "common.cuh"
#include "impl.h"

namespace distilbert_fast {
namespace cuda {

#define DBF_DISPATCH_DTYPE(dtype, T, ...)                    \
  switch (dtype) {                                           \
    case DType::kFloat32: {                                  \
      using T = float;                                       \
      return __VA_ARGS__;                                    \
    }                                                        \
    case DType::kFloat16: {                                  \
      using T = __half;                                      \
      return __VA_ARGS__;                                    \
    }                                                        \
    case DType::kBFloat16: {                                 \
      using T = __nv_bfloat16;                               \
      return __VA_ARGS__;                                    \
    }                                                        \
  }                                                          \
  return cudaErrorInvalidValue;

int column_partial_blocks(int64_t rows) {
  // Enough row blocks to fill the GPU, few enough that the second step is cheap.
  const int64_t blocks = ceil_div(rows, 64);
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 256 ? 256 : blocks));
}

size_t residual_layernorm_backward_workspace(int64_t rows, int64_t cols) {
  // 3 partial sums per column and row block, then 2 per-row constants of the dz formula
  return static_cast<size_t>(3 * column_partial_blocks(rows) * cols + 2 * rows);
}

size_t bias_activation_backward_workspace(int64_t rows, int64_t cols) {
  return static_cast<size_t>(column_partial_blocks(rows) * cols);
}

cudaError_t residual_layernorm_forward(DType dtype, const void* x, const void* residual,
                                       int64_t residual_rows, const float* x_bias,
                                       const float* weight, const float* bias, void* y,
                                       void* z_out, float* mean, float* rstd, int64_t rows,
                                       int64_t cols, float eps, float dropout_p,
                                       const int64_t* dropout_rng, cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::residual_layernorm_forward<T>(
                         static_cast<const T*>(x), static_cast<const T*>(residual), residual_rows,
                         x_bias, weight, bias, static_cast<T*>(y), static_cast<T*>(z_out), mean,
                         rstd, rows, cols, eps, dropout_p, dropout_rng, stream))
}

cudaError_t residual_layernorm_backward(DType dtype, const void* dy, const void* z,
                                        const float* weight, const float* mean, const float* rstd,
                                        void* dx, void* dresidual, float* dweight, float* dbias,
                                        float* dx_bias, float* workspace, int64_t rows,
                                        int64_t cols, float dropout_p,
                                        const int64_t* dropout_rng, cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::residual_layernorm_backward<T>(
                         static_cast<const T*>(dy), static_cast<const T*>(z), weight, mean, rstd,
                         static_cast<T*>(dx), static_cast<T*>(dresidual), dweight, dbias, dx_bias,
                         workspace, rows, cols, dropout_p, dropout_rng, stream))
}

cudaError_t bias_activation_forward(DType dtype, Activation act, const void* x, const void* bias,
                                    void* y, int64_t rows, int64_t cols, cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::bias_activation_forward<T>(act, static_cast<const T*>(x),
                                                      static_cast<const T*>(bias),
                                                      static_cast<T*>(y), rows, cols, stream))
}

cudaError_t bias_activation_backward(DType dtype, Activation act, const void* dy, const void* x,
                                     const void* bias, void* dx, float* dbias, float* workspace,
                                     int64_t rows, int64_t cols, cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::bias_activation_backward<T>(
                         act, static_cast<const T*>(dy), static_cast<const T*>(x),
                         static_cast<const T*>(bias), static_cast<T*>(dx), dbias, workspace, rows,
                         cols, stream))
}

cudaError_t attention_forward(DType dtype, const void* q, const void* k, const void* v,
                              const bool* key_padding_mask, const float* head_mask, void* out,
                              float* lse, const AttnLayout& layout, int batch, int heads,
                              int head_dim, float scale, float dropout_p,
                              const int64_t* dropout_rng, cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::attention_forward<T>(
                         static_cast<const T*>(q), static_cast<const T*>(k),
                         static_cast<const T*>(v), key_padding_mask, head_mask,
                         static_cast<T*>(out), lse, layout, batch, heads, head_dim, scale,
                         dropout_p, dropout_rng, stream))
}

cudaError_t attention_backward(DType dtype, const void* q, const void* k, const void* v,
                               const void* out, const void* dout, const bool* key_padding_mask,
                               const float* head_mask, const float* lse, void* dq, void* dk,
                               void* dv, float* delta, float* dhead_rows,
                               const AttnLayout& layout, int batch, int heads, int head_dim,
                               float scale, float dropout_p, const int64_t* dropout_rng,
                               cudaStream_t stream) {
  DBF_DISPATCH_DTYPE(dtype, T,
                     impl::attention_backward<T>(
                         static_cast<const T*>(q), static_cast<const T*>(k),
                         static_cast<const T*>(v), static_cast<const T*>(out),
                         static_cast<const T*>(dout), key_padding_mask, head_mask, lse,
                         static_cast<T*>(dq), static_cast<T*>(dk), static_cast<T*>(dv), delta,
                         dhead_rows, layout, batch, heads, head_dim, scale, dropout_p,
                         dropout_rng, stream))
}

namespace impl {

__global__ void sum_partials_kernel(const float* __restrict__ partials, int parts, int64_t cols,
                                    float* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float total = 0.f;
  for (int p = 0; p < parts; ++p) total += partials[p * cols + c];
  out[c] = total;
}

cudaError_t sum_partials(const float* partials, int parts, int64_t cols, float* out,
                         cudaStream_t stream) {
  constexpr int kThreads = 256;
  sum_partials_kernel<<<static_cast<unsigned>(ceil_div(cols, kThreads)), kThreads, 0, stream>>>(
      partials, parts, cols, out);
  return cudaGetLastError();
}

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast
