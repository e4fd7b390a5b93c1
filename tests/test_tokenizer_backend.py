"""Our tokenizer as a ``tokenizers`` serialization and backend: ``save_pretrained`` writes a
tokenizer.json that ``tokenizers.Tokenizer.from_file`` and transformers' fast tokenizers load and
that encodes as ours does; ``backend_tokenizer`` is a ``tokenizers.Tokenizer`` kept in step with
ours. Compared against tokenizers / transformers on the real uncased vocab.
"""

import json
import os
import sys

import pytest

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import reference_vocab_dir  # noqa: E402

from distilbert_fast import DistilBertTokenizerFast  # noqa: E402

TEXTS = ["Hello world!", "The quick brown fox jumps over the lazy dog.", "Café naïve  résumé 中文 unaffable",
         "", "x", "a [MASK] b [SEP] c", "ÀÉÎ ΟΔΟΣ 👍🏽 don't", "tab\there\u200bzero\u0000width",
         "<new_tok>x <NEW_TOK> covid-19 <sp> a<sp>b  <l>  <r>  y"]
PAIRS = ["A pair text.", "", "second text", "y", "  spaced   out  ", "中文 text", "ÜBER", "<sp>", "z <new_tok>"]

# added tokens with every flag tokenizers has
ADDED = [tokenizers.AddedToken("<new_tok>"), tokenizers.AddedToken("covid-19", single_word=True),
         tokenizers.AddedToken("<l>", lstrip=True, normalized=False),
         tokenizers.AddedToken("<r>", rstrip=True, normalized=False)]
ADDED_SPECIAL = [tokenizers.AddedToken("<sp>", special=True, normalized=False)]


def _encoding_of(ours, text, pair):
    enc = ours(text, pair, return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=True)
    return {"ids": enc["input_ids"], "type_ids": enc["token_type_ids"], "offsets": [tuple(o) for o in enc["offset_mapping"]],
            "special_tokens_mask": enc["special_tokens_mask"], "attention_mask": enc["attention_mask"],
            "word_ids": enc.word_ids(), "sequence_ids": enc.sequence_ids()}


def _encoding_of_backend(backend, text, pair):
    enc = backend.encode(text, pair)
    return {"ids": enc.ids, "type_ids": enc.type_ids, "offsets": enc.offsets,
            "special_tokens_mask": enc.special_tokens_mask, "attention_mask": enc.attention_mask,
            "word_ids": enc.word_ids, "sequence_ids": enc.sequence_ids}


def _assert_encodes_as_ours(backend, ours):
    for text in TEXTS:
        for pair in (None, PAIRS[0], PAIRS[2], PAIRS[-1]):  # (an empty pair: __call__ drops it, encode not)
            assert _encoding_of_backend(backend, text, pair) == _encoding_of(ours, text, pair), (text, pair)
    assert backend.get_vocab() == ours.get_vocab()
    assert backend.get_vocab_size() == len(ours)
    ids = ours("a [MASK] b <sp> unaffable don't !")["input_ids"]
    for skip in (False, True):
        assert backend.decode(ids, skip_special_tokens=skip) == ours.decode(ids, skip_special_tokens=skip)


def _with_added(ours):
    ours.add_tokens(ADDED)
    ours.add_special_tokens({"additional_special_tokens": ADDED_SPECIAL})
    return ours


VARIANTS = {
    "uncased": {},
    "cased": {"do_lower_case": False},
    "lowercase_keep_accents": {"strip_accents": False},
    "cased_strip_accents": {"do_lower_case": False, "strip_accents": True},
    "no_chinese_split": {"tokenize_chinese_chars": False},
    "no_basic_tokenize": {"do_basic_tokenize": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_saved_tokenizer_json_encodes_as_ours(tmp_path, variant):
    """tokenizers.Tokenizer.from_file on our saved tokenizer.json: the same ids, type ids,
    offsets, masks, word and sequence ids, vocab and decoding as ours, added tokens included."""
    ours = _with_added(DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), **VARIANTS[variant]))
    files = ours.save_pretrained(tmp_path)
    path = os.path.join(tmp_path, "tokenizer.json")
    assert path in files
    backend = tokenizers.Tokenizer.from_file(path)
    backend.no_truncation()  # the fixture's tokenizer.json (so ours, loaded from it) truncates at 128
    backend.no_padding()
    _assert_encodes_as_ours(backend, ours)


def test_saved_tokenizer_json_equals_the_fixtures(tmp_path):
    """Loaded from the real all-MiniLM-L6-v2 folder and saved, ours writes the tokenizer.json it
    read: the same normalizer, pre-tokenizer, model, template, decoder, added tokens, and the
    truncation / padding settings it holds (128, fixed)."""
    DistilBertTokenizerFast.from_pretrained(reference_vocab_dir()).save_pretrained(tmp_path)
    theirs = tokenizers.Tokenizer.from_file(os.path.join(reference_vocab_dir(), "tokenizer.json"))
    mine = tokenizers.Tokenizer.from_file(os.path.join(tmp_path, "tokenizer.json"))
    assert json.loads(mine.to_str()) == json.loads(theirs.to_str())


@pytest.mark.parametrize("loader", ["AutoTokenizer", "DistilBertTokenizerFast", "BertTokenizerFast"])
def test_transformers_loads_our_saved_folder(tmp_path, loader):
    """transformers' fast tokenizers load the folder we save (tokenizer.json included) and encode
    as ours, added tokens with their ids and flags included."""
    ours = _with_added(DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), model_max_length=64))
    ours.save_pretrained(tmp_path)
    hf = getattr(transformers, loader).from_pretrained(str(tmp_path))
    assert hf.get_vocab() == ours.get_vocab() and len(hf) == len(ours)
    assert hf.model_max_length == 64
    for text in TEXTS:
        for pair in (None, "a <sp> pair"):
            kwargs = dict(return_offsets_mapping=True, return_special_tokens_mask=True, return_token_type_ids=True)
            assert dict(hf(text, pair, **kwargs)) == dict(ours(text, pair, **kwargs))
    long = " ".join(TEXTS) * 5
    kwargs = dict(truncation=True, padding="max_length", return_token_type_ids=True)
    assert dict(hf(long, **kwargs)) == dict(ours(long, **kwargs))


def test_filename_prefix_names_every_file_as_transformers(tmp_path):
    """save_pretrained(filename_prefix="p") writes every file as p-<name>, as transformers' does
    (its files are a subset of ours), and neither library's from_pretrained reads them: ours says
    what the folder holds; each tokenizer loads the other's p-tokenizer.json by tokenizer_file=."""
    hf = transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    ours = _with_added(DistilBertTokenizerFast.from_pretrained(reference_vocab_dir()))
    hf.add_tokens([tokenizers.AddedToken(t.content, single_word=t.single_word, lstrip=t.lstrip, rstrip=t.rstrip,
                                         normalized=t.normalized) for t in ADDED])
    hf.add_special_tokens({"additional_special_tokens": [tokenizers.AddedToken("<sp>", special=True,
                                                                              normalized=False)]})
    theirs_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    theirs_files = hf.save_pretrained(theirs_dir, filename_prefix="p")
    ours_files = ours.save_pretrained(ours_dir, filename_prefix="p")
    names = sorted(os.listdir(ours_dir))
    assert names == sorted(os.path.basename(f) for f in ours_files)
    assert all(name.startswith("p-") for name in names), names
    assert {os.path.basename(f) for f in theirs_files if os.path.exists(f)} <= set(names)
    with pytest.raises(ValueError, match="p-tokenizer.json"):
        DistilBertTokenizerFast.from_pretrained(ours_dir)
    from_ours = transformers.DistilBertTokenizerFast(tokenizer_file=str(ours_dir / "p-tokenizer.json"))
    from_theirs = DistilBertTokenizerFast(tokenizer_file=theirs_dir / "p-tokenizer.json")
    for text in TEXTS:
        expected = dict(hf(text, return_offsets_mapping=True))
        assert dict(from_ours(text, return_offsets_mapping=True)) == expected
        assert dict(from_theirs(text, return_offsets_mapping=True)) == expected
        assert dict(ours(text, return_offsets_mapping=True)) == expected
    with pytest.raises(ValueError, match="push_to_hub"):
        ours.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_backend_tokenizer_reads_as_hfs():
    """What the clients read: normalizer, pre-tokenizer, model, post-processor, decoder, vocab,
    truncation and padding, as on HF's tokenizer loaded from the same folder."""
    path = reference_vocab_dir()
    hf = transformers.DistilBertTokenizerFast.from_pretrained(path)
    ours = DistilBertTokenizerFast.from_pretrained(path)
    mine, theirs = ours.backend_tokenizer, hf.backend_tokenizer
    for name in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model"):
        assert type(getattr(mine, name)) is type(getattr(theirs, name)), name
        assert getattr(mine, name).__getstate__() == getattr(theirs, name).__getstate__(), name
    assert mine.get_vocab() == theirs.get_vocab()
    assert mine.token_to_id("[CLS]") == theirs.token_to_id("[CLS]") == ours.cls_token_id
    assert mine.truncation == theirs.truncation and mine.padding == theirs.padding  # the file's: 128
    assert mine.encode("Hello world!").ids == theirs.encode("Hello world!").ids


def test_backend_truncation_applies_to_backend_encode_only_as_hf():
    """enable_truncation / enable_padding on backend_tokenizer: its encode applies them, the
    tokenizer's __call__ does not (HF's __call__ replaces them with its own arguments), and
    save_pretrained writes them into tokenizer.json, as HF's does."""
    path = reference_vocab_dir()
    hf = transformers.DistilBertTokenizerFast.from_pretrained(path)
    ours = DistilBertTokenizerFast.from_pretrained(path)
    long = "the quick brown fox jumps over the lazy dog " * 3
    for tok in (hf, ours):
        tok.backend_tokenizer.enable_truncation(6, stride=1, direction="left")
        tok.backend_tokenizer.enable_padding(length=9, pad_id=0, pad_token="[PAD]")
    assert ours.backend_tokenizer.truncation == hf.backend_tokenizer.truncation
    assert ours.backend_tokenizer.padding == hf.backend_tokenizer.padding
    assert ours.backend_tokenizer.encode(long).ids == hf.backend_tokenizer.encode(long).ids
    assert len(ours.backend_tokenizer.encode(long).ids) == 9  # 6 kept, 3 pads
    assert len(ours.backend_tokenizer.encode(long).overflowing) == len(hf.backend_tokenizer.encode(long).overflowing)
    assert ours(long) == dict(hf(long)) and len(ours(long)["input_ids"]) == 29


def test_backend_settings_are_saved(tmp_path):
    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    ours.backend_tokenizer.enable_truncation(7, strategy="only_second")
    ours.backend_tokenizer.no_padding()
    ours.save_pretrained(tmp_path)
    loaded = tokenizers.Tokenizer.from_file(os.path.join(tmp_path, "tokenizer.json"))
    assert loaded.truncation == {"max_length": 7, "stride": 0, "strategy": "only_second", "direction": "right"}
    assert loaded.padding is None
    again = DistilBertTokenizerFast.from_pretrained(tmp_path)
    assert again.backend_tokenizer.truncation == loaded.truncation and again.backend_tokenizer.padding is None
    import copy
    import pickle

    for clone in (copy.deepcopy(again), pickle.loads(pickle.dumps(again))):
        assert clone.backend_tokenizer.truncation == loaded.truncation


def test_sentence_transformers_lowercase_normalizer_applies_to_ours():
    """sentence-transformers' do_lower_case=True on a cased tokenizer puts Lowercase() before the
    normalizer of backend_tokenizer (its Transformer.__init__ does exactly these steps): ours then
    tokenizes as HF's does after the same assignment."""
    from tokenizers.normalizers import Lowercase, Sequence

    path = reference_vocab_dir()
    hf = transformers.DistilBertTokenizerFast.from_pretrained(path, do_lower_case=False)
    ours = DistilBertTokenizerFast.from_pretrained(path, do_lower_case=False)
    text = "Café NAÏVE Résumé ΟΔΟΣ Ünïcödé"
    assert ours(text) == dict(hf(text))
    for tok in (hf, ours):
        normalizer = tok.backend_tokenizer.normalizer
        tok.backend_tokenizer.normalizer = Sequence([Lowercase(), normalizer])
    assert dict(hf(text)) != dict(transformers.DistilBertTokenizerFast.from_pretrained(path, do_lower_case=False)(text))
    for t in TEXTS:
        assert ours(t, return_offsets_mapping=True) == dict(hf(t, return_offsets_mapping=True)), t
    assert ours.tokenize(text) == hf.tokenize(text)
    # a BertNormalizer alone sets ours as well
    for tok in (hf, ours):
        tok.backend_tokenizer.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True, strip_accents=True,
                                                                                 handle_chinese_chars=False)
    for t in TEXTS:
        assert ours(t, return_offsets_mapping=True) == dict(hf(t, return_offsets_mapping=True)), t


def test_backend_components_cannot_desynchronise():
    """A component read from backend_tokenizer is a copy (changing it in place changes nothing);
    a component the tokenizer cannot run is refused when assigned; added tokens go to ours."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    text = "Café NAÏVE"
    before = ours(text)
    backend = ours.backend_tokenizer
    backend.no_padding()  # the fixture's tokenizer.json pads to 128
    normalizer = backend.normalizer
    normalizer.lowercase = False
    assert backend.normalizer.lowercase is True and ours(text) == before
    assert backend.encode(text).ids == before["input_ids"]
    model = backend.model
    model.unk_token = "[MASK]"
    assert backend.model.unk_token == "[UNK]"
    with pytest.raises(ValueError, match="normalizer"):
        backend.normalizer = normalizers.NFKC()
    with pytest.raises(ValueError, match="pre_tokenizer"):
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="decoder"):
        backend.decoder = decoders.WordPiece(prefix="@@")
    with pytest.raises(ValueError, match="train"):
        backend.train_from_iterator(["a b c"])
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # what it runs: allowed, changes nothing
    assert ours(text) == before
    # added through the backend: ours has them, as HF's tokenizer gets them
    hf = transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    for tok in (hf, ours):
        assert tok.backend_tokenizer.add_tokens(["<new_tok>"]) == 1
        assert tok.backend_tokenizer.add_special_tokens(["<sp>"]) == 1
    t = "a <new_tok>b <sp> c"
    assert ours(t) == dict(hf(t)) and len(ours) == len(hf)
    assert ours.backend_tokenizer.encode(t).ids == ours(t)["input_ids"]
    ours.backend_tokenizer.encode_special_tokens = True
    assert ours.split_special_tokens and ours(t)["input_ids"] == ours(t, split_special_tokens=True)["input_ids"]
    assert ours.backend_tokenizer.encode(t).ids == ours(t)["input_ids"]


def test_backend_tokenizer_without_tokenizers_is_a_clear_error(monkeypatch):
    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with pytest.raises(ImportError, match="tokenizers"):
        ours.backend_tokenizer.get_vocab()
    assert ours("Hello")["input_ids"] == [101, 7592, 102]  # the tokenizer itself does not need it


@pytest.mark.parametrize("variant", ["cased", "cased_strip_accents", "no_chinese_split", "uncased"])
def test_tokenizer_file_argument_follows_the_files_normalizer_as_hf(tmp_path, variant):
    """DistilBertTokenizerFast(tokenizer_file=...) runs the file's normalizer settings, as HF's
    does (ours lower-cased a cased tokenizer.json: the constructor's defaults won)."""
    DistilBertTokenizerFast.from_pretrained(reference_vocab_dir(), **VARIANTS[variant]).save_pretrained(tmp_path)
    path = str(tmp_path / "tokenizer.json")
    hf = transformers.DistilBertTokenizerFast(tokenizer_file=path)
    ours = DistilBertTokenizerFast(tokenizer_file=path)
    for text in TEXTS:
        assert ours(text, return_offsets_mapping=True) == dict(hf(text, return_offsets_mapping=True)), text
    assert DistilBertTokenizerFast(tokenizer_file=path, do_lower_case=True).do_lower_case  # an argument wins


def test_backend_tokenizer_copies_and_pickles_as_a_plain_backend():
    """copy.deepcopy / pickle of backend_tokenizer give a tokenizers.Tokenizer of its own (ours
    recursed forever), which transformers' PreTrainedTokenizerFast(tokenizer_object=...) takes."""
    import copy
    import pickle

    ours = DistilBertTokenizerFast.from_pretrained(reference_vocab_dir())
    ours.backend_tokenizer.no_padding()
    for clone in (copy.deepcopy(ours.backend_tokenizer), copy.copy(ours.backend_tokenizer),
                  pickle.loads(pickle.dumps(ours.backend_tokenizer))):
        assert type(clone) is tokenizers.Tokenizer
        assert clone.encode(TEXTS[2], TEXTS[1]).ids == ours(TEXTS[2], TEXTS[1])["input_ids"]
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend_tokenizer)
    assert wrapped(TEXTS[2])["input_ids"] == ours(TEXTS[2])["input_ids"]
    assert "encode" in dir(ours.backend_tokenizer) and not hasattr(ours.backend_tokenizer, "no_such_thing")
