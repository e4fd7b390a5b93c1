"""Adapters on every model class (DistilBertModel and the task classes) and the Parallel
composition; parity with the adapters package itself is in test_adapters_oracle.py.

Parallel is checked here by what it must equal without an oracle: copy i of its output is what
child i gives alone (for bottleneck adapters of one kind, where the package's shared pre- and
post-steps are each adapter's own; for LoRA; and for a mix of both kinds), on the padded and the
packed path alike, with the layers below the first adapter run once."""

import inspect

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close

import distilbert_fast
from distilbert_fast import (
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    LoRAConfig,
    Parallel,
    SeqBnConfig,
    Stack,
)

CLASSES = [DistilBertModel, DistilBertForMaskedLM, DistilBertForSequenceClassification,
           DistilBertForQuestionAnswering, DistilBertForTokenClassification, DistilBertForMultipleChoice]
API = ("add_adapter", "train_adapter", "set_active_adapters", "save_adapter", "load_adapter",
       "delete_adapter", "freeze_model", "merge_adapter", "reset_adapter", "has_adapters")


def build(cls, **overrides):
    labels = {"num_labels": 2} if cls is DistilBertForQuestionAnswering else {"num_labels": 3}
    return cls(DistilBertConfig(**{**SMALL_CONFIG, **labels, **overrides})).eval()


@torch.no_grad()
def randomise(model):
    for name, p in model.named_parameters():
        if ".adapters." in name or ".loras." in name or name.startswith("heads."):
            p.copy_(0.3 * torch.randn_like(p))


def batch(rows=3, seq=7):
    x = torch.randint(1, SMALL_CONFIG["vocab_size"], (rows, seq))
    mask = torch.ones(rows, seq, dtype=torch.long)
    mask[0, 4:] = 0
    mask[-1, 2:] = 0
    return x, mask


def main_output(cls, out):
    return out.start_logits if cls is DistilBertForQuestionAnswering else (
        out.last_hidden_state if cls is DistilBertModel else out.logits)


def model_inputs(cls, x, mask):
    if cls is DistilBertForMultipleChoice:  # (batch, choices, seq)
        return dict(input_ids=x[:, None].expand(-1, 2, -1), attention_mask=mask[:, None].expand(-1, 2, -1))
    return dict(input_ids=x, attention_mask=mask)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_has_the_adapter_api_and_adapter_names(cls):
    model = build(cls)
    assert all(callable(getattr(model, name)) for name in API)
    parameter = inspect.signature(model.forward).parameters["adapter_names"]
    assert parameter.default is None
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("l", config=LoRAConfig(r=2))
    randomise(model)
    x, mask = batch()
    inputs = model_inputs(cls, x, mask)
    plain = main_output(cls, model(**inputs))
    adapted = main_output(cls, model(**inputs, adapter_names=Stack("l", "a")))
    assert not torch.allclose(plain, adapted)
    model.set_active_adapters(Stack("l", "a"))
    assert torch.equal(main_output(cls, model(**inputs)), adapted)
    # the task model and its base model share one set of adapters
    assert model.base_model.active_adapters == Stack("l", "a") and model.base_model.has_adapters()


def test_train_adapter_on_a_task_class_trains_the_adapter_and_the_task_head():
    model = build(DistilBertForSequenceClassification)
    model.add_adapter("a", config="houlsby")
    model.train_adapter("a")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters())
                         if ".adapters.a." in n or not n.startswith("distilbert.")}
    x, mask = batch()
    model(x, attention_mask=mask, labels=torch.tensor([0, 1, 2])).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_adapters_move_between_classes_and_survive_save_pretrained(tmp_path):
    base = build(DistilBertModel)
    base.add_adapter("a", config="houlsby")
    randomise(base)
    base.save_adapter(str(tmp_path / "a"), "a")  # bare keys: "transformer.layer..."
    keys = torch.load(tmp_path / "a" / "pytorch_adapter.bin", weights_only=True)
    assert all(k.startswith("transformer.layer.") for k in keys)
    task = build(DistilBertForTokenClassification)
    task.distilbert.load_state_dict(base.state_dict(), strict=False)
    task.load_adapter(str(tmp_path / "a"))
    x, mask = batch()
    expected = base(x, attention_mask=mask, adapter_names="a").last_hidden_state
    assert_close(task.distilbert(x, attention_mask=mask, adapter_names="a").last_hidden_state, expected, atol=1e-6)
    task.save_adapter(str(tmp_path / "b"), "a")  # "distilbert.transformer..." loads into the base
    assert all(k.startswith("distilbert.") for k in torch.load(tmp_path / "b" / "pytorch_adapter.bin",
                                                                weights_only=True))
    again = build(DistilBertModel)
    again.load_state_dict({k: v for k, v in base.state_dict().items() if ".adapters." not in k}, strict=False)
    again.load_adapter(str(tmp_path / "b"), load_as="c")
    assert_close(again(x, attention_mask=mask, adapter_names="c").last_hidden_state, expected, atol=1e-6)

    task.set_active_adapters("a")
    task.save_pretrained(str(tmp_path / "full"))
    loaded = DistilBertForTokenClassification.from_pretrained(str(tmp_path / "full"))
    assert loaded.adapters_config == task.adapters_config
    loaded.set_active_adapters("a")
    assert_close(loaded(x, attention_mask=mask).logits, task(x, attention_mask=mask).logits, atol=1e-6)


def test_save_adapter_carries_a_task_class_head(tmp_path, caplog):
    """As the package: a task class saves its own head (pre_classifier + classifier) with the
    adapter and the same class loads it back, labels too; another class skips it with a warning."""
    model = build(DistilBertForSequenceClassification, id2label={0: "neg", 1: "neu", 2: "pos"})
    model.add_adapter("a", config="seq_bn")
    randomise(model)
    with torch.no_grad():
        model.classifier.weight.normal_()
    model.save_adapter(str(tmp_path / "a"), "a")
    fresh = build(DistilBertForSequenceClassification)
    fresh.distilbert.load_state_dict(model.distilbert.state_dict(), strict=False)  # the base only
    fresh.load_adapter(str(tmp_path / "a"), set_active=True)
    x, mask = batch()
    assert_close(fresh(x, attention_mask=mask).logits, model(x, attention_mask=mask, adapter_names="a").logits, atol=1e-6)
    assert fresh.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    heads_model = DistilBertAdapterModel(DistilBertConfig(**SMALL_CONFIG))
    with caplog.at_level("WARNING", logger="distilbert_fast.adapters"):
        assert heads_model.load_adapter(str(tmp_path / "a")) == "a"
    assert not heads_model.heads and "DistilBertForSequenceClassification" in caplog.text
    with pytest.raises(ValueError, match="belongs to a 'DistilBertForSequenceClassification'"):
        build(DistilBertForTokenClassification).load_head(str(tmp_path / "a"))
    with pytest.raises(ValueError, match="DistilBertModel has no head"):
        build(DistilBertModel).save_head(str(tmp_path / "b"))


@pytest.mark.parametrize("setup", [Stack("l", "a"), Parallel("l", "a")], ids=repr)
def test_skip_layers_runs_no_adapter_in_those_blocks(tmp_path, setup):
    """set_active_adapters(setup, skip_layers=[0]), as the package's: the same outputs as the
    adapters loaded without block 0 (a Parallel then replicates the batch in block 1)."""
    model = build(DistilBertForTokenClassification)
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("l", config=LoRAConfig(r=2, attn_matrices=["q", "k", "v"]))
    randomise(model)
    without_0 = build(DistilBertForTokenClassification)
    without_0.load_state_dict(model.state_dict(), strict=False)
    for name in ("a", "l"):
        model.save_adapter(str(tmp_path / name), name)
        without_0.load_adapter(str(tmp_path / name), leave_out=[0])
    x, mask = batch()
    model.set_active_adapters(setup, skip_layers=[0])
    without_0.set_active_adapters(setup)
    assert_close(model(x, attention_mask=mask).logits, without_0(x, attention_mask=mask).logits, atol=1e-6)
    model.set_active_adapters(setup)  # skip_layers hold until the next call
    assert not torch.allclose(model(x, attention_mask=mask).logits, without_0(x, attention_mask=mask).logits)
    with pytest.raises(ValueError, match="skip_layers must be block indices"):
        model.set_active_adapters(setup, skip_layers=[2])


# -- Parallel --------------------------------------------------------------------------------------


# Two adapters "a" and "b" of each kind. LoRA: "b" on k only and not in layer 0, so in layer 0
# "a"'s q and v replicate the batch and attention repeats k; "mixed": a LoRA beside a bottleneck
# adapter, so each place has a child without an adapter of its kind.
PARALLEL_KINDS = {
    "seq_bn": lambda leave_out: (SeqBnConfig(reduction_factor=4, leave_out=leave_out),
                                 SeqBnConfig(reduction_factor=2, leave_out=leave_out)),
    "lora": lambda leave_out: (LoRAConfig(r=2, alpha=4, leave_out=leave_out),
                               LoRAConfig(r=3, alpha=3, attn_matrices=["k"], leave_out=sorted({0, *leave_out}))),
    "mixed": lambda leave_out: (LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"], leave_out=leave_out),
                                SeqBnConfig(reduction_factor=2, leave_out=leave_out)),
}


def parallel_model(cls, leave_out=(), kind="seq_bn"):
    model = build(cls)
    for name, config in zip("ab", PARALLEL_KINDS[kind](list(leave_out))):
        model.add_adapter(name, config=config)
    randomise(model)
    return model


@pytest.mark.parametrize("kind", PARALLEL_KINDS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_parallel_copy_i_is_adapter_i_alone_packed_and_padded(cls, kind):
    model = parallel_model(cls, kind=kind)
    x, mask = batch()
    inputs = model_inputs(cls, x, mask)
    alone = [main_output(cls, model(**inputs, adapter_names=name)) for name in "ab"]
    both = main_output(cls, model(**inputs, adapter_names=Parallel("a", "b")))
    assert both.shape[0] == 2 * alone[0].shape[0]
    assert not torch.allclose(alone[0], alone[1], atol=1e-3)  # the copies differ: the check can fail
    assert_close(both, torch.cat(alone), atol=2e-6)
    if cls is DistilBertModel:  # the padded computation agrees at real positions
        padded = model(x, attention_mask=mask, adapter_names=Parallel("a", "b"), pack=False).last_hidden_state
        real = mask.bool().repeat(2, 1)
        assert_close(padded[real], both[real], atol=2e-6)


def test_parallel_of_lora_stacks_and_a_bottleneck_on_packed_input():
    model = parallel_model(DistilBertModel, kind="lora")
    model.add_adapter("c", config=SeqBnConfig(reduction_factor=4, leave_out=[1]))
    randomise(model)
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (9,))
    cu_seqlens = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    setup = Parallel(Stack("a", "b"), "c", "a")
    out = model(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names=setup).last_hidden_state
    alone = [model(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names=child).last_hidden_state
             for child in (Stack("a", "b"), "c", "a")]
    assert out.shape == (27, 32)
    assert_close(out, torch.cat(alone), atol=2e-6)


def test_parallel_on_packed_input_and_hidden_states():
    model = parallel_model(DistilBertModel)
    lengths = [5, 1, 3]
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (sum(lengths),))
    cu_seqlens = torch.tensor([0, 5, 6, 9], dtype=torch.int32)
    out = model(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names=Parallel("a", "b"),
                output_hidden_states=True)
    alone = [model(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names=n).last_hidden_state for n in "ab"]
    assert_close(out.last_hidden_state, torch.cat(alone), atol=2e-6)
    assert all(h.shape == (18, 32) for h in out.hidden_states)  # every state holds both copies
    task = build(DistilBertForSequenceClassification)
    task.distilbert = model
    logits = task(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names=Parallel("a", "b")).logits
    assert logits.shape == (6, 3)
    assert_close(logits[3:], task(ids, cu_seqlens=cu_seqlens, max_seqlen=5, adapter_names="b").logits, atol=2e-6)


def test_parallel_runs_the_layers_below_the_first_adapter_once():
    model = parallel_model(DistilBertModel, leave_out=[0])
    rows = []
    for block in model.transformer.layer:
        block.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    x, mask = batch()
    out = model(x, attention_mask=mask, adapter_names=Parallel("a", "b")).last_hidden_state
    # (the hooks make the batch run padded, as HF's shapes for them); replicated inside layer 1
    assert rows == [len(x), len(x)] and out.shape[0] == 2 * len(x)
    alone = torch.cat([model(x, attention_mask=mask, adapter_names=n).last_hidden_state for n in "ab"])
    assert_close(out, alone, atol=2e-6)


def test_parallel_on_the_heads_model_gives_one_output_per_head_and_trains():
    model = DistilBertAdapterModel(DistilBertConfig(**SMALL_CONFIG)).eval()
    for name, factor in (("a", 4), ("b", 2)):
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=factor))
    model.add_classification_head("a", num_labels=3)
    model.add_tagging_head("b", num_labels=4)
    randomise(model)
    x, mask = batch()
    out = model(x, attention_mask=mask, adapter_names=Parallel("a", "b"))
    assert len(out) == 2
    assert_close(out[0].logits, model(x, attention_mask=mask, adapter_names="a", head="a").logits, atol=2e-6)
    tagged = model(x, attention_mask=mask, adapter_names="b", head="b").logits
    assert_close(out[1].logits, tagged, atol=2e-6)
    with distilbert_fast.AdapterSetup(Parallel("a", "b")):  # the heads follow the setup here too
        assert_close(model(x, attention_mask=mask)[1].logits, tagged, atol=2e-6)
    model.set_active_adapters(Parallel("a", "b"))
    assert model.active_head == ["a", "b"]
    model.train_adapter(Parallel("a", "b"))
    model.eval()
    out = model(x, attention_mask=mask)  # the active Parallel and its two heads
    (out[0].logits.pow(2).sum() + out[1].logits.pow(2).sum()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if ".adapters." in n)


@pytest.mark.parametrize("kind", ["seq_bn", "lora"])
def test_parallel_gradient_checkpointing_matches(kind):
    model = parallel_model(DistilBertModel, kind=kind)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    x, mask = batch()

    def grads():
        model.zero_grad()
        model(x, attention_mask=mask, adapter_names=Parallel("a", "b")).last_hidden_state.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    group = ".loras." if kind == "lora" else ".adapters."
    assert all(any(f"{group}{name}." in n for n in expected) for name in "ab")  # each child is trained
    model.gradient_checkpointing_enable()
    actual = grads()
    assert set(actual) == set(expected)
    for name in expected:
        assert_close(actual[name], expected[name], atol=1e-5, name=name)


def test_unsupported_compositions_name_the_argument():
    model = parallel_model(DistilBertForSequenceClassification)
    x, mask = batch()
    with pytest.raises(ValueError, match="adapter_names: no adapter named 'z'"):
        model(x, attention_mask=mask, adapter_names=Parallel("a", Stack("b", "z")))
    with pytest.raises(ValueError, match="adapter_setup: no adapter named 'z'"):
        model.set_active_adapters(Parallel("a", "z"))
    with pytest.raises(TypeError, match="Stack children"):
        Stack("a", Stack("a", "b"))
    with pytest.raises(TypeError, match="Parallel children"):
        Parallel("a", Parallel("a", "b"))
    with pytest.raises(ValueError, match="labels with the Parallel"):
        model(x, attention_mask=mask, labels=torch.tensor([0, 1, 2]), adapter_names=Parallel("a", "b"))
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        model(x, attention_mask=mask, adapter_names=Parallel("a", "z"))
    heads = DistilBertAdapterModel(DistilBertConfig(**SMALL_CONFIG))
    heads.add_adapter("a")
    heads.add_adapter("b")
    heads.add_classification_head("h")
    with pytest.raises(ValueError, match="2 channels but 1 heads"):
        heads(x, attention_mask=mask, adapter_names=Parallel("a", "b"))
    assert distilbert_fast.Parallel is Parallel
