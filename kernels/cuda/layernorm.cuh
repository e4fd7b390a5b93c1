// residual + LayerNorm, forward and backward, one row per warp (four rows per 128-thread block).
//   z = dropout(x + x_bias) + residual,  y = (z - mean) * rstd * weight + bias
// Backward (distilbert_fast/ops/eager.py's formulas), per row with xhat = (z - mean) * rstd:
//   dz = rstd * (dy*w - mean(dy*w) - xhat * mean(dy*w * xhat)),  dx = dz * keep / (1 - p)
// and the column sums dweight = sum dy*xhat, dbias = sum dy, dx_bias = sum dx.
//
// kCols > 0 specialises a hidden size (768): each lane keeps its kCols/32 values in registers
// between passes. kCols == 0 takes any size and re-reads the row instead. VEC adjacent elements
// per lane per step: the 16-byte width when every row starts 16-byte aligned, else 1.
#pragma once

#include "column_partials.cuh"
#include "impl.h"

namespace distilbert_fast {
namespace cuda {

constexpr int kLnWarps = 4;  // rows per block

template <int kCols, int VEC>
struct RowSteps {
  static_assert(kCols % (kWarp * VEC) == 0, "specialised sizes fill every lane's vectors");
  static constexpr int kCached = kCols > 0 ? kCols / (kWarp * VEC) : 1;  // register slots
  static __device__ __forceinline__ int count(int cols) {
    return kCols > 0 ? kCached : static_cast<int>(ceil_div_dev(cols, kWarp * VEC));
  }
  static __device__ __forceinline__ int64_t ceil_div_dev(int64_t a, int64_t b) {
    return (a + b - 1) / b;
  }
};

template <typename T, int kCols, int VEC>
__global__ void __launch_bounds__(kLnWarps* kWarp)
    ln_fwd_kernel(const T* __restrict__ x, const T* __restrict__ residual, int64_t residual_rows,
                  const float* __restrict__ x_bias, const float* __restrict__ weight,
                  const float* __restrict__ bias, T* __restrict__ y, T* __restrict__ z_out,
                  float* __restrict__ mean_out, float* __restrict__ rstd_out, int64_t rows,
                  int cols_rt, float eps, float dropout_p,
                  const int64_t* __restrict__ dropout_rng) {
  using Steps = RowSteps<kCols, VEC>;
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLnWarps + threadIdx.x / kWarp;
  if (row >= rows) return;  // the whole warp leaves together
  const int cols = kCols > 0 ? kCols : cols_rt;
  const int steps = Steps::count(cols);
  const int64_t base = row * cols;
  const int64_t residual_base = residual != nullptr ? row % residual_rows * cols : 0;  // row r % R
  const float keep_scale = 1.f / (1.f - dropout_p);

  // z for the VEC elements at column c of this row
  auto load_z = [&](int c, float(&z)[VEC]) {
    load_float<T, VEC>(x + base + c, z);
    if (x_bias != nullptr) {
      float b[VEC];
      load_float<float, VEC>(x_bias + c, b);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += b[i];
    }
    if (dropout_p > 0.f) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        z[i] = dropout_keep(rng, static_cast<uint64_t>(base + c + i), dropout_p) ? z[i] * keep_scale : 0.f;
    }
    if (residual != nullptr) {
      float r[VEC];
      load_float<T, VEC>(residual + residual_base + c, r);
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] += r[i];
    }
  };
  float cache[Steps::kCached][VEC];
  auto get_z = [&](int s, int c, float(&z)[VEC]) {
    if constexpr (kCols > 0) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) z[i] = cache[s][i];
    } else {
      load_z(c, z);
    }
  };

  float sum = 0.f;
#pragma unroll
  for (int s = 0; s < steps; ++s) {
    const int c = (s * kWarp + lane) * VEC;
    if (c >= cols) break;
    float z[VEC];
    load_z(c, z);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      sum += z[i];
      if constexpr (kCols > 0) cache[s][i] = z[i];
    }
  }
  const float mean = warp_sum(sum) / cols;
  float sq = 0.f;  // two-pass variance: no cancellation
#pragma unroll
  for (int s = 0; s < steps; ++s) {
    const int c = (s * kWarp + lane) * VEC;
    if (c >= cols) break;
    float z[VEC];
    get_z(s, c, z);
#pragma unroll
    for (int i = 0; i < VEC; ++i) sq += (z[i] - mean) * (z[i] - mean);
  }
  const float rstd = rsqrtf(warp_sum(sq) / cols + eps);
#pragma unroll
  for (int s = 0; s < steps; ++s) {
    const int c = (s * kWarp + lane) * VEC;
    if (c >= cols) break;
    float z[VEC], w[VEC], b[VEC], out[VEC];
    get_z(s, c, z);
    load_float<float, VEC>(weight + c, w);
    load_float<float, VEC>(bias + c, b);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = (z[i] - mean) * rstd * w[i] + b[i];
    store_float<T, VEC>(y + base + c, out);
    if (z_out != nullptr) store_float<T, VEC>(z_out + base + c, z);
  }
  if (lane == 0 && mean_out != nullptr) {
    mean_out[row] = mean;
    rstd_out[row] = rstd;
  }
}

// Row pass of the backward: dx, dresidual, and the row constants c1 = mean(dy*w),
// c2 = mean(dy*w * xhat) that the column pass needs (row_consts: float[2][rows] or null).
template <typename T, int kCols, int VEC>
__global__ void __launch_bounds__(kLnWarps* kWarp)
    ln_bwd_rows_kernel(const T* __restrict__ dy, const T* __restrict__ z,
                       const float* __restrict__ weight, const float* __restrict__ mean_in,
                       const float* __restrict__ rstd_in, T* __restrict__ dx,
                       T* __restrict__ dresidual, float* __restrict__ row_consts, int64_t rows,
                       int cols_rt, float dropout_p, const int64_t* __restrict__ dropout_rng) {
  using Steps = RowSteps<kCols, VEC>;
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);
  const int lane = threadIdx.x % kWarp;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kLnWarps + threadIdx.x / kWarp;
  if (row >= rows) return;
  const int cols = kCols > 0 ? kCols : cols_rt;
  const int steps = Steps::count(cols);
  const int64_t base = row * cols;
  const float mean = mean_in[row], rstd = rstd_in[row];

  auto load_terms = [&](int c, float(&dxhat)[VEC], float(&xhat)[VEC]) {
    float w[VEC];
    load_float<T, VEC>(z + base + c, xhat);
    load_float<T, VEC>(dy + base + c, dxhat);
    load_float<float, VEC>(weight + c, w);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xhat[i] = (xhat[i] - mean) * rstd;
      dxhat[i] *= w[i];
    }
  };
  float cache_dxhat[Steps::kCached][VEC], cache_xhat[Steps::kCached][VEC];

  float s1 = 0.f, s2 = 0.f;
#pragma unroll
  for (int s = 0; s < steps; ++s) {
    const int c = (s * kWarp + lane) * VEC;
    if (c >= cols) break;
    float dxhat[VEC], xhat[VEC];
    load_terms(c, dxhat, xhat);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      s1 += dxhat[i];
      s2 += dxhat[i] * xhat[i];
      if constexpr (kCols > 0) {
        cache_dxhat[s][i] = dxhat[i];
        cache_xhat[s][i] = xhat[i];
      }
    }
  }
  const float c1 = warp_sum(s1) / cols, c2 = warp_sum(s2) / cols;
  const float keep_scale = 1.f / (1.f - dropout_p);
#pragma unroll
  for (int s = 0; s < steps; ++s) {
    const int c = (s * kWarp + lane) * VEC;
    if (c >= cols) break;
    float dxhat[VEC], xhat[VEC], dz[VEC];
    if constexpr (kCols > 0) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        dxhat[i] = cache_dxhat[s][i];
        xhat[i] = cache_xhat[s][i];
      }
    } else {
      load_terms(c, dxhat, xhat);
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) dz[i] = rstd * (dxhat[i] - c1 - xhat[i] * c2);
    if (dresidual != nullptr) store_float<T, VEC>(dresidual + base + c, dz);
    if (dropout_p > 0.f) {
#pragma unroll
      for (int i = 0; i < VEC; ++i)
        dz[i] = dropout_keep(rng, static_cast<uint64_t>(base + c + i), dropout_p) ? dz[i] * keep_scale : 0.f;
    }
    store_float<T, VEC>(dx + base + c, dz);
  }
  if (lane == 0 && row_consts != nullptr) {
    row_consts[row] = c1;
    row_consts[rows + row] = c2;
  }
}

// Column pass of the backward: partial sums of dy*xhat, dy and dx (recomputed in float from the
// row constants, not read back rounded) per row block. partials: float[3][gridDim.y][cols].
template <typename T, int VEC>
__global__ void __launch_bounds__(kColThreads* kRowThreads)
    ln_bwd_cols_kernel(const T* __restrict__ dy, const T* __restrict__ z,
                       const float* __restrict__ weight, const float* __restrict__ mean_in,
                       const float* __restrict__ rstd_in, const float* __restrict__ row_consts,
                       float* partials, int64_t rows, int64_t cols, float dropout_p,
                       const int64_t* __restrict__ dropout_rng) {
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);
  const float keep_scale = 1.f / (1.f - dropout_p);
  auto op = [&](int64_t r, int64_t c0, float(&acc)[3][VEC]) {
    const int64_t e = r * cols + c0;
    float g[VEC], xhat[VEC], w[VEC];
    load_float<T, VEC>(dy + e, g);
    load_float<T, VEC>(z + e, xhat);
    load_float<float, VEC>(weight + c0, w);
    const float mean = mean_in[r], rstd = rstd_in[r];
    const float c1 = row_consts[r], c2 = row_consts[rows + r];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      xhat[i] = (xhat[i] - mean) * rstd;
      float dh = rstd * (g[i] * w[i] - c1 - xhat[i] * c2);
      if (dropout_p > 0.f)
        dh = dropout_keep(rng, static_cast<uint64_t>(e + i), dropout_p) ? dh * keep_scale : 0.f;
      acc[0][i] += g[i] * xhat[i];
      acc[1][i] += g[i];
      acc[2][i] += dh;
    }
  };
  column_partials<VEC, 3>(rows, cols, op, partials);
}

namespace impl {

constexpr int kSpecialisedCols = 768;  // DistilBERT's hidden size

template <typename T>
cudaError_t residual_layernorm_forward(const T* x, const T* residual, int64_t residual_rows,
                                       const float* x_bias, const float* weight, const float* bias,
                                       T* y, T* z_out, float* mean, float* rstd, int64_t rows,
                                       int64_t cols, float eps, float dropout_p,
                                       const int64_t* dropout_rng, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  constexpr int kVec = vec16<T>();
  const bool vec = cols % kVec == 0 && aligned16(x) && aligned16(y) && aligned16(weight) &&
                   aligned16(bias) && (residual == nullptr || aligned16(residual)) &&
                   (x_bias == nullptr || aligned16(x_bias)) && (z_out == nullptr || aligned16(z_out));
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kLnWarps));
  const int c = static_cast<int>(cols);
#define DBF_LAUNCH(KCOLS, V)                                                                    \
  ln_fwd_kernel<T, KCOLS, V><<<blocks, kLnWarps * kWarp, 0, stream>>>(                          \
      x, residual, residual_rows, x_bias, weight, bias, y, z_out, mean, rstd, rows, c, eps,       \
      dropout_p, dropout_rng)
  if (vec && cols == kSpecialisedCols)
    DBF_LAUNCH(kSpecialisedCols, kVec);
  else if (vec)
    DBF_LAUNCH(0, kVec);
  else
    DBF_LAUNCH(0, 1);
#undef DBF_LAUNCH
  return cudaGetLastError();
}

template <typename T>
cudaError_t residual_layernorm_backward(const T* dy, const T* z, const float* weight,
                                        const float* mean, const float* rstd, T* dx, T* dresidual,
                                        float* dweight, float* dbias, float* dx_bias,
                                        float* workspace, int64_t rows, int64_t cols,
                                        float dropout_p, const int64_t* dropout_rng,
                                        cudaStream_t stream) {
  const bool want_cols = dweight != nullptr || dbias != nullptr || dx_bias != nullptr;
  if (rows == 0) {  // empty sums are zero
    for (float* out : {dweight, dbias, dx_bias}) {
      if (out == nullptr) continue;
      const cudaError_t err = cudaMemsetAsync(out, 0, sizeof(float) * cols, stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  constexpr int kVec = vec16<T>();
  const bool vec = cols % kVec == 0 && aligned16(dy) && aligned16(z) && aligned16(dx) &&
                   aligned16(weight) && (dresidual == nullptr || aligned16(dresidual));
  const int parts = column_partial_blocks(rows);
  float* partials = workspace;
  float* row_consts = want_cols ? workspace + static_cast<int64_t>(3) * parts * cols : nullptr;
  const unsigned blocks = static_cast<unsigned>(ceil_div(rows, kLnWarps));
  const int c = static_cast<int>(cols);
#define DBF_LAUNCH(KCOLS, V)                                                                    \
  ln_bwd_rows_kernel<T, KCOLS, V><<<blocks, kLnWarps * kWarp, 0, stream>>>(                     \
      dy, z, weight, mean, rstd, dx, dresidual, row_consts, rows, c, dropout_p, dropout_rng)
  if (vec && cols == kSpecialisedCols)
    DBF_LAUNCH(kSpecialisedCols, kVec);
  else if (vec)
    DBF_LAUNCH(0, kVec);
  else
    DBF_LAUNCH(0, 1);
#undef DBF_LAUNCH
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !want_cols) return err;

  const dim3 block(kColThreads, kRowThreads);
  const dim3 grid = column_grid(rows, cols, vec ? kVec : 1);
  if (vec)
    ln_bwd_cols_kernel<T, kVec><<<grid, block, 0, stream>>>(
        dy, z, weight, mean, rstd, row_consts, partials, rows, cols, dropout_p, dropout_rng);
  else
    ln_bwd_cols_kernel<T, 1><<<grid, block, 0, stream>>>(
        dy, z, weight, mean, rstd, row_consts, partials, rows, cols, dropout_p, dropout_rng);
  err = cudaGetLastError();
  float* outs[3] = {dweight, dbias, dx_bias};
  for (int s = 0; s < 3 && err == cudaSuccess; ++s) {
    if (outs[s] != nullptr)
      err = sum_partials(partials + static_cast<int64_t>(s) * parts * cols, parts, cols, outs[s], stream);
  }
  return err;
}

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast

#define DBF_INSTANTIATE_LAYERNORM(T)                                                           \
  template cudaError_t distilbert_fast::cuda::impl::residual_layernorm_forward<T>(             \
      const T*, const T*, int64_t, const float*, const float*, const float*, T*, T*, float*,   \
      float*, int64_t, int64_t, float, float, const int64_t*, cudaStream_t);                   \
  template cudaError_t distilbert_fast::cuda::impl::residual_layernorm_backward<T>(            \
      const T*, const T*, const float*, const float*, const float*, T*, T*, float*, float*,    \
      float*, float*, int64_t, int64_t, float, const int64_t*, cudaStream_t);
