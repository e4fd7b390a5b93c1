// Masked multi-head attention, forward and backward, without materialising the score matrix.
//
// Layout: q, k, v, out: [batch, heads, seq, head_dim]. Each kernel gives a block kAttnWarps
// warps; a warp owns kRowsPerWarp "rows" (query rows in the forward and the dq pass, key rows in
// the dk/dv pass) whose vectors sit in shared memory, and walks the other side in tiles of 32
// "columns" staged in shared memory, lane c taking column c of the tile. Each lane also owns the
// head_dim entries d = lane + 32*i of its rows' accumulators. Everything runs in float32.
//
// Semantics (distilbert_fast/ops/eager.py): scores s = q.k * scale; masked keys get probability
// 0, except that a row whose keys are ALL masked attends uniformly to every key (eager fills
// masked scores with the same lowest value); probabilities P = softmax(s); weights
// W = P * keep/(1-p) * head_mask; out = W v.
// Backward, with dW = dout . v_j and Dm = keep/(1-p):
//   dv_j = sum_i W_ij dout_i;  dS_ij = P_ij (dW_ij hm Dm_ij - delta_i), delta_i = dout_i . out_i
//   (= sum_j P_ij dW_ij hm Dm_ij); dS = 0 on masked scores (fully-masked rows included);
//   dq_i = scale sum_j dS_ij k_j;  dk_j = scale sum_i dS_ij q_i;
//   dhead_mask[h] = sum_{b,i,j} P_ij Dm_ij dW_ij (written per row, summed by the caller).
#pragma once

#include <cmath>
#include <initializer_list>

#include "common.cuh"
#include "impl.h"

namespace distilbert_fast {
namespace cuda {

constexpr int kAttnWarps = 4;
constexpr int kRowsPerWarp = 4;
constexpr int kBlockRows = kAttnWarps * kRowsPerWarp;
constexpr int kTile = kWarp;  // columns per tile: one per lane

// Head-dim handling: kD > 0 is a compile-time head_dim (64); kD == 0 any head_dim <= kMaxHeadDim.
template <int kD>
struct HeadDim {
  static_assert(kD >= 0 && kD <= kMaxHeadDim, "head_dim out of range");
  static constexpr int kChunks = kD > 0 ? (kD + kWarp - 1) / kWarp : kMaxHeadDim / kWarp;
  static __device__ __forceinline__ int get(int rt) { return kD > 0 ? kD : rt; }
};

// Copies `rows` rows of `dim` contiguous elements (src, rows * dim elements) into float shared
// memory with row stride `stride`, zero-filling rows in [valid, rows). vec: 16-byte loads
// (src 16-byte aligned and dim a multiple of the 16-byte width).
template <typename T>
__device__ __forceinline__ void stage_rows(float* dst, int stride, const T* src, int rows,
                                           int valid, int dim, bool vec) {
  constexpr int kV = vec16<T>();
  const int total = rows * dim;
  if (vec) {
    for (int e = threadIdx.x * kV; e < total; e += blockDim.x * kV) {
      const int r = e / dim, d = e % dim;  // dim % kV == 0: a vector stays in one row
      float vals[kV];
      if (r < valid) {
        load_float<T, kV>(src + e, vals);
      } else {
#pragma unroll
        for (int i = 0; i < kV; ++i) vals[i] = 0.f;
      }
#pragma unroll
      for (int i = 0; i < kV; ++i) dst[r * stride + d + i] = vals[i];
    }
  } else {
    for (int e = threadIdx.x; e < total; e += blockDim.x) {
      const int r = e / dim, d = e % dim;
      dst[r * stride + d] = r < valid ? to_float(src[e]) : 0.f;
    }
  }
}

// Whether any key of this batch row is unmasked (true without a mask). Block-wide.
__device__ __forceinline__ bool any_key_valid(const bool* mask_row, int seq) {
  if (mask_row == nullptr) return true;
  int any = 0;
  for (int j = threadIdx.x; j < seq; j += blockDim.x) any |= mask_row[j] ? 1 : 0;
  return __syncthreads_or(any) != 0;
}

// -- forward -----------------------------------------------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attn_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const bool* __restrict__ mask, const float* __restrict__ head_mask,
                    T* __restrict__ out, float* __restrict__ lse, int heads, int seq, int dim_rt,
                    float scale, float dropout_p, uint64_t seed, bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const int row0 = blockIdx.x * kBlockRows;
  const int64_t head_base = bh * seq * D;  // element offset of this (batch, head)
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);  // every key masked: attend to all
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);

  extern __shared__ float smem[];
  float* s_q = smem;                             // [kBlockRows][D]
  float* s_k = s_q + kBlockRows * D;             // [kTile][D + 1]
  float* s_v = s_k + kTile * (D + 1);            // [kTile][D + 1]
  stage_rows(s_q, D, q + head_base + static_cast<int64_t>(row0) * D, kBlockRows,
             min(kBlockRows, seq - row0), D, vec);

  float m[kRowsPerWarp], l[kRowsPerWarp], acc[kRowsPerWarp][kC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[r][c] = 0.f;
  }

  for (int j0 = 0; j0 < seq; j0 += kTile) {
    __syncthreads();  // the previous tile is consumed (and s_q is staged, the first time)
    const int valid_cols = min(kTile, seq - j0);
    stage_rows(s_k, D + 1, k + head_base + static_cast<int64_t>(j0) * D, kTile, valid_cols, D, vec);
    stage_rows(s_v, D + 1, v + head_base + static_cast<int64_t>(j0) * D, kTile, valid_cols, D, vec);
    __syncthreads();

    const int j = j0 + lane;
    const bool valid = j < seq && (uniform || mask_row == nullptr || mask_row[j]);
    float s[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = s_k[lane * (D + 1) + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) s[r] += s_q[(warp * kRowsPerWarp + r) * D + d] * kd;
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      // all scores of a fully-masked row are equal in eager: any constant gives its uniform
      const float score = !valid ? -INFINITY : (uniform ? 0.f : s[r] * scale);
      const float m_new = fmaxf(m[r], warp_max(score));
      // m_new is finite once any valid key was seen; until then nothing has accumulated
      const float alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - m_new);
      const float p = valid ? expf(score - m_new) : 0.f;
      l[r] = l[r] * alpha + warp_sum(p);
      m[r] = m_new;
      float w = p;
      const int i = row0 + warp * kRowsPerWarp + r;
      if (dropout_p > 0.f) {
        const uint64_t index = (static_cast<uint64_t>(bh) * seq + i) * seq + j;
        w = (i < seq && dropout_keep(seed, index, dropout_p)) ? w * keep_scale : 0.f;
      }
#pragma unroll
      for (int c = 0; c < kC; ++c) acc[r][c] *= alpha;
      for (int t = 0; t < valid_cols; ++t) {
        const float wt = __shfl_sync(0xffffffffu, w, t);
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          const int d = lane + c * kWarp;
          if (d < D) acc[r][c] += wt * s_v[t * (D + 1) + d];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + warp * kRowsPerWarp + r;
    if (i >= seq) continue;
    const float norm = hm / l[r];
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) out[head_base + static_cast<int64_t>(i) * D + d] = from_float<T>(acc[r][c] * norm);
    }
    if (lse != nullptr && lane == 0) lse[bh * seq + i] = m[r] + logf(l[r]);
  }
}

// -- backward, dq pass: rows are queries, columns keys -------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ out, const T* __restrict__ dout,
                       const bool* __restrict__ mask, const float* __restrict__ head_mask,
                       const float* __restrict__ lse, T* __restrict__ dq,
                       float* __restrict__ delta, float* __restrict__ dhead_rows, int heads,
                       int seq, int dim_rt, float scale, float dropout_p, uint64_t seed,
                       bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const int row0 = blockIdx.x * kBlockRows;
  const int64_t head_base = bh * seq * D;
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);

  extern __shared__ float smem[];
  float* s_q = smem;                        // [kBlockRows][D]
  float* s_do = s_q + kBlockRows * D;       // [kBlockRows][D]
  float* s_k = s_do + kBlockRows * D;       // [kTile][D + 1]
  float* s_v = s_k + kTile * (D + 1);       // [kTile][D + 1]
  const int valid_rows = min(kBlockRows, seq - row0);
  stage_rows(s_q, D, q + head_base + static_cast<int64_t>(row0) * D, kBlockRows, valid_rows, D, vec);
  stage_rows(s_do, D, dout + head_base + static_cast<int64_t>(row0) * D, kBlockRows, valid_rows, D, vec);
  __syncthreads();

  float row_lse[kRowsPerWarp], row_delta[kRowsPerWarp], acc[kRowsPerWarp][kC], dh[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + warp * kRowsPerWarp + r;
    float part = 0.f;  // delta_i = dout_i . out_i
    if (i < seq) {
#pragma unroll
      for (int c = 0; c < kC; ++c) {
        const int d = lane + c * kWarp;
        if (d < D)
          part += s_do[(warp * kRowsPerWarp + r) * D + d] *
                  to_float(out[head_base + static_cast<int64_t>(i) * D + d]);
      }
    }
    row_delta[r] = warp_sum(part);
    row_lse[r] = i < seq ? lse[bh * seq + i] : 0.f;
    if (i < seq && lane == 0) delta[bh * seq + i] = row_delta[r];
    dh[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[r][c] = 0.f;
  }

  for (int j0 = 0; j0 < seq; j0 += kTile) {
    __syncthreads();
    const int valid_cols = min(kTile, seq - j0);
    stage_rows(s_k, D + 1, k + head_base + static_cast<int64_t>(j0) * D, kTile, valid_cols, D, vec);
    stage_rows(s_v, D + 1, v + head_base + static_cast<int64_t>(j0) * D, kTile, valid_cols, D, vec);
    __syncthreads();

    const int j = j0 + lane;
    const bool valid = j < seq && (uniform || mask_row == nullptr || mask_row[j]);
    float s[kRowsPerWarp], dw[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dw[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float kd = s_k[lane * (D + 1) + d], vd = s_v[lane * (D + 1) + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] += s_q[(warp * kRowsPerWarp + r) * D + d] * kd;
        dw[r] += s_do[(warp * kRowsPerWarp + r) * D + d] * vd;
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int i = row0 + warp * kRowsPerWarp + r;
      const float score = uniform ? 0.f : s[r] * scale;
      const float p = (valid && i < seq) ? expf(score - row_lse[r]) : 0.f;
      float dm = 1.f;
      if (dropout_p > 0.f) {
        const uint64_t index = (static_cast<uint64_t>(bh) * seq + i) * seq + j;
        dm = dropout_keep(seed, index, dropout_p) ? keep_scale : 0.f;
      }
      dh[r] += p * dm * dw[r];
      const float ds = uniform ? 0.f : p * (dw[r] * hm * dm - row_delta[r]) * scale;
      for (int t = 0; t < valid_cols; ++t) {
        const float dst = __shfl_sync(0xffffffffu, ds, t);
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          const int d = lane + c * kWarp;
          if (d < D) acc[r][c] += dst * s_k[t * (D + 1) + d];
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int i = row0 + warp * kRowsPerWarp + r;
    const float dh_row = warp_sum(dh[r]);
    if (i >= seq) continue;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) dq[head_base + static_cast<int64_t>(i) * D + d] = from_float<T>(acc[r][c]);
    }
    if (dhead_rows != nullptr && lane == 0) dhead_rows[bh * seq + i] = dh_row;
  }
}

// -- backward, dk/dv pass: rows are keys, columns queries ----------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attn_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const bool* __restrict__ mask,
                        const float* __restrict__ head_mask, const float* __restrict__ lse,
                        const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                        int heads, int seq, int dim_rt, float scale, float dropout_p,
                        uint64_t seed, bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.y;
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const int row0 = blockIdx.x * kBlockRows;
  const int64_t head_base = bh * seq * D;
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);

  extern __shared__ float smem[];
  float* s_k = smem;                        // [kBlockRows][D]
  float* s_v = s_k + kBlockRows * D;        // [kBlockRows][D]
  float* s_q = s_v + kBlockRows * D;        // [kTile][D + 1]
  float* s_do = s_q + kTile * (D + 1);      // [kTile][D + 1]
  const int valid_rows = min(kBlockRows, seq - row0);
  stage_rows(s_k, D, k + head_base + static_cast<int64_t>(row0) * D, kBlockRows, valid_rows, D, vec);
  stage_rows(s_v, D, v + head_base + static_cast<int64_t>(row0) * D, kBlockRows, valid_rows, D, vec);

  bool key_valid[kRowsPerWarp];
  float dk_acc[kRowsPerWarp][kC], dv_acc[kRowsPerWarp][kC];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = row0 + warp * kRowsPerWarp + r;
    key_valid[r] = j < seq && (uniform || mask_row == nullptr || mask_row[j]);
#pragma unroll
    for (int c = 0; c < kC; ++c) dk_acc[r][c] = dv_acc[r][c] = 0.f;
  }

  for (int i0 = 0; i0 < seq; i0 += kTile) {
    __syncthreads();
    const int valid_cols = min(kTile, seq - i0);
    stage_rows(s_q, D + 1, q + head_base + static_cast<int64_t>(i0) * D, kTile, valid_cols, D, vec);
    stage_rows(s_do, D + 1, dout + head_base + static_cast<int64_t>(i0) * D, kTile, valid_cols, D, vec);
    __syncthreads();

    const int i = i0 + lane;
    const bool query_valid = i < seq;
    const float i_lse = query_valid ? lse[bh * seq + i] : 0.f;
    const float i_delta = query_valid ? delta[bh * seq + i] : 0.f;
    float s[kRowsPerWarp], dw[kRowsPerWarp];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) s[r] = dw[r] = 0.f;
    for (int d = 0; d < D; ++d) {
      const float qd = s_q[lane * (D + 1) + d], dod = s_do[lane * (D + 1) + d];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        s[r] += s_k[(warp * kRowsPerWarp + r) * D + d] * qd;
        dw[r] += s_v[(warp * kRowsPerWarp + r) * D + d] * dod;
      }
    }
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int j = row0 + warp * kRowsPerWarp + r;
      const float score = uniform ? 0.f : s[r] * scale;
      const float p = (key_valid[r] && query_valid) ? expf(score - i_lse) : 0.f;
      float dm = 1.f;
      if (dropout_p > 0.f) {
        const uint64_t index = (static_cast<uint64_t>(bh) * seq + i) * seq + j;
        dm = dropout_keep(seed, index, dropout_p) ? keep_scale : 0.f;
      }
      const float w = p * dm * hm;
      const float ds = uniform ? 0.f : p * (dw[r] * hm * dm - i_delta) * scale;
      for (int t = 0; t < valid_cols; ++t) {
        const float wt = __shfl_sync(0xffffffffu, w, t);
        const float dst = __shfl_sync(0xffffffffu, ds, t);
#pragma unroll
        for (int c = 0; c < kC; ++c) {
          const int d = lane + c * kWarp;
          if (d < D) {
            dv_acc[r][c] += wt * s_do[t * (D + 1) + d];
            dk_acc[r][c] += dst * s_q[t * (D + 1) + d];
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const int j = row0 + warp * kRowsPerWarp + r;
    if (j >= seq) continue;
#pragma unroll
    for (int c = 0; c < kC; ++c) {
      const int d = lane + c * kWarp;
      if (d < D) {
        dk[head_base + static_cast<int64_t>(j) * D + d] = from_float<T>(dk_acc[r][c]);
        dv[head_base + static_cast<int64_t>(j) * D + d] = from_float<T>(dv_acc[r][c]);
      }
    }
  }
}

// -- host side ---------------------------------------------------------------------------------
namespace impl {

constexpr int kSpecialisedHeadDim = 64;  // DistilBERT: 768 / 12 heads

// Launches kernel (templated on <T, kD>) with head_dim specialised to 64 where it is 64.
// Shared memory beyond the default 48 KiB (head_dim near 128) must be opted into per kernel.
template <typename Kernel, typename... Args>
cudaError_t launch_attn(Kernel kernel, dim3 grid, size_t smem, cudaStream_t stream, Args... args) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(
        kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, kAttnWarps * kWarp, smem, stream>>>(args...);
  return cudaGetLastError();
}

inline bool attn_vec_ok(int head_dim, int elem_bytes, std::initializer_list<const void*> ptrs) {
  if ((head_dim * elem_bytes) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

template <typename T>
cudaError_t attention_forward(const T* q, const T* k, const T* v, const bool* key_padding_mask,
                              const float* head_mask, T* out, float* lse, int batch, int heads,
                              int seq, int head_dim, float scale, float dropout_p, uint64_t seed,
                              cudaStream_t stream) {
  if (batch == 0 || heads == 0 || seq == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const bool vec = attn_vec_ok(head_dim, sizeof(T), {q, k, v});
  const dim3 grid(static_cast<unsigned>(ceil_div(seq, kBlockRows)),
                  static_cast<unsigned>(static_cast<int64_t>(batch) * heads));
  const size_t smem = sizeof(float) * (kBlockRows * head_dim + 2 * kTile * (head_dim + 1));
  if (head_dim == kSpecialisedHeadDim)
    return launch_attn(attn_fwd_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                       key_padding_mask, head_mask, out, lse, heads, seq, head_dim, scale,
                       dropout_p, seed, vec);
  return launch_attn(attn_fwd_kernel<T, 0>, grid, smem, stream, q, k, v, key_padding_mask,
                     head_mask, out, lse, heads, seq, head_dim, scale, dropout_p, seed, vec);
}

template <typename T>
cudaError_t attention_backward(const T* q, const T* k, const T* v, const T* out, const T* dout,
                               const bool* key_padding_mask, const float* head_mask,
                               const float* lse, T* dq, T* dk, T* dv, float* delta,
                               float* dhead_rows, int batch, int heads, int seq, int head_dim,
                               float scale, float dropout_p, uint64_t seed, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || seq == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const bool vec = attn_vec_ok(head_dim, sizeof(T), {q, k, v, dout});
  const dim3 grid(static_cast<unsigned>(ceil_div(seq, kBlockRows)),
                  static_cast<unsigned>(static_cast<int64_t>(batch) * heads));
  const size_t smem = sizeof(float) * (2 * kBlockRows * head_dim + 2 * kTile * (head_dim + 1));
  cudaError_t err;
  // dq first: it also writes delta, which the dk/dv pass reads
  if (head_dim == kSpecialisedHeadDim)
    err = launch_attn(attn_bwd_dq_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                      out, dout, key_padding_mask, head_mask, lse, dq, delta, dhead_rows, heads,
                      seq, head_dim, scale, dropout_p, seed, vec);
  else
    err = launch_attn(attn_bwd_dq_kernel<T, 0>, grid, smem, stream, q, k, v, out, dout,
                      key_padding_mask, head_mask, lse, dq, delta, dhead_rows, heads, seq,
                      head_dim, scale, dropout_p, seed, vec);
  if (err != cudaSuccess) return err;
  if (head_dim == kSpecialisedHeadDim)
    return launch_attn(attn_bwd_dkv_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                       dout, key_padding_mask, head_mask, lse,
                       static_cast<const float*>(delta), dk, dv, heads, seq, head_dim, scale,
                       dropout_p, seed, vec);
  return launch_attn(attn_bwd_dkv_kernel<T, 0>, grid, smem, stream, q, k, v, dout,
                     key_padding_mask, head_mask, lse, static_cast<const float*>(delta), dk, dv,
                     heads, seq, head_dim, scale, dropout_p, seed, vec);
}

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast

#define DBF_INSTANTIATE_ATTENTION_FORWARD(T)                                                  \
  template cudaError_t distilbert_fast::cuda::impl::attention_forward<T>(                     \
      const T*, const T*, const T*, const bool*, const float*, T*, float*, int, int, int, int, \
      float, float, uint64_t, cudaStream_t);
#define DBF_INSTANTIATE_ATTENTION_BACKWARD(T)                                                  \
  template cudaError_t distilbert_fast::cuda::impl::attention_backward<T>(                     \
      const T*, const T*, const T*, const T*, const T*, const bool*, const float*,             \
      const float*, T*, T*, T*, float*, float*, int, int, int, int, float, float, uint64_t,    \
      cudaStream_t);
