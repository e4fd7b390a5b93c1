"""The tokenizer on bad and extreme input (clear exceptions, never a crash, a hang or quadratic
time), and a property test against HuggingFace's Rust tokenizer over random Unicode text."""

import os
import time

import pytest

transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import reference_vocab_dir  # noqa: E402

from distilbert_fast import DistilBertTokenizer  # noqa: E402


@pytest.fixture(scope="module")
def ours():
    return DistilBertTokenizer.from_pretrained(reference_vocab_dir())


@pytest.fixture(scope="module")
def hf():
    return transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


# -- text -------------------------------------------------------------------------------------------


def test_lone_surrogate_is_a_clear_error(ours, hf):
    with pytest.raises(ValueError, match="surrogate"):
        ours("abc\ud800def")
    with pytest.raises(ValueError, match="surrogate"):
        ours(["fine", "\udfff"])
    with pytest.raises(ValueError, match="surrogate"):
        ours.tokenize("\ud83d")
    with pytest.raises(TypeError):  # HF refuses it too (a TypeError from the Rust binding)
        hf("abc\ud800def")


def test_bytes_and_other_types_are_refused(ours):
    with pytest.raises(ValueError, match="must be a str"):
        ours(b"abc")
    with pytest.raises(ValueError, match="must be a str"):
        ours(123)
    with pytest.raises(TypeError, match="text must be str"):
        ours(["ok", None])
    with pytest.raises(ValueError, match="text or text_target is required"):
        ours()
    with pytest.raises(TypeError, match="unexpected keyword"):
        ours("x", return_tokens=True)


def test_invalid_utf8_bytes_never_reach_python_strings(ours):
    # Python str cannot hold invalid UTF-8; decoded with errors="surrogateescape" it holds lone
    # surrogates, refused above. The core's own UTF-8 check is covered by the C++ tests and fuzzing.
    text = b"ab\xff\xfecd".decode("utf-8", errors="surrogateescape")
    with pytest.raises(ValueError, match="surrogate"):
        ours(text)
    replaced = b"ab\xff\xfecd".decode("utf-8", errors="replace")  # U+FFFD is dropped as HF does
    assert ours.tokenize(replaced) == ours.tokenize("abcd")


def test_ten_megabyte_string_is_linear(ours):
    unit = "Tokenizers split words, punctuation and 中文 into pieces. "
    small = unit * 2000
    ratio = 10_000_000 // len(small.encode())
    big = small * ratio
    assert len(big.encode()) > 9_500_000
    start = time.perf_counter()
    n_small = len(ours(small, add_special_tokens=False)["input_ids"])
    t_small = time.perf_counter() - start
    start = time.perf_counter()
    n_big = len(ours(big, add_special_tokens=False)["input_ids"])
    t_big = time.perf_counter() - start
    assert n_big == n_small * ratio
    # generous: a quadratic algorithm would be ~ratio times slower than this bound
    assert t_big < max(1.0, 20 * ratio * t_small), (t_small, t_big)


def test_million_character_word_is_one_unk(ours, hf):
    word = "a" * 1_000_000
    enc = ours(word, return_offsets_mapping=True)
    assert enc["input_ids"] == [ours.cls_token_id, ours.unk_token_id, ours.sep_token_id]
    assert enc["offset_mapping"] == [(0, 0), (0, 1_000_000), (0, 0)]
    assert enc["input_ids"] == hf(word)["input_ids"]
    # truncation of a huge input keeps max_length tokens
    assert len(ours("word " * 200_000, truncation=True, max_length=512)["input_ids"]) == 512


# -- arguments --------------------------------------------------------------------------------------


def test_max_length_below_special_tokens(ours):
    # HF silently skips truncation here (returns all tokens); we refuse with a clear message
    with pytest.raises(ValueError, match="special tokens"):
        ours("one two three", truncation=True, max_length=1)
    with pytest.raises(ValueError, match="special tokens"):
        ours("one two", "three four", truncation=True, max_length=2)
    # max_length equal to the special tokens is allowed: everything overflows (as HF)
    enc = ours("one two three", truncation=True, max_length=2, return_overflowing_tokens=True)
    assert enc["input_ids"][0] == [ours.cls_token_id, ours.sep_token_id]


def test_stride_not_below_max_length(ours):
    # HF's Rust code panics here (pyo3 PanicException); we raise ValueError
    with pytest.raises(ValueError, match="stride"):
        ours("one two three four five six", truncation=True, max_length=5, stride=3, return_overflowing_tokens=True)
    with pytest.raises(ValueError, match="stride"):
        ours("one two three four five six", truncation=True, max_length=4, stride=10)
    # HF checks stride <= max_length - 2 when truncation is set up, whether or not anything is cut
    with pytest.raises(ValueError, match="stride"):
        ours("one", truncation=True, max_length=8, stride=7)
    assert ours("one", truncation=True, max_length=8, stride=6)["input_ids"][1] == ours.convert_tokens_to_ids("one")


@pytest.mark.parametrize("kwargs,match", [
    (dict(padding="sideways"), "padding"),
    (dict(truncation="middle"), "truncation"),
    (dict(max_length=-1, truncation=True), "max_length"),
    (dict(stride=-2), "stride"),
    (dict(pad_to_multiple_of=0, padding=True), "pad_to_multiple_of"),
    (dict(return_tensors="tf"), "return_tensors"),
    (dict(padding_side="up", padding=True), "padding_side"),
    (dict(truncation="only_second", max_length=4), "pair"),
])
def test_bad_arguments_name_the_argument(ours, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ours(["one two three four five"], **kwargs)


def test_unequal_lengths_without_padding_cannot_be_tensors(ours):
    with pytest.raises(ValueError, match="padding=True"):
        ours(["one", "one two"], return_tensors="pt")


def test_decode_bad_ids(ours):
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([101, 10**6])
    with pytest.raises(ValueError, match="out of range"):
        ours.decode([-1])
    with pytest.raises(IndexError, match="out of range"):
        ours.convert_ids_to_tokens([10**6])
    assert ours.decode([[101, 102], [101]]) == ["[CLS] [SEP]", "[CLS]"]  # a batch, as in transformers 5


# -- vocabularies -----------------------------------------------------------------------------------


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


BASE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]


def test_missing_and_empty_vocab(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DistilBertTokenizer(vocab_file=str(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="empty"):
        DistilBertTokenizer(vocab_file=_write(tmp_path / "v.txt", b""))
    with pytest.raises(ValueError, match="needs a vocab"):
        DistilBertTokenizer()
    with pytest.raises(ValueError, match="local directory"):
        DistilBertTokenizer.from_pretrained("distilbert-base-uncased")
    with pytest.raises(ValueError, match="neither vocab.txt nor tokenizer.json"):
        DistilBertTokenizer.from_pretrained(tmp_path)


def test_duplicate_token_and_missing_unk(tmp_path):
    with pytest.raises(ValueError, match="'hello' twice"):
        DistilBertTokenizer(vocab_file=_write(tmp_path / "v.txt", "\n".join(BASE + ["hello"]).encode() + b"\n"))
    with pytest.raises(ValueError, match=r"unk_token '\[UNK\]' is not in the vocab"):
        DistilBertTokenizer(vocab_file=_write(tmp_path / "v.txt", "\n".join(b for b in BASE if b != "[UNK]").encode()))
    with pytest.raises(ValueError, match="mask_token"):
        DistilBertTokenizer(vocab=BASE, mask_token="[NOPE]")
    with pytest.raises(ValueError, match="not valid UTF-8"):
        DistilBertTokenizer(vocab_file=_write(tmp_path / "v.txt", "\n".join(BASE).encode() + b"\n\xff\n"))


def test_crlf_vocab_equals_lf_vocab(tmp_path):
    lf = DistilBertTokenizer(vocab_file=_write(tmp_path / "lf.txt", ("\n".join(BASE) + "\n").encode()))
    crlf = DistilBertTokenizer(vocab_file=_write(tmp_path / "crlf.txt", ("\r\n".join(BASE) + "\r\n").encode()))
    assert lf.get_vocab() == crlf.get_vocab() == {t: i for i, t in enumerate(BASE)}
    assert crlf("Hello worlds")["input_ids"] == [2, 5, 6, 7, 3]


def test_malformed_tokenizer_json(tmp_path):
    for data, match in [(b"{", "malformed"), (b"[]", "no \"model\""), (b'{"model": {"type": "BPE", "vocab": {}}}', "WordPiece"),
                        (b'{"model": {"vocab": {"a": 0, "b": 5}}}', "ids must be"), (b'{"model": {"vocab": {"a": "0"}}}', "ids must be")]:
        with pytest.raises(ValueError, match=match):
            DistilBertTokenizer(tokenizer_file=_write(tmp_path / "tokenizer.json", data))


# -- property test ----------------------------------------------------------------------------------

# every plane, weighted towards the characters with special handling
_CHARS = st.one_of(
    st.characters(blacklist_categories=("Cs",)),
    st.characters(min_codepoint=0x300, max_codepoint=0x36F),  # combining marks
    st.sampled_from(list("  \t\n\u00a0\u200b\u200d\ufeff\x00\ufffd.,!?'\"-[]#İıΣσςé中文한\u0e01\u302e\u0316")),
    st.sampled_from(["[CLS]", "[SEP]", "[MASK]", "[UNK]", "[PAD]", "##", "unaffable"]),
)
_TEXT = st.lists(_CHARS, max_size=60).map("".join)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=_TEXT, pair=st.one_of(st.none(), _TEXT), lower=st.booleans(), strip=st.sampled_from([None, True, False]))
def test_random_unicode_matches_hf(text, pair, lower, strip):
    hf_tok, our_tok = _variant(lower, strip)
    kwargs = dict(return_offsets_mapping=True, return_special_tokens_mask=True)
    a = hf_tok(text, pair, **kwargs)
    b = our_tok(text, pair, **kwargs)
    assert b["input_ids"] == a["input_ids"]
    assert b["offset_mapping"] == a["offset_mapping"]
    assert b["special_tokens_mask"] == a["special_tokens_mask"]
    assert b.word_ids() == a.word_ids()


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=3), lower=st.booleans(), split=st.booleans())
def test_random_split_special_tokens_match_hf(texts, lower, split):
    """split_special_tokens: the special tokens in the text tokenized as plain text (or not)."""
    hf_tok, our_tok = _variant(lower, None)
    kwargs = dict(return_offsets_mapping=True, return_special_tokens_mask=True, split_special_tokens=split)
    a, b = hf_tok(texts, texts[::-1], **kwargs), our_tok(texts, texts[::-1], **kwargs)
    for key in ("input_ids", "offset_mapping", "special_tokens_mask"):
        assert b[key] == a[key], key
    assert [b.word_ids(i) for i in range(len(texts))] == [a.word_ids(i) for i in range(len(texts))]
    assert our_tok.tokenize(texts[0], split_special_tokens=split) == hf_tok.tokenize(texts[0], split_special_tokens=split)


_VARIANTS = {}


def _variant(lower, strip):
    key = (lower, strip)
    if key not in _VARIANTS:
        path = os.path.join(reference_vocab_dir(), "vocab.txt")
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        _VARIANTS[key] = (transformers.BertTokenizer(vocab=vocab, do_lower_case=lower, strip_accents=strip),
                          DistilBertTokenizer(vocab_file=path, do_lower_case=lower, strip_accents=strip))
    return _VARIANTS[key]


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(_TEXT, min_size=1, max_size=4), pairs=st.booleans(), max_length=st.integers(2, 40),
       stride=st.integers(0, 10), truncation=st.sampled_from(["longest_first", "only_first", "only_second"]),
       padding=st.sampled_from([False, True, "max_length"]), side=st.sampled_from(["left", "right"]),
       multiple=st.sampled_from([None, 4]))
def test_random_truncation_padding_overflow_match_hf(texts, pairs, max_length, stride, truncation, padding, side,
                                                     multiple):
    hf_tok, our_tok = _variant(True, None)
    pair = texts[::-1] if pairs else None
    if max_length < (3 if pairs else 2):
        return  # documented: we refuse max_length below the special tokens, HF does not truncate
    kwargs = dict(truncation=truncation, max_length=max_length, stride=stride, padding=padding, padding_side=side,
                  pad_to_multiple_of=multiple, return_overflowing_tokens=True, return_offsets_mapping=True,
                  return_special_tokens_mask=True, return_token_type_ids=True)
    if padding and multiple and max_length % multiple:
        kwargs["max_length"] = max(multiple, max_length - max_length % multiple)
    try:
        expected = hf_tok(texts, pair, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - HF raises Exception / ValueError or panics
        if isinstance(exc, KeyboardInterrupt):
            raise
        with pytest.raises(ValueError):
            our_tok(texts, pair, **kwargs)
        return
    got = our_tok(texts, pair, **kwargs)
    assert dict(got) == dict(expected)
    for i in range(len(expected["input_ids"])):
        assert got.word_ids(i) == expected.word_ids(i)
