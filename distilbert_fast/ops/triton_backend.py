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
(``_on_tensor_device``), so a model on ``cuda:1`` in a process whose current device is ``cuda:0``
(a worker per GPU, a user's second model) launches on cuda:1, on that device's current stream.

Dropout seeds are drawn per call from the tensor's device generator (so ``torch.manual_seed``
fixes them, and gradient checkpointing, which restores the RNG state, redraws the same ones) into
a (1,) int64 device tensor the kernels read, so nothing waits for the GPU. The backward
regenerates the mask from the saved seed.
"""

import contextlib
import functools
import os
from typing import NamedTuple

import torch

from ..kernels.triton_attention import attention_bwd, attention_fwd
from ..kernels.triton_bias_activation import INTERPRETED, bias_activation_bwd, bias_activation_fwd
from ..kernels.triton_layernorm import residual_layernorm_bwd, residual_layernorm_fwd
from ..kernels.triton_linear_activation import linear_activation_fwd, suits
from ..kernels.triton_varlen_attention import varlen_attention_bwd, varlen_attention_fwd
from .backends import Backend, linear_grads, register_backend, residual_rows
from .eager import BiasActivationSaved

_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_DTYPES = (torch.float32, torch.float16)


def _first_tensor(args):
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg
        if isinstance(arg, tuple):  # a backward's saved tensors
            found = _first_tensor(arg)
            if found is not None:
                return found
    return None


def device_guard(tensor):
    """``torch.cuda.device(tensor.device)`` where that is not already the current device; a no-op
    on CPU (the interpreter) and on the current device."""
    device = tensor.device
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def _on_tensor_device(method):
    """Runs a backend method with its first tensor argument's device current (see the module doc)."""
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        tensor = _first_tensor(args)
        with device_guard(tensor) if tensor is not None else contextlib.nullcontext():
            return method(self, *args, **kwargs)
    return run


def _new_seed(device) -> torch.Tensor:
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


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
        out, lse = attention_fwd(q, k, v, key_padding_mask, head_mask, dropout_p, scale, seed)
        saved = AttentionSaved(q, k, v, out, lse, key_padding_mask, head_mask, seed)
        return (out, None), saved, (dropout_p, scale)

    @_on_tensor_device
    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        s = saved_tensors
        dropout_p, scale = saved_state
        return attention_bwd(s.q, s.k, s.v, s.out, s.lse, grad_out, s.key_padding_mask, s.head_mask,
                             dropout_p, scale, s.seed, needs_grad[4])

    # -- varlen attention --------------------------------------------------------------------
    @_on_tensor_device
    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        seed = _new_seed(q.device) if dropout_p > 0.0 else None
        out, lse = varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p,
                                        scale, seed)
        saved = VarlenAttentionSaved(q, k, v, out, lse, cu_seqlens, head_mask, seed)
        return out, saved, (max_seqlen, dropout_p, scale)

    @_on_tensor_device
    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        max_seqlen, dropout_p, scale = saved_state
        return varlen_attention_bwd(s.q, s.k, s.v, s.out, s.lse, grad_out, s.cu_seqlens, max_seqlen,
                                    s.head_mask, dropout_p, scale, s.seed, needs_grad[5])

    # -- bias + activation -------------------------------------------------------------------
    @_on_tensor_device
    def bias_activation_forward(self, x, bias, activation):
        return bias_activation_fwd(x, bias, activation), BiasActivationSaved(x, bias), (activation,)

    @_on_tensor_device
    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        (activation,) = saved_state
        return bias_activation_bwd(s.x, s.bias, grad_out, activation,
                                   need_dbias=s.bias is not None and needs_grad[1])

    # -- residual + LayerNorm ----------------------------------------------------------------
    @_on_tensor_device
    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        # dtypes as eager's: z = h + residual promotes; LayerNorm's output follows z, except
        # under CUDA autocast, which runs layer_norm in float32
        z_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        out_dtype = torch.float32 if x.is_cuda and torch.is_autocast_enabled("cuda") else z_dtype
        seed = _new_seed(x.device) if dropout_p > 0.0 else None
        if residual is not None:
            residual = residual_rows(residual, x.shape[-1])  # (R, dim): read in place, row r % R
        y, mean, rstd = residual_layernorm_fwd(x, residual, weight, bias, eps, x_bias, dropout_p,
                                               seed, out_dtype)
        saved = LayerNormSaved(x, residual, weight, x_bias, mean, rstd, seed)
        return y, saved, (dropout_p, z_dtype)

    @_on_tensor_device
    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        dropout_p, z_dtype = saved_state
        dx, dz, dweight, dbias, dx_bias = residual_layernorm_bwd(
            s.x, s.residual, s.weight, s.x_bias, s.mean, s.rstd, grad_out, dropout_p, s.seed,
            need_dweight_dbias=needs_grad[2] or needs_grad[3],
            need_dx_bias=s.x_bias is not None and needs_grad[5],
            dz_dtype=z_dtype,
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
        y, z = linear_activation_fwd(x, weight, bias, activation, store_preact=needs_grad)
        return y, LinearActivationSaved(x, weight, z), ("fused", activation)

    @_on_tensor_device
    def linear_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        path, state = saved_state
        if path == "standalone":
            return super().linear_activation_backward(saved_tensors, state, grad_out, needs_grad)
        s = saved_tensors
        # z already holds the bias: the kernel's column sums of dz are dbias
        dz, dbias = bias_activation_bwd(s.z, None, grad_out, state, need_dbias=needs_grad[2])
        dx, dweight = linear_grads(s.x, s.weight, dz, needs_grad[0], needs_grad[1])
        return dx, dweight, dbias


register_backend(TritonBackend())
