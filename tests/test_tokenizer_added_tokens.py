"""``add_tokens`` / ``add_special_tokens`` against HF's BertTokenizerFast on the real vocab: return
values, ids, ``len``, vocab maps, matching (raw text for special / normalized=False tokens, the
normalized text for the others: casing, accents, inside words, next to punctuation, overlapping
tokens, lstrip / rstrip), ``__call__`` outputs and maps, decoding, saving and loading both ways,
and the engine's packed path.
"""

import copy
import os
import pickle
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import reference_vocab_dir  # noqa: E402

from distilbert_fast import DistilBertTokenizerFast  # noqa: E402

AddedToken = tokenizers.AddedToken

# (method, argument, keywords): applied in order to both tokenizers, return values compared
ADDITIONS = [
    ("add_tokens", ["<new_tok>"], {}),
    ("add_tokens", ["<new_tok>"], {}),            # again: nothing added
    ("add_tokens", ["hello"], {}),                # in the vocab: keeps its id
    ("add_tokens", "solo", {}),                   # a str, not a list
    ("add_tokens", [], {}),
    ("add_tokens", [""], {}),
    ("add_tokens", ["new", "new_tok_long", "covid-19", "COVID", "Ünïcode", "中文词", "two words"], {}),
    ("add_tokens", [AddedToken("<l>", lstrip=True, rstrip=True), AddedToken("<R>", rstrip=True, normalized=False)],
     {}),
    ("add_special_tokens", {"additional_special_tokens": ["<SP>", AddedToken("<sp2>", normalized=True)]}, {}),
    ("add_tokens", ["<ts>", AddedToken("<ts2>")], {"special_tokens": True}),
    ("add_tokens", [AddedToken("<ns>", special=True)], {}),
    ("add_special_tokens", {"additional_special_tokens": ["<more>"]}, {"replace_extra_special_tokens": False}),
]

TEXTS = [
    "a <new_tok> b", "A <NEW_TOK> b", "x<new_tok>y", "abc<new_tok>.", "(<new_tok>)", "<new_tok><new_tok>",
    "Héllo <NÉW_TOK> hello helloworld", "new new_tok_long newer renew", "Covid-19 and COVID-19, covid",
    "ünïcode Ünïcode UNICODE", "中文词 中文 词中文词", "two words twowords two  words TWO WORDS",
    "a <l> b", "a  <l>\tb<l>c", "x <R>  y <r> z", "x <SP> <sp> <SP2> <sp2> y", "z <ts> <TS> <ts2> <ns> <NS>",
    "[CLS] hi [MASK] [cls] <more>", "solo SOLO so lo", "", "   ", "no added token in here at all.",
    "The quick brown fox jumps over the lazy dog.", "Café naïve résumé unaffable",
]


def _hf():
    return transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())  # BertTokenizerFast, DistilBERT's inputs


def _ours():
    return DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())


def _add(tok, additions=ADDITIONS):
    results = []
    for method, arg, kwargs in additions:
        if isinstance(arg, list):  # fresh AddedToken objects for each tokenizer (HF marks them)
            arg = [AddedToken(a.content, single_word=a.single_word, lstrip=a.lstrip, rstrip=a.rstrip,
                              normalized=a.normalized, special=a.special) if isinstance(a, AddedToken) else a
                   for a in arg]
        results.append(getattr(tok, method)(arg, **kwargs))
    return results


@pytest.fixture(scope="module")
def pair():
    hf, ours = _hf(), _ours()
    assert _add(ours) == _add(hf)
    return hf, ours


def _flags(decoder):
    return {i: (t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special) for i, t in decoder.items()}


def test_additions_match_hf(pair):
    hf, ours = pair
    assert len(ours) == len(hf) > hf.vocab_size
    assert ours.vocab_size == hf.vocab_size
    assert ours.get_vocab() == hf.get_vocab()
    assert ours.get_added_vocab() == hf.get_added_vocab()
    assert _flags(ours.added_tokens_decoder) == _flags(hf.added_tokens_decoder)
    assert ours.all_special_tokens == hf.all_special_tokens
    assert ours.all_special_ids == hf.all_special_ids
    assert ours.extra_special_tokens == hf.extra_special_tokens
    contents = list(hf.get_added_vocab()) + ["covid", "unicode", "<sp>", "nope"]
    assert ours.convert_tokens_to_ids(contents) == hf.convert_tokens_to_ids(contents)
    ids = list(range(hf.vocab_size - 3, len(hf))) + [0, 101, 7592]
    assert ours.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert (ours.convert_ids_to_tokens(ids, skip_special_tokens=True)
            == hf.convert_ids_to_tokens(ids, skip_special_tokens=True))


def test_new_ids_follow_the_vocab():
    ours = _ours()
    n = len(ours)
    assert ours.add_tokens(["<a>", "<b>"]) == 2 and ours.add_special_tokens({"additional_special_tokens": ["<c>"]}) == 1
    assert ours.convert_tokens_to_ids(["<a>", "<b>", "<c>"]) == [n, n + 1, n + 2] and len(ours) == n + 3
    assert ours.add_tokens(["hello"]) == 1 and len(ours) == n + 3  # HF counts it; no new id
    assert ours("<a>hello<c>")["input_ids"] == [101, n, 7592, n + 2, 102]


def _assert_call_matches(hf, ours, *args, **kwargs):
    a = hf(*args, **kwargs)
    b = ours(*args, **kwargs)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        x, y = a[key], b[key]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), key
        else:
            assert x == y, f"{key}: HF {x} ours {y}"
    rows = len(a["input_ids"]) if isinstance(a["input_ids"][0], list) else 1
    for r in range(rows if isinstance(args[0], list) else 1):
        assert b.word_ids(r) == a.word_ids(r)
        assert b.sequence_ids(r) == a.sequence_ids(r)
        assert b.tokens(r) == a.tokens(r)
    return a, b


@pytest.mark.parametrize("text", TEXTS)
def test_call_matches_hf(pair, text):
    hf, ours = pair
    a, b = _assert_call_matches(hf, ours, text, return_offsets_mapping=True, return_special_tokens_mask=True)
    assert ours(text)["input_ids"] == a["input_ids"]  # the plain call's C++ fast path
    # an lstrip / rstrip token shows the white space it took, as HF's: "a  <l>\tb" gives "  <l> "
    assert b.tokens() == a.tokens()
    assert ours.tokenize(text) == hf.tokenize(text)
    assert ours(text).tokens() == a.tokens()  # the fast path's lazily re-encoded rows
    for skip in (False, True):
        assert ours.decode(a["input_ids"], skip_special_tokens=skip) == hf.decode(a["input_ids"], skip_special_tokens=skip)


# pieces of random texts: added tokens in other casings and accents, the white space lstrip /
# rstrip take (CJK padding too), punctuation next to them, characters normalization changes
PIECES = ["<new_tok>", "<NEW_TOK>", "<néw_tök>", "new", "new_tok_long", "covid-19", "COVID", "ünïcode", "中文词", "中",
          "two words", "<l>", "<R>", "<r>", "<SP>", "<sp2>", "<SP2>", "<ts>", "<ns>", "[CLS]", "[MASK]", "solo", "hello",
          "x", "é", "e\u0301", "\u0301", " ", "  ", "\t", "\u3000", "\u00a0", ".", ",", "(", "<", ">", "_", "a", "Z",
          "İ", "ß", "\u200b", "\x01", "😀", "ﬁ"]


def test_random_texts_match_hf(pair):
    hf, ours = pair
    _assert_random_texts_match(hf, ours, PIECES, max_pieces=8, seed=0)


def test_single_word_tokens_match_hf():
    """single_word=True: matched only where no word character (regex \\w: letters, marks, digits,
    '_') touches it, in the raw text (normalized=False) or the normalized text."""
    hf, ours = _hf(), _ours()
    adds = [("add_tokens", [AddedToken("sw", single_word=True), AddedToken("<W>", single_word=True, normalized=False),
                            AddedToken("ab", single_word=True, lstrip=True, rstrip=True), "abc"], {}),
            ("add_special_tokens", {"additional_special_tokens": [AddedToken("[S]", single_word=True)]}, {})]
    assert _add(ours, adds) == _add(hf, adds)
    pieces = ["sw", "SW", "ŝw", "<W>", "<w>", "ab", "abc", "[S]", " ", "  ", "x", "1", "_", "-", ".", "\u0301", "é",
              "中", "😀", "\u200d", "\u00a0", "Ⓐ", "ⅷ"]
    _assert_random_texts_match(hf, ours, pieces, max_pieces=7, seed=1)


def _assert_random_texts_match(hf, ours, pieces, max_pieces, seed):
    """1,000 texts of 0..max_pieces random pieces: ids, offsets and word ids equal HF's."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, max_pieces))) for _ in range(1000)]
    a = hf(texts, return_offsets_mapping=True)
    b = ours(texts, return_offsets_mapping=True)
    for i, text in enumerate(texts):
        assert (b["input_ids"][i], b["offset_mapping"][i], b.word_ids(i), b.tokens(i)) == \
            (a["input_ids"][i], a["offset_mapping"][i], a.word_ids(i), a.tokens(i)), repr(text)


def test_word_chars_table_is_current():
    pytest.importorskip("regex")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "gen_word_chars.py")
    done = subprocess.run([sys.executable, script, "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_batch_pairs_truncation_padding_match_hf(pair):
    hf, ours = pair
    texts, pairs = TEXTS[:12], TEXTS[12:24]
    _assert_call_matches(hf, ours, texts, pairs, return_offsets_mapping=True, return_special_tokens_mask=True)
    _assert_call_matches(hf, ours, texts, pairs, truncation=True, max_length=9, padding=True,
                         return_overflowing_tokens=True, stride=2, return_offsets_mapping=True)
    _assert_call_matches(hf, ours, texts, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    words = [t.split(" ") for t in TEXTS if t.strip()]
    _assert_call_matches(hf, ours, words, is_split_into_words=True, return_offsets_mapping=True)
    ids = hf(texts, pairs)["input_ids"]
    for skip in (False, True):
        assert ours.batch_decode(ids, skip_special_tokens=skip) == hf.batch_decode(ids, skip_special_tokens=skip)
    assert ours.encode_packed(texts, return_tensors="np").input_ids.tolist() == sum(hf(texts)["input_ids"], [])


def test_tokens_normalized_alike_first_added_wins():
    """Two added tokens whose normalized texts are equal ('<new_tok>', '<NEW_TOK>'): HF's choice
    between them changes from one process to the next (a HashMap's order), ours is the first added."""
    hf, ours = _hf(), _ours()
    adds = [("add_tokens", ["<new_tok>"], {}), ("add_tokens", ["<NEW_TOK>", "<Other>"], {}),
            ("add_tokens", ["<other>"], {})]
    assert _add(ours, adds) == _add(hf, adds)
    assert ours.get_added_vocab() == hf.get_added_vocab()
    for text, first, second in (("a <New_Tok> b", "<new_tok>", "<NEW_TOK>"), ("<OTHER>", "<Other>", "<other>")):
        candidates = hf.convert_tokens_to_ids([first, second])
        hf_id = hf(text, add_special_tokens=False)["input_ids"]
        assert len(hf_id) in (1, 3) and set(hf_id) & set(candidates)
        got = ours(text, add_special_tokens=False)["input_ids"]
        assert [i for i in got if i >= ours.vocab_size] == [candidates[0]]
        assert [i for i in got if i < ours.vocab_size] == [i for i in hf_id if i < hf.vocab_size]


def test_overlapping_tokens_longest_first_then_leftmost():
    hf, ours = _hf(), _ours()
    adds = [("add_tokens", ["ab", "abc", "bcd", "<x", "<x>", "x>y"], {})]
    assert _add(ours, adds) == _add(hf, adds)
    for text in ["abcd", "bcd abc ab", "xabcdx", "<x>y", "<x> y <xx>y", "ABCD Bcd"]:
        _assert_call_matches(hf, ours, text, return_offsets_mapping=True)


def test_named_special_tokens_match_hf():
    hf, ours = _hf(), _ours()
    adds = [("add_special_tokens", {"cls_token": "<CLS>", "pad_token": "<PAD>", "bos_token": "<s>"}, {})]
    assert _add(ours, adds) == _add(hf, adds)
    for name in ("cls_token", "pad_token", "bos_token", "eos_token", "sep_token"):
        assert getattr(ours, name) == getattr(hf, name), name
        assert getattr(ours, name + "_id") == getattr(hf, name + "_id"), name
    assert ours.all_special_tokens == hf.all_special_tokens
    _assert_call_matches(hf, ours, ["hi <CLS>", "hi there <s>"], padding=True)  # the template keeps [CLS]
    ids = hf(["hi", "hi there"], padding=True)["input_ids"][0]
    assert (ours.get_special_tokens_mask(ids, already_has_special_tokens=True)
            == hf.get_special_tokens_mask(ids, already_has_special_tokens=True))


def test_saved_with_added_tokens_loads_the_same_in_both(pair, tmp_path):
    hf, ours = pair
    expected = hf(TEXTS)["input_ids"]
    # saved alone, and into a checkpoint folder that holds the original tokenizer.json (without
    # the added tokens: both loaders add those of tokenizer_config.json on top)
    (tmp_path / "checkpoint").mkdir()
    shutil.copy(os.path.join(reference_vocab_dir(), "tokenizer.json"), tmp_path / "checkpoint")
    for folder in (tmp_path / "ours", tmp_path / "checkpoint"):
        ours.save_pretrained(folder)
        for loaded in (DistilBertTokenizerFast.from_pretrained(folder), transformers.AutoTokenizer.from_pretrained(folder),
                       transformers.BertTokenizerFast.from_pretrained(folder)):
            assert len(loaded) == len(hf), (folder, type(loaded))
            assert loaded(TEXTS)["input_ids"] == expected, (folder, type(loaded))
            assert loaded.all_special_tokens == hf.all_special_tokens, (folder, type(loaded))
    hf.save_pretrained(tmp_path / "hf")
    from_hf = DistilBertTokenizerFast.from_pretrained(tmp_path / "hf")  # tokenizer.json's added_tokens
    assert len(from_hf) == len(hf) and from_hf(TEXTS)["input_ids"] == expected
    assert _flags(from_hf.added_tokens_decoder) == _flags(hf.added_tokens_decoder)
    assert from_hf.all_special_tokens == hf.all_special_tokens


def test_pickle_and_deepcopy_keep_added_tokens(pair):
    hf, ours = pair
    expected = hf(TEXTS)["input_ids"]
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert len(clone) == len(ours) and clone(TEXTS)["input_ids"] == expected
        assert clone.all_special_tokens == ours.all_special_tokens


def test_bad_tokens_are_clear_errors():
    ours = _ours()
    n = len(ours)
    with pytest.raises(TypeError, match="new_tokens"):
        ours.add_tokens([5])
    with pytest.raises(ValueError, match="not a valid special token"):
        ours.add_special_tokens({"my_token": "<m>"})
    with pytest.raises(ValueError, match="normalized"):
        ours.add_tokens(["\u0301"])  # a lone accent: nothing is left of it once normalized
    assert len(ours) == n and ours("a \u0301 b")["input_ids"] == _hf()("a \u0301 b")["input_ids"]


def test_engine_embeds_added_tokens_as_hf(tmp_path):
    from distilbert_fast.engine import InferenceEngine

    hf_tok, ours = _hf(), _ours()
    adds = [("add_tokens", ["<new_tok>", "COVID"], {}), ("add_special_tokens", {"additional_special_tokens": ["<SP>"]}, {})]
    assert _add(ours, adds) == _add(hf_tok, adds)
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=hf_tok.vocab_size, dim=32, hidden_dim=64, n_layers=2, n_heads=2,
                                           max_position_embeddings=64)
    model = transformers.DistilBertModel(config).eval()
    model.resize_token_embeddings(len(hf_tok))
    model.save_pretrained(tmp_path)
    ours.save_pretrained(tmp_path)
    texts = ["a <new_tok> b covid", "<SP> x<NEW_TOK>y", "nothing added here", "COVID-19 <sp> <SP>"]
    engine = InferenceEngine.from_pretrained(str(tmp_path), task="embed", device="cpu", dtype="float32")
    got = torch.from_numpy(np.stack(engine(texts)))
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    assert int(enc["input_ids"].max()) >= hf_tok.vocab_size  # the added ids are in there
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)
    diff = (got - expected).abs().max().item()
    assert diff <= 1e-5, f"max abs diff {diff:.3e}"
