"""The op layer: the model's hot ops behind one functional API, each an autograd Function whose
forward and backward run on a chosen backend (``eager``, ``cpu``; see ``backends``)."""

from .. import _extension
from . import cpu_backend, eager  # noqa: F401  (eager registers itself)
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
    MaskedAttentionFunction,
    ResidualLayerNormFunction,
    bias_activation,
    masked_attention,
    residual_layernorm,
)

cpu_backend.register(_extension._C)  # the C++ CPU kernels, where the extension was built with them

__all__ = [
    "ACTIVATIONS",
    "ENV_VAR",
    "Backend",
    "BiasActivationFunction",
    "MaskedAttentionFunction",
    "ResidualLayerNormFunction",
    "available_backends",
    "bias_activation",
    "canonical_activation",
    "get_default_backend",
    "last_backend",
    "masked_attention",
    "register_backend",
    "registered_backends",
    "residual_layernorm",
    "resolve_backend",
    "set_default_backend",
    "use_backend",
]
