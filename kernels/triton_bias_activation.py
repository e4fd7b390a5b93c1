"""Bias + activation as Triton kernels: y = act(x + b) over (rows, features), forward and backward.

    forward   y     = act(x + b)
    backward  dx    = dy * act'(x + b)
              dbias = sum over rows of dx      (per-chunk partial sums in float32, then one sum)

Activations: gelu (erf), gelu_new (tanh approximation, HuggingFace's NewGELU), relu, silu. The
arithmetic runs in float32 whatever the storage dtype (float32, float16, bfloat16), as the eager
backend's backward does; any row width works (the features are tiled, not padded to a power of
two). ``activation`` / ``activation_grad`` are jit helpers the fused matmul epilogue
(``triton_linear_activation``) reuses.

Reading order: jit helpers, the forward kernel, the backward kernel, then the launchers
``bias_activation_fwd`` and ``bias_activation_bwd`` (no autograd here: ``distilbert_fast.ops``
wraps them).
"""

import torch
import triton
import triton.language as tl

from .triton_common import at_least, is_interpreted, launch_directly, nonempty, sm_count

# Activation codes: a constexpr per kernel variant. (In jit code a constexpr goes on the right of
# a tensor: the interpreter turns `constexpr * tensor` into a constexpr that tl.exp rejects.)
ACTIVATION_CODES = {"gelu": 0, "gelu_new": 1, "relu": 2, "silu": 3}
_GELU = tl.constexpr(0)
_GELU_NEW = tl.constexpr(1)
_RELU = tl.constexpr(2)
_SILU = tl.constexpr(3)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_GELU_NEW_C = tl.constexpr(0.044715)
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# -- jit helpers --------------------------------------------------------------------------------
@triton.jit
def _tanh_sech2(u):
    """(tanh(u), 1 - tanh(u)^2) from exp(-2|u|), which never overflows; the second is computed
    directly, not as 1 - t*t, so it keeps its relative accuracy where tanh saturates."""
    e = tl.exp(-2.0 * tl.abs(u))
    inv = 1.0 / (1.0 + e)
    t = (1.0 - e) * inv
    return tl.where(u < 0.0, -t, t), 4.0 * e * inv * inv


@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # never overflows
    inv = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, inv, e * inv)


@triton.jit
def activation(z, ACT: tl.constexpr):
    """act(z), elementwise; z in float32."""
    if ACT == _GELU:
        return 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT_2))
    elif ACT == _GELU_NEW:
        t, _ = _tanh_sech2((z + z * z * z * _GELU_NEW_C) * _SQRT_2_OVER_PI)
        return 0.5 * z * (1.0 + t)
    elif ACT == _RELU:
        return tl.maximum(z, 0.0)
    else:
        return z * _sigmoid(z)


@triton.jit
def activation_grad(z, ACT: tl.constexpr):
    """d act(z) / dz, elementwise; z in float32. The formulas of eager's activation_derivative."""
    if ACT == _GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT_2))
        return cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI
    elif ACT == _GELU_NEW:
        t, sech2 = _tanh_sech2((z + z * z * z * _GELU_NEW_C) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * z * sech2 * _SQRT_2_OVER_PI * (1.0 + z * z * (3.0 * _GELU_NEW_C))
    elif ACT == _RELU:
        return tl.where(z > 0.0, 1.0, 0.0)
    else:
        s = _sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


# -- forward ------------------------------------------------------------------------------------
# Row counts are not specialised on (Triton would compile a variant for M == 1 and for M % 16 == 0
# for no gain: rows are only masked); feature counts are, for aligned vector loads.
@triton.jit(do_not_specialize=["M"])
def _bias_activation_fwd_kernel(
    X,  # (M, N) input, row-major
    B,  # (N,) bias; unused unless HAS_BIAS
    Y,  # (M, N) output, row-major, X's dtype
    M,
    N,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # one (BLOCK_M, BLOCK_N) tile per program
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    mask = (rows[:, None] < M) & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        z += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + offs, activation(z, ACT).to(Y.dtype.element_ty), mask=mask)


# -- backward -----------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "rows_per_chunk"])
def _bias_activation_bwd_kernel(
    X,  # (M, N) forward input, row-major
    B,  # (N,) bias; unused unless HAS_BIAS
    DY,  # (M, N) upstream gradient, row-major
    DX,  # (M, N) output: dy * act'(x + b), X's dtype
    DBIAS_PARTIAL,  # (num_chunks, N) float32 output: per-chunk column sums of dx; unused unless NEED_DBIAS
    M,
    N,
    rows_per_chunk,  # a multiple of BLOCK_M
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # program (column block, row chunk): walks its chunk's rows BLOCK_M at a time, so the bias
    # gradient needs only one partial row per chunk
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    chunk = tl.program_id(1)
    col_ok = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    # elementwise accumulation (registers only), one reduction over the tile's rows at the end
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = chunk * rows_per_chunk
    row_end = tl.minimum(row_start + rows_per_chunk, M)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            z += b[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        dz = dy * activation_grad(z, ACT)  # 0 where masked: dy is 0 there
        tl.store(DX + offs, dz.to(DX.dtype.element_ty), mask=mask)
        if NEED_DBIAS:
            acc += dz
    if NEED_DBIAS:
        tl.store(DBIAS_PARTIAL + chunk * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# -- launchers ----------------------------------------------------------------------------------
INTERPRETED = is_interpreted(_bias_activation_fwd_kernel)  # TRITON_INTERPRET=1 at import


def _blocks(n_cols):
    """(BLOCK_M, BLOCK_N, num_warps): tiles of about 4k elements on a GPU (16 per thread with 8
    warps, so fp16 loads are 16 bytes wide); a few big tiles under the interpreter, where each
    program costs milliseconds."""
    block_n = min(triton.next_power_of_2(n_cols), 1024)
    if INTERPRETED:
        return max(1, 16384 // block_n), block_n, 4
    return max(1, 4096 // block_n), block_n, 8


def row_chunks(m, block_m, programs):
    """(rows_per_chunk, chunks) splitting m rows among about ``programs`` programs, in whole
    blocks of ``block_m`` rows. Under the interpreter every block is its own chunk: its column
    sums there are sequential float32 adds, so they are kept short and the final sum over
    chunks (torch's, pairwise) does the rest."""
    if INTERPRETED:
        programs = triton.cdiv(m, block_m)
    chunks = at_least(1, torch.sym_min(triton.cdiv(m, block_m), programs))
    rows_per_chunk = triton.cdiv(triton.cdiv(at_least(1, m), chunks), block_m) * block_m
    return rows_per_chunk, triton.cdiv(at_least(1, m), rows_per_chunk)


def _check(x, bias, activation):
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}")
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if bias is not None and (tuple(bias.shape) != (x.shape[-1],) or bias.device != x.device):
        raise ValueError(
            f"bias must have shape {(x.shape[-1],)} on {x.device}, got {tuple(bias.shape)} on {bias.device}"
        )


def bias_activation_fwd(x, bias, activation, launch=launch_directly):
    """act(x + bias) over x's last dim; x (..., N) float32/float16/bfloat16, bias (N,) or None
    (any float dtype: it is read as float32). Returns y, shaped and typed like x. ``launch``: see
    ``triton_common.launch_directly``."""
    _check(x, bias, activation)
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    m = x2.shape[0]
    y = torch.empty_like(x2)
    if nonempty(m):
        block_m, block_n, warps = _blocks(n)
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        launch(_bias_activation_fwd_kernel)[grid](
            x2, x2 if bias is None else bias, y, m, n,
            ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    return y.view(x.shape)


def bias_activation_bwd(x, bias, grad_out, activation, need_dbias, launch=launch_directly):
    """Backward of ``bias_activation_fwd``: (dx, dbias). dx has x's shape and dtype; dbias is
    float32 (N,), the column sums of dx, or None unless ``need_dbias``. With ``bias=None`` and
    ``need_dbias`` the sums are still returned: the fused matmul passes its saved pre-activation
    (bias already added) this way."""
    _check(x, bias, activation)
    if grad_out.shape != x.shape:
        raise ValueError(f"grad_out must have shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    dy = grad_out.contiguous().view(-1, n)
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    block_m, block_n, warps = _blocks(n)
    if INTERPRETED:
        block_m = min(block_m, 32)  # short sequential column sums (see row_chunks)
    col_blocks = triton.cdiv(n, block_n)
    # about 4 programs per SM, each walking a chunk of rows
    programs = 1 if INTERPRETED else max(1, 4 * sm_count(x.device) // col_blocks)
    rows_per_chunk, chunks = row_chunks(m, block_m, programs)
    # (an unused pointer gets an input, never an output: a tracer that cannot tell which pointers
    # a kernel writes takes every one for written, and an output passed twice loses its values)
    partial = torch.zeros(chunks, n, dtype=torch.float32, device=x.device) if need_dbias else x2
    if nonempty(m):
        launch(_bias_activation_bwd_kernel)[(col_blocks, chunks)](
            x2, x2 if bias is None else bias, dy, dx, partial, m, n, rows_per_chunk,
            ACT=ACTIVATION_CODES[activation], HAS_BIAS=bias is not None, NEED_DBIAS=need_dbias,
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
        )
    dbias = partial.sum(0) if need_dbias else None
    return dx.view(x.shape), dbias
