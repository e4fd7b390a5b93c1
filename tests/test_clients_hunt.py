"""Client usage the other client tests leave out, each found to differ from transformers and
fixed: what a user of transformers' loading API or of accelerate gets from our classes (and from
a transformers model after optimize()), compared with what transformers' own classes give on the
same tiny random weights."""

import pytest
import torch

from conftest import SMALL_CONFIG, assert_close

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


# -- accelerate's offloading hooks ------------------------------------------------------------------


def _inputs(class_name):
    torch.manual_seed(1)
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: the batch would run packed
    if class_name == "DistilBertForMultipleChoice":
        return dict(input_ids=ids.unsqueeze(0), attention_mask=mask.unsqueeze(0))
    return dict(input_ids=ids, attention_mask=mask)


def _offload(how, model, tmp_path):
    accelerate = pytest.importorskip("accelerate")
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    # dispatch_model: one layer on disk (a hook on the block), the rest on the CPU
    base = model.base_model_prefix + "." if model.base_model is not model else ""
    device_map = {name: "cpu" for name, _ in model.named_children() if name != model.base_model_prefix}
    device_map.update({f"{base}embeddings": "cpu", f"{base}transformer.layer.0": "cpu",
                       f"{base}transformer.layer.1": "disk"})
    return accelerate.dispatch_model(model, device_map=device_map, main_device="cpu",
                                     offload_dir=str(tmp_path / "offload"))


@pytest.mark.parametrize("how", ["cpu_offload", "disk_offload", "dispatch_model"])
@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
                                        "DistilBertForTokenClassification", "DistilBertForQuestionAnswering",
                                        "DistilBertForMultipleChoice"])
def test_accelerate_offloaded_model_like_transformers(class_name, how, tmp_path):
    """accelerate's offloading (cpu_offload, disk_offload, dispatch_model with a layer on disk)
    keeps offloaded weights on the meta device and loads them in a hook around each module's own
    call. Our fused ops read weights without calling their modules (a bias folded into the next
    LayerNorm), so they met meta tensors: ours and a transformers model after optimize() failed
    where transformers' model runs. Each offloaded module now runs as its module, as a hooked one
    does, and the outputs equal transformers' (at every real position)."""
    hf = _save_hf(class_name, tmp_path / "hf", **dict(dropout=0.0, attention_dropout=0.0)).eval()
    inputs = _inputs(class_name)
    with torch.no_grad():
        expected = hf(**inputs)[0]
    ours = getattr(distilbert_fast, class_name).from_pretrained(tmp_path / "hf")
    optimized = distilbert_fast.optimize(getattr(transformers, class_name).from_pretrained(tmp_path / "hf").eval())
    real = inputs["attention_mask"].bool()
    for name, model in (("ours", ours), ("optimized", optimized)):
        model = _offload(how, model, tmp_path / name)
        assert any(p.device.type == "meta" for p in model.parameters())  # offloaded
        with torch.no_grad():
            out = model(**inputs)[0]
        if out.dim() == 3 or (out.dim() == 2 and out.shape == real.shape):  # token outputs: real positions
            out, ref = out[real], expected[real]
        else:
            out, ref = out, expected
        assert_close(out, ref, atol=1e-5, name=f"{name} after {how}")  # (fp32 parity, as test_clients)


# -- PEFT's FSDP wrap policy -------------------------------------------------------------------------


def test_peft_fsdp_wrap_policy_like_transformers(monkeypatch):
    """PEFT's ``fsdp_auto_wrap_policy(model)`` (what its FSDP recipes hand accelerate) joins the
    model's ``_no_split_modules``, which transformers' post_init makes a set; ours was the class
    default None, a TypeError there. Both now give the same policy."""
    pytest.importorskip("accelerate")
    other = pytest.importorskip("peft.utils.other")
    monkeypatch.delenv("FSDP_TRANSFORMER_CLS_TO_WRAP", raising=False)
    config = dict(SMALL_CONFIG, num_labels=2)
    hf = transformers.DistilBertForSequenceClassification(transformers.DistilBertConfig(**config))
    ours = distilbert_fast.DistilBertForSequenceClassification(distilbert_fast.DistilBertConfig(**config))
    assert ours._no_split_modules == hf._no_split_modules == set()
    policies = [other.fsdp_auto_wrap_policy(model).keywords["policies"] for model in (hf, ours)]
    wrapped = [[p.keywords.get("transformer_layer_cls") for p in policy] for policy in policies]
    assert wrapped[0] == wrapped[1]
