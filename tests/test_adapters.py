"""Adapters on DistilBertAdapterModel (parity with the adapters package itself is in
test_adapters_oracle.py): which parameters train, a short training run, exact save/load round
trips, the fused residual + LayerNorm op serving the adapters, no cost when none is active,
LoRA merging, and clear errors for bad input."""

import inspect
import json

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from distilbert_fast import (
    AdapterFusionConfig,
    AdapterSetup,
    BatchSplit,
    BnConfig,
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    Fuse,
    LoRAConfig,
    Parallel,
    ParBnConfig,
    SeqBnConfig,
    Stack,
    last_backend,
)
from distilbert_fast.ops import backends

N_LAYERS = SMALL_CONFIG["n_layers"]
CONFIGS = {
    "seq_bn": "seq_bn",
    "houlsby": "houlsby",
    "lora": LoRAConfig(r=4, alpha=16, attn_matrices=["q", "k", "v"]),
    "par_bn": ParBnConfig(reduction_factor=4, mh_adapter=True, scaling="learned"),
    "custom_bn": BnConfig(mh_adapter=True, output_adapter=True, reduction_factor={"1": 2, "default": 8},
                          non_linearity="gelu", ln_before=True, ln_after=True, scaling="channel",
                          original_ln_before=True, residual_before_ln="post_add"),
}


def small_model(**overrides):
    return DistilBertAdapterModel(DistilBertConfig(**{**SMALL_CONFIG, **overrides})).eval()


@torch.no_grad()
def randomise(model, pattern=(".adapters.", ".loras.", "heads.")):
    for name, p in model.named_parameters():
        if any(s in name for s in pattern):
            p.copy_(0.3 * torch.randn_like(p) + (1.0 if name.endswith(("norm_before.weight", "norm_after.weight",
                                                                       "scaling")) else 0.0))


def ids(batch=2, seq=6):
    return torch.randint(1, SMALL_CONFIG["vocab_size"], (batch, seq))


def adapter_keys(model, name):
    return {k for k in model.state_dict() if f".adapters.{name}." in k or f".loras.{name}." in k}


# -- training ------------------------------------------------------------------------------------


def test_train_adapter_freezes_exactly_the_right_parameters():
    model = small_model()
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config="lora")
    model.add_adapter("c", config="houlsby")
    model.add_classification_head("a", num_labels=2)
    model.add_masked_lm_head("mlm")
    model.train_adapter(Stack("a", "b"))
    assert model.training and model.active_adapters == Stack("a", "b")
    assert model.active_head == "mlm"  # there is no head "b": the active head stays
    trainable = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    expected = (adapter_keys(model, "a") | adapter_keys(model, "b")
                | {k for k in model.state_dict() if k.startswith(("heads.a.", "heads.mlm.0.", "heads.mlm.2."))})
    # the active masked-LM head's projection is the word embeddings: frozen with its bias
    assert trainable == expected
    assert adapter_keys(model, "a") and adapter_keys(model, "b")

    model.train_adapter("c")
    assert model.active_head == "mlm"
    assert {n for n, p in model.named_parameters() if p.requires_grad and ".adapters." in n} == adapter_keys(model, "c")
    model.train_adapter("a", train_embeddings=True)
    assert model.get_input_embeddings().weight.requires_grad and model.heads["mlm"][3].weight.requires_grad
    model.freeze_model(False)
    assert all(p.requires_grad for n, p in model.distilbert.named_parameters())


def test_a_few_training_steps_lower_the_loss_and_change_only_adapter_and_head():
    torch.manual_seed(0)
    model = small_model(dropout=0.0, attention_dropout=0.0)
    model.add_adapter("task", config=SeqBnConfig(reduction_factor=2))
    model.add_adapter("other", config="houlsby")
    model.add_classification_head("task", num_labels=2)
    model.train_adapter("task")
    x = ids(32, 8)
    labels = (x[:, 1] > SMALL_CONFIG["vocab_size"] // 2).long()  # a synthetic rule on token 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = model(x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    allowed = adapter_keys(model, "task") | {k for k in before if k.startswith("heads.task.")}
    assert changed <= allowed, sorted(changed - allowed)
    assert {k for k in allowed if "adapter_up" in k} <= changed  # the adapter did train


# -- save / load -------------------------------------------------------------------------------------


@pytest.mark.parametrize("safe", [False, True])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_save_adapter_load_adapter_round_trip_is_exact(tmp_path, kind, safe):
    model = small_model()
    model.add_adapter("x", config=CONFIGS[kind])
    model.add_tagging_head("x", num_labels=3)
    randomise(model)
    model.save_adapter(str(tmp_path), "x", use_safetensors=safe)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["name"] == "x" and meta["model_type"] == "distilbert" and meta["hidden_size"] == 32
    assert meta["config"] == model.adapters_config["x"].to_dict()
    assert (tmp_path / ("adapter.safetensors" if safe else "pytorch_adapter.bin")).is_file()

    other = small_model()
    other.distilbert.load_state_dict({k: v for k, v in model.distilbert.state_dict().items()
                                      if ".adapters." not in k and ".loras." not in k}, strict=False)
    assert other.load_adapter(str(tmp_path), load_as="y") == "y"
    assert "y" in other.heads  # with_head: the head of the same name came along, renamed
    saved = model.state_dict()
    for key, value in other.state_dict().items():
        assert torch.equal(value, saved[key.replace(".y.", ".x.")]), key
    x = ids()
    assert torch.equal(other(x, head="y", adapter_names="y").logits, model(x, head="x", adapter_names="x").logits)


@pytest.mark.parametrize("kind", ["houlsby", "lora"])
def test_load_adapter_leave_out_drops_those_layers_saved_weights(tmp_path, kind):
    """As the package: load_adapter(leave_out=[0]) adds the adapter without layer 0 and loads the
    saved weights of the other layers (was: refused, layer 0's weights "unexpected")."""
    model = small_model()
    model.add_adapter("x", config=CONFIGS[kind])
    randomise(model)
    model.save_adapter(str(tmp_path), "x")
    other = small_model()
    assert other.load_adapter(str(tmp_path), leave_out=[0]) == "x"
    assert other.adapters_config["x"].leave_out == [0]
    loaded, saved = other.state_dict(), model.state_dict()
    assert {k for k in adapter_keys(model, "x") if ".layer.0." not in k} == adapter_keys(other, "x") != set()
    assert all(torch.equal(loaded[k], saved[k]) for k in adapter_keys(other, "x"))


def test_save_all_adapters_writes_one_directory_per_adapter(tmp_path):
    model = small_model()
    model.add_adapter("x", config="seq_bn")
    model.add_adapter("y", config="lora")
    model.add_tagging_head("x")
    randomise(model)
    model.save_all_adapters(str(tmp_path))
    other = small_model()
    assert [other.load_adapter(str(tmp_path / n)) for n in ("x", "y")] == ["x", "y"] and list(other.heads) == ["x"]
    loaded = other.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items() if ".x." in k or ".y." in k)


def test_saved_adapter_holds_only_its_own_weights_under_the_package_keys(tmp_path):
    model = small_model()
    model.add_adapter("a", config="houlsby")
    model.add_adapter("ab", config="lora")
    model.save_adapter(str(tmp_path), "a", with_head=False)
    keys = set(torch.load(tmp_path / "pytorch_adapter.bin", weights_only=True))
    assert keys == adapter_keys(model, "a")
    assert "distilbert.transformer.layer.0.attention_adapters.adapters.a.adapter_down.0.weight" in keys
    assert "distilbert.transformer.layer.1.output_adapters.adapters.a.adapter_up.bias" in keys
    assert not (tmp_path / "head_config.json").exists()


# -- the fused ops, and no cost when no adapter is active ---------------------------------------------


def _count_ops(monkeypatch):
    """Counts the eager backend's residual_layernorm / bias_activation calls; records the x_bias
    each residual_layernorm call folds in."""
    eager = backends._registry["eager"]
    counts = {"residual_layernorm": 0, "bias_activation": 0, "x_biases": []}
    for op in ("residual_layernorm", "bias_activation"):
        original = getattr(eager, f"{op}_forward")

        def counting(*args, _op=op, _original=original):
            counts[_op] += 1
            if _op == "residual_layernorm":
                counts["x_biases"].append(args[5])
            return _original(*args)

        monkeypatch.setattr(eager, f"{op}_forward", counting)
    return counts


@pytest.mark.parametrize("config, extra_layernorms, adapters_per_layer", [
    ("houlsby", 0, 2),  # each sublayer: the adapter's residual and the block's LN in one op
    ("seq_bn", 1, 1),   # Pfeiffer: the block's LN before the adapter, then the fused one
])
def test_adapter_residual_goes_through_the_fused_op(monkeypatch, config, extra_layernorms, adapters_per_layer):
    model = small_model().set_backend("eager")
    model.add_adapter("a", config=config)
    counts = _count_ops(monkeypatch)
    x = ids()
    model(x)
    plain = dict(counts)
    counts.update({"residual_layernorm": 0, "bias_activation": 0, "x_biases": []})
    model(x, adapter_names="a")
    assert counts["residual_layernorm"] - plain["residual_layernorm"] == extra_layernorms * N_LAYERS
    # each adapter's down-projection + activation is one bias_activation
    assert counts["bias_activation"] - plain["bias_activation"] == adapters_per_layer * N_LAYERS
    # the op that applies the block's LayerNorm adds the adapter's up-projection bias too
    up_biases = [m.adapter_up.bias for n, m in model.named_modules() if n.endswith(".adapters.a")]
    assert len(up_biases) == adapters_per_layer * N_LAYERS
    assert all(any(b is up for b in counts["x_biases"]) for up in up_biases)
    assert last_backend("residual_layernorm") == "eager"


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of(model, x):
    with torch.no_grad(), _RecordOps() as recorder:
        model(x)
    return recorder.ops


def test_no_active_adapter_and_merged_lora_cost_nothing():
    plain = small_model()
    model = small_model()
    model.load_state_dict(plain.state_dict())
    x = ids()
    reference_ops = _ops_of(plain, x)
    for name, config in CONFIGS.items():
        model.add_adapter(name, config=config)
    randomise(model)
    assert _ops_of(model, x) == reference_ops
    assert torch.equal(model(x).last_hidden_state, plain(x).last_hidden_state)

    model.set_active_adapters("lora")
    unmerged = model(x).last_hidden_state
    assert not torch.allclose(unmerged, plain(x).last_hidden_state)
    weight = model.distilbert.transformer.layer[0].attention.q_lin.weight.clone()
    model.merge_adapter("lora")
    assert model.distilbert.transformer.layer[0].attention.q_lin.acts_as_linear()
    assert _ops_of(model, x) == reference_ops
    assert_close(model(x).last_hidden_state, unmerged, atol=1e-5)
    model.reset_adapter()
    assert_close(model.distilbert.transformer.layer[0].attention.q_lin.weight, weight, atol=1e-6)
    # reset subtracts the merged delta again (as PEFT and the adapters package do): the weights
    # come back within float32 rounding, and the output within the merge's own tolerance above
    assert_close(model(x).last_hidden_state, unmerged, atol=1e-5)


def test_adapter_names_overrides_the_active_setup_for_one_call():
    model = small_model()
    model.add_adapter("a", config="houlsby")
    model.add_adapter("b", config="seq_bn")
    randomise(model)
    x = ids()
    model.set_active_adapters("b")
    only_b = model(x).last_hidden_state
    model.set_active_adapters("a")
    only_a = model(x).last_hidden_state
    assert torch.equal(model(x, adapter_names=["b"]).last_hidden_state, only_b)
    assert model.active_adapters == Stack("a")
    with AdapterSetup("b"):
        assert torch.equal(model(x).last_hidden_state, only_b)
    assert torch.equal(model(x).last_hidden_state, only_a)
    stacked = model(x, adapter_names=Stack("a", "b")).last_hidden_state
    assert not torch.allclose(stacked, only_a) and not torch.allclose(stacked, only_b)


def test_gradient_checkpointing_recomputes_with_the_call_adapters():
    model = small_model(dropout=0.0, attention_dropout=0.0)
    model.add_adapter("a", config="houlsby")
    model.add_adapter("l", config="lora")
    randomise(model)
    model.train()
    x = ids()

    def grads():
        model.zero_grad()
        model(x, adapter_names=Stack("l", "a")).last_hidden_state.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    expected = grads()
    model.gradient_checkpointing_enable()
    actual = grads()
    assert set(actual) == set(expected) and any(".loras.l." in n for n in actual)
    for name in expected:
        assert_close(actual[name], expected[name], atol=1e-6, name=name)


def test_set_active_adapters_activates_the_head_of_the_same_name():
    model = small_model()
    model.add_adapter("t", config="seq_bn")
    model.add_classification_head("t")
    model.add_tagging_head("other")
    assert model.active_head == "other"
    model.set_active_adapters("t")
    assert model.active_head == "t"


def test_delete_adapter_removes_its_modules_and_unmerges():
    model = small_model()
    model.add_adapter("a", config="lora")
    model.add_adapter("b", config="houlsby")
    randomise(model)
    weight = model.distilbert.transformer.layer[1].attention.v_lin.weight.clone()
    model.set_active_adapters(Stack("a", "b"))
    model.merge_adapter("a")
    model.delete_adapter("a")
    assert_close(model.distilbert.transformer.layer[1].attention.v_lin.weight, weight, atol=1e-6)
    assert not adapter_keys(model, "a") and adapter_keys(model, "b")
    assert model.active_adapters == Stack("b")
    model.delete_adapter("b")
    assert model.active_adapters is None and not model.adapters_config


# -- bad input -------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [0, -2, 0.0, {"default": 0}, {"0": 4, "default": -1}])
def test_reduction_factor_must_be_positive(factor):
    with pytest.raises(ValueError, match="reduction_factor must be a number > 0"):
        SeqBnConfig(reduction_factor=factor)
    model = small_model()
    with pytest.raises(ValueError, match="reduction_factor must be a number > 0"):
        model.add_adapter("a", config={**SeqBnConfig().to_dict(), "reduction_factor": factor})
    assert not model.adapters_config


def test_bad_adapter_input_gives_clear_errors(tmp_path):
    model = small_model()
    model.add_adapter("a", config="seq_bn")
    x = ids()
    with pytest.raises(ValueError, match="already exists.*overwrite_ok"):
        model.add_adapter("a", config="houlsby")
    model.add_adapter("a", config="houlsby", overwrite_ok=True)
    assert model.adapters_config["a"].mh_adapter
    with pytest.raises(ValueError, match="unknown adapter config 'nope'"):
        model.add_adapter("b", config="nope")
    with pytest.raises(ValueError, match="'default' entry"):
        SeqBnConfig(reduction_factor={"1": 4})
    for argument, call in (("adapter_setup", lambda: model.set_active_adapters("nope")),
                           ("adapter_setup", lambda: model.train_adapter(["a", "nope"])),
                           ("name", lambda: model.merge_adapter("nope")),
                           ("adapter_name", lambda: model.save_adapter(str(tmp_path), "nope")),
                           ("adapter_names", lambda: model(x, adapter_names="nope"))):
        with pytest.raises(ValueError, match=f"^{argument}: no adapter named 'nope'"):
            call()
    for setup in (None, []):
        with pytest.raises(ValueError, match="adapter_setup must name at least one adapter"):
            model.train_adapter(setup)
    with pytest.raises(TypeError, match="head_setup must be a head name or a list of head names, got 5"):
        AdapterSetup("a", head_setup=5)
    model.add_classification_head("h")
    with pytest.raises(ValueError, match="^AdapterSetup's head_setup: no head named 'zz'"):
        with AdapterSetup("a", head_setup=["h", "zz"]):
            model(x)
    with pytest.raises(ValueError, match="^AdapterSetup's head_setup: no head named 'a'"):
        with AdapterSetup("a"):  # runs head "a", as the package's
            model(x)
    assert torch.equal(model(x, adapter_names="a").logits, model(x, adapter_names="a", head="h").logits)
    model.delete_adapter("nope")  # as the package: nothing to delete is skipped (with a warning)
    assert list(model.adapters_config) == ["a"]
    model.set_active_adapters("a")
    model.delete_adapter("a")
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        model(x, adapter_names=["a"])
    with pytest.raises(TypeError, match="adapter names"):
        Stack(["a"])
    with pytest.raises(TypeError, match="adapter setup must be"):
        model(x, adapter_names=5)
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoRAConfig(r=0)
    with pytest.raises(NotImplementedError, match="intermediate_lora"):
        LoRAConfig(intermediate_lora=True)
    with pytest.raises(NotImplementedError, match="phm_layer"):
        SeqBnConfig(phm_layer=True)
    with pytest.raises(ValueError, match="post_add"):
        BnConfig(mh_adapter=True, output_adapter=False, reduction_factor=2, non_linearity="relu",
                 residual_before_ln="post_add")
    model.add_adapter("h", config="houlsby")
    with pytest.raises(ValueError, match="bottleneck"):
        model.merge_adapter("h")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        model.load_adapter(str(tmp_path / "missing"))


def test_load_adapter_refuses_weights_that_do_not_fit(tmp_path):
    wide = DistilBertAdapterModel(DistilBertConfig(**{**SMALL_CONFIG, "dim": 64, "n_heads": 4}))
    wide.add_adapter("a", config="seq_bn")
    wide.save_adapter(str(tmp_path), "a")
    model = small_model()
    with pytest.raises(ValueError, match="hidden_size 64"):
        model.load_adapter(str(tmp_path))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["hidden_size"] = 32
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(str(tmp_path))
    assert not model.adapters_config  # a failed load leaves nothing behind


# -- fused backends --------------------------------------------------------------------------------
FUSED_BACKENDS = [b for b in backends.available_backends(torch.zeros(1)) if b != "eager"]


@pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend runs on this machine")
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_adapters_on_a_fused_backend_match_eager(backend):
    """A Stack of a Houlsby adapter and LoRA with a classification head, on a padded batch: the
    fused backend gives eager's logits and the same gradients for every trainable parameter, and
    it is the fused backend that ran the ops."""
    model = small_model(dropout=0.0, attention_dropout=0.0)
    model.add_adapter("bn", config="houlsby")
    model.add_adapter("lora", config=LoRAConfig(r=4, alpha=8))
    model.add_classification_head("cls", num_labels=3)
    randomise(model)
    model.train_adapter(Stack("bn", "lora"))
    x = ids(batch=3, seq=9)
    mask = torch.ones_like(x)
    mask[0, 5:] = 0
    mask[2, :] = 0  # a fully padded sequence
    labels = torch.tensor([0, 2, 1])

    def run(name):
        model.zero_grad()
        model.set_backend(name)
        out = model(x, attention_mask=mask, labels=labels, adapter_names=Stack("bn", "lora"))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.logits.detach(), grads

    ref_logits, ref_grads = run("eager")
    logits, grads = run(backend)
    assert last_backend("residual_layernorm") == backend
    assert last_backend("masked_attention") == backend
    assert_close(logits, ref_logits, atol=5e-5, name="logits")
    assert ref_grads.keys() == grads.keys() and any(".adapters." in n for n in grads)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol=5e-5, rtol=1e-4, name=name)


def test_adapter_to_and_average_adapter_refusals():
    """adapter_to moves one adapter only; average_adapter's bad arguments are ValueErrors naming
    them, and add nothing (its results are checked against the package in test_adapters_oracle)."""
    model = small_model()
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config=SeqBnConfig(reduction_factor=8))
    model.add_adapter("l", config="lora")
    model.adapter_to("a", dtype=torch.float64)
    dtypes = {n: p.dtype for n, p in model.named_parameters() if ".adapters." in n or ".loras." in n}
    assert {d for n, d in dtypes.items() if ".adapters.a." in n} == {torch.float64}
    assert {d for n, d in dtypes.items() if ".adapters.a." not in n} == {torch.float32}
    for call, message in (
        (lambda: model.average_adapter("m", []), "adapter_list must name at least one adapter"),
        (lambda: model.average_adapter("m", ["a", "nope"]), "adapter_list: no adapter named 'nope'"),
        (lambda: model.average_adapter("m", ["a", "b"]), "different configs"),
        (lambda: model.average_adapter("m", ["a"], combine_strategy="mean"), "combine_strategy must be one of"),
        (lambda: model.average_adapter("m", ["a"], combine_strategy="lora_delta_w_svd"), "is for LoRA adapters"),
        (lambda: model.average_adapter("m", ["l"], combine_strategy="lora_delta_w_svd"), "svd_rank must be set"),
        (lambda: model.average_adapter("m", ["a", "a"], weights=[1.0]), "one weight per adapter"),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert "m" not in model.adapters_config
    model.average_adapter("m", ["l", "l"], weights=[3.0, -1.0], normalize_weights=False)  # 2 x "l"
    assert torch.allclose(model.distilbert.transformer.layer[0].attention.q_lin.loras["m"].lora_A,
                          2 * model.distilbert.transformer.layer[0].attention.q_lin.loras["l"].lora_A)


def test_adapter_fusion_round_trip_training_and_refusals(tmp_path):
    """A Fuse of two bottleneck adapters (outputs against the package in test_adapters_oracle):
    save_adapter_fusion / load_adapter_fusion round trip exactly (under another name too), the
    packed call equals the padded one, train_adapter_fusion trains the fusion layers only (and the
    head), get_fusion_regularization_loss is 0.01 |I - W_value|^2, and bad setups name themselves."""
    model = small_model()
    model.add_adapter("a", config="seq_bn")
    model.add_adapter("b", config=SeqBnConfig(reduction_factor=4, non_linearity="gelu"))
    model.add_classification_head("h", num_labels=3)
    model.add_adapter_fusion(Fuse("a", "b"), config="dynamic", set_active=True)
    randomise(model, (".adapters.", "adapter_fusion_layer", "heads."))
    x, mask = ids(batch=3, seq=7), torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    expected = model(x, attention_mask=mask).logits
    assert model.active_head == "h"  # a Fuse names no head: the active head stays
    packed = model(x[mask.bool()], cu_seqlens=torch.tensor([0, 4, 11, 18], dtype=torch.int32), max_seqlen=7)
    assert_close(packed.logits, expected, atol=2e-6, name="packed")

    model.save_adapter_fusion(str(tmp_path / "fusion"), ["a", "b"])
    for name in "ab":
        model.save_adapter(str(tmp_path / name), name)
    other = small_model()
    other.add_classification_head("h", num_labels=3)
    other.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k})
    for name in "ab":
        other.load_adapter(str(tmp_path / name))
    assert other.load_adapter_fusion(str(tmp_path / "fusion"), load_as="ab", set_active=True) == "ab"
    assert other.active_adapters == Fuse("a", "b", name="ab")
    assert torch.equal(other(x, attention_mask=mask).logits, expected)

    model.train_adapter_fusion(Fuse("a", "b"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("adapter_fusion_layer.a,b." in n or n.startswith("heads.h.") for n in trainable)
    values = [m.adapter_fusion_layer["a,b"].value.weight for m in (b.output_adapters for b in
                                                                   model.distilbert.transformer.layer)]
    expected_loss = sum(0.01 * (torch.eye(v.shape[0]) - v).pow(2).sum() for v in values)
    assert_close(model.get_fusion_regularization_loss(), expected_loss, atol=1e-6, name="regularization")

    model.add_adapter("l", config="lora")
    with pytest.raises(ValueError, match="adapter_names: 'l' is a LoRA"):
        model.add_adapter_fusion(["a", "l"])
    with pytest.raises(ValueError, match="adapter_setup: no adapter fusion named 'b,a'"):
        model.set_active_adapters(Fuse("b", "a"))
    with pytest.raises(TypeError, match="Parallel children"):
        Parallel(Fuse("a", "b"), "a")
    with pytest.raises(ValueError, match="an adapter fusion named 'a,b' already exists"):
        model.add_adapter_fusion("a,b")
    with pytest.raises(ValueError, match="with_head: no head named 'a,b'"):
        model.save_adapter_fusion(str(tmp_path / "f2"), "a,b", with_head=True)
    model.adapter_fusion_to(Fuse("a", "b"), dtype=torch.float64)
    assert {p.dtype for n, p in model.named_parameters() if "adapter_fusion_layer" in n} == {torch.float64}
    model.delete_adapter_fusion(["a", "b"])
    assert model.active_adapters is None and not model.get_fusion_regularization_loss()
    model.delete_adapter_fusion("a,b")  # as the package: nothing to delete is skipped (with a warning)


def test_adapter_fusion_survives_save_pretrained(tmp_path):
    """save_pretrained records the fusions in config.json's adapters (the package's fusions,
    fusion_config_map, fusion_name_map), so from_pretrained rebuilds them before their weights
    load: the same outputs, none of the fusion weights dropped."""
    model = small_model()
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("b", config="double_seq_bn")
    model.add_classification_head("h", num_labels=3)
    model.add_adapter_fusion(["a", "b"], config="static", name="ab")
    model.add_adapter_fusion(["b", "a"], config={**AdapterFusionConfig().to_dict(), "residual_before": True})
    randomise(model, (".adapters.", "adapter_fusion_layer", "heads."))
    model.save_pretrained(str(tmp_path))
    loaded = DistilBertAdapterModel.from_pretrained(str(tmp_path)).eval()
    x = ids()
    for setup in (Fuse("a", "b", name="ab"), Fuse("b", "a")):
        expected = model(x, adapter_names=setup, head="h").logits
        assert torch.equal(loaded(x, adapter_names=setup, head="h").logits, expected)
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_adapter_fusion_with_head_round_trip(tmp_path):
    """save_adapter_fusion(with_head=...) writes the head beside the fusion (the head named like
    the fusion, or the one named by with_head) and load_adapter_fusion brings it back, named
    load_as or as saved, active only with set_active, as the package (the package's own files:
    test_adapters_oracle's fusion cases). A task class saves and loads its own head with the fusion
    (the package fails there); with_head=False leaves the head out."""
    model = small_model()
    for name in "ab":
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(["a", "b"])
    model.add_classification_head("a,b", num_labels=3)
    model.add_tagging_head("t", num_labels=2)
    randomise(model, (".adapters.", "adapter_fusion_layer", "heads."))
    model.save_adapter_fusion(str(tmp_path / "fused"), Fuse("a", "b"), with_head=True)
    model.save_adapter_fusion(str(tmp_path / "tagged"), "a,b", with_head="t")
    x = ids()
    for directory, head, load_as, set_active in (("fused", "a,b", None, False), ("tagged", "t", "x,y", True)):
        other = small_model()
        other.load_state_dict({k: v for k, v in model.state_dict().items() if "adapter" not in k
                               and not k.startswith("heads.")})
        for name in "ab":
            other.load_adapter(_saved_adapter(model, tmp_path, name))
        name = other.load_adapter_fusion(str(tmp_path / directory), load_as=load_as, set_active=set_active)
        assert name == (load_as or "a,b") and list(other.heads) == [load_as or head]
        assert other.active_head == (load_as if set_active else None)
        expected = model(x, adapter_names=Fuse("a", "b"), head=head).logits
        assert torch.equal(other(x, adapter_names=Fuse("a", "b", name=name), head=load_as or head).logits, expected)
    other = small_model()
    for name in "ab":
        other.load_adapter(_saved_adapter(model, tmp_path, name))
    other.load_adapter_fusion(str(tmp_path / "fused"), with_head=False)
    assert not other.heads

    task = DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG, num_labels=3)).eval()
    for name in "ab":
        task.add_adapter(name, config="seq_bn")
    task.add_adapter_fusion(["a", "b"], set_active=True)
    randomise(task, (".adapters.", "adapter_fusion_layer", "classifier"))
    task.save_adapter_fusion(str(tmp_path / "task"), "a,b", with_head=True)
    fresh = DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG, num_labels=3)).eval()
    fresh.load_state_dict({k: v for k, v in task.state_dict().items() if k.startswith("distilbert.")
                           and "adapter" not in k}, strict=False)
    for name in "ab":
        task.save_adapter(str(tmp_path / f"task_{name}"), name, with_head=False)
        fresh.load_adapter(str(tmp_path / f"task_{name}"))
    fresh.load_adapter_fusion(str(tmp_path / "task"), set_active=True)
    assert torch.equal(fresh(x).logits, task(x).logits)


def _saved_adapter(model, tmp_path, name):
    directory = tmp_path / f"adapter_{name}"
    if not directory.exists():
        model.save_adapter(str(directory), name, with_head=False)
    return str(directory)


def test_delete_adapter_deletes_its_fusions_and_leaves_a_loadable_model(tmp_path):
    """delete_adapter also deletes the fusions over the adapter (their layers and config entry)
    and takes a Fuse / BatchSplit holding it out of the active setup, so save_pretrained writes a
    model from_pretrained loads (the package keeps such a fusion and writes one it cannot load);
    replacing an adapter (add_adapter(overwrite_ok=True), load_adapter of a present name) keeps
    its fusions, as in the package."""
    model = small_model()
    for name in "abc":
        model.add_adapter(name, config="seq_bn")
    model.add_adapter_fusion(["a", "b"])
    model.add_adapter_fusion(["b", "c"], name="bc")
    model.add_adapter("b", config="seq_bn", overwrite_ok=True)
    assert sorted(model._adapters_state.fusions) == ["a,b", "bc"]
    model.set_active_adapters(Stack("c", Fuse("a", "b")))
    model.delete_adapter("a")
    assert list(model._adapters_state.fusions) == ["bc"]
    assert not [k for k in model.state_dict() if "adapter_fusion_layer.a,b." in k]
    assert model.active_adapters == Stack("c")
    model.set_active_adapters(BatchSplit("b", "c", batch_sizes=[1, 1]))
    model.delete_adapter("c")
    assert model.active_adapters is None and not model._adapters_state.fusions
    model.save_pretrained(str(tmp_path))
    loaded = DistilBertAdapterModel.from_pretrained(str(tmp_path))
    assert loaded.state_dict().keys() == model.state_dict().keys()


def test_load_adapter_leaves_the_active_head_unless_set_active(tmp_path):
    """As in the package: the head that comes with load_adapter is added, not activated (the
    active head stays; a model without one keeps none), and set_active=True activates the adapter
    and its head; load_head activates the head it loads."""
    model = small_model()
    model.add_adapter("a", config="seq_bn")
    model.add_classification_head("a", num_labels=3)
    model.save_adapter(str(tmp_path / "a"), "a")
    other = small_model()
    other.add_tagging_head("t", num_labels=2)
    assert other.load_adapter(str(tmp_path / "a"), load_as="b") == "b"
    assert sorted(other.heads) == ["b", "t"] and other.active_head == "t" and other.active_adapters is None
    other.load_adapter(str(tmp_path / "a"), load_as="c", set_active=True)
    assert other.active_head == "c" and other.active_adapters == Stack("c")
    bare = small_model()
    bare.load_adapter(str(tmp_path / "a"))
    assert bare.active_head is None and list(bare.heads) == ["a"]
    bare.load_head(str(tmp_path / "a"), load_as="h")
    assert bare.active_head == "h"


def test_adapter_setup_round_trip_on_a_task_class(tmp_path):
    """save_adapter_setup(head_setup=True) on a task class writes adapter_setup.json, each adapter,
    the fusions of the setup and the class's own head; load_adapter_setup(set_active=True) on a
    fresh model of the class gives the same outputs (the heads model, both ways with the package:
    test_adapters_oracle)."""
    task = DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG, num_labels=3)).eval()
    for name in "sab":
        task.add_adapter(name, config="seq_bn")
    task.add_adapter_fusion(["a", "b"])
    setup = Stack("s", Fuse("a", "b"))
    randomise(task, (".adapters.", "adapter_fusion_layer", "classifier"))
    task.save_adapter_setup(str(tmp_path), setup, head_setup=True)
    assert json.loads((tmp_path / "adapter_setup.json").read_text())["adapter_setup"] == setup.to_dict()
    fresh = DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG, num_labels=3)).eval()
    fresh.load_state_dict({k: v for k, v in task.state_dict().items() if k.startswith("distilbert.")
                           and "adapter" not in k}, strict=False)
    assert fresh.load_adapter_setup(str(tmp_path), set_active=True) == (setup, True)
    x = ids()
    assert torch.equal(fresh(x).logits, task(x, adapter_names=setup).logits)
    assert Stack.from_dict(BatchSplit("a", Stack("s", "b"), batch_sizes=[1, 2]).to_dict()) == BatchSplit(
        "a", Stack("s", "b"), batch_sizes=[1, 2])


def test_output_adapter_fusion_attentions():
    """forward(output_adapter_fusion_attentions=True) adds the package's adapter_fusion_attentions
    ({fusion: {layer: {place: (batch, seq, n_adapters) array}}}; values against the package in
    test_adapters_oracle): a padded batch that ran packed gets zeros at padding, packed input
    keeps (total, n_adapters), return_dict=False appends it; output_adapter_gating_scores gives {}
    (no gating adapters here)."""
    model = small_model()
    for name in "ab":
        model.add_adapter(name, config="double_seq_bn")
    model.add_adapter_fusion(["a", "b"], set_active=True)
    model.add_classification_head("h", num_labels=3)
    randomise(model, (".adapters.", "adapter_fusion_layer", "heads."))
    x, mask = ids(batch=3, seq=7), torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    out = model(x, attention_mask=mask, output_adapter_fusion_attentions=True, output_adapter_gating_scores=True)
    attentions = out.adapter_fusion_attentions
    assert out.adapter_gating_scores == {} and list(attentions) == ["a,b"]
    assert sorted(attentions["a,b"]) == [0, 1] and sorted(attentions["a,b"][0]) == ["mh_adapter", "output_adapter"]
    probs = torch.as_tensor(attentions["a,b"][1]["output_adapter"])
    assert probs.shape == (3, 7, 2)
    assert_close(probs[mask.bool()].sum(-1), torch.ones(int(mask.sum())), atol=1e-6, name="softmax rows")
    assert not probs[~mask.bool()].any()
    packed = model(x[mask.bool()], cu_seqlens=torch.tensor([0, 4, 11, 18], dtype=torch.int32), max_seqlen=7,
                   output_adapter_fusion_attentions=True)
    assert_close(torch.as_tensor(packed.adapter_fusion_attentions["a,b"][1]["output_adapter"]), probs[mask.bool()],
                 atol=1e-6, name="packed input")
    as_tuple = model(x, attention_mask=mask, return_dict=False, output_adapter_fusion_attentions=True)
    assert as_tuple[-1].keys() == attentions.keys() and torch.equal(as_tuple[0], out.logits)
    task = DistilBertForSequenceClassification(DistilBertConfig(**SMALL_CONFIG)).eval()
    for name in "ab":
        task.add_adapter(name, config="seq_bn")
    task.add_adapter_fusion(["a", "b"])
    names = list(inspect.signature(task.forward).parameters)  # adapter_names by position, as ONNX's exporter
    args = [x, mask] + [None] * (names.index("adapter_names") - 2) + [Fuse("a", "b")]
    probs = task(*args, output_adapter_fusion_attentions=True).adapter_fusion_attentions["a,b"][0]["output_adapter"]
    assert probs.shape == (3, 7, 2)
