"""The ecosystem's own clients calling our tokenizer as they call HF's: transformers' data collators,
``pipeline`` (text-classification, feature-extraction, fill-mask, token-classification) with HF's
model, and sentence-transformers. Each client runs twice, once with HF's DistilBertTokenizerFast
and once with ours (same vocab), and the results must be identical.
"""

import pickle

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from conftest import reference_vocab_dir  # noqa: E402

from distilbert_fast import DistilBertTokenizerFast  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "Ünïcödé text: café naïve résumé, 中文 and emoji 👍.",
    "unaffable tokenization of an unbelievably long word: pneumonoultramicroscopic",
    "a",
    "Paris is the capital of France and Berlin is the capital of Germany.",
]


@pytest.fixture(scope="module")
def both():
    """(HF's tokenizer, ours) on the real uncased vocab."""
    path = reference_vocab_dir()
    return transformers.DistilBertTokenizerFast.from_pretrained(path), DistilBertTokenizerFast.from_pretrained(path)


def _assert_same(a, b, where=""):
    """Equal nested outputs: dicts, lists, tensors, arrays, numbers (exactly, same types)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, dict) or hasattr(a, "keys"):
        assert sorted(a.keys()) == sorted(b.keys()), where
        for key in a.keys():
            _assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


# -- data collators ---------------------------------------------------------------------------------


def _features(tok, **kwargs):
    """A dataset's rows: what dataset.map(tokenizer) stores (plain dicts of lists)."""
    return [dict(tok(text, **kwargs)) for text in TEXTS]


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(pad_to_multiple_of=8),
    dict(padding="max_length", max_length=48),
    dict(return_tensors="np"),
])
def test_data_collator_with_padding(both, kwargs):
    results = []
    for tok in both:
        features = [{**f, "label": i % 2} for i, f in enumerate(_features(tok, return_token_type_ids=True,
                                                                            return_special_tokens_mask=True))]
        results.append(transformers.DataCollatorWithPadding(tok, **kwargs)(features))
    _assert_same(*results)
    assert results[1]["input_ids"].shape[1] == (48 if "max_length" in kwargs else 32 if "pad_to_multiple_of" in kwargs
                                                else max(len(f["input_ids"]) for f in _features(both[1])))


@pytest.mark.parametrize("mlm", [True, False])
@pytest.mark.parametrize("as_dicts", [True, False])
def test_data_collator_for_language_modeling(both, mlm, as_dicts):
    results = []
    for tok in both:
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=mlm, mlm_probability=0.3, seed=7,
                                                                pad_to_multiple_of=4)
        features = _features(tok) if as_dicts else [f["input_ids"] for f in _features(tok)]
        results.append(collator(features))
    _assert_same(*results)
    batch = results[1]
    if mlm:  # masked positions carry labels, special tokens are never masked
        assert (batch["labels"] != -100).any()
        assert not ((batch["labels"] != -100) & torch.isin(batch["labels"], torch.tensor(both[1].all_special_ids))).any()


def test_data_collator_for_language_modeling_whole_word_mask(both):
    results = []
    for tok in both:
        collator = transformers.DataCollatorForLanguageModeling(tok, mlm=True, whole_word_mask=True, seed=3,
                                                                mlm_probability=0.4)
        features = [tok(t, padding="max_length", max_length=40, return_offsets_mapping=True,
                        return_special_tokens_mask=True) for t in TEXTS]
        results.append(collator([dict(f) for f in features]))
    _assert_same(*results)


def test_data_collator_for_token_classification(both):
    results = []
    for tok in both:
        features = []
        for text in TEXTS:
            enc = tok(text)
            # one label per word, -100 on special tokens, as the token-classification examples align them
            labels = [-100 if w is None else w % 3 for w in enc.word_ids()]
            features.append({**dict(enc), "labels": labels})
        results.append(transformers.DataCollatorForTokenClassification(tok, pad_to_multiple_of=8)(features))
    _assert_same(*results)
    assert (results[1]["labels"][results[1]["attention_mask"] == 0] == -100).all()


def test_collator_in_dataloader_workers(both):
    """A DataLoader worker returns the collated BatchEncoding to the main process by pickling it."""
    ours = both[1]
    features = _features(ours)
    loader = torch.utils.data.DataLoader(features, batch_size=3, num_workers=1,
                                         collate_fn=transformers.DataCollatorWithPadding(ours))
    batches = list(loader)
    assert len(batches) == 2 and batches[0]["input_ids"].shape[0] == 3
    expected = transformers.DataCollatorWithPadding(ours)(features[:3])
    _assert_same(dict(batches[0]), dict(expected))


def test_tokenizer_and_encodings_pickle(both):
    ours = both[1]
    again = pickle.loads(pickle.dumps(ours))
    enc = ours(TEXTS[:2], ["a pair", "another one"], padding=True, return_offsets_mapping=True)
    _assert_same(dict(again(TEXTS[:2], ["a pair", "another one"], padding=True, return_offsets_mapping=True)),
                 dict(enc))
    back = pickle.loads(pickle.dumps(enc))
    _assert_same(dict(back), dict(enc))
    assert back.word_ids(1) == enc.word_ids(1) and back.char_to_token(1, 3, 1) == enc.char_to_token(1, 3, 1)
    single = pickle.loads(pickle.dumps(ours("Hello world")))  # the fast path's lazy rows
    assert single.word_ids() == [None, 0, 1, None] and single.tokens() == ["[CLS]", "hello", "world", "[SEP]"]


# -- pipelines (HF's model, either tokenizer) -------------------------------------------------------


def _tiny_model(class_name, num_labels=None):
    config = transformers.DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=37,
                                           max_position_embeddings=128)
    if num_labels:
        config.num_labels = num_labels
        config.id2label = {i: f"L{i}" for i in range(num_labels)}
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(0)
    return getattr(transformers, class_name)(config).eval()


def _run_pipeline(both, task, model, inputs, **call_kwargs):
    results = []
    for tok in both:
        pipe = transformers.pipeline(task, model=model, tokenizer=tok, device="cpu")
        results.append(pipe(inputs, **call_kwargs))
    return results


@pytest.mark.parametrize("batch_size", [1, 4])
def test_text_classification_pipeline(both, batch_size):
    model = _tiny_model("DistilBertForSequenceClassification", num_labels=3)
    a, b = _run_pipeline(both, "text-classification", model, TEXTS, top_k=None, batch_size=batch_size)
    _assert_same(a, b)
    a, b = _run_pipeline(both, "text-classification", model, [{"text": TEXTS[0], "text_pair": TEXTS[1]}])
    _assert_same(a, b)


@pytest.mark.parametrize("multi_label", [False, True])
def test_zero_shot_classification_pipeline(both, multi_label):
    """The zero-shot pipeline hands the tokenizer a batch of [premise, hypothesis] lists."""
    model = _tiny_model("DistilBertForSequenceClassification", num_labels=3)
    model.config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    a, b = _run_pipeline(both, "zero-shot-classification", model, TEXTS[:3], candidate_labels=["sports", "politics"],
                         multi_label=multi_label)
    _assert_same(a, b)


def test_batch_items_as_pairs_like_huggingface(both):
    hf, ours = both
    for batch in ([[TEXTS[0], TEXTS[1]], (TEXTS[2], TEXTS[3])], [TEXTS[0], (TEXTS[1], TEXTS[2])]):
        for kwargs in ({}, {"padding": True, "return_tensors": "pt"}, {"truncation": True, "max_length": 12}):
            _assert_same(ours(batch, **kwargs), hf(batch, **kwargs), where=f"{batch!r} {kwargs}")
    with pytest.raises(TypeError, match="is_split_into_words"):
        ours([["a", "b", "c"]])


def test_feature_extraction_pipeline(both):
    model = _tiny_model("DistilBertModel")
    a, b = _run_pipeline(both, "feature-extraction", model, TEXTS, batch_size=2, tokenize_kwargs={"truncation": True})
    _assert_same(a, b)
    a, b = _run_pipeline(both, "feature-extraction", model, TEXTS[0], return_tensors=True)
    _assert_same(a, b)


def test_fill_mask_pipeline(both):
    model = _tiny_model("DistilBertForMaskedLM")
    texts = ["Paris is the [MASK] of France.", "The [MASK] brown fox."]
    a, b = _run_pipeline(both, "fill-mask", model, texts, top_k=3)
    _assert_same(a, b)
    a, b = _run_pipeline(both, "fill-mask", model, texts[0], targets=["capital", "city"])
    _assert_same(a, b)


@pytest.mark.parametrize("aggregation_strategy", ["none", "simple", "first", "average", "max"])
def test_token_classification_pipeline(both, aggregation_strategy):
    model = _tiny_model("DistilBertForTokenClassification", num_labels=5)
    model.config.id2label = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    a, b = _run_pipeline(both, "token-classification", model, TEXTS, aggregation_strategy=aggregation_strategy)
    _assert_same(a, b)


def test_token_classification_pipeline_stride_and_words(both):
    model = _tiny_model("DistilBertForTokenClassification", num_labels=3)
    path = reference_vocab_dir()
    short = (transformers.DistilBertTokenizerFast.from_pretrained(path, model_max_length=12),
             DistilBertTokenizerFast.from_pretrained(path, model_max_length=12))
    long_text = " ".join(TEXTS)
    a, b = _run_pipeline(short, "token-classification", model, long_text, aggregation_strategy="first", stride=4)
    _assert_same(a, b)
    words = ["Paris", "is", "in", "France", "unaffable"]
    a, b = _run_pipeline(both, "token-classification", model, words, is_split_into_words=True,
                         aggregation_strategy="simple")
    _assert_same(a, b)


def test_pipeline_save_pretrained_writes_our_tokenizer(tmp_path, both):
    model = _tiny_model("DistilBertForSequenceClassification", num_labels=2)
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=both[1], device="cpu")
    pipe.save_pretrained(tmp_path)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same(dict(reloaded(TEXTS)), dict(both[1](TEXTS)))


# -- sentence-transformers --------------------------------------------------------------------------


@pytest.mark.parametrize("input_names", [None, ["input_ids", "token_type_ids", "attention_mask"]])
def test_sentence_transformers_encode_with_our_tokenizer(tmp_path, input_names):
    """The real all-MiniLM-L6-v2 checkpoint (a BERT) in sentence-transformers with our tokenizer:
    the same features (with BERT's model_input_names) and the same embeddings (with DistilBERT's,
    token_type_ids being all zeros anyway)."""
    st = pytest.importorskip("sentence_transformers")
    path = reference_vocab_dir()
    reference = st.SentenceTransformer(path, device="cpu")
    expected = reference.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    model = st.SentenceTransformer(path, device="cpu")
    kwargs = {} if input_names is None else dict(model_input_names=input_names)
    ours = DistilBertTokenizerFast.from_pretrained(path, model_max_length=reference.max_seq_length, **kwargs)
    assert isinstance(ours, transformers.PreTrainedTokenizerBase)  # sentence-transformers checks it
    model[0].processor = ours  # (sentence-transformers 5+: the module's tokenizer is its processor)
    assert model.tokenizer is ours and model.max_seq_length == reference.max_seq_length
    if input_names is not None:
        _assert_same(model.preprocess(TEXTS), reference.preprocess(TEXTS))
    got = model.encode(TEXTS, batch_size=4, convert_to_tensor=True)
    assert torch.equal(got, expected)
    # saved with our tokenizer's files, the folder loads back in sentence-transformers
    model.save(str(tmp_path))
    reloaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    assert torch.equal(reloaded.encode(TEXTS, batch_size=4, convert_to_tensor=True), expected)


# -- datasets ---------------------------------------------------------------------------------------


def test_datasets_map_fingerprints_our_tokenizer_as_hfs(both):
    """Dataset.map's cache key hashes the function with the tokenizer in it, by pickling a
    transformers tokenizer's __dict__ (our C++ core does not pickle: datasets fell back to a
    random hash, so a rerun never found its cache). Ours now hashes: the same for the same vocab
    and settings, whatever calls it has served, and otherwise different; map gives HF's columns."""
    datasets = pytest.importorskip("datasets")
    from datasets.fingerprint import Hasher

    hf, ours = both
    path = reference_vocab_dir()
    fresh = DistilBertTokenizerFast.from_pretrained(path)
    expected = Hasher.hash(fresh)
    assert Hasher.hash(DistilBertTokenizerFast.from_pretrained(path)) == expected
    fresh("a b"), fresh("a b", truncation=True, max_length=8), fresh(["c", "d"], padding=True)
    fresh("e", split_special_tokens=True), fresh.backend_tokenizer
    assert Hasher.hash(fresh) == expected
    assert Hasher.hash(DistilBertTokenizerFast.from_pretrained(path, do_lower_case=False)) != expected
    fresh.add_tokens(["<new_tok>"])
    assert Hasher.hash(fresh) != expected
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert (Hasher.hash(DistilBertTokenizerFast(vocab=specials + ["a"]))
            != Hasher.hash(DistilBertTokenizerFast(vocab=specials + ["b"])))
    data = datasets.Dataset.from_dict({"text": TEXTS})
    maps = {}
    for name, tok in (("hf", hf), ("ours", ours), ("ours again", DistilBertTokenizerFast.from_pretrained(path))):
        maps[name] = data.map(lambda batch: tok(batch["text"], truncation=True, max_length=16), batched=True)
    assert maps["ours"]._fingerprint == maps["ours again"]._fingerprint  # (a random hash differs each time)
    assert maps["ours"].to_dict() == maps["hf"].to_dict()
