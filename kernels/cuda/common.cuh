// Device helpers shared by the kernels: float conversion of the three element types, 16-byte
// vector loads and stores, warp reductions, the dropout hash. No torch headers.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "distilbert_kernels.h"

namespace distilbert_fast {
namespace cuda {

constexpr int kWarp = 32;

// -- element type <-> float --------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// -- vector loads and stores -------------------------------------------------------------------
// Elements a 16-byte access holds.
template <typename T>
__host__ __device__ constexpr int vec16() { return static_cast<int>(16 / sizeof(T)); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N consecutive elements of p into float. With N a multiple of the 16-byte width this is N/W
// 16-byte loads, and p must then be 16-byte aligned (the host side checks the base pointers and
// only passes offsets that are multiples of N); otherwise N scalar loads.
template <typename T, int N>
__device__ __forceinline__ void load_float(const T* p, float (&out)[N]) {
  constexpr int kChunk = (N % vec16<T>() == 0) ? vec16<T>() : 1;
#pragma unroll
  for (int c = 0; c < N; c += kChunk) {
    const Pack<T, kChunk> pack = *reinterpret_cast<const Pack<T, kChunk>*>(p + c);
#pragma unroll
    for (int i = 0; i < kChunk; ++i) out[c + i] = to_float(pack.v[i]);
  }
}

template <typename T, int N>
__device__ __forceinline__ void store_float(T* p, const float (&in)[N]) {
  constexpr int kChunk = (N % vec16<T>() == 0) ? vec16<T>() : 1;
#pragma unroll
  for (int c = 0; c < N; c += kChunk) {
    Pack<T, kChunk> pack;
#pragma unroll
    for (int i = 0; i < kChunk; ++i) pack.v[i] = from_float<T>(in[c + i]);
    *reinterpret_cast<Pack<T, kChunk>*>(p + c) = pack;
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// -- warp reductions ---------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// -- dropout -----------------------------------------------------------------------------------
__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {  // splitmix64's finaliser
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Dropout's random stream, as torch's Philox generators keep one: a seed and an offset. The
// kernels read them from device memory (int64[2], see distilbert_kernels.h), where the caller's
// generator wrote them on the stream: a CUDA graph replays that draw with the kernels, so every
// replay gets fresh masks (a host integer would be baked into the captured launch).
struct DropoutRng {
  uint64_t seed, offset;
};

// rng: int64[2] {seed, offset}, or null when there is no dropout.
__device__ __forceinline__ DropoutRng load_dropout_rng(const int64_t* rng) {
  if (rng == nullptr) return DropoutRng{0, 0};
  return DropoutRng{static_cast<uint64_t>(rng[0]), static_cast<uint64_t>(rng[1])};
}

// Whether element `index` survives dropout with probability (1 - p), as a pure function of
// (seed, offset + index): the backward recomputes the forward's mask with it.
__device__ __forceinline__ bool dropout_keep(DropoutRng rng, uint64_t index, float p) {
  const uint64_t bits = mix64(mix64(rng.seed) + (rng.offset + index + 1) * 0x9E3779B97F4A7C15ull);
  const float u = static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // [0, 1), 24 bits
  return u >= p;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace cuda
}  // namespace distilbert_fast
