"""DistilBertConfig: HuggingFace's parameters, defaults, aliases, labels and config.json."""

import json

import pytest
import transformers

from distilbert_fast import DistilBertConfig

ARCHITECTURE_KEYS = [
    "vocab_size",
    "max_position_embeddings",
    "sinusoidal_pos_embds",
    "n_layers",
    "n_heads",
    "dim",
    "hidden_dim",
    "dropout",
    "attention_dropout",
    "activation",
    "initializer_range",
    "qa_dropout",
    "seq_classif_dropout",
    "pad_token_id",
]


def test_defaults_match_huggingface():
    ours, hf = DistilBertConfig(), transformers.DistilBertConfig()
    for key in ARCHITECTURE_KEYS:
        assert getattr(ours, key) == getattr(hf, key), key
    for key in ["num_labels", "id2label", "label2id", "problem_type", "tie_word_embeddings",
                "output_attentions", "output_hidden_states", "return_dict", "chunk_size_feed_forward"]:
        assert getattr(ours, key) == getattr(hf, key), key


def test_documented_defaults():
    c = DistilBertConfig()
    assert (c.vocab_size, c.max_position_embeddings, c.n_layers, c.n_heads, c.dim, c.hidden_dim) == (
        30522, 512, 6, 12, 768, 3072)
    assert (c.dropout, c.attention_dropout, c.qa_dropout, c.seq_classif_dropout) == (0.1, 0.1, 0.1, 0.2)
    assert (c.activation, c.initializer_range, c.pad_token_id, c.sinusoidal_pos_embds) == ("gelu", 0.02, 0, False)


def test_aliases_read_write_and_construct():
    c = DistilBertConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=3)
    assert (c.dim, c.n_heads, c.n_layers) == (64, 4, 3)
    assert (c.hidden_size, c.num_attention_heads, c.num_hidden_layers) == (64, 4, 3)
    c.hidden_size = 128
    assert c.dim == 128
    assert "hidden_size" not in c.to_dict()
    with pytest.raises(AttributeError, match="no_such_field"):
        c.no_such_field


@pytest.mark.parametrize("kwargs", [
    {}, {"num_labels": 5}, {"id2label": {0: "neg", 1: "pos", 2: "neutral"}},
    # num_labels disagreeing with id2label: it wins, the labels are renamed (with a warning)
    {"id2label": {0: "neg", 1: "pos"}, "num_labels": 3},
    {"id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}, "num_labels": 3},
])
def test_labels_like_huggingface(kwargs):
    ours, hf = DistilBertConfig(**kwargs), transformers.DistilBertConfig(**kwargs)
    assert ours.num_labels == hf.num_labels
    assert ours.id2label == hf.id2label
    # transformers 5 leaves label2id None when only id2label is given; we always derive it.
    assert ours.label2id == (hf.label2id or {v: k for k, v in hf.id2label.items()})


def test_fine_tuning_a_classifier_anew_with_more_labels_like_huggingface(tmp_path, caplog):
    """from_pretrained(<a 2-label classifier>, num_labels=4, ignore_mismatched_sizes=True), the
    usual way to fine-tune a classifier for another task, in both libraries."""
    from distilbert_fast import DistilBertForSequenceClassification

    small = dict(vocab_size=100, dim=32, n_heads=2, hidden_dim=64, n_layers=1)
    DistilBertForSequenceClassification(DistilBertConfig(**small, id2label={0: "neg", 1: "pos"})).save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="distilbert_fast"):
        ours = DistilBertForSequenceClassification.from_pretrained(tmp_path, num_labels=4, ignore_mismatched_sizes=True)
    assert "num_labels=4 disagrees with id2label" in caplog.text
    hf = transformers.DistilBertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=4, ignore_mismatched_sizes=True)
    assert ours.config.id2label == hf.config.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert ours.config.label2id == hf.config.label2id
    assert ours.classifier.weight.shape == hf.classifier.weight.shape == (4, 32)


def test_num_labels_setter_rebuilds_labels():
    c = DistilBertConfig()
    c.num_labels = 4
    assert c.id2label == {i: f"LABEL_{i}" for i in range(4)}
    assert c.label2id == {f"LABEL_{i}": i for i in range(4)}


def test_id2label_string_keys_from_json_become_ints():
    c = DistilBertConfig(id2label={"0": "a", "1": "b"}, label2id={"a": "0", "b": "1"})
    assert c.id2label == {0: "a", 1: "b"}
    assert c.label2id == {"a": 0, "b": 1}


def test_to_dict_from_dict_round_trip_keeps_unknown_keys():
    c = DistilBertConfig(dim=48, n_heads=6, problem_type="regression", num_labels=1, custom_field=[1, 2])
    d = c.to_dict()
    assert d["model_type"] == "distilbert"
    assert d["custom_field"] == [1, 2]
    again = DistilBertConfig.from_dict(d)
    assert again == c
    assert again.to_dict() == d


def test_save_and_load_config_json(tmp_path):
    c = DistilBertConfig(vocab_size=1000, activation="gelu_new", id2label={0: "x", 1: "y", 2: "z"})
    c.save_pretrained(tmp_path)
    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["vocab_size"] == 1000
    assert on_disk["id2label"] == {"0": "x", "1": "y", "2": "z"}
    assert "backend" not in on_disk  # a run-time choice, not part of the checkpoint
    loaded = DistilBertConfig.from_pretrained(tmp_path, dropout=0.0)
    assert loaded.vocab_size == 1000 and loaded.num_labels == 3 and loaded.dropout == 0.0


def test_huggingface_reads_ours_and_we_read_huggingfaces(tmp_path):
    ours = DistilBertConfig(dim=96, n_heads=3, hidden_dim=200, num_labels=3, sinusoidal_pos_embds=True)
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.DistilBertConfig.from_pretrained(tmp_path / "ours")
    for key in ARCHITECTURE_KEYS + ["num_labels", "id2label"]:
        assert getattr(hf, key) == getattr(ours, key), key
    hf.save_pretrained(tmp_path / "hf")
    back = DistilBertConfig.from_pretrained(tmp_path / "hf")
    for key in ARCHITECTURE_KEYS + ["num_labels", "id2label", "label2id"]:
        assert getattr(back, key) == getattr(ours, key), key


def test_invalid_problem_type():
    with pytest.raises(ValueError, match="problem_type must be one of"):
        DistilBertConfig(problem_type="ranking")


def test_num_labels_disagreeing_with_id2label_wins_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="distilbert_fast"):
        c = DistilBertConfig(num_labels=3, id2label={0: "a", 1: "b"})
    assert c.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert "num_labels=3 disagrees with id2label, which has 2 entries ['a', 'b']" in caplog.text


# -- transformers' serialisation API: to_dict's keys, to_diff_dict, name_or_path ------------------

CONFIG_VARIANTS = [
    {}, {"n_layers": 2, "dim": 96, "n_heads": 3, "custom_field": [1, 2]}, {"num_labels": 3},
    {"id2label": {0: "neg", 1: "pos"}}, {"problem_type": "regression", "num_labels": 1},
    {"output_hidden_states": True, "return_dict": False, "architectures": ["DistilBertModel"]},
    {"pad_token_id": None, "tie_word_embeddings": False, "chunk_size_feed_forward": 4},
]


def _without_version(d):
    d = {k: v for k, v in d.items() if k != "transformers_version"}
    if "label2id" in d and d["label2id"] is None:  # transformers 5 leaves it None; we derive it
        d["label2id"] = {v: int(k) for k, v in d["id2label"].items()}
    return d


@pytest.mark.parametrize("kwargs", CONFIG_VARIANTS)
def test_to_dict_and_to_diff_dict_match_transformers(kwargs):
    ours, hf = DistilBertConfig(**kwargs), transformers.DistilBertConfig(**kwargs)
    assert sorted(ours.to_dict()) == sorted(_without_version(hf.to_dict()))
    assert ours.to_diff_dict() == _without_version(hf.to_diff_dict())
    for use_diff in (True, False):
        assert json.loads(ours.to_json_string(use_diff=use_diff)) == _without_version(
            json.loads(hf.to_json_string(use_diff=use_diff)))
    assert json.loads(ours.to_json_string()) == _without_version(json.loads(hf.to_json_string()))


@pytest.mark.parametrize("kwargs", CONFIG_VARIANTS[:4])
def test_config_json_holds_what_transformers_writes(tmp_path, kwargs):
    ours, hf = DistilBertConfig(**kwargs), transformers.DistilBertConfig(**kwargs)
    ours.save_pretrained(tmp_path / "ours")
    hf.save_pretrained(tmp_path / "hf")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written == _without_version(json.loads((tmp_path / "hf" / "config.json").read_text()))
    for loader in (DistilBertConfig, transformers.DistilBertConfig):  # the short file loads back whole
        assert _without_version(loader.from_pretrained(tmp_path / "ours").to_diff_dict()) == ours.to_diff_dict()
    assert DistilBertConfig.from_pretrained(tmp_path / "ours").to_dict() == {
        **ours.to_dict(), "_name_or_path": str(tmp_path / "ours")}


def test_name_or_path_and_transformers_attributes(tmp_path):
    ours, hf = DistilBertConfig(), transformers.DistilBertConfig()
    for key in ("name_or_path", "_name_or_path", "is_encoder_decoder", "dtype", "_attn_implementation"):
        assert getattr(ours, key) == getattr(hf, key), key
    ours.save_pretrained(tmp_path)
    ours, hf = DistilBertConfig.from_pretrained(tmp_path), transformers.AutoConfig.from_pretrained(tmp_path)
    assert ours.name_or_path == ours._name_or_path == hf.name_or_path == str(tmp_path)
    ours.name_or_path = tmp_path  # a path is stored as str, as transformers does
    assert ours.name_or_path == str(tmp_path) and "_name_or_path" not in ours.to_diff_dict()
    assert DistilBertConfig(name_or_path="x").name_or_path == transformers.DistilBertConfig(name_or_path="x").name_or_path
    assert DistilBertConfig.coerce(hf).name_or_path == str(tmp_path)
    ours.return_dict = False
    assert ours.use_return_dict is False


def test_attn_implementation_is_a_run_time_setting_as_in_transformers():
    ours = DistilBertConfig(attn_implementation="eager")
    hf = transformers.DistilBertConfig(attn_implementation="eager")
    assert ours._attn_implementation == hf._attn_implementation == "eager"
    assert sorted(ours.to_dict()) == sorted(_without_version(hf.to_dict()))  # never saved


def test_loaded_model_knows_where_it_came_from_as_in_transformers(tmp_path):
    from distilbert_fast import DistilBertModel

    small = dict(vocab_size=50, dim=32, n_heads=2, hidden_dim=32, n_layers=1)
    DistilBertModel(DistilBertConfig(**small)).save_pretrained(tmp_path)
    ours = DistilBertModel.from_pretrained(tmp_path)
    hf = transformers.DistilBertModel.from_pretrained(tmp_path)
    assert ours.config.name_or_path == hf.config.name_or_path == str(tmp_path)
    assert ours.name_or_path == hf.name_or_path == str(tmp_path)
    assert ours.config._attn_implementation == hf.config._attn_implementation == "sdpa"


# -- the model's side: attention implementation, transformers' extra forward keywords -------------

def _twin_models():
    import torch

    from distilbert_fast import DistilBertModel

    small = dict(vocab_size=50, dim=32, n_heads=2, hidden_dim=32, n_layers=2)
    torch.manual_seed(0)
    hf = transformers.DistilBertModel(transformers.DistilBertConfig(**small)).eval()
    ours = DistilBertModel(DistilBertConfig(**small)).eval()
    ours.load_state_dict(hf.state_dict())
    return ours, hf


def test_set_attn_implementation_as_in_transformers(tmp_path):
    import torch

    ours, hf = _twin_models()
    ids = torch.tensor([[1, 5, 7, 9], [1, 4, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    expected = ours(ids, attention_mask=mask).last_hidden_state
    for name in ("eager", "sdpa", {"": "eager"}):
        ours.set_attn_implementation(name)
        hf.set_attn_implementation(name)
        assert ours.config._attn_implementation == hf.config._attn_implementation
        torch.testing.assert_close(ours(ids, attention_mask=mask).last_hidden_state, expected, rtol=0, atol=0)
    for model in (ours, hf):
        with pytest.raises(ValueError, match="attn_implementation"):
            model.set_attn_implementation("bogus")
    ours.save_pretrained(tmp_path)
    assert "_attn_implementation" not in json.loads((tmp_path / "config.json").read_text())
    from distilbert_fast import DistilBertModel

    loaded = DistilBertModel.from_pretrained(tmp_path, attn_implementation="eager")
    assert loaded.config._attn_implementation == "eager"
    assert transformers.DistilBertModel.from_pretrained(tmp_path, attn_implementation="eager").config._attn_implementation == "eager"


@pytest.mark.parametrize("extra", [dict(use_cache=False), dict(num_items_in_batch=3), dict(output_router_logits=False),
                                   dict(seq_idx=None)])
def test_transformers_model_keywords_accepted_and_ignored_as_in_transformers(extra):
    import torch

    ours, hf = _twin_models()
    ids = torch.tensor([[1, 5, 7, 9], [1, 4, 2, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    real = mask.bool()
    expected = hf(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(hf(ids, attention_mask=mask, **extra).last_hidden_state[real], expected[real])
    torch.testing.assert_close(ours(ids, attention_mask=mask, **extra).last_hidden_state[real], expected[real],
                               rtol=1e-5, atol=1e-5)
    # a name transformers does not know stays an error here (transformers ignores it silently, so a
    # typo such as label= trains without a loss there)
    with pytest.raises(TypeError, match="lable"):
        ours(ids, attention_mask=mask, lable=torch.tensor([0, 1]))


def test_transformers_config_api_beyond_the_dict(tmp_path):
    """return_unused_kwargs, get_config_dict, update_from_string, torch_dtype, save_pretrained's hub
    keywords, sub_configs: each answered as transformers.DistilBertConfig answers it."""
    import torch

    transformers.DistilBertConfig(n_layers=2, id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(tmp_path)
    for cls in (DistilBertConfig, transformers.DistilBertConfig):
        config, unused = cls.from_pretrained(tmp_path, return_unused_kwargs=True, dropout=0.3, foo=1)
        assert (config.dropout, unused, hasattr(config, "foo")) == (0.3, {"foo": 1}, False), cls
        config, unused = cls.from_dict({"n_layers": 3}, return_unused_kwargs=True, dim=96, n_heads=3, foo=2)
        assert (config.n_layers, config.dim, unused) == (3, 96, {"foo": 2}), cls
        assert cls.get_config_dict(tmp_path)[0]["id2label"] == {"0": "a", "1": "b", "2": "c"}
        config = cls()
        config.update_from_string("n_layers=3,dropout=0.5,activation=relu,sinusoidal_pos_embds=true")
        assert (config.n_layers, config.dropout, config.activation, config.sinusoidal_pos_embds) == (3, 0.5, "relu", True)
        with pytest.raises(ValueError, match="isn't in the original config"):
            config.update_from_string("no_such_key=1")
        assert json.loads(cls(torch_dtype=torch.float16).to_json_string())["dtype"] == "float16"
        cls().save_pretrained(tmp_path / cls.__module__, push_to_hub=False)
        assert (cls.sub_configs, cls.base_config_key) == ({}, "")
