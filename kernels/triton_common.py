"""What every Triton launcher here asks of the device: is triton.jit interpreting (TRITON_INTERPRET=1
when the kernels were imported), how many SMs the GPU has (to size persistent grids), which CUDA
device a launch must run on, and how a launcher launches a kernel."""

import contextlib
import functools

import torch
from torch.fx.experimental.symbolic_shapes import guard_or_true
from triton.runtime.interpreter import InterpretedFunction


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a @triton.jit function) runs under Triton's CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


def launch_directly(kernel):
    """Every launcher's default ``launch``: the ``@triton.jit`` kernel itself, launched here and now.
    (While torch traces a launcher, the ops layer passes a ``launch`` that records the launch in the
    graph instead: ``distilbert_fast.ops.triton_ops``.)"""
    return kernel


def nonempty(size) -> bool:
    """``size > 0`` as a launcher decides whether to launch at all. While torch traces a launcher a
    size may be a symbol no trace can know (the token count of a batch packed inside a compiled
    graph): it counts as non-empty, and the launch recorded then runs no program for a size of 0
    (Triton launches no empty grid)."""
    return guard_or_true(size > 0)


def at_least(low, size):
    """max(low, size), a symbol while torch traces with one (Python's max would ask its value)."""
    return torch.sym_max(low, size)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The number of streaming multiprocessors of the CUDA ``device``."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


_ON_CURRENT_DEVICE = contextlib.nullcontext()  # stateless: one instance serves every launch
_cuda_devices = 0  # torch.cuda.device_count(), read at the first CUDA tensor (fixed from then on)


def device_guard(tensor: torch.Tensor):
    """A context that makes ``tensor``'s CUDA device current for a launch: Triton launches on the
    current device's current stream whatever device the tensors are on, so a model on cuda:1 in a
    process whose current device is cuda:0 (a worker per GPU, a user's second model) must switch.

    Asked before every launch, so it is cheap where no switch can be needed: a CPU tensor (the
    interpreter) and a machine with one GPU (every CUDA tensor is then on the current device)
    cost one ``get_device()``; only with several GPUs is the current device read."""
    global _cuda_devices
    index = tensor.get_device()  # -1 off CUDA
    if index < 0:
        return _ON_CURRENT_DEVICE
    if _cuda_devices == 0:
        _cuda_devices = torch.cuda.device_count()
    if _cuda_devices == 1 or index == torch.cuda.current_device():
        return _ON_CURRENT_DEVICE
    return torch.cuda.device(index)
