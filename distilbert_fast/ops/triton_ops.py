"""The triton backend's kernels as ``torch.library.triton_op``s: the form its ops take under a tracer.

One op per launcher, ``distilbert_fast::triton_<op>_fwd`` / ``triton_<op>_bwd``, each one node for
dynamo. Unlike an opaque custom op, a triton op shows the compilers what it does: AOT autograd
decomposes it into its allocations and one ``triton_kernel_wrapper_functional`` node per kernel
launch (``torch.library.wrap_triton``), so Inductor schedules the Triton kernels themselves beside
its own and, on CUDA, captures them in CUDA graphs (``mode="reduce-overhead"``). ``torch.export``
keeps each op as one node (a portable program); ``ExportedProgram.run_decompositions(
decompose_custom_triton_ops=True)`` shows the kernels there too.

Each op's body is the kernel's own launcher (``distilbert_fast.kernels.triton_*``) with a ``launch``
that records the launch (``_recorded``), inside the device guard the eager backend uses, so the op
run eagerly (an exported program's module, a direct call) launches on its tensors' device. Its
fake is the same body run on fake tensors (triton_op's rule), so the shapes, dtypes and strides are
the launcher's by construction. Outputs a launcher leaves out (None) are empty tensors here, and
``OPS`` maps them back: ``OPS`` has the launchers' call signatures and results, so the triton
backend runs the same code over either (``TritonBackend.kernels``). The forward ops' autograd
formulas are the backend's own backward methods, registered in ``triton_backend``.

``AVAILABLE`` is False on a torch without ``triton_op`` / ``wrap_triton``; the triton backend is
then traced as an opaque custom op (``custom.recomputed_op``), as every fused backend once was.
"""

import functools
from types import SimpleNamespace

import torch
from triton.runtime.jit import JITFunction

from ..kernels import triton_attention as _attention
from ..kernels import triton_bias_activation as _bias_activation
from ..kernels import triton_layernorm as _layernorm
from ..kernels import triton_linear_activation as _linear_activation
from ..kernels import triton_varlen_attention as _varlen_attention
from ..kernels.triton_common import device_guard, is_interpreted

Tensor = torch.Tensor
AVAILABLE = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


class _InterpretedJIT(JITFunction):
    """A ``JITFunction`` front for an interpreted kernel: what ``wrap_triton`` records, each launch
    run by Triton's interpreter.

    Under TRITON_INTERPRET=1 ``triton.jit`` gives an ``InterpretedFunction``, which ``wrap_triton``
    does not record (torch 2.13 launches it eagerly, fake tensors too; 2.11 refuses it). With this
    front the CPU tests trace, compile (``aot_eager``) and run the graphs a GPU gets, kernel
    launches included. Inductor cannot run it: its code for a user kernel asks Triton for the
    active GPU driver, and the interpreter is none."""

    def __init__(self, interpreted):
        super().__init__(interpreted.fn)
        self.interpreted = interpreted

    @property
    def cache_key(self):
        # torch keys the kernels it records by hash; Triton's hash walks the globals the source
        # names, which here are interpreted helpers it refuses
        return f"interpreted:{self.fn.__module__}.{self.fn.__qualname__}"

    def run(self, *args, grid, warmup=False, **kwargs):
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


@functools.lru_cache(maxsize=None)
def _interpreted_front(kernel):
    return _InterpretedJIT(kernel)


def _recorded(kernel):
    """The ops' ``launch``: the kernel as ``torch.library.wrap_triton`` gives it, a launch a tracer
    records (triton_op hands back the plain kernel while the op runs eagerly)."""
    return torch.library.wrap_triton(_interpreted_front(kernel) if is_interpreted(kernel) else kernel)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    """An output a launcher leaves out, as the op returns it: an empty tensor (an op's outputs
    are tensors)."""
    return like.new_empty(0) if t is None else t


# -- the ops, in the launchers' order -----------------------------------------------------------
# Registered only where torch has triton_op; the rest of this module is inert without it.
def _triton_op(name):
    return torch.library.triton_op(f"distilbert_fast::triton_{name}", mutates_args=())


if AVAILABLE:
    @_triton_op("bias_activation_fwd")
    def bias_activation_fwd(x: Tensor, bias: Tensor | None, activation: str) -> Tensor:
        with device_guard(x):
            return _bias_activation.bias_activation_fwd(x, bias, activation, launch=_recorded)

    @_triton_op("bias_activation_bwd")
    def bias_activation_bwd(x: Tensor, bias: Tensor | None, grad_out: Tensor, activation: str,
                            need_dbias: bool) -> tuple[Tensor, Tensor]:
        with device_guard(x):
            dx, dbias = _bias_activation.bias_activation_bwd(x, bias, grad_out, activation, need_dbias,
                                                             launch=_recorded)
        return dx, _or_empty(dbias, x)

    @_triton_op("residual_layernorm_fwd")
    def residual_layernorm_fwd(x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
                               eps: float, x_bias: Tensor | None, dropout_p: float, seed: Tensor | None,
                               out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        with device_guard(x):
            return _layernorm.residual_layernorm_fwd(x, residual, weight, bias, eps, x_bias, dropout_p,
                                                     seed, out_dtype, launch=_recorded)

    @_triton_op("residual_layernorm_bwd")
    def residual_layernorm_bwd(x: Tensor, residual: Tensor | None, weight: Tensor, x_bias: Tensor | None,
                               mean: Tensor, rstd: Tensor, grad_out: Tensor, dropout_p: float,
                               seed: Tensor | None, need_dweight_dbias: bool, need_dx_bias: bool,
                               dz_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        with device_guard(x):
            dx, dz, dweight, dbias, dx_bias = _layernorm.residual_layernorm_bwd(
                x, residual, weight, x_bias, mean, rstd, grad_out, dropout_p, seed,
                need_dweight_dbias, need_dx_bias, dz_dtype, launch=_recorded)
        # without dropout dx is dz itself, and an op's outputs may not alias one another
        dx = dx if dropout_p > 0.0 else None
        return tuple(_or_empty(t, mean) for t in (dx, dz, dweight, dbias, dx_bias))

    @_triton_op("linear_activation_fwd")
    def linear_activation_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str,
                              store_preact: bool) -> tuple[Tensor, Tensor]:
        with device_guard(x):
            y, z = _linear_activation.linear_activation_fwd(x, weight, bias, activation, store_preact,
                                                            launch=_recorded)
        return y, _or_empty(z, y)

    @_triton_op("attention_fwd")
    def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None,
                      head_mask: Tensor | None, dropout_p: float, scale: float,
                      seed: Tensor | None) -> tuple[Tensor, Tensor]:
        with device_guard(q):
            return _attention.attention_fwd(q, k, v, key_padding_mask, head_mask, dropout_p, scale, seed,
                                            launch=_recorded)

    @_triton_op("attention_bwd")
    def attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor,
                      key_padding_mask: Tensor | None, head_mask: Tensor | None, dropout_p: float,
                      scale: float, seed: Tensor | None,
                      need_head_mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with device_guard(q):
            dq, dk, dv, dhead_mask = _attention.attention_bwd(
                q, k, v, out, lse, grad_out, key_padding_mask, head_mask, dropout_p, scale, seed,
                need_head_mask_grad, launch=_recorded)
        return dq, dk, dv, _or_empty(dhead_mask, lse)

    @_triton_op("varlen_attention_fwd")
    def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                             head_mask: Tensor | None, dropout_p: float, scale: float,
                             seed: Tensor | None) -> tuple[Tensor, Tensor]:
        with device_guard(q):
            return _varlen_attention.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask,
                                                          dropout_p, scale, seed, launch=_recorded)

    @_triton_op("varlen_attention_bwd")
    def varlen_attention_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                             grad_out: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                             head_mask: Tensor | None, dropout_p: float, scale: float,
                             seed: Tensor | None,
                             need_head_mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with device_guard(q):
            dq, dk, dv, dhead_mask = _varlen_attention.varlen_attention_bwd(
                q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen, head_mask, dropout_p, scale, seed,
                need_head_mask_grad, launch=_recorded)
        return dq, dk, dv, _or_empty(dhead_mask, lse)


# -- the ops with the launchers' call signatures and results (None where a launcher gives None) --
def _bias_activation_bwd(x, bias, grad_out, activation, need_dbias):
    dx, dbias = bias_activation_bwd(x, bias, grad_out, activation, need_dbias)
    return dx, dbias if need_dbias else None


def _residual_layernorm_bwd(x, residual, weight, x_bias, mean, rstd, grad_out, dropout_p, seed,
                            need_dweight_dbias, need_dx_bias, dz_dtype):
    dx, dz, dweight, dbias, dx_bias = residual_layernorm_bwd(
        x, residual, weight, x_bias, mean, rstd, grad_out, dropout_p, seed, need_dweight_dbias,
        need_dx_bias, dz_dtype)
    return (dx if dropout_p > 0.0 else dz, dz, dweight if need_dweight_dbias else None,
            dbias if need_dweight_dbias else None, dx_bias if need_dx_bias else None)


def _linear_activation_fwd(x, weight, bias, activation, store_preact):
    y, z = linear_activation_fwd(x, weight, bias, activation, store_preact)
    return y, z if store_preact else None


def _attention_bwd(q, k, v, out, lse, grad_out, key_padding_mask, head_mask, dropout_p, scale, seed,
                   need_head_mask_grad):
    *grads, dhead_mask = attention_bwd(q, k, v, out, lse, grad_out, key_padding_mask, head_mask,
                                       dropout_p, scale, seed, need_head_mask_grad)
    return (*grads, dhead_mask if need_head_mask_grad and head_mask is not None else None)


def _varlen_attention_bwd(q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen, head_mask, dropout_p,
                          scale, seed, need_head_mask_grad):
    *grads, dhead_mask = varlen_attention_bwd(q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen,
                                              head_mask, dropout_p, scale, seed, need_head_mask_grad)
    return (*grads, dhead_mask if need_head_mask_grad and head_mask is not None else None)


OPS = SimpleNamespace(
    bias_activation_fwd=bias_activation_fwd, bias_activation_bwd=_bias_activation_bwd,
    residual_layernorm_fwd=residual_layernorm_fwd, residual_layernorm_bwd=_residual_layernorm_bwd,
    linear_activation_fwd=_linear_activation_fwd,
    attention_fwd=attention_fwd, attention_bwd=_attention_bwd,
    varlen_attention_fwd=varlen_attention_fwd, varlen_attention_bwd=_varlen_attention_bwd,
) if AVAILABLE else None
