"""More of the ecosystem's own clients, each run twice on the same weights: once with
transformers' classes and tokenizer, once with ours (our model class and our tokenizer in their
place), and the results compared: sentence-transformers (CrossEncoder predict / rank / training /
save and load, SentenceTransformer's encode options, SparseEncoder), transformers' pipelines with
their less common options, and Trainer options.

Tiny random DistilBERTs on the real uncased vocab (tests/conftest.py's fixture), so the real
tokenizer's ids fit; initializer_range is large enough that outputs differ from text to text.
"""

import copy

import pytest
import torch

from conftest import assert_close, reference_vocab_dir

import distilbert_fast

transformers = pytest.importorskip("transformers")

VOCAB = 30522
TINY = dict(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=128,
            initializer_range=0.2)
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
QUERY = "Where is Paris?"
DOCS = ["Paris is the capital of France.", "A man is eating food.", "hi",
        "The Eiffel tower stands in Paris, France, a city on the Seine. " * 2]


def _save_hf(class_name, path, **overrides):
    """A tiny random transformers model of ``class_name`` and transformers' tokenizer (real vocab),
    saved in ``path``; returns the model."""
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(transformers.DistilBertConfig(**{**TINY, **overrides})).eval()
    model.save_pretrained(path)
    transformers.DistilBertTokenizerFast.from_pretrained(reference_vocab_dir()).save_pretrained(path)
    return model


def _ours_in(module, class_name, path):
    """A sentence-transformers Transformer module running our class and our tokenizer, loaded
    from the same folder as transformers' ones it replaces."""
    max_seq_length = module.max_seq_length  # (sentence-transformers capped its own tokenizer's at the model's)
    module.model = getattr(distilbert_fast, class_name).from_pretrained(path)
    module.processor = distilbert_fast.DistilBertTokenizerFast.from_pretrained(path)
    module.max_seq_length = max_seq_length
    return module


# -- Trainer ---------------------------------------------------------------------------------------


class _Rows(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n=12):
        texts = [DOCS[i % len(DOCS)] + f" number {i}" for i in range(n)]
        self.rows = [dict(tokenizer(t, truncation=True, max_length=24), labels=i % 2) for i, t in enumerate(texts)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _train_both(tmp_path, make_args, class_name="DistilBertForSequenceClassification", collator=None,
                model_overrides=None, optimized=False, **trainer_kwargs):
    """Trains transformers' model with its tokenizer and ours with ours (or, optimized,
    transformers' model after optimize() with our tokenizer) from the same weights and seed;
    returns the two trainers."""
    pytest.importorskip("accelerate")
    path = tmp_path / "hf"
    _save_hf(class_name, path, **{**NO_DROPOUT, **(model_overrides or {})})
    trainers = []
    for lib in (transformers, distilbert_fast):
        model = getattr(transformers if optimized else lib, class_name).from_pretrained(path)
        if optimized and lib is distilbert_fast:
            distilbert_fast.optimize(model)
        tokenizer = lib.DistilBertTokenizerFast.from_pretrained(path)
        data = _Rows(tokenizer)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / lib.__name__), report_to=[], use_cpu=True,
                                              seed=0, save_strategy="no", **make_args())
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                       data_collator=collator(tokenizer) if collator else
                                       transformers.DataCollatorWithPadding(tokenizer), **trainer_kwargs)
        trainer.train()
        trainers.append(trainer)
    return trainers


def _logged(trainer, key):
    return [log[key] for log in trainer.state.log_history if key in log]


@pytest.mark.parametrize("optimized", [False, True], ids=["ours", "optimized"])
def test_evaluation_after_fused_optimizer_steps_like_transformers(optimized, tmp_path):
    """The Trainer's default optimizer is torch's fused AdamW, which writes the parameters in place
    without bumping their version counters: our fused-QKV weight, cached for no-grad forwards,
    went stale, so evaluation during and after training used the weights of the first
    evaluation. Losses, eval losses and predictions equal transformers' run."""
    theirs, ours = _train_both(tmp_path, lambda: dict(
        per_device_train_batch_size=4, per_device_eval_batch_size=4, num_train_epochs=2, learning_rate=1e-2,
        logging_steps=1, eval_strategy="steps", eval_steps=2), optimized=optimized)
    assert ours.args.optim == "adamw_torch_fused"
    assert _logged(ours, "loss") == pytest.approx(_logged(theirs, "loss"), rel=1e-4)
    assert len(_logged(ours, "eval_loss")) == 3
    assert _logged(ours, "eval_loss") == pytest.approx(_logged(theirs, "eval_loss"), rel=1e-4)
    expected = torch.as_tensor(theirs.predict(theirs.eval_dataset).predictions)
    assert_close(torch.as_tensor(ours.predict(ours.eval_dataset).predictions), expected, atol=1e-4)


def test_gradient_accumulation_averages_over_the_accumulated_batch(tmp_path):
    """gradient_accumulation_steps=2 with batches of 2 trains ours as batches of 4 do (SGD: the
    same logged losses and weights): the Trainer divides our loss by the steps, since our forward
    takes no **kwargs. (transformers' DistilBERT takes **kwargs but ignores num_items_in_batch,
    so there the Trainer leaves its loss undivided: twice the batch's mean here; see README.)"""
    pytest.importorskip("accelerate")
    path = tmp_path / "hf"
    _save_hf("DistilBertForSequenceClassification", path, **NO_DROPOUT)
    runs = []
    for batch, steps in ((4, 1), (2, 2)):
        model = distilbert_fast.DistilBertForSequenceClassification.from_pretrained(path)
        tokenizer = distilbert_fast.DistilBertTokenizerFast.from_pretrained(path)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / f"run{batch}"), report_to=[], use_cpu=True, seed=0, save_strategy="no",
            per_device_train_batch_size=batch, gradient_accumulation_steps=steps, max_steps=3, optim="sgd",
            learning_rate=0.5, logging_steps=1)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows(tokenizer),
                                       data_collator=transformers.DataCollatorWithPadding(tokenizer))
        trainer.train()
        runs.append((_logged(trainer, "loss"), model.classifier.weight.detach().clone()))
    (losses, weight), (accumulated, accumulated_weight) = runs
    assert len(losses) == 3 and accumulated == pytest.approx(losses, rel=1e-5)
    assert_close(accumulated_weight, weight, atol=1e-5)


# -- sentence-transformers: CrossEncoder -----------------------------------------------------------


def _cross_encoders(tmp_path, num_labels):
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.cross_encoder import CrossEncoder

    path = tmp_path / f"hf{num_labels}"
    _save_hf("DistilBertForSequenceClassification", path, num_labels=num_labels, **NO_DROPOUT)
    reference = CrossEncoder(str(path), device="cpu")
    ours = CrossEncoder(str(path), device="cpu")
    _ours_in(ours[0], "DistilBertForSequenceClassification", path)
    assert isinstance(ours.model, distilbert_fast.DistilBertForSequenceClassification) and st
    return reference, ours


@pytest.mark.parametrize("num_labels", [1, 3])
def test_cross_encoder_predict_rank_save_load(num_labels, tmp_path):
    """CrossEncoder over our DistilBertForSequenceClassification and our tokenizer: predict (one
    pair, a batch, batch_size 1, softmax, tensors, a shorter max_seq_length), rank, half and
    bfloat16; saved, it loads back in sentence-transformers (transformers' classes) and in ours."""
    from sentence_transformers.cross_encoder import CrossEncoder

    reference, ours = _cross_encoders(tmp_path, num_labels)
    pairs = [(QUERY, doc) for doc in DOCS]
    for kwargs in ({}, {"batch_size": 1}, {"apply_softmax": True}, {"convert_to_tensor": True}):
        expected = torch.as_tensor(reference.predict(pairs, **kwargs))
        assert_close(torch.as_tensor(ours.predict(pairs, **kwargs)), expected, name=str(kwargs))
    assert_close(torch.as_tensor(ours.predict(pairs[0])), torch.as_tensor(reference.predict(pairs[0])))
    if num_labels == 1:
        ranked, expected = ours.rank(QUERY, DOCS, return_documents=True), reference.rank(QUERY, DOCS, return_documents=True)
        assert [(r["corpus_id"], r["text"]) for r in ranked] == [(r["corpus_id"], r["text"]) for r in expected]
        assert [r["score"] for r in ranked] == pytest.approx([r["score"] for r in expected], abs=1e-5)
    for dtype, atol in ((torch.float16, 5e-3), (torch.bfloat16, 3e-2)):
        got = torch.as_tensor(copy.deepcopy(ours).to(dtype).predict(pairs))
        assert_close(got, torch.as_tensor(copy.deepcopy(reference).to(dtype).predict(pairs)), atol=atol, name=str(dtype))
    reference.max_seq_length = ours.max_seq_length = 10
    expected = torch.as_tensor(reference.predict(pairs))
    assert_close(torch.as_tensor(ours.predict(pairs)), expected, name="max_seq_length 10")
    ours.save_pretrained(str(tmp_path / "saved"))
    reloaded = CrossEncoder(str(tmp_path / "saved"), device="cpu")
    reloaded.max_seq_length = 10
    assert_close(torch.as_tensor(reloaded.predict(pairs)), expected, name="reloaded")
    again = distilbert_fast.DistilBertForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert_close(again.state_dict()["classifier.weight"], ours.model.state_dict()["classifier.weight"], atol=0.0)


def test_cross_encoder_trainer_like_transformers(tmp_path):
    """CrossEncoderTrainer (BinaryCrossEntropyLoss, evaluation every 2 steps, the Trainer's fused
    AdamW) trains ours as it trains transformers' model: the same losses, eval losses and
    predictions after training, and the saved model predicts the same once reloaded."""
    datasets = pytest.importorskip("datasets")
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    data = datasets.Dataset.from_dict({"query": [QUERY] * 8, "doc": DOCS * 2, "label": [1.0, 0.0, 0.0, 1.0] * 2})
    pairs = [(QUERY, doc) for doc in DOCS]
    runs = []
    for model in _cross_encoders(tmp_path, 1):
        args = CrossEncoderTrainingArguments(
            output_dir=str(tmp_path / f"run{len(runs)}"), per_device_train_batch_size=4, per_device_eval_batch_size=4,
            num_train_epochs=2, learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
            seed=0, eval_strategy="steps", eval_steps=2)
        trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                                      loss=BinaryCrossEntropyLoss(model))
        trainer.train()
        runs.append((trainer, torch.as_tensor(model.predict(pairs))))
    (theirs, expected), (ours, got) = runs
    assert _logged(ours, "loss") == pytest.approx(_logged(theirs, "loss"), rel=1e-4)
    assert _logged(ours, "eval_loss") == pytest.approx(_logged(theirs, "eval_loss"), rel=1e-4)
    assert_close(got, expected, atol=1e-5)
    ours.model.save_pretrained(str(tmp_path / "trained"))
    assert_close(torch.as_tensor(CrossEncoder(str(tmp_path / "trained"), device="cpu").predict(pairs)), expected,
                 atol=1e-5, name="reloaded")


# -- sentence-transformers: SentenceTransformer and SparseEncoder ----------------------------------


def _sentence_transformers(tmp_path):
    """SentenceTransformer(Transformer + mean Pooling, with prompts) on transformers' DistilBertModel,
    and the same on ours with our tokenizer."""
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Pooling, Transformer

    path = tmp_path / "hf"
    _save_hf("DistilBertModel", path)
    prompts = {"query": "query: ", "passage": "passage: "}
    models = [st.SentenceTransformer(modules=[Transformer(str(path)), Pooling(TINY["dim"], "mean")], device="cpu",
                                     prompts=prompts) for _ in range(2)]
    _ours_in(models[1][0], "DistilBertModel", path)
    return models


def test_sentence_transformer_encode_options_save_load(tmp_path):
    """encode with token embeddings (ragged rows, several batch sizes), prompts, truncate_dim,
    normalisation, int8 precision, half and bfloat16, on our class and tokenizer as on
    transformers'; saved, the folder loads back in sentence-transformers."""
    st = pytest.importorskip("sentence_transformers")
    reference, ours = _sentence_transformers(tmp_path)
    assert ours.max_seq_length == reference.max_seq_length == TINY["max_position_embeddings"]
    texts = DOCS + ["x", "a long text " * 100]  # (truncated at max_seq_length)
    for kwargs in ({}, {"batch_size": 2}, {"prompt_name": "query"}, {"prompt": "search: "}, {"truncate_dim": 8},
                   {"normalize_embeddings": True}):
        expected = reference.encode(texts, convert_to_tensor=True, **kwargs)
        assert_close(ours.encode(texts, convert_to_tensor=True, **kwargs), expected, name=str(kwargs))
    assert_close(ours.encode_query(texts, convert_to_tensor=True), reference.encode_query(texts, convert_to_tensor=True))
    for batch_size in (1, 3):
        expected = reference.encode(texts, output_value="token_embeddings", batch_size=batch_size)
        got = ours.encode(texts, output_value="token_embeddings", batch_size=batch_size)
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
        for g, e in zip(got, expected):
            assert_close(g, e, name="token embeddings")
    quantized = [torch.as_tensor(m.encode(texts, precision="int8")).int() for m in (reference, ours)]
    assert (quantized[1] - quantized[0]).abs().max() <= 1  # (a rounding at a bucket's edge may differ)
    exact = reference.encode(texts, convert_to_tensor=True)
    for dtype in (torch.float16, torch.bfloat16):
        theirs = copy.deepcopy(reference).to(dtype).encode(texts, convert_to_tensor=True).float()
        got = copy.deepcopy(ours).to(dtype).encode(texts, convert_to_tensor=True).float()
        # our error against float32 at most ~2x theirs
        assert (got - exact).abs().max() <= 2 * (theirs - exact).abs().max() + 1e-3, dtype
    ours.save(str(tmp_path / "saved"))
    reloaded = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    assert reloaded.prompts["query"] == "query: "
    assert_close(reloaded.encode(texts, convert_to_tensor=True), exact)


def test_sentence_transformer_multi_process_pool(tmp_path):
    """encode over a pool of worker processes (the model and tokenizer pickled to each): ours as
    transformers' in one process."""
    reference, ours = _sentence_transformers(tmp_path)
    texts = DOCS * 3
    expected = reference.encode(texts, convert_to_tensor=True)
    pool = ours.start_multi_process_pool(["cpu"])  # one worker process: pickling is what is tested
    try:
        got = ours.encode(texts, pool=pool, batch_size=2, chunk_size=4)
    finally:
        ours.stop_multi_process_pool(pool)
    assert_close(torch.as_tensor(got), expected)


def test_sparse_encoder_splade_over_our_masked_lm(tmp_path):
    """SparseEncoder (SPLADE: the fill-mask Transformer module + SpladePooling) over our
    DistilBertForMaskedLM and tokenizer: the same sparse vectors, decoded terms and saved folder
    as over transformers'."""
    st = pytest.importorskip("sentence_transformers")
    if not hasattr(st, "SparseEncoder"):
        pytest.skip("this sentence-transformers has no SparseEncoder")
    from sentence_transformers.models import Transformer
    from sentence_transformers.sparse_encoder.modules import SpladePooling

    path = tmp_path / "hf"
    _save_hf("DistilBertForMaskedLM", path)
    models = [st.SparseEncoder(modules=[Transformer(str(path), transformer_task="fill-mask"), SpladePooling("max")],
                               device="cpu") for _ in range(2)]
    reference, ours = models
    _ours_in(ours[0], "DistilBertForMaskedLM", path)
    for kwargs in ({}, {"batch_size": 1}, {"max_active_dims": 10}):
        expected = reference.encode(DOCS, **kwargs).to_dense()
        got = ours.encode(DOCS, **kwargs).to_dense()
        assert torch.equal(got != 0, expected != 0), kwargs
        assert_close(got, expected, name=str(kwargs))
    terms = [t for t, _ in reference.decode(reference.encode(DOCS[0]), top_k=5)]
    assert [t for t, _ in ours.decode(ours.encode(DOCS[0]), top_k=5)] == terms
    ours.save(str(tmp_path / "saved"))
    reloaded = st.SparseEncoder(str(tmp_path / "saved"), device="cpu")
    assert_close(reloaded.encode(DOCS).to_dense(), reference.encode(DOCS).to_dense())


# -- PEFT ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimized", [False, True], ids=["ours", "optimized"])
@pytest.mark.parametrize("forward_while_wrapped", [False, True])
def test_peft_merge_and_unload_after_inference_like_transformers(optimized, forward_while_wrapped):
    """A LoRA merged into q/k/v (merge_and_unload, which writes the weights through .data: no
    version counter sees it) after the model ran inference (which cached our fused q/k/v
    weight): the merged model's outputs are transformers' merged model's, not the old weights'."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = {**TINY, "vocab_size": 100}
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(**config)).eval()
    if optimized:
        ours = distilbert_fast.optimize(copy.deepcopy(hf))
    else:
        ours = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**config)).eval()
        ours.load_state_dict(hf.state_dict())
    ids = torch.tensor([[1, 5, 7, 9, 2], [1, 8, 2, 0, 0]])
    mask = (ids != 0).long()
    outputs = []
    for model in (hf, ours):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # caches our stacked q/k/v weight
        torch.manual_seed(1)
        lora = peft.LoraConfig(r=4, target_modules=["q_lin", "k_lin", "v_lin"], init_lora_weights=False)
        wrapped = peft.get_peft_model(model, lora)
        if forward_while_wrapped:
            with torch.no_grad():
                wrapped(input_ids=ids, attention_mask=mask)
        merged = wrapped.merge_and_unload()
        with torch.no_grad():
            outputs.append(merged(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None])
    assert_close(outputs[1], outputs[0])
