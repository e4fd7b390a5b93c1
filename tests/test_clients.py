"""The ecosystem's own clients run our classes (and transformers' classes after optimize()):
transformers.Trainer, pipeline (four tasks), the data collators, sentence-transformers, PEFT.

Tokenizer: transformers' BertTokenizerFast on the real uncased vocab where the client calls
tokenizer API that ours gains in the tokenizer branch (pad, is_fast, ...)."""

import copy
import os

import pytest
import torch

from conftest import CLASS_NAMES, SMALL_CONFIG, assert_close, reference_vocab_dir

import distilbert_fast

transformers = pytest.importorskip("transformers")

VOCAB = 30522  # the real uncased vocab, so the real tokenizer's ids fit
TINY = {**SMALL_CONFIG, "vocab_size": VOCAB, "max_position_embeddings": 128}
TEXTS = ["A man is eating food.", "The new movie is awesome!", "hi", "Paris is the capital of France."]


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(reference_vocab_dir())


# HF tokenizer API the clients call that our tokenizer gains in the tokenizer branch (#14 part 3)
_CLIENT_TOKENIZER_API = ("pad", "is_fast", "encode_plus", "batch_encode_plus")


@pytest.fixture(params=["hf", "ours"], ids=["hf-tokenizer", "our-tokenizer"])
def tokenizer(request, hf_tokenizer):
    """The client's tokenizer: transformers' BertTokenizerFast, or ours on the same vocab (skipped
    until ours has the API the clients call)."""
    if request.param == "hf":
        return hf_tokenizer
    ours = distilbert_fast.DistilBertTokenizer.from_pretrained(reference_vocab_dir())
    missing = [name for name in _CLIENT_TOKENIZER_API if not hasattr(ours, name)]
    if missing:
        pytest.skip(f"our tokenizer lacks {missing} (the tokenizer branch adds them)")
    return ours


def pair(class_name, **overrides):
    """(transformers model, our model) with the same tiny random weights."""
    config = {**TINY, **overrides}
    hf = getattr(transformers, class_name)(transformers.DistilBertConfig(**config)).eval()
    ours = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_dynamic_quantization_like_transformers(class_name):
    """torch.ao.quantization.quantize_dynamic, the usual CPU speed-up for a BERT-family model,
    replaces every nn.Linear: ours then runs those layers as modules, as close to transformers'
    quantized model as that is to transformers' float model, at most (batches without padding:
    with padding, transformers' activation scales also see the padding rows, ours only real
    tokens; and a float difference of 1e-7 may flip an activation's int8 rounding)."""
    hf, ours = pair(class_name)
    ids = torch.randint(5, TINY["vocab_size"], (2, 4, 9) if "MultipleChoice" in class_name else (3, 9))
    hf_float = hf(input_ids=ids).to_tuple()
    hf_q, ours_q = (torch.ao.quantization.quantize_dynamic(m, {torch.nn.Linear}, dtype=torch.qint8) for m in (hf, ours))
    assert type(ours_q.get_submodule(_a_linear(ours_q))).__module__.startswith("torch.ao.nn.quantized")
    for got, expected, unquantized in zip(ours_q(input_ids=ids).to_tuple(), hf_q(input_ids=ids).to_tuple(), hf_float):
        quantization_error = (expected - unquantized).abs().max().item()
        assert_close(got, expected, atol=quantization_error + 1e-6)


def _a_linear(model):
    return next(name for name, m in model.named_modules() if name.endswith("ffn.lin1"))


# -- the compatibility surface those clients call --------------------------------------------------


def test_model_takes_a_bert_tokenizers_output(hf_tokenizer):
    hf, ours = pair("DistilBertModel")
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt", return_offsets_mapping=True,
                         return_special_tokens_mask=True)
    assert "token_type_ids" in batch and "offset_mapping" in batch
    mask = batch["attention_mask"].bool()
    assert_close(ours(**batch).last_hidden_state[mask], hf(**batch).last_hidden_state[mask])


def test_transformers_config_is_accepted():
    hf_config = transformers.DistilBertConfig(**TINY)
    model = distilbert_fast.DistilBertModel(hf_config)
    assert isinstance(model.config, distilbert_fast.DistilBertConfig)
    assert model.config.dim == TINY["dim"] and not hasattr(model.config, "transformers_version")
    with pytest.raises(TypeError, match="config must be a DistilBertConfig, got BertConfig"):
        distilbert_fast.DistilBertModel(transformers.BertConfig())


def test_num_parameters_and_checkpointing_keywords():
    hf, ours = pair("DistilBertForMaskedLM")
    for kwargs in ({}, {"only_trainable": True}, {"exclude_embeddings": True}):
        assert ours.num_parameters(**kwargs) == hf.num_parameters(**kwargs), kwargs
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.is_gradient_checkpointing
    with pytest.raises(ValueError, match="every_n_layers must be 1"):
        ours.gradient_checkpointing_enable(every_n_layers=2)


def test_memory_footprint_and_input_require_grads_like_transformers():
    """get_memory_footprint counts as transformers does; enable_input_require_grads (LoRA
    tutorials call it before gradient checkpointing on a frozen model) makes the outputs of a
    frozen model require grad, on the padded and the packed path, and disable undoes it."""
    hf, ours = pair("DistilBertForSequenceClassification")
    for buffers in (True, False):
        assert ours.get_memory_footprint(buffers) == hf.get_memory_footprint(buffers)
    ids = torch.randint(1, 999, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3])
    for model in (hf, ours):
        model.requires_grad_(False)
        model.enable_input_require_grads()
        for kwargs in ({}, {"attention_mask": mask}):
            assert model(input_ids=ids, **kwargs).logits.requires_grad, (type(model).__module__, kwargs)
        model.disable_input_require_grads()
        assert not model(input_ids=ids, attention_mask=mask).logits.requires_grad


def test_init_weights_and_dummy_inputs_like_transformers():
    """init_weights() re-initialises (std = initializer_range, LayerNorm 1/0) and keeps the MLM
    head tied; dummy_inputs is transformers' batch and runs."""
    hf, ours = pair("DistilBertForMaskedLM")
    assert torch.equal(ours.dummy_inputs["input_ids"], hf.dummy_inputs["input_ids"])
    with torch.no_grad():
        for model in (hf, ours):
            for p in model.parameters():
                p.fill_(3.0)
        ours.init_weights()
    weight = ours.distilbert.transformer.layer[0].attention.q_lin.weight
    assert abs(weight.std().item() - ours.config.initializer_range) < 0.2 * ours.config.initializer_range
    assert torch.all(ours.distilbert.transformer.layer[0].sa_layer_norm.weight == 1)
    assert ours.vocab_projector.weight is ours.distilbert.embeddings.word_embeddings.weight
    assert ours(**ours.dummy_inputs).logits.shape == hf(**hf.dummy_inputs).logits.shape


def test_save_and_load_keywords(tmp_path):
    _, ours = pair("DistilBertForSequenceClassification")
    ours.save_pretrained(tmp_path / "a", push_to_hub=False, commit_message="ignored")
    ours.save_pretrained(tmp_path / "b", is_main_process=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="push_to_hub=True is not supported"):
        ours.save_pretrained(tmp_path / "c", push_to_hub=True)
    loaded = distilbert_fast.DistilBertForSequenceClassification.from_pretrained(
        tmp_path / "a", device_map="cpu", low_cpu_mem_usage=True, attn_implementation="sdpa")
    loaded.save_pretrained(tmp_path / "d")
    saved = (tmp_path / "d" / "config.json").read_text()
    for key in ("device_map", "low_cpu_mem_usage", "attn_implementation"):
        assert key not in saved


def test_outputs_are_transformers_model_outputs():
    _, ours = pair("DistilBertForSequenceClassification")
    out = ours(torch.tensor([[1, 2, 3]]))
    assert isinstance(out, transformers.utils.ModelOutput)
    assert isinstance(out, distilbert_fast.SequenceClassifierOutput)
    assert out[0] is out.logits and list(out.keys()) == ["logits"]


# -- Trainer -------------------------------------------------------------------------------------


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, tokenizer, n=16):
        texts = [TEXTS[i % len(TEXTS)] + f" number {i}" for i in range(n)]
        self.items = [dict(tokenizer(t, truncation=True, max_length=32), labels=i % 2) for i, t in enumerate(texts)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _trainer(model, tokenizer, out_dir, masked_lm=False, **args):
    """A Trainer on 16 short texts: sequence labels, or (masked_lm) each token labelled with
    itself (no random masking, so a resumed run can be compared with an uninterrupted one)."""
    pytest.importorskip("accelerate")
    data = _Dataset(tokenizer)
    if masked_lm:
        data.items = [dict(item, labels=list(item["input_ids"])) for item in data.items]
        collator = transformers.DataCollatorForTokenClassification(tokenizer)
    else:
        collator = transformers.DataCollatorWithPadding(tokenizer)
    args = {"save_strategy": "steps", "save_steps": 2, **args}
    arguments = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        num_train_epochs=1, learning_rate=1e-3, report_to=[], use_cpu=True, logging_steps=1, **args)
    return transformers.Trainer(model=model, args=arguments, train_dataset=data, eval_dataset=data,
                                data_collator=collator)


def test_trainer_our_model(tokenizer, tmp_path):
    """train, evaluate, predict, resume from a checkpoint, save; our model."""
    _, ours = pair("DistilBertForSequenceClassification")
    trainer = _trainer(ours, tokenizer, tmp_path / "run", max_steps=4)
    before = {n: p.detach().clone() for n, p in ours.named_parameters()}
    result = trainer.train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    assert any(not torch.equal(before[n], p) for n, p in ours.named_parameters())
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    prediction = trainer.predict(trainer.eval_dataset)
    assert prediction.predictions.shape == (16, 2)
    # resume: a fresh trainer picks up at step 2's checkpoint and finishes at step 4
    _, fresh = pair("DistilBertForSequenceClassification")
    resumed = _trainer(fresh, tokenizer, tmp_path / "run", max_steps=4)
    assert resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")).global_step == 4
    # the trained model saves a folder both libraries load
    ours.save_pretrained(tmp_path / "final")
    ids = torch.tensor([[101, 2023, 2003, 102]])
    theirs = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path / "final").eval()
    again = distilbert_fast.DistilBertForSequenceClassification.from_pretrained(tmp_path / "final")
    assert_close(theirs(ids).logits, ours.eval()(ids).logits)
    assert_close(again(ids).logits, ours(ids).logits, atol=0.0)


def test_trainer_bf16_mixed_precision(tokenizer, tmp_path):
    """TrainingArguments(bf16=True): accelerate runs the forward under autocast and rebuilds the
    output in float32 as type(out)(dict); training and evaluation run, as with HF's model."""
    _, ours = pair("DistilBertForSequenceClassification")
    trainer = _trainer(ours, tokenizer, tmp_path / "run", max_steps=2, bf16=True)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    assert torch.isfinite(torch.tensor(trainer.evaluate()["eval_loss"]))


def test_trainer_neftune_like_transformers(hf_tokenizer, tmp_path):
    """TrainingArguments(neftune_noise_alpha=...): transformers' hook on the input embeddings
    scales its noise by output.size(1) * output.size(2), so it needs the (batch, seq, dim)
    embeddings HF's model gives it (on packed tokens it raised IndexError). Without dropout the
    noise is the run's only randomness: the same losses step by step as transformers' model."""
    no_dropout = dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    losses = []
    for model in pair("DistilBertForSequenceClassification", **no_dropout):
        trainer = _trainer(model.train(), hf_tokenizer, tmp_path / type(model).__module__, max_steps=3,
                           neftune_noise_alpha=5.0, save_strategy="no")
        trainer.train()
        losses.append([log["loss"] for log in trainer.state.log_history if "loss" in log])
    assert len(losses[1]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)


@pytest.mark.parametrize("module_name", ["distilbert.embeddings.word_embeddings",
                                         "distilbert.transformer.layer.1.ffn.lin1",
                                         "distilbert.transformer.layer.0",
                                         "distilbert.transformer.layer.0.attention",
                                         "distilbert.transformer.layer.1.ffn"])
def test_hooks_below_the_base_model_see_what_transformers_gives_them(module_name, hf_tokenizer):
    """A forward hook on a module below the base model sees the tensors transformers' model gives
    it: padded (batch, seq, ...) (the batch then runs padded, not packed), a layer's output a
    tensor as transformers 5's, the attention's and the FFN's outputs with their biases (and the
    FFN's dropout) in; and what it returns changes the outputs as it changes transformers'."""
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    real = batch["attention_mask"].bool()
    hf, ours = pair("DistilBertForSequenceClassification")
    with torch.no_grad():  # (biases start at zero: a bias left out would go unseen)
        for name, parameter in hf.named_parameters():
            if name.endswith("bias"):
                parameter.normal_()
    ours.load_state_dict(hf.state_dict())
    results = []
    for model in (hf, ours):
        seen = []

        def double(module, args, output):  # (the attention returns (output, weights))
            first = output[0] if isinstance(output, tuple) else output
            seen.append(first.detach().clone())
            return (first * 2, *output[1:]) if isinstance(output, tuple) else first * 2

        handle = model.get_submodule(module_name).register_forward_hook(double)
        logits = model(**batch).logits
        handle.remove()
        results.append((seen, logits))
    (hf_seen, hf_logits), (seen, logits) = results
    assert len(seen) == len(hf_seen) == 1 and seen[0].shape == hf_seen[0].shape
    assert seen[0].shape[:2] == real.shape
    assert_close(seen[0][real], hf_seen[0][real])
    assert_close(logits, hf_logits)


def test_enable_input_require_grads_keeps_the_packed_path(hf_tokenizer):
    """enable_input_require_grads' hook (PEFT adds it under gradient checkpointing) only marks the
    embeddings' output as requiring grad: the batch still runs packed (padding positions of the
    hidden states hold the packed path's zeros), with the same outputs."""
    _, ours = pair("DistilBertModel")
    batch = hf_tokenizer(TEXTS, padding=True, return_tensors="pt")
    padding = ~batch["attention_mask"].bool()
    before = ours(**batch).last_hidden_state
    ours.enable_input_require_grads()
    after = ours(**batch).last_hidden_state
    assert torch.equal(after, before) and not after[padding].any()


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "DistilBertForMaskedLM"])
def test_trainer_save_model_loads_in_both_libraries(class_name, hf_tokenizer, tmp_path):
    """Trainer.save_model on our model (a transformers.PreTrainedModel where transformers is
    loaded, so Trainer calls our save_pretrained): config.json and weights that our
    from_pretrained and transformers' Auto and DistilBert* classes load, with equal outputs.
    The masked-LM model has tied weights, which a bare safetensors save refuses."""
    _, ours = pair(class_name)
    assert isinstance(ours, transformers.PreTrainedModel)
    masked_lm = class_name == "DistilBertForMaskedLM"
    trainer = _trainer(ours, hf_tokenizer, tmp_path / "run", masked_lm=masked_lm, max_steps=2)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "config.json").is_file()
    auto = transformers.AutoModelForMaskedLM if masked_lm else transformers.AutoModelForSequenceClassification
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
    mask = (ids != 0).long()
    real = mask.bool() if masked_lm else slice(None)  # token logits at real positions, or per sequence
    expected = ours.eval()(ids, attention_mask=mask).logits[real]
    loaded = [
        getattr(distilbert_fast, class_name).from_pretrained(tmp_path / "saved"),
        getattr(transformers, class_name).from_pretrained(tmp_path / "saved").eval(),
        auto.from_pretrained(tmp_path / "saved").eval(),
    ]
    for model in loaded:
        assert_close(model(ids, attention_mask=mask).logits[real], expected)
    if masked_lm:
        assert loaded[0].vocab_projector.weight is loaded[0].distilbert.embeddings.word_embeddings.weight


def test_trainer_resumes_tied_masked_lm(hf_tokenizer, tmp_path):
    """Our tied DistilBertForMaskedLM checkpoints inside Trainer and resumes from a checkpoint:
    the resumed run ends where the uninterrupted one did, with the weights still tied."""
    _, ours = pair("DistilBertForMaskedLM")
    fresh = copy.deepcopy(ours)
    _trainer(ours, hf_tokenizer, tmp_path / "run", masked_lm=True, max_steps=4).train()
    assert (tmp_path / "run" / "checkpoint-2" / "config.json").is_file()
    resumed = _trainer(fresh, hf_tokenizer, tmp_path / "run", masked_lm=True, max_steps=4)
    assert resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2")).global_step == 4
    assert fresh.vocab_projector.weight is fresh.distilbert.embeddings.word_embeddings.weight
    for (name, a), b in zip(fresh.named_parameters(), ours.parameters()):
        assert_close(a, b, atol=1e-5, name=name)


def test_trainer_optimized_transformers_model(hf_tokenizer, tmp_path):
    """A transformers model after optimize() through Trainer: the full save / load cycle."""
    hf, _ = pair("DistilBertForSequenceClassification")
    distilbert_fast.optimize(hf)
    trainer = _trainer(hf, hf_tokenizer, tmp_path / "run", max_steps=2)
    trainer.train()
    trainer.save_model(tmp_path / "saved")
    ids = torch.tensor([[101, 2023, 2003, 102]])
    theirs = transformers.DistilBertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    ours = distilbert_fast.DistilBertForSequenceClassification.from_pretrained(tmp_path / "saved")
    assert_close(ours(ids).logits, hf.eval()(ids).logits)
    assert_close(theirs(ids).logits, hf(ids).logits)


# -- pipelines -----------------------------------------------------------------------------------


@pytest.mark.parametrize("task, class_name", [
    ("text-classification", "DistilBertForSequenceClassification"),
    ("feature-extraction", "DistilBertModel"),
    ("fill-mask", "DistilBertForMaskedLM"),
    ("token-classification", "DistilBertForTokenClassification"),
])
@pytest.mark.parametrize("optimized", [False, True], ids=["ours", "optimized"])
def test_pipeline(task, class_name, optimized, tokenizer, hf_tokenizer):
    hf, ours = pair(class_name)
    reference = transformers.pipeline(task, model=copy.deepcopy(hf), tokenizer=hf_tokenizer, device="cpu")
    model = distilbert_fast.optimize(hf) if optimized else ours
    pipe = transformers.pipeline(task, model=model, tokenizer=tokenizer, device="cpu")
    texts = ["Paris is the [MASK] of France.", "The [MASK] is awesome!"] if task == "fill-mask" else TEXTS
    expected, actual = reference(texts), pipe(texts)
    if task == "feature-extraction":
        for a, b in zip(actual, expected):
            assert_close(torch.tensor(a), torch.tensor(b))
    elif task == "fill-mask":
        for a, b in zip(actual, expected):
            assert [x["token"] for x in a] == [x["token"] for x in b]
            assert_close(torch.tensor([x["score"] for x in a]), torch.tensor([x["score"] for x in b]))
    else:
        assert len(actual) == len(expected)
        for a, b in zip(actual, expected):
            a, b = (a, b) if isinstance(a, list) else ([a], [b])
            assert [x.get("label", x.get("entity")) for x in a] == [x.get("label", x.get("entity")) for x in b]
            assert_close(torch.tensor([x["score"] for x in a]), torch.tensor([x["score"] for x in b]))


# -- data collators ------------------------------------------------------------------------------


@pytest.mark.parametrize("collator, class_name", [
    ("DataCollatorWithPadding", "DistilBertForSequenceClassification"),
    ("DataCollatorForLanguageModeling", "DistilBertForMaskedLM"),
    ("DataCollatorForTokenClassification", "DistilBertForTokenClassification"),
])
def test_collators_feed_our_model(collator, class_name, tokenizer, hf_tokenizer):
    """The collator with the given tokenizer feeds our model; transformers' model gets the
    collator's batch from transformers' tokenizer (same seed): the same loss."""
    hf, ours = pair(class_name)

    def batch(tok):
        features = [dict(tok(t)) for t in TEXTS]
        if collator == "DataCollatorWithPadding":
            features = [dict(f, labels=i % 2) for i, f in enumerate(features)]
        elif collator == "DataCollatorForTokenClassification":
            features = [dict(f, labels=[i % 2] * len(f["input_ids"])) for i, f in enumerate(features)]
        torch.manual_seed(0)
        return getattr(transformers, collator)(tok)(features)

    assert_close(ours(**batch(tokenizer)).loss, hf(**batch(hf_tokenizer)).loss)


# -- sentence-transformers -------------------------------------------------------------------------


def test_sentence_transformers_real_checkpoint(tmp_path):
    """all-MiniLM-L6-v2 in sentence-transformers, optimised: same embeddings; save and reload."""
    st = pytest.importorskip("sentence_transformers")
    path = reference_vocab_dir()
    reference = st.SentenceTransformer(path, device="cpu")
    model = distilbert_fast.optimize(st.SentenceTransformer(path, device="cpu"))
    texts = TEXTS + ["a much longer sentence " * 12]
    expected = reference.encode(texts, convert_to_tensor=True)
    assert_close(model.encode(texts, convert_to_tensor=True), expected)
    model.save(str(tmp_path / "st"))
    reloaded = distilbert_fast.optimize(st.SentenceTransformer(str(tmp_path / "st"), device="cpu"))
    assert_close(reloaded.encode(texts, convert_to_tensor=True), expected)


def test_sentence_transformers_our_model_as_transformer_module(hf_tokenizer, tmp_path):
    """Our DistilBertModel as the transformer module of a SentenceTransformer: the same
    embeddings as transformers' DistilBertModel there; save and reload (into either library)."""
    st = pytest.importorskip("sentence_transformers")
    hf, ours = pair("DistilBertModel")
    hf.save_pretrained(tmp_path / "hf")
    hf_tokenizer.save_pretrained(tmp_path / "hf")

    def build():
        module = st.models.Transformer(str(tmp_path / "hf"))
        return st.SentenceTransformer(modules=[module, st.models.Pooling(TINY["dim"], "mean")], device="cpu")

    reference, model = build(), build()
    model[0].model = ours
    expected = reference.encode(TEXTS, convert_to_tensor=True)
    assert_close(model.encode(TEXTS, convert_to_tensor=True), expected)
    model.save(str(tmp_path / "st"))
    reloaded = st.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    assert_close(reloaded.encode(TEXTS, convert_to_tensor=True), expected)
    ours_again = distilbert_fast.DistilBertModel.from_pretrained(tmp_path / "st")
    assert_close(ours_again(torch.tensor([[101, 2023, 102]])).last_hidden_state,
                 ours(torch.tensor([[101, 2023, 102]])).last_hidden_state, atol=0.0)


# -- flattened batches (DataCollatorWithFlattening) ------------------------------------------------


def _flattened(hf_tokenizer, with_labels=True, flash_keywords=True):
    """transformers' DataCollatorWithFlattening over three texts (flash-attention keywords on, or
    its default: position ids alone), and the features it flattened."""
    features = [dict(hf_tokenizer(t)) for t in TEXTS[:3]]
    for f in features:
        f.pop("attention_mask")
        if with_labels:
            f["labels"] = [-100] + [i % 3 for i in range(len(f["input_ids"]) - 2)] + [-100]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_keywords)
    return collator([dict(f) for f in features]), features


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM",
                                        "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"])
@pytest.mark.parametrize("flash_keywords", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_flattened_batch_runs_each_sequence_alone(class_name, flash_keywords, hf_tokenizer):
    """A flattened batch (one row of concatenated sequences with cu_seq_lens_q, or with position
    ids alone restarting at 0 per sequence, the collator's default) runs packed: each sequence's
    outputs equal transformers' model run on that sequence alone, in (1, total, ...) shapes, and
    the token loss equals transformers' on the padded batch. (transformers' DistilBERT on sdpa or
    eager attention runs the row as one sequence, its sequences attending to each other; its
    flash-attention models compute what ours does.)"""
    tagging = class_name == "DistilBertForTokenClassification"
    hf, ours = pair(class_name, num_labels=3 if tagging else 2)
    batch, features = _flattened(hf_tokenizer, with_labels=tagging, flash_keywords=flash_keywords)
    assert ("cu_seq_lens_q" in batch) == flash_keywords
    with torch.no_grad():
        out = ours(**batch)
        start = 0
        for f in features:
            alone = hf(input_ids=torch.tensor([f["input_ids"]]))
            end = start + len(f["input_ids"])
            for key, value in alone.items():
                assert out[key].shape[0] == 1, key
                assert_close(out[key][0, start:end], value[0], atol=1e-5, name=f"{key} of a sequence")
            start = end
        if tagging:
            padded = transformers.DataCollatorForTokenClassification(hf_tokenizer)(features)
            assert_close(out.loss, hf(**padded).loss, atol=1e-5, name="loss")


@pytest.mark.parametrize("flash_keywords", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_flattened_batch_trains_in_trainer(flash_keywords, hf_tokenizer, tmp_path):
    """Trainer with DataCollatorWithFlattening, padding-free token classification: it trains."""
    pytest.importorskip("accelerate")
    _, ours = pair("DistilBertForTokenClassification", num_labels=3)
    _, features = _flattened(hf_tokenizer)
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3,
                                               max_steps=3, learning_rate=1e-3, report_to=[], use_cpu=True,
                                               save_strategy="no", remove_unused_columns=False)
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_keywords)
    trainer = transformers.Trainer(model=ours, args=arguments, train_dataset=features * 3, data_collator=collator)
    assert trainer.train().global_step == 3


def test_flattened_batch_to_a_sequence_level_head_is_refused(hf_tokenizer):
    _, ours = pair("DistilBertForSequenceClassification")
    batch, _ = _flattened(hf_tokenizer, with_labels=False)
    with pytest.raises(ValueError, match="does not take a flattened batch .cu_seq_lens_q"):
        ours(**batch)


# -- PEFT ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("optimized", [False, True], ids=["ours", "optimized"])
def test_peft_lora_trains(optimized, tmp_path):
    peft = pytest.importorskip("peft")
    hf, ours = pair("DistilBertForSequenceClassification")
    base = distilbert_fast.optimize(hf) if optimized else ours
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"])
    model = peft.get_peft_model(base, config)
    model.train()
    ids = torch.randint(1, 999, (4, 9))
    labels = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "adapter")
    assert os.path.isfile(tmp_path / "adapter" / "adapter_model.safetensors")


@pytest.mark.parametrize("optimized", [False, True], ids=["ours", "optimized"])
def test_peft_lora_on_every_linear_matches_transformers(optimized):
    """A LoRA on each projection (also those whose bias our fused ops fold in: out_lin, lin1,
    lin2) gives transformers' outputs."""
    peft = pytest.importorskip("peft")
    hf, ours = pair("DistilBertForSequenceClassification")

    def lora(model):
        config = peft.LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False,
                                 target_modules=["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"])
        return peft.get_peft_model(model, config)

    reference = lora(copy.deepcopy(hf))
    model = lora(distilbert_fast.optimize(hf) if optimized else ours)
    model.load_state_dict(reference.state_dict())
    ids = torch.randint(1, 999, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    assert_close(model(input_ids=ids, attention_mask=mask).logits,
                 reference(input_ids=ids, attention_mask=mask).logits)


def test_pipeline_real_checkpoint_optimized():
    """feature-extraction on the real all-MiniLM-L6-v2 (BertModel) after optimize()."""
    path = reference_vocab_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference = transformers.pipeline("feature-extraction", model=transformers.BertModel.from_pretrained(path),
                                      tokenizer=tokenizer, device="cpu")
    model = distilbert_fast.optimize(transformers.BertModel.from_pretrained(path))
    pipe = transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer, device="cpu")
    for a, b in zip(pipe(TEXTS), reference(TEXTS)):
        assert_close(torch.tensor(a), torch.tensor(b))
