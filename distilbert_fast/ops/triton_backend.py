"""The triton backend: the hot ops as Triton kernels (``distilbert_fast.kernels.triton_*``).

Runs on CUDA tensors in float32, float16 and bfloat16. On CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1`` in the environment before distilbert_fast is imported; float32
and float16, the interpreter mishandles bfloat16), which is how the CPU test suite checks the
kernels; ``auto`` never picks it there (see ``auto_eligible``), since the interpreter is slow.

Paths other than the fused kernels, chosen per call:
- masked_attention with ``need_weights=True`` (``output_attentions``): the (seq x seq) weights are
  exactly what the flash kernel never materialises, so that call runs the eager backend's code
  (same device, same forward and backward; ``Backend.attention_weights``).
- linear_activation: the fused matmul + epilogue kernel where ``triton_linear_activation.suits``
  the shape; otherwise the base class's standalone path (torch matmul, then this backend's
  bias-activation kernel).

Triton launches a kernel on the *current* CUDA device's current stream, whatever device its
tensors are on: every forward and backward here runs with its tensors' device made current
(``_on_tensor_device``, ``kernels.triton_common.device_guard``), so a model on ``cuda:1`` in a
process whose current device is ``cuda:0`` (a worker per GPU, a user's second model) launches on
cuda:1, on that device's current stream.

Dropout seeds are drawn per call from the tensor's device generator (so ``torch.manual_seed``
fixes them, and gradient checkpointing, which restores the RNG state, redraws the same ones) into
a (1,) int64 device tensor the kernels read, so nothing waits for the GPU. The backward
regenerates the mask from the saved seed.

Under a tracer (torch.compile, torch.export, jit.trace) the ops run the same methods on
``traced()``, whose kernels are ``triton_ops.OPS``: one ``torch.library.triton_op`` per launcher,
each forward op differentiated by this backend's backward method (``_differentiable``), so a
compiler sees the Triton kernels themselves and compiled training saves what eager mode saves.
Where torch lacks triton_op the backend is traced as an opaque custom op (``custom``).
"""

import functools
import os
from types import SimpleNamespace
from typing import NamedTuple

import torch

from ..kernels import triton_attention, triton_layernorm, triton_varlen_attention
from ..kernels.triton_bias_activation import INTERPRETED, bias_activation_bwd, bias_activation_fwd
from ..kernels.triton_common import device_guard
from ..kernels.triton_linear_activation import linear_activation_fwd, suits
from . import triton_ops
from .backends import Backend, linear_grads, register_backend, residual_rows, save_named, saved_named
from .eager import BiasActivationSaved
from .functional import _cast_grads, _dtypes

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)

# The launchers, called directly: the kernels of eager mode.
LAUNCHERS = SimpleNamespace(
    bias_activation_fwd=bias_activation_fwd, bias_activation_bwd=bias_activation_bwd,
    residual_layernorm_fwd=triton_layernorm.residual_layernorm_fwd,
    residual_layernorm_bwd=triton_layernorm.residual_layernorm_bwd,
    linear_activation_fwd=linear_activation_fwd,
    attention_fwd=triton_attention.attention_fwd, attention_bwd=triton_attention.attention_bwd,
    varlen_attention_fwd=triton_varlen_attention.varlen_attention_fwd,
    varlen_attention_bwd=triton_varlen_attention.varlen_attention_bwd,
)


def _first_tensor(args):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, tuple):  # a backward's saved tensors
            found = _first_tensor(arg)
            if found is not None:
                return found
    return None


def _on_tensor_device(method):
    """Runs a backend method with its first tensor argument's device current (see the module doc).
    The traced form needs no guard: each of its kernel ops guards its own launches."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        tensor = _first_tensor(args) if self.kernels is LAUNCHERS else None
        if tensor is None:
            return method(self, *args, **kwargs)
        with device_guard(tensor):
            return method(self, *args, **kwargs)
    return run


def _new_seed(device) -> torch.Tensor:
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _z_dtype(x, residual):
    """The dtype of z = x + residual (promoted, as eager's sum)."""
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


class AttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor  # (batch, heads, seq) float32 log-sum-exp of each score row
    key_padding_mask: torch.Tensor | None
    head_mask: torch.Tensor | None
    seed: torch.Tensor | None  # (1,) int64 dropout seed on the device


class VarlenAttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor  # (heads, 2, total) float32 softmax statistics of each score row
    cu_seqlens: torch.Tensor
    head_mask: torch.Tensor | None
    seed: torch.Tensor | None  # (1,) int64 dropout seed on the device


class LayerNormSaved(NamedTuple):
    x: torch.Tensor  # x and residual, not z: the backward recomputes z (see triton_layernorm)
    residual: torch.Tensor | None
    weight: torch.Tensor
    x_bias: torch.Tensor | None
    mean: torch.Tensor
    rstd: torch.Tensor
    seed: torch.Tensor | None


class LinearActivationSaved(NamedTuple):
    x: torch.Tensor
    weight: torch.Tensor
    z: torch.Tensor  # the pre-activation, bias included


class TritonBackend(Backend):
    name = "triton"
    priority = 30
    # under a tracer the ops run ``traced()``, whose kernels are triton ops (see the module doc)
    traceable = triton_ops.AVAILABLE

    def __init__(self, kernels=LAUNCHERS):
        self.kernels = kernels  # LAUNCHERS, or triton_ops.OPS in the traced form

    def traced(self):
        return _TRACED

    def unsupported_reason(self, tensor):
        device = tensor.device.type
        if device == "cpu":
            if not INTERPRETED:
                if os.environ.get("TRITON_INTERPRET") == "1":
                    return ("TRITON_INTERPRET=1 was set after the triton kernels were loaded; set it "
                            "before importing distilbert_fast")
                return "the triton backend runs on CUDA; on CPU only under TRITON_INTERPRET=1"
            if tensor.dtype not in _INTERPRETER_DTYPES:
                return f"dtype {tensor.dtype} is not supported under Triton's interpreter (float32, float16)"
            return None
        if device != "cuda":
            return f"the triton backend runs on CUDA (or on CPU under TRITON_INTERPRET=1), not {device}"
        if tensor.dtype not in _CUDA_DTYPES:
            return f"dtype {tensor.dtype} is not supported (float32, float16, bfloat16)"
        return None

    def auto_eligible(self, tensor):
        return tensor.device.type == "cuda"

    # -- masked attention --------------------------------------------------------------------
    @_on_tensor_device
    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        seed = _new_seed(q.device) if dropout_p > 0.0 else None
        out, lse = self.kernels.attention_fwd(q, k, v, key_padding_mask, head_mask, dropout_p, scale,
                                              seed)
        saved = AttentionSaved(q, k, v, out, lse, key_padding_mask, head_mask, seed)
        return (out, None), saved, (dropout_p, scale)

    @_on_tensor_device
    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        s = saved_tensors
        dropout_p, scale = saved_state
        return self.kernels.attention_bwd(s.q, s.k, s.v, s.out, s.lse, grad_out, s.key_padding_mask,
                                          s.head_mask, dropout_p, scale, s.seed, needs_grad[4])

    # -- varlen attention --------------------------------------------------------------------
    @_on_tensor_device
    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        seed = _new_seed(q.device) if dropout_p > 0.0 else None
        out, lse = self.kernels.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask,
                                                     dropout_p, scale, seed)
        saved = VarlenAttentionSaved(q, k, v, out, lse, cu_seqlens, head_mask, seed)
        return out, saved, (max_seqlen, dropout_p, scale)

    @_on_tensor_device
    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        max_seqlen, dropout_p, scale = saved_state
        return self.kernels.varlen_attention_bwd(s.q, s.k, s.v, s.out, s.lse, grad_out, s.cu_seqlens,
                                                 max_seqlen, s.head_mask, dropout_p, scale, s.seed,
                                                 needs_grad[5])

    # -- bias + activation -------------------------------------------------------------------
    @_on_tensor_device
    def bias_activation_forward(self, x, bias, activation):
        y = self.kernels.bias_activation_fwd(x, bias, activation)
        return y, BiasActivationSaved(x, bias), (activation,)

    @_on_tensor_device
    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        (activation,) = saved_state
        return self.kernels.bias_activation_bwd(s.x, s.bias, grad_out, activation,
                                                s.bias is not None and needs_grad[1])

    # -- residual + LayerNorm ----------------------------------------------------------------
    @_on_tensor_device
    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        # dtypes as eager's: z = h + residual promotes; LayerNorm's output follows z, except
        # under CUDA autocast, which runs layer_norm in float32
        z_dtype = _z_dtype(x, residual)
        out_dtype = torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else z_dtype
        seed = _new_seed(x.device) if dropout_p > 0.0 else None
        if residual is not None:
            residual = residual_rows(residual, x.shape[-1])  # (R, dim): read in place, row r % R
        y, mean, rstd = self.kernels.residual_layernorm_fwd(x, residual, weight, bias, eps, x_bias,
                                                            dropout_p, seed, out_dtype)
        saved = LayerNormSaved(x, residual, weight, x_bias, mean, rstd, seed)
        return y, saved, (dropout_p, z_dtype)

    @_on_tensor_device
    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        dropout_p, z_dtype = saved_state
        dx, dz, dweight, dbias, dx_bias = self.kernels.residual_layernorm_bwd(
            s.x, s.residual, s.weight, s.x_bias, s.mean, s.rstd, grad_out, dropout_p, s.seed,
            needs_grad[2] or needs_grad[3],  # need_dweight_dbias
            s.x_bias is not None and needs_grad[5],  # need_dx_bias
            z_dtype,
        )
        return (dx, dz if s.residual is not None else None, dweight if needs_grad[2] else None,
                dbias if needs_grad[3] else None, dx_bias)

    # -- linear + bias + activation ----------------------------------------------------------
    @_on_tensor_device
    def linear_activation_forward(self, x, weight, bias, activation, needs_grad):
        if not suits(x, weight):
            y, saved, state = super().linear_activation_forward(x, weight, bias, activation, needs_grad)
            return y, saved, ("standalone", state)
        # The pre-activation is stored for the backward only when one will follow (see
        # triton_linear_activation for why it is saved, not recomputed).
        y, z = self.kernels.linear_activation_fwd(x, weight, bias, activation, needs_grad)
        return y, LinearActivationSaved(x, weight, z), ("fused", activation)

    @_on_tensor_device
    def linear_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        path, state = saved_state
        if path == "standalone":
            return super().linear_activation_backward(saved_tensors, state, grad_out, needs_grad)
        s = saved_tensors
        # z already holds the bias: the kernel's column sums of dz are dbias
        dz, dbias = self.kernels.bias_activation_bwd(s.z, None, grad_out, state, needs_grad[2])
        dx, dweight = linear_grads(s.x, s.weight, dz, needs_grad[0], needs_grad[1])
        return dx, dweight, dbias


register_backend(TritonBackend())
_TRACED = TritonBackend(triton_ops.OPS) if triton_ops.AVAILABLE else None


# -- the traced form's autograd: each forward triton op differentiated by this backend --------------
def _differentiable(op, saved, backward, grads_of):
    """Registers ``op``'s autograd formula (``op`` a forward triton op of ``triton_ops``).

    saved(inputs, outputs) -> (saved tensors, state) as the backend's forward method returns them,
    from the op's inputs and outputs, each by its name in the op's signature; backward(saved,
    state, grad_out, needs_input_grad) -> the gradients of the inputs named in ``grads_of``, in
    that order (needs_input_grad is indexed like the op's inputs, which begin as the op's
    Function's do). Gradients are cast to their inputs' dtypes, as the Functions cast theirs."""
    names = [a.name for a in op._opoverload._schema.arguments]
    positions = [names.index(n) for n in grads_of]

    def setup_context(ctx, inputs, output):
        tensors, ctx.state = saved(SimpleNamespace(**dict(zip(names, inputs))), output)
        save_named(ctx, tensors)
        ctx.input_dtypes = _dtypes(*inputs)
        if isinstance(output, tuple):  # softmax or LayerNorm statistics, a saved pre-activation
            ctx.mark_non_differentiable(*output[1:])

    def grad(ctx, grad_out, *_):
        grads = [None] * len(names)
        for i, g in zip(positions, backward(saved_named(ctx), ctx.state, grad_out, ctx.needs_input_grad)):
            grads[i] = g
        return _cast_grads(grads, ctx.input_dtypes)

    op.register_autograd(grad, setup_context=setup_context)


def _residual_layernorm_backward(saved, state, grad_out, needs_grad):
    dx, dz, dweight, dbias, dx_bias = _TRACED.residual_layernorm_backward(saved, state, grad_out, needs_grad)
    if dz is not None and dz.numel() != saved.residual.numel():
        # the op's residual is the (R, dim) rows that x's rows cycle through (residual_rows)
        dz = dz.reshape(-1, *saved.residual.shape).sum(0)
    return dx, None if dz is None else dz.reshape(saved.residual.shape), dweight, dbias, dx_bias


def _linear_activation_backward(saved, state, grad_out, needs_grad):
    store_preact, activation = state
    if not store_preact:
        raise RuntimeError("triton_linear_activation_fwd ran with store_preact=False, so it kept no "
                           "pre-activation for a backward")
    return _TRACED.linear_activation_backward(saved, ("fused", activation), grad_out, needs_grad)


if _TRACED is not None:
    _differentiable(
        triton_ops.bias_activation_fwd,
        lambda a, y: (BiasActivationSaved(a.x, a.bias), (a.activation,)),
        _TRACED.bias_activation_backward, ("x", "bias"))
    _differentiable(
        triton_ops.residual_layernorm_fwd,
        lambda a, out: (LayerNormSaved(a.x, a.residual, a.weight, a.x_bias, out[1], out[2], a.seed),
                        (a.dropout_p, _z_dtype(a.x, a.residual))),
        _residual_layernorm_backward, ("x", "residual", "weight", "bias", "x_bias"))
    _differentiable(
        triton_ops.linear_activation_fwd,
        lambda a, out: (LinearActivationSaved(a.x, a.weight, out[1]), (a.store_preact, a.activation)),
        _linear_activation_backward, ("x", "weight", "bias"))
    _differentiable(
        triton_ops.attention_fwd,
        lambda a, out: (AttentionSaved(a.q, a.k, a.v, *out, a.key_padding_mask, a.head_mask, a.seed),
                        (a.dropout_p, a.scale)),
        lambda saved, state, grad_out, needs: _TRACED.attention_backward(saved, state, grad_out, None, needs),
        ("q", "k", "v", "head_mask"))
    _differentiable(
        triton_ops.varlen_attention_fwd,
        lambda a, out: (VarlenAttentionSaved(a.q, a.k, a.v, *out, a.cu_seqlens, a.head_mask, a.seed),
                        (a.max_seqlen, a.dropout_p, a.scale)),
        _TRACED.varlen_attention_backward, ("q", "k", "v", "head_mask"))
