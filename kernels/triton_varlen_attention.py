"""Varlen (packed-token) multi-head attention as flash-style Triton kernels, forward and backward.

    q, k, v: (total_tokens, heads, head_dim); sequence b is tokens cu_seqlens[b]:cu_seqlens[b+1]
    out_b   = (dropout(softmax(q_b k_b^T * scale)) * head_mask[h]) @ v_b     for every sequence b

Each sequence attends to its own tokens only; there is no padding and no key mask. The kernels
are the padded ones of ``triton_attention`` run with ``VARLEN=True``: each program reads its
sequence's window from cu_seqlens (``_sequence_window``), the launch grid covers
cdiv(max_seqlen, BLOCK) blocks per (sequence, head), and blocks past a shorter sequence's end
(and every block of a zero-length sequence) do nothing. The backward is FA2's: a dK/dV pass over
key blocks, each visiting its sequence's query blocks, and a dQ pass over query blocks; no
atomics, so results are deterministic.

Dropout draws the padded kernels' mask: Philox keyed on the seed with counter (key // 4, query,
sequence * heads + head, 0), key and query indices local to the sequence.

Layout: q, k, v may have any token and head strides with a unit stride on head_dim, e.g. the
(total, heads, head_dim) views of one (total, 3 * dim) fused QKV GEMM output (no copy is made).
out, dq, dk, dv are contiguous (total, heads, head_dim). ``max_seqlen`` is a host int (never read
from the device): it sizes the grid, so it must be at least the longest sequence.
"""

import torch
import triton

from .triton_attention import (
    _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_preprocess_kernel, _attn_fwd_kernel,
    _common_args, _configs, _unit_last_stride, check_head_mask_and_dropout, check_qkv,
)
from .triton_common import launch_directly, nonempty


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, seed):
    """The launchers' own checks (shapes, dtypes, devices, ranges); the values inside cu_seqlens
    are the caller's to check (reading them would sync with the device)."""
    check_qkv(q, k, v, "(total_tokens, heads, head_dim)")
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D int32 tensor of batch + 1 offsets, got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on {q.device}, got {cu_seqlens.device}")
    if (isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt))
            or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a Python int >= 0, got {max_seqlen!r}")
    check_head_mask_and_dropout(q, q.shape[1], head_mask, dropout_p, seed)


def _token_strides(t):
    """The padded kernels' (batch, head, seq) strides of a (total, heads, head_dim) tensor: the
    batch stride is 0, each program adding its sequence's start * the token stride."""
    return 0, t.stride(1), t.stride(0)


def varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale, seed,
                         launch=launch_directly):
    """Forward of varlen attention. Returns (out, lse).

    q, k, v: (total, heads, head_dim) float32 / float16 / bfloat16, any token and head strides
    (copied only if head_dim is not unit-stride). cu_seqlens: (batch + 1,) int32 on q's device,
    0 first, non-decreasing, total last. max_seqlen: a Python int >= the longest sequence.
    head_mask: (heads,) float or None. dropout_p in [0, 1); seed: a (1,) int64 tensor on q's
    device or an int in [0, 2**63), ignored when dropout_p is 0. scale: None for head_dim ** -0.5.

    out: contiguous (total, heads, head_dim) in q's dtype. lse: (heads, 2, total) float32, per
    token the softmax statistics of ``attention_fwd`` (row max and log2 of the row sum, in log2
    units).
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, seed)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    total, heads, head_dim = q.shape
    scale = head_dim**-0.5 if scale is None else scale
    batch = cu_seqlens.numel() - 1
    out = torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads, 2, total, dtype=torch.float32, device=q.device)
    if not (nonempty(q.numel()) and nonempty(batch) and nonempty(max_seqlen)):
        return out, lse
    ptrs, mask_strides, meta, scalars = _common_args(
        q, None, head_mask, dropout_p, scale, seed, cu_seqlens)
    fwd, _, _ = _configs(q, batch * heads, max_seqlen, dropout_p > 0.0)
    launch(_attn_fwd_kernel)[(triton.cdiv(max_seqlen, fwd["BLOCK_M"]) * batch * heads,)](
        q, k, v, out, lse, *ptrs,
        *_token_strides(q), *_token_strides(k), *_token_strides(v), *_token_strides(out),
        *mask_strides, 0, *lse.stride()[:2], heads, max_seqlen, *scalars, **meta, **fwd,
    )
    return out, lse


def varlen_attention_bwd(q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen, head_mask, dropout_p,
                         scale, seed, need_head_mask_grad, launch=launch_directly):
    """Backward of ``varlen_attention_fwd``: the same q, k, v, cu_seqlens, max_seqlen, head_mask,
    dropout_p, scale and seed, with its (out, lse) and the gradient of out (any strides).
    Returns (dq, dk, dv, dhead_mask): dq, dk, dv contiguous (total, heads, head_dim) in q's
    dtype; dhead_mask (heads,) float32 when ``need_head_mask_grad`` and head_mask is given, else
    None.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, seed)
    total, heads, head_dim = q.shape
    for name, t in (("out", out), ("grad_out", grad_out)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    stats_shape = (heads, 2, total)
    if lse.dtype != torch.float32 or tuple(lse.shape) != stats_shape or not lse.is_contiguous():
        raise ValueError(
            f"lse must be varlen_attention_fwd's contiguous float32 {stats_shape} tensor, got "
            f"{lse.dtype} {tuple(lse.shape)}"
        )
    scale = head_dim**-0.5 if scale is None else scale
    q, k, v, out = (_unit_last_stride(t) for t in (q, k, v, out))
    grad_out = _unit_last_stride(grad_out.to(q.dtype))  # e.g. an expanded (stride-0) gradient
    dq, dk, dv = (torch.empty(total, heads, head_dim, dtype=q.dtype, device=q.device)
                  for _ in range(3))
    need_hm = bool(need_head_mask_grad) and head_mask is not None
    batch = cu_seqlens.numel() - 1
    if not (nonempty(q.numel()) and nonempty(batch) and nonempty(max_seqlen)):
        dhm = torch.zeros(heads, dtype=torch.float32, device=q.device) if need_hm else None
        return dq.zero_(), dk.zero_(), dv.zero_(), dhm
    ptrs, mask_strides, meta, scalars = _common_args(
        q, None, head_mask, dropout_p, scale, seed, cu_seqlens)
    _, dkdv_cfg, dq_cfg = _configs(q, batch * heads, max_seqlen, dropout_p > 0.0)

    # delta = rowsum(dO * O) per (head, token): the padded preprocess over one "batch element"
    # of all tokens
    delta = torch.empty(heads, total, dtype=torch.float32, device=q.device)
    launch(_attn_bwd_preprocess_kernel)[(triton.cdiv(total, dq_cfg["BLOCK_M"]) * heads,)](
        out, grad_out, delta, *_token_strides(out), *_token_strides(grad_out), heads, total,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=dq_cfg["BLOCK_M"],
    )
    strides = (*_token_strides(q), *_token_strides(k), *_token_strides(v),
               *_token_strides(grad_out))
    stats_strides = (*mask_strides, 0, *lse.stride()[:2], 0, delta.stride(0))
    tail = (heads, max_seqlen, *scalars, float(scale))
    launch(_attn_bwd_dkdv_kernel)[(triton.cdiv(max_seqlen, dkdv_cfg["BLOCK_N"]) * batch * heads,)](
        q, k, v, grad_out, dk, dv, lse, delta, *ptrs,
        *strides, *_token_strides(dk), *stats_strides, *tail, **meta, **dkdv_cfg,
    )
    # per-token shares of dhead_mask, summed below (no atomics: deterministic)
    hm_rows = torch.empty_like(delta) if need_hm else delta
    launch(_attn_bwd_dq_kernel)[(triton.cdiv(max_seqlen, dq_cfg["BLOCK_M"]) * batch * heads,)](
        q, k, v, grad_out, dq, lse, delta, hm_rows, *ptrs,
        *strides, *_token_strides(dq), *stats_strides, *tail, int(need_hm), **meta, **dq_cfg,
    )
    dhm = hm_rows.sum(dim=1) if need_hm else None
    return dq, dk, dv, dhm
