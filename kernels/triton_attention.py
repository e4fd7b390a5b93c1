"""Masked multi-head attention as flash-style Triton kernels (forward and backward).

    weights = softmax(q k^T * scale, masked keys at the lowest score) (batch, heads, seq, seq)
    out     = (dropout(weights) * head_mask[h]) @ v                   (batch, heads, seq, head_dim)

the eager backend's arithmetic (``distilbert_fast/ops/eager.py``, the specification), computed
block by block with an online softmax in float32 so the (seq x seq) matrix never reaches memory.

Semantics worth knowing before reading the kernels:
- A batch element whose keys are all padding attends uniformly to every key (eager masks with the
  dtype's lowest value, so all its scores tie). The kernels find such "dead" rows up front and
  give every in-range key the score 0; masked scores get no gradient, so dead rows send none to q
  or k.
- Keys past the last unmasked key of a live row are skipped entirely (right padding costs
  nothing); masked keys inside that range score ``_NEG``, a finite stand-in for -inf that keeps
  the online softmax free of inf - inf.
- Dropout keeps each weight with probability 1 - p, drawn from Philox keyed on the seed with the
  counter (key index // 4, query index, batch * heads + head, 0), whose four outputs serve four
  adjacent keys: independent of block sizes, so the backward regenerates the forward's mask.

Layout: q, k, v may have any strides with a unit stride on head_dim (views into a packed QKV
buffer need no copy). out, dq, dk and dv are returned as (batch, heads, seq, head_dim) views of
(batch, seq, heads, head_dim)-contiguous memory, so merging the heads afterwards is free.

Reading order: jit helpers, the forward kernel, the three backward kernels, then the launchers
``attention_fwd`` and ``attention_bwd`` (no autograd here: ``distilbert_fast.ops`` wraps them).
"""

import torch
import triton
import triton.language as tl

from .triton_common import is_interpreted, launch_directly, nonempty, sm_count

_LOG2E = 1.4426950408889634
_NEG = tl.constexpr(-1.0e30)  # the score of a masked or out-of-range key, in log2 units
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Integer arguments Triton would otherwise specialise on (== 1, % 16): sequence lengths vary from
# batch to batch, and each specialisation is a fresh compile. (Flags that only pick a scalar, like
# has_head_mask, are runtime arguments for the same reason.)
_VARYING = ["heads", "seq", "stride_mb", "has_head_mask"]
_VARYING_STATS = ["stride_lb", "stride_lh", "stride_l2"]  # strides of Lse (and Delta, below)
_VARYING_BWD = _VARYING + _VARYING_STATS + ["stride_rb", "stride_rh"]
_MAX_HEAD_DIM = 256


# -- jit helpers --------------------------------------------------------------------------------
@triton.jit
def _key_extent(mask_row, stride_ms, seq, BLOCK: tl.constexpr):
    """For one batch element's key-padding mask: (kv_end, dead). kv_end is one past the last
    attended key (the keys a live row must visit); dead means no key is attended, in which case
    kv_end is seq (a dead row attends uniformly to all of them)."""
    # mask_row: (seq,) uint8, 1 = attend
    last = tl.zeros([], dtype=tl.int32) - 1
    for start in range(0, seq, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        attend = tl.load(mask_row + cols * stride_ms, mask=cols < seq, other=0)
        last = tl.maximum(last, tl.max(tl.where(attend != 0, cols, -1), axis=0))
    dead = last < 0
    kv_end = tl.where(dead, seq, last + 1)
    return kv_end, dead


@triton.jit
def _sequence_window(CuSeqlens, b, seq, VARLEN: tl.constexpr):
    """(start, length) of batch element b: its first token and its number of tokens. Padded:
    (0, seq), the batch stride locating it; varlen: its window of cu_seqlens (int32, batch + 1)."""
    if VARLEN:
        start = tl.load(CuSeqlens + b).to(tl.int64)
        length = tl.load(CuSeqlens + b + 1) - tl.load(CuSeqlens + b)
    else:
        start = tl.zeros([], dtype=tl.int64)
        length = seq
    return start, length


@triton.jit
def _dropout_keep(seed, dropout_p, rows, start_n, bh, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: keep the weight of query rows[i], key start_n + j in head-slice
    bh. One Philox call gives four numbers, spent on four adjacent keys: counter (key // 4,
    query, bh, 0). Only indices enter, so any block shape (start_n a multiple of 4) draws the
    same mask."""
    # rows: (BLOCK_M,) query indices
    groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
    c0, c1 = tl.broadcast(groups[None, :].to(tl.uint32), rows[:, None].to(tl.uint32))
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, zero + bh.to(tl.uint32), zero)
    # (BLOCK_M, BLOCK_N // 4, 2, 2) -> (BLOCK_M, BLOCK_N): key start_n + 4g + c draws from
    # r0, r2, r1, r3 for c = 0, 1, 2, 3
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
    return tl.uint_to_uniform_float(r) >= dropout_p


# -- forward ------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_VARYING + _VARYING_STATS)
def _attn_fwd_kernel(
    Q,  # (batch, heads, seq, head_dim), strides (stride_qb, stride_qh, stride_qs, 1)
    K,  # (batch, heads, seq, head_dim), strides (stride_kb, stride_kh, stride_ks, 1)
    V,  # (batch, heads, seq, head_dim), strides (stride_vb, stride_vh, stride_vs, 1)
    Out,  # (batch, heads, seq, head_dim), strides (stride_ob, stride_oh, stride_os, 1)
    Lse,  # (batch, heads, 2, seq) float32, contiguous: each row's max log2 score, log2 of its sum
    Mask,  # (batch, seq) uint8, 1 = attend, strides (stride_mb, stride_ms); read if HAS_MASK
    HeadMask,  # (heads,); read if has_head_mask
    Seed,  # (1,) int64 dropout seed; read if DROPOUT
    CuSeqlens,  # (batch + 1,) int32 token offsets of the sequences; read if VARLEN
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_mb, stride_ms,
    stride_lb, stride_lh, stride_l2,  # Lse: batch, head, statistic (row stride 1)
    heads, seq, has_head_mask,
    qk_scale,  # scale * log2(e): scores in log2 units, so exp2 replaces exp
    dropout_p, inv_keep,  # p and 1 / (1 - p)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BLOCK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head); query blocks of a head are adjacent in
    # the launch order so they share its K and V in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(seq, BLOCK_M)
    bh = pid // num_m
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    start, length = _sequence_window(CuSeqlens, b, seq, VARLEN)
    block_m = (pid % num_m) * BLOCK_M
    offs_m = block_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < length
    d_ok = offs_d < HEAD_DIM

    q = tl.load(Q + b * stride_qb + start * stride_qs + h * stride_qh + offs_m[:, None] * stride_qs
                + offs_d[None, :], mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + start * stride_ks + h * stride_kh
    v_base = V + b * stride_vb + start * stride_vs + h * stride_vh

    kv_end = tl.where(block_m < length, length, 0)  # a block past a short sequence's end: idle
    scale = qk_scale
    if HAS_MASK:
        mask_row = Mask + b * stride_mb
        kv_end, dead = _key_extent(mask_row, stride_ms, seq, MASK_BLOCK)
        scale = tl.where(dead, 0.0, qk_scale)  # a dead row's scores all tie at 0

    if DROPOUT:
        seed = tl.load(Seed)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + _NEG
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + offs_n
        attend = cols < length
        if HAS_MASK:
            key_on = tl.load(mask_row + cols * stride_ms, mask=attend, other=0) != 0
            attend = attend & (key_on | dead)
        kT = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=(cols[None, :] < length) & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(attend[None, :], s, _NEG)
        # Online softmax. While a live row has seen only masked keys its running sums are junk
        # at the _NEG level; its first attended key rescales them by exp2(_NEG - m) = 0.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)  # the softmax denominator ignores dropout
        if DROPOUT:
            keep = _dropout_keep(seed, dropout_p, offs_m, start_n, bh, BLOCK_M, BLOCK_N)
            p = tl.where(keep, p, 0.0)  # 1 / (1 - p) is applied once, at the end
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                    mask=(cols[:, None] < length) & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_scale = inv_keep
    if has_head_mask:
        out_scale = out_scale * tl.load(HeadMask + h).to(tl.float32)
    l_i = tl.where(l_i > 0.0, l_i, 1.0)  # an idle block's rows (not stored)
    out = acc * (out_scale / l_i)[:, None]
    out_base = Out + b * stride_ob + start * stride_os + h * stride_oh
    tl.store(out_base + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    # The max and log2(sum) apart: m + log2(l) in one float32 would lose the low bits of a peaked
    # row's p = 2^(s - m) / l when scores are large.
    lse_row = Lse + b * stride_lb + h * stride_lh + start + offs_m
    tl.store(lse_row, m_i, mask=m_ok)
    tl.store(lse_row + stride_l2, tl.math.log2(l_i), mask=m_ok)


# -- backward -----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=_VARYING[:2])
def _attn_bwd_preprocess_kernel(
    Out,  # (batch, heads, seq, head_dim), strides (stride_ob, stride_oh, stride_os, 1)
    DO,  # (batch, heads, seq, head_dim), strides (stride_dob, stride_doh, stride_dos, 1)
    Delta,  # (batch, heads, seq) float32, contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_os,
    stride_dob, stride_doh, stride_dos,
    heads, seq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # delta_i = sum_j P_ij dP_ij (the softmax backward's row term) = dO_i . O_i, with head_mask
    # and dropout already inside O.
    pid = tl.program_id(0)
    num_m = tl.cdiv(seq, BLOCK_M)
    bh = pid // num_m
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    offs_m = (pid % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < seq) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=ok, other=0.0)
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :]
    do = tl.load(do_ptrs, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + bh.to(tl.int64) * seq + offs_m, delta, mask=offs_m < seq)


@triton.jit(do_not_specialize=_VARYING_BWD)
def _attn_bwd_dkdv_kernel(
    Q,  # (batch, heads, seq, head_dim), strides (stride_qb, stride_qh, stride_qs, 1)
    K,  # (batch, heads, seq, head_dim), strides (stride_kb, stride_kh, stride_ks, 1)
    V,  # (batch, heads, seq, head_dim), strides (stride_vb, stride_vh, stride_vs, 1)
    DO,  # (batch, heads, seq, head_dim), strides (stride_dob, stride_doh, stride_dos, 1)
    DK,  # (batch, heads, seq, head_dim), strides (stride_gb, stride_gh, stride_gs, 1)
    DV,  # (batch, heads, seq, head_dim), same strides as DK
    Lse,  # (batch, heads, 2, seq) float32 from the forward, strides (stride_lb, stride_lh, stride_l2, 1)
    Delta,  # (batch, heads, seq) float32 from the preprocess kernel, strides (stride_rb, stride_rh, 1)
    Mask,  # (batch, seq) uint8, 1 = attend, strides (stride_mb, stride_ms); read if HAS_MASK
    HeadMask,  # (heads,); read if has_head_mask
    Seed,  # (1,) int64 dropout seed; read if DROPOUT
    CuSeqlens,  # (batch + 1,) int32 token offsets of the sequences; read if VARLEN
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_gb, stride_gh, stride_gs,
    stride_mb, stride_ms,
    stride_lb, stride_lh, stride_l2,
    stride_rb, stride_rh,
    heads, seq, has_head_mask, qk_scale, dropout_p, inv_keep, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BLOCK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    # One program: BLOCK_N keys of one (batch, head), visiting every query block. Blocks are
    # computed transposed, (keys, queries), so dK and dV accumulate without transposing P.
    pid = tl.program_id(0)
    num_n = tl.cdiv(seq, BLOCK_N)
    bh = pid // num_n
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    start, length = _sequence_window(CuSeqlens, b, seq, VARLEN)
    start_n = (pid % num_n) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = cols < length
    d_ok = offs_d < HEAD_DIM

    k_base = K + b * stride_kb + start * stride_ks + h * stride_kh
    v_base = V + b * stride_vb + start * stride_vs + h * stride_vh
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    q_base = Q + b * stride_qb + start * stride_qs + h * stride_qh
    do_base = DO + b * stride_dob + start * stride_dos + h * stride_doh
    lse_base = Lse + b * stride_lb + h * stride_lh + start
    delta_base = Delta + b * stride_rb + h * stride_rh + start

    attend = n_ok
    grad_ok = n_ok  # masked scores are constants: no gradient
    scale = qk_scale
    m_stop = tl.where(start_n < length, length, 0)  # a block past a short sequence's end: idle
    if HAS_MASK:
        kv_end, dead = _key_extent(Mask + b * stride_mb, stride_ms, seq, MASK_BLOCK)
        key_on = tl.load(Mask + b * stride_mb + cols * stride_ms, mask=n_ok, other=0) != 0
        attend = n_ok & (key_on | dead)
        grad_ok = n_ok & key_on
        scale = tl.where(dead, 0.0, qk_scale)
        # Keys past a live row's last attended key have zero weight: dK = dV = 0.
        m_stop = tl.where(start_n < kv_end, seq, 0)
    hm = 1.0
    if has_head_mask:
        hm = tl.load(HeadMask + h).to(tl.float32)
    if DROPOUT:
        seed = tl.load(Seed)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, m_stop, BLOCK_M):
        rows = start_m + offs_m
        rows_ok = rows < length
        qT = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None],
                     mask=rows_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :],
                     mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
        # Rows past the end load zeros everywhere, so their p is finite and their terms vanish.
        m = tl.load(lse_base + rows, mask=rows_ok, other=0.0)
        log2_l = tl.load(lse_base + stride_l2 + rows, mask=rows_ok, other=0.0)
        delta = tl.load(delta_base + rows, mask=rows_ok, other=0.0)

        sT = tl.dot(k, qT, input_precision=DOT_PRECISION) * scale  # (BLOCK_N, BLOCK_M)
        sT = tl.where(attend[:, None], sT, _NEG)
        pT = tl.math.exp2((sT - m[None, :]) - log2_l[None, :])  # softmax weights, before dropout
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dL/d(weights)
        if DROPOUT:
            keep = tl.trans(_dropout_keep(seed, dropout_p, rows, start_n, bh, BLOCK_M, BLOCK_N))
            pdT = tl.where(keep, pT * inv_keep, 0.0)  # dropped weights, before head_mask
            dprobsT = tl.where(keep, dpT * (hm * inv_keep), 0.0)
        else:
            pdT = pT
            dprobsT = dpT * hm
        dv += tl.dot((pdT * hm).to(do.dtype), do, input_precision=DOT_PRECISION)
        dsT = pT * (dprobsT - delta[None, :])
        dsT = tl.where(grad_ok[:, None], dsT, 0.0)
        dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    g_off = b * stride_gb + (start + cols[:, None]) * stride_gs + h * stride_gh + offs_d[None, :]
    g_ok = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=g_ok)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=g_ok)


@triton.jit(do_not_specialize=_VARYING_BWD + ["need_hm_grad"])
def _attn_bwd_dq_kernel(
    Q,  # (batch, heads, seq, head_dim), strides (stride_qb, stride_qh, stride_qs, 1)
    K,  # (batch, heads, seq, head_dim), strides (stride_kb, stride_kh, stride_ks, 1)
    V,  # (batch, heads, seq, head_dim), strides (stride_vb, stride_vh, stride_vs, 1)
    DO,  # (batch, heads, seq, head_dim), strides (stride_dob, stride_doh, stride_dos, 1)
    DQ,  # (batch, heads, seq, head_dim), strides (stride_gb, stride_gh, stride_gs, 1)
    Lse,  # (batch, heads, 2, seq) float32 from the forward, strides (stride_lb, stride_lh, stride_l2, 1)
    Delta,  # (batch, heads, seq) float32 from the preprocess kernel, strides (stride_rb, stride_rh, 1)
    HmRows,  # (batch, heads, seq) float32, Delta's strides: per-row share of dhead_mask; if need_hm_grad
    Mask,  # (batch, seq) uint8, 1 = attend, strides (stride_mb, stride_ms); read if HAS_MASK
    HeadMask,  # (heads,); read if has_head_mask
    Seed,  # (1,) int64 dropout seed; read if DROPOUT
    CuSeqlens,  # (batch + 1,) int32 token offsets of the sequences; read if VARLEN
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_dob, stride_doh, stride_dos,
    stride_gb, stride_gh, stride_gs,
    stride_mb, stride_ms,
    stride_lb, stride_lh, stride_l2,
    stride_rb, stride_rh,
    heads, seq, has_head_mask, qk_scale, dropout_p, inv_keep, sm_scale,
    need_hm_grad,  # write HmRows
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BLOCK: tl.constexpr, DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, VARLEN: tl.constexpr,
):
    # One program: BLOCK_M queries of one (batch, head), visiting the key blocks up to kv_end.
    pid = tl.program_id(0)
    num_m = tl.cdiv(seq, BLOCK_M)
    bh = pid // num_m
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    start, length = _sequence_window(CuSeqlens, b, seq, VARLEN)
    block_m = (pid % num_m) * BLOCK_M
    rows = block_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_ok = rows < length
    d_ok = offs_d < HEAD_DIM
    lse_base = Lse + b * stride_lb + h * stride_lh + start
    row_off = b * stride_rb + h * stride_rh + start  # of Delta and HmRows

    q = tl.load(Q + b * stride_qb + start * stride_qs + h * stride_qh + rows[:, None] * stride_qs
                + offs_d[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    do_ptrs = (DO + b * stride_dob + start * stride_dos + h * stride_doh
               + rows[:, None] * stride_dos + offs_d[None, :])
    do = tl.load(do_ptrs, mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.load(lse_base + rows, mask=rows_ok, other=0.0)
    log2_l = tl.load(lse_base + stride_l2 + rows, mask=rows_ok, other=0.0)
    delta = tl.load(Delta + row_off + rows, mask=rows_ok, other=0.0)
    k_base = K + b * stride_kb + start * stride_ks + h * stride_kh
    v_base = V + b * stride_vb + start * stride_vs + h * stride_vh

    kv_end = tl.where(block_m < length, length, 0)  # a block past a short sequence's end: idle
    scale = qk_scale
    if HAS_MASK:
        mask_row = Mask + b * stride_mb
        kv_end, dead = _key_extent(mask_row, stride_ms, seq, MASK_BLOCK)
        scale = tl.where(dead, 0.0, qk_scale)
    hm = 1.0
    if has_head_mask:
        hm = tl.load(HeadMask + h).to(tl.float32)
    if DROPOUT:
        seed = tl.load(Seed)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    hm_rows = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + offs_n
        attend = cols < length
        grad_ok = attend
        if HAS_MASK:
            key_on = tl.load(mask_row + cols * stride_ms, mask=attend, other=0) != 0
            grad_ok = attend & key_on
            attend = attend & (key_on | dead)
        kT = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None],
                     mask=(cols[None, :] < length) & d_ok[:, None], other=0.0)
        vT = tl.load(v_base + cols[None, :] * stride_vs + offs_d[:, None],
                     mask=(cols[None, :] < length) & d_ok[:, None], other=0.0)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION) * scale  # (BLOCK_M, BLOCK_N)
        s = tl.where(attend[None, :], s, _NEG)
        p = tl.math.exp2((s - m[:, None]) - log2_l[:, None])
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)  # dL/d(weights)
        if DROPOUT:
            keep = _dropout_keep(seed, dropout_p, rows, start_n, bh, BLOCK_M, BLOCK_N)
            dprobs = tl.where(keep, dp * (hm * inv_keep), 0.0)
            if need_hm_grad:  # sum_j dweights * dropped weights (1 / (1 - p) applied below)
                hm_rows += tl.sum(tl.where(keep, p * dp, 0.0), axis=1)
        else:
            dprobs = dp * hm
            if need_hm_grad:
                hm_rows += tl.sum(p * dp, axis=1)
        ds = p * (dprobs - delta[:, None])
        ds = tl.where(grad_ok[None, :], ds, 0.0)
        dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * stride_gb + (start + rows[:, None]) * stride_gs + h * stride_gh
             + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=rows_ok[:, None] & d_ok[None, :])
    if need_hm_grad:
        tl.store(HmRows + row_off + rows, hm_rows * inv_keep, mask=rows_ok)


# -- launchers ----------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_attn_fwd_kernel)  # TRITON_INTERPRET=1 at import


def _configs(q, batch_heads, seq, dropout):
    """Fixed block sizes (no autotuning, so each variant compiles once): dicts of BLOCK_M
    (queries), BLOCK_N (keys), num_warps and num_stages for the forward, dK/dV and dQ kernels,
    for batch_heads (batch, head) pairs of (at most) seq tokens of q's dtype and head_dim.
    The GPU choices are the largest tiles that compile for sm_90 without register spills,
    dropout included (checked with ptxas; timings on a GPU are still to be taken)."""
    head_dim = q.shape[-1]
    if _INTERPRETED:
        # Small, unequal blocks: the CPU tests cover several blocks, ragged edges at seq 65 / 130,
        # and a dropout mask regenerated under other block shapes than the forward's.
        return (dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1),
                dict(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1),
                dict(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1))
    wide = head_dim > 64
    if q.dtype == torch.float32:  # true fp32 products run on the FMA units: small tiles, 8 warps
        return (dict(BLOCK_M=32 if wide else 64, BLOCK_N=32, num_warps=8, num_stages=2),
                dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
                dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2))
    # 128-query blocks unless that leaves SMs idle (short sequences, small batches).
    if batch_heads * triton.cdiv(seq, 128) >= sm_count(q.device):
        fwd = dict(BLOCK_M=128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=3)
    else:  # (64 x 64 tiles with dropout would spill at 4 warps)
        fwd = dict(BLOCK_M=64, BLOCK_N=32 if wide or dropout else 64, num_warps=4, num_stages=3)
    dkdv = dict(BLOCK_M=32, BLOCK_N=32 if wide else 64, num_warps=8 if wide else 4, num_stages=2)
    dq = dict(BLOCK_M=64, BLOCK_N=32, num_warps=8 if wide else 4, num_stages=2)
    return fwd, dkdv, dq


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _grad_like(q):
    """An uninitialised (batch, heads, seq, head_dim) tensor laid out as (batch, seq, heads,
    head_dim), so transposing back to the model's token-major layout is free."""
    batch, heads, seq, head_dim = q.shape
    memory = torch.empty(batch, seq, heads, head_dim, dtype=q.dtype, device=q.device)
    return memory.permute(0, 2, 1, 3)


def check_qkv(q, k, v, layout):
    """Types, q's rank (that of ``layout``, e.g. '(batch, heads, seq, head_dim)') and dtype, k
    and v like q, head_dim in range, and a device the kernels run on."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != layout.count(",") + 1:
        raise ValueError(f"q must be {layout}, got shape {tuple(q.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise TypeError(f"{name} must be {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
    head_dim = q.shape[-1]
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in [1, {_MAX_HEAD_DIM}], got {head_dim}")
    if q.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            "triton attention needs CUDA tensors (or TRITON_INTERPRET=1 set before import), "
            f"got {q.device}"
        )


def check_head_mask_and_dropout(q, heads, head_mask, dropout_p, seed):
    if head_mask is not None:
        if tuple(head_mask.shape) != (heads,) or not head_mask.is_floating_point():
            raise ValueError(
                f"head_mask must be a float tensor of shape {(heads,)}, got {head_mask.dtype} "
                f"{tuple(head_mask.shape)}"
            )
        if head_mask.device != q.device:
            raise ValueError(f"head_mask must be on {q.device}, got {head_mask.device}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if isinstance(seed, torch.Tensor):
            if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != q.device:
                raise ValueError(
                    f"seed must be a (1,) int64 tensor on {q.device}, got {seed.dtype} "
                    f"{tuple(seed.shape)} on {seed.device}"
                )
        elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise ValueError(
                f"seed must be an int in [0, 2**63) or a (1,) int64 tensor, got {seed!r}")


def _check_inputs(q, k, v, key_padding_mask, head_mask, dropout_p, seed):
    check_qkv(q, k, v, "(batch, heads, seq, head_dim)")
    batch, heads, seq, head_dim = q.shape
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, seq):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape {(batch, seq)}, got "
                f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise ValueError(
                f"key_padding_mask must be on {q.device}, got {key_padding_mask.device}")
    check_head_mask_and_dropout(q, heads, head_mask, dropout_p, seed)


def _common_args(q, key_padding_mask, head_mask, dropout_p, scale, seed, cu_seqlens=None):
    """The arguments every kernel shares: the mask as bytes (a free view), dummies for absent
    optional pointers, and the scalar/constexpr settings. cu_seqlens: the varlen layout's
    sequence offsets (kernels/triton_varlen_attention.py), None for the padded layout."""
    dummy = q  # never read: the HAS_* flags are off
    if key_padding_mask is not None:
        mask = key_padding_mask.view(torch.uint8)
        mask_strides = mask.stride()
    else:
        mask, mask_strides = dummy, (0, 0)
    head_dim = q.shape[-1]
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_MASK=key_padding_mask is not None,
        # The mask scan's chunk: fixed, so sequence lengths share compiled kernels (small under
        # the interpreter, so the CPU tests scan several chunks).
        MASK_BLOCK=64 if _INTERPRETED else 512,
        DROPOUT=dropout_p > 0.0,
        # fp32 inputs get true fp32 products (as torch's matmul), not TF32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        VARLEN=cu_seqlens is not None,
    )
    # in the kernels' order: has_head_mask, qk_scale, dropout_p, inv_keep
    scalars = (int(head_mask is not None), float(scale) * _LOG2E, float(dropout_p),
               1.0 / (1.0 - float(dropout_p)))
    if dropout_p == 0.0:
        seed = dummy
    elif not isinstance(seed, torch.Tensor):
        seed = torch.tensor([seed], dtype=torch.int64, device=q.device)
    ptrs = (mask, head_mask if head_mask is not None else dummy, seed,
            cu_seqlens if cu_seqlens is not None else dummy)
    return ptrs, mask_strides, meta, scalars


def attention_fwd(q, k, v, key_padding_mask, head_mask, dropout_p, scale, seed, launch=launch_directly):
    """Forward of masked attention. Returns (out, lse).

    q, k, v: (batch, heads, seq, head_dim) float32 / float16 / bfloat16, any strides (copied only
    if head_dim is not unit-stride). key_padding_mask: (batch, seq) bool, True = attend, or None.
    head_mask: (heads,) float or None. dropout_p in [0, 1); seed: a (1,) int64 tensor on q's
    device (no host sync) or an int in [0, 2**63), ignored when dropout_p is 0. The same seed
    gives the same dropout mask, here and in ``attention_bwd``.

    out: (batch, heads, seq, head_dim) in q's dtype, a view of (batch, seq, heads, head_dim)
    memory. lse: (batch, heads, 2, seq) float32, the softmax statistics the backward needs, in
    log2 units (score_ij * log2 e): [:, :, 0] each row's max, [:, :, 1] log2 of its sum of
    2^(score - max); their sum times ln 2 is the row's natural log-sum-exp. A fully-masked row
    scores 0 everywhere: (0, log2(seq)).
    """
    _check_inputs(q, k, v, key_padding_mask, head_mask, dropout_p, seed)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, heads, seq, head_dim = q.shape
    out = _grad_like(q)
    lse = torch.empty(batch, heads, 2, seq, dtype=torch.float32, device=q.device)
    if not nonempty(q.numel()):
        return out, lse
    ptrs, mask_strides, meta, scalars = _common_args(
        q, key_padding_mask, head_mask, dropout_p, scale, seed)
    fwd, _, _ = _configs(q, batch * heads, seq, dropout_p > 0.0)
    launch(_attn_fwd_kernel)[(triton.cdiv(seq, fwd["BLOCK_M"]) * batch * heads,)](
        q, k, v, out, lse, *ptrs,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mask_strides,
        *lse.stride()[:3], heads, seq, *scalars, **meta, **fwd,
    )
    return out, lse


def attention_bwd(q, k, v, out, lse, grad_out, key_padding_mask, head_mask, dropout_p, scale, seed,
                  need_head_mask_grad, launch=launch_directly):
    """Backward of ``attention_fwd``: the same q, k, v, mask, head_mask, dropout_p, scale and seed,
    with its (out, lse) and the gradient of out (any strides). Returns (dq, dk, dv, dhead_mask):
    dq, dk, dv in q's dtype, (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim)
    memory; dhead_mask (heads,) float32 when ``need_head_mask_grad`` and head_mask is given, else
    None.
    """
    _check_inputs(q, k, v, key_padding_mask, head_mask, dropout_p, seed)
    batch, heads, seq, head_dim = q.shape
    for name, t in (("out", out), ("grad_out", grad_out)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    stats_shape = (batch, heads, 2, seq)
    if lse.dtype != torch.float32 or tuple(lse.shape) != stats_shape or not lse.is_contiguous():
        raise ValueError(
            f"lse must be attention_fwd's contiguous float32 {stats_shape} tensor, got "
            f"{lse.dtype} {tuple(lse.shape)}"
        )
    q, k, v, out = (_unit_last_stride(t) for t in (q, k, v, out))
    grad_out = _unit_last_stride(grad_out.to(q.dtype))  # e.g. an expanded (stride-0) gradient
    dq, dk, dv = _grad_like(q), _grad_like(q), _grad_like(q)
    need_hm = bool(need_head_mask_grad) and head_mask is not None
    if not nonempty(q.numel()):
        dhm = torch.zeros(heads, dtype=torch.float32, device=q.device) if need_hm else None
        return dq, dk, dv, dhm
    ptrs, mask_strides, meta, scalars = _common_args(
        q, key_padding_mask, head_mask, dropout_p, scale, seed)
    _, dkdv_cfg, dq_cfg = _configs(q, batch * heads, seq, dropout_p > 0.0)
    num_m = triton.cdiv(seq, dq_cfg["BLOCK_M"])

    delta = torch.empty(batch, heads, seq, dtype=torch.float32, device=q.device)
    launch(_attn_bwd_preprocess_kernel)[(num_m * batch * heads,)](
        out, grad_out, delta, *out.stride()[:3], *grad_out.stride()[:3], heads, seq,
        HEAD_DIM=head_dim, BLOCK_D=meta["BLOCK_D"], BLOCK_M=dq_cfg["BLOCK_M"],
    )
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3])
    stats_strides = (*mask_strides, *lse.stride()[:3], *delta.stride()[:2])
    tail = (heads, seq, *scalars, float(scale))
    launch(_attn_bwd_dkdv_kernel)[(triton.cdiv(seq, dkdv_cfg["BLOCK_N"]) * batch * heads,)](
        q, k, v, grad_out, dk, dv, lse, delta, *ptrs,
        *strides, *dk.stride()[:3], *stats_strides, *tail, **meta, **dkdv_cfg,
    )
    # per-row shares of dhead_mask, summed below (no atomics: deterministic)
    hm_rows = torch.empty_like(delta) if need_hm else delta
    launch(_attn_bwd_dq_kernel)[(num_m * batch * heads,)](
        q, k, v, grad_out, dq, lse, delta, hm_rows, *ptrs,
        *strides, *dq.stride()[:3], *stats_strides, *tail, int(need_hm), **meta, **dq_cfg,
    )
    dhm = hm_rows.sum(dim=(0, 2)) if need_hm else None
    return dq, dk, dv, dhm
