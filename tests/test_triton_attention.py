"""The Triton flash-attention launchers (``kernels/triton_attention.py``) against the eager backend.

``attention_fwd`` / ``attention_bwd`` are called directly (no autograd) and compared with the
eager backend's ``attention_forward`` / ``attention_backward``, the specification, by STYLE.md's
rule: |kernel(d) - eager(float64)| <= 2 * |eager(d) - eager(float64)| + atol(d) (+ one rounding
step of d), for the output and every gradient. On CPU the kernels run under Triton's interpreter
(TRITON_INTERPRET=1 must be set before they are defined; it cannot compute bfloat16, so those
cases skip) at small sizes; on CUDA the tests also run at full size (batch 8, heads 12, seq 128 /
512) in every dtype, with the small edge cases in float16 only (each combination of dtype, head_dim
and flags is a fresh compile, and the GPU check's time is short).

Dropout cannot match torch's random stream, so it is checked by determinism, by the keep rate,
and against the eager formulas fed the kernel's own mask, recovered from a run with q = k = 0 and
v = identity (out is then keep / (seq * (1 - p)) elementwise).
"""

import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
pytest.importorskip("triton")

from conftest import assert_close  # noqa: E402
from distilbert_fast.kernels import triton_attention as ta  # noqa: E402
from distilbert_fast.ops.eager import EagerBackend  # noqa: E402
from test_ops import assert_within_reference_error  # noqa: E402

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
if not ON_CUDA and not ta._INTERPRETED:
    pytest.skip("no CUDA, and Triton's interpreter was off when the kernels were defined",
                allow_module_level=True)

EAGER = EagerBackend()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_GRADS = (True,) * 5


def skip_if_unsupported(dtype):
    if dtype == torch.bfloat16 and ta._INTERPRETED:
        pytest.skip("Triton's interpreter computes bfloat16 wrong; bfloat16 runs on CUDA "
                    "(the full-size cases)")


# -- inputs -------------------------------------------------------------------------------------
def make_mask(kind, batch, seq):
    """None; all True ('ones'); random with the last batch row fully masked ('random'); or right
    padding with lengths from seq down to seq // 4 ('padded': whole key blocks skipped)."""
    if kind is None:
        return None
    if kind == "ones":
        return torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    if kind == "random":
        mask = torch.rand(batch, seq) < 0.6
        mask[torch.arange(batch), torch.randint(seq, (batch,))] = True
        if batch > 1:
            mask[-1] = False
        return mask.to(DEVICE)
    lengths = torch.linspace(seq, max(1, seq // 4), batch).round().long()
    return (torch.arange(seq)[None, :] < lengths[:, None]).to(DEVICE)


def make_inputs(batch, heads, seq, head_dim, dtype, mask_kind, with_head_mask):
    """q, k, v, grad_out (rounded to dtype, on DEVICE), the mask, and a head_mask with a zero."""
    shape = (batch, heads, seq, head_dim)
    q, k, v, grad_out = (torch.randn(shape).to(DEVICE, dtype) for _ in range(4))
    head_mask = None
    if with_head_mask:
        head_mask = (torch.rand(heads) + 0.25).to(DEVICE, dtype)
        head_mask[0] = 0.0
    return q, k, v, grad_out, make_mask(mask_kind, batch, seq), head_mask


# -- the two sides of every comparison ------------------------------------------------------------
def run_kernel(q, k, v, grad_out, mask, head_mask, scale, dropout_p=0.0, seed=0):
    """(out, dq, dk, dv, dhead_mask) from the launchers."""
    out, lse = ta.attention_fwd(q, k, v, mask, head_mask, dropout_p, scale, seed)
    grads = ta.attention_bwd(q, k, v, out, lse, grad_out, mask, head_mask, dropout_p, scale, seed,
                             need_head_mask_grad=True)
    return (out, *grads)


def run_eager(q, k, v, grad_out, mask, head_mask, scale, dtype, keep=None, dropout_p=0.0):
    """((out, dq, dk, dv, dhead_mask), probs) from the eager backend on inputs cast to ``dtype``;
    with ``keep`` (bool, (batch, heads, seq, seq)) its formulas run with that dropout mask.
    Gradients come back cast to ``dtype`` as the autograd Function casts them (dhead_mask stays
    float32, or float64 for float64); probs are the softmax weights before dropout."""
    q, k, v, grad_out = (t.to(dtype) for t in (q, k, v, grad_out))
    head_mask = None if head_mask is None else head_mask.to(dtype)
    (out, _), saved, state = EAGER.attention_forward(q, k, v, mask, head_mask, 0.0, scale, False)
    probs = saved.probs
    if keep is not None:
        weights = probs * keep / (1.0 - dropout_p)
        if head_mask is not None:
            weights = weights * head_mask.view(1, -1, 1, 1)
        out = torch.matmul(weights, v)
        saved, state = saved._replace(keep=keep), (dropout_p, scale)
    dq, dk, dv, dhm = EAGER.attention_backward(saved, state, grad_out, None, ALL_GRADS)
    dhm = None if dhm is None else dhm.to(torch.promote_types(dtype, torch.float32))
    return (out, dq.to(dtype), dk.to(dtype), dv.to(dtype), dhm), probs


def delta_rounding_allowance(q, k, grad_out, out64, probs64, scale, dtype):
    """One documented difference from eager, as elementwise allowances for dq and dk: the
    kernel's softmax-backward row term delta_i = rowsum(dO_i * O_i) reads the stored output,
    rounded to dtype (flash-attention's choice; eager has exact probabilities), so delta_i may be
    off by eps/2 * rowsum|dO_i * O_i|. That reaches dq_i as scale * err_i * sum_j p_ij |k_j| and
    dk_j as scale * sum_i p_ij err_i |q_i|. It matters where eager's own error vanishes (seq 1,
    where dq = dk = 0 exactly, in half precision)."""
    err = torch.finfo(dtype).eps / 2 * (grad_out.double() * out64).abs().sum(-1, keepdim=True)
    allow_dq = scale * err * torch.matmul(probs64, k.double().abs())
    allow_dk = scale * torch.matmul(probs64.transpose(-1, -2), err * q.double().abs())
    return {"dq": allow_dq, "dk": allow_dk}


def _shrink_toward(actual, ref64, allowance):
    """actual moved toward ref64 by at most ``allowance`` (float64): what is left is the error
    the standard rule must account for."""
    diff = actual.double() - ref64
    return ref64 + diff.sign() * (diff.abs() - allowance).clamp(min=0.0)


NAMES = ("out", "dq", "dk", "dv", "dhead_mask")


def assert_matches_eager(inputs, dtype, scale, **kernel_kw):
    """Kernel in dtype vs eager in dtype vs eager in float64 on the same inputs, everything."""
    keep, dropout_p = kernel_kw.pop("keep", None), kernel_kw.get("dropout_p", 0.0)
    ours = run_kernel(*inputs, scale, **kernel_kw)
    ref_d, _ = run_eager(*inputs, scale, dtype, keep=keep, dropout_p=dropout_p)
    ref64, probs64 = run_eager(*inputs, scale, torch.float64, keep=keep, dropout_p=dropout_p)
    q, k, _, grad_out = inputs[:4]
    allowance = delta_rounding_allowance(q, k, grad_out, ref64[0], probs64, scale, dtype)
    assert_each_within(ours, ref_d, ref64, allowance, dtype)


def assert_each_within(ours, ref_d, ref64, allowance, dtype):
    """(out, dq, dk, dv, dhead_mask) of the kernels vs eager in dtype and in float64: dtypes,
    finiteness, and the 2x rule after the delta allowance (dict name -> float64 tensor)."""
    for name, a, r, r64 in zip(NAMES, ours, ref_d, ref64):
        if r64 is None:
            assert a is None, f"{name} should be None"
            continue
        expected_dtype = torch.float32 if name == "dhead_mask" else dtype
        assert a.dtype == expected_dtype, f"{name} is {a.dtype}, expected {expected_dtype}"
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        if name in allowance:
            a = _shrink_toward(a, r64, allowance[name])
        assert_within_reference_error(name, a.double(), r.double(), r64, dtype)


# -- forward and every gradient vs eager ----------------------------------------------------------
SMALL_CASES = [  # (batch, heads, seq, head_dim, mask kind, head_mask)
    (2, 2, 1, 32, "padded", True),
    (3, 2, 7, 64, "random", True),
    (2, 2, 65, 32, "ones", False),
    (2, 2, 65, 64, None, True),
    (2, 2, 130, 32, "padded", True),
    (2, 2, 130, 64, "random", False),
    (2, 2, 24, 128, "random", True),
    (2, 3, 33, 17, "random", True),  # a head_dim that is no power of two (tiny model configs)
]
FULL_CASES = [  # CUDA only
    (8, 12, 128, 64, "padded", True),
    (8, 12, 512, 64, "padded", True),
    (8, 12, 512, 64, "random", False),
    (4, 12, 512, 128, "padded", True),
    (2, 4, 1030, 64, "random", True),  # two mask-scan chunks
]
# Every dtype x head_dim x flags combination is a few fresh kernel compiles on a GPU, and the GPU
# check has a few minutes for the whole suite: on CUDA the small edge cases (already run under the
# interpreter in float32 and float16) run in float16 only, the full-size ones in every dtype.
def match_params(small_cases, full_cases):
    """(dtype, case) pairs to run: see above."""
    if ON_CUDA:
        return ([(torch.float16, case) for case in small_cases]
                + [(dtype, case) for case in full_cases for dtype in DTYPES])
    return [(dtype, case) for case in small_cases for dtype in DTYPES]  # bfloat16 skips


MATCH_PARAMS = match_params(SMALL_CASES, FULL_CASES)
DROPOUT_DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else DTYPES


def _case_id(case):
    batch, heads, seq, head_dim, mask_kind, with_head_mask = case
    name = f"{batch}x{heads}x{seq}x{head_dim}-{mask_kind or 'nomask'}"
    return name + ("-headmask" if with_head_mask else "")


@pytest.mark.parametrize("dtype,case", MATCH_PARAMS,
                         ids=[f"{_case_id(c)}-{str(d)[6:]}" for d, c in MATCH_PARAMS])
def test_matches_eager(dtype, case):
    skip_if_unsupported(dtype)
    batch, heads, seq, head_dim, mask_kind, with_head_mask = case
    inputs = make_inputs(batch, heads, seq, head_dim, dtype, mask_kind, with_head_mask)
    assert_matches_eager(inputs, dtype, head_dim**-0.5)


def test_explicit_scale_and_large_scores():
    """A scale other than head_dim ** -0.5 and scores in the hundreds (a peaked softmax)."""
    inputs = make_inputs(2, 2, 40, 32, torch.float32, "random", True)
    q = inputs[0] * 6.0
    assert_matches_eager((q, *inputs[1:]), torch.float32, 0.9)


def test_lse_holds_each_rows_max_and_log2_sum():
    """The launchers' contract for lse, (batch, heads, 2, seq), in log2 units: the row max of
    score * log2(e) and log2 of the sum of 2^(that - max); together the natural log-sum-exp over
    ln 2. A fully-masked row scores 0 everywhere: (0, log2(seq))."""
    batch, heads, seq, head_dim = 3, 2, 37, 32
    q, k, v, _, mask, _ = make_inputs(batch, heads, seq, head_dim, torch.float32, "random", False)
    scale = 0.3
    _, lse = ta.attention_fwd(q, k, v, mask, None, 0.0, scale, 0)
    assert lse.dtype == torch.float32 and lse.shape == (batch, heads, 2, seq)
    scores = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale / math.log(2.0)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    row_max = scores.amax(dim=-1)
    log2_sum = torch.log2(torch.exp2(scores - row_max[..., None]).sum(dim=-1))
    row_max[-1], log2_sum[-1] = 0.0, math.log2(seq)  # the fully-masked batch row
    assert_close(lse[:, :, 0], row_max, atol=1e-5, name="row max")
    assert_close(lse[:, :, 1], log2_sum, atol=1e-5, name="log2 row sum")


# -- fully-masked rows --------------------------------------------------------------------------
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_fully_masked_row_attends_uniformly(dropout_p):
    """The eager semantics: out = mean of v (without dropout), finite, and no gradient to q or k."""
    batch, heads, seq, head_dim = 2, 2, 65, 32
    q, k, v, grad_out, _, _ = make_inputs(batch, heads, seq, head_dim, torch.float32, None, False)
    mask = torch.ones(batch, seq, dtype=torch.bool, device=DEVICE)
    mask[-1] = False
    out, dq, dk, dv, _ = run_kernel(q, k, v, grad_out, mask, None, head_dim**-0.5, dropout_p,
                                    seed=3)
    for name, t in zip(NAMES, (out, dq, dk, dv)):
        assert torch.isfinite(t).all(), f"{name} has non-finite values"
    if dropout_p == 0.0:
        def key_mean(t):  # every query row of the batch element: the mean over keys
            return t[-1].double().mean(dim=-2, keepdim=True).expand(heads, seq, head_dim)

        assert_close(out[-1], key_mean(v), atol=1e-6, name="out of the fully-masked row")
        assert_close(dv[-1], key_mean(grad_out), atol=1e-6, name="dv of the fully-masked row")
    assert torch.count_nonzero(dq[-1]) == 0, "the fully-masked row sent a gradient to q"
    assert torch.count_nonzero(dk[-1]) == 0, "the fully-masked row sent a gradient to k"
    assert torch.count_nonzero(dq[0]) > 0 and torch.count_nonzero(dk[0]) > 0


# -- dropout ------------------------------------------------------------------------------------
def recover_keep(batch, heads, seq, dropout_p, seed):
    """The kernel's keep mask (batch, heads, seq, seq) for ``seed``: with q = k = 0 every weight is
    1 / seq, so with v = identity out[..., i, j] = keep_ij / (seq * (1 - p))."""
    zeros = torch.zeros(batch, heads, seq, seq, device=DEVICE)
    eye = torch.eye(seq, device=DEVICE).expand(batch, heads, seq, seq)
    out, _ = ta.attention_fwd(zeros, zeros, eye, None, None, dropout_p, 1.0, seed)
    kept = 1.0 / (seq * (1.0 - dropout_p))
    exact = (out == 0) | ((out - kept).abs() < 1e-6 * kept)
    assert bool(exact.all()), "out is not keep / (seq (1 - p))"
    return out != 0


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES, ids=str)
def test_dropout_matches_eager_with_the_kernels_mask(dtype):
    """Forward and backward with dropout equal the eager formulas given the kernel's own mask: the
    mask depends only on the seed and the (batch, head, query, key) position, and the backward
    regenerates the forward's."""
    skip_if_unsupported(dtype)
    batch, heads, seq, head_dim, p, seed = 3, 2, 48, 48, 0.3, 1234
    keep = recover_keep(batch, heads, seq, p, seed)
    inputs = make_inputs(batch, heads, seq, head_dim, dtype, "random", True)
    assert_matches_eager(inputs, dtype, head_dim**-0.5, dropout_p=p, seed=seed, keep=keep)


def test_dropout_keep_rate_and_independence():
    batch, heads, seq, p = 2, 2, 48, 0.2  # seq as in the test above: the same compiled kernel
    keep = recover_keep(batch, heads, seq, p, seed=99)
    rate = keep.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / keep.numel())
    assert abs(rate - (1 - p)) < 5 * sigma, f"keep rate {rate:.4f}, want {1 - p} +- {5 * sigma:.4f}"
    flat = keep.reshape(batch * heads, seq * seq).double()
    for i in range(flat.shape[0]):  # every (batch, head) draws its own mask
        for j in range(i):
            assert not torch.equal(flat[i], flat[j]), f"slices {i} and {j} share a dropout mask"
    other = recover_keep(batch, heads, seq, p, seed=100)
    assert not torch.equal(keep, other), "the seed is ignored"


def test_dropout_is_deterministic_for_a_seed():
    batch, heads, seq, head_dim, p = 2, 2, 40, 32, 0.5
    q, k, v, grad_out, mask, head_mask = make_inputs(batch, heads, seq, head_dim, torch.float32,
                                                     "random", True)
    scale = head_dim**-0.5
    first = run_kernel(q, k, v, grad_out, mask, head_mask, scale, p, seed=7)
    as_tensor = torch.tensor([7], dtype=torch.int64, device=DEVICE)  # the no-host-sync form
    again = run_kernel(q, k, v, grad_out, mask, head_mask, scale, p, seed=as_tensor)
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
    other = run_kernel(q, k, v, grad_out, mask, head_mask, scale, p, seed=8)
    assert not torch.equal(first[0], other[0]), "a different seed gave the same output"


# -- layouts ------------------------------------------------------------------------------------
def test_packed_qkv_views_and_strided_grad_out():
    """q, k, v as views into one (batch, seq, 3, heads, head_dim) buffer, grad_out with a stride-0
    dimension: the same bits as contiguous inputs. Outputs are (batch, seq, heads, head_dim)
    memory, so merging heads needs no copy."""
    batch, heads, seq, head_dim = 2, 3, 33, 32
    qkv = torch.randn(batch, seq, 3, heads, head_dim, device=DEVICE)
    q, k, v = (qkv[:, :, i].permute(0, 2, 1, 3) for i in range(3))  # (batch, heads, seq, head_dim)
    assert not q.is_contiguous()
    mask = make_mask("random", batch, seq)
    head_mask = torch.rand(heads, device=DEVICE) + 0.5
    grad_out = torch.randn(batch, heads, 1, head_dim, device=DEVICE).expand(-1, -1, seq, -1)
    strided = run_kernel(q, k, v, grad_out, mask, head_mask, 0.2, 0.1, seed=5)
    dense = run_kernel(q.contiguous(), k.contiguous(), v.contiguous(), grad_out.contiguous(), mask,
                       head_mask, 0.2, 0.1, seed=5)
    for name, a, b in zip(NAMES, strided, dense):
        assert torch.equal(a, b), f"{name} depends on the input strides"
    for name, t in zip(NAMES[:4], strided[:4]):
        assert t.shape == (batch, heads, seq, head_dim), name
        assert t.transpose(1, 2).is_contiguous(), f"{name}: not (batch, seq, heads, dim) memory"


def test_need_head_mask_grad_false_and_no_head_mask():
    q, k, v, grad_out, mask, head_mask = make_inputs(2, 2, 9, 32, torch.float32, "random", True)
    out, lse = ta.attention_fwd(q, k, v, mask, head_mask, 0.0, 0.5, 0)
    *_, dhm = ta.attention_bwd(q, k, v, out, lse, grad_out, mask, head_mask, 0.0, 0.5, 0, False)
    assert dhm is None
    out, lse = ta.attention_fwd(q, k, v, mask, None, 0.0, 0.5, 0)
    *_, dhm = ta.attention_bwd(q, k, v, out, lse, grad_out, mask, None, 0.0, 0.5, 0, True)
    assert dhm is None


# -- bad arguments ------------------------------------------------------------------------------
def _bad_call(**overrides):
    q = torch.randn(2, 2, 5, 16, device=DEVICE)
    args = dict(q=q, k=q, v=q, key_padding_mask=None, head_mask=None, dropout_p=0.0, scale=0.25,
                seed=0)
    args.update(overrides)
    return lambda: ta.attention_fwd(**args)


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(q=torch.randn(2, 5, 16)), ValueError, "q must be (batch, heads, seq, head_dim)"),
        (dict(q=torch.randn(2, 2, 5, 16, dtype=torch.float64)), TypeError, "q must be float32"),
        (dict(k=torch.randn(2, 2, 6, 16)), ValueError, "k must have q's shape"),
        (dict(v=torch.randn(2, 2, 5, 16).half()), TypeError, "v must be torch.float32"),
        (dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300),
              v=torch.randn(1, 1, 2, 300)),
         ValueError, "head_dim must be in [1, 256]"),
        (dict(key_padding_mask=torch.ones(2, 5)), ValueError,
         "key_padding_mask must be a bool tensor"),
        (dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "shape (2, 5)"),
        (dict(head_mask=torch.ones(3)), ValueError,
         "head_mask must be a float tensor of shape (2,)"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
        (dict(dropout_p=0.1, seed=-1), ValueError, "seed must be an int"),
        (dict(dropout_p=0.1, seed=torch.tensor([1], dtype=torch.int32)), ValueError,
         "seed must be a (1,) int64"),
    ],
    ids=["rank", "float64", "k-shape", "v-dtype", "head_dim", "mask-dtype", "mask-shape",
         "head_mask", "dropout", "seed", "seed-tensor"],
)
def test_bad_arguments_are_named(overrides, error, message):
    overrides = {n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                 for n, t in overrides.items()}
    with pytest.raises(error, match=re.escape(message)):
        _bad_call(**overrides)()
