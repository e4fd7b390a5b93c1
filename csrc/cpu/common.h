// Shared by the C++ CPU kernels: argument checks that name the argument, the dtype dispatch, and
// small vector helpers over at::vec::Vectorized.
//
// Every kernel computes in acc_t (float for float32 and bfloat16, double for float64): a bf16 row
// is widened to float once, worked on in float, and narrowed once when written.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

namespace distilbert_fast {
namespace cpu {

using at::vec::Vectorized;

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};
template <typename scalar_t>
using acc_t = typename Acc<scalar_t>::type;

// -- argument checks -----------------------------------------------------------------------------

inline std::string shape_str(at::IntArrayRef sizes) {
  std::ostringstream s;
  s << "(";
  for (size_t i = 0; i < sizes.size(); ++i) s << (i ? ", " : "") << sizes[i];
  s << (sizes.size() == 1 ? ",)" : ")");
  return s.str();
}

// A tensor argument of the kernels: on the CPU, of `dtype`, contiguous (unless `inner_only`,
// which only asks the last dim to have stride 1), of `ndim` dims. As the CUDA launchers' checks
// (csrc/cuda/checks.h): a wrong dtype raises TypeError, anything else ValueError.
inline void check_arg(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t ndim,
                      bool inner_only = false) {
  TORCH_CHECK_VALUE(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == ndim, name, " must have ", ndim, " dims, got shape ",
                    shape_str(t.sizes()));
  if (inner_only) {
    TORCH_CHECK_VALUE(t.size(-1) <= 1 || t.stride(-1) == 1, name,
                      " must have a contiguous last dim (stride 1), got strides ",
                      shape_str(t.strides()));
  } else {
    TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous, got strides ",
                      shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
  }
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " must have shape ", shape_str(expected), ", got ",
                    shape_str(t.sizes()));
}

inline void check_float_dtype(at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kBFloat16, name,
                   " must have dtype float32, float64 or bfloat16, got ", dtype);
}

// The accumulation dtype of a kernel dtype: weights, biases, statistics and reductions use it.
inline at::ScalarType acc_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

#define DBF_DISPATCH(DTYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, DTYPE, NAME, __VA_ARGS__)

// -- output buffers ------------------------------------------------------------------------------

// A fresh (uninitialised) contiguous CPU tensor for a kernel's output (buffers.cpp). From 1 MiB it
// comes from a process-wide cache of 2 MiB-aligned blocks on transparent huge pages, to which its
// memory returns when the tensor dies: the model's outputs of one call are the next call's, already
// faulted in. Such tensors cannot be resize_d. Smaller ones are at::empty.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options);

// The cache's idle blocks: their bytes, and freeing them all (returns the bytes freed).
int64_t cached_output_bytes();
int64_t release_cached_outputs();

// -- rows in and out of acc_t --------------------------------------------------------------------

// dst[0:n] = src[0:n] widened to acc_t.
template <typename scalar_t>
inline void load_row(const scalar_t* src, acc_t<scalar_t>* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    std::memcpy(dst, src, n * sizeof(scalar_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// dst[0:n] = src[0:n] narrowed to scalar_t.
template <typename scalar_t>
inline void store_row(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t<scalar_t>>) {
    std::memcpy(dst, src, n * sizeof(scalar_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Sum of a[0:n], vectorised.
template <typename T>
inline T row_sum(const T* a, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) acc += Vec::loadu(a + i);
  T s = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i];
  return s;
}

// Dot product of a[0:n] and b[0:n], vectorised.
template <typename T>
inline T row_dot(const T* a, const T* b, int64_t n) {
  using Vec = Vectorized<T>;
  Vec acc(T(0));
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(a + i), Vec::loadu(b + i), acc);
  }
  T s = at::vec::vec_reduce_all<T>([](Vec& x, Vec& y) { return x + y; }, acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[0:n] += alpha * x[0:n], vectorised.
template <typename T>
inline void row_axpy(T alpha, const T* x, T* y, int64_t n) {
  using Vec = Vectorized<T>;
  const Vec va(alpha);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + i), Vec::loadu(y + i)).store(y + i);
  }
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// at::parallel_for's grain for items of `work` elements each: parallel regions cost microseconds
// (more on a loaded machine), so small problems run inline on the calling thread.
constexpr int64_t kMinWorkPerTask = 32768;
inline int64_t grain_for(int64_t work) {
  return std::max<int64_t>(1, kMinWorkPerTask / std::max<int64_t>(1, work));
}

// Per-thread partial sums of a column reduction (dbias, dweight): each thread adds into its own
// row of `width` values; sum_into() then adds the rows together. No atomics, deterministic for a
// fixed thread count.
template <typename T>
struct ThreadPartials {
  int64_t width;
  int nthreads;
  std::vector<T> data;
  ThreadPartials(int64_t width_) : width(width_), nthreads(at::get_num_threads()) {
    data.assign(static_cast<size_t>(nthreads) * width, T(0));
  }
  T* mine() { return data.data() + static_cast<int64_t>(at::get_thread_num()) * width; }
  void sum_into(T* out) const {
    for (int64_t j = 0; j < width; ++j) out[j] = T(0);
    for (int t = 0; t < nthreads; ++t) {
      const T* row = data.data() + static_cast<int64_t>(t) * width;
      for (int64_t j = 0; j < width; ++j) out[j] += row[j];
    }
  }
};

}  // namespace cpu
}  // namespace distilbert_fast
