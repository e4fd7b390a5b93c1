"""Correctness of the hot ops in ``distilbert_fast.ops`` against plain-torch composites.

Each op is checked against a reference written here from torch primitives with autograd (never
the backend's own code): forward outputs and every gradient, in float32, float16 and bfloat16 on
CPU, by STYLE.md's rule: |op(d) - ref(float64)| <= 2 * max|ref(d) - ref(float64)| + atol(d).
Backwards are also checked with ``torch.autograd.gradcheck`` in float64; dropout, which gradcheck
cannot see through, is checked by seeding the op and the reference alike (eager backend: both
draw from the CPU RNG the same way) and by its statistics.

The comparison tests run for every registered backend that runs on CPU: ``eager``, and ``triton``
through Triton's interpreter where CUDA is absent (conftest sets TRITON_INTERPRET=1); each test
skips the dtypes a backend does not run (the gradchecks need float64).
"""

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from distilbert_fast import ops

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The small absolute slack on top of 2x the reference's own error, per dtype.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


# -- references: plain torch, autograd does the backward ----------------------------------------
def ref_masked_attention(q, k, v, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=None,
                         need_weights=False):
    # q, k, v: (batch, heads, seq, head_dim); key_padding_mask: (batch, seq) bool, True = attend
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (batch, heads, seq_q, seq_k)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
    if head_mask is not None:
        weights = weights * head_mask.view(1, -1, 1, 1)
    out = torch.matmul(weights, v)
    return out, (weights if need_weights else None)


def ref_new_gelu(x):
    # HuggingFace's NewGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


REF_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": ref_new_gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def ref_bias_activation(x, bias, activation="gelu"):
    return REF_ACTIVATIONS[activation](x if bias is None else x + bias)


def ref_residual_layernorm(x, residual, weight, bias, eps=1e-12, x_bias=None, dropout_p=0.0):
    h = x if x_bias is None else x + x_bias
    h = F.dropout(h, p=dropout_p, training=dropout_p > 0)
    z = h if residual is None else h + residual
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps)


# -- helpers ------------------------------------------------------------------------------------
def cpu_backends():
    """Registered backends that run on CPU at all (checked per dtype in ``backend_for``)."""
    probe = torch.zeros(1)
    return [b for b in ops.registered_backends() if b in ops.available_backends(probe)]


def skip_unless_runs(backend, dtype):
    if backend not in ops.available_backends(torch.zeros(1, dtype=dtype)):
        pytest.skip(f"backend {backend!r} does not run {dtype} on CPU")


def _cast(value, dtype):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().to(dtype)
    return value


def forward_backward(fn, args, grad_names, round_to=None, upstream_seed=1234):
    """Runs ``fn(**args)``; backpropagates seeded random upstream gradients (rounded to
    ``round_to`` so every precision sees the same values) into the args named ``grad_names``.
    Returns (outputs, {name: grad}); outputs that are None are dropped."""
    args = dict(args)
    for name in grad_names:
        args[name] = args[name].detach().clone().requires_grad_(True)
    outs = fn(**args)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    gen = torch.Generator().manual_seed(upstream_seed)
    upstream = [
        torch.randn(o.shape, generator=gen).to(round_to or o.dtype).to(o.device, o.dtype) for o in outs
    ]
    grads = torch.autograd.grad(outs, [args[n] for n in grad_names], upstream)
    return [o.detach() for o in outs], dict(zip(grad_names, grads))


def assert_within_reference_error(name, actual, ref_d, ref64, dtype, gemm_bound=None):
    """STYLE.md: the op's error vs float64 is at most twice the reference's own error in
    ``dtype``, plus a small atol and one rounding step of ``dtype`` at the tensor's scale (the
    final cast alone can cost that; it matters when few elements make the reference's own error
    a small sample). ``gemm_bound`` (elementwise, see gemm_rounding_bound) also admits an
    element, for an op whose GEMM is another library's than the reference's. Reports max and
    mean differences."""
    assert actual.shape == ref64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == ref_d.dtype, f"{name}: dtype {actual.dtype} != {ref_d.dtype}"
    ref_err = (ref_d.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    rounding = torch.finfo(dtype).eps * (ref64.abs().max().item() if ref64.numel() else 0.0)
    bound = 2.0 * ref_err + ATOL[dtype] + rounding
    diff = (actual.double() - ref64).abs()
    within = diff <= bound
    if gemm_bound is not None:
        within |= diff <= gemm_bound
    if not bool(within.all()):  # also fails on NaN
        raise AssertionError(
            f"{name} ({dtype}): max abs diff vs float64 reference {diff.max().item():.3e}, "
            f"mean {diff.mean().item():.3e}; bound {bound:.3e} = 2 x reference's own error "
            f"{ref_err:.3e} + atol {ATOL[dtype]:.0e} + rounding {rounding:.1e}"
            f"{'' if gemm_bound is None else ' (or the GEMM rounding bound)'}; "
            f"{(~within).sum().item()} of {diff.numel()} elements off"
        )


def gemm_rounding_bound(x, weight, bias=None, lam=3.0):
    """Elementwise bound on the rounding of y = x @ weight^T + bias summed in float32, for a
    backend whose GEMM is another library's than eager's: how a library blocks the K sum is its
    own, and eager's GEMM can take a path several times more precise than a plain one on some
    machines (MKL at 7 rows, K 768, on one of ours: max error 2.1e-6 against oneDNN's 8.1e-6),
    so 2x eager's own error does not bound a correct float32 GEMM there. Higham & Mary's
    probabilistic bound for a sum of K products: lam * sqrt(K) * u * (|x| @ |weight|^T + |bias|),
    u = 2^-24. Measured: oneDNN stays under 15% of it at lam 3; GEMMs on TF32- or bf16-rounded
    inputs break it."""
    magnitude = x.double().abs() @ weight.double().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    return lam * math.sqrt(x.shape[-1]) * 2.0**-24 * magnitude


def check_against_reference(op, ref, args, grad_names, dtype, out_names, output_gemm_bounds=None):
    """op(dtype) vs ref(dtype) vs ref(float64) on the same (dtype-rounded) inputs: every output
    and every gradient, which must also come back in its input's dtype. ``output_gemm_bounds``:
    a function of the dtype-rounded args giving {output name: gemm_rounding_bound(...)}."""
    args_d = {k: _cast(v, dtype) for k, v in args.items()}
    args64 = {k: _cast(v, torch.float64) for k, v in args_d.items()}
    outs, grads = forward_backward(op, args_d, grad_names, round_to=dtype)
    outs_d, grads_d = forward_backward(ref, args_d, grad_names, round_to=dtype)
    outs64, grads64 = forward_backward(ref, args64, grad_names, round_to=dtype)
    assert len(outs) == len(outs_d) == len(out_names)
    gemm_bounds = output_gemm_bounds(args_d) if output_gemm_bounds is not None else {}
    for name, a, r, r64 in zip(out_names, outs, outs_d, outs64):
        assert_within_reference_error(name, a, r, r64, dtype, gemm_bounds.get(name))
    for name in grad_names:
        assert grads[name] is not None, f"no gradient for {name}"
        assert grads[name].dtype == args_d[name].dtype, (
            f"grad of {name} is {grads[name].dtype}, input is {args_d[name].dtype}"
        )
        assert_within_reference_error(f"grad {name}", grads[name], grads_d[name], grads64[name], dtype)


def make_key_padding_mask(kind, batch, seq):
    """None, all True ('ones'), or random with every row attending somewhere except the last
    row, which is fully masked when batch > 1 ('random')."""
    if kind is None:
        return None
    if kind == "ones":
        return torch.ones(batch, seq, dtype=torch.bool)
    mask = torch.rand(batch, seq) < 0.6
    mask[torch.arange(batch), torch.randint(seq, (batch,))] = True
    if batch > 1:
        mask[-1] = False
    return mask


def attention_args(batch, heads, seq, head_dim, mask_kind=None, with_head_mask=False, **kw):
    args = dict(
        q=torch.randn(batch, heads, seq, head_dim),
        k=torch.randn(batch, heads, seq, head_dim),
        v=torch.randn(batch, heads, seq, head_dim),
        key_padding_mask=make_key_padding_mask(mask_kind, batch, seq),
        head_mask=torch.rand(heads) + 0.25 if with_head_mask else None,
    )
    args.update(kw)
    return args


# -- masked_attention vs the reference ----------------------------------------------------------
ATTN_SHAPES = [  # (batch, heads, seq, head_dim)
    (1, 2, 1, 32),
    (3, 2, 7, 64),
    (2, 3, 65, 17),
    (1, 2, 130, 64),
    (3, 1, 130, 32),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "ones", "random"], ids=["nomask", "ones", "random"])
@pytest.mark.parametrize("variant", ["plain", "headmask_weights"])
def test_masked_attention_matches_reference(backend, dtype, shape, mask_kind, variant):
    skip_unless_runs(backend, dtype)
    heads_and_weights = variant == "headmask_weights"
    args = attention_args(*shape, mask_kind=mask_kind, with_head_mask=heads_and_weights,
                          need_weights=heads_and_weights)
    grad_names = ["q", "k", "v"] + (["head_mask"] if heads_and_weights else [])
    out_names = ["out", "weights"] if heads_and_weights else ["out"]
    op = functools.partial(ops.masked_attention, backend=backend)
    check_against_reference(op, ref_masked_attention, args, grad_names, dtype, out_names)


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_explicit_scale(backend):
    args = attention_args(2, 3, 9, 8, mask_kind="random", with_head_mask=True, scale=0.3,
                          need_weights=True)
    op = functools.partial(ops.masked_attention, backend=backend)
    check_against_reference(op, ref_masked_attention, args, ["q", "k", "v", "head_mask"],
                            torch.float32, ["out", "weights"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_weights_only_loss(backend):
    """The loss uses only the returned weights: backward gets no gradient for ``out``."""
    args = attention_args(2, 2, 6, 4, mask_kind="random", with_head_mask=True, need_weights=True)

    def weights_only(fn):
        return lambda **a: fn(**a)[1]

    op = functools.partial(ops.masked_attention, backend=backend)
    check_against_reference(weights_only(op), weights_only(ref_masked_attention), args,
                            ["q", "k", "head_mask"], torch.float32, ["weights"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_need_weights_false_returns_none(backend):
    q, k, v = torch.randn(3, 2, 2, 5, 4).unbind(0)
    out, weights = ops.masked_attention(q, k, v, backend=backend)
    assert weights is None
    assert out.shape == q.shape


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_all_ones_mask_equals_no_mask(backend):
    q, k, v = torch.randn(3, 2, 3, 11, 8).unbind(0)
    ones = torch.ones(2, 11, dtype=torch.bool)
    with_mask, w1 = ops.masked_attention(q, k, v, ones, need_weights=True, backend=backend)
    without, w2 = ops.masked_attention(q, k, v, None, need_weights=True, backend=backend)
    assert_close(with_mask, without, atol=1e-6, name="out")
    assert_close(w1, w2, atol=1e-6, name="weights")


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_non_contiguous_inputs(backend):
    """The model passes q, k, v as transposed views of (batch, seq, heads, head_dim)."""
    batch, seq, heads, head_dim = 2, 9, 3, 8
    base = [torch.randn(batch, seq, heads, head_dim) for _ in range(3)]
    q, k, v = (t.transpose(1, 2) for t in base)
    assert not q.is_contiguous()
    mask = make_key_padding_mask("random", batch, seq)
    args = dict(q=q, k=k, v=v, key_padding_mask=mask)
    op = functools.partial(ops.masked_attention, backend=backend)
    check_against_reference(op, ref_masked_attention, args, ["q", "k", "v"], torch.float32, ["out"])
    out_nc, _ = ops.masked_attention(q, k, v, mask, backend=backend)
    out_c, _ = ops.masked_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask, backend=backend)
    assert_close(out_nc, out_c, atol=1e-6, name="out (non-contiguous vs contiguous)")


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_partial_requires_grad(backend):
    """Only v and head_mask need gradients (q and k frozen)."""
    args = attention_args(2, 2, 5, 4, mask_kind="random", with_head_mask=True)
    op = functools.partial(ops.masked_attention, backend=backend)
    check_against_reference(op, ref_masked_attention, args, ["v", "head_mask"], torch.float32, ["out"])


# -- fully-masked rows ------------------------------------------------------------------------------
FULLY_MASKED_ATOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_masked_attention_fully_masked_row(backend, dtype, dropout_p):
    """A batch element whose keys are all padding attends uniformly to every key: its output is
    the mean of v, its weights are 1/seq, nothing is NaN, and it sends no gradient to q or k."""
    skip_unless_runs(backend, dtype)
    batch, heads, seq, head_dim = 3, 2, 7, 16
    args = attention_args(batch, heads, seq, head_dim, mask_kind="random", with_head_mask=False)
    mask = args["key_padding_mask"]
    assert not mask[-1].any() and mask[:-1].any(dim=1).all()
    q, k, v = (args[n].to(dtype).requires_grad_(True) for n in "qkv")
    out, weights = ops.masked_attention(q, k, v, mask, dropout_p=dropout_p, need_weights=True,
                                        backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(weights).all()
    if dropout_p == 0.0:
        expected = v[-1].detach().double().mean(dim=-2, keepdim=True).expand(heads, seq, head_dim)
        assert_close(out[-1], expected, atol=FULLY_MASKED_ATOL[dtype], name="out of fully-masked row")
        assert_close(weights[-1], torch.full((heads, seq, seq), 1.0 / seq),
                     atol=FULLY_MASKED_ATOL[dtype], name="weights of fully-masked row")
    (out.float() * torch.randn(out.shape)).sum().backward()
    for name, t in zip("qkv", (q, k, v)):
        assert t.grad is not None and t.grad.dtype == dtype, name
        assert torch.isfinite(t.grad).all(), f"grad {name} has non-finite values"
    assert torch.count_nonzero(q.grad[-1]) == 0, "fully-masked row sent a gradient to q"
    assert torch.count_nonzero(k.grad[-1]) == 0, "fully-masked row sent a gradient to k"
    assert torch.count_nonzero(q.grad[:-1]) > 0 and torch.count_nonzero(v.grad[-1]) > 0


# -- gradcheck in float64 -------------------------------------------------------------------------
def _double(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_gradcheck_mask_headmask_weights(backend):
    """Key padding with a fully-masked row, head_mask, and the weights used in the loss."""
    skip_unless_runs(backend, torch.float64)
    q, k, v = _double(2, 2, 4, 3), _double(2, 2, 4, 3), _double(2, 2, 4, 3)
    head_mask = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False]])

    def fn(q, k, v, head_mask):
        return ops.masked_attention(q, k, v, mask, head_mask, need_weights=True, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, head_mask))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("scale", [None, 0.7])
def test_masked_attention_gradcheck_plain(backend, scale):
    skip_unless_runs(backend, torch.float64)
    q, k, v = _double(1, 3, 5, 4), _double(1, 3, 5, 4), _double(1, 3, 5, 4)

    def fn(q, k, v):
        return ops.masked_attention(q, k, v, scale=scale, backend=backend)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu", "swish"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_activation_gradcheck(backend, activation, with_bias):
    skip_unless_runs(backend, torch.float64)
    x = _double(2, 3, 5)
    bias = _double(5) if with_bias else None
    inputs = (x, bias) if with_bias else (x,)

    def fn(x, bias=None):
        return ops.bias_activation(x, bias, activation, backend=backend)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "noresidual"])
@pytest.mark.parametrize("with_x_bias", [True, False], ids=["xbias", "noxbias"])
def test_residual_layernorm_gradcheck(backend, with_residual, with_x_bias):
    skip_unless_runs(backend, torch.float64)
    dim = 6
    x = _double(2, 3, dim)
    residual = _double(2, 3, dim) if with_residual else None
    weight = (1.0 + 0.1 * torch.randn(dim, dtype=torch.float64)).requires_grad_(True)
    bias = _double(dim)
    x_bias = _double(dim) if with_x_bias else None

    def fn(x, weight, bias, residual=None, x_bias=None):
        return ops.residual_layernorm(x, residual, weight, bias, 1e-5, x_bias=x_bias, backend=backend)

    inputs = [x, weight, bias, residual, x_bias]
    assert torch.autograd.gradcheck(fn, tuple(inputs))


# -- bias_activation vs the reference ----------------------------------------------------------------
FEATURE_SHAPES = [(1, 1, 768), (3, 7, 100), (2, 65, 768), (3, 130, 100)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_bias_activation_matches_reference(backend, dtype, shape, activation, with_bias):
    skip_unless_runs(backend, dtype)
    args = dict(x=2.0 * torch.randn(shape), bias=torch.randn(shape[-1]) if with_bias else None,
                activation=activation)
    grad_names = ["x", "bias"] if with_bias else ["x"]
    op = functools.partial(ops.bias_activation, backend=backend)
    check_against_reference(op, ref_bias_activation, args, grad_names, dtype, ["y"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_bias_activation_swish_is_silu(backend):
    x, bias = torch.randn(3, 5, 10), torch.randn(10)
    assert ops.canonical_activation("swish") == "silu"
    swish = ops.bias_activation(x, bias, "swish", backend=backend)
    silu = ops.bias_activation(x, bias, "silu", backend=backend)
    assert torch.equal(swish, silu)
    assert_close(swish, F.silu(x + bias), atol=1e-6, name="swish")


def test_reference_new_gelu_is_tanh_gelu():
    """Guards the reference itself: HF's NewGELU is torch's tanh-approximated GELU."""
    x = torch.linspace(-8, 8, 1001, dtype=torch.float64)
    assert_close(ref_new_gelu(x), F.gelu(x, approximate="tanh"), atol=1e-12, name="gelu_new")


# -- residual_layernorm vs the reference -------------------------------------------------------------
def layernorm_args(shape, with_residual=True, with_x_bias=True):
    """residual_layernorm's arguments for x of ``shape``: a residual stream with a nonzero mean, as
    in a real network, and weights near their init."""
    dim = shape[-1]
    return dict(
        x=torch.randn(shape) + 0.5,
        residual=2.0 * torch.randn(shape) + 1.0 if with_residual else None,
        weight=1.0 + 0.2 * torch.randn(dim),
        bias=0.2 * torch.randn(dim),
        eps=1e-12,
        x_bias=0.5 * torch.randn(dim) if with_x_bias else None,
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", FEATURE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "with_residual,with_x_bias",
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["residual+xbias", "residual", "xbias", "bare"],
)
def test_residual_layernorm_matches_reference(backend, dtype, shape, with_residual, with_x_bias):
    skip_unless_runs(backend, dtype)
    args = layernorm_args(shape, with_residual, with_x_bias)
    grad_names = ["x", "weight", "bias"] + (["residual"] if with_residual else []) + (
        ["x_bias"] if with_x_bias else [])
    op = functools.partial(ops.residual_layernorm, backend=backend)
    check_against_reference(op, ref_residual_layernorm, args, grad_names, dtype, ["y"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_residual_layernorm_eps_and_expanded_residual(backend):
    """The embeddings pass an expanded (stride-0 batch) position embedding as the residual, and
    the eps is honoured (a large eps visibly changes the result)."""
    batch, seq, dim = 3, 5, 16
    pos = torch.randn(1, seq, dim)
    args = dict(
        x=torch.randn(batch, seq, dim),
        residual=pos.expand(batch, seq, dim),
        weight=1.0 + 0.2 * torch.randn(dim),
        bias=0.2 * torch.randn(dim),
        eps=0.5,
    )
    op = functools.partial(ops.residual_layernorm, backend=backend)
    check_against_reference(op, ref_residual_layernorm, args, ["x", "residual", "weight", "bias"],
                            torch.float32, ["y"])
    # gradient through the stride-0 expand into the (1, seq, dim) embedding
    go = torch.randn(batch, seq, dim)
    grads = []
    for fn in (op, ref_residual_layernorm):
        pos_leaf = pos.clone().requires_grad_(True)
        residual = pos_leaf.expand(batch, seq, dim)
        fn(args["x"], residual, args["weight"], args["bias"], 0.5).backward(go)
        grads.append(pos_leaf.grad)
    assert grads[0].shape == (1, seq, dim)
    assert_close(grads[0], grads[1], atol=1e-5, name="grad of the expanded residual")


@pytest.mark.parametrize("backend", cpu_backends())
def test_residual_layernorm_partial_requires_grad(backend):
    """Frozen LayerNorm parameters: only x and residual need gradients."""
    args = dict(x=torch.randn(2, 5, 12), residual=torch.randn(2, 5, 12), weight=torch.rand(12) + 0.5,
                bias=torch.randn(12), x_bias=torch.randn(12))
    op = functools.partial(ops.residual_layernorm, backend=backend)
    check_against_reference(op, ref_residual_layernorm, args, ["x", "residual"], torch.float32, ["y"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_residual_layernorm_mixed_precision_params(backend):
    """bfloat16 activations with float32 LayerNorm parameters: gradients come back in each
    input's own dtype."""
    skip_unless_runs(backend, torch.bfloat16)
    x = torch.randn(2, 7, 100).bfloat16().requires_grad_(True)
    residual = torch.randn(2, 7, 100).bfloat16().requires_grad_(True)
    weight = (1.0 + 0.2 * torch.randn(100)).requires_grad_(True)
    bias = (0.2 * torch.randn(100)).requires_grad_(True)
    y = ops.residual_layernorm(x, residual, weight, bias, backend=backend)
    y_ref = ref_residual_layernorm(x.double(), residual.double(), weight.double(), bias.double())
    assert_close(y, y_ref, atol=0.05, name="y")
    y.float().sum().backward()
    assert (x.grad.dtype, residual.grad.dtype) == (torch.bfloat16, torch.bfloat16)
    assert (weight.grad.dtype, bias.grad.dtype) == (torch.float32, torch.float32)
    assert torch.isfinite(x.grad.float()).all() and torch.isfinite(weight.grad).all()


# -- dropout: seeded agreement and statistics -----------------------------------------------------
def _seeded(fn, seed):
    def run(**kwargs):
        torch.manual_seed(seed)
        return fn(**kwargs)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_head_mask", [True, False], ids=["headmask", "noheadmask"])
def test_masked_attention_dropout_matches_seeded_reference(dtype, with_head_mask):
    """eager draws the dropout mask with torch.native_dropout, which on CPU consumes the RNG as
    F.dropout does: with the same seed, op and reference drop the same weights."""
    args = attention_args(3, 2, 17, 8, mask_kind="random", with_head_mask=with_head_mask,
                          dropout_p=0.3, need_weights=True)
    args = {k: _cast(v, dtype) for k, v in args.items()}
    grad_names = ["q", "k", "v"] + (["head_mask"] if with_head_mask else [])
    op = _seeded(functools.partial(ops.masked_attention, backend="eager"), seed=7)
    ref = _seeded(ref_masked_attention, seed=7)
    outs, grads = forward_backward(op, args, grad_names)
    outs_ref, grads_ref = forward_backward(ref, args, grad_names)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for name, a, r in zip(["out", "weights"], outs, outs_ref):
        assert_close(a, r, atol=atol, name=name)
    for name in grad_names:
        assert_close(grads[name], grads_ref[name], atol=atol, name=f"grad {name}")
    # the dropout did act: some weights of attended keys are zero
    weights = outs[1]
    attended = args["key_padding_mask"][:-1, None, None, :].expand_as(weights[:-1])
    assert (weights[:-1][attended] == 0).any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("with_x_bias", [True, False], ids=["xbias", "noxbias"])
def test_residual_layernorm_dropout_matches_seeded_reference(dtype, with_x_bias):
    dim = 24
    args = dict(x=torch.randn(3, 9, dim), residual=torch.randn(3, 9, dim), weight=1 + 0.2 * torch.randn(dim),
                bias=torch.randn(dim), eps=1e-12, x_bias=torch.randn(dim) if with_x_bias else None,
                dropout_p=0.4)
    args = {k: _cast(v, dtype) for k, v in args.items()}
    grad_names = ["x", "residual", "weight", "bias"] + (["x_bias"] if with_x_bias else [])
    op = _seeded(functools.partial(ops.residual_layernorm, backend="eager"), seed=11)
    ref = _seeded(ref_residual_layernorm, seed=11)
    outs, grads = forward_backward(op, args, grad_names)
    outs_ref, grads_ref = forward_backward(ref, args, grad_names)
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close(outs[0], outs_ref[0], atol=atol, name="y")
    for name in grad_names:
        assert_close(grads[name], grads_ref[name], atol=atol, name=f"grad {name}")
    assert (grads["x"] == 0).any(), "dropout dropped nothing"


def _assert_kept_fraction(kept, p, name):
    frac = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(frac - (1 - p)) < 6 * sigma, (
        f"{name}: kept fraction {frac:.4f}, expected {1 - p:.4f} +- {6 * sigma:.4f}"
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_masked_attention_dropout_statistics(backend, p):
    """About 1-p of the weights are kept, each scaled by exactly 1/(1-p); a new draw each call."""
    q, k, v = torch.randn(3, 4, 4, 64, 16).unbind(0)
    _, probs = ops.masked_attention(q, k, v, need_weights=True, backend=backend)
    _, w1 = ops.masked_attention(q, k, v, dropout_p=p, need_weights=True, backend=backend)
    _, w2 = ops.masked_attention(q, k, v, dropout_p=p, need_weights=True, backend=backend)
    assert (probs > 0).all()
    kept = w1 != 0
    _assert_kept_fraction(kept, p, "attention dropout")
    assert_close(w1[kept], probs[kept] / (1 - p), atol=0.0, rtol=1e-5, name="kept weights")
    assert not torch.equal(w1 != 0, w2 != 0), "two calls drew the same dropout mask"


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_residual_layernorm_dropout_statistics(backend, p):
    """The mask seen by the backward (dx / dresidual = keep / (1-p)) has about 1-p ones, and the
    forward used that same mask."""
    shape, dim = (8, 64, 128), 128
    x = torch.randn(shape).requires_grad_(True)
    residual = torch.randn(shape).requires_grad_(True)
    weight, bias, x_bias = 1 + 0.2 * torch.randn(dim), torch.randn(dim), torch.randn(dim)
    y = ops.residual_layernorm(x, residual, weight, bias, 1e-12, x_bias=x_bias, dropout_p=p,
                               backend=backend)
    y.backward(torch.randn(shape))
    assert (residual.grad != 0).all()
    ratio = x.grad / residual.grad
    kept = ratio != 0
    _assert_kept_fraction(kept, p, "residual_layernorm dropout")
    assert_close(ratio[kept], torch.full_like(ratio[kept], 1 / (1 - p)), atol=0.0, rtol=1e-4,
                 name="dx / dresidual where kept")
    expected = F.layer_norm((x + x_bias) * kept / (1 - p) + residual, (dim,), weight, bias, 1e-12)
    assert_close(y, expected, atol=1e-5, name="y with the backward's mask")


@pytest.mark.parametrize("backend", cpu_backends())
def test_masked_attention_dropout_backward_with_its_own_mask(backend):
    """Any backend: read the dropout mask off the returned weights (head_mask is nonzero), then
    out, weights and every gradient must match the reference applying that same mask."""
    p = 0.3
    args = attention_args(3, 2, 33, 8, mask_kind="random", with_head_mask=True)
    outs, grads = forward_backward(
        functools.partial(ops.masked_attention, dropout_p=p, need_weights=True, backend=backend),
        args, ["q", "k", "v", "head_mask"])
    keep = outs[1] != 0  # (batch, heads, seq, seq)

    def ref_with_mask(q, k, v, key_padding_mask, head_mask):
        _, probs = ref_masked_attention(q, k, v, key_padding_mask, need_weights=True)
        weights = probs * keep / (1 - p) * head_mask.view(1, -1, 1, 1)
        return torch.matmul(weights, v), weights

    outs_ref, grads_ref = forward_backward(ref_with_mask, args, ["q", "k", "v", "head_mask"])
    attended = args["key_padding_mask"][:, None, None, :].expand_as(keep)
    _assert_kept_fraction(keep[attended], p, "attention dropout")
    for name, a, r in zip(["out", "weights"], outs, outs_ref):
        assert_close(a, r, atol=1e-5, name=name)
    for name in grads:
        assert_close(grads[name], grads_ref[name], atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("backend", cpu_backends())
def test_residual_layernorm_dropout_backward_with_its_own_mask(backend):
    """Any backend: read the dropout mask off dx / dresidual (see the statistics test); every
    gradient must match the reference applying that mask, x_bias's included."""
    p, shape, dim = 0.3, (4, 9, 40), 40
    args = dict(x=torch.randn(shape), residual=torch.randn(shape), weight=1 + 0.2 * torch.randn(dim),
                bias=torch.randn(dim), eps=1e-12, x_bias=torch.randn(dim))
    names = ["x", "residual", "weight", "bias", "x_bias"]
    outs, grads = forward_backward(
        functools.partial(ops.residual_layernorm, dropout_p=p, backend=backend), args, names)
    keep = grads["x"] != 0

    def ref_with_mask(x, residual, weight, bias, eps, x_bias):
        z = (x + x_bias) * keep / (1 - p) + residual
        return F.layer_norm(z, (dim,), weight, bias, eps)

    outs_ref, grads_ref = forward_backward(ref_with_mask, args, names)
    _assert_kept_fraction(keep, p, "residual_layernorm dropout")
    assert_close(outs[0], outs_ref[0], atol=1e-5, name="y")
    for name in names:
        assert_close(grads[name], grads_ref[name], atol=1e-5, name=f"grad {name}")


# -- argument checks ---------------------------------------------------------------------------------
def _qkv(batch=2, heads=3, seq=5, head_dim=4):
    return torch.randn(3, batch, heads, seq, head_dim).unbind(0)


ATTENTION_BAD_ARGS = [
    # (id, kwargs override, exception, message fragment)
    ("q_3d", dict(q=torch.randn(2, 5, 4)), ValueError, "q must have 4 dims"),
    ("q_not_tensor", dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("k_shape", dict(k=torch.randn(2, 3, 6, 4)), ValueError, "k must have shape"),
    ("v_shape", dict(v=torch.randn(2, 3, 5, 5)), ValueError, "v must have shape"),
    ("mask_dtype", dict(key_padding_mask=torch.ones(2, 5)), TypeError, "key_padding_mask must be a bool"),
    ("mask_int", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.long)), TypeError, "key_padding_mask"),
    ("mask_shape", dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape"),
    ("mask_4d", dict(key_padding_mask=torch.ones(2, 1, 1, 5, dtype=torch.bool)), ValueError,
     "key_padding_mask must have shape"),
    ("head_mask_shape", dict(head_mask=torch.ones(4)), ValueError, "head_mask must have shape"),
    ("head_mask_2d", dict(head_mask=torch.ones(1, 3)), ValueError, "head_mask must have shape"),
    ("dropout_negative", dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    ("dropout_one", dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    ("k_dtype", dict(k=torch.randn(2, 3, 5, 4, dtype=torch.float16)), TypeError,
     "k must have dtype torch.float32"),
    ("v_dtype", dict(v=torch.randn(2, 3, 5, 4, dtype=torch.float64)), TypeError,
     "v must have dtype torch.float32"),
    ("q_int", dict(q=torch.ones(2, 3, 5, 4, dtype=torch.long)), TypeError, "q must be a floating-point"),
    ("head_mask_int", dict(head_mask=torch.ones(3, dtype=torch.long)), TypeError,
     "head_mask must be a floating-point"),
    ("k_device", dict(k=torch.randn(2, 3, 5, 4, device="meta")), ValueError, "k must be on cpu"),
    ("mask_device", dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool, device="meta")), ValueError,
     "key_padding_mask must be on cpu"),
]


@pytest.mark.parametrize("override,exc,match", [a[1:] for a in ATTENTION_BAD_ARGS],
                         ids=[a[0] for a in ATTENTION_BAD_ARGS])
def test_masked_attention_argument_errors(override, exc, match):
    q, k, v = _qkv()
    kwargs = dict(q=q, k=k, v=v, key_padding_mask=None, head_mask=None, dropout_p=0.0)
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        ops.masked_attention(**kwargs)


@pytest.mark.parametrize(
    "bias,activation,exc,match",
    [
        (torch.randn(7), "gelu", ValueError, "bias must have shape"),
        (torch.randn(1, 8), "gelu", ValueError, "bias must have shape"),
        (torch.randn(8), "tanh", ValueError, "activation must be one of"),
        (torch.randn(8), "GELU", ValueError, "activation must be one of"),
    ],
    ids=["bias_len", "bias_2d", "unknown_activation", "activation_case"],
)
def test_bias_activation_argument_errors(bias, activation, exc, match):
    with pytest.raises(exc, match=match):
        ops.bias_activation(torch.randn(2, 3, 8), bias, activation)


def test_bias_activation_error_lists_activations():
    with pytest.raises(ValueError) as info:
        ops.bias_activation(torch.randn(2, 8), None, "mish")
    for name in ("gelu", "gelu_new", "relu", "silu", "swish", "mish"):
        assert name in str(info.value)


@pytest.mark.parametrize(
    "override,exc,match",
    [
        (dict(residual=torch.randn(2, 3, 7)), ValueError, "residual must have shape"),
        (dict(residual=torch.randn(1, 3, 8)), ValueError, "residual must have shape"),
        (dict(weight=torch.randn(7)), ValueError, "weight must have shape"),
        (dict(bias=torch.randn(2, 8)), ValueError, "bias must have shape"),
        (dict(x_bias=torch.randn(9)), ValueError, "x_bias must have shape"),
        (dict(weight=None), TypeError, "weight must be a torch.Tensor"),
        (dict(dropout_p=1.5), ValueError, "dropout_p must be in"),
        (dict(weight=torch.ones(8, device="meta")), ValueError, "weight must be on cpu"),
        (dict(residual=torch.ones(2, 3, 8, dtype=torch.long)), TypeError, "residual must be a floating-point"),
    ],
    ids=["residual_dim", "residual_batch", "weight", "bias", "x_bias", "weight_none", "dropout",
         "weight_device", "residual_int"],
)
def test_residual_layernorm_argument_errors(override, exc, match):
    kwargs = dict(x=torch.randn(2, 3, 8), residual=torch.randn(2, 3, 8), weight=torch.ones(8),
                  bias=torch.zeros(8), x_bias=None, dropout_p=0.0)
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        ops.residual_layernorm(**kwargs)


def test_head_mask_is_cast_to_the_attention_dtype():
    q, k, v = (t.double() for t in _qkv())
    head_mask = torch.tensor([1.0, 0.0, 0.5], requires_grad=True)  # float32 with float64 q
    out, _ = ops.masked_attention(q, k, v, head_mask=head_mask)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert head_mask.grad.dtype == torch.float32 and bool(head_mask.grad.abs().sum() > 0)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("op", ["bias_activation", "residual_layernorm"])
def test_linear_bias_is_cast_to_x_dtype(op, backend):
    """Under autocast a Linear's output is half while its bias parameter stays float32: the op
    computes in x's dtype, and the bias gradient comes back in float32. eager matches the bf16
    composite exactly; a fused backend (no bf16 rounding of x + bias inside) is held to the
    2x-reference-error rule against float64 (torch's own bf16 LayerNorm rounds differently from
    one release to the next: 2.11's is 1 ulp off 2.13's on one of these 48 elements)."""
    skip_unless_runs(backend, torch.bfloat16)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    bias = torch.randn(8, requires_grad=True)
    if op == "bias_activation":
        def composite(x, bias):
            return torch.nn.functional.gelu(x + bias)

        y = ops.bias_activation(x, bias, "gelu", backend=backend)
    else:
        w, b = torch.ones(8, dtype=torch.bfloat16), torch.zeros(8, dtype=torch.bfloat16)

        def composite(x, bias):
            return torch.nn.functional.layer_norm(x + bias, (8,), w.to(x.dtype), b.to(x.dtype), 1e-12)

        y = ops.residual_layernorm(x, None, w, b, x_bias=bias, backend=backend)
    bias_d = bias.detach().to(torch.bfloat16)
    expected = composite(x, bias_d)
    assert y.dtype == torch.bfloat16
    if backend == "eager":
        assert torch.equal(y, expected)
    else:
        assert_within_reference_error("y", y, expected, composite(x.double(), bias_d.double()), torch.bfloat16)
    y.float().sum().backward()
    assert bias.grad.dtype == torch.float32


@pytest.mark.parametrize("op", ["masked_attention", "bias_activation", "residual_layernorm"])
def test_second_order_gradients_are_refused(op):
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    if op == "masked_attention":
        y = ops.masked_attention(x, x, x)[0]
    elif op == "bias_activation":
        y = ops.bias_activation(x, None, "gelu")
    else:
        y = ops.residual_layernorm(x, None, torch.ones(4), torch.zeros(4))
    (grad,) = torch.autograd.grad(y.sum(), x)  # first order works
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match=f"{op}: second-order gradients"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
