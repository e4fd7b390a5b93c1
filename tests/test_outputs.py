"""Model outputs behave like HuggingFace's ModelOutput: attribute, key, index, to_tuple."""

import pickle

import pytest
import torch
import transformers.modeling_outputs as hf_outputs

import distilbert_fast.outputs as outputs

CLASSES = [
    "BaseModelOutput",
    "MaskedLMOutput",
    "SequenceClassifierOutput",
    "TokenClassifierOutput",
    "MultipleChoiceModelOutput",
    "QuestionAnsweringModelOutput",
]


@pytest.mark.parametrize("name", CLASSES)
def test_same_fields_as_huggingface(name):
    ours = getattr(outputs, name)
    hf = getattr(hf_outputs, name)
    assert list(ours.__dataclass_fields__) == list(hf.__dataclass_fields__)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("set_fields", [(0,), (1,), (0, 2), (1, 3), (0, 1, 2, 3)])
def test_access_matches_huggingface(name, set_fields):
    ours_cls, hf_cls = getattr(outputs, name), getattr(hf_outputs, name)
    field_names = list(ours_cls.__dataclass_fields__)
    values = {field_names[i]: torch.full((2,), float(i)) for i in set_fields if i < len(field_names)}
    ours, hf = ours_cls(**values), hf_cls(**values)
    assert list(ours.keys()) == list(hf.keys())
    assert len(ours.to_tuple()) == len(hf.to_tuple()) == len(values)
    for i in range(len(values)):
        assert ours[i] is hf[i]
    assert ours[:] == hf[:]
    for key in values:
        assert ours[key] is values[key] and getattr(ours, key) is values[key]
    for field in field_names:
        if field not in values:
            assert getattr(ours, field) is None
            with pytest.raises(KeyError):
                ours[field]


@pytest.mark.parametrize("how", ["attribute", "key"])
def test_setting_a_field_like_huggingface(how):
    ours = outputs.SequenceClassifierOutput(logits=torch.ones(1))
    hf = hf_outputs.SequenceClassifierOutput(logits=ours.logits)
    loss, new_logits = torch.tensor(0.5), torch.zeros(1)
    for out in (ours, hf):
        if how == "attribute":
            out.loss, out.logits = loss, new_logits
        else:
            out["loss"], out["logits"] = loss, new_logits
    assert list(ours.keys()) == list(hf.keys())
    assert ours.loss is loss and ours["loss"] is loss and ours["logits"] is new_logits
    assert [id(t) for t in ours.to_tuple()] == [id(t) for t in hf.to_tuple()]


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("set_fields", [(0,), (1,), (0, 2), (1, 3)])
def test_made_from_one_mapping_like_huggingface(name, set_fields):
    """type(out)({...}) takes its fields from the mapping, as accelerate's convert_to_fp32 rebuilds
    outputs under mixed precision (Trainer with bf16=True)."""
    ours_cls, hf_cls = getattr(outputs, name), getattr(hf_outputs, name)
    field_names = list(ours_cls.__dataclass_fields__)
    values = {field_names[i]: torch.full((2,), float(i)) for i in set_fields if i < len(field_names)}
    ours, hf = ours_cls(dict(values)), hf_cls(dict(values))
    assert list(ours.keys()) == list(hf.keys()) == list(values)
    for field in field_names:
        assert getattr(ours, field) is values.get(field)
    assert [id(t) for t in ours.to_tuple()] == [id(t) for t in hf.to_tuple()]


def test_keys_cannot_be_removed():
    out = outputs.BaseModelOutput(last_hidden_state=torch.ones(1))
    for remove in (lambda: out.pop("last_hidden_state"), lambda: out.__delitem__("last_hidden_state"),
                   lambda: out.update(a=1), lambda: out.setdefault("a", 1)):
        with pytest.raises(TypeError):
            remove()
    assert list(out.keys()) == ["last_hidden_state"]


def test_pickle_round_trip():
    out = outputs.QuestionAnsweringModelOutput(start_logits=torch.arange(3.0), end_logits=torch.arange(3.0) + 1)
    back = pickle.loads(pickle.dumps(out))
    assert type(back) is type(out)
    assert list(back.keys()) == ["start_logits", "end_logits"]
    assert torch.equal(back.end_logits, out.end_logits)


def test_pytree_flatten_and_unflatten():
    out = outputs.BaseModelOutput(last_hidden_state=torch.ones(2, 3), attentions=(torch.zeros(1),))
    leaves, spec = torch.utils._pytree.tree_flatten(out)
    assert len(leaves) == 2
    rebuilt = torch.utils._pytree.tree_unflatten([leaf + 1 for leaf in leaves], spec)
    # where transformers is loaded (as in these tests) the output is our class's transformers twin
    assert isinstance(rebuilt, outputs.BaseModelOutput) and type(rebuilt) is type(out)
    assert torch.equal(rebuilt.last_hidden_state, torch.full((2, 3), 2.0))
    assert rebuilt.hidden_states is None


def test_is_a_dict_like_huggingface():
    out = outputs.MaskedLMOutput(logits=torch.ones(1))
    assert isinstance(out, dict)
    assert dict(out) == {"logits": out.logits}
