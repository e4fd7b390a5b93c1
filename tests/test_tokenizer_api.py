"""HF's tokenizer API beyond ``__call__``, against HF's DistilBertTokenizerFast on the real vocab:
``pad`` / ``_pad``, ``encode_plus`` / ``batch_encode_plus``, ``text_target``,
``return_token_type_ids``, ``model_max_length``, ``get_special_tokens_mask`` and friends, and
BatchEncoding's maps (``char_to_token``, ``token_to_chars``, ``word_to_tokens``, ...), ``.to()``,
``enc[i]``; plus the fast path of one plain str, which must give what the general path gives.
"""

import copy
import os
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import reference_vocab_dir  # noqa: E402

from distilbert_fast import BatchEncoding, DistilBertTokenizerFast  # noqa: E402

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "Café naïve  résumé 中文 unaffable",
         "", "x", "a [MASK] b [SEP] c"]
PAIRS = ["A pair text.", "", "second text with more words than the first one has", "y", "  spaced   out  ",
         "中文 text"]


@pytest.fixture(scope="module")
def hf():
    return transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


@pytest.fixture(scope="module")
def ours():
    return DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


def _same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.dtype == object:  # ragged rows
            for i, (x, y) in enumerate(zip(a, b)):
                _same(x, y, f"{where}[{i}]")
        else:
            np.testing.assert_array_equal(a, b, err_msg=where)
    elif hasattr(a, "keys"):
        assert sorted(a.keys()) == sorted(b.keys()), f"{where}: {sorted(a.keys())} != {sorted(b.keys())}"
        for key in a.keys():
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# -- the fast path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS + ["ÀÉÎ ΟΔΟΣ 👍🏽 " * 50])
def test_plain_call_matches_general_path_and_hf(hf, ours, text):
    fast = ours(text)  # one str, every default: the C++ fast path
    general = ours(text, add_special_tokens=True)  # any keyword takes the general path
    assert type(fast) is BatchEncoding and fast == general
    _same(dict(fast), dict(hf(text)))
    assert fast.input_ids == general["input_ids"]
    assert fast.word_ids() == general.word_ids() == hf(text).word_ids()
    assert fast.tokens() == hf(text).tokens()
    assert fast.n_sequences == 1 and fast.is_fast
    for i in range(len(fast["input_ids"])):
        assert fast.token_to_chars(i) == hf(text).token_to_chars(i)


def test_plain_call_refuses_what_hf_refuses(ours):
    with pytest.raises(ValueError, match="surrogate"):
        ours("a\ud800b")
    with pytest.raises(ValueError, match="text"):
        ours(None)


# -- encode_plus, batch_encode_plus, text_target, token type ids ------------------------------------


def test_encode_plus_and_batch_encode_plus(hf, ours):
    kwargs = dict(truncation=True, max_length=12, return_offsets_mapping=True, return_token_type_ids=True)
    _same(dict(ours.encode_plus(TEXTS[1], PAIRS[2], **kwargs)), dict(hf(TEXTS[1], PAIRS[2], **kwargs)))
    _same(dict(ours.batch_encode_plus(TEXTS, padding=True)), dict(hf(TEXTS, padding=True)))
    _same(dict(ours.batch_encode_plus(list(zip(TEXTS, PAIRS)), padding=True, return_tensors="pt")),
          dict(hf(TEXTS, PAIRS, padding=True, return_tensors="pt")))
    words = [["Hello", "wörld"], ["unaffable", "x", "中文"]]
    _same(dict(ours.batch_encode_plus(words, is_split_into_words=True)), dict(hf(words, is_split_into_words=True)))
    _same(dict(ours.batch_encode_plus([(words[0], words[1])], is_split_into_words=True)),
          dict(hf([words[0]], [words[1]], is_split_into_words=True)))
    with pytest.raises(ValueError, match="encode_plus takes one text"):
        ours.encode_plus(TEXTS)
    with pytest.raises(ValueError, match="pair"):
        ours.batch_encode_plus([("a", "b", "c")])


def test_text_target_matches_hf(hf, ours):
    for kwargs in (dict(), dict(padding=True, return_tensors="pt"), dict(truncation=True, max_length=6)):
        _same(dict(ours(TEXTS, text_target=PAIRS, **kwargs)), dict(hf(TEXTS, text_target=PAIRS, **kwargs)))
        _same(dict(ours(text_target=PAIRS, **kwargs)), dict(hf(text_target=PAIRS, **kwargs)))
    _same(dict(ours(TEXTS[0], PAIRS[0], text_target=TEXTS[1], text_pair_target=PAIRS[1])),
          dict(hf(TEXTS[0], PAIRS[0], text_target=TEXTS[1], text_pair_target=PAIRS[1])))
    with pytest.raises(ValueError, match="text_target"):
        ours()


@pytest.mark.parametrize("return_token_type_ids", [None, True, False])
def test_return_token_type_ids_matches_hf(hf, ours, return_token_type_ids):
    for args in ((TEXTS,), (TEXTS, PAIRS), (TEXTS[2], PAIRS[2])):
        a = hf(*args, return_token_type_ids=return_token_type_ids)
        b = ours(*args, return_token_type_ids=return_token_type_ids)
        _same(dict(b), dict(a))
        assert ("token_type_ids" in b) == bool(return_token_type_ids)


# -- model_max_length -------------------------------------------------------------------------------


def test_model_max_length_semantics_match_hf():
    vocab_file = f"{reference_vocab_dir()}/vocab.txt"
    with open(vocab_file, encoding="utf-8") as f:
        vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    long_text = "word " * 600
    for model_max_length in (None, 16):
        kwargs = {} if model_max_length is None else dict(model_max_length=model_max_length)
        hf = transformers.DistilBertTokenizerFast(vocab=vocab, **kwargs)  # (transformers 5 takes vocab=, a dict)
        ours = DistilBertTokenizerFast(vocab_file=vocab_file, **kwargs)
        assert ours.model_max_length == hf.model_max_length  # int(1e30) when not given: no limit
        assert ours.max_len_single_sentence == hf.max_len_single_sentence
        assert ours.max_len_sentences_pair == hf.max_len_sentences_pair
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for call in (dict(truncation=True), dict(padding="max_length"), dict(padding="max_length", truncation=True),
                         dict(max_length=8), dict(padding=True, max_length=8), dict(padding="max_length", max_length=8),
                         dict(truncation=True, max_length=8)):
                _same(dict(ours([long_text, "short"], **call)), dict(hf([long_text, "short"], **call)), str(call))
    with pytest.warns(UserWarning, match="max_length` is ignored"):
        ours(["a", "b c"], padding=True, max_length=3)


def test_model_max_length_from_pretrained_and_saved(tmp_path, ours):
    assert ours.model_max_length == 512  # the fixture's tokenizer_config.json
    unlimited = DistilBertTokenizerFast(vocab_file=f"{reference_vocab_dir()}/vocab.txt")
    unlimited.save_pretrained(tmp_path)
    assert DistilBertTokenizerFast.from_pretrained(tmp_path).model_max_length == int(1e30)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).model_max_length == int(1e30)


# -- pad ----------------------------------------------------------------------------------------------


def _features(tok, **kwargs):
    return [dict(tok(t, p, **kwargs)) for t, p in zip(TEXTS, PAIRS)]


PAD_CALLS = [
    dict(),
    dict(padding="longest", pad_to_multiple_of=8),
    dict(padding="max_length", max_length=40),
    dict(padding="max_length", max_length=30, pad_to_multiple_of=16),
    dict(padding=False),
    dict(padding_side="left"),
    dict(return_attention_mask=False),
    dict(return_tensors="pt"),
    dict(return_tensors="np", pad_to_multiple_of=4),
]


@pytest.mark.parametrize("call", PAD_CALLS)
def test_pad_matches_hf(hf, ours, call):
    extras = dict(return_token_type_ids=True, return_special_tokens_mask=True)
    for make in (
        lambda tok: _features(tok, **extras),  # a list of examples (what collators get)
        lambda tok: [{**f, "labels": i} for i, f in enumerate(_features(tok))],  # plus keys pad leaves alone
        lambda tok: dict(tok(TEXTS, **extras)),  # a dict of lists
        lambda tok: dict(tok(TEXTS[1], **extras)),  # one encoding
        lambda tok: [dict(input_ids=torch.tensor(f["input_ids"])) for f in _features(tok)],  # tensors in
        lambda tok: [dict(input_ids=np.array(f["input_ids"])) for f in _features(tok)],  # arrays in
    ):
        features_hf, features_ours = make(hf), make(ours)
        if call.get("padding") is False and call.get("return_tensors"):
            continue
        try:
            expected = hf.pad(copy.deepcopy(features_hf), **call)
        except ValueError:
            with pytest.raises(ValueError):
                ours.pad(features_ours, **call)
            continue
        got = ours.pad(features_ours, **call)
        assert isinstance(got, BatchEncoding)
        _same(dict(got), dict(expected), str(call))


def test_pad_of_unequal_rows_to_tensors_is_a_clear_error(ours):
    with pytest.raises(ValueError, match="padding=True"):
        ours.pad(_features(ours), padding=False, return_tensors="pt")
    with pytest.raises(ValueError, match="input_ids"):
        ours.pad([{"attention_mask": [1, 1]}])


@pytest.mark.parametrize("strategy", ["longest", "max_length", "do_not_pad"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_private_pad_matches_hf(hf, ours, strategy, side):
    from transformers.utils import PaddingStrategy

    for max_length, multiple in ((None, None), (20, None), (13, 8)):
        if strategy == "max_length" and max_length is None:
            continue
        row = dict(ours(TEXTS[2], return_token_type_ids=True, return_special_tokens_mask=True))
        for strat in (strategy, PaddingStrategy(strategy)):
            a = hf._pad(copy.deepcopy(row), max_length=max_length, padding_strategy=PaddingStrategy(strategy),
                        pad_to_multiple_of=multiple, padding_side=side)
            b = ours._pad(copy.deepcopy(row), max_length=max_length, padding_strategy=strat,
                          pad_to_multiple_of=multiple, padding_side=side)
            _same(b, a)


# -- special tokens, conversions ----------------------------------------------------------------------


def test_special_tokens_and_conversions_match_hf(hf, ours):
    ids = hf(TEXTS[1], PAIRS[1])["input_ids"]
    assert ours.get_special_tokens_mask(ids, already_has_special_tokens=True) == hf.get_special_tokens_mask(
        ids, already_has_special_tokens=True)
    assert ours.get_special_tokens_mask(torch.tensor(ids), already_has_special_tokens=True) == \
        hf.get_special_tokens_mask(ids, already_has_special_tokens=True)
    # transformers 4's helpers for ids without special tokens (transformers 5's fast tokenizer
    # dropped them): the [CLS] a [SEP] b [SEP] template
    plain, second = [7592, 2088], [1037]
    assert ours.get_special_tokens_mask(plain) == [1, 0, 0, 1]
    assert ours.get_special_tokens_mask(plain, second) == [1, 0, 0, 1, 0, 1]
    assert ours.build_inputs_with_special_tokens(plain, second) == hf(["hello world"], ["a"])["input_ids"][0]
    assert ours.create_token_type_ids_from_sequences(plain, second) == [0, 0, 0, 0, 1, 1]
    for pair in (False, True):
        assert ours.num_special_tokens_to_add(pair) == hf.num_special_tokens_to_add(pair)
    assert ours.all_special_tokens == hf.all_special_tokens and ours.all_special_ids == hf.all_special_ids
    assert ours.special_tokens_map == hf.special_tokens_map
    assert ours.is_fast is True and len(ours) == len(hf)
    for text in TEXTS + ["don't do not it 's a . b ? c ! , ' x ##y"]:
        tokens = hf.tokenize(text)
        assert ours.convert_tokens_to_string(tokens) == hf.convert_tokens_to_string(tokens)
    batch = hf(TEXTS, padding=True, return_tensors="pt")["input_ids"]
    assert ours.decode(batch, skip_special_tokens=True) == hf.decode(batch, skip_special_tokens=True)


# -- BatchEncoding ------------------------------------------------------------------------------------


def _encodings(tok):
    """Encodings whose per-row maps must agree: single texts, pairs, padding both sides, overflow
    windows, pre-split words, no special tokens."""
    long_pair = ("Paris is the capital of France and Berlin is the capital of Germany. " * 2, "Which capital?")
    return [
        tok(TEXTS[2]),
        tok(TEXTS, padding=True),
        tok(TEXTS, PAIRS, padding=True, padding_side="left"),
        tok(*long_pair, truncation="only_first", max_length=14, stride=3, return_overflowing_tokens=True,
            padding=True),
        tok([["Hello", "wörld!"], ["unaffable", "中文", "x"]], is_split_into_words=True, padding=True),
        tok(TEXTS[1], PAIRS[2], add_special_tokens=False),
    ]


def test_batch_encoding_maps_match_hf(hf, ours):
    for n, (a, b) in enumerate(zip(_encodings(hf), _encodings(ours))):
        rows = len(a["input_ids"]) if isinstance(a["input_ids"][0], list) else 1
        assert b.n_sequences == a.n_sequences and b.is_fast and len(b.encodings) == rows, n
        for r in range(rows):
            where = f"encoding {n} row {r}"
            assert b.tokens(r) == a.tokens(r), where
            assert b.word_ids(r) == a.word_ids(r) and b.sequence_ids(r) == a.sequence_ids(r), where
            for name in ("ids", "type_ids", "tokens", "offsets", "attention_mask", "special_tokens_mask", "word_ids",
                         "sequence_ids", "n_sequences"):
                assert getattr(b[r], name) == getattr(a[r], name), f"{where} enc[{r}].{name}"
            assert b.encodings[r].ids == a.encodings[r].ids and len(b[r]) == len(a[r])
            n_tokens = len(a.tokens(r))
            for t in range(n_tokens):
                assert b.token_to_chars(r, t) == a.token_to_chars(r, t), f"{where} token_to_chars({t})"
                assert b.token_to_word(r, t) == a.token_to_word(r, t), f"{where} token_to_word({t})"
                assert b.token_to_sequence(r, t) == a.token_to_sequence(r, t), f"{where} token_to_sequence({t})"
            max_char = max((end for start, end in a[r].offsets), default=0) + 2
            for seq in (0, 1):
                for c in range(max_char):
                    assert b.char_to_token(r, c, seq) == a.char_to_token(r, c, seq), f"{where} char_to_token({c}, {seq})"
                    assert b.char_to_word(r, c, seq) == a.char_to_word(r, c, seq), f"{where} char_to_word({c}, {seq})"
                words = {w for w, s in zip(a.word_ids(r), a.sequence_ids(r)) if w is not None and s == seq}
                for w in sorted(words) + [max(words, default=0) + 5]:
                    assert b.word_to_tokens(r, w, seq) == a.word_to_tokens(r, w, seq), f"{where} word_to_tokens({w})"
                    if w in words:
                        assert b.word_to_chars(r, w, seq) == a.word_to_chars(r, w, seq), f"{where} word_to_chars({w})"
        # row 0 when the batch index is left out, as transformers does
        assert b.char_to_token(1) == a.char_to_token(1) and b.token_to_chars(1) == a.token_to_chars(1)


def test_batch_encoding_dict_behaviour(ours):
    enc = ours(TEXTS, padding=True, return_tensors="pt")
    assert enc.input_ids is enc["input_ids"] and enc.data["attention_mask"] is enc.attention_mask
    assert enc.to("cpu") is enc and enc.to(torch.device("cpu")) is enc
    with pytest.warns(UserWarning, match="only a device"):
        enc.to(torch.float16)
    assert enc.input_ids.dtype == torch.int64
    with pytest.raises(AttributeError):
        enc.no_such_key
    with pytest.raises(KeyError):
        enc["no_such_key"]
    with pytest.raises(IndexError, match="batch"):
        enc[len(TEXTS)]
    assert enc[-1].ids == enc.input_ids[-1].tolist()
    assert set(enc.keys()) == {"input_ids", "attention_mask"}
    padded = ours.pad([{"input_ids": [101, 7592, 102]}], return_tensors="pt")
    assert not padded.is_fast and padded.encodings is None
    with pytest.raises(ValueError, match="per-row maps"):
        padded.word_ids(0)
    made = BatchEncoding({"input_ids": [[1, 2], [3, 4]]}, tensor_type="np")
    assert isinstance(made["input_ids"], np.ndarray) and made["input_ids"].shape == (2, 2)


def test_deepcopy_of_tokenizer(ours):
    other = copy.deepcopy(ours)
    other.padding_side = "left"
    row = other(TEXTS, padding=True)["input_ids"][3]  # "" padded on the left
    assert row[0] == other.pad_token_id and row[-1] == other.sep_token_id
    assert ours.padding_side == "right" and ours(TEXTS) == copy.deepcopy(ours)(TEXTS)


# -- one text with arguments: the checked arguments are reused ----------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(truncation=True, max_length=8),
    dict(padding="max_length", max_length=16),
    dict(return_tensors="pt"),
    dict(return_tensors="np", padding=True),
    dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_length=True),
    dict(add_special_tokens=False, return_token_type_ids=True),
    dict(return_overflowing_tokens=True, truncation=True, max_length=5, stride=1),
], ids=lambda kw: ",".join(kw))
def test_one_text_with_arguments_repeated_matches_hf(hf, kwargs):
    """The same arguments twice (the second call reuses the first's checked arguments) and
    with a different text: each equal to HF's result."""
    tokenizer = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    for text in (TEXTS[1], TEXTS[1], TEXTS[2], ""):
        _same(tokenizer(text, **kwargs), hf(text, **kwargs), f"{text!r} {kwargs}")


def test_reused_arguments_follow_changed_settings(hf):
    """Changing a setting the checked arguments came from (model_max_length, padding_side,
    truncation_side) takes effect on the next call with the same arguments."""
    tokenizer = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    reference = copy.deepcopy(hf)
    text, kwargs = TEXTS[1], dict(truncation=True, padding="max_length")
    for name, value in (("model_max_length", 7), ("padding_side", "left"), ("truncation_side", "left"),
                        ("model_max_length", 20)):
        setattr(tokenizer, name, value)
        setattr(reference, name, value)
        _same(tokenizer(text, **kwargs), reference(text, **kwargs), f"{name}={value}")
    with pytest.raises(TypeError, match="unexpected keyword arguments"):
        tokenizer(text, max_lenght=3)
    with pytest.raises(ValueError, match="is_split_into_words"):
        tokenizer(text, is_split_into_words=True)
    _same(tokenizer(text, max_length=[4][0]), reference(text, max_length=4))


@pytest.mark.parametrize("kwargs", [dict(truncation=True, max_length=128), dict(truncation=True, max_length=6),
                                    dict(padding=True), dict(padding=True, truncation=True, max_length=4),
                                    dict(max_length=3)], ids=str)
def test_one_text_within_limits_matches_hf_with_maps(hf, kwargs):
    """Arguments that leave a short text unchanged give the plain call's result (built in C++),
    and a text that does reach the limit is truncated: both equal HF's, per-row maps included."""
    tokenizer = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    for text in ("Hello world!", TEXTS[1], TEXTS[2]):
        ours, theirs = tokenizer(text, **kwargs), hf(text, **kwargs)
        _same(ours, theirs, f"{text!r} {kwargs}")
        assert ours.word_ids() == theirs.word_ids() and ours.tokens() == theirs.tokens()
        assert ours.char_to_token(1) == theirs.char_to_token(1)


# -- split_special_tokens, vocab, ragged numpy --------------------------------------------------------

SPECIAL_TEXTS = ["a [MASK] b [SEP] c", "[CLS] x [PAD][UNK]", "no specials here", "<e1> new_tok [MASK]<e1>"]


@pytest.fixture(scope="module")
def both_with_added():
    """Both tokenizers with an added special token and an added plain one (fresh: the module's
    fixtures stay as loaded)."""
    pair = (transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir()),
            DistilBertTokenizerFast.from_pretrained(reference_vocab_dir()))
    for tok in pair:
        tok.add_special_tokens({"additional_special_tokens": ["<e1>"]})
        tok.add_tokens(["new_tok"])
    return pair


@pytest.mark.parametrize("split", [None, True, False])
def test_split_special_tokens_per_call_matches_hf(both_with_added, split):
    hf, ours = both_with_added
    kwargs = {} if split is None else {"split_special_tokens": split}
    for text in SPECIAL_TEXTS:
        _same(ours(text, **kwargs), hf(text, **kwargs), text)
        assert ours.tokenize(text, **kwargs) == hf.tokenize(text, **kwargs), text
        _same(ours(text, text, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs),
              hf(text, text, return_offsets_mapping=True, return_special_tokens_mask=True, **kwargs), text)
    batch = dict(padding=True, return_tensors="pt", return_offsets_mapping=True, **kwargs)
    _same(ours(SPECIAL_TEXTS, **batch), hf(SPECIAL_TEXTS, **batch))
    assert ours(SPECIAL_TEXTS, **batch).tokens(0) == hf(SPECIAL_TEXTS, **batch).tokens(0)


def test_split_special_tokens_setting_matches_hf(tmp_path):
    hf = transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), split_special_tokens=True)
    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), split_special_tokens=True)
    assert ours.split_special_tokens is hf.split_special_tokens is True
    for text in SPECIAL_TEXTS[:3]:
        _same(ours(text), hf(text), text)  # the plain call too
        _same(ours(text, split_special_tokens=False), hf(text, split_special_tokens=False), text)
        assert ours.tokenize(text) == hf.tokenize(text)
        assert ours.decode(ours(text)["input_ids"], skip_special_tokens=True) == hf.decode(
            hf(text)["input_ids"], skip_special_tokens=True)
    ours.save_pretrained(tmp_path)
    for loaded in (DistilBertTokenizerFast.from_pretrained(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path),
                   copy.deepcopy(ours)):
        assert loaded.split_special_tokens is True
        assert loaded(SPECIAL_TEXTS[0])["input_ids"] == hf(SPECIAL_TEXTS[0])["input_ids"]
    ours.split_special_tokens = hf.split_special_tokens = False  # the setting changed after use
    _same(ours(SPECIAL_TEXTS[0]), hf(SPECIAL_TEXTS[0]))
    _same(ours(SPECIAL_TEXTS[0], max_length=5), hf(SPECIAL_TEXTS[0], max_length=5))


def test_vocab_property_matches_hf(hf, ours):
    assert ours.vocab == hf.vocab == transformers.BertTokenizerFast.from_pretrained(reference_vocab_dir()).vocab


def test_ragged_numpy_rows_match_hf(hf, ours):
    """Rows of different lengths with return_tensors='np': transformers gives object arrays of
    1-D arrays (torch has no ragged tensor: an error in both)."""
    for kwargs in (dict(), dict(return_offsets_mapping=True, return_length=True, return_special_tokens_mask=True),
                   dict(truncation=True, max_length=9, return_overflowing_tokens=True, stride=1)):
        _same(ours(TEXTS, **kwargs, return_tensors="np"), hf(TEXTS, **kwargs, return_tensors="np"), str(kwargs))
        _same(ours(TEXTS, PAIRS, **kwargs, return_tensors="np"), hf(TEXTS, PAIRS, **kwargs, return_tensors="np"))
    with pytest.raises(ValueError, match="padding=True"):
        ours(TEXTS, return_tensors="pt")


@pytest.mark.parametrize("setting", [dict(pad_token="[UNK]"), dict(pad_token_id=100), dict(pad_token="<pad>"),
                                     dict(pad_token="[UNK]", pad_token_id=0)])
def test_setting_the_pad_token_pads_with_it_as_hf(setting):
    """tokenizer.pad_token = ... (a common step before padding): padding uses it from then on. Ours
    kept padding with the old id."""
    hf = transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    for tok in (hf, ours):
        for name, value in setting.items():
            setattr(tok, name, value)
    assert (ours.pad_token, ours.pad_token_id) == (hf.pad_token, hf.pad_token_id)
    for kwargs in (dict(padding=True), dict(padding="max_length", max_length=9, padding_side="left")):
        _same(ours(TEXTS, **kwargs), hf(TEXTS, **kwargs), str(kwargs))
    _same(ours.pad(ours(TEXTS)), hf.pad(hf(TEXTS)))
    assert copy.deepcopy(ours)(TEXTS, padding=True)["input_ids"] == hf(TEXTS, padding=True)["input_ids"]


def test_row_encoding_maps_match_hf(hf, ours):
    """enc[i] / enc.encodings[i]: the maps of tokenizers' Encoding (ours had only its attributes)."""
    for args in ((TEXTS,), (TEXTS, PAIRS)):
        a, b = ours(*args, padding=True), hf(*args, padding=True)
        for i in range(len(TEXTS)):
            mine, theirs = a[i], b[i]
            n = len(theirs)
            assert len(mine) == n
            for t in range(n + 2):  # past the end: None, as tokenizers answers
                assert mine.token_to_chars(t) == theirs.token_to_chars(t), (i, t)
                assert mine.token_to_word(t) == theirs.token_to_word(t), (i, t)
                assert mine.token_to_sequence(t) == theirs.token_to_sequence(t), (i, t)
            for seq in range(len(args)):
                for c in range(len(args[seq][i]) + 1):
                    assert mine.char_to_token(c, seq) == theirs.char_to_token(c, seq), (i, seq, c)
                    assert mine.char_to_word(c, seq) == theirs.char_to_word(c, seq), (i, seq, c)
                for w in range(8):
                    assert mine.word_to_tokens(w, seq) == theirs.word_to_tokens(w, seq), (i, seq, w)
                    assert mine.word_to_chars(w, seq) == theirs.word_to_chars(w, seq), (i, seq, w)
        assert a.token_to_chars(1, 100) is b.token_to_chars(1, 100) is None


@pytest.mark.parametrize("kwargs", [dict(is_split_into_words=True), dict(truncation=True, max_length=5),
                                    dict(add_special_tokens=True, truncation="only_second", max_length=9)])
def test_tokenize_takes_call_keywords_as_hf(hf, ours, kwargs):
    """is_split_into_words works (ours refused lists); truncation does nothing, in both."""
    text = ["Hello", "wörld", "unaffable"] if kwargs.get("is_split_into_words") else TEXTS[1]
    pair = None if kwargs.get("is_split_into_words") else PAIRS[2]
    assert ours.tokenize(text, **kwargs) == hf.tokenize(text, **kwargs)
    if pair is not None:
        assert ours.tokenize(text, pair, **kwargs) == hf.tokenize(text, pair, **kwargs)


def test_save_vocabulary_writes_the_vocab(tmp_path, ours):
    (path,) = ours.save_vocabulary(str(tmp_path), filename_prefix="x")
    assert os.path.basename(path) == "x-vocab.txt"
    with open(os.path.join(reference_vocab_dir(), "vocab.txt"), encoding="utf-8") as f:
        expected = f.read().splitlines()
    with open(path, encoding="utf-8") as f:
        assert f.read().splitlines() == expected
    assert DistilBertTokenizerFast(vocab_file=path)(TEXTS)["input_ids"] == ours(TEXTS)["input_ids"]


def test_no_pad_token_refuses_padding_as_hf():
    hf = transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    for tok in (hf, ours):
        tok.pad_token = None
        for call in (lambda: tok(TEXTS, padding=True), lambda: tok(TEXTS[0], padding="max_length", max_length=20),
                     lambda: tok.pad({"input_ids": [[1], [1, 2]]})):
            with pytest.raises(ValueError, match="Asking to pad but the tokenizer does not have a padding token"):
                call()
    _same(ours(TEXTS), hf(TEXTS))  # no padding asked: fine
    _same(copy.deepcopy(ours)(TEXTS), hf(TEXTS))
    ours.pad_token = hf.pad_token = "[PAD]"
    _same(ours(TEXTS, padding=True), hf(TEXTS, padding=True))
    assert (ours.add_bos_token, ours.add_eos_token, ours.add_prefix_space) == (
        hf.add_bos_token, hf.add_eos_token, hf.add_prefix_space)


@pytest.mark.parametrize("kwargs", [dict(max_target_length=4), dict(max_target_length=4, truncation=True),
                                    dict(max_target_length=4, max_length=6),
                                    dict(max_target_length=5, padding="max_length", truncation=True, max_length=8)])
def test_max_target_length_matches_hf(hf, ours, kwargs):
    """text_target's own length, as transformers' seq2seq scripts pass it (ours refused the keyword)."""
    targets = ["a longer target text with many words in it", "short"]
    _same(ours(TEXTS[:2], text_target=targets, **kwargs), hf(TEXTS[:2], text_target=targets, **kwargs))
    _same(ours(text_target=targets, **kwargs), hf(text_target=targets, **kwargs))
    _same(ours(TEXTS[1], text_target=targets[0], **kwargs), hf(TEXTS[1], text_target=targets[0], **kwargs))


def _row_fields(row):
    return (row.ids, row.type_ids, row.tokens, [tuple(o) for o in row.offsets], row.attention_mask,
            row.special_tokens_mask, row.word_ids, row.sequence_ids, row.n_sequences)


@pytest.mark.parametrize("index", [slice(0, 2), slice(1, None), slice(None, None, 2), slice(-2, None), slice(4, 1)])
def test_batch_encoding_slices_match_hf(hf, ours, index):
    """enc[a:b]: a tokenizer call's rows' encodings (as transformers gives its tokenizers.Encoding
    list); a BatchEncoding made by pad() slices every value. Ours raised TypeError (unhashable)."""
    for args in ((TEXTS,), (TEXTS, PAIRS)):
        mine, theirs = ours(*args, padding=True)[index], hf(*args, padding=True)[index]
        assert isinstance(mine, list) and len(mine) == len(theirs)
        assert [_row_fields(r) for r in mine] == [_row_fields(r) for r in theirs]
    assert [_row_fields(r) for r in ours(TEXTS[1])[index]] == [_row_fields(r) for r in hf(TEXTS[1])[index]]
    features = [{"input_ids": ids} for ids in ours(TEXTS)["input_ids"]]
    mine, theirs = ours.pad(features)[index], hf.pad(features)[index]
    assert type(mine) is dict and mine == theirs
    mine, theirs = ours.pad(features, return_tensors="pt")[index], hf.pad(features, return_tensors="pt")[index]
    _same(mine, theirs)


def test_batch_encoding_to_moves_what_has_to_as_hf(hf, ours):
    """.to(device) moves every value with a .to (tensors, a nested BatchEncoding) and keeps the
    others (lists, numbers, None) as they are, as transformers' does."""
    for tok in (hf, ours):
        enc = tok(TEXTS, padding=True, return_tensors="pt")
        enc["labels"] = [1, 2, 3]
        enc["nested"] = tok(TEXTS[:2], padding=True, return_tensors="pt")
        enc["nothing"] = None
        moved = []
        enc["nested"].to = lambda *a, **k: moved.append(k["device"])  # records the call, as a tensor's .to
        assert enc.to("cpu") is enc
        assert moved == ["cpu"] and enc["labels"] == [1, 2, 3] and enc["nothing"] is None


CHAT = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi!"}]
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} [SEP] {% endfor %}"


def test_apply_chat_template_as_hf(hf, ours):
    """BERT has no chat template: transformers' ValueError; with a template given, the same
    text and ids as HF's."""
    for tok in (hf, ours):
        with pytest.raises(ValueError, match="chat_template is not set"):
            tok.apply_chat_template(CHAT)
    assert ours.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False) == hf.apply_chat_template(
        CHAT, chat_template=TEMPLATE, tokenize=False)
    mine = ours.apply_chat_template(CHAT, chat_template=TEMPLATE)
    theirs = hf.apply_chat_template(CHAT, chat_template=TEMPLATE)
    _same(dict(mine) if hasattr(mine, "keys") else mine, dict(theirs) if hasattr(theirs, "keys") else theirs)


def test_apply_chat_template_without_transformers():
    """Without transformers loaded (the plain class), the same ValueError, not an AttributeError."""
    import subprocess
    import sys

    code = ("import sys, distilbert_fast\n"
            "tok = distilbert_fast.DistilBertTokenizer(vocab=['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hi'])\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "try:\n"
            "    tok.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
            "except ValueError as exc:\n"
            "    print('ValueError', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ValueError Cannot use chat template functions"), out.stdout


def test_batch_encoding_copy_is_a_batch_encoding_as_hf(hf, ours):
    """enc.copy(): a BatchEncoding with the same maps (ours gave a plain dict: dict.copy)."""
    for args in (("Hello world",), (TEXTS, PAIRS)):
        mine, theirs = ours(*args).copy(), hf(*args).copy()
        assert type(mine) is BatchEncoding and dict(mine) == dict(theirs)
        assert mine.word_ids(0) == theirs.word_ids(0) and mine.n_sequences == theirs.n_sequences
        assert mine.input_ids == theirs.input_ids and mine[0].tokens == theirs[0].tokens
        mine["input_ids"] = None  # a shallow copy: the original keeps its keys
    original = ours("Hello world")
    duplicate = original.copy()
    duplicate["labels"] = [1]
    assert "labels" not in original
