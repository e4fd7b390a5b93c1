"""The first FFN matmul with its epilogue in one Triton kernel: y = act(x @ W^T + b).

    x (M, K) row-major, W (N, K) as nn.Linear stores it, b (N,)  ->  y (M, N)

A tiled matmul (float32 accumulation, grouped tile order for L2 reuse) whose epilogue adds the
bias and applies the activation (``triton_bias_activation.activation``) before the one store of
the output, so the pre-activation never makes a round trip through memory. When the caller will
need gradients it asks for the pre-activation z = x @ W^T + b too (``store_preact``): the
backward (in ``distilbert_fast.ops.triton_backend``) computes dz = dy * act'(z) with the
bias-activation backward kernel and the matmul gradients with torch. Saving z costs one extra
write of the output's size; recomputing it instead would cost a second matmul, several times
more. Without ``store_preact`` (inference) nothing extra is written.

float32 inputs use IEEE float32 products when torch's float32 matmul precision is "highest"
(torch's default), TF32 otherwise, as torch.matmul would.

Reading order: the kernel, the block-size rule, then the launcher ``linear_activation_fwd``.
No autograd here.
"""

import torch
import triton
from torch.fx.experimental.symbolic_shapes import guard_or_true
import triton.language as tl

from .triton_common import is_interpreted, launch_directly, nonempty, sm_count

from .triton_bias_activation import ACTIVATION_CODES, activation

_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit(do_not_specialize=["M"])
def _linear_activation_fwd_kernel(
    X,  # (M, K) activations, unit stride along K
    W,  # (N, K) weight, unit stride along K
    B,  # (N,) bias; unused unless HAS_BIAS
    Y,  # (M, N) output act(x @ W^T + b), row-major
    Z,  # (M, N) output pre-activation x @ W^T + b, row-major; unused unless STORE_Z
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    STORE_Z: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (float32 inputs only)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # grouped order: GROUP_M row blocks share each weight column block while it sits in L2
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # ragged edges: wrap out-of-range rows / columns onto valid ones (their results are never
    # stored), so only the K edge needs a load mask
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + cols[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # (BLOCK_K, BLOCK_N) of W^T
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    # epilogue: bias, activation, store
    n_ok = offs_n < N
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_mask = (offs_m[:, None] < M) & n_ok[None, :]
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if STORE_Z:
        tl.store(Z + out_offs, acc.to(Z.dtype.element_ty), mask=out_mask)
    tl.store(Y + out_offs, activation(acc, ACT).to(Y.dtype.element_ty), mask=out_mask)


_INTERPRETED = is_interpreted(_linear_activation_fwd_kernel)  # TRITON_INTERPRET=1 at import


def _config(m, n, dtype, device):
    """Block sizes and launch options, picked by rule rather than autotuned: autotuning compiles
    every candidate for every new shape bucket, which costs minutes across a test run. 128 x 128
    tiles while they still give every SM a tile, 64 x 128 for short inputs; float32 tiles sized
    to fit shared memory. For sm_90 (bench/triton_sm90.py, ptxas -v) at 768 x 3072 in 2-byte
    types none of these spill; 128 x 256 tiles (the plain matmul's sweet spot) spilled 240-340 B
    per thread around the activation epilogue."""
    if _INTERPRETED:  # big tiles: each program costs milliseconds here
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4)
    sms = sm_count(device)
    if dtype == torch.float32:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3)
    for bm, bn, warps, stages in ((128, 128, 8, 4), (64, 128, 4, 3)):
        if guard_or_true(triton.cdiv(m, bm) * triton.cdiv(n, bn) >= sms):  # m may be a symbol
            break
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, GROUP_M=8, num_warps=warps, num_stages=stages)


def suits(x, weight) -> bool:
    """Whether the fused kernel is the path for this shape: a supported dtype and rows of x and
    weight starting on 16-byte boundaries (K * itemsize % 16 == 0), which its vector loads need
    to run at full speed. Other shapes take the standalone path (torch matmul + the
    bias-activation kernel)."""
    return (
        x.dtype in _SUPPORTED_DTYPES
        and weight.dtype == x.dtype
        and x.shape[-1] > 0
        and (x.shape[-1] * x.element_size()) % 16 == 0
    )


def _dot_precision(dtype):
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def linear_activation_fwd(x, weight, bias, activation_name, store_preact=False, launch=launch_directly):
    """act(x @ weight^T + bias): x (..., K), weight (N, K), bias (N,) or None, x and weight of one
    dtype (float32, float16, bfloat16). Returns (y, z): y (..., N) in x's dtype; z the
    pre-activation (same shape and dtype) if ``store_preact``, else None."""
    if activation_name not in ACTIVATION_CODES:
        raise ValueError(f"activation must be one of {list(ACTIVATION_CODES)}, got {activation_name!r}")
    if x.dtype not in _SUPPORTED_DTYPES or weight.dtype != x.dtype:
        raise TypeError(
            f"x and weight must share a dtype in float32, float16, bfloat16; got {x.dtype}, {weight.dtype}"
        )
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k:
        raise ValueError(f"weight must have shape (N, {k}), got {tuple(weight.shape)}")
    n = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias must have shape {(n,)}, got {tuple(bias.shape)}")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    z = torch.empty_like(y) if store_preact else None
    if nonempty(m) and nonempty(n):
        config = _config(m, n, x.dtype, x.device)
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
        launch(_linear_activation_fwd_kernel)[grid](
            # (unused pointers get inputs, never outputs: see triton_bias_activation.bias_activation_bwd)
            x2, w, w if bias is None else bias, y, x2 if z is None else z, m, n, k,
            x2.stride(0), w.stride(0),
            ACT=ACTIVATION_CODES[activation_name], HAS_BIAS=bias is not None, STORE_Z=store_preact,
            DOT_PRECISION=_dot_precision(x.dtype), **config,
        )
    shape = (*x.shape[:-1], n)
    return y.view(shape), None if z is None else z.view(shape)
