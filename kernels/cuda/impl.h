// Internal: the per-dtype host functions each <op>_<dtype>.cu instantiates, and the dtype switch
// dispatch.cu uses to reach them. Parameters mirror distilbert_kernels.h with typed pointers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "distilbert_kernels.h"

namespace distilbert_fast {
namespace cuda {
namespace impl {

template <typename T>
cudaError_t residual_layernorm_forward(const T* x, const T* residual, int64_t residual_rows,
                                       const float* x_bias, const float* weight, const float* bias,
                                       T* y, T* z_out, float* mean, float* rstd, int64_t rows,
                                       int64_t cols, float eps, float dropout_p,
                                       const int64_t* dropout_rng, cudaStream_t stream);

template <typename T>
cudaError_t residual_layernorm_backward(const T* dy, const T* z, const float* weight,
                                        const float* mean, const float* rstd, T* dx, T* dresidual,
                                        float* dweight, float* dbias, float* dx_bias,
                                        float* workspace, int64_t rows, int64_t cols,
                                        float dropout_p, const int64_t* dropout_rng,
                                        cudaStream_t stream);

template <typename T>
cudaError_t bias_activation_forward(Activation act, const T* x, const T* bias, T* y, int64_t rows,
                                    int64_t cols, cudaStream_t stream);

template <typename T>
cudaError_t bias_activation_backward(Activation act, const T* dy, const T* x, const T* bias, T* dx,
                                     float* dbias, float* workspace, int64_t rows, int64_t cols,
                                     cudaStream_t stream);

template <typename T>
cudaError_t attention_forward(const T* q, const T* k, const T* v, const bool* key_padding_mask,
                              const float* head_mask, T* out, float* lse, const AttnLayout& layout,
                              int batch, int heads, int head_dim, float scale, float dropout_p,
                              const int64_t* dropout_rng, cudaStream_t stream);

template <typename T>
cudaError_t attention_backward(const T* q, const T* k, const T* v, const T* out, const T* dout,
                               const bool* key_padding_mask, const float* head_mask,
                               const float* lse, T* dq, T* dk, T* dv, float* delta,
                               float* dhead_rows, const AttnLayout& layout, int batch, int heads,
                               int head_dim, float scale, float dropout_p,
                               const int64_t* dropout_rng, cudaStream_t stream);

// out[c] = sum_p partials[p * cols + c] for c < cols (one launch); out may not be null.
cudaError_t sum_partials(const float* partials, int parts, int64_t cols, float* out,
                         cudaStream_t stream);

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast
