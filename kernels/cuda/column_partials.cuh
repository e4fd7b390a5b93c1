// Column sums over rows, in two steps that need no atomics (so results are deterministic):
// a grid of (column blocks) x (row blocks) where each thread walks its rows for VEC adjacent
// columns and the block's row-threads are then summed in shared memory into one partial row per
// row block; impl::sum_partials adds the partial rows up.
#pragma once

#include "common.cuh"

namespace distilbert_fast {
namespace cuda {

constexpr int kColThreads = 32;  // threadIdx.x: adjacent column groups, so loads coalesce
constexpr int kRowThreads = 8;   // threadIdx.y: rows

inline dim3 column_grid(int64_t rows, int64_t cols, int vec) {
  return dim3(static_cast<unsigned>(ceil_div(cols, int64_t{kColThreads} * vec)),
              static_cast<unsigned>(column_partial_blocks(rows)));
}

// op(row, col0, acc) adds row `row`'s contribution to columns [col0, col0 + VEC) into
// acc[s][i], for each of the NSUM sums. partials: float[NSUM][gridDim.y][cols], or null when
// only op's side effects are wanted.
template <int VEC, int NSUM, typename Op>
__device__ __forceinline__ void column_partials(int64_t rows, int64_t cols, const Op& op,
                                                float* partials) {
  __shared__ float red[kRowThreads][NSUM][kColThreads * VEC];
  const int64_t col0 = (static_cast<int64_t>(blockIdx.x) * kColThreads + threadIdx.x) * VEC;
  float acc[NSUM][VEC];
#pragma unroll
  for (int s = 0; s < NSUM; ++s)
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[s][i] = 0.f;
  if (col0 < cols) {
    for (int64_t r = static_cast<int64_t>(blockIdx.y) * kRowThreads + threadIdx.y; r < rows;
         r += static_cast<int64_t>(gridDim.y) * kRowThreads)
      op(r, col0, acc);
  }
  if (partials == nullptr) return;  // uniform over the block: no thread waits below
#pragma unroll
  for (int s = 0; s < NSUM; ++s)
#pragma unroll
    for (int i = 0; i < VEC; ++i) red[threadIdx.y][s][threadIdx.x * VEC + i] = acc[s][i];
  __syncthreads();
  if (threadIdx.y != 0 || col0 >= cols) return;
#pragma unroll
  for (int s = 0; s < NSUM; ++s) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      float total = 0.f;
#pragma unroll
      for (int t = 0; t < kRowThreads; ++t) total += red[t][s][threadIdx.x * VEC + i];
      partials[(static_cast<int64_t>(s) * gridDim.y + blockIdx.y) * cols + col0 + i] = total;
    }
  }
}

}  // namespace cuda
}  // namespace distilbert_fast
