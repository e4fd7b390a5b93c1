"""Which implementation of the hot ops runs: the backend registry and the per-call choice.

A backend implements each op's forward and backward (see ``Backend``). The choice is made per
call, from (first that is set):

1. the ``backend=`` argument of the op (the models pass ``config.backend``, which
   ``model.set_backend`` and ``from_pretrained(..., backend=...)`` set),
2. ``with use_backend(name):`` (per thread / async task),
3. ``set_default_backend(name)`` (process-wide),
4. the environment variable ``DISTILBERT_FAST_BACKEND``,
5. ``"auto"``: the first registered backend, in preference order, that supports the tensor's
   device and is ``auto_eligible`` for it (a backend may run somewhere only when asked: the
   triton backend runs on CPU under Triton's interpreter, far too slowly to be picked by itself).

An explicitly named backend that cannot run on the tensor's device is an error, never a silent
fallback. ``last_backend()`` says what ran; the debug log says it too, each time it changes.
"""

import contextlib
import contextvars
import logging
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..tracing import onnx_exporting

ENV_VAR = "DISTILBERT_FAST_BACKEND"
AUTO = "auto"

logger = logging.getLogger("distilbert_fast.ops")


class Backend:
    """One implementation of the hot ops.

    The contract, per op: ``<op>_forward`` returns ``(outputs, saved, state)``: ``saved`` the
    tensors its backward needs (a NamedTuple, so the backward reads them by name, ``saved.q``;
    attention's names its query ``q``; a plain tuple works for the other ops), ``state`` the
    non-tensor rest; the op's autograd Function stores both (``save_named``) and hands them back
    to ``<op>_backward``, whose gradients may come back in the compute dtype: the
    Function casts each to its input's dtype. Bad arguments are ValueError / TypeError, raised by
    the functional API before any backend runs. ``priority`` orders the ``auto`` choice (higher
    first).

    Defaults, declared here once: a backend implements the ops it has kernels for, and every op
    it does not override runs the eager backend's code (forward and backward) on the same
    tensors. ``linear`` defaults to ``F.linear``, and ``linear_activation`` to this backend's
    ``linear`` followed by its own bias_activation, so a backend overrides it only with a fused
    kernel. Attention that must return its (seq x seq) weights (``need_weights=True``) runs on
    eager unless the backend sets ``attention_weights`` (fused attention never forms them).
    """

    name = "?"
    priority = 0
    # True for a backend whose ``traced()`` forwards a tracer can inline and torch's autograd can
    # differentiate (eager's plain torch; triton's kernels as triton ops); the others run as
    # opaque custom ops (see ``custom``).
    traceable = False
    # Whether attention_forward can return the attention weights (need_weights=True).
    attention_weights = False

    def unsupported_reason(self, tensor: torch.Tensor) -> str | None:
        """None if this backend can run on ``tensor``'s device and dtype, else why not."""
        raise NotImplementedError

    def traced(self) -> "Backend":
        """The form of a ``traceable`` backend whose forwards a tracer inlines: the backend
        itself unless it says otherwise."""
        return self

    def auto_eligible(self, tensor: torch.Tensor) -> bool:
        """Whether ``auto`` may pick this backend for ``tensor`` (when it also supports it). A
        backend that runs somewhere only as a debugging aid returns False there."""
        return True

    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        return eager().attention_forward(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)

    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        return eager().attention_backward(saved_tensors, saved_state, grad_out, grad_weights, needs_grad)

    def bias_activation_forward(self, x, bias, activation):
        return eager().bias_activation_forward(x, bias, activation)

    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        return eager().bias_activation_backward(saved_tensors, saved_state, grad_out, needs_grad)

    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        return eager().residual_layernorm_forward(x, residual, weight, bias, eps, x_bias, dropout_p)

    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        return eager().residual_layernorm_backward(saved_tensors, saved_state, grad_out, needs_grad)

    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        """Attention within each packed sequence (see ``functional.varlen_attention``). The
        default, for a backend without a varlen kernel: the eager backend's, forward and
        backward (the one rule by which such a backend falls back)."""
        return _registry["eager"].varlen_attention_forward(
            q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale
        )

    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        """(dq, dk, dv, dhead_mask); ``needs_grad`` is indexed like (q, k, v, cu_seqlens,
        max_seqlen, head_mask, ...)."""
        return _registry["eager"].varlen_attention_backward(saved_tensors, saved_state, grad_out, needs_grad)

    def linear(self, x, weight, bias):
        """x @ weight^T + bias (the model's projections without an activation) on this backend's
        GEMM, differentiable where a gradient may be needed: ``F.linear`` here; an override may
        run another GEMM inside an autograd Function of its own (the cpu backend does)."""
        return F.linear(x, weight, bias)

    def linear_activation_forward(self, x, weight, bias, activation, needs_grad):
        """act(x @ weight^T + bias): this backend's matmul (``linear`` without the bias; it runs
        inside the Function's forward, without grad), then its bias_activation_forward.
        ``needs_grad``: whether a backward will follow (an override may save more for it, or less
        without it)."""
        h = self.linear(x, weight, None)  # (..., out_features)
        y, inner, state = self.bias_activation_forward(h, bias, activation)
        # every backend's bias_activation saves (its input, its bias), each in its own layout
        return y, MatmulThenBiasActivationSaved(x, weight, *inner), (type(inner), state)

    def linear_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        """(dx, dweight, dbias): this backend's bias_activation_backward gives d(x @ W^T) and
        dbias, then the matmul gradients (``linear_grads``)."""
        s = saved_tensors
        inner_kind, state = saved_state
        # indexed like BiasActivationFunction's inputs: (h, bias, activation, backend)
        inner_needs = (needs_grad[0] or needs_grad[1], needs_grad[2], False, False)
        dh, dbias = self.bias_activation_backward(
            rebuild_saved(inner_kind, (s.h, s.bias)), state, grad_out, inner_needs)
        dx, dweight = linear_grads(s.x, s.weight, dh, needs_grad[0], needs_grad[1])
        return dx, dweight, dbias


class MatmulThenBiasActivationSaved(NamedTuple):
    """What the default (unfused) linear_activation keeps for its backward: the matmul's inputs,
    then what its bias_activation saved (rebuilt into that backend's own tuple there)."""
    x: torch.Tensor
    weight: torch.Tensor
    h: torch.Tensor  # x @ weight^T, as bias_activation saved it
    bias: torch.Tensor | None


def rebuild_saved(kind: type, tensors) -> tuple:
    """The saved tensors as the forward returned them: its NamedTuple ``kind`` (read by name), or
    a plain tuple."""
    return kind._make(tensors) if hasattr(kind, "_make") else tuple(tensors)


def save_named(ctx, saved: tuple) -> None:
    """``ctx.save_for_backward(*saved)``, keeping ``saved``'s NamedTuple type, so that
    ``saved_named(ctx)`` gives the backward the same tuple to read by name. One way for every
    autograd Function and custom-op autograd formula of the ops."""
    ctx.save_for_backward(*saved)
    ctx.saved_kind = type(saved)


def saved_named(ctx) -> tuple:
    return rebuild_saved(ctx.saved_kind, ctx.saved_tensors)


def eager() -> Backend:
    """The eager backend: the specification, and the code of every op a backend lacks."""
    return _registry["eager"]


def attention_runner(backend: Backend, need_weights: bool) -> Backend:
    """The backend whose code runs an attention call: ``backend``, or eager when the call needs
    the (seq x seq) weights and ``backend`` never forms them (fused attention)."""
    return eager() if need_weights and not backend.attention_weights else backend


def residual_rows(residual: torch.Tensor, dim: int) -> torch.Tensor:
    """``residual`` (..., dim) as a contiguous (R, dim) whose row r % R is residual's row r: the
    one way a residual reaches a backend's residual_layernorm kernels (cpu, triton and cuda all
    take (R, dim) rows with R dividing x's rows, row r of x adding row r % R).

    A residual broadcast over its leading dims (stride 0 there, as the position embeddings
    expanded over the batch are) gives its non-broadcast trailing rows without a copy; any other
    layout is copied to contiguous rows."""
    if residual.is_contiguous():
        return residual.reshape(-1, dim)
    sizes, strides = residual.shape[:-1], residual.stride()[:-1]
    lead = 0
    while lead < len(sizes) and (strides[lead] == 0 or sizes[lead] == 1):
        lead += 1
    base = residual[(0,) * lead]
    if lead > 0 and base.is_contiguous():
        return base.reshape(-1, dim)
    return residual.contiguous().reshape(-1, dim)


def linear_grads(x, weight, dh, need_dx, need_dweight):
    """(dx, dweight) of h = x @ weight^T given dh, each None unless needed. dh is first cast to
    x's dtype, as autograd would hand it to the matmul's backward, so the matmuls are the ones
    autograd runs for F.linear."""
    dh = dh.to(x.dtype)
    dx = dh.matmul(weight) if need_dx else None
    dweight = None
    if need_dweight:
        dweight = dh.reshape(-1, dh.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return dx, dweight


_registry: dict[str, Backend] = {}
_default: str | None = None  # set_default_backend
_override = contextvars.ContextVar("distilbert_fast_backend", default=None)  # use_backend
_last: dict[str, str] = {}  # op name -> backend that last ran it
_logged: dict[tuple[str, str], str] = {}  # (op, device type) -> backend last logged


def register_backend(backend: Backend) -> None:
    if backend.name in (AUTO, "?"):
        raise ValueError(f"backend name {backend.name!r} is reserved")
    _registry[backend.name] = backend


def registered_backends() -> list[str]:
    """Names of all registered backends, preferred first."""
    return [b.name for b in sorted(_registry.values(), key=lambda b: -b.priority)]


def available_backends(tensor: torch.Tensor) -> list[str]:
    """Names of the backends that can run on ``tensor`` (its device and dtype), preferred first."""
    return [n for n in registered_backends() if _registry[n].unsupported_reason(tensor) is None]


def check_backend_name(name: str) -> None:
    """Raises ValueError, listing the known names, unless ``name`` is 'auto' or registered."""
    if name != AUTO and name not in _registry:
        raise ValueError(
            f"backend must be one of {[AUTO] + registered_backends()}, got {name!r}"
        )


def set_default_backend(name: str | None) -> None:
    """Sets the backend used when an op is called without ``backend=`` (None clears it)."""
    global _default
    if name is not None:
        check_backend_name(name)
    _default = name


def get_default_backend() -> str | None:
    return _default


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("eager"): model(...)`` runs the ops inside on that backend."""
    check_backend_name(name)
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)


@torch.compiler.assume_constant_result
def _override_in_force() -> str | None:
    # dynamo cannot trace ContextVar.get (a graph break in every op of a model left on the
    # default backend): a compiled graph reads it once, when it is compiled
    return _override.get()


def resolve_backend(op: str, tensor: torch.Tensor, requested: str | None = None) -> Backend:
    """The backend that runs ``op`` on ``tensor`` for this request (see the module docstring)."""
    if onnx_exporting():
        # ONNX has no node for our custom ops: an export records every op's plain ATen code
        return _record(op, tensor, eager())
    name = requested or _override_in_force() or _default or os.environ.get(ENV_VAR) or AUTO
    if name == AUTO:
        for candidate in registered_backends():
            impl = _registry[candidate]
            if impl.auto_eligible(tensor) and impl.unsupported_reason(tensor) is None:
                return _record(op, tensor, impl)
        raise RuntimeError(
            f"no backend supports {op} on a {tensor.dtype} tensor on {tensor.device}"
        )
    check_backend_name(name)
    backend = _registry[name]
    reason = backend.unsupported_reason(tensor)
    if reason is not None:
        raise RuntimeError(
            f"backend {name!r} cannot run {op} on a {tensor.dtype} tensor on {tensor.device}: "
            f"{reason}"
        )
    return _record(op, tensor, backend)


def _record(op: str, tensor: torch.Tensor, backend: Backend) -> Backend:
    if torch.compiler.is_compiling():
        # dynamo would guard on _last's keys (recompiling when they change) and cannot trace the
        # logging calls: the custom ops record what ran at run time instead (custom.py); a
        # traceable backend's graph runs no op of ours, so it is recorded when the graph is traced
        if backend.traceable:
            _record_when_traced(op, backend.name)
        return backend
    _last[op] = backend.name
    key = (op, tensor.device.type)
    if _logged.get(key) != backend.name and logger.isEnabledFor(logging.DEBUG):
        logger.debug("%s on %s runs on backend %r", op, tensor.device.type, backend.name)
        _logged[key] = backend.name
    return backend


@torch.compiler.assume_constant_result
def _record_when_traced(op: str, name: str) -> bool:
    # dynamo runs this once, while it traces (its result taken as a constant)
    _last[op] = name
    return True


def last_backend(op: str | None = None):
    """The backend that last ran ``op`` ('masked_attention', 'bias_activation',
    'residual_layernorm', 'linear_activation', 'linear'), or a dict of every op run so far when
    ``op`` is None."""
    if op is None:
        return dict(_last)
    return _last.get(op)
