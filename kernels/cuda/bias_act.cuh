// bias + activation, forward and backward: y = act(x + bias), dx = dy * act'(x + bias),
// dbias = sum over rows of dx. Formulas mirror distilbert_fast/ops/eager.py.
#pragma once

#include <algorithm>
#include <cmath>

#include "column_partials.cuh"
#include "impl.h"

namespace distilbert_fast {
namespace cuda {

template <Activation A>
struct Act;

template <>
struct Act<Activation::kGelu> {  // exact GELU, erf form
  static __device__ __forceinline__ float f(float z) {
    return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
  }
  static __device__ __forceinline__ float df(float z) {
    const float cdf = 0.5f * (1.f + erff(z * 0.70710678118654752f));
    const float pdf = expf(-0.5f * z * z) * 0.39894228040143268f;
    return cdf + z * pdf;
  }
};

template <>
struct Act<Activation::kGeluNew> {  // tanh approximation (HuggingFace's NewGELUActivation)
  static constexpr float kA = 0.79788456080286536f;  // sqrt(2 / pi)
  static constexpr float kB = 0.044715f;
  static __device__ __forceinline__ float f(float z) {
    return 0.5f * z * (1.f + tanhf(kA * (z + kB * z * z * z)));
  }
  static __device__ __forceinline__ float df(float z) {
    const float t = tanhf(kA * (z + kB * z * z * z));
    return 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * kA * (1.f + 3.f * kB * z * z);
  }
};

template <>
struct Act<Activation::kRelu> {
  static __device__ __forceinline__ float f(float z) { return z > 0.f ? z : 0.f; }
  static __device__ __forceinline__ float df(float z) { return z > 0.f ? 1.f : 0.f; }
};

template <>
struct Act<Activation::kSilu> {
  static __device__ __forceinline__ float f(float z) { return z / (1.f + expf(-z)); }
  static __device__ __forceinline__ float df(float z) {
    const float s = 1.f / (1.f + expf(-z));
    return s * (1.f + z * (1.f - s));
  }
};

// x, y: [rows, cols]; bias: [cols] or null. One thread per VEC adjacent elements of a row
// (cols % VEC == 0), grid-stride.
template <typename T, Activation A, int VEC>
__global__ void bias_act_fwd_kernel(const T* __restrict__ x, const T* __restrict__ bias,
                                    T* __restrict__ y, int64_t rows, int64_t cols) {
  const int64_t n_vec = rows * cols / VEC;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < n_vec;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = v * VEC;
    float z[VEC];
    load_float<T, VEC>(x + e, z);
    if (bias != nullptr) {
      float b[VEC];
      load_float<T, VEC>(bias + e % cols, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += b[i];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) z[i] = Act<A>::f(z[i]);
    store_float<T, VEC>(y + e, z);
  }
}

// dy, x, dx: [rows, cols]; partials: float[gridDim.y][cols] or null (no dbias wanted).
template <typename T, Activation A, int VEC>
__global__ void __launch_bounds__(kColThreads* kRowThreads)
    bias_act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ x,
                        const T* __restrict__ bias, T* __restrict__ dx, float* partials,
                        int64_t rows, int64_t cols) {
  auto op = [&](int64_t r, int64_t c0, float(&acc)[1][VEC]) {
    const int64_t e = r * cols + c0;
    float z[VEC], g[VEC];
    load_float<T, VEC>(x + e, z);
    load_float<T, VEC>(dy + e, g);
    if (bias != nullptr) {
      float b[VEC];
      load_float<T, VEC>(bias + c0, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += b[i];
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      g[i] *= Act<A>::df(z[i]);
      acc[0][i] += g[i];  // dbias sums the float dz, before rounding to T
    }
    store_float<T, VEC>(dx + e, g);
  };
  column_partials<VEC, 1>(rows, cols, op, partials);
}

namespace impl {

template <typename T, Activation A>
cudaError_t bias_act_forward_act(const T* x, const T* bias, T* y, int64_t rows, int64_t cols,
                                 cudaStream_t stream) {
  constexpr int kVec = vec16<T>();
  constexpr int kThreads = 256;
  const bool vec = cols % kVec == 0 && aligned16(x) && aligned16(y) &&
                   (bias == nullptr || aligned16(bias));
  const int64_t n_vec = rows * cols / (vec ? kVec : 1);
  // grid-stride: a few waves' worth of blocks is enough, more only adds scheduling
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(n_vec, kThreads), 65535));
  if (blocks == 0) return cudaSuccess;
  if (vec)
    bias_act_fwd_kernel<T, A, kVec><<<blocks, kThreads, 0, stream>>>(x, bias, y, rows, cols);
  else
    bias_act_fwd_kernel<T, A, 1><<<blocks, kThreads, 0, stream>>>(x, bias, y, rows, cols);
  return cudaGetLastError();
}

template <typename T, Activation A>
cudaError_t bias_act_backward_act(const T* dy, const T* x, const T* bias, T* dx, float* dbias,
                                  float* workspace, int64_t rows, int64_t cols,
                                  cudaStream_t stream) {
  if (rows == 0 || cols == 0) {
    if (dbias != nullptr) return cudaMemsetAsync(dbias, 0, sizeof(float) * cols, stream);
    return cudaSuccess;
  }
  constexpr int kVec = vec16<T>();
  const bool vec = cols % kVec == 0 && aligned16(x) && aligned16(dy) && aligned16(dx) &&
                   (bias == nullptr || aligned16(bias));
  float* partials = dbias != nullptr ? workspace : nullptr;
  const dim3 block(kColThreads, kRowThreads);
  const dim3 grid = column_grid(rows, cols, vec ? kVec : 1);
  if (vec)
    bias_act_bwd_kernel<T, A, kVec><<<grid, block, 0, stream>>>(dy, x, bias, dx, partials, rows, cols);
  else
    bias_act_bwd_kernel<T, A, 1><<<grid, block, 0, stream>>>(dy, x, bias, dx, partials, rows, cols);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || dbias == nullptr) return err;
  return sum_partials(partials, static_cast<int>(grid.y), cols, dbias, stream);
}

template <typename T>
cudaError_t bias_activation_forward(Activation act, const T* x, const T* bias, T* y, int64_t rows,
                                    int64_t cols, cudaStream_t stream) {
  switch (act) {
#define DBF_CASE(A) \
    case A: return bias_act_forward_act<T, A>(x, bias, y, rows, cols, stream);
    DBF_CASE(Activation::kGelu)
    DBF_CASE(Activation::kGeluNew)
    DBF_CASE(Activation::kRelu)
    DBF_CASE(Activation::kSilu)
#undef DBF_CASE
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t bias_activation_backward(Activation act, const T* dy, const T* x, const T* bias, T* dx,
                                     float* dbias, float* workspace, int64_t rows, int64_t cols,
                                     cudaStream_t stream) {
  switch (act) {
#define DBF_CASE(A) \
    case A: return bias_act_backward_act<T, A>(dy, x, bias, dx, dbias, workspace, rows, cols, stream);
    DBF_CASE(Activation::kGelu)
    DBF_CASE(Activation::kGeluNew)
    DBF_CASE(Activation::kRelu)
    DBF_CASE(Activation::kSilu)
#undef DBF_CASE
  }
  return cudaErrorInvalidValue;
}

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast

#define DBF_INSTANTIATE_BIAS_ACT(T)                                                              \
  template cudaError_t distilbert_fast::cuda::impl::bias_activation_forward<T>(                  \
      distilbert_fast::cuda::Activation, const T*, const T*, T*, int64_t, int64_t, cudaStream_t); \
  template cudaError_t distilbert_fast::cuda::impl::bias_activation_backward<T>(                 \
      distilbert_fast::cuda::Activation, const T*, const T*, const T*, T*, float*, float*,       \
      int64_t, int64_t, cudaStream_t);
