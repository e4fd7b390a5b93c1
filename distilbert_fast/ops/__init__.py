"""The op layer: the model's hot ops behind one functional API, each an autograd Function whose
forward and backward run on a chosen backend (``eager`` now; see ``backends``)."""

from . import eager  # noqa: F401  (registers the eager backend)
from . import cuda_backend  # noqa: F401  (registers "cuda" where the extension has CUDA)
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
