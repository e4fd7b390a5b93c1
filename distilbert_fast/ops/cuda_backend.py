"""The ``cuda`` backend: the hand-written CUDA kernels of ``kernels/cuda``, called through the
launchers in ``csrc/cuda`` (``distilbert_fast._C.cuda_*``).

Registered only when the extension was built with CUDA (``BUILD_INFO["with_cuda"]``); it runs on
CUDA tensors in float32, float16 and bfloat16, computing in float32.

- Dropout masks come from a counter-based hash of (seed, offset + element index), so the
  backward regenerates them instead of storing them. Each call draws its (seed, offset) into an
  int64 (2,) tensor on the device, from torch's CUDA generator (``torch.manual_seed`` makes runs
  reproducible), and the kernels read it there: nothing waits for the GPU, and a CUDA graph
  that captures the call replays the draw too, so each replay gets new masks (a seed passed as a
  host integer would be frozen into the graph). The masks differ from the eager backend's (which
  uses torch's own dropout), as any two dropout implementations do.
- The C++ entry points (``_C.cuda_<op>_fwd`` / ``_bwd``) are named and ordered like the cpu
  backend's (``_C.cpu_<op>_fwd`` / ``_bwd``), the dropout state where those take a keep mask.
- Cases the kernels do not cover run on the eager backend's code for that call (forward and the
  matching backward), on the same device: ``need_weights=True`` (the kernels never materialise
  the attention weights), ``head_dim`` above the kernels' limit (128; both attentions), and a
  residual_layernorm whose promoted dtype (``x`` + ``residual``) is not one of the three above.
- Under autocast, residual_layernorm returns float32, as the eager backend's ``F.layer_norm``
  does there.
"""

from typing import NamedTuple

import torch

from .backends import Backend, register_backend, residual_rows
from .eager import BiasActivationSaved, EagerBackend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # kernels/cuda/distilbert_kernels.h: kMaxHeadDim


def dropout_rng(device) -> torch.Tensor:
    """A fresh dropout (seed, offset), int64 (2,), drawn on ``device`` by its generator: no host
    sync, and drawn again by each replay of a CUDA graph that captured it."""
    return torch.randint(0, 2**62, (2,), dtype=torch.int64, device=device)


def _contiguous(t):
    return None if t is None else t.contiguous()


def _needs_grad(*tensors) -> bool:
    # Inside an autograd Function's forward grad mode is off but the inputs keep their
    # requires_grad flags; when none is set (or under inference_mode) no backward can follow, so
    # the tensors it would need are not made. Under plain no_grad with trainable parameters they
    # still are (the Function cannot tell): a little extra memory traffic, same results.
    if torch.is_inference_mode_enabled():
        return False
    return torch.is_grad_enabled() or any(t is not None and t.requires_grad for t in tensors)


class AttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor  # (batch, heads, seq) float32 log-sum-exp of each score row
    key_padding_mask: torch.Tensor | None
    head_mask: torch.Tensor | None
    rng: torch.Tensor | None  # int64 (2,) dropout (seed, offset) on the device


class VarlenAttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    lse: torch.Tensor  # (heads, total) float32 log-sum-exp of each score row
    cu_seqlens: torch.Tensor
    head_mask: torch.Tensor | None
    rng: torch.Tensor | None


class LayerNormSaved(NamedTuple):
    z: torch.Tensor  # dropout(x + x_bias) + residual, LayerNorm's input
    weight: torch.Tensor
    mean: torch.Tensor
    rstd: torch.Tensor
    rng: torch.Tensor | None


class RanOnEager(NamedTuple):
    """The saved_state of a call whose forward ran the eager backend's code: its backward must too."""

    state: object  # the eager forward's own saved_state


class CudaBackend(Backend):
    name = "cuda"
    priority = 20  # after triton (30), before cpu (10) and eager (0)

    def __init__(self, ext):
        self._C = ext
        self._eager = EagerBackend()

    def unsupported_reason(self, tensor):
        if tensor.device.type != "cuda":
            return f"the cuda backend needs a CUDA tensor, got one on {tensor.device}"
        if tensor.dtype not in DTYPES:
            return f"the cuda backend takes float32, float16 or bfloat16, got {tensor.dtype}"
        return None

    def _eager_forward(self, op, *args):
        outputs, saved, state = getattr(self._eager, f"{op}_forward")(*args)
        return outputs, saved, RanOnEager(state)

    # -- masked attention --------------------------------------------------------------------
    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        if need_weights or q.shape[-1] > MAX_HEAD_DIM:
            return self._eager_forward(
                "attention", q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights
            )
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = _contiguous(key_padding_mask)
        rng = dropout_rng(q.device) if dropout_p > 0.0 else None
        save = _needs_grad(q, k, v, head_mask)
        out, lse = self._C.cuda_masked_attention_fwd(
            q, k, v, mask, head_mask, rng, dropout_p, scale, save
        )
        saved = AttentionSaved(q, k, v, out, lse, mask, head_mask, rng) if save else ()
        return (out, None), saved, (dropout_p, scale)

    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        if isinstance(saved_state, RanOnEager):
            return self._eager.attention_backward(
                saved_tensors, saved_state.state, grad_out, grad_weights, needs_grad
            )
        s = saved_tensors
        dropout_p, scale = saved_state
        dq, dk, dv, dhead_mask = self._C.cuda_masked_attention_bwd(
            grad_out.to(s.q.dtype).contiguous(), s.q, s.k, s.v, s.out, s.lse, s.key_padding_mask,
            s.head_mask, s.rng, dropout_p, scale, s.head_mask is not None and needs_grad[4],
        )
        return dq, dk, dv, dhead_mask

    # -- varlen attention --------------------------------------------------------------------
    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        if q.shape[-1] > MAX_HEAD_DIM:
            return self._eager_forward(
                "varlen_attention", q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale
            )
        if scale is None:
            scale = q.shape[-1] ** -0.5
        # views of one fused QKV tensor share their strides and go in as they are
        if not (q.stride() == k.stride() == v.stride() and q.stride(-1) == 1):
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        rng = dropout_rng(q.device) if dropout_p > 0.0 else None
        save = _needs_grad(q, k, v, head_mask)
        out, lse = self._C.cuda_varlen_attention_fwd(
            q, k, v, cu_seqlens, max_seqlen, head_mask, rng, dropout_p, scale, save
        )
        saved = VarlenAttentionSaved(q, k, v, out, lse, cu_seqlens, head_mask, rng) if save else ()
        return out, saved, (max_seqlen, dropout_p, scale)

    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        if isinstance(saved_state, RanOnEager):
            return self._eager.varlen_attention_backward(
                saved_tensors, saved_state.state, grad_out, needs_grad
            )
        s = saved_tensors
        max_seqlen, dropout_p, scale = saved_state
        dq, dk, dv, dhead_mask = self._C.cuda_varlen_attention_bwd(
            grad_out.to(s.q.dtype).contiguous(), s.q, s.k, s.v, s.out, s.lse, s.cu_seqlens, max_seqlen,
            s.head_mask, s.rng, dropout_p, scale, s.head_mask is not None and needs_grad[5],
        )
        return dq, dk, dv, dhead_mask

    # -- bias + activation -------------------------------------------------------------------
    def bias_activation_forward(self, x, bias, activation):
        x, bias = x.contiguous(), _contiguous(bias)
        y = self._C.cuda_bias_activation_fwd(x, bias, activation)
        return y, BiasActivationSaved(x, bias), (activation,)

    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        (activation,) = saved_state
        dx, dbias = self._C.cuda_bias_activation_bwd(
            grad_out.to(s.x.dtype).contiguous(), s.x, s.bias, activation,
            s.bias is not None and needs_grad[1],
        )
        return dx, dbias

    # -- residual + LayerNorm ----------------------------------------------------------------
    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        # the dtype of z = x + residual, as eager's promotion gives it; float32 under autocast,
        # where eager's F.layer_norm runs in float32
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        if torch.is_autocast_enabled(x.device.type):
            dtype = torch.float32
        if dtype not in DTYPES:
            return self._eager_forward(
                "residual_layernorm", x, residual, weight, bias, eps, x_bias, dropout_p
            )
        save = _needs_grad(x, residual, weight, bias, x_bias)
        x = x.to(dtype).contiguous()
        if residual is not None:  # (R, dim) rows, row r % R: a broadcast residual is not copied
            residual = residual_rows(residual, x.shape[-1]).to(dtype).contiguous()
        rng = dropout_rng(x.device) if dropout_p > 0.0 else None
        y, z, mean, rstd = self._C.cuda_residual_layernorm_fwd(
            x, residual, weight, bias, eps, x_bias, rng, dropout_p, save
        )
        saved = LayerNormSaved(z, weight, mean, rstd, rng) if save else ()
        return y, saved, (dropout_p,)

    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        if isinstance(saved_state, RanOnEager):
            return self._eager.residual_layernorm_backward(
                saved_tensors, saved_state.state, grad_out, needs_grad
            )
        s = saved_tensors
        (dropout_p,) = saved_state
        needs = [needs_grad[0], needs_grad[1], needs_grad[2], needs_grad[3], needs_grad[5]]
        return tuple(self._C.cuda_residual_layernorm_bwd(
            grad_out.to(s.z.dtype).contiguous(), s.z, s.weight, s.rng, dropout_p, s.mean, s.rstd, needs
        ))


def _extension_with_cuda():
    """The compiled extension if it was built with the CUDA kernels, else None."""
    from .. import _extension

    return _extension._C if _extension.BUILD_INFO.get("with_cuda") else None


_ext = _extension_with_cuda()
if _ext is not None:
    register_backend(CudaBackend(_ext))
