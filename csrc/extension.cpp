// The package's pybind11 extension, `distilbert_fast._C`.
//
// Later issues add the CPU kernels, the CUDA launchers and the tokenizer binding here; this file
// stays a short list of m.def lines plus one init_*_ops call per op family (ops_init.h). Today it
// reports how it was built, so the package can refuse a stale build (compiled against another
// torch) with a clear message instead of crashing later.
#include <torch/extension.h>

#include <string>

#include "ops_init.h"
#ifdef WITH_CUDA
#include "cuda/cuda_ops.h"  // init_cuda_ops: the CUDA kernels' launchers
#endif

namespace distilbert_fast {

pybind11::dict build_info() {
  pybind11::dict info;
  // TORCH_VERSION is the version of the headers this file was compiled against.
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = std::string("unknown");
#endif
  info["cplusplus"] = static_cast<long>(__cplusplus);
  info["cpu_isa"] = std::string(DISTILBERT_FAST_CPU_ISA);
  return info;
}

}  // namespace distilbert_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", &distilbert_fast::build_info,
        "How this extension was built: torch headers version, CUDA, OpenMP, compiler.");
  distilbert_fast::init_cpu_ops(m);
#ifdef WITH_CUDA
  distilbert_fast::init_cuda_ops(m);
#endif
}
