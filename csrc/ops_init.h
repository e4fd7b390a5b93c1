// Registration hooks of the extension's op families. extension.cpp calls each from its
// PYBIND11_MODULE block, so that block stays a short list; each family's m.def lines live beside
// its entry points (csrc/cpu/bindings.cpp for the C++ CPU kernels).
#pragma once

#include <pybind11/pybind11.h>

// The vector ISA the CPU kernels were compiled for (setup.py picks it from the build machine).
#if defined(CPU_CAPABILITY_AVX512)
#define DISTILBERT_FAST_CPU_ISA "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#define DISTILBERT_FAST_CPU_ISA "avx2"
#else
#define DISTILBERT_FAST_CPU_ISA "default"
#endif

namespace distilbert_fast {

// The C++ CPU kernels (the "cpu" backend): residual+LayerNorm, bias+activation, masked attention.
void init_cpu_ops(pybind11::module_& m);

}  // namespace distilbert_fast
