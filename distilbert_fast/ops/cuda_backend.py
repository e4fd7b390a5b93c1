"""The ``cuda`` backend: the hand-written CUDA kernels of ``kernels/cuda``, called through the
launchers in ``csrc/cuda`` (``distilbert_fast._C.cuda_*``).

Registered only when the extension was built with CUDA (``BUILD_INFO["with_cuda"]``); it runs on
CUDA tensors in float32, float16 and bfloat16, computing in float32.

- Dropout masks come from a counter-based hash of (seed, element index), so the backward
  regenerates them instead of storing them. The seed of each call is drawn from torch's default
  generator, so ``torch.manual_seed`` makes runs reproducible; the masks differ from the eager
  backend's (which uses torch's own dropout), as any two dropout implementations do.
- Cases the kernels do not cover run on the eager backend's code for that call (forward and the
  matching backward), on the same device: ``need_weights=True`` (the kernels never materialise
  the attention weights), ``head_dim`` above the kernels' limit (128), and a residual_layernorm
  whose promoted dtype (``x`` + ``residual``) is not one of the three above.
- Under autocast, residual_layernorm returns float32, as the eager backend's ``F.layer_norm``
  does there.
"""

import torch

from .backends import Backend, register_backend
from .eager import ACTIVATIONS, EagerBackend

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128  # kernels/cuda/distilbert_kernels.h: kMaxHeadDim
_ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}  # the C++ enum's order
_EAGER = "eager"  # saved_state tag: this call's forward ran the eager code, so must its backward


def dropout_seed() -> int:
    """A fresh 62-bit seed from torch's default generator (CPU: no device sync)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


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
        return outputs, saved, (_EAGER, state)

    # -- masked attention --------------------------------------------------------------------
    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        if need_weights or q.shape[-1] > MAX_HEAD_DIM:
            return self._eager_forward(
                "attention", q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights
            )
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        mask = _contiguous(key_padding_mask)
        seed = dropout_seed() if dropout_p > 0.0 else 0
        save = _needs_grad(q, k, v, head_mask)
        out, lse = self._C.cuda_attention_forward(
            q, k, v, mask, head_mask, scale, dropout_p, seed, save
        )
        saved = (q, k, v, out, lse, mask, head_mask) if save else ()
        return (out, None), saved, ("cuda", dropout_p, scale, seed)

    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        if saved_state[0] == _EAGER:
            return self._eager.attention_backward(
                saved_tensors, saved_state[1], grad_out, grad_weights, needs_grad
            )
        q, k, v, out, lse, mask, head_mask = saved_tensors
        _, dropout_p, scale, seed = saved_state
        dq, dk, dv, dhead_mask = self._C.cuda_attention_backward(
            q, k, v, out, grad_out.to(q.dtype).contiguous(), mask, head_mask, lse, scale,
            dropout_p, seed, head_mask is not None and needs_grad[4],
        )
        return dq, dk, dv, dhead_mask

    # -- bias + activation -------------------------------------------------------------------
    def bias_activation_forward(self, x, bias, activation):
        x, bias = x.contiguous(), _contiguous(bias)
        y = self._C.cuda_bias_activation_forward(x, bias, _ACTIVATION_CODES[activation])
        return y, (x, bias), (activation,)

    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        x, bias = saved_tensors
        (activation,) = saved_state
        dx, dbias = self._C.cuda_bias_activation_backward(
            grad_out.to(x.dtype).contiguous(), x, bias, _ACTIVATION_CODES[activation],
            bias is not None and needs_grad[1],
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
        residual = None if residual is None else residual.to(dtype).contiguous()
        seed = dropout_seed() if dropout_p > 0.0 else 0
        y, z, mean, rstd = self._C.cuda_residual_layernorm_forward(
            x, residual, x_bias, weight, bias, eps, dropout_p, seed, save
        )
        saved = (z, weight, mean, rstd) if save else ()
        return y, saved, ("cuda", dropout_p, seed)

    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        if saved_state[0] == _EAGER:
            return self._eager.residual_layernorm_backward(
                saved_tensors, saved_state[1], grad_out, needs_grad
            )
        z, weight, mean, rstd = saved_tensors
        _, dropout_p, seed = saved_state
        dx, dresidual, dweight, dbias, dx_bias = self._C.cuda_residual_layernorm_backward(
            grad_out.to(z.dtype).contiguous(), z, weight, mean, rstd, dropout_p, seed,
            needs_grad[1], needs_grad[2], needs_grad[3], needs_grad[5],
        )
        return dx, dresidual, dweight, dbias, dx_bias


def _extension_with_cuda():
    """The compiled extension if it was built with the CUDA kernels, else None."""
    from .. import _extension

    return _extension._C if _extension.BUILD_INFO.get("with_cuda") else None


_ext = _extension_with_cuda()
if _ext is not None:
    register_backend(CudaBackend(_ext))
