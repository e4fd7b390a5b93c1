"""The ``cpu`` backend (C++ kernels in ``csrc/cpu``) against the eager backend, its specification.

Every op, forward and every gradient, on the awkward shapes (1, 7, 65, 130 rows or keys; hidden
768 and non-powers of two), random masks with a fully-masked row, all-ones masks, a head_mask with
a zero; float32 and bfloat16 by STYLE.md's rule (the kernel's error vs eager in float64 is at most
2x eager's own error in that dtype, plus a small atol); gradcheck in float64, which the kernels
support; dropout against the formula with the very keep-mask the backend drew; the kernels' own
argument checks; the whole model on backend="cpu" against eager.

(``tests/test_ops.py`` also runs its generic op tests on every CPU backend, this one included.)
"""

import functools
import re

import pytest
import torch

import distilbert_fast
from conftest import SMALL_CONFIG, assert_close
from distilbert_fast import ops
from distilbert_fast.ops import backends, cpu_backend
from test_ops import assert_within_reference_error, check_against_reference, gemm_rounding_bound

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.available_backends(torch.zeros(1)),
    reason="the cpu backend is not available (extension built without it, or CPU lacks its ISA)",
)

_C = distilbert_fast._extension._C
DTYPES = [torch.float32, torch.bfloat16]


def on(backend, fn):
    return functools.partial(fn, backend=backend)


# -- residual + LayerNorm --------------------------------------------------------------------------
LN_SHAPES = [(1, 768), (7, 768), (65, 768), (130, 768), (65, 130), (7, 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["full", "bare"])
def test_residual_layernorm_matches_eager(dtype, shape, variant):
    rows, dim = shape
    full = variant == "full"
    args = dict(
        x=torch.randn(rows, dim),
        residual=torch.randn(rows, dim) if full else None,
        weight=1 + 0.3 * torch.randn(dim),
        bias=torch.randn(dim),
        eps=1e-5,
        x_bias=torch.randn(dim) if full else None,
    )
    grads = ["x", "weight", "bias"] + (["residual", "x_bias"] if full else [])
    check_against_reference(
        on("cpu", ops.residual_layernorm), on("eager", ops.residual_layernorm), args, grads, dtype, ["y"]
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_layernorm_broadcast_residual(dtype):
    """The embeddings' residual is the position table expanded over the batch (stride 0): the
    kernel reads it in place, and its gradient still sums over the batch."""
    batch, seq, dim = 3, 7, 40
    pos = torch.randn(1, seq, dim)
    args = dict(x=torch.randn(batch, seq, dim), pos=pos, weight=1 + 0.3 * torch.randn(dim), bias=torch.randn(dim))

    def run(backend, x, pos, weight, bias):
        return ops.residual_layernorm(x, pos.expand(batch, seq, dim), weight, bias, backend=backend)

    check_against_reference(
        functools.partial(run, "cpu"), functools.partial(run, "eager"), args, ["x", "pos", "weight", "bias"],
        dtype, ["y"],
    )


def test_residual_rows_reads_broadcast_in_place():
    pos = torch.randn(1, 5, 8)
    rows = backends.residual_rows(pos.expand(4, 5, 8), 8)
    assert rows.shape == (5, 8) and rows.data_ptr() == pos.data_ptr()
    # a layout it cannot read in place is copied, with the right values
    odd = torch.randn(4, 8, 5).transpose(1, 2)
    assert torch.equal(backends.residual_rows(odd, 5), odd.reshape(-1, 5))


def test_residual_layernorm_mixed_dtypes_promote_like_eager():
    """Under autocast the residual may be float32 while x is bfloat16: x + residual promotes."""
    x = torch.randn(5, 24, dtype=torch.bfloat16)
    residual, weight, bias = torch.randn(5, 24), torch.ones(24), torch.zeros(24)
    ours = ops.residual_layernorm(x, residual, weight, bias, backend="cpu")
    ref = ops.residual_layernorm(x, residual, weight, bias, backend="eager")
    assert ours.dtype == ref.dtype == torch.float32
    assert_close(ours, ref, atol=1e-5, name="y")


# -- bias + activation -----------------------------------------------------------------------------
BIAS_ACT_SHAPES = [(1, 768), (7, 3072), (65, 130), (130, 768), (2, 3, 37)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", BIAS_ACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_bias_activation_matches_eager(dtype, shape, activation):
    args = dict(x=2 * torch.randn(shape), bias=torch.randn(shape[-1]), activation=activation)
    check_against_reference(
        on("cpu", ops.bias_activation), on("eager", ops.bias_activation), args, ["x", "bias"], dtype, ["y"]
    )


def test_bias_activation_without_bias():
    x = torch.randn(9, 33, requires_grad=True)
    for backend in ("cpu", "eager"):
        y = ops.bias_activation(x, None, "gelu", backend=backend)
        (dx,) = torch.autograd.grad(y.sum(), x)
        if backend == "cpu":
            ours = (y, dx)
    assert_close(ours[0], y, atol=1e-6, name="y")
    assert_close(ours[1], dx, atol=1e-6, name="dx")


# -- linear + bias + activation: inference applies the epilogue in place on the matmul's output ------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_activation_inference_matches_eager(dtype, activation, with_bias):
    x, weight = torch.randn(2, 65, 48), torch.randn(130, 48) / 7
    bias = torch.randn(130) if with_bias else None
    ys = {}
    for backend in ("cpu", "eager"):
        for grad in (False, True):  # without grad: the in-place path; with it: the default one
            with torch.set_grad_enabled(grad):
                xd = x.to(dtype).requires_grad_(grad)
                ys[backend, grad] = ops.linear_activation(
                    xd, weight.to(dtype), None if bias is None else bias.to(dtype), activation, backend=backend
                ).detach()
    x64 = x.to(dtype).double()
    ref64 = ops.bias_activation(x64 @ weight.to(dtype).double().t(), None if bias is None else bias.to(dtype).double(),
                                activation, backend="eager")
    for grad in (False, True):
        assert_within_reference_error(f"y (grad={grad})", ys["cpu", grad], ys["eager", grad], ref64, dtype)


# -- linear: float32 runs oneDNN's matmul forward, F.linear's backward --------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 65, 48), (7, 768), (1, 1, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_linear_matches_eager(dtype, shape, with_bias):
    out_features = 130 if shape[-1] != 130 else 48
    args = dict(x=torch.randn(shape), weight=torch.randn(out_features, shape[-1]) / 7)
    if with_bias:
        args["bias"] = torch.randn(out_features)
    # float32 runs oneDNN's GEMM, eager MKL's: the output may round as any float32 GEMM does
    check_against_reference(
        on("cpu", ops.linear), on("eager", ops.linear), args, list(args), dtype, ["y"],
        output_gemm_bounds=lambda a: {"y": gemm_rounding_bound(a["x"], a["weight"], a.get("bias"))},
    )


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "torch-gemm"])
def test_linear_float32_runs_the_chosen_gemm_and_agrees_with_and_without_grad(monkeypatch, onednn):
    if onednn and not cpu_backend.ONEDNN_AVAILABLE:
        pytest.skip("torch was built without oneDNN")
    monkeypatch.setattr(cpu_backend, "ONEDNN_LINEAR", onednn)
    x, weight, bias = torch.randn(3, 9, 40), torch.randn(24, 40), torch.randn(24)
    calls = []
    real = cpu_backend._onednn_linear
    monkeypatch.setattr(cpu_backend, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        y_inference = ops.linear(x, weight, bias, backend="cpu")
    y_train = ops.linear(x.requires_grad_(), weight, bias, backend="cpu")
    assert len(calls) == (2 if onednn else 0), f"float32 linear ran oneDNN {len(calls)} times"
    assert torch.equal(y_train.detach(), y_inference)  # training and inference: the same forward
    # and through the model: a forward with grad and one without give the same bits
    model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).set_backend("cpu").eval()
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (2, 7))
    with_grad = model(input_ids=ids).last_hidden_state
    with torch.no_grad():
        without = model(input_ids=ids).last_hidden_state
    assert torch.equal(with_grad.detach(), without)


def test_linear_falls_back_to_torch_where_onednn_does_not_suit(monkeypatch):
    monkeypatch.setattr(cpu_backend, "ONEDNN_LINEAR", True)  # the choice it must decline
    monkeypatch.setattr(cpu_backend, "_onednn_linear", lambda *a: pytest.fail("oneDNN ran"))
    weight, bias = torch.randn(6, 8), torch.randn(6)
    x = torch.randn(5, 8)
    cases = {
        "1-d x": (torch.randn(8), weight, bias),
        "strided x": (torch.randn(8, 5).t(), weight, bias),
        "strided weight": (x, torch.randn(8, 6).t(), bias),
        "float64": (x.double(), weight.double(), bias.double()),
        "bfloat16": (x.bfloat16(), weight.bfloat16(), bias.bfloat16()),
    }
    for name, (xi, wi, bi) in cases.items():
        y = ops.linear(xi, wi, bi, backend="cpu")
        assert torch.equal(y, torch.nn.functional.linear(xi, wi, bi)), name
    for name, (xi, wi, bi) in {"weight": (x, torch.randn(6, 7), bias), "bias": (x, weight, torch.randn(5))}.items():
        with pytest.raises(RuntimeError) as expected:  # mismatched shapes: F.linear's own error
            torch.nn.functional.linear(xi, wi, bi)
        with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
            ops.linear(xi, wi, bi, backend="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):  # F.linear's autocast casts, as HF's would
        y = ops.linear(x, weight, bias, backend="cpu")
        assert y.dtype == torch.bfloat16 and torch.equal(y, torch.nn.functional.linear(x, weight, bias))


@pytest.mark.skipif(not cpu_backend.ONEDNN_AVAILABLE, reason="torch was built without oneDNN")
def test_linear_second_order_gradient_is_an_error(monkeypatch):
    monkeypatch.setattr(cpu_backend, "ONEDNN_LINEAR", True)  # (torch's GEMM has second order)
    x = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(6, 8, requires_grad=True)
    y = ops.linear(x, weight, None, backend="cpu")
    with pytest.raises(RuntimeError, match="second-order"):
        torch.autograd.grad(y.sum(), weight, create_graph=True)


def test_model_projection_hooks_still_fire():
    """A projection with a forward hook runs as its module (hooks fire); without, it runs ops.linear."""
    model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).set_backend("cpu").eval()
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (2, 7))
    seen = []
    handle = model.transformer.layer[0].attention.q_lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    hooked = model(input_ids=ids).last_hidden_state
    handle.remove()
    plain = model(input_ids=ids).last_hidden_state
    assert seen == [torch.Size([2, 7, SMALL_CONFIG["dim"]])]
    assert_close(hooked, plain, atol=1e-5)


def test_cpu_empty_gives_writable_contiguous_outputs_either_side_of_1_mib():
    """Below 1 MiB cpu_empty is torch's allocator, from 1 MiB a block of the output cache: both must
    be plain contiguous tensors of the asked shape and dtype that hold what is written."""
    like = torch.zeros(1)
    for shape in ([3, 5], [1024, 768], [4, 2 * 1024 * 1024 + 7]):  # 60 B, 3 MiB, just over 32 MiB
        t = _C.cpu_empty(shape, like)
        assert list(t.shape) == shape and t.dtype == torch.float32 and t.is_contiguous()
        t.fill_(1.5)
        assert t.sum().item() == 1.5 * t.numel()
    assert _C.cpu_empty([2, 3], like.to(torch.bfloat16)).dtype == torch.bfloat16


def test_output_cache_reuses_a_dead_outputs_block_and_never_a_live_one():
    """A block returns to the cache when its tensor dies and serves the next output of about its
    size; a live tensor's block is never handed out; release frees the idle blocks."""
    like = torch.zeros(1)
    _C.cpu_release_cached_outputs()
    a = _C.cpu_empty([1024, 1024], like)  # 4 MiB
    b = _C.cpu_empty([1024, 1024], like)
    assert a.data_ptr() != b.data_ptr()
    a_ptr = a.data_ptr()
    a.fill_(2.0)
    del a
    assert _C.cpu_cached_output_bytes() >= 4 << 20
    c = _C.cpu_empty([1000, 1024], like)  # a little smaller: the same block
    assert c.data_ptr() == a_ptr and _C.cpu_cached_output_bytes() == 0
    # 3 MiB, not a whole number of 2 MiB pages: its 4 MiB block serves the next 3 MiB output
    g = _C.cpu_empty([768, 1024], like)
    g_ptr = g.data_ptr()
    del g
    g = _C.cpu_empty([768, 1024], like)
    assert g.data_ptr() == g_ptr
    del g
    d = _C.cpu_empty([1024, 1024], like)  # c is alive: a new block
    assert d.data_ptr() not in (a_ptr, b.data_ptr())
    del b, c, d
    assert cpu_backend.empty_cache() >= 12 << 20
    assert _C.cpu_cached_output_bytes() == 0
    e = _C.cpu_empty([2048, 1024], like)  # 8 MiB: wastes too much for a 4 MiB request
    e_ptr = e.data_ptr()
    del e
    f = _C.cpu_empty([1024, 1024], like)
    assert f.data_ptr() != e_ptr and _C.cpu_cached_output_bytes() >= 8 << 20
    del f
    _C.cpu_release_cached_outputs()


# -- masked attention ------------------------------------------------------------------------------
# (1, 2, 600, 16): more keys than the forward's key block (512), folded in two blocks
ATTN_SHAPES = [(1, 2, 1, 64), (2, 3, 7, 64), (3, 2, 65, 24), (2, 12, 130, 64), (1, 2, 600, 16)]


def _mask(kind, batch, seq):
    if kind is None:
        return None
    if kind == "ones":
        return torch.ones(batch, seq, dtype=torch.bool)
    mask = torch.rand(batch, seq) < 0.6
    mask[:, 0] = True
    mask[-1] = False  # a fully-masked row (when batch > 1)
    if batch == 1:
        mask[0] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "ones", "random"], ids=["nomask", "ones", "random"])
def test_masked_attention_matches_eager(dtype, shape, mask_kind):
    batch, heads, seq, head_dim = shape
    head_mask = torch.rand(heads) + 0.5
    head_mask[0] = 0.0  # a pruned head: zero output and zero gradients to q, k, v
    args = dict(
        q=torch.randn(shape), k=torch.randn(shape), v=torch.randn(shape),
        key_padding_mask=_mask(mask_kind, batch, seq), head_mask=head_mask,
    )
    check_against_reference(
        on("cpu", ops.masked_attention), on("eager", ops.masked_attention), args,
        ["q", "k", "v", "head_mask"], dtype, ["out"],
    )


def test_masked_attention_fully_masked_batch_row_is_uniform():
    q, k, v = (torch.randn(2, 3, 9, 16) for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1] = False
    out, _ = ops.masked_attention(q, k, v, mask, backend="cpu")
    assert_close(out[1], v[1].mean(dim=1, keepdim=True).expand(3, 9, 16), atol=1e-6, name="uniform row")


def test_masked_attention_strided_views_and_output_layout():
    """The model hands in (batch, seq, heads, head_dim) projections transposed to (batch, heads,
    seq, head_dim): read in place; the output comes back in that same memory order."""
    batch, seq, heads, head_dim = 2, 11, 3, 8
    q, k, v = (torch.randn(batch, seq, heads, head_dim).transpose(1, 2) for _ in range(3))
    out, _ = ops.masked_attention(q, k, v, backend="cpu")
    ref, _ = ops.masked_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="eager")
    assert_close(out, ref, atol=1e-6, name="out")
    assert out.transpose(1, 2).is_contiguous()


def test_masked_attention_need_weights_runs_eager_path():
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    out, weights = ops.masked_attention(q, k, v, need_weights=True, backend="cpu")
    ref_out, ref_weights = ops.masked_attention(q, k, v, need_weights=True, backend="eager")
    assert_close(out, ref_out, atol=1e-6, name="out")
    assert_close(weights, ref_weights, atol=1e-6, name="weights")
    (dq,) = torch.autograd.grad((out.sum() + weights.square().sum()), q)
    (ref_dq,) = torch.autograd.grad((ref_out.sum() + ref_weights.square().sum()), q)
    assert_close(dq, ref_dq, atol=1e-6, name="dq")


# -- gradcheck in float64 --------------------------------------------------------------------------
def _seeded(fn, seed=3):
    """gradcheck calls ``fn`` many times: reseeding makes the dropout masks the same each time."""
    def run(*args):
        torch.manual_seed(seed)
        return fn(*args)
    return run


def _d(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_masked_attention(dropout_p):
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    head_mask = torch.tensor([1.3, 0.0, 0.7], dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, hm):
        return ops.masked_attention(q, k, v, mask, hm, dropout_p=dropout_p, backend="cpu")[0]

    assert torch.autograd.gradcheck(_seeded(fn), (_d(2, 3, 5, 4), _d(2, 3, 5, 4), _d(2, 3, 5, 4), head_mask))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_gradcheck_residual_layernorm(dropout_p):
    def fn(x, residual, weight, bias, x_bias):
        return ops.residual_layernorm(x, residual, weight, bias, 1e-5, x_bias, dropout_p, backend="cpu")

    assert torch.autograd.gradcheck(_seeded(fn), (_d(2, 3, 7), _d(2, 3, 7), _d(7), _d(7), _d(7)))


@pytest.mark.parametrize("activation", ["gelu", "gelu_new", "relu", "silu"])
def test_gradcheck_bias_activation(activation):
    x = _d(4, 19)
    if activation == "relu":  # keep away from the kink at 0, where finite differences lie
        x = (x.detach() + 0.1 * torch.sign(x.detach())).requires_grad_(True)
    fn = functools.partial(ops.bias_activation, activation=activation, backend="cpu")
    assert torch.autograd.gradcheck(lambda x, b: fn(x, b), (x, torch.zeros(19, dtype=torch.float64, requires_grad=True)))


# -- dropout: the backend's own keep-mask, seeded --------------------------------------------------
@pytest.fixture
def drawn_masks(monkeypatch):
    """Records every keep-mask the cpu backend draws."""
    masks = []
    draw = cpu_backend._keep_mask

    def recording(shape, p, device):
        keep = draw(shape, p, device)
        masks.append(keep)
        return keep

    monkeypatch.setattr(cpu_backend, "_keep_mask", recording)
    return masks


def test_residual_layernorm_dropout_uses_its_mask(drawn_masks):
    p = 0.3
    x, residual = torch.randn(6, 20, requires_grad=True), torch.randn(6, 20, requires_grad=True)
    weight, bias, x_bias = (torch.randn(20, requires_grad=True) for _ in range(3))
    y = ops.residual_layernorm(x, residual, weight, bias, 1e-5, x_bias, p, backend="cpu")
    (keep,) = drawn_masks
    assert 0 < keep.sum() < keep.numel()
    z = (x + x_bias) * keep / (1 - p) + residual
    ref = torch.nn.functional.layer_norm(z, (20,), weight, bias, 1e-5)
    assert_close(y, ref, atol=1e-5, name="y")
    upstream = torch.randn_like(y)
    params = (x, residual, weight, bias, x_bias)
    for name, a, r in zip("x residual weight bias x_bias".split(), torch.autograd.grad(y, params, upstream),
                          torch.autograd.grad(ref, params, upstream)):
        assert_close(a, r, atol=1e-5, name=f"grad {name}")


def test_masked_attention_dropout_uses_its_mask(drawn_masks):
    p = 0.25
    q, k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    mask = _mask("random", 2, 9)
    head_mask = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
    out, _ = ops.masked_attention(q, k, v, mask, head_mask, dropout_p=p, backend="cpu")
    (keep,) = drawn_masks
    scores = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask[:, None, None, :], torch.finfo(torch.float32).min)
    weights = scores.softmax(-1) * keep / (1 - p) * head_mask.view(1, -1, 1, 1)
    ref = weights @ v
    assert_close(out, ref, atol=1e-5, name="out")
    upstream = torch.randn_like(out)
    params = (q, k, v, head_mask)
    for name, a, r in zip(["q", "k", "v", "head_mask"], torch.autograd.grad(out, params, upstream),
                          torch.autograd.grad(ref, params, upstream)):
        assert_close(a, r, atol=1e-5, name=f"grad {name}")


def test_dropout_is_deterministic_under_manual_seed():
    x = torch.randn(8, 32)
    q = torch.randn(2, 2, 16, 8)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append((
            ops.residual_layernorm(x, None, torch.ones(32), torch.zeros(32), dropout_p=0.5, backend="cpu"),
            ops.masked_attention(q, q, q, dropout_p=0.5, backend="cpu")[0],
        ))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    torch.manual_seed(6)
    other = ops.residual_layernorm(x, None, torch.ones(32), torch.zeros(32), dropout_p=0.5, backend="cpu")
    assert not torch.equal(other, runs[0][0])


# -- the kernels' own argument checks --------------------------------------------------------------
def _ln_args(**over):
    args = dict(x=torch.randn(4, 8), residual=torch.randn(4, 8), weight=torch.ones(8), bias=torch.zeros(8),
                eps=1e-5, x_bias=None, keep=None, dropout_p=0.0)
    args.update(over)
    return args


def _attn_args(**over):
    args = dict(q=torch.randn(2, 3, 5, 4), k=torch.randn(2, 3, 5, 4), v=torch.randn(2, 3, 5, 4),
                key_padding_mask=torch.ones(2, 5, dtype=torch.bool), head_mask=None, keep=None,
                dropout_p=0.0, scale=0.5)
    args.update(over)
    return args


BAD_INPUTS = [
    # (entry point, args, expected message)
    ("ln", _ln_args(x=torch.randn(4, 8, dtype=torch.float16)), r"x must have dtype float32, float64 or bfloat16, got Half"),
    ("ln", _ln_args(x=torch.randn(4, 8, device="meta")), r"x must be a CPU tensor, got one on meta"),
    ("ln", _ln_args(x=torch.randn(8, 4).t()), r"x must be contiguous, got strides \(1, 4\)"),
    ("ln", _ln_args(x=torch.randn(4, 2, 4)), r"x must have 2 dims, got shape \(4, 2, 4\)"),
    ("ln", _ln_args(residual=torch.randn(3, 8)), r"residual must have shape \(R, 8\) with R dividing x's 4 rows, got \(3, 8\)"),
    ("ln", _ln_args(residual=torch.randn(4, 8, dtype=torch.float64)), r"residual must have dtype Float, got Double"),
    ("ln", _ln_args(weight=torch.ones(7)), r"weight must have shape \(8,\), got \(7,\)"),
    ("ln", _ln_args(weight=torch.ones(8, dtype=torch.bfloat16)), r"weight must have dtype Float, got BFloat16"),
    ("ln", _ln_args(keep=torch.ones(4, 8)), r"keep must have dtype Bool, got Float"),
    ("ln", _ln_args(dropout_p=1.0), r"dropout_p must be in \[0, 1\), got 1"),
    ("act", dict(x=torch.randn(3, 5), bias=torch.zeros(6), activation="gelu"), r"bias must have shape \(5,\), got \(6,\)"),
    ("act", dict(x=torch.randn(3, 5), bias=None, activation="tanh"), r"activation must be one of .*got 'tanh'"),
    ("act", dict(x=torch.randn(3, 5, dtype=torch.float16), bias=None, activation="relu"), r"x must have dtype float32"),
    ("attn", _attn_args(k=torch.randn(2, 3, 6, 4)), r"k must have shape \(2, 3, 5, 4\), got \(2, 3, 6, 4\)"),
    ("attn", _attn_args(v=torch.randn(2, 3, 5, 4, dtype=torch.float64)), r"v must have dtype Float, got Double"),
    ("attn", _attn_args(q=torch.randn(2, 3, 4, 5).transpose(-1, -2)), r"q must have a contiguous last dim"),
    ("attn", _attn_args(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)), r"key_padding_mask must have shape \(2, 5\), got \(2, 6\)"),
    ("attn", _attn_args(key_padding_mask=torch.ones(2, 5)), r"key_padding_mask must have dtype Bool, got Float"),
    ("attn", _attn_args(head_mask=torch.ones(2)), r"head_mask must have shape \(3,\), got \(2,\)"),
    ("attn", _attn_args(keep=torch.ones(2, 3, 5, 4, dtype=torch.bool)), r"keep must have shape \(2, 3, 5, 5\)"),
    ("attn", _attn_args(q=torch.randn(2, 3, 5)), r"q must have 4 dims, got shape \(2, 3, 5\)"),
]


def _varlen_args(**over):
    q = torch.randn(7, 3, 4)
    args = dict(q=q, k=torch.randn(7, 3, 4), v=torch.randn(7, 3, 4),
                cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4, head_mask=None,
                keep=None, dropout_p=0.0, scale=0.5)
    args.update(over)
    return args


BAD_INPUTS += [
    ("varlen", _varlen_args(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), r"cu_seqlens must start at 0"),
    ("varlen", _varlen_args(cu_seqlens=torch.tensor([0, 3, 7])), r"cu_seqlens must have dtype Int, got Long"),
    ("varlen", _varlen_args(max_seqlen=3), r"max_seqlen must be at least the longest sequence \(4\)"),
    # two bad arguments: the first in argument order is named, as the cuda entry points do
    ("varlen", _varlen_args(k=torch.randn(7, 3, 5), head_mask=torch.ones(2)), r"k must have shape \(7, 3, 4\)"),
    ("varlen", _varlen_args(max_seqlen=0, head_mask=torch.ones(2)), r"max_seqlen must be at least 1"),
    ("varlen", _varlen_args(head_mask=torch.ones(2), dropout_p=1.0), r"head_mask must have shape \(3,\)"),
]
ENTRY_POINTS = {"ln": _C.cpu_residual_layernorm_fwd, "act": _C.cpu_bias_activation_fwd,
                "attn": _C.cpu_masked_attention_fwd, "varlen": _C.cpu_varlen_attention_fwd}


def expected_error(message: str) -> type:
    """The entry points' contract (as the cuda ones'): TypeError for a wrong dtype, ValueError
    for any other bad argument."""
    return TypeError if "dtype" in message else ValueError


@pytest.mark.parametrize("op, args, message", BAD_INPUTS, ids=[m[:40] for _, _, m in BAD_INPUTS])
def test_kernel_rejects_bad_input(op, args, message):
    with pytest.raises(expected_error(message), match=message):
        ENTRY_POINTS[op](*args.values())


def test_backward_entry_points_check_grad_out():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"grad_out must have shape \(4, 8\), got \(4, 7\)"):
        _C.cpu_bias_activation_bwd(torch.randn(4, 7), x, None, "gelu", False)
    q = torch.randn(1, 2, 3, 4)
    out, lse = _C.cpu_masked_attention_fwd(q, q, q, None, None, None, 0.0, 0.5)
    with pytest.raises(TypeError, match=r"lse must have dtype Float, got Double"):
        _C.cpu_masked_attention_bwd(out, q, q, q, out, lse.double(), None, None, None, 0.0, 0.5, False)


def test_unsupported_dtype_is_a_clear_error():
    x = torch.randn(3, 4, dtype=torch.float16)
    assert "cpu" not in ops.available_backends(x)
    with pytest.raises(RuntimeError, match="backend 'cpu' cannot run bias_activation on a torch.float16 .*float32, bfloat16 and float64"):
        ops.bias_activation(x, None, "relu", backend="cpu")


def test_cpu_is_preferred_over_eager_on_cpu():
    names = ops.available_backends(torch.zeros(1))
    assert names.index("cpu") < names.index("eager")
    ops.bias_activation(torch.randn(2, 3), None, "relu")  # auto (triton never runs auto on CPU)
    assert ops.last_backend("bias_activation") == "cpu"


# -- the whole model -------------------------------------------------------------------------------
@pytest.mark.parametrize("output_attentions", [False, True], ids=["fused", "weights"])
def test_model_on_cpu_backend_matches_eager(output_attentions):
    """The tiny model in eval mode, with padding, a fully padded sequence and a head mask with a
    zero: outputs and every parameter's gradient agree between the cpu and eager backends."""
    config = distilbert_fast.DistilBertConfig(**{**SMALL_CONFIG, "hidden_dim": 65})
    model = distilbert_fast.DistilBertModel(config).eval()
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (3, 13))
    attention_mask = torch.ones(3, 13, dtype=torch.long)
    attention_mask[0, 9:] = 0
    attention_mask[2] = 0
    head_mask = torch.ones(config.n_layers, config.n_heads)
    head_mask[1, 2] = 0.0
    results = {}
    for backend in ("cpu", "eager"):
        model.set_backend(backend)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=attention_mask, head_mask=head_mask,
                    output_attentions=output_attentions)
        torch.manual_seed(1)
        out.last_hidden_state.backward(torch.randn_like(out.last_hidden_state))
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[backend] = (out, grads)
        assert ops.last_backend("masked_attention") == backend
    (ours, our_grads), (ref, ref_grads) = results["cpu"], results["eager"]
    assert_close(ours.last_hidden_state, ref.last_hidden_state, atol=2e-5, name="last_hidden_state")
    if output_attentions:
        for i, (a, r) in enumerate(zip(ours.attentions, ref.attentions)):
            assert_close(a, r, atol=1e-6, name=f"attentions[{i}]")
    assert our_grads.keys() == ref_grads.keys() and len(our_grads) > 10
    for name in ref_grads:
        assert_close(our_grads[name], ref_grads[name], atol=5e-5, rtol=1e-4, name=f"grad {name}")
