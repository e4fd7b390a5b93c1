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


def _assert_same_encoding(call, theirs, ours):
    """call(ours) gives call(theirs): the same keys and values."""
    expected, got = call(theirs), call(ours)
    assert sorted(got.keys()) == sorted(expected.keys())
    for key in expected:
        a, b = got[key], expected[key]
        assert (torch.equal(a, b) if isinstance(b, torch.Tensor) else a == b), key


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
    _assert_same_encoding(call, *tokenizers)


@pytest.mark.parametrize("call", [
    lambda tok: tok(TEXTS[0], tokenizer_kwargs={"truncation": True, "max_length": 5}),
    lambda tok: tok(TEXTS[0], max_length=7, tokenizer_kwargs={"truncation": True, "max_length": 5}),
    lambda tok: tok(TEXTS, tokenizer_kwargs={"padding": True, "return_tensors": "pt"}),
    lambda tok: tok(TEXTS[:2], text_target=TEXTS[2:], tokenizer_kwargs={"truncation": True, "max_length": 4}),
    lambda tok: tok(TEXTS[0], tokenizer_kwargs=None),
], ids=["one-text", "wins-over-named", "batch", "text_target", "none"])
def test_tokenizer_kwargs_like_transformers(tokenizers, call):
    """__call__(..., tokenizer_kwargs={...}), transformers' documented way to pass keywords as a
    dict (they win over the named ones): ours raised TypeError (unexpected keyword)."""
    _assert_same_encoding(call, *tokenizers)


# -- optimize(): token labels at padding positions --------------------------------------------------

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
NO_DROPOUT = dict(dropout=0.0, attention_dropout=0.0)


def _tiny(class_name):
    if class_name.startswith("Bert"):
        config = transformers.BertConfig(**TINY_BERT)
    else:
        config = transformers.DistilBertConfig(**SMALL_CONFIG, **NO_DROPOUT)
    return getattr(transformers, class_name)(config).train()


def _ragged(batch=3, seq=9):
    ids = torch.randint(1, 99, (batch, seq))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    return ids, mask


def _varlen_calls(monkeypatch):
    """The list that grows by one per call of our packed attention op."""
    calls, real = [], distilbert_fast.modeling.varlen_attention
    monkeypatch.setattr(distilbert_fast.modeling, "varlen_attention",
                        lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    return calls


@pytest.mark.parametrize("class_name", ["DistilBertForMaskedLM", "DistilBertForTokenClassification",
                                        "BertForMaskedLM", "BertForTokenClassification"])
@pytest.mark.parametrize("how", ["keyword", "positional", "peft"])
def test_optimized_loss_counts_labels_at_padding_like_transformers(class_name, how, monkeypatch):
    """labels = input_ids (a common MLM recipe) or token labels padded with a real class count at
    padding positions in transformers' loss, which reads the logits there. The optimised base
    model packed such a batch (zeros at padding), so loss and gradients differed from the
    unoptimised model's; now the head shows its labels to the base model, which then keeps the
    padded computation, as our own heads do (labels -100 at padding still run packed)."""
    ref = _tiny(class_name)
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    ids, mask = _ragged()
    labels = torch.randint(0, 2, ids.shape) if class_name.endswith("TokenClassification") else ids.clone()
    if how == "peft":
        peft = pytest.importorskip("peft")
        config = dict(r=2, target_modules=["query", "value"] if class_name.startswith("Bert") else ["q_lin", "v_lin"])
        task = "TOKEN_CLS" if class_name.endswith("TokenClassification") else None
        ref = peft.get_peft_model(ref, peft.LoraConfig(task_type=task, **config))
        model = peft.get_peft_model(model, peft.LoraConfig(task_type=task, **config))
        model.load_state_dict(ref.state_dict())

    def loss_of(m, labels):
        if how == "positional":  # (input_ids, attention_mask, then labels' place in the signature)
            names = list(inspect.signature(type(m).forward).parameters)[1:]
            args = [None] * (names.index("labels") + 1)
            args[0], args[1], args[-1] = ids, mask, labels
            return m(*args).loss
        return m(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = [loss_of(m, labels) for m in (ref, model)]
    assert_close(losses[1], losses[0], atol=1e-5, name="loss")
    for loss in losses:
        loss.backward()
    grads = {name: p.grad for name, p in ref.named_parameters() if p.grad is not None}
    for name, p in model.named_parameters():
        if name in grads:
            assert_close(p.grad, grads[name], atol=1e-5, name=f"grad {name}")
    # labels that do not count at padding: still the packed path
    calls = _varlen_calls(monkeypatch)
    with torch.no_grad():
        loss = loss_of(model, labels.masked_fill(mask == 0, -100))
    assert len(calls) == 2 and torch.isfinite(loss)


def test_optimized_head_keeps_its_signature_for_trainer():
    """Trainer keeps the dataset columns named in inspect.signature(model.forward): the optimised
    head's forward shows transformers' signature; unoptimize restores the class's forward."""
    model = _tiny("DistilBertForTokenClassification")
    expected = inspect.signature(model.forward)
    distilbert_fast.optimize(model)
    assert inspect.signature(model.forward) == expected
    distilbert_fast.unoptimize(model)
    assert "forward" not in model.__dict__ and inspect.signature(model.forward) == expected


@pytest.mark.parametrize("class_name", ["DistilBertForTokenClassification", "BertModel"])
def test_optimized_model_exports_to_onnx_with_the_dynamo_exporter(class_name, tmp_path):
    """torch.onnx.export(model, ..., dynamo=True) of an optimised model (the head, or the base
    model itself) runs torch.export's non-strict mode first, which reads model.forward.__code__:
    optimize()'s instance forward had none, export fell back to strict mode, which keeps our
    custom ops, and the ONNX translation failed (no ONNX function for residual_layernorm). The
    unoptimised model exports; now the optimised one does too, with the same outputs."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    ref = _tiny(class_name).eval()
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    ids, mask = _ragged()
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"], dynamo=True,
                      dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    assert distilbert_fast.is_optimized(model)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = _ragged(batch=4, seq=5)  # other shapes than exported
    got = torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
    real = mask.bool()
    assert_close(got[real], ref(input_ids=ids, attention_mask=mask)[0][real], atol=1e-5)


# -- PEFT prompt learning on our classes -----------------------------------------------------------


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_peft_prompt_learning_on_our_model_like_transformers(method):
    """PEFT's prompt tuning / p-tuning asks ``"text_config" in model.config``: our config was not
    iterable (TypeError in get_peft_model); transformers' config iterates over its attribute
    names. Now the soft prompt trains on our model as on transformers' (same loss and grads)."""
    peft = pytest.importorskip("peft")
    config = dict(SMALL_CONFIG, **NO_DROPOUT, seq_classif_dropout=0.0)
    hf = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**config))
    ours = distilbert_fast.DistilBertForSequenceClassification(distilbert_fast.DistilBertConfig(**config))
    ours.load_state_dict(hf.state_dict())
    assert ("dim" in ours.config, "hidden_size" in ours.config) == ("dim" in hf.config, "hidden_size" in hf.config)
    extra = dict(encoder_hidden_size=16) if method == "PromptEncoderConfig" else {}
    prompt = getattr(peft, method)(task_type="SEQ_CLS", num_virtual_tokens=3, token_dim=SMALL_CONFIG["dim"],
                                   num_transformer_submodules=1, num_attention_heads=SMALL_CONFIG["n_heads"],
                                   num_layers=SMALL_CONFIG["n_layers"], **extra)
    reference = peft.get_peft_model(hf, prompt)
    model = peft.get_peft_model(ours, copy.deepcopy(prompt))
    model.load_state_dict(reference.state_dict())
    ids, mask = _ragged()
    labels = torch.tensor([0, 1, 0])
    losses = [m.train()(input_ids=ids, attention_mask=mask, labels=labels).loss for m in (reference, model)]
    assert_close(losses[1], losses[0], atol=1e-5, name="loss")
    for loss in losses:
        loss.backward()
    grads = dict(reference.named_parameters())
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert any("prompt_encoder" in name for name, _ in trained)
    for name, p in trained:
        assert_close(p.grad, grads[name].grad, atol=1e-5, name=f"grad {name}")


# -- token labels in other shapes ------------------------------------------------------------------


@pytest.mark.parametrize("class_name", ["DistilBertForTokenClassification", "DistilBertForMaskedLM"])
def test_token_labels_of_any_shape_holding_one_per_token(class_name):
    """transformers' token losses read labels.view(-1): flat (batch * seq,) labels or (batch, seq,
    1) train as (batch, seq) ones. Ours raised RuntimeError on a padded batch (the labels met the
    (batch, seq) mask in the packing plan); labels of the wrong size are a ValueError in both."""
    config = dict(SMALL_CONFIG, **NO_DROPOUT)
    hf = getattr(transformers, class_name)(transformers.DistilBertConfig(**config))
    ours = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**config))
    ours.load_state_dict(hf.state_dict())
    optimized = distilbert_fast.optimize(copy.deepcopy(hf))
    ids, mask = _ragged(seq=11)
    labels = torch.randint(0, 2, ids.shape)
    for shaped in (labels.reshape(-1), labels.unsqueeze(-1), labels.masked_fill(mask == 0, -100).reshape(-1)):
        expected = hf(input_ids=ids, attention_mask=mask, labels=shaped).loss
        for model in (ours, optimized):
            assert_close(model(input_ids=ids, attention_mask=mask, labels=shaped).loss, expected, atol=1e-5,
                         name=f"loss with labels of shape {tuple(shaped.shape)}")
    for model in (hf, ours, optimized):
        with pytest.raises(ValueError):
            model(input_ids=ids, attention_mask=mask, labels=labels[:, :7].contiguous())


# -- Trainer with a tokenizer ----------------------------------------------------------------------


@pytest.mark.parametrize("which", ["transformers-tokenizer", "our-tokenizer"])
def test_trainer_with_processing_class_like_transformers(tokenizers, which, tmp_path):
    """Trainer(model, args, train_dataset, processing_class=tokenizer), the usual call: train()
    aligns the tokenizer's special tokens with model.config.get_text_config(), which our config
    lacked (AttributeError at train()). Now our model trains as transformers' (same loss, the
    default collator padding with the tokenizer), and the checkpoint holds the tokenizer."""
    pytest.importorskip("accelerate")
    tokenizer = tokenizers[0 if which == "transformers-tokenizer" else 1]
    config = dict(SMALL_CONFIG, vocab_size=30522, max_position_embeddings=128, **NO_DROPOUT, seq_classif_dropout=0.0)
    hf = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**config))
    ours = distilbert_fast.DistilBertForSequenceClassification(distilbert_fast.DistilBertConfig(**config))
    ours.load_state_dict(hf.state_dict())
    data = [dict(tokenizer(text), labels=i % 2) for i, text in enumerate(TEXTS * 2)]
    losses = []
    for name, model in (("hf", hf), ("ours", ours)):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        losses.append(torch.tensor(trainer.train().training_loss))
    assert_close(losses[1], losses[0], atol=1e-5, name="training loss")
    saved = transformers.AutoTokenizer.from_pretrained(tmp_path / "ours" / "checkpoint-2")
    assert saved(TEXTS)["input_ids"] == tokenizer(TEXTS)["input_ids"]


def test_config_update_and_to_json_file_like_transformers(tmp_path):
    """model.config.update({...}) and config.to_json_file(path), transformers' config API that
    users call: AttributeError on ours. The file loads back in both libraries."""
    theirs, ours = transformers.DistilBertConfig(**SMALL_CONFIG), distilbert_fast.DistilBertConfig(**SMALL_CONFIG)
    changes = {"hidden_size": 48, "id2label": {0: "neg", 1: "pos"}, "custom_field": 7}
    for config in (theirs, ours):
        config.update(changes)
    assert (ours.dim, ours.id2label, ours.custom_field) == (theirs.dim, theirs.id2label, theirs.custom_field)
    ours.to_json_file(tmp_path / "config.json")
    for loaded in (transformers.DistilBertConfig.from_json_file(tmp_path / "config.json"),
                   distilbert_fast.DistilBertConfig.from_json_file(tmp_path / "config.json")):
        assert (loaded.dim, loaded.id2label, loaded.custom_field) == (48, {0: "neg", 1: "pos"}, 7)
