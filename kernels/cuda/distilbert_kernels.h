// Host-side API of the raw CUDA kernels: plain C++ (pointers, sizes, a stream), no torch.
//
// Every function launches on `stream` and returns the launch's cudaError_t (cudaSuccess, or the
// error of the first launch that failed). Shapes are not re-checked here: callers (csrc/cuda)
// validate them. Tensors are contiguous, row-major. "T" below means the element type named by
// `dtype` (float, __half or __nv_bfloat16); every kernel accumulates in float32.
//
// Dropout uses a counter-based hash of (seed, offset + element index), so a backward pass
// regenerates the forward's keep mask instead of storing it. `dropout_rng` is a device pointer to
// int64[2] {seed, offset}, read by the kernels (not the host), so a CUDA graph that also captures
// the call drawing them gets fresh masks on every replay; null when dropout_p is 0.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace distilbert_fast {
namespace cuda {

enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum class Activation { kGelu = 0, kGeluNew = 1, kRelu = 2, kSilu = 3 };

// Largest head_dim the attention kernels take.
constexpr int kMaxHeadDim = 128;
// Largest seq (padded) or max_seqlen (varlen) the attention kernels take: 65535 blocks of 16 rows
// on the grid's y. batch * heads may be up to 2^31 - 1 (the grid's x).
constexpr int64_t kMaxAttnSeq = 65535LL * 16;

// Column sums (dbias, dweight) are reduced in two steps: each of `column_partial_blocks(rows)`
// row blocks writes one partial row of float sums, then a second kernel adds those rows up.
int column_partial_blocks(int64_t rows);

// -- residual + LayerNorm ----------------------------------------------------------------------
// y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias over rows of `cols`.
//   x, y, z_out (nullable): T[rows, cols]; residual (nullable): T[residual_rows, cols], row r of
//   x adding residual row r % residual_rows (a residual broadcast over the batch, read in place)
//   x_bias (nullable), weight, bias: float[cols]
//   z_out, mean, rstd (float[rows]): what the backward needs; all three null in inference.
cudaError_t residual_layernorm_forward(DType dtype, const void* x, const void* residual,
                                       int64_t residual_rows, const float* x_bias,
                                       const float* weight, const float* bias, void* y,
                                       void* z_out, float* mean, float* rstd, int64_t rows,
                                       int64_t cols, float eps, float dropout_p,
                                       const int64_t* dropout_rng, cudaStream_t stream);

// Floats of scratch residual_layernorm_backward needs.
size_t residual_layernorm_backward_workspace(int64_t rows, int64_t cols);

// Given dy = dL/dy and the forward's z, mean, rstd:
//   dresidual = dz (nullable), dx = dz * keep / (1 - p)  (T[rows, cols])
//   dweight = sum_rows dy * xhat, dbias = sum_rows dy, dx_bias = sum_rows dx (float[cols], each
//   nullable). workspace: residual_layernorm_backward_workspace(rows, cols) floats.
cudaError_t residual_layernorm_backward(DType dtype, const void* dy, const void* z,
                                        const float* weight, const float* mean, const float* rstd,
                                        void* dx, void* dresidual, float* dweight, float* dbias,
                                        float* dx_bias, float* workspace, int64_t rows,
                                        int64_t cols, float dropout_p,
                                        const int64_t* dropout_rng, cudaStream_t stream);

// -- bias + activation -------------------------------------------------------------------------
// y = act(x + bias); x, y: T[rows, cols]; bias: T[cols] or null.
cudaError_t bias_activation_forward(DType dtype, Activation act, const void* x, const void* bias,
                                    void* y, int64_t rows, int64_t cols, cudaStream_t stream);

// Floats of scratch bias_activation_backward needs when dbias is wanted.
size_t bias_activation_backward_workspace(int64_t rows, int64_t cols);

// dx = dy * act'(x + bias) (T[rows, cols]); dbias = sum_rows dx (float[cols], nullable).
cudaError_t bias_activation_backward(DType dtype, Activation act, const void* dy, const void* x,
                                     const void* bias, void* dx, float* dbias, float* workspace,
                                     int64_t rows, int64_t cols, cudaStream_t stream);

// -- attention ---------------------------------------------------------------------------------
// Where attention's rows live, in elements. Two layouts share the kernels:
// - padded: q, k, v, out (and dout, dq, dk, dv): T[batch, heads, seq, head_dim] contiguous, every
//   sequence seq long; per-row statistics float[batch, heads, seq];
// - varlen: sequence b is tokens cu_seqlens[b] .. cu_seqlens[b + 1] (int32[batch + 1], device) of
//   (total, heads, head_dim) tensors, q, k, v with any token and head strides (e.g. views of one
//   fused QKV GEMM output), out, dout, dq, dk, dv contiguous; statistics float[heads, total]. Each
//   sequence attends to its own tokens; seq is max_seqlen (it sizes the grid).
struct AttnLayout {
  const int* cu_seqlens;                   // varlen, or null (padded)
  int seq;                                 // padded length, or max_seqlen
  int64_t in_batch, in_head, in_token;     // strides of q, k, v
  int64_t out_batch, out_head, out_token;  // of out, dout, dq, dk, dv
  int64_t stat_batch, stat_head;           // of lse, delta, dhead_rows (token stride 1)
};

inline AttnLayout padded_attention_layout(int heads, int seq, int head_dim) {
  const int64_t batch_stride = static_cast<int64_t>(heads) * seq * head_dim;
  const int64_t head_stride = static_cast<int64_t>(seq) * head_dim;
  return AttnLayout{nullptr,     seq,          batch_stride, head_stride,
                    head_dim,    batch_stride, head_stride,  head_dim,
                    static_cast<int64_t>(heads) * seq, seq};
}

inline AttnLayout varlen_attention_layout(const int* cu_seqlens, int max_seqlen, int64_t total,
                                          int heads, int head_dim, int64_t in_token,
                                          int64_t in_head) {
  return AttnLayout{cu_seqlens, max_seqlen, 0, in_head, in_token, 0, head_dim,
                    static_cast<int64_t>(heads) * head_dim, 0, total};
}

// head_dim <= kMaxHeadDim; seq <= kMaxAttnSeq; batch * heads <= 2^31 - 1.
// key_padding_mask (padded layout only): bool[batch, seq] (true = attend) or null; head_mask:
// float[heads] or null. out = (softmax(q k^T * scale, masked) . dropout) * head_mask @ v; a row
// whose keys are all masked attends uniformly to every key. lse: per row (query), the
// log-sum-exp of its scores, for the backward (nullable in inference).
cudaError_t attention_forward(DType dtype, const void* q, const void* k, const void* v,
                              const bool* key_padding_mask, const float* head_mask, void* out,
                              float* lse, const AttnLayout& layout, int batch, int heads,
                              int head_dim, float scale, float dropout_p,
                              const int64_t* dropout_rng, cudaStream_t stream);

// dq, dk, dv: like out. delta: per-row float scratch. dhead_rows: per-row floats or null; when
// given, dhead_mask[h] is their sum over the head's rows (the caller reduces it).
cudaError_t attention_backward(DType dtype, const void* q, const void* k, const void* v,
                               const void* out, const void* dout, const bool* key_padding_mask,
                               const float* head_mask, const float* lse, void* dq, void* dk,
                               void* dv, float* delta, float* dhead_rows,
                               const AttnLayout& layout, int batch, int heads, int head_dim,
                               float scale, float dropout_p, const int64_t* dropout_rng,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace distilbert_fast
