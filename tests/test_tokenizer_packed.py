"""The packed entry point (``encode_packed``: rows back to back, cu_seqlens, no padding), and the
overflow rows' memory and cap. The rows must be exactly those ``__call__`` gives for the same
arguments with the padding left out."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import reference_vocab_dir

from distilbert_fast import DistilBertTokenizerFast
from distilbert_fast.tokenization import MAX_ROWS_PER_CALL, PackedEncoding

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog. " * 5, "", "Café naïve 中文 unaffable",
         "x", "a [MASK] b [SEP] c " * 3]
PAIRS = ["A pair.", "Which animal jumps?", "empty first", "", "y " * 30, "中文"]


@pytest.fixture(scope="module")
def tok():
    return DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


def _rows_of_call(tok, texts, pairs, **kwargs):
    """__call__'s rows with padding removed, plus its per-row lists."""
    enc = tok(texts, pairs, return_offsets_mapping=True, **kwargs)
    n = len(enc["input_ids"])
    return enc, n


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(max_length=16),
    dict(max_length=16, stride=4, return_overflowing_tokens=True),
    dict(truncation=False),
    dict(add_special_tokens=False, max_length=9, return_overflowing_tokens=True),
])
@pytest.mark.parametrize("with_pairs", [False, True])
def test_packed_rows_equal_call_rows(tok, kwargs, with_pairs):
    pairs = PAIRS if with_pairs else None
    packed = tok.encode_packed(TEXTS, pairs, return_offsets_mapping=True, return_word_ids=True,
                               return_sequence_ids=True, **kwargs)
    call_kwargs = {k: v for k, v in kwargs.items()}
    call_kwargs.setdefault("truncation", True)
    enc, n = _rows_of_call(tok, TEXTS, pairs, **call_kwargs)
    assert isinstance(packed, PackedEncoding) and packed.num_rows == n
    assert packed.input_ids.dtype == torch.int64 and packed.cu_seqlens.dtype == torch.int32
    assert packed.cu_seqlens[0] == 0 and packed.cu_seqlens[-1] == len(packed.input_ids)
    lengths = [len(ids) for ids in enc["input_ids"]]
    assert packed.cu_seqlens.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert packed.max_seqlen == max(lengths)
    assert packed.input_ids.tolist() == [i for ids in enc["input_ids"] for i in ids]
    assert packed.offset_mapping.tolist() == [list(o) for offs in enc["offset_mapping"] for o in offs]
    assert packed.word_ids.tolist() == [-1 if w is None else w for r in range(n) for w in enc.word_ids(r)]
    assert packed.sequence_ids.dtype == torch.int8
    assert packed.sequence_ids.tolist() == [-1 if s is None else s for r in range(n) for s in enc.sequence_ids(r)]
    mapping = enc.get("overflow_to_sample_mapping", list(range(n)))
    assert packed.overflow_to_sample_mapping.tolist() == mapping
    ids, cu_seqlens, max_seqlen = packed  # unpacks as the model's packed arguments
    assert ids is packed.input_ids and cu_seqlens is packed.cu_seqlens and max_seqlen == packed.max_seqlen


def test_packed_numpy_single_text_and_words(tok):
    packed = tok.encode_packed("Hello world!", return_tensors="np")
    assert isinstance(packed.input_ids, np.ndarray) and packed.input_ids.tolist() == tok("Hello world!")["input_ids"]
    assert packed.cu_seqlens.dtype == np.int32 and packed.cu_seqlens.tolist() == [0, 5]
    words = [["Hello", "wörld"], ["unaffable", "x"]]
    packed = tok.encode_packed(words, is_split_into_words=True, return_word_ids=True)
    enc = tok(words, is_split_into_words=True)
    assert packed.input_ids.tolist() == sum(enc["input_ids"], [])
    assert packed.word_ids.tolist() == [-1 if w is None else w for r in range(2) for w in enc.word_ids(r)]
    empty = tok.encode_packed([])
    assert empty.input_ids.shape == (0,) and empty.cu_seqlens.tolist() == [0] and empty.max_seqlen == 0


def test_packed_writes_into_caller_buffers(tok):
    ids_out = torch.full((4096,), -7, dtype=torch.int64)
    cu_out = np.full(64, -7, dtype=np.int32)
    packed = tok.encode_packed(TEXTS, max_length=32, ids_out=ids_out, cu_seqlens_out=cu_out)
    reference = tok.encode_packed(TEXTS, max_length=32)
    total = len(reference.input_ids)
    assert packed.input_ids.data_ptr() == ids_out.data_ptr() and torch.equal(packed.input_ids, reference.input_ids)
    assert (ids_out[total:] == -7).all()
    assert np.shares_memory(packed.cu_seqlens, cu_out) and packed.cu_seqlens.tolist() == reference.cu_seqlens.tolist()
    with pytest.raises(ValueError, match=f"ids_out holds 4 values but this batch needs {total}"):
        tok.encode_packed(TEXTS, max_length=32, ids_out=torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="cu_seqlens_out"):
        tok.encode_packed(TEXTS, max_length=32, cu_seqlens_out=torch.zeros(64, dtype=torch.int64))
    with pytest.raises(ValueError, match="ids_out must be a contiguous 1-D int64"):
        tok.encode_packed(TEXTS, ids_out=torch.zeros(4096, dtype=torch.int64)[::2])
    with pytest.raises(ValueError, match="ids_out"):
        tok.encode_packed(TEXTS, ids_out=torch.zeros(4096, dtype=torch.int32))


def test_packed_threads_do_not_change_results():
    texts = [f"text number {i} " + "word " * (i % 97) for i in range(3000)]
    one = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), num_threads=1)
    many = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), num_threads=4)
    a = one.encode_packed(texts, max_length=64, stride=8, return_overflowing_tokens=True, return_offsets_mapping=True)
    b = many.encode_packed(texts, max_length=64, stride=8, return_overflowing_tokens=True, return_offsets_mapping=True)
    for name in ("input_ids", "cu_seqlens", "overflow_to_sample_mapping", "offset_mapping"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_packed_bad_arguments(tok):
    with pytest.raises(ValueError, match="return_tensors"):
        tok.encode_packed(TEXTS, return_tensors="tf")
    with pytest.raises(ValueError, match="stride"):
        tok.encode_packed(TEXTS, max_length=8, stride=7)
    with pytest.raises(ValueError, match="text_pair has 1 items but text has"):
        tok.encode_packed(TEXTS, ["one"])
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode_packed(["a", 3])


# -- overflow rows: sized to what they hold, and capped ----------------------------------------------


def test_rows_cap_is_a_clear_error():
    tok = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), max_rows_per_call=1000)
    a, b = "one two three " * 20, "four five six " * 20  # 60 tokens each
    # max_length 5: one token of each text a row, so 60 x 60 = 3,600 rows > 1,000
    with pytest.raises(ValueError, match=r"return_overflowing_tokens=True.*60 windows of the text x 60 of the "
                                         r"text pair.*max_rows_per_call=1000"):
        tok(a, b, truncation=True, max_length=5, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="max_rows_per_call=1000"):
        tok.encode_packed([a], [b], max_length=5, return_overflowing_tokens=True)
    tok.max_rows_per_call = None  # no cap: HF's 3,600 rows
    assert len(tok(a, b, truncation=True, max_length=5, return_overflowing_tokens=True)["input_ids"]) == 3600
    assert MAX_ROWS_PER_CALL >= 40_000  # HF's 40,000-row example must stay possible by default
    # without overflow each text gives one row: the cap does not apply
    capped = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), max_rows_per_call=2)
    assert len(capped(["a", "b", "c"])["input_ids"]) == 3
    with pytest.raises(ValueError, match="max_rows_per_call"):
        DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), max_rows_per_call=0)


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    from distilbert_fast import DistilBertTokenizerFast
    tok = DistilBertTokenizerFast.from_pretrained(sys.argv[1])
    # without transformers loaded, the tokenizer is the plain class and nothing imports it
    assert "transformers" not in sys.modules
    assert not any(c.__module__.startswith("transformers") for c in type(tok).__mro__)
    first = " ".join(f"w{i % 10}" for i in range(100))  # 200 tokens: w, ##0, w, ##1, ...
    second = " ".join(f"w{i % 10}" for i in range(200))  # 400 tokens
    assert len(tok(first)["input_ids"]) == 202
    tok("warm up", "the allocator", truncation=True, max_length=6, return_overflowing_tokens=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # max_length 6 keeps 1 + 2 tokens of the pair a row: 200 x 200 windows
    enc = tok(first, second, truncation=True, max_length=6, return_overflowing_tokens=True)
    rows = len(enc["input_ids"])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(rows, (after - before) / 1024)
""")


def test_overflow_cross_product_memory():
    """A pair of 200 and 400 tokens at max_length 6 with overflow: 40,000 rows (as HF). The peak
    memory of the call (its own process, ru_maxrss) must stay near what the rows' lists hold,
    instead of each row reserving room for a whole sequence (measured: 511 MB before, 5 MB now,
    HF's tokenizer 291 MB)."""
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, reference_vocab_dir()], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows, peak_mb = out.stdout.split()
    assert int(rows) == 40_000
    # the rows' Python lists (input_ids, attention_mask, overflow mapping) take ~10 MB; 100 MB
    # leaves room for the allocator while catching any per-row copy of a sequence (500 MB)
    assert float(peak_mb) < 100, f"the 40,000-row call raised the peak RSS by {peak_mb} MB"
