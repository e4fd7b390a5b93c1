"""Builds distilbert_fast and its pybind11 extension ``distilbert_fast._C``.

The CPU part always builds. The CUDA part builds where torch was built with CUDA and nvcc is
found (CUDA_HOME); the launchers live in ``csrc/cuda`` and the kernels in ``kernels/cuda``.
Build with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
already installed, not a fresh copy pip would download into an isolated build environment.
"""

import glob
import os

from setuptools import Extension, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


# The C++ CPU kernels use at::vec::Vectorized, whose width is fixed at compile time by the
# CPU_CAPABILITY_* macros: they are built for the best vector ISA of the machine that builds them
# (the package is built from source where it runs). DISTILBERT_FAST_CPU_ISA=avx512|avx2|default
# overrides the choice, e.g. to build for an older CPU than the build machine's. The cpu backend
# refuses to run on a CPU that lacks the ISA it was built for.
_CPU_ISAS = {
    # name: (/proc/cpuinfo flags it needs, compiler flags)
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
        ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    ),
    "avx2": (("avx2", "fma", "f16c"), ["-mavx2", "-mfma", "-mf16c"]),
    "default": ((), []),
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_isa():
    isa = os.environ.get("DISTILBERT_FAST_CPU_ISA")
    if isa is not None:
        if isa not in _CPU_ISAS:
            raise ValueError(f"DISTILBERT_FAST_CPU_ISA must be one of {list(_CPU_ISAS)}, got {isa!r}")
        return isa
    flags = _cpu_flags()
    return next(name for name, (needs, _) in _CPU_ISAS.items() if flags.issuperset(needs))


def _cpu_isa_flags(isa):
    """Host compiler flags that build at::vec for ``isa``, in its own inline namespace so its
    inline functions never merge with torch's own builds of them. Given to the C++ compiler only:
    nvcc's host pass does not get them."""
    if isa == "default":
        return []
    return [*_CPU_ISAS[isa][1], f"-DCPU_CAPABILITY_{isa.upper()}", f"-DCPU_CAPABILITY=distilbert_fast_{isa}"]


def _extension():
    # -fopenmp: at::parallel_for is inline OpenMP in torch's headers; without it the CPU kernels
    # would run on one thread. The extension then links libgomp.so.1, the soname torch already
    # loaded, so one OpenMP runtime (and thread pool) serves both.
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp", *_cpu_isa_flags(_cpu_isa())]
    link_flags = ["-fopenmp"]
    cpu_sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    # the CUDA launchers (torch C++ API) and the raw kernels they call (plain CUDA, no torch)
    cuda_sources = (
        _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp") + _sources("kernels/cuda/*.cu")
    )
    build_cuda = (
        bool(cuda_sources)
        and cpp_extension.CUDA_HOME is not None
        and os.environ.get("DISTILBERT_FAST_NO_CUDA", "0") != "1"
        and _torch_has_cuda()
    )
    if build_cuda:
        return cpp_extension.CUDAExtension(
            "distilbert_fast._C",
            cpu_sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "kernels", "cuda")],
            define_macros=[("WITH_CUDA", None)],
            # -lineinfo: compute-sanitizer reports name source lines (no cost at run time)
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    return cpp_extension.CppExtension(
        "distilbert_fast._C", cpu_sources, extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


def _tokenizer_extension():
    """distilbert_fast._tokenizer: the C++ WordPiece core (csrc/tokenizer, plain C++17) and its
    pybind11 binding. No torch: it builds and loads without it."""
    import pybind11

    return Extension(
        "distilbert_fast._tokenizer",
        _sources("csrc/bindings/tokenizer_binding.cpp") + _sources("csrc/tokenizer/*.cc"),
        include_dirs=[pybind11.get_include(), os.path.join(ROOT, "csrc", "tokenizer")],
        extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-pthread"],
        extra_link_args=["-pthread"],
        language="c++",
    )


def _torch_has_cuda():
    import torch

    return torch.version.cuda is not None


setup(
    name="distilbert_fast",
    version="0.1.0",
    description="A drop-in, fast DistilBERT for PyTorch",
    python_requires=">=3.10",
    packages=["distilbert_fast", "distilbert_fast.ops", "distilbert_fast.kernels",
              "distilbert_fast.integrations", "distilbert_fast.engine"],
    # Our Triton/CUDA kernels ship inside the package: a top-level `kernels` would collide with
    # the unrelated PyPI package of that name.
    package_dir={"distilbert_fast.kernels": "kernels"},
    ext_modules=[_extension(), _tokenizer_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    install_requires=["torch>=2.11", "safetensors>=0.4", "tqdm>=4.60", "numpy>=1.24"],
    zip_safe=False,
)
