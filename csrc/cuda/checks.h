// Input checks for the CUDA launchers: each failed check raises a Python exception (TypeError
// for a dtype, ValueError otherwise) whose message names the argument and what was expected.
#pragma once

#include <torch/extension.h>

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "distilbert_kernels.h"

namespace distilbert_fast {
namespace cuda_ops {

using cuda::DType;

inline std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

// A contiguous CUDA tensor.
inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor, got a tensor on ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (call .contiguous()), got strides ",
                    shape_str(t.strides()));
}

// The kernels' element type of a float32 / float16 / bfloat16 tensor.
inline DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

// `t` checked like `like`: contiguous CUDA tensor on the same device with the same dtype.
inline void check_like(const at::Tensor& t, const at::Tensor& like, const char* name,
                       const char* like_name) {
  check_cuda(t, name);
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), " like ",
                    like_name, ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must have dtype ",
                   like.scalar_type(), " like ", like_name, ", got ", t.scalar_type());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", shape_str(expected),
                    ", got ", shape_str(t.sizes()));
}

// A per-feature vector (weight, bias, head_mask, ...) of `n` entries on like's device, as the
// contiguous float32 the kernels read.
inline at::Tensor float_vector(const at::Tensor& t, int64_t n, const at::Tensor& like,
                               const char* name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), name, " must be on ", like.device(), ", got ",
                    t.device());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), name,
                   " must be a floating-point tensor, got ", t.scalar_type());
  check_shape(t, {n}, name);
  return t.to(at::kFloat).contiguous();
}

inline void check_dropout(double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p < 1.0, "dropout_p must be in [0, 1), got ", p);
}

// Dropout's random state, {seed, offset}: an int64 (2,) tensor on like's device that the kernels
// read on the device (see kernels/cuda/distilbert_kernels.h). Checked and returned as a pointer
// when dropout_p > 0; null otherwise (it may then be None).
inline const int64_t* dropout_rng_ptr(const c10::optional<at::Tensor>& rng, double dropout_p,
                                      const at::Tensor& like) {
  check_dropout(dropout_p);
  if (dropout_p == 0.0) return nullptr;
  TORCH_CHECK_VALUE(rng.has_value(), "dropout_rng must be an int64 (2,) CUDA tensor when "
                    "dropout_p > 0, got None");
  const at::Tensor& t = *rng;
  check_cuda(t, "dropout_rng");
  TORCH_CHECK_VALUE(t.device() == like.device(), "dropout_rng must be on ", like.device(),
                    ", got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "dropout_rng must be an int64 tensor, got ",
                   t.scalar_type());
  check_shape(t, {2}, "dropout_rng");
  return t.data_ptr<int64_t>();
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

template <typename T = void>
inline T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

}  // namespace cuda_ops
}  // namespace distilbert_fast
