"""What every Triton launcher here asks of the device: is triton.jit interpreting (TRITON_INTERPRET=1
when the kernels were imported), and how many SMs the GPU has (to size persistent grids)."""

import functools

import torch
from triton.runtime.interpreter import InterpretedFunction


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` (a @triton.jit function) runs under Triton's CPU interpreter."""
    return isinstance(kernel, InterpretedFunction)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The number of streaming multiprocessors of the CUDA ``device``."""
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())
