"""The functional API of the hot ops, one autograd Function each.

    masked_attention(q, k, v, ...)          softmax(q k^T * scale, key padding) [dropout] [* head_mask] @ v
    bias_activation(x, bias, activation)    act(x + bias)
    residual_layernorm(x, residual, ...)    LayerNorm(dropout(x + x_bias) + residual)
    linear_activation(x, weight, bias, act) act(x @ weight^T + bias), the first FFN matmul + epilogue
    linear(x, weight, bias)                 x @ weight^T + bias, as F.linear, on the backend's GEMM
    varlen_attention(q, k, v, cu_seqlens, max_seqlen, ...)  attention within each packed sequence

``linear`` is the one op without a Function here: it returns what the backend's ``linear`` gives,
F.linear by default, or the backend's own Function around another GEMM.

Each other wrapper checks its arguments (errors name the argument and what was expected), picks the
backend for this call (see ``backends``) and applies the op's Function, which hands forward and
backward to that backend. Under a tracer (torch.compile, export, jit.trace) every wrapper, linear
included, takes the op's custom-op form instead (``custom``): one graph node per op.
"""

import torch

from ..packing import check_cu_seqlens
from . import custom
from .backends import attention_runner, resolve_backend, save_named, saved_named
from .eager import canonical_activation


def _dtypes(*inputs):
    """The dtypes of the tensor inputs (None elsewhere): their gradients come back in them."""
    return tuple(t.dtype if isinstance(t, torch.Tensor) else None for t in inputs)


def _cast_grads(grads, dtypes):
    return tuple(None if g is None or d is None else g.to(d) for g, d in zip(grads, dtypes))


def _check_tensor(name, t, ndim=None, shape=None, like=None, same_dtype=False, floating=True):
    """Checks ``t``'s type, rank, shape, floating dtype, and device (and dtype, if
    ``same_dtype``) against ``like``; errors name the argument and the expected value."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} must be on {like.device}, got {t.device}")
        if same_dtype and t.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {like.dtype}, got {t.dtype}")


def _first_order_only(op):
    # Backward runs with grad mode on only under create_graph=True; the backends' backward
    # formulas are not themselves differentiable, so say so instead of returning a silent zero.
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: second-order gradients (create_graph=True) are not supported by "
            "distilbert_fast's ops"
        )


def _check_dropout(dropout_p):
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


# -- masked attention ------------------------------------------------------------------------
class MaskedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, backend):
        (out, weights), saved, state = backend.attention_forward(
            q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights
        )
        save_named(ctx, saved)
        ctx.state, ctx.backend = state, backend
        ctx.input_dtypes = _dtypes(q, k, v, key_padding_mask, head_mask)
        ctx.set_materialize_grads(False)
        if weights is None:
            return out, None
        return out, weights

    @staticmethod
    def backward(ctx, grad_out, grad_weights):
        _first_order_only("masked_attention")
        saved = saved_named(ctx)
        if grad_out is None:
            grad_out = torch.zeros_like(saved.q)  # out is shaped like q
        dq, dk, dv, dhead_mask = ctx.backend.attention_backward(
            saved, ctx.state, grad_out, grad_weights, ctx.needs_input_grad
        )
        grads = _cast_grads((dq, dk, dv, None, dhead_mask), ctx.input_dtypes)
        return (*grads, None, None, None, None)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention with a key-padding mask.

    q, k, v: (batch, heads, seq, head_dim). key_padding_mask: (batch, seq) bool, True = attend.
    head_mask: (heads,), multiplies each head's weights. dropout_p applies to the weights (pass 0
    in eval). scale defaults to head_dim ** -0.5. Returns ``(out, weights)``: out is
    (batch, heads, seq, head_dim); weights is (batch, heads, seq, seq) after dropout and head_mask
    when ``need_weights``, else None. A fully-masked row attends uniformly to every key.
    """
    _check_tensor("q", q, ndim=4)
    _check_tensor("k", k, shape=q.shape, like=q, same_dtype=True)
    _check_tensor("v", v, shape=q.shape, like=q, same_dtype=True)
    batch, heads, seq, head_dim = q.shape
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, shape=(batch, seq), like=q, floating=False)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor, got {key_padding_mask.dtype}")
    if head_mask is not None:
        _check_tensor("head_mask", head_mask, shape=(heads,), like=q)
        head_mask = head_mask.to(q.dtype)
    _check_dropout(dropout_p)
    if scale is None:
        scale = head_dim**-0.5
    impl = resolve_backend("masked_attention", q, backend)
    # Fused attention never forms the (seq x seq) weights: a call that needs them runs the eager
    # code (forward and backward), for every backend alike; last_backend() names the chosen one.
    impl = attention_runner(impl, need_weights)
    if custom.tracing():
        return custom.masked_attention(
            q, k, v, key_padding_mask, head_mask, float(dropout_p), float(scale), bool(need_weights), impl)
    return MaskedAttentionFunction.apply(
        q, k, v, key_padding_mask, head_mask, float(dropout_p), float(scale), bool(need_weights), impl
    )


# -- bias + activation -----------------------------------------------------------------------
class BiasActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, activation, backend):
        y, saved, state = backend.bias_activation_forward(x, bias, activation)
        save_named(ctx, saved)
        ctx.state, ctx.backend = state, backend
        ctx.input_dtypes = _dtypes(x, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("bias_activation")
        dx, dbias = ctx.backend.bias_activation_backward(
            saved_named(ctx), ctx.state, grad_out, ctx.needs_input_grad
        )
        return (*_cast_grads((dx, dbias), ctx.input_dtypes), None, None)


def bias_activation(
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """act(x + bias) over (..., features) with bias (features,), in x's dtype (the bias is cast to
    it, as a Linear layer's is under autocast). activation: 'gelu' (erf), 'gelu_new' (tanh),
    'relu', 'silu' (alias 'swish')."""
    _check_tensor("x", x)
    if bias is not None:
        _check_tensor("bias", bias, shape=(x.shape[-1],), like=x)
        bias = bias.to(x.dtype)
    activation = canonical_activation(activation)
    impl = resolve_backend("bias_activation", x, backend)
    if custom.tracing():
        return custom.bias_activation(x, bias, activation, impl)
    return BiasActivationFunction.apply(x, bias, activation, impl)


# -- residual + LayerNorm --------------------------------------------------------------------
class ResidualLayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, x_bias, dropout_p, backend):
        y, saved, state = backend.residual_layernorm_forward(
            x, residual, weight, bias, eps, x_bias, dropout_p
        )
        save_named(ctx, saved)
        ctx.state, ctx.backend = state, backend
        ctx.input_dtypes = _dtypes(x, residual, weight, bias, None, x_bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("residual_layernorm")
        dx, dresidual, dweight, dbias, dx_bias = ctx.backend.residual_layernorm_backward(
            saved_named(ctx), ctx.state, grad_out, ctx.needs_input_grad
        )
        grads = _cast_grads((dx, dresidual, dweight, dbias, None, dx_bias), ctx.input_dtypes)
        return (*grads, None, None)


def residual_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    x_bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, statistics in float32 for
    half types. x, residual: (..., dim), same shape; weight, bias, x_bias: (dim,). x_bias is the
    bias of the linear layer that produced x, folded in here and cast to x's dtype; dropout_p
    applies to x + x_bias (pass 0 in eval). A residual of another dtype promotes the sum, as
    ``x + residual`` would (this is what happens under autocast)."""
    _check_tensor("x", x)
    dim = x.shape[-1]
    if residual is not None:
        _check_tensor("residual", residual, shape=x.shape, like=x)
    _check_tensor("weight", weight, shape=(dim,), like=x)
    _check_tensor("bias", bias, shape=(dim,), like=x)
    if x_bias is not None:
        _check_tensor("x_bias", x_bias, shape=(dim,), like=x)
        x_bias = x_bias.to(x.dtype)
    _check_dropout(dropout_p)
    impl = resolve_backend("residual_layernorm", x, backend)
    if custom.tracing():
        return custom.residual_layernorm(
            x, residual, weight, bias, float(eps), x_bias, float(dropout_p), impl)
    return ResidualLayerNormFunction.apply(
        x, residual, weight, bias, float(eps), x_bias, float(dropout_p), impl
    )


# -- linear + bias + activation --------------------------------------------------------------
class LinearActivationFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, activation, backend):
        needs_grad = any(ctx.needs_input_grad[:3])
        y, saved, state = backend.linear_activation_forward(x, weight, bias, activation, needs_grad)
        save_named(ctx, saved)
        ctx.state, ctx.backend = state, backend
        ctx.input_dtypes = _dtypes(x, weight, bias)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("linear_activation")
        dx, dweight, dbias = ctx.backend.linear_activation_backward(
            saved_named(ctx), ctx.state, grad_out, ctx.needs_input_grad
        )
        return (*_cast_grads((dx, dweight, dbias), ctx.input_dtypes), None, None)


def linear_activation(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """act(x @ weight^T + bias): x (..., in_features), weight (out_features, in_features) as
    nn.Linear stores it, bias (out_features,) or None. The same result as
    ``bias_activation(F.linear(x, weight), bias, activation)`` (bit for bit on the eager
    backend), as one op a backend may fuse into one kernel. Under torch.autocast, x and weight are
    cast to the autocast dtype first, as F.linear would; the bias follows x's dtype."""
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim, got a 0-dim tensor")
    _check_tensor("weight", weight, ndim=2, like=x)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {x.shape[-1]}), got {tuple(weight.shape)}"
        )
    if bias is not None:
        _check_tensor("bias", bias, shape=(weight.shape[0],), like=x)
    if torch.is_autocast_enabled(x.device.type):
        # autocast casts the matmul's floating inputs, float64 excepted
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = (t if t.dtype == torch.float64 else t.to(dtype) for t in (x, weight))
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have dtype {x.dtype} (x's), got {weight.dtype}")
    if bias is not None:
        bias = bias.to(x.dtype)
    activation = canonical_activation(activation)
    impl = resolve_backend("linear_activation", x, backend)
    if custom.tracing():
        return custom.linear_activation(x, weight, bias, activation, impl)
    if not torch.is_grad_enabled():
        # No graph is recorded, so no backward follows; the Function cannot tell (its forward
        # always runs without grad, and the inputs keep requires_grad), the backend can use that.
        return impl.linear_activation_forward(x, weight, bias, activation, False)[0]
    return LinearActivationFunction.apply(x, weight, bias, activation, impl)


# -- linear ------------------------------------------------------------------------------------
def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """x @ weight^T + bias, the same as ``F.linear`` (which checks the arguments), on the chosen
    backend's GEMM: the attention's projections and the FFN's second matmul."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    impl = resolve_backend("linear", x, backend)
    if custom.tracing():
        return custom.linear(x, weight, bias, impl)
    return impl.linear(x, weight, bias)


# -- varlen attention --------------------------------------------------------------------------
class VarlenAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale, backend):
        out, saved, state = backend.varlen_attention_forward(
            q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale
        )
        save_named(ctx, saved)
        ctx.state, ctx.backend = state, backend
        ctx.input_dtypes = _dtypes(q, k, v, None, None, head_mask)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("varlen_attention")
        dq, dk, dv, dhead_mask = ctx.backend.varlen_attention_backward(
            saved_named(ctx), ctx.state, grad_out, ctx.needs_input_grad
        )
        grads = _cast_grads((dq, dk, dv, None, None, dhead_mask), ctx.input_dtypes)
        return (*grads, None, None, None)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    head_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Multi-head attention within each sequence of a packed batch (flash-attn's varlen API).

    q, k, v: (total_tokens, heads, head_dim), the same dtype and device; they may be strided
    views of one fused (total_tokens, 3 * dim) QKV projection (last dim of stride 1).
    cu_seqlens: (batch + 1,) int32 on q's device: sequence b is rows cu_seqlens[b] to
    cu_seqlens[b + 1] - 1 (zero-length sequences allowed). max_seqlen: a Python int at least the
    longest sequence. head_mask: (heads,), multiplies each head's weights after dropout. scale
    defaults to head_dim ** -0.5. Returns out, (total_tokens, heads, head_dim), contiguous.

    cu_seqlens' values (starts at 0, non-decreasing, ends at total_tokens, no sequence longer
    than max_seqlen) are checked only when it is on the CPU: on a GPU that would cost a sync.
    """
    _check_tensor("q", q, ndim=3)
    _check_tensor("k", k, shape=q.shape, like=q, same_dtype=True)
    _check_tensor("v", v, shape=q.shape, like=q, same_dtype=True)
    total, heads, head_dim = q.shape
    if isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device} (q's device), got {cu_seqlens.device}")
    check_cu_seqlens(cu_seqlens, total, max_seqlen)
    if head_mask is not None:
        _check_tensor("head_mask", head_mask, shape=(heads,), like=q)
        head_mask = head_mask.to(q.dtype)
    _check_dropout(dropout_p)
    if scale is None:
        scale = head_dim**-0.5
    impl = resolve_backend("varlen_attention", q, backend)
    if custom.tracing():
        return custom.varlen_attention(
            q, k, v, cu_seqlens, int(max_seqlen), head_mask, float(dropout_p), float(scale), impl
        )
    return VarlenAttentionFunction.apply(
        q, k, v, cu_seqlens, int(max_seqlen), head_mask, float(dropout_p), float(scale), impl
    )
