"""Bad input is refused with the documented exception and a message that names the culprit:
forward arguments, checkpoint files, config.json, configurations and backend names."""

import json
import os
import pickle
import random
import re

import pytest
import torch
from conftest import SMALL_CONFIG, make_pair
from safetensors.torch import load_file, save_file

import distilbert_fast
from distilbert_fast import deferred_checks
from distilbert_fast import DistilBertConfig
from distilbert_fast.checkpoint import CheckpointWarning

V = SMALL_CONFIG["vocab_size"]
DIM = SMALL_CONFIG["dim"]
LAYERS = SMALL_CONFIG["n_layers"]
HEADS = SMALL_CONFIG["n_heads"]
MAX_POS = SMALL_CONFIG["max_position_embeddings"]


@pytest.fixture(scope="module")
def model():
    return distilbert_fast.DistilBertModel(DistilBertConfig(**SMALL_CONFIG)).eval()


def ids(batch=2, seq=5):
    return torch.randint(0, V, (batch, seq))


# -- forward arguments ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, V, V + 1000])
def test_token_id_out_of_range(model, bad):
    input_ids = ids()
    input_ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\), found {bad}"):
        model(input_ids)


def test_largest_valid_token_id_is_accepted(model):
    input_ids = ids()
    input_ids[0, 0], input_ids[1, 1] = 0, V - 1
    assert model(input_ids).last_hidden_state.shape == (2, 5, DIM)


def test_token_id_out_of_range_in_task_models():
    for name in ["DistilBertForMaskedLM", "DistilBertForSequenceClassification"]:
        m = getattr(distilbert_fast, name)(DistilBertConfig(**SMALL_CONFIG))
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\)"):
            m(torch.full((1, 4), V))
    mc = distilbert_fast.DistilBertForMultipleChoice(DistilBertConfig(**SMALL_CONFIG))
    with pytest.raises(ValueError, match=r"input_ids must lie in .*found -5"):
        mc(torch.full((1, 2, 4), -5))


def test_sequence_longer_than_max_positions(model):
    with pytest.raises(ValueError, match=rf"sequence length {MAX_POS + 1} exceeds max_position_embeddings={MAX_POS}"):
        model(ids(seq=MAX_POS + 1))
    with pytest.raises(ValueError, match=rf"exceeds max_position_embeddings={MAX_POS}"):
        model(inputs_embeds=torch.randn(1, MAX_POS + 1, DIM))
    assert model(ids(seq=MAX_POS)).last_hidden_state.shape == (2, MAX_POS, DIM)


@pytest.mark.parametrize("shape", [(2, 4), (2, 6), (1, 5), (5,), (2, 1, 5)])
def test_attention_mask_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"attention_mask must have shape (batch, seq) = (2, 5), got {shape}")):
        model(ids(), attention_mask=torch.ones(shape, dtype=torch.long))


def test_both_or_neither_of_ids_and_embeds(model):
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids(), inputs_embeds=torch.randn(2, 5, DIM))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()
    mc = distilbert_fast.DistilBertForMultipleChoice(DistilBertConfig(**SMALL_CONFIG))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        mc()
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        mc(torch.zeros(1, 2, 3, dtype=torch.long), inputs_embeds=torch.randn(1, 2, 3, DIM))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bool])
def test_non_integer_input_ids(model, dtype):
    with pytest.raises(TypeError, match=rf"input_ids must be an integer tensor \(torch.long\), got {dtype}"):
        model(torch.ones(2, 5, dtype=dtype))


def test_input_ids_not_a_tensor(model):
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        model([[1, 2, 3]])


def test_input_ids_wrong_rank(model):
    with pytest.raises(ValueError, match=re.escape("input_ids must have shape (batch, seq), got (5,)")):
        model(torch.arange(5))


@pytest.mark.parametrize("shape", [(2, 5, DIM + 1), (2, 5, DIM - 1), (5, DIM), (1, 2, 5, DIM)])
def test_inputs_embeds_wrong_shape(model, shape):
    with pytest.raises(ValueError, match=re.escape(f"inputs_embeds must have shape (batch, seq, {DIM}), got {shape}")):
        model(inputs_embeds=torch.randn(shape))


def test_integer_inputs_embeds(model):
    with pytest.raises(TypeError, match="inputs_embeds must be a floating-point"):
        model(inputs_embeds=torch.ones(2, 5, DIM, dtype=torch.long))


@pytest.mark.parametrize("shape", [(HEADS + 1,), (LAYERS + 1, HEADS), (LAYERS, HEADS - 1), (1, LAYERS, HEADS), (LAYERS * HEADS,)])
def test_head_mask_wrong_shape(model, shape):
    expected = f"head_mask must have shape ({HEADS},) or ({LAYERS}, {HEADS}), got {shape}"
    with pytest.raises(ValueError, match=re.escape(expected)):
        model(ids(), head_mask=torch.ones(shape))


def test_position_ids_out_of_range(model):
    with pytest.raises(ValueError, match=rf"position_ids must lie in \[0, {MAX_POS}\), found {MAX_POS}"):
        model(ids(), position_ids=torch.full((2, 5), MAX_POS))


def test_position_ids_out_of_range_in_a_task_model_with_padding():
    m = distilbert_fast.DistilBertForTokenClassification(DistilBertConfig(**SMALL_CONFIG)).eval()
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match=rf"position_ids must lie in \[0, {MAX_POS}\), found -2"):
        m(ids(), attention_mask=mask, position_ids=torch.full((2, 5), -2))


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("embeds", [False, True], ids=["ids", "embeds"])
def test_empty_batch(model, with_mask, embeds):
    """No rows: a ValueError naming the input, not an op's shape error or (with a mask) a
    reduction over an empty tensor (HF's model fails inside too)."""
    name, inputs = ("inputs_embeds", dict(inputs_embeds=torch.randn(0, 5, DIM))) if embeds else ("input_ids", dict(input_ids=ids(0)))
    if with_mask:
        inputs["attention_mask"] = torch.ones(0, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"{name} must hold at least one sequence (batch >= 1), got shape (0, 5")):
        model(**inputs)


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (5, 2), (1, 1, 5), (4,)])
@pytest.mark.parametrize("with_mask", [False, True])
def test_position_ids_wrong_shape(model, shape, with_mask):
    """position_ids that do not broadcast to (batch, seq): a ValueError naming them (the shapes HF
    takes, (seq,), (1, seq), (batch, seq), still work: test_parity)."""
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    with pytest.raises(ValueError, match=re.escape(f"position_ids must have shape (batch, seq) = (2, 5) or broadcast to it (e.g. (1, seq)), got {shape}")):
        model(ids(), attention_mask=mask if with_mask else None, position_ids=torch.zeros(shape, dtype=torch.long))


# -- checks deferred to the next sync (packed input on a GPU; deferred_checks) -------------------
# A GPU packed forward computes these flags on the device; here they are computed on CPU tensors,
# which runs the same code, and the model's reading of them is the same on any device.


@pytest.mark.parametrize("bad", [-1, V, V + 1000])
def test_deferred_id_flag_gives_the_eager_message(bad):
    input_ids = ids()
    input_ids[1, 2] = bad
    failed, detail = deferred_checks.ids_flag(input_ids, V).tolist()
    assert failed == 1
    with pytest.raises(ValueError) as eager:
        distilbert_fast.DistilBertModel(DistilBertConfig(**SMALL_CONFIG))(input_ids)
    assert deferred_checks.describe_ids("input_ids", V)(detail) == str(eager.value)
    assert deferred_checks.ids_flag(ids(), V).tolist()[0] == 0
    assert deferred_checks.safe_ids(input_ids, V).tolist() == input_ids.clamp(0, V - 1).tolist()


@pytest.mark.parametrize("cu,rule", [
    ([0, 3, 7], None), ([0, 0, 4, 7], None), ([1, 3, 7], "must start at 0"),
    ([0, 5, 3, 7], "non-decreasing"), ([0, 3, 6], r"cu_seqlens\[-1\] must equal"),
    ([0, 1, 7], "max_seqlen must be at least the longest"),
])
def test_deferred_cu_seqlens_flag_names_the_rule_the_eager_check_names(cu, rule):
    cu = torch.tensor(cu, dtype=torch.int32)
    failed, detail = deferred_checks.cu_seqlens_flag(cu, 7, 4).tolist()
    safe = deferred_checks.safe_cu_seqlens(cu, 7)
    assert 0 <= safe.min() and safe.max() <= 7 and (safe[1:] >= safe[:-1]).all()
    if rule is None:
        assert failed == 0 and torch.equal(safe, cu)
        return
    assert failed == 1
    assert re.search(rule, deferred_checks.describe_cu_seqlens(detail))
    with pytest.raises(ValueError, match=rule):
        distilbert_fast.packing.check_cu_seqlens(cu, 7, 4)


def _pending_bad_id(model, bad=V + 3):
    """What a packed forward on a GPU leaves behind after an out-of-range id."""
    flag = deferred_checks.ids_flag(torch.tensor([1, bad]), V)
    model._deferred().record("input_ids", flag, deferred_checks.describe_ids("input_ids", V))


def test_deferred_checks_keep_the_first_failure_and_clear_when_read():
    checks = deferred_checks.DeferredChecks()
    checks.raise_now()  # nothing pending: no error, no sync
    describe = deferred_checks.describe_ids("input_ids", V)
    for values in ([1, 2], [V + 1], [-4], [V + 9]):
        checks.record("input_ids", deferred_checks.ids_flag(torch.tensor(values), V), describe)
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\), found {V + 1} \(found by a packed"):
        checks.raise_now()
    checks.raise_now()  # read: cleared


@pytest.mark.parametrize("padded_call", ["mask", "no_mask", "head", "raise_deferred"])
def test_pending_failure_is_raised_at_the_next_sync(padded_call):
    m = distilbert_fast.DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG)).eval()
    _pending_bad_id(m.distilbert)
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, 4] = 0
    call = {
        "mask": lambda: m.distilbert(ids(), attention_mask=mask),
        "no_mask": lambda: m.distilbert(ids()),
        "head": lambda: m(ids(), attention_mask=mask),
        "raise_deferred": lambda: deferred_checks.raise_deferred(m),
    }[padded_call]
    with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\), found {V + 3} \(found by a packed"):
        call()
    call()  # reported once


def test_inputs_embeds_without_ids_read_pending_failures_too():
    model = distilbert_fast.DistilBertModel(DistilBertConfig(**SMALL_CONFIG)).eval()
    _pending_bad_id(model)
    with pytest.raises(ValueError, match="found by a packed forward"):
        model(inputs_embeds=torch.randn(1, 3, DIM))


def test_multiple_choice_wrong_rank():
    mc = distilbert_fast.DistilBertForMultipleChoice(DistilBertConfig(**SMALL_CONFIG))
    with pytest.raises(ValueError, match=re.escape("input_ids must have 3 dims (batch, num_choices, seq), got (2, 5)")):
        mc(ids())
    with pytest.raises(ValueError, match=re.escape("input_ids must have 3 dims (batch, num_choices, seq), got (1, 2, 3, 4)")):
        mc(torch.zeros(1, 2, 3, 4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=re.escape(f"inputs_embeds must have 4 dims (batch, num_choices, seq, dim), got (2, 5, {DIM})")
    ):
        mc(inputs_embeds=torch.randn(2, 5, DIM))
    # the right rank works
    assert mc(torch.zeros(2, 3, 5, dtype=torch.long)).logits.shape == (2, 3)


# -- checkpoints: wrong shapes -----------------------------------------------------------------------


def test_checkpoint_with_wrong_shapes(tmp_path):
    _, saved = make_pair("DistilBertForSequenceClassification")  # num_labels=2
    saved.save_pretrained(tmp_path)
    cls = distilbert_fast.DistilBertForSequenceClassification
    with pytest.raises(ValueError) as info:
        cls.from_pretrained(tmp_path, num_labels=3)
    message = str(info.value)
    assert "classifier.weight: checkpoint (2, 32) vs model (3, 32)" in message
    assert "classifier.bias: checkpoint (2,) vs model (3,)" in message
    assert "ignore_mismatched_sizes=True" in message
    assert "pre_classifier" not in message  # only the mismatched keys are listed

    with pytest.warns(CheckpointWarning) as record:
        model = cls.from_pretrained(tmp_path, num_labels=3, ignore_mismatched_sizes=True)
    # one warning, naming the re-initialised keys with both shapes (not again as "missing")
    assert len(record) == 1, [str(w.message) for w in record]
    assert re.search(r"classifier\.weight: checkpoint \(2, 32\) vs model \(3, 32\)", str(record[0].message))
    assert "classifier.bias: checkpoint (2,) vs model (3,)" in str(record[0].message)
    assert model.classifier.weight.shape == (3, DIM)
    assert model.config.num_labels == 3
    # everything else came from the checkpoint
    for key, value in saved.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(model.state_dict()[key], value), key
    assert model(ids()).logits.shape == (2, 3)


def test_checkpoint_with_wrong_vocab_size(tmp_path):
    _, saved = make_pair("DistilBertModel")
    saved.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"embeddings.word_embeddings.weight: checkpoint ({V}, {DIM}) vs model ({V + 1}, {DIM})")):
        distilbert_fast.DistilBertModel.from_pretrained(tmp_path, vocab_size=V + 1)


# -- checkpoints: unreadable files ---------------------------------------------------------------------


@pytest.fixture
def saved_dir(tmp_path):
    """A directory with config.json and a valid model.safetensors of DistilBertModel."""
    _, m = make_pair("DistilBertModel")
    m.save_pretrained(tmp_path)
    return tmp_path


def _load(directory, **kwargs):
    return distilbert_fast.DistilBertModel.from_pretrained(directory, **kwargs)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_truncated_safetensors(saved_dir, keep):
    path = saved_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors: not a valid safetensors file"):
        _load(saved_dir)


@pytest.mark.parametrize("seed", range(8))
def test_corrupt_safetensors(saved_dir, seed):
    (saved_dir / "model.safetensors").write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a valid safetensors file"):
        _load(saved_dir)


def test_empty_safetensors(saved_dir):
    (saved_dir / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a valid safetensors file"):
        _load(saved_dir)


@pytest.fixture
def bin_dir(tmp_path):
    _, m = make_pair("DistilBertModel")
    m.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file()
    return tmp_path


def test_truncated_bin(bin_dir):
    path = bin_dir / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:-5000])
    with pytest.raises(ValueError, match=r"cannot load .*pytorch_model\.bin with torch\.load\(weights_only=True\)"):
        _load(bin_dir)


@pytest.mark.parametrize("seed", range(32))
def test_corrupt_bin(bin_dir, seed):
    # Random bytes reach torch's unpickler as many different errors (IndexError, KeyError, ...).
    (bin_dir / "pytorch_model.bin").write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin with torch\.load\(weights_only=True\)"):
        _load(bin_dir)


@pytest.mark.parametrize(
    "payload",
    [[1, 2, 3], {"a": 1}, {1: torch.zeros(2)}, torch.zeros(3), {"w": [torch.zeros(2)]}],
    ids=["list", "dict-of-int", "int-keys", "bare-tensor", "nested"],
)
def test_bin_without_a_state_dict(bin_dir, payload):
    torch.save(payload, bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin does not hold a state_dict"):
        _load(bin_dir)


class _Exploit:
    """Unpickling this runs ``exec(code)``, which writes a marker file."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').write('pwned')"

    def __reduce__(self):
        return (exec, (self.code,))


@pytest.mark.parametrize("wrapped", [False, True])
def test_malicious_pickle_is_refused_not_run(bin_dir, tmp_path_factory, wrapped):
    marker = tmp_path_factory.mktemp("marker") / "pwned.txt"
    exploit = _Exploit(marker)
    torch.save({"embeddings.word_embeddings.weight": exploit} if wrapped else exploit, bin_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"(?s)pytorch_model\.bin with torch\.load\(weights_only=True\).*GLOBAL exec"):
        _load(bin_dir)
    assert not marker.exists(), "loading the checkpoint executed code from the pickle"
    # the payload is real: an unsafe load does run it
    torch.load(bin_dir / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "pwned"


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_plain_pickle_file_as_bin(bin_dir):
    with open(bin_dir / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin with torch\.load\(weights_only=True\)"):
        _load(bin_dir)


# -- checkpoints: sharded ------------------------------------------------------------------------


@pytest.fixture
def sharded_dir(tmp_path):
    _, m = make_pair("DistilBertModel")
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    return tmp_path


def test_shard_index_names_missing_shard(sharded_dir):
    next(sharded_dir.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json names shards that are not in .*model-00002-of-"):
        _load(sharded_dir)


def test_shard_lacks_listed_tensors(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    key = "transformer.layer.1.ffn.lin2.weight"
    shard = sharded_dir / index["weight_map"][key]
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard))
    with pytest.raises(ValueError, match=rf"lack tensors its weight_map lists: \['{re.escape(key)}'\]"):
        _load(sharded_dir)


def test_shard_index_not_an_index(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match=r"not a valid shard index \(needs a 'weight_map'\)"):
        _load(sharded_dir)


def test_corrupt_shard(sharded_dir):
    shard = next(sharded_dir.glob("model-00001-of-*.safetensors"))
    shard.write_bytes(random.Random(0).randbytes(1000))
    with pytest.raises(ValueError, match=rf"{re.escape(shard.name)}: not a valid safetensors file"):
        _load(sharded_dir)


# -- directories and names ---------------------------------------------------------------------------


def test_directory_without_weights(tmp_path):
    DistilBertConfig(**SMALL_CONFIG).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("no weights here")
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected one of .*model\.safetensors.*pytorch_model\.bin"):
        _load(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"holds no weights: expected one of \['pytorch_model\.bin'"):
        _load(tmp_path, use_safetensors=False)


def test_directory_without_config(tmp_path):
    _, m = make_pair("DistilBertModel")
    m.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        _load(tmp_path)


def test_missing_directory(tmp_path):
    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(FileNotFoundError, match=r"exist is not a local directory.*never downloads"):
        _load(missing)
    with pytest.raises(FileNotFoundError, match="is not a local directory"):
        DistilBertConfig.from_pretrained(missing)


def test_path_that_is_a_file(saved_dir):
    for path in [saved_dir / "model.safetensors", saved_dir / "config.json"]:
        with pytest.raises(NotADirectoryError, match=rf"{re.escape(path.name)} is a file; from_pretrained expects a directory"):
            _load(path)


@pytest.mark.parametrize("name", ["distilbert-base-uncased", "distilbert/distilbert-base-uncased-finetuned-sst-2-english"])
def test_hub_name_is_not_downloaded(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # so the name cannot resolve to a local directory
    with pytest.raises(FileNotFoundError, match=rf"{re.escape(name)} is not a local directory.*never downloads.*snapshot_download"):
        distilbert_fast.DistilBertForSequenceClassification.from_pretrained(name)
    assert os.listdir(tmp_path) == []


def test_path_of_wrong_type():
    with pytest.raises(TypeError, match="expected a directory path, got int"):
        _load(3)


def test_save_pretrained_onto_a_file(tmp_path):
    target = tmp_path / "afile"
    target.write_text("x")
    _, m = make_pair("DistilBertModel")
    with pytest.raises(ValueError, match="save_pretrained needs a directory, but .*afile is a file"):
        m.save_pretrained(target)
    assert target.read_text() == "x"


# -- config.json ---------------------------------------------------------------------------------


def test_config_json_not_json(saved_dir):
    (saved_dir / "config.json").write_text("{ this is not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        _load(saved_dir)
    (saved_dir / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"config\.json must hold a JSON object, got list"):
        _load(saved_dir)


def test_config_json_for_another_model_type(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    config["model_type"] = "bert"
    (saved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model_type='bert'; DistilBertConfig expects 'distilbert'"):
        _load(saved_dir)
    with pytest.raises(ValueError, match=r"model_type='bert'"):
        DistilBertConfig.from_pretrained(saved_dir)


# -- configurations --------------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM"])
def test_unknown_activation(class_name):
    config = DistilBertConfig(**SMALL_CONFIG, activation="tanhh")
    with pytest.raises(ValueError, match=r"activation must be one of \[.*'gelu'.*\], got 'tanhh'"):
        getattr(distilbert_fast, class_name)(config)


def test_unknown_activation_in_config_json(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    config["activation"] = "sigmoidal"
    (saved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"activation must be one of .*got 'sigmoidal'"):
        _load(saved_dir)


@pytest.mark.parametrize("n_heads", [5, 3, 64])
def test_heads_must_divide_dim(n_heads):
    config = DistilBertConfig(**{**SMALL_CONFIG, "n_heads": n_heads})
    with pytest.raises(ValueError, match=rf"n_heads={n_heads} must divide config.dim={DIM}"):
        distilbert_fast.DistilBertModel(config)


@pytest.mark.parametrize("num_labels", [1, 3])
def test_question_answering_needs_two_labels(num_labels):
    config = DistilBertConfig(**SMALL_CONFIG, num_labels=num_labels)
    with pytest.raises(ValueError, match=rf"num_labels must be 2 for question answering, got {num_labels}"):
        distilbert_fast.DistilBertForQuestionAnswering(config)


def test_invalid_problem_type():
    with pytest.raises(ValueError, match=r"problem_type must be one of \('regression', .*got 'classification'"):
        DistilBertConfig(**SMALL_CONFIG, problem_type="classification")


def test_invalid_problem_type_in_config_json(saved_dir):
    config = json.loads((saved_dir / "config.json").read_text())
    config["problem_type"] = "ranking"
    (saved_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"problem_type must be one of .*got 'ranking'"):
        distilbert_fast.DistilBertForSequenceClassification.from_pretrained(saved_dir)


@pytest.mark.parametrize("num_labels", [0, -1, 2.0])
def test_num_labels_must_be_positive_int(num_labels):
    with pytest.raises(ValueError, match=rf"num_labels must be a positive int, got {num_labels!r}"):
        DistilBertConfig(**SMALL_CONFIG, num_labels=num_labels)


def test_config_must_be_a_distilbert_config():
    with pytest.raises(TypeError, match="config must be a DistilBertConfig, got dict"):
        distilbert_fast.DistilBertModel(dict(SMALL_CONFIG))


# -- backends --------------------------------------------------------------------------------------

# The registered names follow 'auto' in preference order; eager (priority 0) is among them.
BACKEND_ERROR = r"backend must be one of \['auto', (.*, )?'eager'.*\], got 'cuda_magic'"


def test_unknown_backend_everywhere(saved_dir, model):
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        distilbert_fast.DistilBertModel(DistilBertConfig(**SMALL_CONFIG, backend="cuda_magic"))
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        _load(saved_dir, backend="cuda_magic")
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        model.set_backend("cuda_magic")
    assert model.backend == "auto"  # unchanged by the refused call
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        distilbert_fast.set_default_backend("cuda_magic")
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        with distilbert_fast.use_backend("cuda_magic"):
            pass


def test_unknown_backend_from_environment(model, monkeypatch):
    monkeypatch.setenv(distilbert_fast.ops.ENV_VAR, "cuda_magic")
    with pytest.raises(ValueError, match=BACKEND_ERROR):
        model(ids())


# -- other loading arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float17", 3, "fp16"])
def test_bad_dtype(saved_dir, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be a torch.dtype, its name, or 'auto', got {re.escape(repr(dtype))}"):
        _load(saved_dir, dtype=dtype)


@pytest.mark.parametrize("dtype", ["int", torch.int8, "bool", torch.long])
def test_non_floating_dtype(saved_dir, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be a floating-point dtype, got {re.escape(repr(dtype))}"):
        _load(saved_dir, dtype=dtype)


@pytest.mark.parametrize("size", ["20 parsecs", -5, 0, "KB"])
def test_bad_max_shard_size(tmp_path, size):
    _, m = make_pair("DistilBertModel")
    with pytest.raises(ValueError, match=rf"max_shard_size must be a positive int or a size like '5GB', got {re.escape(repr(size))}"):
        m.save_pretrained(tmp_path, max_shard_size=size)
