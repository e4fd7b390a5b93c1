"""Differential tests: distilbert_fast's C++ WordPiece tokenizer against HuggingFace's
BertTokenizerFast (the Rust `tokenizers` library) on the real uncased BERT vocab, in four
normalizer variants: ids, tokens, offsets, masks, word ids and overflow windows must be identical.
"""

import os

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import reference_vocab_dir  # noqa: E402

import distilbert_fast  # noqa: E402
from distilbert_fast import DistilBertTokenizer, DistilBertTokenizerFast  # noqa: E402

# (do_lower_case, strip_accents): the BERT default (strip follows lower-casing), cased, and the
# two explicit mixes
VARIANTS = {
    "uncased": (True, None),
    "cased": (False, None),
    "lower_no_strip": (True, False),
    "strip_no_lower": (False, True),
}


def _vocab_path():
    return os.path.join(reference_vocab_dir(), "vocab.txt")


@pytest.fixture(scope="module")
def vocab_tokens():
    with open(_vocab_path(), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


@pytest.fixture(scope="module")
def pairs(vocab_tokens):
    """variant -> (HF tokenizer, ours)"""
    out = {}
    vocab = {t: i for i, t in enumerate(vocab_tokens)}
    for name, (lower, strip) in VARIANTS.items():
        hf = transformers.BertTokenizer(vocab=dict(vocab), do_lower_case=lower, strip_accents=strip)
        ours = DistilBertTokenizer(vocab_file=_vocab_path(), do_lower_case=lower, strip_accents=strip)
        out[name] = (hf, ours)
    return out


@pytest.fixture(scope="module")
def hf_pretrained():
    return transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


@pytest.fixture(scope="module")
def ours_pretrained():
    return DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


def _cjk_edges():
    ranges = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
              (0x2B820, 0x2B91F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]
    chars = []
    for lo, hi in ranges:
        chars += [lo - 1, lo, lo + 1, hi - 1, hi, hi + 1]
    return "".join(f"a{chr(c)}b " for c in chars)


CASES = {
    "english prose": "The quick brown fox jumps over the lazy dog. It's 3:45pm — isn't it?",
    "unaffable": "unaffable unbelievably tokenization",
    "accented latin": "Café naïve résumé Ångström Øresund façade Dvořák Łódź ÀÉÎÕÜ",
    "greek final sigma": "ΟΔΟΣ ΟΔΟΣ. Σίσυφος ΣΊΣΥΦΟΣ ὅς",
    "turkish dotted i": "İstanbul IĞDIR ıiİI i̇stanbul",
    "cjk edges": _cjk_edges(),
    "chinese japanese": "我爱北京天安门。日本語のテキスト、カタカナ",
    "hangul": "한국어 텍스트 처리 안녕하세요",
    "arabic": "مرحبا بالعالم، هذا اختبار.",
    "devanagari": "नमस्ते दुनिया। हिन्दी",
    "thai": "สวัสดีชาวโลก ภาษาไทย",
    "emoji": "I ❤️ NY 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷",
    "combining marks": "e\u0301 a\u0308\u0304 n\u0303o Z\u0351\u0362a\u0337l\u0327g\u0336o ק\u05b0",
    "control format zero width": "a\u200bb c\u200cd e\u200df \ufeffg h\u00adi j\x00k l\x07m \ufffdn o\u2028p\x0bq\x0cr\x85s\u202et",
    "spaces": "a\u00a0b\u2003c\u3000d\te\nf\rg\u1680h\u202fi\u205fj \u180ek",
    "word of 100": "a" * 100 + " " + "b" * 99 + "c",
    "word of 101": "a" * 101 + " x",
    "100 after expansion": "İ" * 60 + " " + "é" * 101,
    "special tokens in text": "hello [MASK] world[SEP]x [mask] [CLS][CLS] [UNK]y [PAD]",
    "empty": "",
    "whitespace only": " \t\n\u00a0 ",
    "punctuation": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~ ¡¿ «» „“ ‹› ‐–— … · ※ ⁂ 〈〉「」",
    "symbols": "$100 ¥200 €300 © ® ™ ° ± × ÷ ∑ √ ∞ ≈ ≠ ← → ♠ ♥",
    "numbers": "3.14159 1,000,000 0x1F 1e-9 ①②③ ¼ ½ ²³",
    "unicode 16 punctuation": "a\u2e5db \u2e43c \u166dd e\u061df",
    "late marks": "a\u08d3b c\u1ac0d e\U00011938f",
    "marks reordered by NFD": "À\u302e é\u302e \u3029\u302a\u302b\u302c\u302d\u302e Ǻ\u302ex \u302e\u0316a \u08d4\u0316",
    "mixed scripts": "Hello мир 世界 🌍 שלום",
    "long unknown": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℌ𝔢𝔩𝔩𝔬 ﬁﬂ ǅ ǈ",
}


def _compare(hf, ours, *args, **kwargs):
    a = hf(*args, **kwargs)
    b = ours(*args, **kwargs)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a:
        expected, got = a[key], b[key]
        if isinstance(expected, torch.Tensor):
            assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype, key
            assert torch.equal(got, expected), key
        elif isinstance(expected, np.ndarray):
            assert isinstance(got, np.ndarray), key
            np.testing.assert_array_equal(got, expected, err_msg=key)
        else:
            assert got == expected, f"{key}: ours {got} != HF {expected}"
    rows = len(a["input_ids"]) if isinstance(a["input_ids"][0], (list, torch.Tensor, np.ndarray)) else 1
    for i in range(rows):
        assert b.word_ids(i) == a.word_ids(i)
        assert b.sequence_ids(i) == a.sequence_ids(i)
    return a, b


def _compare_or_both_fail(hf, ours, *args, **kwargs):
    """Same outputs, or HF fails and we raise ValueError: a sequence too short to truncate (HF
    raises Exception), or a stride not below the kept length (HF's Rust code panics)."""
    try:
        hf(*args, **kwargs)
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException derives from BaseException
        if isinstance(exc, KeyboardInterrupt):
            raise
        expected = "stride" if type(exc).__name__ == "PanicException" else "cannot truncate"
        with pytest.raises(ValueError, match=expected):
            ours(*args, **kwargs)
        return str(exc)
    _compare(hf, ours, *args, **kwargs)
    return None


ALL = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=True,
           return_length=True)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("case", list(CASES))
def test_single_text_matches_hf(pairs, variant, case):
    hf, ours = pairs[variant]
    text = CASES[case]
    a, _ = _compare(hf, ours, text, **ALL)
    assert ours.tokenize(text) == hf.tokenize(text)
    assert ours.convert_ids_to_tokens(a["input_ids"]) == hf.convert_ids_to_tokens(a["input_ids"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pairs_and_batches_match_hf(pairs, variant):
    hf, ours = pairs[variant]
    texts = list(CASES.values())
    _compare(hf, ours, texts, **ALL)
    _compare(hf, ours, texts, texts[::-1], **ALL)
    _compare(hf, ours, texts, padding=True, return_tensors="pt", **ALL)


def test_from_pretrained_matches_hf(hf_pretrained, ours_pretrained):
    texts = list(CASES.values())
    _compare(hf_pretrained, ours_pretrained, texts, texts[1:] + texts[:1], padding=True, **ALL)
    assert ours_pretrained.model_max_length == hf_pretrained.model_max_length
    assert ours_pretrained.get_vocab() == hf_pretrained.get_vocab()
    assert ours_pretrained.model_input_names == ["input_ids", "attention_mask"]
    assert set(ours_pretrained.all_special_ids) == set(hf_pretrained.all_special_ids)


LONG = ("The tokenizer splits this long sentence into many pieces, so that truncation, stride and "
        "overflow windows have something to cut: unbelievable, antidisestablishmentarianism! ") * 3
SHORT = "A short question?"


@pytest.mark.parametrize("truncation", ["longest_first", "only_first", "only_second", True])
@pytest.mark.parametrize("max_length,stride", [(3, 0), (4, 0), (5, 1), (20, 0), (24, 5), (37, 9), (60, 2)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_and_overflow_match_hf(hf_pretrained, ours_pretrained, truncation, max_length, stride, side):
    hf_pretrained.truncation_side = ours_pretrained.truncation_side = side
    try:
        for first, second in [(LONG, SHORT), (SHORT, LONG), (LONG, LONG[:150]), (LONG[40:], LONG)]:
            _compare_or_both_fail(hf_pretrained, ours_pretrained, first, second, truncation=truncation,
                                  max_length=max_length, stride=stride, return_overflowing_tokens=True, **ALL)
        if truncation in ("longest_first", True):
            _compare_or_both_fail(hf_pretrained, ours_pretrained, [LONG, SHORT, LONG[::2]], [SHORT, LONG, LONG[1::2]],
                     truncation=truncation, max_length=max_length, stride=stride, return_overflowing_tokens=True,
                     padding=True, **ALL)
            _compare_or_both_fail(hf_pretrained, ours_pretrained, [LONG, SHORT, LONG[::2]], truncation=truncation,
                     max_length=max_length, stride=stride, return_overflowing_tokens=True, **ALL)
            _compare_or_both_fail(hf_pretrained, ours_pretrained, LONG, truncation=truncation, max_length=max_length,
                     stride=stride, return_overflowing_tokens=True, **ALL)
            _compare_or_both_fail(hf_pretrained, ours_pretrained, LONG, truncation=truncation, max_length=max_length, **ALL)
    finally:
        hf_pretrained.truncation_side = ours_pretrained.truncation_side = "right"


@pytest.mark.parametrize("padding", [True, "longest", "max_length", False])
@pytest.mark.parametrize("pad_to_multiple_of", [None, 8])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_padding_matches_hf(hf_pretrained, ours_pretrained, padding, pad_to_multiple_of, padding_side):
    texts = [SHORT, LONG[:100], "", "x"]
    kwargs = dict(padding=padding, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side, **ALL)
    if padding == "max_length":
        kwargs["max_length"] = 45
        kwargs["truncation"] = True
        if pad_to_multiple_of:
            for tok in (hf_pretrained, ours_pretrained):  # HF refuses a max_length that is not a multiple
                with pytest.raises(ValueError, match="multiple of"):
                    tok(texts, **kwargs)
            kwargs["max_length"] = 48
    _compare(hf_pretrained, ours_pretrained, texts, **kwargs)
    _compare(hf_pretrained, ours_pretrained, SHORT, **kwargs)
    if padding is not False:
        _compare(hf_pretrained, ours_pretrained, texts, return_tensors="np", **kwargs)


@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_tensors_match_hf(hf_pretrained, ours_pretrained, return_tensors):
    _compare(hf_pretrained, ours_pretrained, SHORT, return_tensors=return_tensors, **ALL)
    _compare(hf_pretrained, ours_pretrained, [SHORT, LONG], [LONG, SHORT], return_tensors=return_tensors,
             padding=True, truncation=True, max_length=32, stride=4, return_overflowing_tokens=True, **ALL)


def test_split_into_words_matches_hf(hf_pretrained, ours_pretrained):
    words = ["Hello", "wörld!", "[MASK]", "unaffable", "中文", "", "don't", "a" * 101]
    _compare(hf_pretrained, ours_pretrained, words, is_split_into_words=True, **ALL)
    _compare(hf_pretrained, ours_pretrained, [words, words[::-1]], [words[2:], words[:3]], is_split_into_words=True,
             padding=True, **ALL)


def test_no_special_tokens_and_no_masks_match_hf(hf_pretrained, ours_pretrained):
    _compare(hf_pretrained, ours_pretrained, [SHORT, LONG], add_special_tokens=False)
    _compare(hf_pretrained, ours_pretrained, [SHORT, LONG], [LONG, SHORT], add_special_tokens=False,
             truncation=True, max_length=16, return_overflowing_tokens=True, stride=3)
    _compare(hf_pretrained, ours_pretrained, [SHORT, LONG], return_attention_mask=False, padding=True)


def test_encode_decode_match_hf(hf_pretrained, ours_pretrained):
    for text in [*CASES.values(), "a . b ? c ! d , e ' f don't it's", "x ##y", "hello , world !"]:
        ids = hf_pretrained(text)["input_ids"]
        assert ours_pretrained.encode(text) == hf_pretrained.encode(text)
        for skip in (False, True):
            assert ours_pretrained.decode(ids, skip_special_tokens=skip) == hf_pretrained.decode(ids, skip_special_tokens=skip)
        assert ours_pretrained.decode(torch.tensor(ids)) == hf_pretrained.decode(ids)
    batch = hf_pretrained([SHORT, LONG], padding=True)["input_ids"]
    assert ours_pretrained.batch_decode(batch, skip_special_tokens=True) == hf_pretrained.batch_decode(
        batch, skip_special_tokens=True)
    # ids that start with a continuation piece keep its "##"
    ids = hf_pretrained.convert_tokens_to_ids(["##ing", "play", "##ing"])
    assert ours_pretrained.decode(ids) == hf_pretrained.decode(ids)


def test_token_id_conversions_match_hf(hf_pretrained, ours_pretrained):
    tokens = ["hello", "##ing", "[CLS]", "not-a-token", "中"]
    assert ours_pretrained.convert_tokens_to_ids(tokens) == hf_pretrained.convert_tokens_to_ids(tokens)
    assert ours_pretrained.convert_tokens_to_ids("hello") == hf_pretrained.convert_tokens_to_ids("hello")
    ids = [0, 100, 101, 102, 103, 7592, 30521]
    assert ours_pretrained.convert_ids_to_tokens(ids) == hf_pretrained.convert_ids_to_tokens(ids)
    assert ours_pretrained.convert_ids_to_tokens(ids, skip_special_tokens=True) == hf_pretrained.convert_ids_to_tokens(
        ids, skip_special_tokens=True)
    assert ours_pretrained.convert_ids_to_tokens(7592) == hf_pretrained.convert_ids_to_tokens(7592)
    for name in ("cls_token_id", "sep_token_id", "pad_token_id", "unk_token_id", "mask_token_id"):
        assert getattr(ours_pretrained, name) == getattr(hf_pretrained, name), name
    assert len(ours_pretrained) == len(hf_pretrained) and ours_pretrained.vocab_size == hf_pretrained.vocab_size


def test_batch_encoding_api(ours_pretrained):
    enc = ours_pretrained(["Hello world", "Hi"], padding=True, return_tensors="pt")
    assert enc.input_ids is enc["input_ids"] and enc.input_ids.dtype == torch.int64
    assert enc.input_ids.shape == enc.attention_mask.shape == (2, 4)
    assert enc.to("cpu") is enc and enc.input_ids.device.type == "cpu"
    assert enc.word_ids(1) == [None, 0, None, None]
    assert enc.tokens(1) == ["[CLS]", "hi", "[SEP]", "[PAD]"]
    with pytest.raises(IndexError, match="batch_index"):
        enc.word_ids(2)
    with pytest.raises(AttributeError):
        enc.no_such_key
    out = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(
        vocab_size=ours_pretrained.vocab_size, dim=32, n_layers=1, n_heads=2, hidden_dim=37)).eval()(**enc)
    assert out.last_hidden_state.shape == (2, 4, 32)


def test_threads_do_not_change_results(ours_pretrained):
    texts = [v for v in CASES.values()] * 40 + [LONG * 20] * 8
    single = DistilBertTokenizer.from_pretrained(reference_vocab_dir(), num_threads=1)
    many = DistilBertTokenizer.from_pretrained(reference_vocab_dir(), num_threads=4)
    kwargs = dict(truncation=True, max_length=64, stride=8, return_overflowing_tokens=True, padding=True, **ALL)
    a, b = single(texts, **kwargs), many(texts, **kwargs)
    assert a == b
    assert [a.word_ids(i) for i in range(len(a["input_ids"]))] == [b.word_ids(i) for i in range(len(b["input_ids"]))]


def test_save_and_reload_round_trip(tmp_path, ours_pretrained, hf_pretrained):
    custom = DistilBertTokenizer.from_pretrained(reference_vocab_dir(), do_lower_case=False, strip_accents=True,
                                                 model_max_length=128)
    files = custom.save_pretrained(tmp_path)
    assert sorted(os.path.basename(f) for f in files) == ["special_tokens_map.json", "tokenizer.json",
                                                         "tokenizer_config.json", "vocab.txt"]
    reloaded = DistilBertTokenizer.from_pretrained(tmp_path)
    assert (reloaded.do_lower_case, reloaded.strip_accents, reloaded.model_max_length) == (False, True, 128)
    text = CASES["accented latin"] + CASES["special tokens in text"]
    assert reloaded(text, **ALL) == custom(text, **ALL)
    # HF reads what we save, and we read what HF saves
    hf_loaded = transformers.DistilBertTokenizerFast.from_pretrained(tmp_path)
    assert hf_loaded(text)["input_ids"] == custom(text)["input_ids"]
    hf_dir = tmp_path / "hf"
    hf_pretrained.save_pretrained(hf_dir)
    assert DistilBertTokenizer.from_pretrained(hf_dir)(text, **ALL) == ours_pretrained(text, **ALL)
    # vocab.txt alone gives the same tokenizer as tokenizer.json
    only_vocab = DistilBertTokenizer(vocab_file=_vocab_path())
    assert only_vocab(text, **ALL) == ours_pretrained(text, **ALL)


def test_every_code_point_matches_hf(pairs):
    """Each code point, alone between letters and glued to its neighbours: checks every entry of
    the generated Unicode tables against the Rust tokenizer."""
    chars = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    spaced = ["".join(f"x{c} " for c in chars[i:i + 4096]) for i in range(0, len(chars), 4096)]
    glued = ["".join(chars[i + k:i + k + 40]) + " " for i in range(0, len(chars), 4096) for k in range(0, 4096, 40)]
    # glued runs exercise NFD reordering across characters; each variant sees every code point once
    plan = {"uncased": (spaced, glued), "cased": (spaced,), "lower_no_strip": (spaced,), "strip_no_lower": (glued,)}
    for variant, sweeps in plan.items():
        hf, ours = pairs[variant]
        for texts in sweeps:
            a = hf(texts, return_offsets_mapping=True)
            b = ours(texts, return_offsets_mapping=True)
            for i in range(len(texts)):
                if a["input_ids"][i] != b["input_ids"][i] or a["offset_mapping"][i] != b["offset_mapping"][i]:
                    ta = hf.convert_ids_to_tokens(a["input_ids"][i])
                    tb = ours.convert_ids_to_tokens(b["input_ids"][i])
                    first = next(k for k in range(min(len(ta), len(tb))) if (ta[k], a["offset_mapping"][i][k]) != (
                        tb[k], b["offset_mapping"][i][k]))
                    raise AssertionError(f"{variant} text {i}: first difference at token {first}: HF "
                                         f"{ta[first:first + 3]} {a['offset_mapping'][i][first:first + 3]}, ours "
                                         f"{tb[first:first + 3]} {b['offset_mapping'][i][first:first + 3]}")


def test_never_split_and_no_basic_tokenize_match_hf_python_tokenizer():
    """HF's fast tokenizer ignores never_split and do_basic_tokenize; its Python tokenizer
    (BertTokenizerLegacy) defines them, so ASCII text is compared against that one."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    text = "Hello [MASK] wOrLd! keep_ME.now keep_ME.now, unaffable TEXT-here hello!"
    for kwargs in (dict(never_split=["keep_ME.now", "TEXT-here", "hello!"]), dict(do_basic_tokenize=False),
                   dict(do_basic_tokenize=False, do_lower_case=False)):
        legacy = BertTokenizerLegacy(_vocab_path(), **kwargs)
        ours = DistilBertTokenizer(vocab_file=_vocab_path(), **kwargs)
        # (HF's tokenize() shows an out-of-vocab never_split word itself; ours shows its [UNK])
        expected = [t if t in legacy.vocab else "[UNK]" for t in legacy.tokenize(text)]
        assert ours.tokenize(text) == expected, kwargs
        assert ours(text)["input_ids"] == legacy(text)["input_ids"], kwargs
