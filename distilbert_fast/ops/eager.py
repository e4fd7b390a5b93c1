"""The eager backend: the three hot ops in plain torch, forward and backward. This is the
specification every other backend is tested against.

The forwards are HuggingFace DistilBERT's own arithmetic (same torch calls, same order, same
random-number use), so the model matches it and, on CPU, consumes the dropout RNG identically.
The backwards are written out by hand, in float32 for half-precision inputs, so kernel authors have
the formulas to mirror; tests check them against torch.autograd and gradcheck.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..packing import varlen_to_padded_index
from .backends import Backend, register_backend

ACTIVATIONS = ("gelu", "gelu_new", "relu", "silu")
ACTIVATION_ALIASES = {"swish": "silu"}

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def canonical_activation(name) -> str:
    """'swish' -> 'silu'; raises ValueError naming the supported activations otherwise."""
    name = ACTIVATION_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(
            f"activation must be one of {list(ACTIVATIONS) + list(ACTIVATION_ALIASES)}, got {name!r}"
        )
    return name


def activation_forward(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_new":
        # HuggingFace's NewGELUActivation, term for term.
        return 0.5 * z * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * torch.pow(z, 3.0))))
    if activation == "relu":
        return F.relu(z)
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"unknown activation {activation!r}")


def activation_derivative(z: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(z) / dz, elementwise."""
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
        pdf = torch.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    if activation == "gelu_new":
        inner = _SQRT_2_OVER_PI * (z + 0.044715 * z**3)
        t = torch.tanh(inner)
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3 * 0.044715 * z * z)
    if activation == "relu":
        return (z > 0).to(z.dtype)
    if activation == "silu":
        s = torch.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(f"unknown activation {activation!r}")


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


def _sum_to_last_dim(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).sum(0)


class AttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    probs: torch.Tensor  # softmax output, before dropout and head_mask
    keep: torch.Tensor | None  # dropout keep-mask
    masked: torch.Tensor | None  # (batch, 1, 1, seq_k) True = padding
    head_mask: torch.Tensor | None


# the masked attention's saved tensors on the padded layout, and each packed token's row in it
VarlenAttentionSaved = NamedTuple(
    "VarlenAttentionSaved", [*AttentionSaved.__annotations__.items(), ("index", torch.Tensor)]
)


class BiasActivationSaved(NamedTuple):
    x: torch.Tensor
    bias: torch.Tensor | None


class LayerNormSaved(NamedTuple):
    z: torch.Tensor  # dropout(x + x_bias) + residual, LayerNorm's input
    weight: torch.Tensor
    keep: torch.Tensor | None


class EagerBackend(Backend):
    name = "eager"
    priority = 0  # the fallback: every other backend should be preferred where it runs
    traceable = True  # plain torch: a tracer inlines it (see custom)
    attention_weights = True

    def unsupported_reason(self, tensor):
        return None  # plain torch runs wherever torch does

    # -- masked attention --------------------------------------------------------------------
    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        # q, k, v: (batch, heads, seq, head_dim); key_padding_mask: (batch, seq) bool, True = keep
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, heads, seq_q, seq_k)
        masked = None
        if key_padding_mask is not None:
            masked = ~key_padding_mask[:, None, None, :]  # (batch, 1, 1, seq_k)
            # A fully-masked row gets the same (lowest) score everywhere: uniform weights, no NaN.
            scores = scores.masked_fill(masked, torch.finfo(scores.dtype).min)
        probs = F.softmax(scores, dim=-1)
        weights, keep = probs, None
        if dropout_p > 0.0:
            weights, keep = torch.native_dropout(probs, dropout_p, True)
        if head_mask is not None:
            weights = weights * head_mask.view(1, -1, 1, 1)
        out = torch.matmul(weights, v)  # (batch, heads, seq_q, head_dim)
        saved = AttentionSaved(q, k, v, probs, keep, masked, head_mask)
        return (out, weights if need_weights else None), saved, (dropout_p, scale)

    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        q, k, v, probs, keep, masked, head_mask = saved_tensors  # AttentionSaved
        dropout_p, scale = saved_state
        ct = _compute_dtype(q)
        qf, kf, vf, pf = q.to(ct), k.to(ct), v.to(ct), probs.to(ct)
        dout = grad_out.to(ct)

        dropped = pf if keep is None else pf * keep / (1.0 - dropout_p)  # weights before head_mask
        hm = None if head_mask is None else head_mask.to(ct).view(1, -1, 1, 1)
        weights = dropped if hm is None else dropped * hm

        dv = torch.matmul(weights.transpose(-1, -2), dout)
        dweights = torch.matmul(dout, vf.transpose(-1, -2))  # (batch, heads, seq_q, seq_k)
        if grad_weights is not None:
            dweights = dweights + grad_weights.to(ct)
        dhead_mask = None
        if head_mask is not None and needs_grad[4]:
            dhead_mask = (dweights * dropped).sum(dim=(0, 2, 3))
        dprobs = dweights if hm is None else dweights * hm
        if keep is not None:
            dprobs = dprobs * keep / (1.0 - dropout_p)
        # softmax backward: dS = P * (dP - sum_j P_j dP_j)
        dscores = pf * (dprobs - (pf * dprobs).sum(dim=-1, keepdim=True))
        if masked is not None:
            dscores = dscores.masked_fill(masked, 0.0)  # masked scores are constants
        dscores = dscores * scale
        dq = torch.matmul(dscores, kf)
        dk = torch.matmul(dscores.transpose(-1, -2), qf)
        return dq, dk, dv, dhead_mask

    # -- varlen attention --------------------------------------------------------------------
    # Each sequence is laid out in a padded (batch, heads, max_seqlen, head_dim) batch with a key
    # mask and runs the masked attention above; the padding rows are dropped again. Padded query
    # rows get zero upstream gradient, so they add nothing to any gradient.
    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        # q, k, v: (total, heads, head_dim); cu_seqlens: (batch + 1,) int32
        layout = _VarlenLayout(q, cu_seqlens, max_seqlen)
        (out, _), saved, state = self.attention_forward(
            layout.pad(q), layout.pad(k), layout.pad(v), layout.key_mask(), head_mask, dropout_p,
            scale, False,
        )
        saved = VarlenAttentionSaved(**saved._asdict(), index=layout.index)
        return layout.unpad(out), saved, (state, layout.batch, max_seqlen)

    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        state, batch, max_seqlen = saved_state
        layout = _VarlenLayout(grad_out, None, max_seqlen, batch=batch, index=s.index)
        padded = AttentionSaved._make(getattr(s, name) for name in AttentionSaved._fields)
        # needs_grad is indexed like (q, k, v, cu_seqlens, max_seqlen, head_mask, ...);
        # attention_backward's like (q, k, v, key_padding_mask, head_mask, ...)
        padded_needs = (*needs_grad[:3], False, needs_grad[5])
        dq, dk, dv, dhead_mask = self.attention_backward(
            padded, state, layout.pad(grad_out), None, padded_needs
        )
        return layout.unpad(dq), layout.unpad(dk), layout.unpad(dv), dhead_mask

    # -- bias + activation -------------------------------------------------------------------
    def bias_activation_forward(self, x, bias, activation):
        z = x if bias is None else x + bias
        return activation_forward(z, activation), BiasActivationSaved(x, bias), (activation,)

    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        x, bias = saved_tensors
        (activation,) = saved_state
        ct = _compute_dtype(x)
        z = x.to(ct) if bias is None else x.to(ct) + bias.to(ct)
        dz = grad_out.to(ct) * activation_derivative(z, activation)
        dbias = None
        if bias is not None and needs_grad[1]:
            dbias = _sum_to_last_dim(dz)
        return dz, dbias

    # -- residual + LayerNorm ----------------------------------------------------------------
    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        # y = LayerNorm(dropout(x + x_bias) + residual) over the last dim
        h = x if x_bias is None else x + x_bias
        keep = None
        if dropout_p > 0.0:
            h, keep = torch.native_dropout(h, dropout_p, True)
        z = h if residual is None else h + residual
        # (a constant width: the TorchScript-based ONNX exporter traces shapes as tensors)
        y = F.layer_norm(z, (int(z.shape[-1]),), weight, bias, eps)
        return y, LayerNormSaved(z, weight, keep), (eps, dropout_p)

    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        z, weight, keep = saved_tensors
        eps, dropout_p = saved_state
        ct = _compute_dtype(z)
        # Statistics recomputed in float32 (float64 for float64 input), not in a half type.
        zf = z.to(ct)
        mean = zf.mean(dim=-1, keepdim=True)
        rstd = torch.rsqrt(((zf - mean) ** 2).mean(dim=-1, keepdim=True) + eps)
        xhat = (zf - mean) * rstd
        dy = grad_out.to(ct)
        dxhat = dy * weight.to(ct)
        dz = rstd * (
            dxhat
            - dxhat.mean(dim=-1, keepdim=True)
            - xhat * (dxhat * xhat).mean(dim=-1, keepdim=True)
        )
        dweight = _sum_to_last_dim(dy * xhat) if needs_grad[2] else None
        dbias = _sum_to_last_dim(dy) if needs_grad[3] else None
        dh = dz if keep is None else dz * keep / (1.0 - dropout_p)
        dx_bias = _sum_to_last_dim(dh) if needs_grad[5] else None
        return dh, dz, dweight, dbias, dx_bias


class _VarlenLayout:
    """Packed (total, heads, head_dim) rows <-> a padded (batch, heads, max_seqlen, head_dim)
    batch, by each packed token's row in the padded layout (``index``)."""

    def __init__(self, like, cu_seqlens, max_seqlen, batch=None, index=None):
        self.total, self.heads, self.head_dim = like.shape
        self.max_seqlen = max_seqlen
        self.batch = cu_seqlens.shape[0] - 1 if batch is None else batch
        if index is None:
            index = varlen_to_padded_index(cu_seqlens, self.total, max_seqlen)
        self.index = index

    def key_mask(self):  # (batch, max_seqlen) bool, True at real tokens
        rows = torch.zeros(self.batch * self.max_seqlen, dtype=torch.bool, device=self.index.device)
        # a scatter of ones, not index_fill_(..., True): TorchScript (the TorchScript ONNX exporter)
        # types a Python bool as no Scalar, and exports index_fill with a wrongly shaped update
        ones = torch.ones_like(self.index, dtype=torch.bool)
        return rows.scatter(0, self.index, ones).view(self.batch, self.max_seqlen)

    def pad(self, t):  # (total, heads, head_dim) -> (batch, heads, max_seqlen, head_dim), zeros
        rows = t.new_zeros(self.batch * self.max_seqlen, self.heads, self.head_dim)
        rows = rows.index_copy(0, self.index, t)
        return rows.view(self.batch, self.max_seqlen, self.heads, self.head_dim).transpose(1, 2)

    def unpad(self, t):  # (batch, heads, max_seqlen, head_dim) -> (total, heads, head_dim)
        if t is None:
            return None
        rows = t.transpose(1, 2).reshape(self.batch * self.max_seqlen, self.heads, self.head_dim)
        return rows.index_select(0, self.index)


register_backend(EagerBackend())
