"""More of what transformers users do, against transformers itself (no mocks): each test here
pins a difference from transformers' behaviour that was found and fixed.

Tokenizer: ours and transformers' DistilBertTokenizerFast on the real uncased vocab.
optimize(): two copies of one transformers model, one optimised, on tiny configs."""

import copy
import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import SMALL_CONFIG, assert_close, reference_vocab_dir  # noqa: E402

import distilbert_fast  # noqa: E402

TEXTS = ["Hello, world! Unaffable Jean-Pierre's café.", "hi", "Paris is the capital of France.", "a b c"]


@pytest.fixture(scope="module")
def tokenizers():
    """(transformers' DistilBertTokenizerFast, ours) on the real uncased vocab."""
    path = reference_vocab_dir()
    return (transformers.DistilBertTokenizerFast.from_pretrained(path),
            distilbert_fast.DistilBertTokenizerFast.from_pretrained(path))


# -- tokenizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda tok: tok(tuple(TEXTS)),
    lambda tok: tok(tuple(TEXTS[:2]), tuple(TEXTS[2:]), padding=True, return_tensors="pt"),
    lambda tok: tok(list(TEXTS[:2]), text_target=tuple(TEXTS[2:])),
    lambda tok: tok((("Hello", "world"), ("unaffable",)), is_split_into_words=True, truncation=True, max_length=4),
    lambda tok: tok(tuple(TEXTS), truncation=True, max_length=6, stride=2, return_overflowing_tokens=True),
], ids=["texts", "pairs", "text_target", "split-words", "overflow"])
def test_a_tuple_is_a_batch_like_transformers(tokenizers, call):
    """A tuple of texts (a dataset column, zip(*pairs)) is a batch for transformers' tokenizer;
    ours passed it straight to the C++ core, which takes a list: TypeError."""
    theirs, ours = tokenizers
    expected, got = call(theirs), call(ours)
    assert sorted(got.keys()) == sorted(expected.keys())
    for key in expected:
        a, b = got[key], expected[key]
        assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), key
