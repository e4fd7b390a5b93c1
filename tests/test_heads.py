"""DistilBertAdapterModel's flexible heads: each head type gives the outputs and loss of the
matching task class (tested against HuggingFace elsewhere) with the same weights; head
management (active head, several heads, delete) and head files."""

import inspect
import json
import os

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close

import distilbert_fast
from distilbert_fast import (
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DistilBertModelWithHeads,
)

# head type -> (task class, add_*_head call, {head module index: task module name}, inputs)
CASES = {
    "classification": (
        "DistilBertForSequenceClassification",
        lambda m: m.add_classification_head("h", num_labels=3, activation_function="relu"),
        {1: "pre_classifier", 4: "classifier"},
    ),
    "tagging": (
        "DistilBertForTokenClassification",
        lambda m: m.add_tagging_head("h", num_labels=3),
        {1: "classifier"},
    ),
    "question_answering": (
        "DistilBertForQuestionAnswering",
        lambda m: m.add_qa_head("h"),
        {1: "qa_outputs"},
    ),
    "multiple_choice": (
        "DistilBertForMultipleChoice",
        lambda m: m.add_multiple_choice_head("h", num_choices=3, activation_function="relu"),
        {1: "pre_classifier", 4: "classifier"},
    ),
    "masked_lm": (
        "DistilBertForMaskedLM",
        lambda m: m.add_masked_lm_head("h"),
        {0: "vocab_transform", 2: "vocab_layer_norm", 3: "vocab_projector"},
    ),
}


def small_model(**overrides):
    return DistilBertAdapterModel(DistilBertConfig(**{**SMALL_CONFIG, **overrides})).eval()


def task_inputs(head_type, batch=3, seq=6):
    ids_shape = (batch, 3, seq) if head_type == "multiple_choice" else (batch, seq)
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], ids_shape)
    mask = torch.ones(ids_shape, dtype=torch.long)
    mask[0, ..., 4:] = 0  # padded tails
    mask[1, ..., 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if head_type == "classification":
        inputs["labels"] = torch.randint(0, 3, (batch,))
    elif head_type == "tagging":
        inputs["labels"] = torch.randint(0, 3, (batch, seq))
        inputs["labels"][mask == 0] = -100  # the task class counts every position; the head skips padding
    elif head_type == "question_answering":
        inputs["start_positions"] = torch.tensor([0, 2, 30])[:batch]
        inputs["end_positions"] = torch.tensor([1, 5, 3])[:batch]
    elif head_type == "multiple_choice":
        inputs["labels"] = torch.randint(0, 3, (batch,))
    elif head_type == "masked_lm":
        inputs["labels"] = torch.randint(0, SMALL_CONFIG["vocab_size"], (batch, seq))
    return inputs


@pytest.mark.parametrize("head_type", sorted(CASES))
def test_head_matches_the_task_class(head_type):
    task_name, add_head, modules = CASES[head_type]
    model = small_model()
    add_head(model)
    task = getattr(distilbert_fast, task_name)(DistilBertConfig(**SMALL_CONFIG, num_labels=3 if head_type in
                                                                 ("classification", "tagging") else 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    task.distilbert.load_state_dict(model.distilbert.state_dict())
    head = model.heads["h"]
    for index, name in modules.items():
        getattr(task, name).load_state_dict(head[index].state_dict())
    inputs = task_inputs(head_type)
    ours, theirs = model(**inputs), task(**inputs)
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs.keys():
        assert_close(ours[key], theirs[key], atol=1e-6, name=key)
    # the tuple form, as the task class gives it
    tuples = model(**inputs, return_dict=False), task(**inputs, return_dict=False)
    assert len(tuples[0]) == len(tuples[1])


def test_multilabel_and_regression_losses():
    model = small_model()
    model.add_classification_head("multi", num_labels=4, multilabel=True)
    model.add_classification_head("reg", num_labels=1)
    ids = torch.randint(1, 99, (3, 5))
    labels = torch.randint(0, 2, (3, 4))
    out = model(ids, head="multi", labels=labels)
    assert_close(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels.float()))
    target = torch.randn(3)
    out = model(ids, head="reg", labels=target)
    assert out.logits.shape == (3, 1)
    assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.view(-1), target))


def test_head_layout_and_config_match_the_package():
    model = small_model()
    model.add_classification_head("c", num_labels=3, layers=2)
    model.add_masked_lm_head("m")
    keys = sorted(k for k in model.state_dict() if k.startswith("heads."))
    assert keys == ["heads.c.1.bias", "heads.c.1.weight", "heads.c.4.bias", "heads.c.4.weight",
                    "heads.m.0.bias", "heads.m.0.weight", "heads.m.2.bias", "heads.m.2.weight",
                    "heads.m.3.bias", "heads.m.3.weight"]
    assert model.heads["c"].config == {
        "head_type": "classification", "num_labels": 3, "layers": 2, "activation_function": "tanh",
        "label2id": {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2}, "use_pooler": False, "bias": True,
        "dropout_prob": None,
    }
    # the masked-LM projection is the word embedding matrix
    assert model.heads["m"][3].weight is model.get_input_embeddings().weight
    assert DistilBertModelWithHeads is DistilBertAdapterModel


def test_active_head_several_heads_and_delete():
    model = small_model()
    model.add_classification_head("a", num_labels=2)
    model.add_tagging_head("b", num_labels=3)
    assert model.active_head == "b"  # the last added head is active
    ids = torch.randint(1, 99, (2, 5))
    assert model(ids).logits.shape == (2, 5, 3)
    model.active_head = ["a", "b"]
    both = model(ids, labels=None)
    assert len(both) == 2 and both[0].logits.shape == (2, 2) and both[1].logits.shape == (2, 5, 3)
    assert_close(both[0].logits, model(ids, head="a").logits, atol=0)
    model.delete_head("b")
    assert model.active_head == "a" and "b" not in model.heads
    assert not any(k.startswith("heads.b.") for k in model.state_dict())
    model.delete_head("a")
    base = model(ids)  # no head: the base model's output
    assert base.last_hidden_state.shape == (2, 5, SMALL_CONFIG["dim"])


def test_save_head_load_head_round_trip(tmp_path):
    model = small_model()
    model.add_tagging_head("t", num_labels=4, id2label={0: "O", 1: "B", 2: "I", 3: "X"})
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_()
    model.save_head(str(tmp_path), "t")
    meta = json.loads((tmp_path / "head_config.json").read_text())
    assert meta["model_class"] == "DistilBertAdapterModel" and meta["name"] == "t"
    assert meta["config"]["label2id"] == {"O": 0, "B": 1, "I": 2, "X": 3}
    other = small_model()
    other.distilbert.load_state_dict(model.distilbert.state_dict())
    assert other.load_head(str(tmp_path), load_as="t2") == "t2"
    ids = torch.randint(1, 99, (2, 6))
    assert torch.equal(other(ids, head="t2").logits, model(ids, head="t").logits)


@pytest.mark.parametrize("safe", [True, False])
def test_heads_and_adapters_survive_save_pretrained(tmp_path, safe):
    model = small_model()
    model.add_adapter("a", config="double_seq_bn")
    model.add_classification_head("a", num_labels=3)
    model.add_masked_lm_head("mlm")
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path), safe_serialization=safe)
    loaded = DistilBertAdapterModel.from_pretrained(str(tmp_path))
    assert set(loaded.heads) == {"a", "mlm"} and set(loaded.adapters_config) == {"a"}
    assert loaded.heads["mlm"][3].weight is loaded.get_input_embeddings().weight
    ids = torch.randint(1, 99, (2, 6))
    for head in ("a", "mlm"):
        expected = model(ids, head=head, adapter_names="a").logits
        assert torch.equal(loaded(ids, head=head, adapter_names="a").logits, expected)
    assert os.path.isfile(tmp_path / "config.json")


def test_the_active_head_s_labels_become_the_config_s():
    """As the package: a single active head's labels are config.id2label / label2id (which
    pipelines read); a head without labels (masked LM) leaves them."""
    model = small_model()
    model.add_classification_head("sst", num_labels=2, id2label={0: "neg", 1: "pos"})
    assert model.config.id2label == {0: "neg", 1: "pos"} and model.config.label2id == {"neg": 0, "pos": 1}
    model.add_tagging_head("ner", num_labels=3, id2label={0: "O", 1: "B", 2: "I"})
    assert model.config.id2label == {0: "O", 1: "B", 2: "I"} and model.config.num_labels == 3
    model.add_masked_lm_head("mlm")
    assert model.config.id2label == {0: "O", 1: "B", 2: "I"}
    model.active_head = "sst"
    assert model.config.id2label == {0: "neg", 1: "pos"}
    model.add_classification_head("plain", num_labels=3)
    assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_a_task_class_config_alone_adds_no_head(tmp_path):
    """Only from_pretrained converts a task class's head (as the package): a model built from
    that checkpoint's config has no head."""
    DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG)).save_pretrained(str(tmp_path))
    assert list(DistilBertAdapterModel.from_pretrained(str(tmp_path)).heads) == ["default"]
    assert not DistilBertAdapterModel(DistilBertConfig.from_pretrained(str(tmp_path))).heads
    assert "ignore_mismatched_sizes" in inspect.signature(DistilBertAdapterModel.from_pretrained).parameters


def test_bad_head_input_gives_clear_errors():
    model = small_model()
    model.add_classification_head("c")
    ids = torch.randint(1, 99, (2, 5))
    with pytest.raises(ValueError, match="^head: no head named 'nope'"):
        model(ids, head="nope")
    with pytest.raises(ValueError, match="^active_head: no head named 'nope'"):
        model.active_head = "nope"
    model.delete_head("nope")  # as the package: nothing to delete is skipped (with a warning)
    assert list(model.heads) == ["c"]
    with pytest.raises(ValueError, match="already exists.*overwrite_ok"):
        model.add_classification_head("c")
    model.add_classification_head("c", num_labels=5, overwrite_ok=True)
    assert model(ids).logits.shape == (2, 5)
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        model.add_classification_head("d", num_labels=0)
    with pytest.raises(ValueError, match="layers must be a positive int"):
        model.add_tagging_head("d", layers=0)
    with pytest.raises(ValueError, match="num_labels must be 2"):
        model.add_qa_head("d", num_labels=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        model.add_classification_head("d", activation_function="cube")
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['label'\\]"):
        model(ids, label=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="does not take \\['start_positions'\\]"):
        model(ids, start_positions=torch.tensor([0, 1]))


def test_tagging_loss_skips_padding_as_the_package_does():
    model = small_model()
    model.add_tagging_head("t", num_labels=3)
    x = torch.randint(1, 99, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    labels = torch.randint(0, 3, (2, 6))
    out = model(x, attention_mask=mask, labels=labels)
    masked = labels.masked_fill(mask == 0, -100)
    assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits.view(-1, 3), masked.view(-1)), atol=1e-6)
    everything = torch.nn.functional.cross_entropy(out.logits.view(-1, 3), labels.view(-1))
    assert not torch.allclose(out.loss, everything)


def test_resize_token_embeddings_keeps_every_masked_lm_head_tied():
    model = small_model()
    model.add_masked_lm_head("m1")
    model.add_masked_lm_head("m2")  # active; m1 is not
    model.resize_token_embeddings(SMALL_CONFIG["vocab_size"] + 5)
    for name in ("m1", "m2"):
        projection = model.heads[name][3]
        assert projection.weight is model.get_input_embeddings().weight
        assert projection.bias.shape == (SMALL_CONFIG["vocab_size"] + 5,)
    out = model(torch.randint(1, 104, (2, 5)), head="m1", labels=torch.randint(0, 104, (2, 5)))
    assert out.logits.shape == (2, 5, 104) and out.loss.isfinite()
