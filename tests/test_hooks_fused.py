"""Module hooks on our classes fire as on transformers' DistilBERT (issue #14).

Our forward fuses modules transformers calls one by one (the LayerNorms, the FFN's activation,
the dropouts, the q/k/v projections into one GEMM) and runs real tokens packed. A hook a user
registers on any submodule (forward, forward-pre, with_kwargs, full backward, backward-pre, or a
global one) must still fire as on transformers' model: the same modules in the same order, seeing
the same tensors (values and shapes), and what a hook returns must flow on as it does there.

The oracle is transformers' own DistilBERT with our weights, biases and LayerNorm affines drawn
at random so that a bias or affine left out shows.
"""

import contextlib

import pytest
import torch
import transformers
from conftest import CLASS_NAMES, SMALL_CONFIG, assert_close, packed_attention_calls
from torch import nn
from torch.nn.modules import module as torch_module

import distilbert_fast
import distilbert_fast.modeling

# A 3-row batch of 8 positions, rows of 8, 5 and 2 real tokens
LENGTHS = (8, 5, 2)
SEQ = 8
# modules our fused forward stands in for (paths below the base model)
FUSED = ["embeddings.LayerNorm", "embeddings.dropout", "transformer.layer.0.attention.q_lin",
         "transformer.layer.1.attention.v_lin", "transformer.layer.0.attention.out_lin",
         "transformer.layer.0.sa_layer_norm", "transformer.layer.1.ffn.lin1", "transformer.layer.0.ffn.activation",
         "transformer.layer.1.ffn.lin2", "transformer.layer.0.ffn.dropout", "transformer.layer.1.output_layer_norm",
         "transformer.layer.0.attention", "transformer.layer.1.ffn", "transformer.layer.0", "embeddings"]


def pair(class_name, **overrides):
    """(transformers model, ours) in eval mode with the same weights; every bias and LayerNorm
    weight random (they start at 0 and 1, where leaving one out would not show)."""
    config = {**SMALL_CONFIG, **overrides}
    hf_config = transformers.DistilBertConfig(**config)
    hf_config._attn_implementation = "sdpa"  # transformers' default
    hf = getattr(transformers, class_name)(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name or "layer_norm" in name:
                p.normal_(0.0 if name.endswith("bias") else 1.0, 0.5)
    ours = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**config)).eval()
    ours.load_state_dict(hf.state_dict())
    return hf, ours


def batch(class_name, seq=SEQ, lengths=LENGTHS):
    ids = torch.randint(5, SMALL_CONFIG["vocab_size"], (len(lengths), seq))
    mask = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    if class_name == "DistilBertForMultipleChoice":  # (batch, 2 choices, seq)
        return {"input_ids": torch.stack([ids, ids.flip(0)], 1), "attention_mask": torch.stack([mask, mask.flip(0)], 1)}
    return {"input_ids": ids, "attention_mask": mask}


def main_output(out) -> torch.Tensor:
    """The first output (no loss given): last_hidden_state, logits or start_logits."""
    return (out if isinstance(out, tuple) else out.to_tuple())[0]


def floats(value) -> list:
    """The floating-point tensors in a hook's argument (a tensor, tuple, dict or model output)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):  # (model outputs, kwargs): in key order
        return [t for key in sorted(value) for t in floats(value[key])]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in floats(v)]
    return []


class Recorder:
    """Registers forward-pre (with kwargs), forward (with kwargs), full backward-pre and full
    backward hooks on every module of a model; ``events`` lists (module path, kind, float tensors
    seen, kwargs' keys) in firing order."""

    def __init__(self, model, kinds=("pre", "forward", "backward_pre", "backward")):
        self.events, self.handles = [], []
        for name, module in model.named_modules():
            name = name or "<model>"
            if "pre" in kinds:
                self.handles.append(module.register_forward_pre_hook(
                    lambda m, args, kwargs, name=name: self.record(name, "pre", (args, kwargs), kwargs),
                    with_kwargs=True))
            if "forward" in kinds:
                self.handles.append(module.register_forward_hook(
                    lambda m, args, kwargs, out, name=name: self.record(name, "forward", out, kwargs),
                    with_kwargs=True))
            if "backward_pre" in kinds:
                self.handles.append(module.register_full_backward_pre_hook(
                    lambda m, grad_out, name=name: self.record(name, "backward_pre", grad_out)))
            if "backward" in kinds:
                self.handles.append(module.register_full_backward_hook(
                    lambda m, grad_in, grad_out, name=name: self.record(name, "backward", (grad_in, grad_out))))

    def record(self, name, kind, value, kwargs=None):
        self.events.append((name, kind, [t.detach().clone() for t in floats(value)], set(kwargs or ())))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def assert_same_events(ours, theirs, atol=2e-5):
    """The same hooks fired in the same order on the same tensors; each call's keywords include
    transformers' (ours may pass more, e.g. head_mask)."""
    assert [e[:2] for e in ours] == [e[:2] for e in theirs]
    for (name, kind, tensors, keys), (_, _, expected, expected_keys) in zip(ours, theirs):
        assert expected_keys <= keys, f"{kind} hook on {name}: keywords {keys}, transformers' {expected_keys}"
        assert len(tensors) == len(expected), f"{kind} hook on {name}: {len(tensors)} tensors, transformers' {len(expected)}"
        for i, (a, b) in enumerate(zip(tensors, expected)):
            assert_close(a, b, atol=atol, rtol=1e-4, name=f"{kind} hook on {name}, tensor {i}")


def run_recorded(model, inputs, weight=None, kinds=("pre", "forward", "backward_pre", "backward")):
    recorder = Recorder(model, kinds)
    try:
        out = main_output(model(**inputs))
        if weight is not None:
            (out * weight).sum().backward()
    finally:
        recorder.remove()
    return recorder.events, out


# -- which modules there are ------------------------------------------------------------------------


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_the_same_modules_to_hook_as_transformers(class_name):
    """Every module transformers' model has, ours has under the same path and of the same kind
    (the activation too, a module in both), and no other: no fused-QKV or op module to hook."""
    hf, ours = pair(class_name)
    theirs = dict(hf.named_modules())
    mine = dict(ours.named_modules())
    assert list(mine) == list(theirs)
    for name, module in mine.items():
        expected = type(theirs[name])
        if expected.__module__.startswith("torch.nn"):
            assert type(module) is expected, name
        elif name.endswith("activation"):
            assert isinstance(module, distilbert_fast.modeling.Activation) and module.name == hf.config.activation


# -- every hook, as transformers fires it ---------------------------------------------------------


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_every_hook_fires_as_in_transformers(class_name):
    """Forward-pre and forward hooks (with kwargs), full backward-pre and backward hooks on every
    module: the same (module, kind) sequence as transformers', with the same tensors, padding
    positions included (the batch then runs padded, as transformers computes it)."""
    hf, ours = pair(class_name)
    inputs = batch(class_name)
    weight = torch.randn_like(main_output(hf(**inputs)))
    theirs, hf_out = run_recorded(hf, inputs, weight)
    mine, out = run_recorded(ours, inputs, weight)
    assert len(theirs) > 40
    assert_same_events(mine, theirs)
    assert_close(out, hf_out, atol=2e-5, rtol=1e-4, name="output")


@pytest.mark.parametrize("variant", ["chunked_ffn", "training", "inputs_embeds"])
def test_every_hook_fires_as_in_transformers_variants(variant):
    """The same on configurations that take other paths: the FFN in chunks (its parts' hooks fire
    per chunk, the FFN's once, as in transformers), training with dropout (our eager backend draws
    the masks in transformers' order), and inputs_embeds (no word-embedding call)."""
    overrides = {"chunk_size_feed_forward": 4} if variant == "chunked_ffn" else {}
    if variant == "training":
        overrides = {"dropout": 0.3, "attention_dropout": 0.2, "seq_classif_dropout": 0.25}
    hf, ours = pair("DistilBertForSequenceClassification", **overrides)
    inputs = batch("DistilBertForSequenceClassification")
    if variant == "inputs_embeds":
        embeds = hf.distilbert.embeddings.word_embeddings(inputs.pop("input_ids")).detach()
        inputs["inputs_embeds"] = embeds
    weight = torch.randn(len(LENGTHS), hf.config.num_labels)
    if variant == "training":
        hf.train(), ours.train()
    torch.manual_seed(3)
    theirs, _ = run_recorded(hf, inputs, weight)
    torch.manual_seed(3)
    with distilbert_fast.use_backend("eager") if variant == "training" else contextlib.nullcontext():
        mine, _ = run_recorded(ours, inputs, weight)
    assert_same_events(mine, theirs)
    if variant == "chunked_ffn":
        assert sum(name.endswith("ffn.lin1") and kind == "forward" for name, kind, *_ in mine) == 2 * 2  # 2 chunks, 2 layers
        assert sum(name.endswith("ffn") and kind == "forward" for name, kind, *_ in mine) == 2
    if variant == "training":
        dropped = [t for name, kind, t, _ in mine if name == "distilbert.embeddings.dropout" and kind == "forward"]
        assert (dropped[0][0] == 0).any()  # (dropout really ran)


def test_global_hooks_fire_as_in_transformers():
    """torch.nn.modules.module's global forward-pre, forward and full backward hooks fire on our
    modules as on transformers' (names from each model's own module paths)."""
    hf, ours = pair("DistilBertForMaskedLM")
    inputs = batch("DistilBertForMaskedLM")
    weight = torch.randn(len(LENGTHS), SEQ, SMALL_CONFIG["vocab_size"])
    results = []
    for model in (hf, ours):
        names = {module: name or "<model>" for name, module in model.named_modules()}
        events = []

        def record(kind):
            return lambda module, *hook_args: (
                events.append((names[module], kind, [t.detach().clone() for t in floats(hook_args[-1])]))
                if module in names else None)

        handles = [torch_module.register_module_forward_pre_hook(record("pre")),
                   torch_module.register_module_forward_hook(record("forward")),
                   torch_module.register_module_full_backward_hook(record("backward"))]
        try:
            out = model(**inputs).logits
            (out * weight).sum().backward()
        finally:
            for handle in handles:
                handle.remove()
        results.append(events)
    theirs, mine = results
    assert [e[:2] for e in mine] == [e[:2] for e in theirs] and len(theirs) > 100
    for (name, kind, tensors), (_, _, expected) in zip(mine, theirs):
        assert len(tensors) == len(expected), (name, kind)
        for a, b in zip(tensors, expected):
            assert_close(a, b, atol=2e-5, rtol=1e-4, name=f"global {kind} hook on {name}")


# -- what a hook returns flows on -----------------------------------------------------------------


def _mixed(value):
    """A hook's replacement tensor: each feature mixed with its neighbour's (a LayerNorm after it
    does not undo that, as it would a scale and shift); ids rolled; a tuple keeps the rest."""
    if isinstance(value, tuple):
        return (_mixed(value[0]), *value[1:])
    return value + 0.5 * value.roll(1, -1) if value.is_floating_point() else value.roll(1, -1)  # (ids: others)


@pytest.mark.parametrize("path", FUSED)
def test_a_hook_that_replaces_the_output_or_input_changes_the_model_alike(path):
    """A forward hook returning another output, and a forward-pre hook (with kwargs) returning
    another input, on a module our forward fuses: the replacement flows on as in transformers,
    and changes the model's output."""
    hf, ours = pair("DistilBertModel")
    inputs = batch("DistilBertModel")
    plain = hf(**inputs).last_hidden_state
    for register in ("forward", "pre"):
        outs = []
        for model in (hf, ours):
            module = model.get_submodule(path)
            if register == "forward":
                handle = module.register_forward_hook(lambda m, args, out: _mixed(out))
            else:
                handle = module.register_forward_pre_hook(
                    lambda m, args, kwargs: ((_mixed(args[0]), *args[1:]), kwargs), with_kwargs=True)
            with handle:  # (RemovableHandle as a context manager)
                outs.append(model(**inputs).last_hidden_state)
        assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4, name=f"output with a {register} hook on {path}")
        assert (outs[0] - plain).abs().max() > 1e-4  # (the replacement counts)


@pytest.mark.parametrize("path", ["activation", "vocab_transform", "vocab_layer_norm", "vocab_projector"])
def test_hooks_on_the_masked_lm_head_fire_as_in_transformers(path):
    """The masked-LM head's transform, activation and LayerNorm (fused in ours) and projection: a
    hook sees transformers' (batch, seq, ...) tensor, padding included, and its replacement flows
    on."""
    hf, ours = pair("DistilBertForMaskedLM")
    inputs = batch("DistilBertForMaskedLM")
    results = []
    for model in (hf, ours):
        seen = []

        def hook(m, args, out):
            seen.append(out.detach().clone())
            return out * 0.5

        with model.get_submodule(path).register_forward_hook(hook):
            results.append((seen, model(**inputs).logits))
    (theirs, hf_logits), (mine, logits) = results
    assert len(mine) == len(theirs) == 1
    assert_close(mine[0], theirs[0], atol=2e-5, rtol=1e-4, name=f"output of {path}")
    assert_close(logits, hf_logits, atol=2e-5, rtol=1e-4, name="logits")


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "DistilBertForTokenClassification"])
def test_a_hook_on_the_base_model_inside_a_head_sees_transformers_output(class_name):
    """A forward hook on a head's ``distilbert`` (a submodule there) sees transformers' hidden
    states at every position, padding included, as transformers' model gives them."""
    hf, ours = pair(class_name)
    inputs = batch(class_name)
    seen = []
    for model in (hf, ours):
        with model.distilbert.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state)):
            model(**inputs)
    theirs, mine = seen
    assert_close(mine, theirs, atol=2e-5, rtol=1e-4, name="last_hidden_state the hook saw")


# -- the fast path stays the fast path ----------------------------------------------------------


def test_removing_the_hooks_brings_the_packed_fused_path_back(monkeypatch):
    """With a hook on a fused module the batch runs padded, through the module; removed (or its
    RemovableHandle's context left), the model runs packed on the fused ops again, none of the
    fused modules called."""
    _, ours = pair("DistilBertModel")
    inputs = batch("DistilBertModel")
    layers = SMALL_CONFIG["n_layers"]
    assert packed_attention_calls(monkeypatch, ours, inputs) == layers
    norm = ours.transformer.layer[1].sa_layer_norm
    with norm.register_forward_hook(lambda m, args, out: None):
        assert packed_attention_calls(monkeypatch, ours, inputs) == 0
    assert packed_attention_calls(monkeypatch, ours, inputs) == layers
    called = []
    fused = [m for m in ours.modules() if isinstance(m, (nn.LayerNorm, nn.Dropout, distilbert_fast.modeling.Activation))
             or m is ours.transformer.layer[0].attention.q_lin]
    fused.remove(ours.embeddings.dropout)  # (called as a module either way: no fused op stands in for it)
    forwards = [(m, m.forward) for m in fused]
    for m, forward in forwards:  # (an instance forward: no hook, so the fast path's checks hold)
        m.forward = lambda *args, _forward=forward, **kwargs: called.append(1) or _forward(*args, **kwargs)
    try:
        ours(**inputs)
    finally:
        for m, _ in forwards:
            del m.forward
    assert not called


# -- the ecosystem's hook users --------------------------------------------------------------------


def test_hidden_states_by_hooks_as_in_transformers():
    """Feature extraction without output_hidden_states: forward hooks on the layers (and the
    embeddings' LayerNorm) collect what transformers' would, and what output_hidden_states gives."""
    hf, ours = pair("DistilBertModel")
    inputs = batch("DistilBertModel")
    real = inputs["attention_mask"].bool()
    collected = []
    for model in (hf, ours):
        states = []
        modules = [model.embeddings.LayerNorm, *model.transformer.layer]
        handles = [m.register_forward_hook(lambda m, args, out: states.append(out)) for m in modules]
        model(**inputs)
        for handle in handles:
            handle.remove()
        collected.append(states)
    reference = ours(**inputs, output_hidden_states=True).hidden_states  # (packed: real tokens)
    for i, (mine, theirs) in enumerate(zip(*reversed(collected))):
        assert_close(mine, theirs, atol=2e-5, rtol=1e-4, name=f"hidden state {i}")
        if i > 0:  # (hidden_states[0] is after the embeddings' dropout: the same in eval)
            assert_close(mine[real], reference[i][real], atol=2e-5, rtol=1e-4, name=f"hidden_states[{i}]")


def test_peft_lora_on_q_and_v_with_hooks():
    """PEFT LoRA on q_lin / v_lin (with non-zero B, so the LoRA counts) and hooks on the wrapped
    projection's base layer, the LoRA's B and a fused LayerNorm: the same calls and tensors as on
    transformers' model under the same LoRA, and the same logits."""
    peft = pytest.importorskip("peft")
    hf, ours = pair("DistilBertForSequenceClassification")
    inputs = batch("DistilBertForSequenceClassification")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_lin", "v_lin"], lora_dropout=0.0)
    models = [peft.get_peft_model(m, peft.LoraConfig(**lora)) for m in (hf, ours)]
    torch.manual_seed(5)
    lora_weights = {name: torch.randn_like(p) for name, p in models[0].named_parameters() if "lora_" in name}
    for model in models:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in lora_weights:
                    p.copy_(lora_weights[name])
    paths = ["base_model.model.distilbert.transformer.layer.0.attention.q_lin.base_layer",
             "base_model.model.distilbert.transformer.layer.1.attention.v_lin.lora_B.default",
             "base_model.model.distilbert.transformer.layer.0.sa_layer_norm",
             "base_model.model.distilbert.transformer.layer.1.output_layer_norm"]
    results = []
    for model in models:
        seen = []
        handles = [model.get_submodule(p).register_forward_hook(
            lambda m, args, out, p=p: seen.append((p, out.detach().clone()))) for p in paths]
        logits = model(**inputs).logits
        for handle in handles:
            handle.remove()
        results.append((seen, logits))
    (theirs, hf_logits), (mine, logits) = results
    assert [p for p, _ in mine] == [p for p, _ in theirs] and sorted(p for p, _ in mine) == sorted(paths)
    for (p, a), (_, b) in zip(mine, theirs):
        assert_close(a, b, atol=2e-5, rtol=1e-4, name=p)
    assert_close(logits, hf_logits, atol=2e-5, rtol=1e-4, name="logits")


def test_captum_layer_integrated_gradients_on_the_embeddings():
    """captum's LayerIntegratedGradients on the embeddings (it replaces the layer's output by a
    forward hook and reads its gradient): the same attributions as on transformers' model."""
    attr = pytest.importorskip("captum.attr")
    hf, ours = pair("DistilBertForSequenceClassification")
    inputs = batch("DistilBertForSequenceClassification")
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    results = []
    for model in (hf, ours):
        lig = attr.LayerIntegratedGradients(lambda ids, mask, model=model: model(input_ids=ids, attention_mask=mask).logits,
                                            model.distilbert.embeddings)
        attributions, delta = lig.attribute(ids, baselines=torch.zeros_like(ids), additional_forward_args=(mask,),
                                            target=1, n_steps=8, return_convergence_delta=True)
        results.append((attributions, delta))
    (theirs, hf_delta), (mine, delta) = results
    assert mine.abs().sum() > 0
    assert_close(mine, theirs, atol=2e-5, rtol=1e-4, name="attributions")
    assert_close(delta, hf_delta, atol=2e-5, rtol=1e-4, name="convergence delta")
