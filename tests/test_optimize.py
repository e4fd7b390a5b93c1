"""distilbert_fast.optimize(model) on live transformers models: in place, same outputs and
gradients as the unoptimised model, undoable; DistilBERT (every head) and BERT (the real
all-MiniLM-L6-v2 checkpoint)."""

import copy
import io
import os

import pytest
import torch

from conftest import CLASS_NAMES, SMALL_CONFIG, assert_close, packed_attention_calls, reference_vocab_dir

import distilbert_fast

transformers = pytest.importorskip("transformers")

DISTILBERT_CLASSES = CLASS_NAMES  # every DistilBERT class (conftest)
BERT_CLASSES = ["BertModel", "BertForSequenceClassification", "BertForMaskedLM", "BertForTokenClassification"]

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def hf_model(class_name, **overrides):
    if class_name.startswith("Bert"):
        config = transformers.BertConfig(**{**TINY_BERT, **overrides})
    else:
        config = transformers.DistilBertConfig(**{**SMALL_CONFIG, **overrides})
    return getattr(transformers, class_name)(config).eval()


def ragged_inputs(class_name, batch=3, seq=11, vocab=99):
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if class_name.startswith("Bert"):
        inputs["token_type_ids"] = (torch.arange(seq) >= 5).long().expand(batch, seq).contiguous()
    if class_name.endswith("MultipleChoice"):
        inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    return inputs, mask


def labels_for(model, inputs):
    name = type(model).__name__
    ids = inputs["input_ids"]
    if name.endswith("SequenceClassification"):
        return {"labels": torch.tensor([0, 1, 1])}
    if name.endswith("MultipleChoice"):
        return {"labels": torch.tensor([0, 1, 0])}
    if name.endswith("QuestionAnswering"):
        return {"start_positions": torch.tensor([1, 2, 0]), "end_positions": torch.tensor([3, 5, 2])}
    if name.endswith(("MaskedLM", "TokenClassification")):
        high = model.config.vocab_size if name.endswith("MaskedLM") else model.config.num_labels
        labels = torch.randint(0, high, ids.shape)
        return {"labels": labels.masked_fill(inputs["attention_mask"] == 0, -100)}
    return {}


def real_positions(tensor, mask):
    """Rows of (batch, seq, ...) at the real (unpadded) positions only."""
    if tensor.dim() >= 2 and tuple(tensor.shape[:2]) == tuple(mask.shape):
        return tensor[mask.bool()]
    return tensor


def compare_outputs(ours, ref, mask, atol=1e-5):
    for key in ref.keys():
        a, b = ours[key], ref[key]
        if isinstance(b, tuple):
            for i, (x, y) in enumerate(zip(a, b)):
                assert_close(real_positions(x, mask), real_positions(y, mask), atol=atol, name=f"{key}[{i}]")
        elif key in ("last_hidden_state", "logits", "start_logits", "end_logits"):
            assert_close(real_positions(a, mask), real_positions(b, mask), atol=atol, name=key)
        else:
            assert_close(a, b, atol=atol, name=key)


def run_both(class_name, training=False, **call):
    """(reference output, optimised output, reference model, optimised model): two copies of
    one HF model, one optimised."""
    ref = hf_model(class_name)
    model = copy.deepcopy(ref)
    distilbert_fast.optimize(model)
    inputs, mask = ragged_inputs(class_name)
    inputs.update(labels_for(ref, inputs) if training else {})
    ref.train(training)
    model.train(training)
    return ref(**inputs, **call), model(**inputs, **call), ref, model, mask


def assert_same_gradients(model, ref):
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        assert_close(p.grad, grads[name].grad, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("class_name", DISTILBERT_CLASSES + BERT_CLASSES)
def test_outputs_equal_unoptimised(class_name):
    ref_out, out, _, model, mask = run_both(class_name, output_hidden_states=True)
    assert type(out) is type(ref_out) or isinstance(out, transformers.utils.ModelOutput)
    mask = mask if not class_name.endswith("MultipleChoice") else mask.repeat_interleave(2, 0)
    compare_outputs(out, ref_out, mask)
    assert distilbert_fast.is_optimized(model)


@pytest.mark.parametrize("class_name", DISTILBERT_CLASSES + BERT_CLASSES)
def test_gradients_equal_unoptimised(class_name):
    """Training mode with dropout off (so both draw nothing): loss and every parameter's
    gradient agree."""
    overrides = (
        dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if class_name.startswith("Bert")
        else dict(dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, qa_dropout=0.0)
    )
    ref = hf_model(class_name, **overrides)
    model = copy.deepcopy(ref)
    distilbert_fast.optimize(model)
    inputs, _ = ragged_inputs(class_name)
    inputs.update(labels_for(ref, inputs))
    if class_name in ("DistilBertModel", "BertModel"):
        # over real positions: the optimised model's padding positions hold zeros (packed)
        real = inputs["attention_mask"][..., None].bool()
        losses = [m(**inputs).last_hidden_state.masked_fill(~real, 0).pow(2).mean()
                  for m in (ref.train(), model.train())]
    else:
        losses = [m(**inputs).loss for m in (ref.train(), model.train())]
    assert_close(losses[1], losses[0], atol=1e-5, name="loss")
    for loss in losses:
        loss.backward()
    assert_same_gradients(model, ref)


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForTokenClassification",
                                        "BertModel", "BertForMaskedLM", "BertForTokenClassification"])
@pytest.mark.parametrize("flash_keywords", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_flattened_batch_runs_each_sequence_alone(class_name, flash_keywords):
    """DataCollatorWithFlattening's batch (one row of concatenated sequences, cu_seq_lens_q, which
    transformers' heads pass down to the base model, or by default only position ids restarting
    at 0 per sequence): each sequence attends within itself, as transformers computes it with
    flash attention, so outputs, loss and every gradient equal the unoptimised model's on the
    same sequences padded (its sdpa attention mixed the sequences)."""
    overrides = (
        dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) if class_name.startswith("Bert")
        else dict(dropout=0.0, attention_dropout=0.0)
    )
    ref = hf_model(class_name, **overrides).train()
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    high = ref.config.vocab_size if class_name.endswith("MaskedLM") else ref.config.num_labels
    lengths = (5, 9, 2)
    features = [{"input_ids": torch.randint(1, 99, (n,)).tolist(), "labels": torch.randint(0, high, (n,)).tolist()}
                for n in lengths]
    flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_keywords)(features)
    assert ("cu_seq_lens_q" in flat) == flash_keywords and "position_ids" in flat
    labels = flat["labels"][0].split(lengths)  # the collator's: -100 at each sequence's first token
    padded = {"input_ids": torch.zeros(3, max(lengths), dtype=torch.long),
              "attention_mask": torch.zeros(3, max(lengths), dtype=torch.long),
              "labels": torch.full((3, max(lengths)), -100)}
    for row, (f, n) in enumerate(zip(features, lengths)):
        padded["input_ids"][row, :n] = torch.tensor(f["input_ids"])
        padded["attention_mask"][row, :n] = 1
        padded["labels"][row, :n] = labels[row]
    has_labels = not class_name.endswith("Model")
    if not has_labels:
        flat.pop("labels")
        padded.pop("labels")
    out, ref_out = model(**flat), ref(**padded)
    real = padded["attention_mask"].bool()
    first = "logits" if has_labels else "last_hidden_state"
    assert out[first].shape[:2] == (1, sum(lengths))
    assert_close(out[first][0], ref_out[first][real], atol=1e-5, name=first)
    if has_labels:
        losses = [out.loss, ref_out.loss]
        assert_close(out.loss, ref_out.loss, atol=1e-5, name="loss")
    else:
        losses = [out.last_hidden_state.pow(2).mean(), ref_out.last_hidden_state[real].pow(2).mean()]
    for loss in losses:
        loss.backward()
    assert_same_gradients(model, ref)


def test_in_place_same_object_class_parameters_and_undo():
    model = hf_model("DistilBertForSequenceClassification")
    params = {name: p for name, p in model.named_parameters()}
    cls = type(model)
    inputs, _ = ragged_inputs("DistilBertForSequenceClassification")
    before = model(**inputs).logits
    assert distilbert_fast.optimize(model) is model
    assert type(model) is cls
    assert all(p is params[name] for name, p in model.named_parameters())
    assert model.distilbert.forward.ours.func.__name__ == "_distilbert_model_forward"
    distilbert_fast.unoptimize(model)
    assert not distilbert_fast.is_optimized(model)
    assert "forward" not in model.distilbert.__dict__
    assert_close(model(**inputs).logits, before, atol=0.0, name="logits after unoptimize")


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "BertForSequenceClassification"])
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copies_and_pickles_stay_optimised_and_independent(class_name, how, monkeypatch):
    """copy.deepcopy(model) (EMA copies, teacher models) and torch.save / torch.load of the whole
    model: the copy runs our packed path over its own modules, and changing it leaves the original
    alone."""
    model = distilbert_fast.optimize(hf_model(class_name))
    inputs, mask = ragged_inputs(class_name)
    if how == "deepcopy":
        copy_ = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copy_ = torch.load(buffer, weights_only=False)
    assert distilbert_fast.is_optimized(copy_)
    assert packed_attention_calls(monkeypatch, copy_, inputs) == 2  # a call per layer
    expected = model(**inputs).logits
    assert_close(copy_(**inputs).logits, expected, atol=0.0, name="copy's logits")
    with torch.no_grad():
        copy_.classifier.weight.mul_(2)
        next(p for n, p in copy_.named_parameters() if "layer.0" in n and n.endswith("weight")).mul_(0.5)
    assert not torch.allclose(copy_(**inputs).logits, expected)
    assert_close(model(**inputs).logits, expected, atol=0.0, name="original's logits")


def test_runs_on_our_ops():
    for backend in ("eager", "cpu"):
        model = distilbert_fast.optimize(hf_model("DistilBertModel"), backend=backend)
        inputs, _ = ragged_inputs("DistilBertModel")
        model(**inputs)
        ran = distilbert_fast.last_backend()  # op -> backend of its latest call (any test's)
        for op in ("residual_layernorm", "linear", "varlen_attention", "linear_activation"):  # packed
            assert ran[op] == backend, (op, ran)


def test_training_with_dropout_and_gradient_checkpointing_runs():
    model = distilbert_fast.optimize(hf_model("BertForSequenceClassification"))
    model.gradient_checkpointing_enable()
    model.train()
    inputs, _ = ragged_inputs("BertForSequenceClassification")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(**inputs, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.bert.encoder.parameters())


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "BertModel"])
def test_optimised_model_compiles_without_graph_breaks(class_name):
    """torch.compile(fullgraph=True) of an optimised transformers model: no graph break, the
    unoptimised model's outputs at every real position (a compiled graph runs the padded
    computation: padding positions hold transformers' values, not zeros)."""
    ref = hf_model(class_name)
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    inputs, mask = ragged_inputs(class_name)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_count >= 1 and explanation.graph_break_count == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    compare_outputs(compiled(**inputs), ref(**inputs), mask)


def test_bad_argument():
    with pytest.raises(TypeError, match="model must be or contain a transformers DistilBertModel or BertModel"):
        distilbert_fast.optimize(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="backend"):
        distilbert_fast.optimize(hf_model("DistilBertModel"), backend="nope")
    with pytest.raises(ValueError, match="is_decoder"):
        distilbert_fast.optimize(hf_model("BertModel", is_decoder=True))


def test_real_minilm_checkpoint_equals_transformers():
    """all-MiniLM-L6-v2 (BERT, post-LN, token types) through optimize(): HF's own outputs."""
    path = reference_vocab_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    texts = ["A man is eating food.", "The new movie is awesome, I loved every minute of it!", "hi"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    ref = transformers.BertModel.from_pretrained(path).eval()
    model = distilbert_fast.optimize(transformers.BertModel.from_pretrained(path).eval())
    with torch.no_grad():
        expected, actual = ref(**batch), model(**batch)
    mask = batch["attention_mask"]
    assert_close(real_positions(actual.last_hidden_state, mask), real_positions(expected.last_hidden_state, mask),
                 atol=1e-5, name="last_hidden_state")
    assert_close(actual.pooler_output, expected.pooler_output, atol=1e-5, name="pooler_output")


def test_inside_peft_model():
    peft = pytest.importorskip("peft")
    ref = hf_model("DistilBertForSequenceClassification")
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"])
    ref_peft = peft.get_peft_model(ref, config)
    for name, p in ref_peft.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # so the LoRA changes the output
    model = copy.deepcopy(ref_peft)
    distilbert_fast.optimize(model)
    inputs, mask = ragged_inputs("DistilBertForSequenceClassification")
    labels = torch.tensor([0, 1, 1])
    ref_peft.train(), model.train()
    for m in (ref_peft, model):
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    ref_loss, loss = ref_peft(**inputs, labels=labels).loss, model(**inputs, labels=labels).loss
    assert_close(loss, ref_loss, atol=1e-5, name="loss")
    ref_loss.backward(), loss.backward()
    ref_grads = {n: p.grad for n, p in ref_peft.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref_grads[name], atol=1e-5, name=name)


def test_bert_with_lora_on_every_linear():
    peft = pytest.importorskip("peft")
    ref = hf_model("BertForSequenceClassification", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, init_lora_weights=False,
                             target_modules=["query", "key", "value", "dense"])
    ref = peft.get_peft_model(ref, config)
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    inputs, mask = ragged_inputs("BertForSequenceClassification")
    labels = torch.tensor([0, 1, 1])
    for m in (ref, model):
        m.train()
    losses = [m(**inputs, labels=labels).loss for m in (ref, model)]
    assert_close(losses[1], losses[0], atol=1e-5, name="loss")
    for loss in losses:
        loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert_close(p.grad, ref_grads[name], atol=1e-5, name=name)


def test_import_does_not_load_transformers():
    import subprocess
    import sys

    code = ("import sys, distilbert_fast, torch; m = distilbert_fast.DistilBertModel("
            "distilbert_fast.DistilBertConfig(vocab_size=9, dim=8, n_heads=2, n_layers=1, hidden_dim=8)); "
            "m(torch.tensor([[1, 2]])); assert 'transformers' not in sys.modules, 'imported'")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# module paths (below the base model) to hook, per family: modules our forward fuses or skips
# (LayerNorms, dropouts, BERT's FFN parts), modules whose forward it replaces, and modules it
# calls on packed tokens
HOOKED = {
    "DistilBertModel": ["embeddings", "embeddings.word_embeddings", "transformer.layer.0",
                        "transformer.layer.1.attention", "transformer.layer.0.attention.q_lin",
                        "transformer.layer.1.sa_layer_norm", "transformer.layer.0.ffn",
                        "transformer.layer.1.output_layer_norm", "transformer.layer.0.attention.dropout"],
    "BertModel": ["embeddings.LayerNorm", "encoder.layer.0.attention", "encoder.layer.1.attention.output.LayerNorm",
                  "encoder.layer.0.intermediate", "encoder.layer.1.output", "encoder.layer.0.output.dropout"],
}


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "backward"])
@pytest.mark.parametrize("class_name", sorted(HOOKED))
def test_hooks_below_the_base_model_fire_as_unoptimised(class_name, kind, monkeypatch):
    """A hook on any module below the base model (fused, replaced or run on packed tokens by our
    forward) fires as on the unoptimised model: same calls, same tensors, and a hook that changes
    its module's output changes the model's output alike; with the hooks removed the model runs
    on our ops again."""
    ref = hf_model(class_name)
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    inputs, mask = ragged_inputs(class_name)

    def hook_up(m):
        seen, handles = [], []
        for path in HOOKED[class_name]:
            module = m.get_submodule(path)
            if kind == "forward":  # (a returned value replaces the output: halve the tensors)
                hook = module.register_forward_hook(lambda mod, args, out, path=path: seen.append((path, out)) or (
                    out * 0.5 if isinstance(out, torch.Tensor) and out.is_floating_point() else None))
            elif kind == "forward_pre":
                hook = module.register_forward_pre_hook(lambda mod, args, path=path: seen.append((path, args[0])))
            else:
                hook = module.register_full_backward_hook(lambda mod, gin, gout, path=path: seen.append((path, gout[0])))
            handles.append(hook)
        return seen, handles

    (seen_ref, _), (seen, handles) = hook_up(ref), hook_up(model)
    ref_out, out = ref(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    assert_close(out, ref_out, atol=1e-6, name="last_hidden_state")
    if kind == "backward":
        weight = torch.randn_like(ref_out)
        (ref_out * weight).sum().backward()
        (out * weight).sum().backward()
    assert [path for path, _ in seen] == [path for path, _ in seen_ref] and len(seen_ref) >= 4
    for (path, a), (_, b) in zip(seen, seen_ref):
        a, b = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
        assert_close(a, b, atol=1e-6, name=f"tensor the hook on {path} saw")
    assert packed_attention_calls(monkeypatch, model, inputs) == 0  # transformers' forward ran
    for handle in handles:
        handle.remove()
    assert packed_attention_calls(monkeypatch, model, inputs) == 2  # our packed path again, both layers


def test_enable_input_require_grads_keeps_our_path(monkeypatch):
    """transformers' enable_input_require_grads hook (PEFT adds it under gradient checkpointing)
    needs no fallback: the model stays on our ops, and gradients reach a frozen model's layers."""
    ref = hf_model("DistilBertForSequenceClassification")
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    for m in (ref, model):
        m.requires_grad_(False)
        m.distilbert.transformer.layer[1].ffn.lin2.weight.requires_grad_(True)
        m.enable_input_require_grads()
        m.gradient_checkpointing_enable()
        m.train()
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    inputs, mask = ragged_inputs("DistilBertForSequenceClassification")
    for m in (ref, model):
        m(**inputs).logits.pow(2).sum().backward()
    assert packed_attention_calls(monkeypatch, model, inputs) == 2
    ours, theirs = (m.distilbert.transformer.layer[1].ffn.lin2.weight.grad for m in (model, ref))
    assert ours is not None and ours.abs().sum() > 0
    assert_close(ours, theirs, atol=1e-5, name="lin2 grad")
    distilbert_fast.unoptimize(model)
