"""Client usage the other client tests leave out, each found to differ from transformers and
fixed: what a user of transformers' loading API or of accelerate gets from our classes (and from
a transformers model after optimize()), compared with what transformers' own classes give on the
same tiny random weights."""

import pytest
import torch

from conftest import SMALL_CONFIG

import distilbert_fast

transformers = pytest.importorskip("transformers")


def _save_hf(class_name, path, **overrides):
    """A tiny random transformers model of ``class_name``, saved in ``path``."""
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(transformers.DistilBertConfig(**{**SMALL_CONFIG, **overrides}))
    model.save_pretrained(path)
    return model


# -- from_pretrained(output_loading_info=True) -------------------------------------------------------


@pytest.mark.parametrize("saved,loaded,kwargs", [
    ("DistilBertForMaskedLM", "DistilBertForSequenceClassification", {}),   # missing and unexpected
    ("DistilBertModel", "DistilBertForMaskedLM", {}),                       # tied head: missing, not the tied weight
    ("DistilBertForQuestionAnswering", "DistilBertModel", {}),              # prefix stripped, head unexpected
    ("DistilBertForSequenceClassification", "DistilBertForSequenceClassification",
     dict(num_labels=5, ignore_mismatched_sizes=True)),                     # re-initialised classifier
    ("DistilBertForTokenClassification", "DistilBertForTokenClassification", {}),  # a complete load
])
def test_output_loading_info_like_transformers(saved, loaded, kwargs, tmp_path):
    """``model, info = X.from_pretrained(path, output_loading_info=True)`` (the usual check that a
    fine-tuning head was freshly initialised) returned our model alone, so the unpacking failed;
    it returns transformers' (model, info): the same keys in the same types."""
    _save_hf(saved, tmp_path)
    _, expected = getattr(transformers, loaded).from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    model, info = getattr(distilbert_fast, loaded).from_pretrained(tmp_path, output_loading_info=True, **kwargs)
    assert isinstance(model, getattr(distilbert_fast, loaded))
    assert info == expected
    assert {key: type(value) for key, value in info.items()} == {key: type(value) for key, value in expected.items()}
    assert not isinstance(getattr(distilbert_fast, loaded).from_pretrained(tmp_path, **kwargs), tuple)
