"""The op layer: the model's hot ops behind one functional API, each an autograd Function whose
forward and backward run on a chosen backend (``eager`` always; ``cpu`` where the extension has the
C++ kernels; ``cuda`` where it was built with CUDA; ``triton`` where triton imports; see
``backends``)."""

from .. import _extension
from . import cpu_backend, eager  # noqa: F401  (eager registers itself)
from . import cuda_backend  # noqa: F401  (registers "cuda" where the extension has CUDA)

try:  # the triton backend only where triton imports; the package works without it
    import triton as _triton  # noqa: F401
except ImportError:
    pass
else:
    from . import triton_backend  # noqa: F401  (registers the triton backend)
from .backends import (
    ENV_VAR,
    Backend,
    available_backends,
    get_default_backend,
    last_backend,
    register_backend,
    registered_backends,
    resolve_backend,
    set_default_backend,
    use_backend,
)
from .eager import ACTIVATIONS, canonical_activation
from .functional import (
    BiasActivationFunction,
    LinearActivationFunction,
    MaskedAttentionFunction,
    ResidualLayerNormFunction,
    VarlenAttentionFunction,
    bias_activation,
    linear,
    linear_activation,
    masked_attention,
    residual_layernorm,
    varlen_attention,
)

cpu_backend.register(_extension._C)  # the C++ CPU kernels, where the extension was built with them

__all__ = [
    "ACTIVATIONS",
    "ENV_VAR",
    "Backend",
    "BiasActivationFunction",
    "LinearActivationFunction",
    "MaskedAttentionFunction",
    "ResidualLayerNormFunction",
    "available_backends",
    "bias_activation",
    "canonical_activation",
    "get_default_backend",
    "last_backend",
    "linear",
    "linear_activation",
    "masked_attention",
    "register_backend",
    "registered_backends",
    "residual_layernorm",
    "resolve_backend",
    "set_default_backend",
    "use_backend",
    "varlen_attention",
    "VarlenAttentionFunction",
]
