"""Packed-token execution: the varlen attention op on every CPU backend, packing helpers, and the
model's packed paths against its padded path and against transformers.

- ``varlen_attention`` vs a float64 per-sequence reference written here (plain torch, autograd),
  by STYLE.md's rule (error at most 2x the reference's own error in the dtype, plus a small atol),
  forward and every gradient; gradcheck in float64.
- Each model class, HF's weights: a padded batch with padding (ragged, length 1, full length,
  left padding, a mask with holes, a fully-padded row) through the padded entry point (which packs
  inside) and the same sequences through the packed entry point (cu_seqlens), against HF's model:
  every real position, losses, pooled outputs and every parameter gradient.
- Bad input: a clear ValueError naming the argument.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

import distilbert_fast
from conftest import CLASS_NAMES, assert_close, cu_seqlens_of, hf_forward, make_pair, packed_qkv
from distilbert_fast import ops, packing
from test_ops import (ATOL, DTYPES, assert_within_reference_error, check_against_reference, cpu_backends,
                      skip_unless_runs)

ATOL_MODEL = 5e-5  # as test_parity: fp32 vs fp32 with sums in another order
GRAD_RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the varlen op ---------------------------------------------------------------------------------


def ref_varlen_attention(q, k, v, cu_seqlens, max_seqlen, head_mask=None, scale=None):
    """Plain torch, one sequence at a time: softmax(q k^T * scale) [* head_mask] @ v."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # (heads, len, head_dim)
        weights = F.softmax(torch.matmul(qs, ks.transpose(-1, -2)) * scale, dim=-1)
        if head_mask is not None:
            weights = weights * head_mask.view(-1, 1, 1)
        outs.append(torch.matmul(weights, vs).transpose(0, 1))
    return torch.cat(outs)


VARLEN_CASES = {  # name: (lengths, heads, head_dim)
    "one_token": ([1], 2, 32),
    "ragged": ([3, 1, 7, 64], 3, 16),
    "empty_sequences": ([0, 5, 0, 2, 0], 2, 8),
    "long_odd": ([130, 65, 1], 2, 17),
    "head_dim_64": ([70, 9], 2, 64),
    # longer than the cpu forward's key block (512): folded in two blocks by the online softmax
    "longer_than_a_key_block": ([700, 3], 2, 16),
}


def varlen_args(lengths, heads, head_dim, fused=True, with_head_mask=False, **kw):
    """The varlen op's arguments: q, k, v as strided views of one (total, 3 * dim) fused
    projection, as the model gives (conftest.packed_qkv)."""
    q, k, v, cu_seqlens = packed_qkv(lengths, heads, head_dim, fused=fused)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens, max_seqlen=max(max(lengths), 1),
                head_mask=torch.rand(heads) + 0.25 if with_head_mask else None)
    args.update(kw)
    return args


# triton's varlen kernel is held to the same rule in tests/test_triton_varlen_attention.py, with the
# documented allowance for its softmax-backward row term read from the rounded output (it matters
# for one-token sequences in float16, where eager's dq is exactly 0)
@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(VARLEN_CASES))
@pytest.mark.parametrize("with_head_mask", [False, True], ids=["plain", "headmask"])
def test_varlen_attention_matches_reference(backend, dtype, case, with_head_mask):
    skip_unless_runs(backend, dtype)
    lengths, heads, head_dim = VARLEN_CASES[case]
    args = varlen_args(lengths, heads, head_dim, with_head_mask=with_head_mask)
    grad_names = ["q", "k", "v"] + (["head_mask"] if with_head_mask else [])
    op = functools.partial(ops.varlen_attention, backend=backend)
    check_against_reference(op, ref_varlen_attention, args, grad_names, dtype, ["out"])


# The cpu backend's bfloat16 inference path (no gradient wanted): a batch of at most two runs of
# equal-length sequences, each long enough, runs on PyTorch's flash CPU kernel; anything else on ours.
FLASH_CASES = {  # name: (lengths, heads, head_dim, whether the flash kernel takes it)
    "one_run": ([160, 160, 160], 2, 64, True),
    "two_runs_odd_head_dim": ([200, 200, 129], 3, 17, True),
    "empty_sequences_inside_a_run": ([0, 128, 0, 128, 0], 2, 32, True),
    "three_runs": ([130, 129, 128], 2, 16, False),
    "too_short": ([127, 127], 2, 16, False),
    "long_then_short": ([300, 5], 2, 16, False),
}


@pytest.mark.skipif("cpu" not in cpu_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_varlen_attention_bf16_inference_paths(case):
    """Forward only, the output against the float64 reference by STYLE.md's rule, whichever
    kernel the batch takes; and which one it takes."""
    from distilbert_fast.ops import cpu_backend

    lengths, heads, head_dim, flash = FLASH_CASES[case]
    args = {name: value.to(torch.bfloat16) if name in "qkv" else value
            for name, value in varlen_args(lengths, heads, head_dim).items()}
    runs = cpu_backend._flash_runs(args["q"], args["k"], args["v"], args["cu_seqlens"], None, 0.0)
    assert (runs is not None) == flash, runs
    with torch.no_grad():
        out = ops.varlen_attention(**args, backend="cpu")
        ref_d = ref_varlen_attention(**args)
        ref64 = ref_varlen_attention(**{n: v.double() if n in "qkv" else v for n, v in args.items()})
    assert_within_reference_error("out", out, ref_d, ref64, torch.bfloat16)
    # wanting a gradient takes our kernel (its backward needs our saved results)
    assert cpu_backend._flash_runs(args["q"].requires_grad_(), args["k"], args["v"], args["cu_seqlens"],
                                   None, 0.0) is None


@pytest.mark.parametrize("backend", cpu_backends())
def test_varlen_attention_matches_padded_op(backend):
    """The same numbers as masked_attention on the padded batch (real query rows)."""
    lengths, heads, head_dim = [5, 1, 9], 3, 8
    args = varlen_args(lengths, heads, head_dim, fused=False, with_head_mask=True, scale=0.3)
    out = ops.varlen_attention(**args, backend=backend)
    batch, seq = len(lengths), max(lengths)
    keep = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    layout = packing.packing_of(keep, sum(lengths), seq)
    padded = [layout.pad(args[n]).transpose(1, 2) for n in "qkv"]  # (batch, heads, seq, head_dim)
    ref, _ = ops.masked_attention(*padded, key_padding_mask=keep, head_mask=args["head_mask"],
                                  scale=0.3, backend=backend)
    assert_close(out, layout.unpad(ref.transpose(1, 2)), atol=1e-6, name="varlen vs padded")
    assert out.is_contiguous() and out.shape == args["q"].shape
    assert ops.last_backend("varlen_attention") == backend


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("eager", "cpu")])
def test_varlen_attention_gradcheck(backend):
    args = varlen_args([3, 0, 4, 1], 2, 5, fused=False, with_head_mask=True)
    args = {k: (v.double().requires_grad_(True) if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in args.items()}
    names = ["q", "k", "v", "head_mask"]

    def fn(*tensors):
        return ops.varlen_attention(**{**args, **dict(zip(names, tensors))}, backend=backend)

    assert torch.autograd.gradcheck(fn, tuple(args[n] for n in names), atol=1e-8)


@pytest.mark.parametrize("backend", cpu_backends())
def test_varlen_attention_dropout(backend):
    """Dropout: seeded runs repeat; the output differs from p = 0; the mean over many draws is
    the expectation (the p = 0 output), within sampling noise."""
    skip_unless_runs(backend, torch.float32)
    args = varlen_args([6, 3], 2, 8)
    plain = ops.varlen_attention(**args, backend=backend)
    torch.manual_seed(3)
    a = ops.varlen_attention(**args, dropout_p=0.3, backend=backend)
    torch.manual_seed(3)
    b = ops.varlen_attention(**args, dropout_p=0.3, backend=backend)
    assert torch.equal(a, b)
    assert not torch.allclose(a, plain, atol=1e-3)
    mean = torch.stack([ops.varlen_attention(**args, dropout_p=0.3, backend=backend) for _ in range(400)]).mean(0)
    assert_close(mean, plain, atol=0.15, name="mean of dropout draws")


VARLEN_BAD = [
    (dict(cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int64)), "cu_seqlens must have dtype torch.int32"),
    (dict(cu_seqlens=torch.tensor([1, 3, 5], dtype=torch.int32)), "cu_seqlens must start at 0"),
    (dict(cu_seqlens=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), "cu_seqlens must be non-decreasing"),
    (dict(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), r"cu_seqlens\[-1\] must equal"),
    (dict(cu_seqlens=torch.tensor([[0, 3, 5]], dtype=torch.int32)), r"cu_seqlens must have shape \(batch \+ 1,\)"),
    (dict(max_seqlen=2), "max_seqlen must be at least the longest sequence"),
    (dict(max_seqlen=0), "max_seqlen must be at least 1"),
    (dict(max_seqlen=3.0), "max_seqlen must be a Python int"),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bad,message", VARLEN_BAD, ids=[m for _, m in VARLEN_BAD])
def test_varlen_attention_bad_input(backend, bad, message):
    args = {**varlen_args([3, 2], 2, 4), **bad}
    with pytest.raises((ValueError, TypeError), match=message):
        ops.varlen_attention(**args, backend=backend)


def test_varlen_attention_bad_shapes():
    args = varlen_args([3, 2], 2, 4)
    with pytest.raises(ValueError, match="q must have 3 dims"):
        ops.varlen_attention(**{**args, "q": args["q"][None]})
    with pytest.raises(ValueError, match="k must have shape"):
        ops.varlen_attention(**{**args, "k": args["k"][:4]})
    with pytest.raises(ValueError, match="head_mask must have shape"):
        ops.varlen_attention(**{**args, "head_mask": torch.ones(3)})


# -- packing helpers -------------------------------------------------------------------------------


def test_unpad_pad_round_trip():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    hidden = torch.randn(3, 4, 5)
    packed, indices, cu_seqlens, max_seqlen = packing.unpad(hidden, mask)
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0, 2, 5, 7]
    assert max_seqlen == 3 and isinstance(max_seqlen, int)
    assert torch.equal(packed, hidden[mask.bool()])
    back = packing.pad(packed, indices, 3, 4)
    assert torch.equal(back, hidden * mask[..., None])
    seq_index, positions = packing.sequence_positions(cu_seqlens, 7)
    assert seq_index.tolist() == [0, 0, 1, 1, 1, 2, 2] and positions.tolist() == [0, 1, 0, 1, 2, 0, 1]


# -- the model: packed vs padded vs HF -------------------------------------------------------------

# rows of the padded batch: ragged, length 1, full length, left padding, holes
MASK_ROWS = [
    [1, 1, 1, 1, 1, 0, 0, 0],
    [1, 0, 0, 0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1, 1, 1, 1],
    [0, 0, 0, 1, 1, 1, 1, 1],
    [1, 1, 0, 1, 1, 0, 1, 0],
    [1, 1, 1, 0, 0, 0, 0, 0],
]
SEQ = len(MASK_ROWS[0])
NUM_CHOICES = 2


def padded_batch(class_name, config, mask_rows=MASK_ROWS, labels=True):
    mask = torch.tensor(mask_rows)
    rows = mask.shape[0]
    ids = torch.randint(1, config.vocab_size, (rows, SEQ)).masked_fill(mask == 0, config.pad_token_id)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if labels:
        inputs.update(_labels(class_name, config, rows, mask))
    if class_name == "DistilBertForMultipleChoice":
        inputs = {k: v.view(rows // NUM_CHOICES, NUM_CHOICES, *v.shape[1:]) if v.dim() == 2 else v
                  for k, v in inputs.items()}
    return inputs


def _labels(class_name, config, rows, mask):
    def token_labels(n):
        return torch.randint(0, n, (rows, SEQ)).masked_fill(mask == 0, -100)

    if class_name == "DistilBertForMaskedLM":
        return {"labels": token_labels(config.vocab_size)}
    if class_name == "DistilBertForTokenClassification":
        return {"labels": token_labels(config.num_labels)}
    if class_name == "DistilBertForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (rows,))}
    if class_name == "DistilBertForMultipleChoice":
        return {"labels": torch.randint(0, NUM_CHOICES, (rows // NUM_CHOICES,))}
    if class_name == "DistilBertForQuestionAnswering":
        return {"start_positions": torch.randint(0, SEQ, (rows,)), "end_positions": torch.randint(0, SEQ, (rows,))}
    return {}


def to_packed(inputs):
    """The padded batch's sequences (real tokens, in order) as packed input."""
    mask = inputs["attention_mask"].bool()
    lengths = mask.sum(1)
    packed = dict(input_ids=inputs["input_ids"][mask], cu_seqlens=cu_seqlens_of(lengths.tolist()),
                  max_seqlen=int(lengths.max()))
    for key in ("labels",):
        if key in inputs and inputs[key].dim() == 2:
            packed[key] = inputs[key][mask]
        elif key in inputs:
            packed[key] = inputs[key]
    return packed


TOKEN_FIELDS = {"last_hidden_state", "logits", "start_logits", "end_logits"}


def compare_real_positions(ours, hf, mask, packed_ours=False, padding="zeros"):
    """Every field of HF's output: token-level tensors at real positions (ours: packed rows, or
    padded with ``padding`` "zeros" or HF's values ("hf": the padded computation ran)), the rest
    as is."""
    assert list(ours.keys()) == list(hf.keys())
    real = mask.bool()
    for key in hf.keys():
        h, o = hf[key], ours[key]
        if key == "loss":
            assert_close(o, h, atol=ATOL_MODEL, name="loss")
        elif key == "hidden_states":
            for i, (oh, hh) in enumerate(zip(o, h)):
                _compare_tokens(oh, hh, real, packed_ours, padding, f"hidden_states[{i}]")
        elif key in TOKEN_FIELDS and h.shape[:2] == real.shape:
            _compare_tokens(o, h, real, packed_ours, padding, key)
        else:
            assert_close(o, h, atol=ATOL_MODEL, name=key)


def _compare_tokens(ours, hf, real, packed_ours, padding, name):
    if padding == "hf":
        assert_close(ours, hf, atol=ATOL_MODEL, name=name)
        return
    if packed_ours:
        assert ours.shape == (int(real.sum()), *hf.shape[2:]), name
        assert_close(ours, hf[real], atol=ATOL_MODEL, name=name)
        return
    assert ours.shape == hf.shape, name
    assert_close(ours[real], hf[real], atol=ATOL_MODEL, name=name)
    assert not ours[~real].any(), f"{name}: padding positions must hold zeros"


def token_objective(out, mask, packed=False):
    """A scalar over every output at real positions, through fixed random weights."""
    gen = torch.Generator().manual_seed(99)
    real = mask.bool()
    total = 0.0
    for key in out.keys():
        values = out[key] if isinstance(out[key], tuple) else (out[key],)
        for value in values:
            if key in TOKEN_FIELDS | {"hidden_states"} and (packed or value.shape[:2] == real.shape):
                value = value if packed else value[real]
            weight = torch.randn(value.shape, generator=gen)
            total = total + (value * weight).sum()
    return total


def assert_grads_close(ours, hf):
    hf_params = dict(hf.named_parameters())
    compared = 0
    for name, param in ours.named_parameters():
        expected = hf_params[name].grad
        if expected is None:
            assert param.grad is None or not param.grad.any(), name
            continue
        assert param.grad is not None, f"{name}: no gradient"
        scale = expected.abs().max().item()
        assert_close(param.grad, expected, atol=GRAD_RTOL * scale + ATOL_MODEL, name=f"grad {name}")
        compared += 1
    assert compared > 0


def _path(model):
    """Which attention op the last forward ran: packed (varlen) or padded (masked)."""
    return {op for op in ops.last_backend() if op in ("varlen_attention", "masked_attention")}


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_padded_entry_packs_and_matches_hf(class_name):
    """Forward and every parameter gradient; the run really went through varlen attention
    (except where the head needs padding positions: left padding under [CLS] pooling, QA loss)."""
    hf, ours = make_pair(class_name, initializer_range=0.3)
    inputs = padded_batch(class_name, ours.config)
    mask = inputs["attention_mask"].reshape(-1, SEQ)
    flags = dict(output_hidden_states=True)
    distilbert_fast.ops.backends._last.clear()
    our_out = ours(**inputs, **flags)
    hf_out = hf_forward(hf, **inputs, **flags)
    packed_expected = class_name in ("DistilBertModel", "DistilBertForMaskedLM", "DistilBertForTokenClassification")
    assert _path(ours) == ({"varlen_attention"} if packed_expected else {"masked_attention"})
    compare_real_positions(our_out, hf_out, mask, padding="zeros" if packed_expected else "hf")
    token_objective(our_out, mask).backward()
    token_objective(hf_out, mask).backward()
    assert_grads_close(ours, hf)


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "DistilBertForMultipleChoice",
                                        "DistilBertForQuestionAnswering"])
def test_pooling_heads_pack_without_left_padding(class_name):
    """[CLS] pooling heads pack when every row starts with a real token; QA packs without labels."""
    hf, ours = make_pair(class_name, initializer_range=0.3)
    rows = [r for r in MASK_ROWS if r[0] == 1][:4]
    inputs = padded_batch(class_name, ours.config, rows, labels=class_name != "DistilBertForQuestionAnswering")
    mask = inputs["attention_mask"].reshape(-1, SEQ)
    distilbert_fast.ops.backends._last.clear()
    our_out = ours(**inputs)
    assert _path(ours) == {"varlen_attention"}
    hf_out = hf_forward(hf, **inputs)
    compare_real_positions(our_out, hf_out, mask)
    token_objective(our_out, mask).backward()
    token_objective(hf_out, mask).backward()
    assert_grads_close(ours, hf)


PACKED_ROWS = [[1] * 5 + [0] * 3, [1] + [0] * 7, [1] * 8, [1] * 3 + [0] * 5]  # right-padded


@pytest.mark.parametrize("class_name", [c for c in CLASS_NAMES if c != "DistilBertForMultipleChoice"])
def test_packed_entry_matches_hf(class_name):
    """model(input_ids=(total,), cu_seqlens, max_seqlen): packed outputs equal HF's real
    positions; sequence-level heads pool each sequence's first token; losses and gradients."""
    hf, ours = make_pair(class_name, initializer_range=0.3)
    inputs = padded_batch(class_name, ours.config, PACKED_ROWS)
    mask = inputs["attention_mask"]
    packed = to_packed(inputs)
    if class_name == "DistilBertForQuestionAnswering":
        # positions count within each sequence; one past its end is ignored, as HF ignores >= seq
        lengths = mask.sum(1)
        starts = torch.minimum(torch.randint(0, SEQ, (len(PACKED_ROWS),)), lengths - 1)
        starts[0] = lengths[0] + 2
        positions = dict(start_positions=starts, end_positions=torch.minimum(starts + 1, lengths - 1))
        with torch.no_grad():
            loss = ours(**packed, **positions).loss
            hf_logits = hf_forward(hf, **{k: inputs[k] for k in ("input_ids", "attention_mask")})
        # HF's own loss normalises over padding too: compare with each row's own tokens
        assert_close(loss, _per_sequence_span_loss(hf_logits, positions, mask), atol=ATOL_MODEL, name="loss")
        inputs = {k: v for k, v in inputs.items() if "positions" not in k}
        packed = {k: v for k, v in packed.items() if "positions" not in k}
    our_out = ours(**packed, output_hidden_states=True)
    hf_out = hf_forward(hf, **inputs, output_hidden_states=True)
    compare_real_positions(our_out, hf_out, mask, packed_ours=True)
    token_objective(our_out, mask, packed=True).backward()
    token_objective(hf_out, mask).backward()
    assert_grads_close(ours, hf)


def _per_sequence_span_loss(hf_out, inputs, mask):
    """HF's logits, each row's cross-entropy over its own real tokens (padding excluded)."""
    def loss(logits, positions):
        logits = logits.masked_fill(mask == 0, torch.finfo(logits.dtype).min)
        lengths = mask.sum(1)
        positions = torch.minimum(positions.clamp(min=0), lengths)
        return F.cross_entropy(logits, positions.masked_fill(positions == lengths, -100), ignore_index=-100)
    return (loss(hf_out.start_logits, inputs["start_positions"]) + loss(hf_out.end_logits, inputs["end_positions"])) / 2


def test_fully_padded_row_runs_padded_and_matches_hf():
    """A row with no real token: HF attends uniformly over its padding, which only the padded
    computation reproduces: the model runs padded, and every position equals HF's."""
    hf, ours = make_pair("DistilBertModel", initializer_range=0.3)
    rows = MASK_ROWS[:3] + [[0] * SEQ]
    inputs = padded_batch("DistilBertModel", ours.config, rows)
    distilbert_fast.ops.backends._last.clear()
    our_out = ours(**inputs)
    assert _path(ours) == {"masked_attention"}
    assert_close(our_out.last_hidden_state, hf_forward(hf, **inputs).last_hidden_state, atol=ATOL_MODEL)


def test_no_padding_and_pack_false_run_padded():
    hf, ours = make_pair("DistilBertModel")
    inputs = padded_batch("DistilBertModel", ours.config)
    for kwargs in (dict(inputs, attention_mask=torch.ones_like(inputs["attention_mask"])),
                   dict(inputs, pack=False)):
        distilbert_fast.ops.backends._last.clear()
        out = ours(**kwargs)
        assert _path(ours) == {"masked_attention"}
        hf_kwargs = {k: v for k, v in kwargs.items() if k != "pack"}
        assert_close(out.last_hidden_state, hf_forward(hf, **hf_kwargs).last_hidden_state, atol=ATOL_MODEL)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b in ("eager", "cpu")])
def test_training_with_dropout_on_packed_path(backend):
    """Training on the packed path: dropout runs (outputs differ from eval), backward reaches
    every parameter, and an optimizer step changes the fused projection's result (the cache
    follows the weights)."""
    _, ours = make_pair("DistilBertForMaskedLM", dropout=0.2, attention_dropout=0.2)
    ours.set_backend(backend)
    inputs = padded_batch("DistilBertForMaskedLM", ours.config)
    with torch.no_grad():
        before = ours(**inputs).logits
    ours.train()
    out = ours(**inputs)
    assert not torch.allclose(out.logits, before, atol=1e-4)
    out.loss.backward()
    for name, param in ours.named_parameters():
        if "position_embeddings" not in name:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    torch.optim.SGD(ours.parameters(), lr=0.5).step()
    ours.eval()
    with torch.no_grad():
        after = ours(**inputs).logits
        ours.distilbert.transformer.layer[0].attention._qkv_cache = None  # rebuilt from scratch
        rebuilt = ours(**inputs).logits
    assert not torch.allclose(after, before, atol=1e-4)
    assert torch.equal(after, rebuilt)


def test_fused_qkv_follows_load_state_dict_and_hooks():
    hf, ours = make_pair("DistilBertModel")
    inputs = padded_batch("DistilBertModel", ours.config, labels=False)
    with torch.no_grad():
        first = ours(**inputs).last_hidden_state
        other, _ = make_pair("DistilBertModel")
        ours.load_state_dict(other.state_dict())
        second = ours(**inputs).last_hidden_state
        expected = hf_forward(other, **inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert not torch.allclose(first, second)
    assert_close(second[real], expected[real], atol=ATOL_MODEL)
    seen = []
    handle = ours.transformer.layer[0].attention.k_lin.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with torch.no_grad():
        hooked = ours(**inputs).last_hidden_state
    handle.remove()
    # the hook fired, on HF's (batch, seq, dim): with a hook below it the model runs padded
    assert seen == [(*real.shape, ours.config.dim)]
    assert_close(hooked[real], second[real], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_fused_qkv_follows_a_change_of_dtype_after_a_forward(dtype):
    """model(...) then model.to(dtype) then model(...): .to() swaps each parameter's data without
    a new version, and the cached fused QKV weight of the first dtype was used (a dtype error)."""
    hf, ours = make_pair("DistilBertModel")
    inputs = padded_batch("DistilBertModel", ours.config, labels=False)
    with torch.no_grad():
        ours(**inputs)
        ours.to(dtype)
        got = ours(**inputs).last_hidden_state
        fresh = copy.deepcopy(ours)  # copies start with an empty cache
        fresh.transformer.layer[0].attention._qkv_cache = None
        expected = fresh(**inputs).last_hidden_state
    assert got.dtype == dtype
    assert torch.equal(got, expected)


def test_fused_qkv_follows_a_write_through_data_once_the_model_is_put_in_eval_mode():
    """An EMA copied in through ``param.data`` (no version counter sees it) ran the cached stack
    of the old weights; eval() (or train()) is the documented point where it is dropped."""
    hf, ours = make_pair("DistilBertModel")
    other, _ = make_pair("DistilBertModel")
    ours.eval()
    inputs = padded_batch("DistilBertModel", ours.config, labels=False)
    with torch.no_grad():
        ours(**inputs)
        for name, param in ours.named_parameters():
            param.data.copy_(other.state_dict()[name])
        ours.eval()
        got = ours(**inputs).last_hidden_state
        expected = hf_forward(other, **inputs).last_hidden_state
    real = inputs["attention_mask"].bool()
    assert_close(got[real], expected[real], atol=ATOL_MODEL)


def test_packed_position_ids_are_per_sequence():
    _, ours = make_pair("DistilBertModel")
    inputs = padded_batch("DistilBertModel", ours.config, [[1] * 5 + [0] * 3, [1] * 8], labels=False)
    packed = to_packed(inputs)
    out = ours(**packed).last_hidden_state
    explicit = ours(**packed, position_ids=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6, 7])).last_hidden_state
    assert torch.equal(out, explicit)


# -- bad input -------------------------------------------------------------------------------------


def test_additive_attention_mask_is_refused():
    _, ours = make_pair("DistilBertForSequenceClassification")
    inputs = padded_batch("DistilBertForSequenceClassification", ours.config, labels=False)
    additive = (1.0 - inputs["attention_mask"].float()) * -1e9
    for mask in (additive, inputs["attention_mask"] * 2):
        with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
            ours(input_ids=inputs["input_ids"], attention_mask=mask)
        with pytest.raises(ValueError, match="attention_mask must hold only 0 and 1"):
            ours.distilbert(input_ids=inputs["input_ids"], attention_mask=mask, pack=False)


def _packed_inputs(config):
    return dict(input_ids=torch.randint(1, config.vocab_size, (7,)),
                cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4)


PACKED_BAD = {
    "ids_2d": (dict(input_ids=torch.ones(1, 7, dtype=torch.long)), "input_ids must be 1-D"),
    "cu_int64": (dict(cu_seqlens=torch.tensor([0, 3, 7])), "cu_seqlens must have dtype torch.int32"),
    "cu_start": (dict(cu_seqlens=torch.tensor([1, 3, 7], dtype=torch.int32)), "cu_seqlens must start at 0"),
    "cu_decreasing": (dict(cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32)), "non-decreasing"),
    "cu_last": (dict(cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32)), r"cu_seqlens\[-1\] must equal"),
    "max_below": (dict(max_seqlen=3), "max_seqlen must be at least the longest sequence"),
    "max_above": (dict(max_seqlen=65), "max_position_embeddings=64"),
    "max_missing": (dict(max_seqlen=None), "max_seqlen must be given"),
    "cu_missing": (dict(cu_seqlens=None), "cu_seqlens must be given"),
    "with_mask": (dict(attention_mask=torch.ones(7, dtype=torch.long)), "attention_mask must be None"),
    "attentions": (dict(output_attentions=True), "output_attentions=True is not supported"),
    "position_shape": (dict(position_ids=torch.zeros(1, 7, dtype=torch.long)), "position_ids must have shape"),
    "cu_other_device": (dict(cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32, device="meta")),
                        r"cu_seqlens must be on the CPU or on the device of the packed input \(cpu\)"),
    "max_tensor": (dict(max_seqlen=torch.tensor(4)), "max_seqlen must be a Python int, got Tensor"),
    "ids_out_of_range": (dict(input_ids=torch.tensor([1, 2, 3, 99, 4, 5, 6])), r"input_ids must lie in \[0, 99\), found 99"),
    "ids_float": (dict(input_ids=torch.ones(7)), "input_ids must be an integer tensor"),
    "no_tokens": (dict(input_ids=torch.ones(0, dtype=torch.long), cu_seqlens=torch.tensor([0, 0], dtype=torch.int32)),
                  "packed input must hold at least 1 token"),
}


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForTokenClassification"])
@pytest.mark.parametrize("case", list(PACKED_BAD))
def test_packed_entry_bad_input(class_name, case):
    bad, message = PACKED_BAD[case]
    _, ours = make_pair(class_name)
    with pytest.raises((ValueError, TypeError), match=message):
        ours(**{**_packed_inputs(ours.config), **bad})


PACKED_LABELS_BAD = {  # class: (labels of a wrong shape for 2 sequences of 7 tokens, the message)
    "DistilBertForMaskedLM": (dict(labels=torch.zeros(2, 4, dtype=torch.long)), r"labels must hold one label per packed token, shape \(7,\)"),
    "DistilBertForTokenClassification": (dict(labels=torch.zeros(2, dtype=torch.long)), r"labels must hold one label per packed token"),
    "DistilBertForSequenceClassification": (dict(labels=torch.zeros(7, dtype=torch.long)), r"labels must hold one entry per sequence, shape \(2, ...\)"),
    "DistilBertForQuestionAnswering": (dict(start_positions=torch.zeros(3, dtype=torch.long), end_positions=torch.zeros(2, dtype=torch.long)),
                                       r"start_positions must hold one entry per sequence"),
}


@pytest.mark.parametrize("class_name", list(PACKED_LABELS_BAD))
def test_packed_entry_labels_of_a_wrong_shape(class_name):
    """Labels of the padded layout (or per sequence for a token head, per token for a sequence
    head) with packed input: a ValueError naming the argument and the shape wanted, not a loss's
    shape error or a broadcast one."""
    bad, message = PACKED_LABELS_BAD[class_name]
    _, ours = make_pair(class_name)
    with pytest.raises(ValueError, match=message):
        ours(**_packed_inputs(ours.config), **bad)


def test_multiple_choice_refuses_packed_input():
    _, ours = make_pair("DistilBertForMultipleChoice")
    with pytest.raises(ValueError, match="cu_seqlens"):
        ours(**_packed_inputs(ours.config))


SEQUENCE_LABELS = {  # case: (config overrides, labels for sequences of lengths 3, 0, 4)
    "single_label": (dict(num_labels=3), torch.tensor([2, 1, 0])),
    "regression": (dict(num_labels=1), torch.tensor([0.5, 1.5, -1.0])),
    "multi_label": (dict(num_labels=3), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])),
}


@pytest.mark.parametrize("case", list(SEQUENCE_LABELS))
def test_packed_sequence_labels_of_an_empty_sequence_are_refused(case):
    """A zero-length sequence (two equal consecutive cu_seqlens entries) has no token to pool:
    its logits mean nothing, and the padded batch's analogue (a fully padded row) pools padding
    packed input does not hold. A label that counts there is a ValueError naming labels and the
    sequence, for every problem type; without labels the batch runs."""
    overrides, labels = SEQUENCE_LABELS[case]
    _, ours = make_pair("DistilBertForSequenceClassification", **overrides)
    packed = dict(input_ids=torch.randint(1, ours.config.vocab_size, (7,)), cu_seqlens=cu_seqlens_of([3, 0, 4]),
                  max_seqlen=4)
    with pytest.raises(ValueError, match=r"labels must not count for an empty sequence .*found sequence 1"):
        ours(**packed, labels=labels)
    assert ours(**packed).logits.shape == (3, overrides["num_labels"])


def test_packed_empty_sequence_labelled_minus_100_is_ignored():
    """Single-label classification ignores a -100 label (as on a padded batch), so an empty
    sequence may carry one: the loss is that of the batch without it, and so are the gradients."""
    _, ours = make_pair("DistilBertForSequenceClassification", num_labels=3)
    ids = torch.randint(1, ours.config.vocab_size, (7,))
    with_empty = ours(input_ids=ids, cu_seqlens=cu_seqlens_of([3, 0, 4]), max_seqlen=4,
                      labels=torch.tensor([2, -100, 0]))
    without = ours(input_ids=ids, cu_seqlens=cu_seqlens_of([3, 4]), max_seqlen=4, labels=torch.tensor([2, 0]))
    assert_close(with_empty.loss, without.loss, atol=1e-6, name="loss")
    assert_close(with_empty.logits[[0, 2]], without.logits, atol=1e-6, name="logits")


def test_packed_question_answering_ignores_an_empty_sequence():
    """QA's positions count within each sequence and positions outside it are ignored, so an
    empty sequence adds no loss term: the loss is that of the batch without it."""
    _, ours = make_pair("DistilBertForQuestionAnswering")
    ids = torch.randint(1, ours.config.vocab_size, (7,))
    with_empty = ours(input_ids=ids, cu_seqlens=cu_seqlens_of([3, 0, 4]), max_seqlen=4,
                      start_positions=torch.tensor([1, 0, 2]), end_positions=torch.tensor([2, 0, 3]))
    without = ours(input_ids=ids, cu_seqlens=cu_seqlens_of([3, 4]), max_seqlen=4,
                   start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([2, 3]))
    assert_close(with_empty.loss, without.loss, atol=1e-6, name="loss")
