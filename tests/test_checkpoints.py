"""Checkpoints in HuggingFace's layout: HF -> ours and ours -> HF, both formats, sharded and not;
prefix adaptation, tied weights, legacy names, from_pretrained's options, config.json round-trips,
and a real pretrained checkpoint run through our model."""

import json
import os
import re
import warnings

import pytest
import torch
import transformers
import conftest
from conftest import CLASS_NAMES, REFERENCE_ATTN, SMALL_CONFIG, assert_close, hf_forward, reference_vocab_dir
from safetensors.torch import load_file, save_file

import distilbert_fast
from distilbert_fast.bert import bert_to_distilbert, distilbert_config_from_bert
from distilbert_fast.checkpoint import CheckpointWarning, load_into_model

TASK_CLASSES = [name for name in CLASS_NAMES if name != "DistilBertModel"]
SAFE, BIN = "model.safetensors", "pytorch_model.bin"


# -- helpers -------------------------------------------------------------------------------------


def make_pair(class_name, **overrides):
    """conftest.make_pair with every parameter perturbed, so that LayerNorm weights are not all
    ones and biases not all zeros: a loader that drops or swaps any tensor changes the outputs."""
    hf, ours = conftest.make_pair(class_name, **overrides)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def make_inputs(class_name, batch=2, seq=7):
    """Token ids with a padded tail in the second row; (batch, choices, seq) for multiple choice."""
    shape = (batch, 3, seq) if class_name == "DistilBertForMultipleChoice" else (batch, seq)
    input_ids = torch.randint(1, SMALL_CONFIG["vocab_size"], shape)
    attention_mask = torch.ones(shape, dtype=torch.long)
    attention_mask[1, ..., seq - 2 :] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def assert_same_outputs(ours_out, hf_out, atol=1e-5, attention_mask=None):
    """Field by field; token-level fields at real positions only when an attention_mask is given
    (padding positions of a packed run hold zeros)."""
    ours_out = conftest.real_positions_only(ours_out, attention_mask)
    hf_out = conftest.real_positions_only(hf_out, attention_mask)
    ours_t, hf_t = ours_out.to_tuple(), hf_out.to_tuple()
    assert len(ours_t) == len(hf_t), f"{len(ours_t)} output fields vs HF's {len(hf_t)}"
    for i, (a, b) in enumerate(zip(ours_t, hf_t)):
        if isinstance(a, tuple):
            assert len(a) == len(b)
            for j, (x, y) in enumerate(zip(a, b)):
                assert_close(x, y, atol=atol, name=f"output[{i}][{j}]")
        else:
            assert_close(a, b, atol=atol, name=f"output[{i}]")


def checkpoint_warnings(record):
    return [w for w in record if issubclass(w.category, CheckpointWarning)]


def load_quietly(cls, directory, **kwargs):
    """from_pretrained, asserting that it raises no CheckpointWarning."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = cls.from_pretrained(directory, **kwargs)
    found = checkpoint_warnings(record)
    assert not found, f"unexpected CheckpointWarning: {[str(w.message) for w in found]}"
    return model


def load_with_one_warning(cls, directory, **kwargs):
    """from_pretrained, asserting exactly one CheckpointWarning; returns (model, its message)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = cls.from_pretrained(directory, **kwargs)
    found = checkpoint_warnings(record)
    assert len(found) == 1, f"expected one CheckpointWarning, got {[str(w.message) for w in found]}"
    return model, str(found[0].message)


def hf_load(class_name, directory, **kwargs):
    """HF's from_pretrained with the reference attention, asserting a complete, exact load."""
    model, info = getattr(transformers, class_name).from_pretrained(
        directory, attn_implementation=REFERENCE_ATTN, output_loading_info=True, **kwargs
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval(), info


def write_bin_checkpoint(hf_model, directory):
    """HF 5 always writes safetensors, so a pytorch_model.bin checkpoint is written by hand: the
    config plus torch.save of the full state_dict (which, as transformers 4 wrote it, includes the
    tied vocab_projector.weight)."""
    hf_model.config.save_pretrained(directory)
    torch.save(hf_model.state_dict(), os.path.join(directory, BIN))


def check_sharded_layout(directory, weights_name, max_bytes=None):
    """The directory holds a HuggingFace-style sharded checkpoint: '<stem>-0000i-of-0000N.<ext>'
    shards numbered 1..N, an index '<weights_name>.index.json' with metadata.total_size and a
    weight_map that names exactly the tensors each shard holds, and no unsharded file."""
    stem, ext = weights_name.rsplit(".", 1)
    files = sorted(os.listdir(directory))
    shards = [f for f in files if re.fullmatch(rf"{re.escape(stem)}-\d{{5}}-of-\d{{5}}\.{ext}", f)]
    n = len(shards)
    assert n > 1, files
    assert shards == [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1)], shards
    assert weights_name not in files
    assert not [f for f in files if f.startswith(".")], f"temporary files left: {files}"
    with open(os.path.join(directory, weights_name + ".index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert set(index) >= {"metadata", "weight_map"}
    weight_map = index["weight_map"]
    assert set(weight_map.values()) == set(shards)
    total = 0
    all_keys = set()
    for shard in shards:
        tensors = read_tensors(os.path.join(directory, shard))
        assert set(tensors) == {k for k, v in weight_map.items() if v == shard}, shard
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if max_bytes is not None and len(tensors) > 1:
            assert size <= max_bytes, f"{shard} holds {size} bytes > {max_bytes}"
        total += size
        all_keys |= set(tensors)
    assert index["metadata"]["total_size"] == total
    return all_keys


def read_tensors(path):
    if path.endswith(".safetensors"):
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


# -- HF-saved checkpoints into ours, ours into HF ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_hf_checkpoint_loads_into_ours(tmp_path, class_name, fmt):
    hf, _ = make_pair(class_name)
    if fmt == "safetensors":
        hf.save_pretrained(tmp_path)
        assert (tmp_path / SAFE).is_file() and not (tmp_path / BIN).exists()
    else:
        write_bin_checkpoint(hf, tmp_path)
    ours = load_quietly(getattr(distilbert_fast, class_name), tmp_path)
    assert type(ours).__name__ == class_name
    inputs = make_inputs(class_name)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    hf_sd = hf.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, hf_sd[key]), key


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_our_checkpoint_loads_into_hf(tmp_path, class_name, safe):
    _, ours = make_pair(class_name)
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    weights = SAFE if safe else BIN
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights])
    hf, _ = hf_load(class_name, tmp_path)
    inputs = make_inputs(class_name)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    # and back into ours, unchanged
    again = load_quietly(getattr(distilbert_fast, class_name), tmp_path)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_untied_mlm_round_trips_through_hf(tmp_path):
    _, ours = make_pair("DistilBertForMaskedLM", tie_word_embeddings=False)
    with torch.no_grad():
        ours.vocab_projector.weight.add_(0.5)  # differs from the word embeddings
    assert ours.vocab_projector.weight is not ours.distilbert.embeddings.word_embeddings.weight
    ours.save_pretrained(tmp_path)
    assert "vocab_projector.weight" in load_file(str(tmp_path / SAFE))
    hf, _ = hf_load("DistilBertForMaskedLM", tmp_path)
    assert hf.vocab_projector.weight is not hf.distilbert.embeddings.word_embeddings.weight
    assert torch.equal(hf.vocab_projector.weight, ours.vocab_projector.weight)
    back = load_quietly(distilbert_fast.DistilBertForMaskedLM, tmp_path)
    assert back.vocab_projector.weight is not back.distilbert.embeddings.word_embeddings.weight
    assert torch.equal(back.vocab_projector.weight, ours.vocab_projector.weight)
    inputs = make_inputs("DistilBertForMaskedLM")
    with torch.no_grad():
        assert_same_outputs(back(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])


# -- sharded checkpoints ----------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [True, False])
def test_our_sharded_checkpoint_layout_and_hf_load(tmp_path, safe):
    class_name = "DistilBertForMaskedLM"
    _, ours = make_pair(class_name)
    ours.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    keys = check_sharded_layout(tmp_path, SAFE if safe else BIN, max_bytes=20_000)
    # every tensor saved once: the tied vocab_projector.weight is left out, as HF does
    assert keys == set(ours.state_dict()) - {"vocab_projector.weight"}
    hf, _ = hf_load(class_name, tmp_path)
    assert hf.vocab_projector.weight is hf.distilbert.embeddings.word_embeddings.weight
    inputs = make_inputs(class_name)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    back = load_quietly(distilbert_fast.DistilBertForMaskedLM, tmp_path)
    assert back.vocab_projector.weight is back.distilbert.embeddings.word_embeddings.weight
    with torch.no_grad():
        assert_same_outputs(back(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])


def test_our_shards_match_hf_shard_names(tmp_path):
    hf, ours = make_pair("DistilBertForSequenceClassification")
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    ours.save_pretrained(tmp_path / "ours", max_shard_size="20KB")
    hf_keys = check_sharded_layout(tmp_path / "hf", SAFE)
    our_keys = check_sharded_layout(tmp_path / "ours", SAFE)
    assert hf_keys == our_keys
    hf_index = json.loads((tmp_path / "hf" / (SAFE + ".index.json")).read_text())
    our_index = json.loads((tmp_path / "ours" / (SAFE + ".index.json")).read_text())
    assert our_index["metadata"]["total_size"] == hf_index["metadata"]["total_size"]
    assert set(our_index["weight_map"]) == set(hf_index["weight_map"])


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForMultipleChoice"])
def test_hf_sharded_checkpoint_loads_into_ours(tmp_path, class_name, fmt):
    hf, _ = make_pair(class_name)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    check_sharded_layout(tmp_path, SAFE)
    if fmt == "bin":
        # HF 5 no longer writes .bin; convert its shards to the pytorch_model-0000i-of-0000N.bin
        # layout transformers 4 wrote, with a pytorch_model.bin.index.json
        index = json.loads((tmp_path / (SAFE + ".index.json")).read_text())
        renamed = {}
        for shard in sorted(set(index["weight_map"].values())):
            new = shard.replace("model-", "pytorch_model-").replace(".safetensors", ".bin")
            torch.save(load_file(str(tmp_path / shard)), tmp_path / new)
            (tmp_path / shard).unlink()
            renamed[shard] = new
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (tmp_path / (BIN + ".index.json")).write_text(json.dumps(index))
        (tmp_path / (SAFE + ".index.json")).unlink()
        check_sharded_layout(tmp_path, BIN)
    ours = load_quietly(getattr(distilbert_fast, class_name), tmp_path)
    inputs = make_inputs(class_name)
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("safe", [True, False])
def test_resaving_removes_stale_shards(tmp_path, safe):
    weights = SAFE if safe else BIN
    stem = weights.rsplit(".", 1)[0]
    _, ours = make_pair("DistilBertForSequenceClassification")
    (tmp_path / "notes.txt").write_text("keep me")
    ours.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    many = [f for f in os.listdir(tmp_path) if f.startswith(stem + "-")]
    assert len(many) > 2
    # fewer, larger shards: the old "-of-0000N" files must go
    ours.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="40KB")
    fewer = [f for f in os.listdir(tmp_path) if f.startswith(stem + "-")]
    assert 1 < len(fewer) < len(many)
    check_sharded_layout(tmp_path, weights)
    # unsharded into the same directory: no shard and no index left
    ours.save_pretrained(tmp_path, safe_serialization=safe)
    assert sorted(os.listdir(tmp_path)) == sorted(["config.json", weights, "notes.txt"])
    load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path)
    # and sharded again: the unsharded file goes
    ours.save_pretrained(tmp_path, safe_serialization=safe, max_shard_size="20KB")
    assert weights not in os.listdir(tmp_path)
    check_sharded_layout(tmp_path, weights)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# -- the 'distilbert.' prefix and the one-warning report ------------------------------------------------


@pytest.mark.parametrize("class_name", TASK_CLASSES)
def test_base_checkpoint_loads_into_task_model(tmp_path, class_name):
    _, base = make_pair("DistilBertModel")
    base.save_pretrained(tmp_path)
    assert all(not k.startswith("distilbert.") for k in load_file(str(tmp_path / SAFE)))
    cls = getattr(distilbert_fast, class_name)
    task, message = load_with_one_warning(cls, tmp_path)

    # the base weights arrived under the prefix
    for key, value in base.state_dict().items():
        assert torch.equal(task.state_dict()["distilbert." + key], value), key
    # the warning names exactly the head weights, as HF's loading report does
    _, info = getattr(transformers, class_name).from_pretrained(tmp_path, output_loading_info=True)
    expected_missing = set(info["missing_keys"])
    assert expected_missing and not info["unexpected_keys"]
    for key in expected_missing:
        assert repr(key) in message, f"{key} not in warning: {message}"
    assert "vocab_projector.weight'" not in message  # tied, so not missing
    assert "distilbert." not in message
    fresh = cls(task.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)
        missing, unexpected = load_into_model(fresh, load_file(str(tmp_path / SAFE)))
    assert set(missing) == expected_missing
    assert unexpected == []
    ids = make_inputs(class_name)
    with torch.no_grad():
        flat = {k: v.reshape(-1, v.shape[-1]) for k, v in ids.items()}
        assert_close(task.distilbert(**flat).last_hidden_state, base(**flat).last_hidden_state, name="base")


@pytest.mark.parametrize("class_name", TASK_CLASSES)
def test_task_checkpoint_loads_into_base_model(tmp_path, class_name):
    hf_task, _ = make_pair(class_name)
    hf_task.save_pretrained(tmp_path)
    base, message = load_with_one_warning(distilbert_fast.DistilBertModel, tmp_path)
    _, info = transformers.DistilBertModel.from_pretrained(tmp_path, output_loading_info=True)
    expected_unexpected = set(info["unexpected_keys"])
    assert expected_unexpected and not info["missing_keys"]
    for key in expected_unexpected:
        assert repr(key) in message, f"{key} not in warning: {message}"
    assert "lacks 0 keys" in message
    inputs = {k: v.reshape(-1, v.shape[-1]) for k, v in make_inputs(class_name).items()}
    real = inputs["attention_mask"].bool()  # padding positions of a packed run hold zeros
    with torch.no_grad():
        assert_close(
            base(**inputs).last_hidden_state[real],
            hf_forward(hf_task.distilbert, **inputs).last_hidden_state[real],
            name="last_hidden_state",
        )


def test_one_warning_lists_missing_and_unexpected(tmp_path):
    hf_qa, _ = make_pair("DistilBertForQuestionAnswering")
    hf_qa.save_pretrained(tmp_path)
    model, message = load_with_one_warning(distilbert_fast.DistilBertForSequenceClassification, tmp_path)
    for key in ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"]:
        assert repr(key) in message
    for key in ["qa_outputs.weight", "qa_outputs.bias"]:
        assert repr(key) in message
    assert torch.equal(
        model.distilbert.embeddings.word_embeddings.weight, hf_qa.distilbert.embeddings.word_embeddings.weight
    )


def test_complete_mlm_safetensors_without_tied_key_loads_silently(tmp_path):
    hf, _ = make_pair("DistilBertForMaskedLM")
    hf.save_pretrained(tmp_path)
    assert "vocab_projector.weight" not in load_file(str(tmp_path / SAFE))  # HF drops the tied key
    ours = load_quietly(distilbert_fast.DistilBertForMaskedLM, tmp_path)
    assert ours.vocab_projector.weight is ours.distilbert.embeddings.word_embeddings.weight
    assert torch.equal(ours.vocab_projector.weight, hf.distilbert.embeddings.word_embeddings.weight)


# -- tied weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("with_projector_key", [True, False])
def test_tied_weights_retied_after_load(tmp_path, with_projector_key):
    hf, _ = make_pair("DistilBertForMaskedLM")
    state_dict = {k: v.clone() for k, v in hf.state_dict().items()}
    if with_projector_key:
        assert "vocab_projector.weight" in state_dict
    else:
        del state_dict["vocab_projector.weight"]
    hf.config.save_pretrained(tmp_path)
    save_file(state_dict, str(tmp_path / SAFE))
    ours = load_quietly(distilbert_fast.DistilBertForMaskedLM, tmp_path)
    embedding = ours.distilbert.embeddings.word_embeddings.weight
    assert ours.vocab_projector.weight is embedding
    assert isinstance(embedding, torch.nn.Parameter)
    assert torch.equal(embedding, state_dict["distilbert.embeddings.word_embeddings.weight"])
    assert len({id(p) for p in ours.parameters()}) == len(list(ours.parameters()))
    inputs = make_inputs("DistilBertForMaskedLM")
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    # still tied afterwards: a change to one is a change to the other
    with torch.no_grad():
        embedding[3].fill_(1.0)
    assert torch.equal(ours.vocab_projector.weight[3], torch.ones(SMALL_CONFIG["dim"]))


# -- legacy key names -----------------------------------------------------------------------------


def test_legacy_gamma_beta_and_position_ids_keys(tmp_path):
    hf, _ = make_pair("DistilBertForSequenceClassification")
    legacy = {}
    for key, value in hf.state_dict().items():
        if "LayerNorm" in key or "layer_norm" in key:
            key = re.sub(r"\.weight$", ".gamma", re.sub(r"\.bias$", ".beta", key))
        legacy[key] = value.clone()
    assert any(k.endswith(".gamma") for k in legacy) and any(k.endswith(".beta") for k in legacy)
    legacy["distilbert.embeddings.position_ids"] = torch.arange(SMALL_CONFIG["max_position_embeddings"])[None]
    hf.config.save_pretrained(tmp_path)
    save_file(legacy, str(tmp_path / SAFE))
    ours = load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path)
    inputs = make_inputs("DistilBertForSequenceClassification")
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    assert "distilbert.embeddings.position_ids" not in ours.state_dict()  # not persisted by ours


def test_legacy_names_in_base_checkpoint_into_task_model(tmp_path):
    # old base checkpoints: no prefix, gamma/beta, persisted position_ids, all at once
    hf, base = make_pair("DistilBertModel")
    legacy = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", k): v.clone() for k, v in hf.state_dict().items()}
    legacy["embeddings.position_ids"] = torch.arange(SMALL_CONFIG["max_position_embeddings"])[None]
    hf.config.save_pretrained(tmp_path)
    torch.save(legacy, tmp_path / BIN)
    task, message = load_with_one_warning(distilbert_fast.DistilBertForTokenClassification, tmp_path)
    assert "gamma" not in message and "position_ids" not in message
    for key, value in base.state_dict().items():
        assert torch.equal(task.distilbert.state_dict()[key], value), key


# -- from_pretrained's options ---------------------------------------------------------------------


def test_use_safetensors_selects_the_format(tmp_path):
    hf_a, _ = make_pair("DistilBertModel")
    torch.manual_seed(1)
    hf_b, _ = make_pair("DistilBertModel")
    hf_a.save_pretrained(tmp_path)  # model.safetensors: weights A
    torch.save(hf_b.state_dict(), tmp_path / BIN)  # pytorch_model.bin: weights B
    key = "embeddings.word_embeddings.weight"
    a, b = hf_a.state_dict()[key], hf_b.state_dict()[key]
    assert not torch.equal(a, b)
    cls = distilbert_fast.DistilBertModel
    assert torch.equal(load_quietly(cls, tmp_path).state_dict()[key], a)  # safetensors preferred
    assert torch.equal(load_quietly(cls, tmp_path, use_safetensors=True).state_dict()[key], a)
    assert torch.equal(load_quietly(cls, tmp_path, use_safetensors=False).state_dict()[key], b)
    os.remove(tmp_path / SAFE)
    assert torch.equal(load_quietly(cls, tmp_path).state_dict()[key], b)  # falls back to .bin
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cls.from_pretrained(tmp_path, use_safetensors=True)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"dtype": "float16"}, torch.float16),
        ({"dtype": torch.bfloat16}, torch.bfloat16),
        ({"torch_dtype": "float16"}, torch.float16),
        ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
        ({"dtype": torch.float64}, torch.float64),
        ({}, torch.float32),
    ],
)
def test_dtype_sets_model_dtype(tmp_path, kwargs, expected):
    hf, _ = make_pair("DistilBertForMaskedLM")
    hf.save_pretrained(tmp_path)
    ours = load_quietly(distilbert_fast.DistilBertForMaskedLM, tmp_path, **kwargs)
    assert ours.dtype == expected
    assert ours.config.dtype == str(expected).removeprefix("torch.")  # as transformers' config records it
    assert all(p.dtype == expected for p in ours.parameters())
    assert ours.vocab_projector.weight is ours.distilbert.embeddings.word_embeddings.weight
    for key, value in hf.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value.to(expected)), key


def test_dtype_auto_follows_the_checkpoint(tmp_path):
    hf, _ = make_pair("DistilBertForSequenceClassification")
    hf.half().save_pretrained(tmp_path)
    assert load_file(str(tmp_path / SAFE))["classifier.weight"].dtype == torch.float16
    for kwargs in ({"dtype": "auto"}, {"torch_dtype": "auto"}):
        ours = load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path, **kwargs)
        assert ours.dtype == torch.float16
        assert all(p.dtype == torch.float16 for p in ours.parameters())
        for key, value in hf.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    # an fp32 checkpoint stays fp32 under 'auto'
    hf32, _ = make_pair("DistilBertModel")
    hf32.save_pretrained(tmp_path / "fp32")
    assert load_quietly(distilbert_fast.DistilBertModel, tmp_path / "fp32", dtype="auto").dtype == torch.float32


def test_backend_argument(tmp_path):
    hf, _ = make_pair("DistilBertModel")
    hf.save_pretrained(tmp_path)
    ours = load_quietly(distilbert_fast.DistilBertModel, tmp_path, backend="eager")
    assert ours.backend == "eager" and ours.config.backend == "eager"
    inputs = make_inputs("DistilBertModel")
    with torch.no_grad():
        assert_same_outputs(ours(**inputs), hf_forward(hf, **inputs), attention_mask=inputs["attention_mask"])
    assert distilbert_fast.last_backend("varlen_attention") == "eager"  # padded batch, run packed
    # a runtime choice, not part of the checkpoint
    ours.save_pretrained(tmp_path / "resaved")
    assert "backend" not in json.loads((tmp_path / "resaved" / "config.json").read_text())
    auto = load_quietly(distilbert_fast.DistilBertModel, tmp_path, backend="auto")
    assert auto.backend == "auto" and auto.config.backend is None


def test_config_argument_overrides_config_json(tmp_path):
    hf, _ = make_pair("DistilBertForSequenceClassification")
    hf.save_pretrained(tmp_path)
    config = distilbert_fast.DistilBertConfig(**SMALL_CONFIG, output_attentions=True, dropout=0.3)
    ours = load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path, config=config)
    assert ours.config is config
    assert ours.config.dropout == 0.3
    inputs = make_inputs("DistilBertForSequenceClassification")
    with torch.no_grad():
        out = ours(**inputs)
        ref = hf_forward(hf, **inputs, output_attentions=True)
    assert len(out.attentions) == SMALL_CONFIG["n_layers"]
    assert_same_outputs(out, ref)
    # config= plus keyword overrides
    config = distilbert_fast.DistilBertConfig(**SMALL_CONFIG)
    ours = load_quietly(
        distilbert_fast.DistilBertForSequenceClassification, tmp_path, config=config, output_hidden_states=True
    )
    assert ours.config.output_hidden_states is True


def test_config_kwargs_are_applied(tmp_path):
    hf, _ = make_pair("DistilBertModel")
    hf.save_pretrained(tmp_path)
    ours = load_quietly(distilbert_fast.DistilBertModel, tmp_path, output_hidden_states=True, return_dict=False)
    assert ours.config.output_hidden_states is True and ours.config.return_dict is False
    inputs = make_inputs("DistilBertModel")
    with torch.no_grad():
        out = ours(**inputs)
        ref = hf_forward(hf, **inputs, output_hidden_states=True)
    assert isinstance(out, tuple) and len(out) == 2
    assert len(out[1]) == SMALL_CONFIG["n_layers"] + 1
    real = inputs["attention_mask"].bool()  # padding positions of a packed run hold zeros
    for i, (a, b) in enumerate(zip(out[1], ref.hidden_states)):
        assert_close(a[real], b[real], name=f"hidden_states[{i}]")
    # a kwarg that is not a field of the file is kept, like HF
    ours = load_quietly(distilbert_fast.DistilBertModel, tmp_path, my_flag=7)
    assert ours.config.my_flag == 7


def test_from_pretrained_returns_eval_mode(tmp_path):
    _, ours = make_pair("DistilBertForSequenceClassification")
    ours.train().save_pretrained(tmp_path)
    loaded = load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path)
    assert not loaded.training
    assert not any(m.training for m in loaded.modules())
    inputs = make_inputs("DistilBertForSequenceClassification")
    with torch.no_grad():  # dropout off: deterministic
        assert torch.equal(loaded(**inputs).logits, loaded(**inputs).logits)


# -- config.json round trips -------------------------------------------------------------------------

CONFIG_FIELDS = [
    "vocab_size", "max_position_embeddings", "sinusoidal_pos_embds", "n_layers", "n_heads", "dim",
    "hidden_dim", "dropout", "attention_dropout", "activation", "initializer_range", "qa_dropout",
    "seq_classif_dropout", "pad_token_id", "tie_word_embeddings", "id2label", "label2id",
    "num_labels", "problem_type", "hidden_size", "num_attention_heads", "num_hidden_layers",
]

CUSTOM_CONFIG = dict(
    SMALL_CONFIG,
    activation="relu",
    dropout=0.05,
    attention_dropout=0.15,
    qa_dropout=0.3,
    seq_classif_dropout=0.25,
    sinusoidal_pos_embds=True,
    initializer_range=0.05,
    pad_token_id=1,
    tie_word_embeddings=False,
    id2label={0: "neg", 1: "neu", 2: "pos"},
    label2id={"neg": 0, "neu": 1, "pos": 2},  # HF 5 leaves label2id None unless given
    problem_type="single_label_classification",
)


def test_our_config_json_reads_in_hf(tmp_path):
    ours = distilbert_fast.DistilBertConfig(**CUSTOM_CONFIG)
    ours.save_pretrained(tmp_path)
    hf = transformers.DistilBertConfig.from_pretrained(tmp_path)
    for field in CONFIG_FIELDS:
        assert getattr(hf, field) == getattr(ours, field), field
    assert hf.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert hf.label2id == {"neg": 0, "neu": 1, "pos": 2}


def test_hf_config_json_round_trips_through_ours(tmp_path):
    hf_config = transformers.DistilBertConfig(**CUSTOM_CONFIG)
    hf_model = transformers.DistilBertForSequenceClassification(hf_config)
    hf_model.save_pretrained(tmp_path / "hf")
    hf_json = json.loads((tmp_path / "hf" / "config.json").read_text())
    # what HF writes: string label keys, architectures, its version and the dtype
    assert hf_json["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert hf_json["label2id"] == {"neg": 0, "neu": 1, "pos": 2}
    assert hf_json["architectures"] == ["DistilBertForSequenceClassification"]
    assert "transformers_version" in hf_json and hf_json["dtype"] == "float32"

    ours = distilbert_fast.DistilBertConfig.from_pretrained(tmp_path / "hf")
    assert ours.id2label == {0: "neg", 1: "neu", 2: "pos"}
    assert ours.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert ours.num_labels == 3
    assert ours.architectures == ["DistilBertForSequenceClassification"]
    assert ours.transformers_version == hf_json["transformers_version"]
    assert ours.dtype == "float32"
    for field in CONFIG_FIELDS:
        assert getattr(ours, field) == getattr(hf_config, field), field

    ours.save_pretrained(tmp_path / "ours")
    our_json = json.loads((tmp_path / "ours" / "config.json").read_text())
    for key, value in hf_json.items():
        assert our_json.get(key, "<absent>") == value, key
    again = transformers.DistilBertConfig.from_pretrained(tmp_path / "ours")
    for field in CONFIG_FIELDS:
        assert getattr(again, field) == getattr(hf_config, field), field
    assert distilbert_fast.DistilBertConfig.from_pretrained(tmp_path / "ours") == ours

    # HF 5 writes "label2id": null when only id2label was given; ours derives it, as HF 4 did
    hf_json["label2id"] = None
    (tmp_path / "hf" / "config.json").write_text(json.dumps(hf_json))
    assert transformers.DistilBertConfig.from_pretrained(tmp_path / "hf").label2id is None
    derived = distilbert_fast.DistilBertConfig.from_pretrained(tmp_path / "hf")
    assert derived.label2id == {"neg": 0, "neu": 1, "pos": 2}

    # and the model built from it loads HF's weights
    model = load_quietly(distilbert_fast.DistilBertForSequenceClassification, tmp_path / "hf")
    assert model.classifier.out_features == 3
    assert model.config.problem_type == "single_label_classification"


# -- a real pretrained checkpoint ------------------------------------------------------------------


def test_real_minilm_checkpoint_matches_bert(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    path = reference_vocab_dir()
    bert_config = json.loads(open(os.path.join(path, "config.json"), encoding="utf-8").read())
    config = distilbert_config_from_bert(bert_config)
    assert (config.dim, config.n_layers, config.n_heads, config.hidden_dim) == (384, 6, 12, 1536)
    state_dict = bert_to_distilbert(load_file(os.path.join(path, "model.safetensors")))

    # through our checkpoint writer and from_pretrained, not just load_state_dict
    config.save_pretrained(tmp_path)
    save_file(state_dict, str(tmp_path / SAFE))
    ours = load_quietly(distilbert_fast.DistilBertModel, tmp_path)
    assert set(ours.state_dict()) == set(state_dict)

    tokenizer = tokenizers.Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    sentences = [
        "The quick brown fox jumps over the lazy dog.",
        "DistilBERT is a smaller, faster transformer.",
        "Hello world!",
    ]
    encodings = tokenizer.encode_batch(sentences)
    input_ids = torch.tensor([e.ids for e in encodings])
    attention_mask = torch.tensor([e.attention_mask for e in encodings])
    assert input_ids[:, 0].eq(101).all()  # [CLS]
    assert attention_mask[2].sum() < attention_mask[0].sum()  # real padding

    bert = transformers.BertModel.from_pretrained(path).eval()
    with torch.no_grad():
        expected = bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        ).last_hidden_state
        actual = ours(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    assert expected.abs().max() > 0.1  # a real activation scale, not zeros
    real = attention_mask.bool()
    assert_close(actual[real], expected[real], atol=1e-4, name="last_hidden_state (real tokens)")
    # the batch ran packed: padding positions hold zeros (HF's values there are meaningless)
    assert not actual[~real].any()
