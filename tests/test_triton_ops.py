"""The triton backend's elementwise kernels (bias + activation, residual + LayerNorm) and its fused
linear + activation kernel, against the eager backend, the specification.

Each comparison computes the op on ``triton`` in dtype d, on ``eager`` in d and on ``eager`` in
float64, and requires the triton error vs float64 to be at most about twice eager's own error in
d (STYLE.md's rule, ``test_ops.check_against_reference``), for the output and every gradient.

Without CUDA the kernels run under Triton's interpreter (conftest sets TRITON_INTERPRET=1): small
shapes, float32 and float16 (bfloat16 is skipped: the interpreter mishandles it). With CUDA the
same tests run on the GPU with bfloat16 and full-size shapes added. The attention kernel has its
own file (test_triton_attention.py); the op-level suite (test_ops.py) also runs on ``triton``.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from distilbert_fast import ops
from test_ops import check_against_reference, layernorm_args

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")

if "triton" not in ops.registered_backends():
    pytest.skip("triton is not installed", allow_module_level=True)
if "triton" not in ops.available_backends(torch.zeros(1, device=DEVICE)):
    pytest.skip(f"the triton backend cannot run on {DEVICE} here (TRITON_INTERPRET unset?)",
                allow_module_level=True)

from distilbert_fast.kernels import triton_layernorm, triton_linear_activation  # noqa: E402
from distilbert_fast.ops import backends  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOKENS = [1, 7, 65, 130] + ([4096] if ON_CUDA else [])
HIDDEN = [768, 100]  # the model's width and a non-power-of-two


def skip_unless_runs(dtype):
    if "triton" not in ops.available_backends(torch.zeros(1, dtype=dtype, device=DEVICE)):
        pytest.skip(f"triton does not run {dtype} on {DEVICE} (Triton's interpreter mishandles bfloat16)")


def on_device(args):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


def triton_vs_eager(op, args, grad_names, dtype):
    check_against_reference(functools.partial(op, backend="triton"), functools.partial(op, backend="eager"),
                            on_device(args), grad_names, dtype, ["y"])


# -- bias + activation --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_bias_activation(dtype, tokens, hidden):
    skip_unless_runs(dtype)
    args = dict(x=2.0 * torch.randn(tokens, hidden), bias=torch.randn(hidden), activation="gelu")
    triton_vs_eager(ops.bias_activation, args, ["x", "bias"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_bias_activation_each_activation(dtype, activation):
    """Wide range of inputs: where tanh / sigmoid saturate (|x| up to ~12) and near 0."""
    skip_unless_runs(dtype)
    args = dict(x=4.0 * torch.randn(3, 9, 100), bias=torch.randn(100), activation=activation)
    triton_vs_eager(ops.bias_activation, args, ["x", "bias"], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_activation_wide_rows_and_no_bias(dtype):
    """Rows wider than one column block (3000: several blocks, a ragged last one), and no bias."""
    skip_unless_runs(dtype)
    tokens = 512 if ON_CUDA else 5
    triton_vs_eager(ops.bias_activation, dict(x=torch.randn(tokens, 3000), bias=torch.randn(3000)),
                    ["x", "bias"], dtype)
    triton_vs_eager(ops.bias_activation, dict(x=torch.randn(2, tokens, 96), bias=None,
                                              activation="gelu_new"), ["x"], dtype)


# -- residual + LayerNorm ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_residual_layernorm(dtype, tokens, hidden):
    skip_unless_runs(dtype)
    triton_vs_eager(ops.residual_layernorm, layernorm_args((tokens, hidden)),
                    ["x", "residual", "weight", "bias", "x_bias"], dtype)


@pytest.mark.parametrize("with_residual,with_x_bias", [(True, False), (False, True), (False, False)],
                         ids=["residual", "xbias", "bare"])
def test_residual_layernorm_optional_inputs(with_residual, with_x_bias):
    args = layernorm_args((2, 9, 100), with_residual, with_x_bias)
    names = ["x", "weight", "bias"] + ["residual"] * with_residual + ["x_bias"] * with_x_bias
    triton_vs_eager(ops.residual_layernorm, args, names, torch.float32)


def test_residual_layernorm_expanded_residual_is_read_in_place():
    """The embeddings' position table arrives expanded over the batch (stride 0): same results,
    and the launcher reads it without a copy (rows addressed through its strides)."""
    pos = torch.randn(1, 7, 64)
    args = layernorm_args((3, 7, 64))
    args["residual"] = pos.expand(3, 7, 64)
    triton_vs_eager(ops.residual_layernorm, args, ["x", "residual", "weight", "bias"], torch.float32)
    res, inner, stride_outer, stride_inner = triton_layernorm._as_rows(args["residual"], 64)
    assert res.data_ptr() == pos.data_ptr() and (inner, stride_outer, stride_inner) == (7, 0, 64)


def test_residual_layernorm_mixed_dtypes_promote_like_eager():
    """A float16 x with a float32 residual (as under autocast) promotes z and y to float32."""
    args = on_device(layernorm_args((5, 48)))
    x16 = args["x"].half()
    y = ops.residual_layernorm(x16, args["residual"], args["weight"], args["bias"], x_bias=args["x_bias"],
                               backend="triton")
    expected = ops.residual_layernorm(x16, args["residual"], args["weight"], args["bias"],
                                      x_bias=args["x_bias"], backend="eager")
    assert y.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(y, expected, atol=2e-3, rtol=0)


# -- residual + LayerNorm dropout ----------------------------------------------------------------
def _dropout_run(seed, p=0.3, shape=(4, 33, 96)):
    torch.manual_seed(0)
    args = on_device(layernorm_args(shape))
    leaves = {k: args[k].requires_grad_(True) for k in ("x", "residual", "weight", "bias", "x_bias")}
    torch.manual_seed(seed)
    y = ops.residual_layernorm(**args, dropout_p=p, backend="triton")
    grads = torch.autograd.grad(y, list(leaves.values()), torch.ones_like(y) + y.detach())
    return y.detach(), grads


def test_residual_layernorm_dropout_is_deterministic_per_seed():
    """torch.manual_seed fixes the kernel's dropout mask (the seed comes from torch's generator):
    the same seed gives bit-identical outputs and gradients, another seed another mask."""
    y1, g1 = _dropout_run(seed=5)
    y2, g2 = _dropout_run(seed=5)
    y3, _ = _dropout_run(seed=6)
    assert torch.equal(y1, y2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    assert not torch.equal(y1, y3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_layernorm_dropout_kernels_use_one_mask(dtype):
    """Launcher level, with a known seed: the forward and every gradient match the eager formula
    applied with the mask the kernels draw for that seed (``dropout_keep_mask``)."""
    skip_unless_runs(dtype)
    p, shape = 0.25, (3, 17, 80)
    args = on_device(layernorm_args(shape))
    seed = torch.tensor([123456789], dtype=torch.int64, device=DEVICE)
    keep = triton_layernorm.dropout_keep_mask(seed, shape, p, DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05
    assert torch.equal(keep, triton_layernorm.dropout_keep_mask(seed, shape, p, DEVICE))  # a pure function

    def kernel_op(x, residual, weight, bias, eps, x_bias):
        return _KernelLayerNorm.apply(x, residual, weight, bias, eps, x_bias, p, seed)

    def masked_eager(x, residual, weight, bias, eps, x_bias):
        z = (x + x_bias) * keep.to(x.dtype) / (1 - p) + residual
        return F.layer_norm(z, (shape[-1],), weight, bias, eps)

    check_against_reference(kernel_op, masked_eager, args, ["x", "residual", "weight", "bias", "x_bias"],
                            dtype, ["y"])


class _KernelLayerNorm(torch.autograd.Function):
    """The launchers with a fixed seed, under autograd, for the test above."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, x_bias, p, seed):
        y, mean, rstd = triton_layernorm.residual_layernorm_fwd(x, residual, weight, bias, eps, x_bias, p, seed)
        ctx.save_for_backward(x, residual, weight, x_bias, mean, rstd, seed)
        ctx.p = p
        return y

    @staticmethod
    def backward(ctx, dy):
        x, residual, weight, x_bias, mean, rstd, seed = ctx.saved_tensors
        dx, dz, dw, db, dxb = triton_layernorm.residual_layernorm_bwd(x, residual, weight, x_bias, mean, rstd,
                                                                      dy, ctx.p, seed)
        return dx, dz, dw.to(weight.dtype), db.to(weight.dtype), None, dxb.to(x_bias.dtype), None, None


# -- linear + activation: the fused matmul epilogue ------------------------------------------------
FUSED_SHAPES = [(768, 256), (40, 1000)] + ([(768, 3072)] if ON_CUDA else [])  # (in, out) features


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("features", FUSED_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_activation_fused(dtype, tokens, features):
    skip_unless_runs(dtype)
    k, n = features
    args = dict(x=torch.randn(tokens, k), weight=torch.randn(n, k) * k**-0.5, bias=0.5 * torch.randn(n))
    x = args["x"].to(DEVICE, dtype)
    assert triton_linear_activation.suits(x, args["weight"].to(DEVICE, dtype)), "the fused kernel should run"
    triton_vs_eager(ops.linear_activation, args, ["x", "weight", "bias"], dtype)


@pytest.mark.parametrize("activation", ["gelu_new", "relu", "silu"])
def test_linear_activation_fused_activations_and_no_bias(activation):
    args = dict(x=torch.randn(2, 9, 64), weight=torch.randn(48, 64) / 8, bias=None, activation=activation)
    triton_vs_eager(ops.linear_activation, args, ["x", "weight"], torch.float32)


def test_linear_activation_standalone_path_for_unaligned_rows():
    """37 float32 features per row (148 bytes) do not suit the fused kernel: the standalone path
    (torch matmul + the bias-activation kernel) runs, with the same results."""
    args = dict(x=torch.randn(3, 7, 37), weight=torch.randn(50, 37) / 6, bias=torch.randn(50))
    assert not triton_linear_activation.suits(args["x"], args["weight"])
    triton_vs_eager(ops.linear_activation, args, ["x", "weight", "bias"], torch.float32)
    _, _, state = backends._registry["triton"].linear_activation_forward(
        *on_device(args).values(), "gelu", needs_grad=True)
    assert state[0] == "standalone"


def test_linear_activation_stores_the_preactivation_only_for_a_backward():
    triton = backends._registry["triton"]
    x, w, b = torch.randn(5, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE), torch.randn(24, device=DEVICE)
    y, saved, state = triton.linear_activation_forward(x, w, b, "gelu", needs_grad=False)
    assert state[0] == "fused" and saved[2] is None
    y2, saved2, _ = triton.linear_activation_forward(x, w, b, "gelu", needs_grad=True)
    assert torch.equal(y, y2)
    torch.testing.assert_close(saved2[2], F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no graph: the Function's forward is told no backward follows
        assert ops.linear_activation(x.requires_grad_(True), w, b, backend="triton").grad_fn is None


# -- launcher argument checks and empty inputs ----------------------------------------------------
def test_launchers_reject_bad_arguments():
    from distilbert_fast.kernels import triton_bias_activation

    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        triton_bias_activation.bias_activation_fwd(x, torch.randn(7, device=DEVICE), "gelu")
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_bias_activation.bias_activation_fwd(x, None, "tanh")
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        triton_bias_activation.bias_activation_fwd(x.double(), None, "gelu")
    with pytest.raises(ValueError, match="residual must have shape"):
        triton_layernorm.residual_layernorm_fwd(x, x[:3], torch.ones(8, device=DEVICE),
                                                torch.zeros(8, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="seed must be given"):
        triton_layernorm.residual_layernorm_fwd(x, None, torch.ones(8, device=DEVICE),
                                                torch.zeros(8, device=DEVICE), 1e-5, dropout_p=0.1)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, 8\)"):
        triton_linear_activation.linear_activation_fwd(x, torch.randn(5, 7, device=DEVICE), None, "gelu")


def test_empty_inputs():
    x = torch.randn(0, 16, device=DEVICE, requires_grad=True)
    w, b = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    y = ops.residual_layernorm(x, None, w, b, backend="triton") + ops.bias_activation(x, b, backend="triton")
    y = ops.linear_activation(y, torch.randn(8, 16, device=DEVICE), None, backend="triton")
    assert y.shape == (0, 8)
    y.sum().backward()
    assert x.grad.shape == (0, 16)
