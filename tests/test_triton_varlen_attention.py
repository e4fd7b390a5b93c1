"""The Triton varlen attention launchers (``kernels/triton_varlen_attention.py``) against eager.

The reference is built from the eager backend's padded attention (the specification): each
sequence of the packed (total, heads, head_dim) tensors is padded into (batch, heads, max_seqlen,
head_dim), the eager op runs with the key-padding mask, and the result is unpadded. Kernel outputs
and every gradient are held to STYLE.md's rule against it (|kernel(d) - eager(float64)| <= 2 x
|eager(d) - eager(float64)| + atol(d), with the padded tests' allowance for delta's rounding).

Cases: odd lengths, length-1 and zero-length sequences, max_seqlen above the longest sequence,
q/k/v as strided views of one fused QKV tensor, a head_mask with a zero (and its gradient),
dropout (deterministic per seed, equal to eager's formulas given the kernels' own mask, redrawn
on each CUDA-graph replay). On CPU
the kernels run under Triton's interpreter at small sizes (bfloat16 skips there); on CUDA the
full-size ragged batches run too, in every dtype.
"""

import math
import os
import re

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
pytest.importorskip("triton")

from conftest import cu_seqlens_of, cuda_graph_replays, packed_qkv  # noqa: E402
from distilbert_fast.kernels import triton_varlen_attention as tva  # noqa: E402
from distilbert_fast.kernels.triton_attention import _INTERPRETED  # noqa: E402
from test_triton_attention import (  # noqa: E402
    DROPOUT_DTYPES, NAMES, assert_each_within, delta_rounding_allowance, match_params, run_eager,
    skip_if_unsupported,
)

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
if not ON_CUDA and not _INTERPRETED:
    pytest.skip("no CUDA, and Triton's interpreter was off when the kernels were defined",
                allow_module_level=True)


# -- packing ------------------------------------------------------------------------------------
def pad(x, lengths, max_len):
    """(total, heads, head_dim) -> (batch, heads, max_len, head_dim), zeros after each end."""
    out = x.new_zeros(len(lengths), x.shape[1], max_len, x.shape[2])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :, :n] = x[start:start + n].transpose(0, 1)
        start += n
    return out


def unpad(y, lengths):
    """(batch, heads, max_len, head_dim) -> (total, heads, head_dim)."""
    return torch.cat([y[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def key_mask(lengths, max_len):
    return torch.arange(max_len, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]


def make_inputs(lengths, heads, head_dim, dtype, with_head_mask, fused=False):
    """q, k, v, grad_out (rounded to dtype), cu_seqlens and a head_mask with a zero. fused: q, k, v
    are (total, heads, head_dim) views of one (total, 3 * heads * head_dim) tensor."""
    q, k, v, cu_seqlens = packed_qkv(lengths, heads, head_dim, dtype, DEVICE, fused)
    grad_out = torch.randn(q.shape).to(DEVICE, dtype)
    head_mask = None
    if with_head_mask:
        head_mask = (torch.rand(heads) + 0.25).to(DEVICE, dtype)
        head_mask[0] = 0.0
    return q, k, v, grad_out, cu_seqlens, head_mask


# -- the two sides of every comparison ----------------------------------------------------------
def run_kernel(q, k, v, grad_out, cu_seqlens, head_mask, max_seqlen, scale, dropout_p=0.0, seed=0):
    """(out, dq, dk, dv, dhead_mask) from the launchers."""
    out, lse = tva.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p,
                                        scale, seed)
    grads = tva.varlen_attention_bwd(q, k, v, out, lse, grad_out, cu_seqlens, max_seqlen,
                                     head_mask, dropout_p, scale, seed, need_head_mask_grad=True)
    return (out, *grads)


def run_padded_eager(lengths, q, k, v, grad_out, head_mask, scale, dtype, keep=None, dropout_p=0.0):
    """((out, dq, dk, dv, dhead_mask) unpadded, and the padded pieces the allowance needs)."""
    max_len = max(max(lengths), 1)
    padded = [pad(t.to(dtype), lengths, max_len) for t in (q, k, v, grad_out)]
    results, probs = run_eager(*padded, key_mask(lengths, max_len), head_mask, scale, dtype,
                               keep=keep, dropout_p=dropout_p)
    unpadded = tuple(unpad(t, lengths) for t in results[:4]) + (results[4],)
    return unpadded, padded, probs, results[0]


def assert_matches_eager(lengths, inputs, dtype, max_seqlen, scale, **kernel_kw):
    keep, dropout_p = kernel_kw.pop("keep", None), kernel_kw.get("dropout_p", 0.0)
    q, k, v, grad_out, cu_seqlens, head_mask = inputs
    ours = run_kernel(q, k, v, grad_out, cu_seqlens, head_mask, max_seqlen, scale, **kernel_kw)
    ref_d, *_ = run_padded_eager(lengths, q, k, v, grad_out, head_mask, scale, dtype, keep,
                                 dropout_p)
    ref64, padded64, probs64, out64 = run_padded_eager(lengths, q, k, v, grad_out, head_mask,
                                                       scale, torch.float64, keep, dropout_p)
    pq, pk, _, pgrad = padded64
    allowance = {name: unpad(a, lengths) for name, a in delta_rounding_allowance(
        pq, pk, pgrad, out64, probs64, scale, dtype).items()}
    for name, a in zip(NAMES[:4], ours[:4]):
        assert a.shape == q.shape and a.is_contiguous(), f"{name}: {tuple(a.shape)}"
    assert_each_within(ours, ref_d, ref64, allowance, dtype)


# -- forward and every gradient vs eager --------------------------------------------------------
SMALL_CASES = [  # (lengths, heads, head_dim, max_seqlen above the longest by, head_mask, fused)
    ((5, 1, 0, 37, 16), 2, 32, 3, True, True),  # odd, length 1, empty, a slack max_seqlen
    ((65, 33), 2, 64, 0, False, False),  # several query and key blocks, ragged edges
    ((1, 1, 1), 3, 16, 0, True, False),  # only length-1 sequences
    ((0, 9, 0), 2, 17, 40, True, True),  # empty ends, head_dim no power of two, idle blocks
]
FULL_CASES = [  # CUDA only: (lengths, heads, head_dim, slack, head_mask, fused)
    (tuple(torch.randint(16, 513, (16,), generator=torch.Generator().manual_seed(1)).tolist()),
     12, 64, 0, True, True),
    (tuple(torch.randint(1, 129, (32,), generator=torch.Generator().manual_seed(2)).tolist()),
     12, 64, 7, False, True),
    ((512, 3, 0, 300, 511), 12, 128, 0, True, False),
]
MATCH_PARAMS = match_params(SMALL_CASES, FULL_CASES)  # on CPU: bfloat16 skips


def _case_id(case):
    lengths, heads, head_dim, slack, with_head_mask, fused = case
    shown = "-".join(map(str, lengths)) if len(lengths) <= 5 else f"{len(lengths)}seqs"
    name = f"{shown}x{heads}x{head_dim}" + (f"-slack{slack}" if slack else "")
    return name + ("-headmask" if with_head_mask else "") + ("-fused" if fused else "")


@pytest.mark.parametrize("dtype,case", MATCH_PARAMS,
                         ids=[f"{_case_id(c)}-{str(d)[6:]}" for d, c in MATCH_PARAMS])
def test_matches_padded_eager(dtype, case):
    skip_if_unsupported(dtype)
    lengths, heads, head_dim, slack, with_head_mask, fused = case
    inputs = make_inputs(lengths, heads, head_dim, dtype, with_head_mask, fused)
    assert_matches_eager(lengths, inputs, dtype, max(lengths) + slack, head_dim**-0.5)


def test_default_scale_and_large_scores():
    """scale=None is head_dim ** -0.5; scores in the hundreds (a peaked softmax) stay exact."""
    lengths = (20, 3, 11)
    q, *rest = make_inputs(lengths, 2, 32, torch.float32, True)
    q = q * 30.0
    assert_matches_eager(lengths, (q, *rest), torch.float32, 20, 0.9)
    inputs = (q, *rest)
    default = run_kernel(*inputs, 20, None)
    explicit = run_kernel(*inputs, 20, 32**-0.5)
    for name, a, b in zip(NAMES, default, explicit):
        assert torch.equal(a, b), f"{name}: scale=None is not head_dim ** -0.5"


def test_sequences_do_not_see_each_other():
    """Changing one sequence's tokens leaves the other sequences' outputs bit for bit."""
    lengths = (6, 9, 4)
    q, k, v, _, cu, _ = make_inputs(lengths, 2, 16, torch.float32, False)
    out, _ = tva.varlen_attention_fwd(q, k, v, cu, 9, None, 0.0, None, 0)
    k2, v2 = k.clone(), v.clone()
    k2[6:15] += 1.0
    v2[6:15] -= 2.0
    out2, _ = tva.varlen_attention_fwd(q, k2, v2, cu, 9, None, 0.0, None, 0)
    assert torch.equal(out[:6], out2[:6]) and torch.equal(out[15:], out2[15:])
    assert not torch.equal(out[6:15], out2[6:15])


# -- dropout ------------------------------------------------------------------------------------
def recover_keep(lengths, heads, dropout_p, seed):
    """The kernels' keep mask in padded coordinates (batch, heads, max_len, max_len): with q = k =
    0 every weight of a sequence of n tokens is 1 / n, so with v_j = e_j (its local position)
    out[i, j] = keep_ij / (n * (1 - p))."""
    max_len = max(lengths)
    total = sum(lengths)
    zeros = torch.zeros(total, heads, max_len, device=DEVICE)
    eye = unpad(torch.eye(max_len, device=DEVICE).expand(len(lengths), heads, max_len, max_len),
                lengths)
    out, _ = tva.varlen_attention_fwd(zeros, zeros, eye.contiguous(),
                                      cu_seqlens_of(lengths, DEVICE), max_len, None, dropout_p,
                                      1.0, seed)
    kept = pad(out, lengths, max_len) * torch.tensor(lengths, device=DEVICE).view(-1, 1, 1, 1)
    kept = kept * (1.0 - dropout_p)
    assert bool(((kept == 0) | ((kept - 1.0).abs() < 1e-5)).all()), "out is not keep / (n (1 - p))"
    return kept > 0.5


@pytest.mark.parametrize("dtype", DROPOUT_DTYPES, ids=str)
def test_dropout_matches_eager_with_the_kernels_mask(dtype):
    """Forward and backward with dropout equal the eager formulas given the kernels' own mask
    (which the backward regenerates from the seed), head_mask and its gradient included."""
    skip_if_unsupported(dtype)
    lengths, heads, head_dim, p, seed = (29, 1, 40, 0, 12), 2, 48, 0.3, 1234
    keep = recover_keep(lengths, heads, p, seed)
    in_range = key_mask(lengths, 40)
    kept = keep[(in_range[:, :, None] & in_range[:, None, :])[:, None].expand_as(keep)]
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / kept.numel())
    inputs = make_inputs(lengths, heads, head_dim, dtype, True, fused=True)
    assert_matches_eager(lengths, inputs, dtype, 40, head_dim**-0.5, dropout_p=p, seed=seed,
                         keep=keep)


def test_dropout_is_deterministic_for_a_seed():
    lengths, p = (13, 2, 30), 0.5
    inputs = make_inputs(lengths, 2, 32, torch.float32, True, fused=True)
    first = run_kernel(*inputs, 30, None, p, seed=7)
    as_tensor = torch.tensor([7], dtype=torch.int64, device=DEVICE)  # the no-host-sync form
    again = run_kernel(*inputs, 30, None, p, seed=as_tensor)
    for name, a, b in zip(NAMES, first, again):
        assert torch.equal(a, b), f"{name} differs between two runs with the same seed"
    other = run_kernel(*inputs, 30, None, p, seed=8)
    assert not torch.equal(first[0], other[0]), "a different seed gave the same output"


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a CUDA device")
def test_dropout_draws_new_masks_on_each_cuda_graph_replay():
    """The backend draws each call's seed on the device, inside the captured region, and the
    kernels read it there: every replay of a CUDA graph gets a fresh mask."""
    from distilbert_fast.ops.triton_backend import TritonBackend

    backend = TritonBackend()
    q, k, v, _, cu, _ = make_inputs((100, 3, 60), 2, 64, torch.float16, False, fused=True)
    replays = cuda_graph_replays(lambda: backend.varlen_attention_forward(q, k, v, cu, 100, None, 0.3, None)[0])
    assert not torch.equal(replays[0], replays[1]) and not torch.equal(replays[1], replays[2])


# -- the backend's methods -----------------------------------------------------------------------
def test_backend_methods_and_needs_grad():
    from distilbert_fast.ops.triton_backend import TritonBackend

    backend = TritonBackend()
    lengths = (7, 0, 12)
    q, k, v, grad_out, cu, head_mask = make_inputs(lengths, 2, 16, torch.float32, True, True)
    out, saved, state = backend.varlen_attention_forward(q, k, v, cu, 12, head_mask, 0.0, None)
    want = run_kernel(q, k, v, grad_out, cu, head_mask, 12, None)
    assert torch.equal(out, want[0])
    needs = (True, True, True, False, False, True, False, False)
    grads = backend.varlen_attention_backward(saved, state, grad_out, needs)
    for name, a, b in zip(NAMES[1:], grads, want[1:]):
        assert torch.equal(a, b), name
    needs = (True, True, True, False, False, False, False, False)
    assert backend.varlen_attention_backward(saved, state, grad_out, needs)[3] is None
    torch.manual_seed(3)
    out_a, saved_a, state_a = backend.varlen_attention_forward(q, k, v, cu, 12, None, 0.2, None)
    torch.manual_seed(3)
    out_b, _, _ = backend.varlen_attention_forward(q, k, v, cu, 12, None, 0.2, None)
    assert torch.equal(out_a, out_b) and not torch.equal(out_a, out)
    dq, dk, dv, dhm = backend.varlen_attention_backward(saved_a, state_a, grad_out, needs)
    assert dhm is None and all(bool(torch.isfinite(t).all()) for t in (dq, dk, dv))


# -- bad arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(q=torch.randn(2, 5, 2, 16)), ValueError, "q must be (total_tokens, heads, head_dim)"),
        (dict(k=torch.randn(6, 2, 16)), ValueError, "k must have q's shape"),
        (dict(cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens must be a 1-D int32"),
        (dict(max_seqlen=5.0), ValueError, "max_seqlen must be a Python int"),
        (dict(head_mask=torch.ones(3)), ValueError, "head_mask must be a float tensor of shape (2,)"),
        (dict(dropout_p=1.0), ValueError, "dropout_p must be in [0, 1)"),
    ],
    ids=["rank", "k-shape", "cu_seqlens-dtype", "max_seqlen", "head_mask", "dropout"],
)
def test_bad_arguments_are_named(overrides, error, message):
    q = torch.randn(5, 2, 16, device=DEVICE)
    args = dict(q=q, k=q, v=q, cu_seqlens=cu_seqlens_of([2, 3], DEVICE), max_seqlen=3, head_mask=None,
                dropout_p=0.0, scale=None, seed=0)
    args.update({n: t.to(DEVICE) if isinstance(t, torch.Tensor) else t
                 for n, t in overrides.items()})
    with pytest.raises(error, match=re.escape(message)):
        tva.varlen_attention_fwd(**args)
