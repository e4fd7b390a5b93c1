"""Residual + LayerNorm as Triton kernels, forward and backward, with the preceding linear's bias
and dropout folded in:

    h = dropout(x + x_bias)          keep with probability 1 - p, kept values scaled by 1 / (1 - p)
    z = h + residual
    y = (z - mean(z)) * rstd(z) * weight + bias,   rstd = 1 / sqrt(var(z) + eps)

Statistics and all arithmetic are float32 whatever the storage dtype (float32, float16,
bfloat16); x_bias, residual and dropout are each optional. The dropout mask is Philox
``tl.rand(seed, row * N + col)`` >= p: a pure function of the seed (an int64 on the device, so
drawing it needs no host sync) and the element's position, so the backward regenerates exactly
the forward's mask and a given seed always gives the same mask.

The backward recomputes z from x, x_bias, residual and the seed rather than reading a saved z:
the forward then writes only y and two floats per row, and the activation memory held for the
backward is x, which nothing else keeps (the eager backend keeps z instead; same size).

    dxhat     = dy * weight
    dz        = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))     -> d residual
    dx        = dz * keep / (1 - p)                                          -> d x (dz without dropout)
    dweight   = sum over rows of dy * xhat;  dbias = sum of dy;  dx_bias = sum of dx

Column sums are per-chunk float32 partials, added up by one small torch sum.

Reading order: jit helpers, the forward kernel, the backward kernel, then the launchers
``residual_layernorm_fwd`` / ``residual_layernorm_bwd`` and ``dropout_keep_mask`` (the mask
itself, for tests). No autograd here: ``distilbert_fast.ops`` wraps them.
"""

import torch
import triton
import triton.language as tl

from .triton_common import is_interpreted, launch_directly, nonempty, sm_count

from .triton_bias_activation import row_chunks

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_N = 65536  # one row lives in registers; wider rows would spill


# -- jit helpers --------------------------------------------------------------------------------
@triton.jit
def _keep(seed, offs, dropout_p):
    """Bool block: keep the element at flat offsets ``offs`` (int64)."""
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _residual_rows(rows, res_inner, res_stride_outer, res_stride_inner):
    """Element offset of each row's start in the residual, viewed as (outer, inner, N) with unit
    stride on N: an expanded (stride-0) batch dim is read in place, not copied."""
    rows64 = rows.to(tl.int64)
    return (rows64 // res_inner) * res_stride_outer + (rows64 % res_inner) * res_stride_inner


@triton.jit
def _load_z(X, XB, RES, seed, rows, cols, mask, N, res_inner, res_stride_outer, res_stride_inner,
            dropout_p, dropout_scale,
            HAS_X_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DROPOUT: tl.constexpr):
    """z = dropout(x + x_bias) + residual for a (BLOCK_M, BLOCK_N) tile, float32, 0 where masked.
    Also returns the keep mask (all True without dropout)."""
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    h = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X_BIAS:
        h += tl.load(XB + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    keep = mask
    if HAS_DROPOUT:
        keep = _keep(seed, offs, dropout_p)
        h = tl.where(keep, h * dropout_scale, 0.0)
    if HAS_RESIDUAL:
        res_offs = _residual_rows(rows, res_inner, res_stride_outer, res_stride_inner)
        h += tl.load(RES + res_offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return h, keep


# -- forward ------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "res_inner"])
def _residual_layernorm_fwd_kernel(
    X,  # (M, N) input, row-major
    XB,  # (N,) x_bias; unused unless HAS_X_BIAS
    RES,  # residual rows, see _residual_rows; unused unless HAS_RESIDUAL
    W,  # (N,) LayerNorm weight
    B,  # (N,) LayerNorm bias
    Y,  # (M, N) output, row-major
    MEAN,  # (M,) float32 output
    RSTD,  # (M,) float32 output
    SEED,  # (1,) int64 dropout seed; unused unless HAS_DROPOUT
    M,
    N,
    res_inner,
    res_stride_outer,
    res_stride_inner,
    eps,
    dropout_p,
    dropout_scale,  # 1 / (1 - dropout_p)
    HAS_X_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N: a whole row per tile row
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    row_ok = rows < M
    mask = row_ok[:, None] & col_ok[None, :]
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    z, _ = _load_z(X, XB, RES, seed, rows, cols, mask, N, res_inner, res_stride_outer,
                   res_stride_inner, dropout_p, dropout_scale, HAS_X_BIAS, HAS_RESIDUAL, HAS_DROPOUT)
    mean = tl.sum(z, axis=1) / N
    diff = tl.where(mask, z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


# -- backward -----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "res_inner", "rows_per_chunk"])
def _residual_layernorm_bwd_kernel(
    X,  # (M, N) forward input, row-major
    XB,  # (N,) x_bias; unused unless HAS_X_BIAS
    RES,  # residual rows, see _residual_rows; unused unless HAS_RESIDUAL
    W,  # (N,) LayerNorm weight
    MEAN,  # (M,) float32, from the forward
    RSTD,  # (M,) float32, from the forward
    SEED,  # (1,) int64 dropout seed; unused unless HAS_DROPOUT
    DY,  # (M, N) upstream gradient, row-major
    DZ,  # (M, N) output: gradient of z (= of the residual, and of x without dropout)
    DX,  # (M, N) output: dz * keep / (1 - p); unused unless HAS_DROPOUT
    DW_PARTIAL,  # (num_chunks, N) float32 outputs: per-chunk column sums of dy * xhat,
    DB_PARTIAL,  # of dy, (both unless NEED_DWB)
    DXB_PARTIAL,  # and of dx (unless NEED_DXB)
    M,
    N,
    res_inner,
    res_stride_outer,
    res_stride_inner,
    rows_per_chunk,  # a multiple of BLOCK_M
    dropout_p,
    dropout_scale,
    HAS_X_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    NEED_DWB: tl.constexpr,
    NEED_DXB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # >= N
):
    chunk = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    seed = tl.load(SEED) if HAS_DROPOUT else 0
    # elementwise accumulation (registers only), one reduction over the tile's rows at the end
    dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    dxb = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        z, keep = _load_z(X, XB, RES, seed, rows, cols, mask, N, res_inner, res_stride_outer,
                          res_stride_inner, dropout_p, dropout_scale, HAS_X_BIAS, HAS_RESIDUAL,
                          HAS_DROPOUT)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (z - mean[:, None]) * rstd[:, None], 0.0)
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dxhat = dy * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / N
        c2 = tl.sum(dxhat, axis=1) / N
        dz = tl.where(mask, (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
        dx = dz
        if HAS_DROPOUT:
            dx = tl.where(keep, dz * dropout_scale, 0.0)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if NEED_DWB:
            dw += dy * xhat
            db += dy
        if NEED_DXB:
            dxb += dx
    if NEED_DWB:
        tl.store(DW_PARTIAL + chunk * N + cols, tl.sum(dw, axis=0), mask=col_ok)
        tl.store(DB_PARTIAL + chunk * N + cols, tl.sum(db, axis=0), mask=col_ok)
    if NEED_DXB:
        tl.store(DXB_PARTIAL + chunk * N + cols, tl.sum(dxb, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["M"])
def _dropout_keep_kernel(
    SEED,  # (1,) int64
    KEEP,  # (M, N) bool output, as int8
    M,
    N,
    dropout_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(KEEP + offs, _keep(tl.load(SEED), offs, dropout_p).to(tl.int8), mask=mask)


# -- launchers ----------------------------------------------------------------------------------
_INTERPRETED = is_interpreted(_residual_layernorm_fwd_kernel)  # TRITON_INTERPRET=1 at import


def _blocks(n):
    """(BLOCK_M, BLOCK_N, num_warps): whole rows, several per program while a tile stays near
    4k elements on a GPU (16k under the interpreter, where each program costs milliseconds)."""
    block_n = triton.next_power_of_2(n)
    if _INTERPRETED:
        return max(1, 16384 // block_n), block_n, 4
    warps = min(max(block_n // 256, 4), 16)  # 8+ elements per thread along the row
    return max(1, 4096 // block_n), block_n, warps


def _as_rows(t, n):
    """(tensor, inner, stride_outer, stride_inner) describing ``t`` (..., n) as rows of unit
    stride: flat row r starts at (r // inner) * stride_outer + (r % inner) * stride_inner. Covers
    contiguous tensors and an expanded (stride-0) leading dim without a copy; anything else is
    made contiguous."""
    if t.stride(-1) == 1:
        if t.dim() == 1:
            return t, 1, 0, 0
        if t.dim() == 2:
            return t, t.shape[0], 0, t.stride(0)
        lead, inner = t.shape[:-2], t.shape[-2]
        # the leading dims must collapse into one stride: expanded (all 0) or contiguous
        collapsible = all(
            t.stride(i) == t.stride(i + 1) * t.shape[i + 1] for i in range(len(lead) - 1)
        ) or all(t.stride(i) == 0 for i in range(len(lead)))
        if collapsible:
            return t, inner, t.stride(len(lead) - 1), t.stride(-2)
    t = t.contiguous()
    return t, t.numel() // n if n else 0, 0, n


def _check(x, residual, weight, bias, x_bias):
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    n = x.shape[-1] if x.dim() else 0
    if not 0 < n <= MAX_N:
        raise ValueError(f"x's last dim must be in [1, {MAX_N}], got shape {tuple(x.shape)}")
    rows = x.numel() // n
    if residual is not None and (residual.device != x.device or not (
            residual.shape == x.shape or (residual.dim() == 2 and residual.shape[1] == n
                                          and residual.shape[0] > 0 and rows % residual.shape[0] == 0))):
        raise ValueError(
            f"residual must have shape {tuple(x.shape)}, or (R, {n}) with R dividing x's {rows} rows, "
            f"on {x.device}, got {tuple(residual.shape)} on {residual.device}"
        )
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is not None and (tuple(t.shape) != (n,) or t.device != x.device):
            raise ValueError(f"{name} must have shape {(n,)} on {x.device}, got {tuple(t.shape)} on {t.device}")


def residual_layernorm_fwd(x, residual, weight, bias, eps, x_bias=None, dropout_p=0.0, seed=None,
                           out_dtype=None, launch=launch_directly):
    """y = LayerNorm(dropout(x + x_bias) + residual) * weight + bias over the last dim.

    x: (..., N) float32/float16/bfloat16; residual: x's shape (any float dtype, may be an
    expanded view), or (R, N) rows with R dividing x's rows (row r of x adds row r % R: the ops
    layer's one way of broadcasting a residual, ``backends.residual_rows``), or None; weight, bias: (N,); x_bias: (N,) or None. ``dropout_p`` > 0 needs
    ``seed``, a (1,) int64 tensor on x's device. Returns (y, mean, rstd): y in ``out_dtype`` (default x's
    dtype), mean and rstd float32 (rows,), which ``residual_layernorm_bwd`` takes back."""
    _check(x, residual, weight, bias, x_bias)
    if dropout_p > 0.0 and seed is None:
        raise ValueError("seed must be given when dropout_p > 0")
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    y = torch.empty(x2.shape, dtype=out_dtype or x.dtype, device=x.device)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    if not nonempty(m):
        return y.view(x.shape), mean, rstd
    res, inner, s_outer, s_inner = _as_rows(residual, n) if residual is not None else (x2, 1, 0, 0)
    block_m, block_n, warps = _blocks(n)
    launch(_residual_layernorm_fwd_kernel)[(triton.cdiv(m, block_m),)](
        x2, x_bias if x_bias is not None else x2, res, weight, bias, y, mean, rstd,
        seed if seed is not None else x2, m, n, inner, s_outer, s_inner, float(eps),
        float(dropout_p), 1.0 / (1.0 - dropout_p),
        HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0.0, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y.view(x.shape), mean, rstd


def residual_layernorm_bwd(x, residual, weight, x_bias, mean, rstd, grad_out, dropout_p=0.0,
                           seed=None, need_dweight_dbias=True, need_dx_bias=True, dz_dtype=None,
                           launch=launch_directly):
    """Backward of ``residual_layernorm_fwd`` from its inputs, statistics and seed.

    Returns (dx, dresidual, dweight, dbias, dx_bias): dresidual (x's shape, ``dz_dtype``, default
    x's dtype) is the gradient of z; dx is the same tensor without dropout, else dz * keep / (1 -
    p) in x's dtype; dweight, dbias, dx_bias are float32 (N,) or None when not asked for."""
    _check(x, residual, weight, None, x_bias)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    dy = grad_out.contiguous().view(-1, n)
    m = x2.shape[0]
    has_dropout = dropout_p > 0.0
    dz = torch.empty(x2.shape, dtype=dz_dtype or x.dtype, device=x.device)
    # (unused pointers get inputs, never outputs: see triton_bias_activation.bias_activation_bwd)
    dx = torch.empty_like(x2) if has_dropout else x2
    block_m, block_n, warps = _blocks(n)
    if _INTERPRETED:
        block_m = min(block_m, 32)  # short sequential column sums (see row_chunks)
    else:
        # three float32 accumulator tiles besides the rows' own: with the forward's tile and warps
        # ptxas spilled 180-1,250 B per thread for sm_90 (bench/triton_sm90.py); half the rows and
        # twice the threads leave each thread a quarter of the elements, and no spills
        block_m, warps = max(1, block_m // 2), min(2 * warps, 16)
    # about 4 programs per SM (enough loads in flight), each walking a chunk of rows
    rows_per_chunk, chunks = row_chunks(m, block_m, 1 if _INTERPRETED else 4 * sm_count(x.device))

    def partial(needed):
        return torch.zeros(chunks, n, dtype=torch.float32, device=x.device) if needed else mean

    dw_p, db_p, dxb_p = partial(need_dweight_dbias), partial(need_dweight_dbias), partial(need_dx_bias)
    if nonempty(m):
        res, inner, s_outer, s_inner = _as_rows(residual, n) if residual is not None else (x2, 1, 0, 0)
        launch(_residual_layernorm_bwd_kernel)[(chunks,)](
            x2, x_bias if x_bias is not None else x2, res, weight, mean, rstd,
            seed if seed is not None else mean, dy, dz, dx, dw_p, db_p, dxb_p,
            m, n, inner, s_outer, s_inner, rows_per_chunk, float(dropout_p),
            1.0 / (1.0 - dropout_p),
            HAS_X_BIAS=x_bias is not None, HAS_RESIDUAL=residual is not None,
            HAS_DROPOUT=has_dropout, NEED_DWB=need_dweight_dbias, NEED_DXB=need_dx_bias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    dweight = dw_p.sum(0) if need_dweight_dbias else None
    dbias = db_p.sum(0) if need_dweight_dbias else None
    dx_bias = dxb_p.sum(0) if need_dx_bias else None
    return (dx if has_dropout else dz).view(x.shape), dz.view(x.shape), dweight, dbias, dx_bias


def dropout_keep_mask(seed, shape, dropout_p, device):
    """The bool keep mask (``shape``, last dim = N) the kernels above draw for ``seed``."""
    n = shape[-1]
    m = 1
    for s in shape[:-1]:
        m *= s
    keep = torch.empty(m, n, dtype=torch.int8, device=device)
    if m > 0:
        block_m, block_n, warps = _blocks(n)
        _dropout_keep_kernel[(triton.cdiv(m, block_m),)](
            seed, keep, m, n, float(dropout_p), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)
    return keep.view(shape).bool()
