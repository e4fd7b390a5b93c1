// Masked multi-head attention, forward and backward, without materialising the score matrix.
//
// Layout (AttnLayout, distilbert_kernels.h): padded, q, k, v, out: [batch, heads, seq, head_dim];
// or varlen, sequence b being tokens cu_seqlens[b] .. cu_seqlens[b + 1] of (total, heads,
// head_dim) tensors (q, k, v with any token and head strides). The kernels see one (sequence,
// head) at a time through SeqRows; blocks past a shorter sequence's end leave at once. Each
// kernel gives a block kAttnWarps
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

// One (sequence, head): its number of tokens and the element offsets of its token 0 in q, k, v
// ("in"), in out, dout, dq, dk, dv ("out") and in the per-row statistics ("stat").
struct SeqRows {
  int len;
  int64_t in, out, stat;
};

__device__ __forceinline__ SeqRows seq_rows(AttnLayout L, int b, int h) {
  int start = 0, len = L.seq;
  if (L.cu_seqlens != nullptr) {
    start = L.cu_seqlens[b];
    len = L.cu_seqlens[b + 1] - start;
  }
  return SeqRows{len, b * L.in_batch + h * L.in_head + start * L.in_token,
                 b * L.out_batch + h * L.out_head + start * L.out_token,
                 b * L.stat_batch + h * L.stat_head + start};
}

// Dropout's element index of (query i, key j) in (batch, head) bh: unique over a padded
// (batch, heads, seq, seq) score tensor (varlen: seq = max_seqlen), as the eager layout counts.
__device__ __forceinline__ uint64_t dropout_index(int seq, int64_t bh, int i, int j) {
  return (static_cast<uint64_t>(bh) * seq + i) * seq + j;
}

// Copies `rows` rows of `dim` contiguous elements (row r at src + r * src_stride) into float
// shared memory with row stride `stride`, zero-filling rows in [valid, rows). vec: 16-byte loads
// (src 16-byte aligned, dim and src_stride multiples of the 16-byte width).
template <typename T>
__device__ __forceinline__ void stage_rows(float* dst, int stride, const T* src,
                                           int64_t src_stride, int rows, int valid, int dim,
                                           bool vec) {
  constexpr int kV = vec16<T>();
  const int total = rows * dim;
  if (vec) {
    for (int e = threadIdx.x * kV; e < total; e += blockDim.x * kV) {
      const int r = e / dim, d = e % dim;  // dim % kV == 0: a vector stays in one row
      float vals[kV];
      if (r < valid) {
        load_float<T, kV>(src + r * src_stride + d, vals);
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
      dst[r * stride + d] = r < valid ? to_float(src[r * src_stride + d]) : 0.f;
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
                    T* __restrict__ out, float* __restrict__ lse, AttnLayout L, int heads,
                    int dim_rt, float scale, float dropout_p,
                    const int64_t* __restrict__ dropout_rng, bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.x;  // (batch, head): grid.x, which holds 2^31 - 1 blocks
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const SeqRows S = seq_rows(L, b, h);
  const int seq = S.len;
  const int row0 = blockIdx.y * kBlockRows;
  if (row0 >= seq) return;  // the whole block: past a shorter sequence's end
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);  // every key masked: attend to all
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);

  extern __shared__ float smem[];
  float* s_q = smem;                             // [kBlockRows][D]
  float* s_k = s_q + kBlockRows * D;             // [kTile][D + 1]
  float* s_v = s_k + kTile * (D + 1);            // [kTile][D + 1]
  stage_rows(s_q, D, q + S.in + row0 * L.in_token, L.in_token, kBlockRows,
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
    stage_rows(s_k, D + 1, k + S.in + j0 * L.in_token, L.in_token, kTile, valid_cols, D, vec);
    stage_rows(s_v, D + 1, v + S.in + j0 * L.in_token, L.in_token, kTile, valid_cols, D, vec);
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
        const bool keep = i < seq && dropout_keep(rng, dropout_index(L.seq, bh, i, j), dropout_p);
        w = keep ? w * keep_scale : 0.f;
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
      if (d < D) out[S.out + i * L.out_token + d] = from_float<T>(acc[r][c] * norm);
    }
    if (lse != nullptr && lane == 0) lse[S.stat + i] = m[r] + logf(l[r]);
  }
}

// -- backward, dq pass: rows are queries, columns keys -------------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attn_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ out, const T* __restrict__ dout,
                       const bool* __restrict__ mask, const float* __restrict__ head_mask,
                       const float* __restrict__ lse, T* __restrict__ dq,
                       float* __restrict__ delta, float* __restrict__ dhead_rows, AttnLayout L,
                       int heads, int dim_rt, float scale, float dropout_p,
                       const int64_t* __restrict__ dropout_rng, bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.x;  // (batch, head): grid.x, which holds 2^31 - 1 blocks
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const SeqRows S = seq_rows(L, b, h);
  const int seq = S.len;
  const int row0 = blockIdx.y * kBlockRows;
  if (row0 >= seq) return;  // the whole block: past a shorter sequence's end
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);

  extern __shared__ float smem[];
  float* s_q = smem;                        // [kBlockRows][D]
  float* s_do = s_q + kBlockRows * D;       // [kBlockRows][D]
  float* s_k = s_do + kBlockRows * D;       // [kTile][D + 1]
  float* s_v = s_k + kTile * (D + 1);       // [kTile][D + 1]
  const int valid_rows = min(kBlockRows, seq - row0);
  stage_rows(s_q, D, q + S.in + row0 * L.in_token, L.in_token, kBlockRows, valid_rows, D, vec);
  stage_rows(s_do, D, dout + S.out + row0 * L.out_token, L.out_token, kBlockRows, valid_rows, D,
             vec);
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
                  to_float(out[S.out + i * L.out_token + d]);
      }
    }
    row_delta[r] = warp_sum(part);
    row_lse[r] = i < seq ? lse[S.stat + i] : 0.f;
    if (i < seq && lane == 0) delta[S.stat + i] = row_delta[r];
    dh[r] = 0.f;
#pragma unroll
    for (int c = 0; c < kC; ++c) acc[r][c] = 0.f;
  }

  for (int j0 = 0; j0 < seq; j0 += kTile) {
    __syncthreads();
    const int valid_cols = min(kTile, seq - j0);
    stage_rows(s_k, D + 1, k + S.in + j0 * L.in_token, L.in_token, kTile, valid_cols, D, vec);
    stage_rows(s_v, D + 1, v + S.in + j0 * L.in_token, L.in_token, kTile, valid_cols, D, vec);
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
      if (dropout_p > 0.f)
        dm = dropout_keep(rng, dropout_index(L.seq, bh, i, j), dropout_p) ? keep_scale : 0.f;
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
      if (d < D) dq[S.out + i * L.out_token + d] = from_float<T>(acc[r][c]);
    }
    if (dhead_rows != nullptr && lane == 0) dhead_rows[S.stat + i] = dh_row;
  }
}

// -- backward, dk/dv pass: rows are keys, columns queries ----------------------------------------
template <typename T, int kD>
__global__ void __launch_bounds__(kAttnWarps* kWarp)
    attn_bwd_dkv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const T* __restrict__ dout, const bool* __restrict__ mask,
                        const float* __restrict__ head_mask, const float* __restrict__ lse,
                        const float* __restrict__ delta, T* __restrict__ dk, T* __restrict__ dv,
                        AttnLayout L, int heads, int dim_rt, float scale, float dropout_p,
                        const int64_t* __restrict__ dropout_rng, bool vec) {
  using HD = HeadDim<kD>;
  constexpr int kC = HD::kChunks;
  const int D = HD::get(dim_rt);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t bh = blockIdx.x;  // (batch, head): grid.x, which holds 2^31 - 1 blocks
  const int b = static_cast<int>(bh / heads), h = static_cast<int>(bh % heads);
  const SeqRows S = seq_rows(L, b, h);
  const int seq = S.len;
  const int row0 = blockIdx.y * kBlockRows;
  if (row0 >= seq) return;  // the whole block: past a shorter sequence's end
  const bool* mask_row = mask == nullptr ? nullptr : mask + static_cast<int64_t>(b) * seq;
  const bool uniform = !any_key_valid(mask_row, seq);
  const float hm = head_mask == nullptr ? 1.f : head_mask[h];
  const float keep_scale = 1.f / (1.f - dropout_p);
  const DropoutRng rng = load_dropout_rng(dropout_p > 0.f ? dropout_rng : nullptr);

  extern __shared__ float smem[];
  float* s_k = smem;                        // [kBlockRows][D]
  float* s_v = s_k + kBlockRows * D;        // [kBlockRows][D]
  float* s_q = s_v + kBlockRows * D;        // [kTile][D + 1]
  float* s_do = s_q + kTile * (D + 1);      // [kTile][D + 1]
  const int valid_rows = min(kBlockRows, seq - row0);
  stage_rows(s_k, D, k + S.in + row0 * L.in_token, L.in_token, kBlockRows, valid_rows, D, vec);
  stage_rows(s_v, D, v + S.in + row0 * L.in_token, L.in_token, kBlockRows, valid_rows, D, vec);

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
    stage_rows(s_q, D + 1, q + S.in + i0 * L.in_token, L.in_token, kTile, valid_cols, D, vec);
    stage_rows(s_do, D + 1, dout + S.out + i0 * L.out_token, L.out_token, kTile, valid_cols, D,
               vec);
    __syncthreads();

    const int i = i0 + lane;
    const bool query_valid = i < seq;
    const float i_lse = query_valid ? lse[S.stat + i] : 0.f;
    const float i_delta = query_valid ? delta[S.stat + i] : 0.f;
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
      if (dropout_p > 0.f)
        dm = dropout_keep(rng, dropout_index(L.seq, bh, i, j), dropout_p) ? keep_scale : 0.f;
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
        dk[S.out + j * L.out_token + d] = from_float<T>(dk_acc[r][c]);
        dv[S.out + j * L.out_token + d] = from_float<T>(dv_acc[r][c]);
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

// 16-byte row loads: every row start of every tensor 16-byte aligned.
inline bool attn_vec_ok(const AttnLayout& L, int head_dim, int elem_bytes,
                        std::initializer_list<const void*> ptrs) {
  for (int64_t n : {static_cast<int64_t>(head_dim), L.in_batch, L.in_head, L.in_token,
                    L.out_batch, L.out_head, L.out_token})
    if ((n * elem_bytes) % 16 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

// x: the (batch, head) pairs, up to 2^31 - 1 (a packed batch of thousands of short sequences, a
// CUDA graph's static rows); y: the row blocks, at most 65535 (kMaxAttnSeq rows).
static_assert(static_cast<int64_t>(kBlockRows) * 65535 == kMaxAttnSeq, "grid.y covers kMaxAttnSeq");
inline dim3 attn_grid(const AttnLayout& L, int batch, int heads) {
  return dim3(static_cast<unsigned>(static_cast<int64_t>(batch) * heads),
              static_cast<unsigned>(ceil_div(L.seq, kBlockRows)));
}

template <typename T>
cudaError_t attention_forward(const T* q, const T* k, const T* v, const bool* key_padding_mask,
                              const float* head_mask, T* out, float* lse, const AttnLayout& layout,
                              int batch, int heads, int head_dim, float scale, float dropout_p,
                              const int64_t* dropout_rng, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || layout.seq == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const bool vec = attn_vec_ok(layout, head_dim, sizeof(T), {q, k, v, out});
  const dim3 grid = attn_grid(layout, batch, heads);
  const size_t smem = sizeof(float) * (kBlockRows * head_dim + 2 * kTile * (head_dim + 1));
  if (head_dim == kSpecialisedHeadDim)
    return launch_attn(attn_fwd_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                       key_padding_mask, head_mask, out, lse, layout, heads, head_dim, scale,
                       dropout_p, dropout_rng, vec);
  return launch_attn(attn_fwd_kernel<T, 0>, grid, smem, stream, q, k, v, key_padding_mask,
                     head_mask, out, lse, layout, heads, head_dim, scale, dropout_p, dropout_rng,
                     vec);
}

template <typename T>
cudaError_t attention_backward(const T* q, const T* k, const T* v, const T* out, const T* dout,
                               const bool* key_padding_mask, const float* head_mask,
                               const float* lse, T* dq, T* dk, T* dv, float* delta,
                               float* dhead_rows, const AttnLayout& layout, int batch, int heads,
                               int head_dim, float scale, float dropout_p,
                               const int64_t* dropout_rng, cudaStream_t stream) {
  if (batch == 0 || heads == 0 || layout.seq == 0 || head_dim == 0) return cudaSuccess;
  if (head_dim > kMaxHeadDim) return cudaErrorInvalidValue;
  const bool vec = attn_vec_ok(layout, head_dim, sizeof(T), {q, k, v, out, dout});
  const dim3 grid = attn_grid(layout, batch, heads);
  const size_t smem = sizeof(float) * (2 * kBlockRows * head_dim + 2 * kTile * (head_dim + 1));
  cudaError_t err;
  // dq first: it also writes delta, which the dk/dv pass reads
  if (head_dim == kSpecialisedHeadDim)
    err = launch_attn(attn_bwd_dq_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                      out, dout, key_padding_mask, head_mask, lse, dq, delta, dhead_rows, layout,
                      heads, head_dim, scale, dropout_p, dropout_rng, vec);
  else
    err = launch_attn(attn_bwd_dq_kernel<T, 0>, grid, smem, stream, q, k, v, out, dout,
                      key_padding_mask, head_mask, lse, dq, delta, dhead_rows, layout, heads,
                      head_dim, scale, dropout_p, dropout_rng, vec);
  if (err != cudaSuccess) return err;
  const float* delta_in = delta;
  if (head_dim == kSpecialisedHeadDim)
    return launch_attn(attn_bwd_dkv_kernel<T, kSpecialisedHeadDim>, grid, smem, stream, q, k, v,
                       dout, key_padding_mask, head_mask, lse, delta_in, dk, dv, layout, heads,
                       head_dim, scale, dropout_p, dropout_rng, vec);
  return launch_attn(attn_bwd_dkv_kernel<T, 0>, grid, smem, stream, q, k, v, dout,
                     key_padding_mask, head_mask, lse, delta_in, dk, dv, layout, heads, head_dim,
                     scale, dropout_p, dropout_rng, vec);
}

}  // namespace impl
}  // namespace cuda
}  // namespace distilbert_fast

#define DBF_INSTANTIATE_ATTENTION_FORWARD(T)                                                  \
  template cudaError_t distilbert_fast::cuda::impl::attention_forward<T>(                     \
      const T*, const T*, const T*, const bool*, const float*, T*, float*,                    \
      const distilbert_fast::cuda::AttnLayout&, int, int, int, float, float, const int64_t*,   \
      cudaStream_t);
#define DBF_INSTANTIATE_ATTENTION_BACKWARD(T)                                                  \
  template cudaError_t distilbert_fast::cuda::impl::attention_backward<T>(                     \
      const T*, const T*, const T*, const T*, const T*, const bool*, const float*,             \
      const float*, T*, T*, T*, float*, float*, const distilbert_fast::cuda::AttnLayout&, int,  \
      int, int, float, float, const int64_t*, cudaStream_t);
