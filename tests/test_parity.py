"""Parity with HuggingFace: every distilbert_fast model against transformers' DistilBERT.

Each test builds an HF model from a small random config and ours with the same weights
(``conftest.make_pair``), runs both on the same inputs and compares outputs, losses and the
gradient of every parameter (fp32, max abs diff <= 1e-5 unless a test says otherwise).

The default oracle attention is transformers 4's (see conftest): it supports ``head_mask`` and
gives masked scores zero gradient, which is what ours does. Stock transformers 5 attention
(``attn="eager"`` / ``attn="sdpa"``) is compared separately, with the differences spelled out.
"""

import pytest
import torch
import transformers
from torch import nn

import distilbert_fast
from conftest import CLASS_NAMES, SMALL_CONFIG, assert_close, hf_forward, make_pair, real_positions_only

# fp32 vs fp32: both sides carry their own rounding error. On CPU the default backend is the fused
# C++ one (cpu), whose reductions sum in another order than HF's composite ops, so the two errors
# no longer cancel: on the initializer_range=0.3 configs logits and tied-embedding gradients
# (|g| ~ 2.5) differ by up to ~3e-5, while each side's error vs a float64 HF stays ~1e-5 (the cpu
# backend's no larger than eager's). Gradients are also held to GRAD_RTOL of their scale below.
ATOL = 5e-5
GRAD_RTOL = 1e-4  # gradients: also max abs diff <= GRAD_RTOL * max |HF gradient| (per tensor)

DROPOUT_CONFIG = dict(dropout=0.3, attention_dropout=0.2, seq_classif_dropout=0.25, qa_dropout=0.35)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and on a busy 2-core machine it
    avoids OpenMP oversubscription, which otherwise multiplies this file's runtime by ~10."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- inputs ----------------------------------------------------------------------------------------


def _attention_mask(rows: int, seq: int, padding: str | None) -> torch.Tensor | None:
    """(rows, seq) 0/1 mask. 'partial': row 1 right-padded, the last row left-padded (when seq
    allows). 'full': additionally row 2 masked entirely (a fully-masked row)."""
    if padding is None:
        return None
    mask = torch.ones(rows, seq, dtype=torch.long)
    if seq > 1:
        mask[1, seq - seq // 2 :] = 0
        mask[rows - 1, 0] = 0
    if padding == "full":
        mask[2] = 0
    else:
        assert padding == "partial", padding
    assert bool(mask.any(dim=1)[:2].all())  # rows 0 and 1 always attend somewhere
    return mask


NUM_CHOICES = 3


def make_inputs(class_name, config, padding=None, seq=7, labels=True, embeds=False, position_ids=False):
    """Inputs for ``class_name``: (3, seq), or (2, NUM_CHOICES, seq) for multiple choice. One dict
    is passed to both models (neither modifies its inputs in place)."""
    multiple_choice = class_name == "DistilBertForMultipleChoice"
    batch, num_choices = (2, NUM_CHOICES) if multiple_choice else (3, None)
    rows = batch * num_choices if multiple_choice else batch
    ids = torch.randint(1, config.vocab_size, (rows, seq))
    mask = _attention_mask(rows, seq, padding)
    if mask is not None and config.pad_token_id is not None:
        ids = ids.masked_fill(mask == 0, config.pad_token_id)
    shape = (batch, num_choices, seq) if multiple_choice else (batch, seq)
    inputs = {}
    if embeds:
        inputs["inputs_embeds"] = torch.randn(*shape, config.dim)
    else:
        inputs["input_ids"] = ids.view(shape)
    if mask is not None:
        inputs["attention_mask"] = mask.view(shape)
    if position_ids:
        # HF's multiple choice passes position_ids to the base model without flattening them, so
        # only a broadcastable (1, seq) works there; the other heads get (batch, seq).
        pos_rows = 1 if multiple_choice else batch
        inputs["position_ids"] = torch.randint(0, config.max_position_embeddings, (pos_rows, seq))
    if labels:
        inputs.update(make_labels(class_name, config, batch, seq, num_choices, mask))
    return inputs


def _token_labels(n_classes, batch, seq, mask):
    labels = torch.randint(0, n_classes, (batch, seq))
    labels[0, 1::2] = -100  # ignored; labels[0, 0] always counts
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    return labels


def make_labels(class_name, config, batch, seq, num_choices, mask):
    """Labels for every head, with ignored entries (-100, out-of-range QA positions)."""
    if class_name == "DistilBertModel":
        return {}
    if class_name == "DistilBertForMaskedLM":
        return {"labels": _token_labels(config.vocab_size, batch, seq, mask)}
    if class_name == "DistilBertForTokenClassification":
        return {"labels": _token_labels(config.num_labels, batch, seq, mask)}
    if class_name == "DistilBertForSequenceClassification":
        return {"labels": torch.randint(0, config.num_labels, (batch,))}
    if class_name == "DistilBertForMultipleChoice":
        return {"labels": torch.randint(0, num_choices, (batch,))}
    if class_name == "DistilBertForQuestionAnswering":
        # Out-of-range positions are clamped to [0, seq]; seq is the ignore_index, so seq + 3 and
        # seq + 100 are ignored while -2 becomes position 0. Row 0 is always in range.
        return {
            "start_positions": torch.tensor([min(1, seq - 1), seq + 3, seq - 1]),
            "end_positions": torch.tensor([seq - 1, -2, seq + 100]),
        }
    raise AssertionError(class_name)


def make_head_mask(kind, config):
    """(heads,) or (layers, heads), with zeros and fractions, as a leaf that requires grad."""
    heads, layers = config.n_heads, config.n_layers
    if kind == "1d":
        mask = torch.linspace(0.0, 1.0, heads).flip(0)  # 1, ..., 0
    else:
        assert kind == "2d", kind
        mask = torch.rand(layers, heads)
        mask[0, -1] = 0.0
        mask[-1, 0] = 1.0
    return mask.requires_grad_(True)


def transformers_model(class_name, **kwargs):
    """A fresh, independently initialised HF model (default attention implementation)."""
    return getattr(transformers, class_name)(transformers.DistilBertConfig(**kwargs)).eval()


def our_model(class_name, **kwargs):
    return getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**kwargs)).eval()


# -- comparisons -----------------------------------------------------------------------------------


def assert_values_close(actual, expected, name, atol=ATOL):
    """A tensor, or a (nested) tuple of tensors compared element by element, lengths included."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, tuple), f"{name}: {type(actual).__name__} is not a tuple"
        assert len(actual) == len(expected), f"{name}: {len(actual)} elements != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_values_close(a, e, f"{name}[{i}]", atol)
    else:
        assert isinstance(actual, torch.Tensor), f"{name}: {type(actual).__name__}"
        assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
        assert_close(actual, expected, atol=atol, name=name)


def assert_outputs_close(ours, hf, atol=ATOL, attention_mask=None):
    """Same output class (by name), same fields set, in the same order, with close values (at
    real positions, when an attention_mask is given)."""
    ours, hf = real_positions_only(ours, attention_mask), real_positions_only(hf, attention_mask)
    assert type(ours).__name__ == type(hf).__name__
    assert list(ours.keys()) == list(hf.keys()), f"fields {list(ours.keys())} != {list(hf.keys())}"
    for key in hf.keys():
        assert_values_close(ours[key], hf[key], key, atol)


def objective(out):
    """A scalar that depends on every output (loss, logits, hidden states, attentions) through
    fixed random weights, so each output's gradient path is exercised."""
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for key in out.keys():
        values = out[key] if isinstance(out[key], (tuple, list)) else (out[key],)
        for value in values:
            weight = torch.randn(value.shape, generator=gen) / max(value.numel(), 1) ** 0.5
            total = total + (value * weight).sum()
    return total


def assert_grads_close(ours, hf, atol=ATOL, only=None):
    """Every parameter: where HF has a gradient ours has one too, and they match. A parameter
    that is frozen in ours may only be the sinusoidal position table (HF 5 leaves it trainable).
    ``only``: restrict the comparison to these parameter names."""
    hf_params = dict(hf.named_parameters())
    our_params = dict(ours.named_parameters())
    assert set(our_params) == set(hf_params)
    compared = without_grad = 0
    for name, hp in hf_params.items():
        op = our_params[name]
        if only is not None and name not in only:
            continue
        if not op.requires_grad:
            assert ours.config.sinusoidal_pos_embds, name
            assert name.endswith("embeddings.position_embeddings.weight"), name
            assert op.grad is None, name
            assert torch.equal(op, hp), f"{name}: frozen table differs from HF's"
            continue
        if hp.grad is None:
            # only the word embeddings, unused when the input is inputs_embeds (no MLM tying)
            assert name.endswith("embeddings.word_embeddings.weight"), f"{name}: HF has no gradient"
            assert op.grad is None, f"{name}: ours has a gradient, HF has none"
            without_grad += 1
            continue
        assert op.grad is not None, f"{name}: HF has a gradient, ours has none"
        assert_close(op.grad, hp.grad, atol=atol, name=f"grad {name}")
        # and relative to the tensor's scale, so that small gradients are held to account too
        scale = hp.grad.abs().max().item()
        assert_close(op.grad, hp.grad, atol=GRAD_RTOL * scale + 1e-6, name=f"grad {name} (scaled)")
        compared += 1
    expected = sum(1 for n, p in our_params.items() if p.requires_grad and (only is None or n in only))
    assert compared + without_grad == expected, f"compared {compared} + {without_grad}, expected {expected}"
    assert compared > 0


def run_parity(hf, ours, inputs, head_mask=None, atol=ATOL, grad_atol=ATOL, **flags):
    """Forward (dict) and backward on both, compare outputs and all gradients (parameters,
    inputs_embeds, head_mask); then forward with return_dict=False on both, compare the tuples with
    each other and with ours' dict output's to_tuple()."""
    hf_inputs = dict(inputs)
    our_inputs = dict(inputs)
    if "inputs_embeds" in inputs:
        hf_inputs["inputs_embeds"] = inputs["inputs_embeds"].clone().requires_grad_(True)
        our_inputs["inputs_embeds"] = inputs["inputs_embeds"].clone().requires_grad_(True)
    hf_head = our_head = None
    if head_mask is not None:
        hf_head = head_mask.detach().clone().requires_grad_(True)
        our_head = head_mask.detach().clone().requires_grad_(True)

    hf_out = hf_forward(hf, head_mask=hf_head, **hf_inputs, **flags)
    our_out = ours(**our_inputs, head_mask=our_head, **flags)
    mask = inputs.get("attention_mask")
    assert_outputs_close(our_out, hf_out, atol, mask)
    our_raw = our_out
    hf_out, our_out = real_positions_only(hf_out, mask), real_positions_only(our_out, mask)
    if any(k.endswith("labels") or k.endswith("positions") for k in inputs):
        assert "loss" in our_out.keys() and our_out.loss.dim() == 0
        assert torch.isfinite(our_out.loss)

    objective(hf_out).backward()
    objective(our_out).backward()
    assert_grads_close(ours, hf, grad_atol)
    if head_mask is not None:
        assert our_head.grad is not None
        assert_close(our_head.grad, hf_head.grad, atol=grad_atol, name="grad head_mask")
    if "inputs_embeds" in inputs:
        assert_close(our_inputs["inputs_embeds"].grad, hf_inputs["inputs_embeds"].grad, atol=grad_atol,
                     name="grad inputs_embeds")

    with torch.no_grad():
        our_tuple = ours(**inputs, head_mask=head_mask, return_dict=False, **flags)
        hf_tuple = hf_forward(hf, head_mask=head_mask, **inputs, return_dict=False, **flags)
    assert isinstance(our_tuple, tuple) and isinstance(hf_tuple, tuple)
    dict_tuple = our_raw.to_tuple()
    assert len(our_tuple) == len(dict_tuple) == len(our_out.keys())
    assert_values_close(our_tuple, dict_tuple, "return_dict=False vs to_tuple()", atol=0.0)
    assert_values_close(real_positions_only(type(our_out)(**dict(zip(our_out.keys(), our_tuple))), mask).to_tuple(),
                        real_positions_only(type(our_out)(**dict(zip(our_out.keys(), hf_tuple))), mask).to_tuple(),
                        "tuple vs HF tuple", atol)
    return hf_out, our_out


# -- every class, every input shape ----------------------------------------------------------------

SCENARIOS = {
    "no_mask": dict(),
    "padded": dict(padding="partial"),
    "fully_masked_row": dict(padding="full"),
    "head_mask_1d": dict(padding="full", head_mask="1d"),
    "head_mask_2d": dict(padding="full", head_mask="2d"),
    "all_outputs": dict(padding="full", output_attentions=True, output_hidden_states=True),
    "all_outputs_head_mask": dict(padding="partial", head_mask="2d", output_attentions=True,
                                  output_hidden_states=True),
    "inputs_embeds": dict(padding="full", embeds=True, output_hidden_states=True),
    "position_ids": dict(padding="partial", position_ids=True),
}


@pytest.mark.parametrize("init_std", [0.02, 0.3], ids=["init0.02", "init0.3"])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_parity(class_name, scenario, init_std):
    """init_std 0.02 is HF's default (near-uniform attention, small pre-activations); 0.3 gives
    peaked attention and order-1 activations, closer to trained weights."""
    spec = dict(SCENARIOS[scenario])
    head_kind = spec.pop("head_mask", None)
    flags = {k: spec.pop(k) for k in ("output_attentions", "output_hidden_states") if k in spec}
    hf, ours = make_pair(class_name, initializer_range=init_std)
    inputs = make_inputs(class_name, ours.config, **spec)
    head_mask = None if head_kind is None else make_head_mask(head_kind, ours.config)
    hf_out, our_out = run_parity(hf, ours, inputs, head_mask=head_mask, **flags)

    n_layers = ours.config.n_layers
    if flags.get("output_hidden_states"):
        assert len(our_out.hidden_states) == n_layers + 1
    else:
        assert our_out.hidden_states is None and "hidden_states" not in our_out.keys()
    if flags.get("output_attentions"):
        assert len(our_out.attentions) == n_layers
        if head_mask is not None:  # a head masked to 0 gives all-zero attention weights
            assert not our_out.attentions[0][:, -1].any()
    else:
        assert our_out.attentions is None


def test_output_flags_from_config():
    """config.output_attentions / output_hidden_states / return_dict are the defaults, as in HF."""
    hf, ours = make_pair("DistilBertForSequenceClassification", output_attentions=True,
                         output_hidden_states=True, return_dict=False)
    inputs = make_inputs("DistilBertForSequenceClassification", ours.config, padding="full")
    with torch.no_grad():
        hf_out, our_out = hf(**inputs), ours(**inputs)
    assert isinstance(our_out, tuple) and len(our_out) == len(hf_out) == 4  # loss, logits, hs, attn
    assert_values_close(our_out, hf_out, "config-default outputs")


# -- sequence classification: problem_type inference ----------------------------------------------

PROBLEM_TYPES = {
    "regression": (dict(num_labels=1), lambda b, n: torch.randn(b), "regression"),
    "single_label": (dict(num_labels=3), lambda b, n: torch.randint(0, n, (b,)),
                     "single_label_classification"),
    "multi_label": (dict(num_labels=3), lambda b, n: torch.randint(0, 2, (b, n)).float(),
                    "multi_label_classification"),
    "explicit_regression": (dict(num_labels=3, problem_type="regression"), lambda b, n: torch.randn(b, n),
                            "regression"),
}


@pytest.mark.parametrize("case", list(PROBLEM_TYPES))
def test_sequence_classification_problem_type(case):
    overrides, make, expected = PROBLEM_TYPES[case]
    hf, ours = make_pair("DistilBertForSequenceClassification", **overrides)
    assert ours.config.problem_type == hf.config.problem_type == overrides.get("problem_type")
    inputs = make_inputs("DistilBertForSequenceClassification", ours.config, padding="full", labels=False)
    inputs["labels"] = make(3, ours.config.num_labels)
    hf_out, our_out = run_parity(hf, ours, inputs)
    assert hf.config.problem_type == expected  # the oracle infers what we think it does
    assert ours.config.problem_type == hf.config.problem_type
    assert our_out.logits.shape == (3, ours.config.num_labels)


# -- stock transformers 5 attention ----------------------------------------------------------------


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_stock_eager_attention_without_fully_masked_rows(class_name):
    hf, ours = make_pair(class_name, attn="eager")
    inputs = make_inputs(class_name, ours.config, padding="partial")
    run_parity(hf, ours, inputs, output_attentions=True, output_hidden_states=True)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_stock_eager_attention_with_fully_masked_row(class_name):
    """Forward outputs match. Gradients differ by design: transformers 5 *adds* the mask
    (finfo.min) to the scores, so the scores of a fully-masked row (softmax: uniform) still get a
    gradient, which flows into q and k. Ours, like transformers 4 (masked_fill), treats masked
    scores as constants with zero gradient. So only the parameters whose gradient does not pass
    through any attention scores (last block after its scores, and the heads) agree; the last
    block's q_lin/k_lin gradients differ, and everything upstream of them."""
    hf, ours = make_pair(class_name, attn="eager")
    inputs = make_inputs(class_name, ours.config, padding="full")
    hf_out = hf(**inputs, output_attentions=True, output_hidden_states=True)
    our_out = ours(**inputs, output_attentions=True, output_hidden_states=True)
    assert_outputs_close(our_out, hf_out)
    objective(hf_out).backward()
    objective(our_out).backward()

    last = f"transformer.layer.{ours.config.n_layers - 1}."
    prefix = "" if class_name == "DistilBertModel" else "distilbert."
    names = [n for n, _ in ours.named_parameters()]
    downstream = {
        n for n in names
        if not n.startswith(prefix + "transformer.") and not n.startswith(prefix + "embeddings.")
        or n.startswith(prefix + last) and ".q_lin." not in n and ".k_lin." not in n
    }
    assert_grads_close(ours, hf, only=downstream)
    q_grad = dict(ours.named_parameters())[prefix + last + "attention.q_lin.weight"].grad
    hf_q_grad = dict(hf.named_parameters())[prefix + last + "attention.q_lin.weight"].grad
    assert (q_grad - hf_q_grad).abs().max() > 1e-6, "expected transformers 5's spurious q/k gradient"


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_stock_sdpa_attention_forward(class_name):
    hf, ours = make_pair(class_name, attn="sdpa")
    inputs = make_inputs(class_name, ours.config, padding="partial")
    with torch.no_grad():
        assert_outputs_close(ours(**inputs, output_hidden_states=True),
                             hf(**inputs, output_hidden_states=True), atol=1e-5,
                             attention_mask=inputs["attention_mask"])


def test_stock_sdpa_attention_fully_masked_row():
    """With sdpa (transformers 5's default), torch's SDPA returns a zero context for a query whose
    keys are all masked, where eager attention (v4 and v5) and ours attend uniformly. Rows with
    at least one attended key match; the fully-masked row (2) is not compared."""
    hf, ours = make_pair("DistilBertModel", attn="sdpa")
    inputs = make_inputs("DistilBertModel", ours.config, padding="full")
    with torch.no_grad():
        hf_out, our_out = hf(**inputs), ours(**inputs)
    assert_close(our_out.last_hidden_state[:2], hf_out.last_hidden_state[:2], name="rows 0-1")


# -- training mode: dropout ------------------------------------------------------------------------

TRAINING_CASES = [(c, {}) for c in CLASS_NAMES] + [
    ("DistilBertForMaskedLM", dict(chunk_size_feed_forward=4)),  # dropout per FFN chunk
]


@pytest.mark.parametrize("class_name,extra", TRAINING_CASES,
                         ids=[c + ("-chunked" if e else "") for c, e in TRAINING_CASES])
def test_training_dropout(class_name, extra):
    """Our eager backend draws the CPU dropout masks in HF's order (embeddings, then per layer
    attention weights and FFN output, then the head's dropout) with the same bernoulli calls, so
    the same seed gives the same masks."""
    hf, ours = make_pair(class_name, **DROPOUT_CONFIG, **extra)
    inputs = make_inputs(class_name, ours.config, padding="full", seq=8)
    flags = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        eval_out = ours(**inputs, **flags)
    hf.train()
    ours.train()
    torch.manual_seed(7)
    hf_out = hf(**inputs, **flags)
    torch.manual_seed(7)
    with distilbert_fast.use_backend("eager"):
        our_out = ours(**inputs, **flags)
    assert_outputs_close(our_out, hf_out)
    # dropout really ran (the comparison above is not an eval-mode one)
    assert not torch.allclose(our_out.hidden_states[-1], eval_out.hidden_states[-1], atol=1e-3)
    assert (our_out.attentions[0][0] == 0).any()  # row 0 has no padding: these zeros are dropout
    with distilbert_fast.use_backend("eager"):
        objective(our_out).backward()
    objective(hf_out).backward()
    assert_grads_close(ours, hf)


# -- config variants -------------------------------------------------------------------------------

VARIANTS = {
    "sinusoidal": dict(sinusoidal_pos_embds=True),
    "gelu": dict(activation="gelu"),
    "gelu_new": dict(activation="gelu_new"),
    "relu": dict(activation="relu"),
    "silu": dict(activation="silu"),
    "chunked_ffn": dict(chunk_size_feed_forward=2, seq=8),  # HF needs seq % chunk == 0
    "seq_1": dict(seq=1),  # (seq 7, odd, is the default everywhere)
    "seq_max": dict(seq=SMALL_CONFIG["max_position_embeddings"]),
    "dim36_heads3": dict(dim=36, n_heads=3, hidden_dim=41),
    "dim35_heads5": dict(dim=35, n_heads=5, hidden_dim=19, n_layers=3),
    "pad_token_none": dict(pad_token_id=None),
    "untied": dict(tie_word_embeddings=False),
}


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM",
                                        "DistilBertForSequenceClassification"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_variant(variant, class_name):
    overrides = dict(VARIANTS[variant])
    seq = overrides.pop("seq", 7)
    # Larger weights than the default 0.02: pre-activations of order 1, where gelu, gelu_new and
    # silu differ measurably, and attention far from uniform.
    hf, ours = make_pair(class_name, initializer_range=0.3, **overrides)
    for key, value in overrides.items():
        assert getattr(ours.config, key) == getattr(hf.config, key) == value
    inputs = make_inputs(class_name, ours.config, padding="full", seq=seq)
    run_parity(hf, ours, inputs, head_mask=make_head_mask("2d", ours.config), output_attentions=True,
               output_hidden_states=True)
    table = ours.get_position_embeddings().weight
    assert table.requires_grad == (not ours.config.sinusoidal_pos_embds)
    if class_name == "DistilBertForMaskedLM":
        tied = ours.vocab_projector.weight is ours.get_input_embeddings().weight
        assert tied == ours.config.tie_word_embeddings
        assert tied == (hf.vocab_projector.weight is hf.get_input_embeddings().weight)


def test_sinusoidal_table_matches_hf_and_is_frozen():
    """Ours builds the same sinusoidal table as HF and keeps it frozen (as transformers 4 and the
    original DistilBERT did; transformers 5 leaves it trainable). Fresh models, no weight copy."""
    kwargs = dict(SMALL_CONFIG, sinusoidal_pos_embds=True)
    hf = transformers_model("DistilBertModel", **kwargs)
    ours = our_model("DistilBertModel", **kwargs)
    hf_table = hf.embeddings.position_embeddings.weight
    our_table = ours.embeddings.position_embeddings.weight
    assert_close(our_table, hf_table, atol=0.0, name="sinusoidal table")
    assert our_table[0, 1] == 1.0 and our_table[0, 0] == 0.0  # cos(0), sin(0)
    assert not our_table.requires_grad
    # still frozen after loading HF's weights (HF 5 and its state dict treat it as a parameter)
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert not ours.embeddings.position_embeddings.weight.requires_grad


# -- weight initialisation -------------------------------------------------------------------------

INIT_CONFIG = dict(SMALL_CONFIG, dim=64, hidden_dim=96, initializer_range=0.05, num_labels=5)


def _init_stats(model):
    """name -> (owning module's class name, parameter's own name, owning module, parameter), once
    per parameter (a tied weight is listed under its first owner)."""
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            owners.setdefault(id(param), (full, type(module).__name__, p_name, module))
    return {full: (kind, p_name, module, model.get_parameter(full)) for full, kind, p_name, module
            in owners.values()}


def _check_init(model, std, name_of_model):
    stats = _init_stats(model)
    normal = []
    for name, (kind, p_name, module, param) in stats.items():
        where = f"{name_of_model} {name}"
        if kind == "LayerNorm":
            expected = torch.ones_like(param) if p_name == "weight" else torch.zeros_like(param)
            assert torch.equal(param, expected), where
        elif p_name == "bias":
            assert kind == "Linear", where
            assert not param.any(), f"{where}: bias not zero"
        elif kind in ("Linear", "Embedding"):
            values = param.detach()
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                assert not values[module.padding_idx].any(), f"{where}: padding row not zero"
                values = torch.cat([values[: module.padding_idx], values[module.padding_idx + 1 :]])
            n = values.numel()
            # std of a sample std is about std / sqrt(2n); allow 6 of those (and at least 10%)
            tol = max(0.1, 6.0 / (2 * n) ** 0.5)
            assert abs(values.std().item() / std - 1.0) < tol, f"{where}: std {values.std().item():.4f}"
            assert abs(values.mean().item()) < 6.0 * std / n**0.5, f"{where}: mean {values.mean().item():.4f}"
            normal.append(values.flatten())
        else:
            raise AssertionError(f"{where}: unexpected parameter of a {kind}")
    return torch.cat(normal)


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_fresh_init_statistics_match_hf(class_name):
    kwargs = dict(INIT_CONFIG)
    if class_name == "DistilBertForQuestionAnswering":
        kwargs["num_labels"] = 2  # start and end logits
    hf = transformers_model(class_name, **kwargs)
    ours = our_model(class_name, **kwargs)
    hf_shapes = {n: tuple(p.shape) for n, p in hf.named_parameters()}
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == hf_shapes
    std = INIT_CONFIG["initializer_range"]
    hf_all = _check_init(hf, std, "HF")  # the oracle follows the convention we test against
    our_all = _check_init(ours, std, "ours")
    assert our_all.numel() == hf_all.numel()
    assert abs(our_all.std().item() / hf_all.std().item() - 1.0) < 0.02
    assert abs(our_all.mean().item() - hf_all.mean().item()) < 6.0 * std / our_all.numel() ** 0.5
    # fresh weights are random draws, not HF's (the test above is statistical, not elementwise)
    assert not torch.equal(ours.get_input_embeddings().weight, hf.get_input_embeddings().weight)


@pytest.mark.parametrize("pad_token_id", [0, 5, None])
def test_fresh_init_padding_row(pad_token_id):
    ours = our_model("DistilBertModel", **SMALL_CONFIG, pad_token_id=pad_token_id)
    hf = transformers_model("DistilBertModel", **SMALL_CONFIG, pad_token_id=pad_token_id)
    for model in (ours, hf):
        emb = model.get_input_embeddings()
        assert emb.padding_idx == pad_token_id
        zero_rows = (~emb.weight.detach().any(dim=1)).nonzero().flatten().tolist()
        assert zero_rows == ([] if pad_token_id is None else [pad_token_id])


# -- embeddings: tying, get/set, resize ------------------------------------------------------------


@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_input_output_embeddings(class_name):
    hf, ours = make_pair(class_name)
    assert ours.get_input_embeddings() is ours.base_model.embeddings.word_embeddings
    if class_name == "DistilBertForMaskedLM":
        assert ours.get_output_embeddings() is ours.vocab_projector
        assert ours.vocab_projector.weight is ours.get_input_embeddings().weight
        assert hf.vocab_projector.weight is hf.get_input_embeddings().weight
    else:
        assert ours.get_output_embeddings() is None
        assert hf.get_output_embeddings() is None

    new_weight = torch.randn(SMALL_CONFIG["vocab_size"], SMALL_CONFIG["dim"]) * 0.1
    for model in (hf, ours):
        emb = nn.Embedding(SMALL_CONFIG["vocab_size"], SMALL_CONFIG["dim"], padding_idx=0)
        with torch.no_grad():
            emb.weight.copy_(new_weight)
        model.set_input_embeddings(emb)
        assert model.get_input_embeddings() is emb
        model.tie_weights()
        if class_name == "DistilBertForMaskedLM":
            assert model.vocab_projector.weight is emb.weight
    inputs = make_inputs(class_name, ours.config, padding="partial")
    run_parity(hf, ours, inputs)


RESIZE_CASES = {
    "grow": dict(new_num_tokens=140),
    "grow_no_mean": dict(new_num_tokens=140, mean_resizing=False),
    "shrink": dict(new_num_tokens=80),
    "shrink_no_mean": dict(new_num_tokens=80, mean_resizing=False),
    "pad_to_multiple": dict(new_num_tokens=100, pad_to_multiple_of=16, mean_resizing=False),
    "pad_only": dict(pad_to_multiple_of=64),
    "shrink_pad": dict(new_num_tokens=50, pad_to_multiple_of=8),
}
RESIZE_MODELS = {
    "base": ("DistilBertModel", {}),
    "mlm": ("DistilBertForMaskedLM", {}),
    "mlm_untied": ("DistilBertForMaskedLM", dict(tie_word_embeddings=False)),
    "seqcls": ("DistilBertForSequenceClassification", {}),
}


def _expected_size(old, new_num_tokens=None, pad_to_multiple_of=None, **_):
    n = old if new_num_tokens is None else new_num_tokens
    if pad_to_multiple_of:
        n = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    return n


@pytest.mark.parametrize("model_kind", list(RESIZE_MODELS))
@pytest.mark.parametrize("case", list(RESIZE_CASES))
def test_resize_token_embeddings(case, model_kind):
    class_name, overrides = RESIZE_MODELS[model_kind]
    kwargs = RESIZE_CASES[case]
    hf, ours = make_pair(class_name, **overrides)
    mlm = class_name == "DistilBertForMaskedLM"
    tied = ours.config.tie_word_embeddings
    if mlm:  # a trained-looking bias, so that how new bias entries are filled is visible
        bias = torch.randn(SMALL_CONFIG["vocab_size"])
        with torch.no_grad():
            hf.vocab_projector.bias.copy_(bias)
            ours.vocab_projector.bias.copy_(bias)
    old = {k: v.clone() for k, v in hf.state_dict().items()}
    old_n = SMALL_CONFIG["vocab_size"]
    n = _expected_size(old_n, **kwargs)
    keep = min(n, old_n)
    added = n - keep
    std = ours.config.initializer_range
    emb_key = ("" if class_name == "DistilBertModel" else "distilbert.") + "embeddings.word_embeddings.weight"

    hf_ret = hf.resize_token_embeddings(**kwargs)
    our_ret = ours.resize_token_embeddings(**kwargs)
    assert our_ret is ours.get_input_embeddings() and hf_ret is hf.get_input_embeddings()

    for who, model in (("HF", hf), ("ours", ours)):
        emb = model.get_input_embeddings()
        assert emb.weight.shape == (n, SMALL_CONFIG["dim"]), who
        assert emb.num_embeddings == n and model.config.vocab_size == n, who
        assert emb.padding_idx == 0, who
        assert torch.equal(emb.weight[:keep], old[emb_key][:keep]), f"{who}: kept rows changed"
        if added:
            new_rows = emb.weight[keep:].detach()
            if kwargs.get("mean_resizing", True):
                assert_close(new_rows, old[emb_key].mean(0).expand_as(new_rows), atol=1e-3,
                             name=f"{who} mean-resized rows")
            else:
                assert abs(new_rows.std().item() / std - 1) < 0.15, f"{who}: new rows std {new_rows.std()}"
        if mlm:
            proj = model.get_output_embeddings()
            assert proj.out_features == n and proj.weight.shape == (n, SMALL_CONFIG["dim"])
            assert proj.bias.shape == (n,)
            assert torch.equal(proj.bias[:keep], old["vocab_projector.bias"][:keep]), who
            assert (proj.weight is emb.weight) == tied, who
            if not tied:
                assert torch.equal(proj.weight[:keep], old["vocab_projector.weight"][:keep]), who
    assert ours.config.vocab_size == hf.config.vocab_size
    if mlm and added:
        # New bias entries: HF zero-pads the bias when the weights are tied (tie_weights ->
        # _adjust_bias; the lm head itself is not resized), and fills them around the old bias
        # mean when untied and mean_resizing.
        assert_close(ours.vocab_projector.bias[keep:], hf.vocab_projector.bias[keep:], atol=1e-6,
                     name="new bias entries")

    # the resized model runs, on ids that only exist after the resize
    inputs = make_inputs(class_name, ours.config, padding="partial")
    inputs["input_ids"][0, -1] = n - 1
    with torch.no_grad():
        out = ours(**inputs)
    if mlm:
        assert out.logits.shape == (3, 7, n)
    # and with HF's new rows copied in, it matches HF (state dicts still line up, tying survives)
    ours.load_state_dict(hf.state_dict(), strict=True)
    if mlm:
        assert (ours.vocab_projector.weight is ours.get_input_embeddings().weight) == tied
    run_parity(hf, ours, inputs)


def test_resize_without_arguments_is_a_no_op():
    hf, ours = make_pair("DistilBertForMaskedLM")
    before = ours.get_input_embeddings().weight
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()
    assert ours.get_input_embeddings().weight is before
    assert ours.config.vocab_size == hf.config.vocab_size == SMALL_CONFIG["vocab_size"]


# -- state dicts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("sinusoidal", [False, True])
@pytest.mark.parametrize("class_name", CLASS_NAMES)
def test_state_dict_round_trip(class_name, sinusoidal):
    kwargs = dict(SMALL_CONFIG, sinusoidal_pos_embds=sinusoidal)
    hf = transformers_model(class_name, **kwargs)
    ours = our_model(class_name, **kwargs)
    hf_sd, our_sd = hf.state_dict(), ours.state_dict()
    assert set(our_sd) == set(hf_sd)
    assert {k: (v.shape, v.dtype) for k, v in our_sd.items()} == {
        k: (v.shape, v.dtype) for k, v in hf_sd.items()
    }
    assert not [k for k in our_sd if "position_ids" in k]
    assert not [k for k in hf_sd if "position_ids" in k]

    # ours -> HF (strict), then HF holds exactly our weights
    hf.load_state_dict(our_sd, strict=True)
    for key, value in hf.state_dict().items():
        assert torch.equal(value, our_sd[key]), key
    # HF -> ours (strict), on a fresh model of ours, then the two agree
    hf2 = transformers_model(class_name, **kwargs)
    ours.load_state_dict(hf2.state_dict(), strict=True)
    if class_name == "DistilBertForMaskedLM":
        assert ours.vocab_projector.weight is ours.get_input_embeddings().weight
    inputs = make_inputs(class_name, ours.config, padding="partial")
    with torch.no_grad():
        assert_outputs_close(ours(**inputs), hf2(**inputs), attention_mask=inputs["attention_mask"])


@pytest.mark.parametrize("class_name", ["DistilBertForSequenceClassification", "DistilBertForMaskedLM"])
def test_autocast_bfloat16_and_half_weights(class_name):
    """Drop-in under torch.autocast (float32 weights, bfloat16 compute) and with weights cast to
    bfloat16: the same dtypes and values as transformers (stock eager attention, no fully-masked
    row)."""
    hf, ours = make_pair(class_name, attn="eager")
    inputs = make_inputs(class_name, hf.config, padding="partial")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hf_out, our_out = hf(**inputs), ours(**inputs)
    assert our_out.logits.dtype == hf_out.logits.dtype == torch.bfloat16
    our_out, hf_out = (real_positions_only(o, inputs["attention_mask"]) for o in (our_out, hf_out))
    assert_close(our_out.logits.float(), hf_out.logits.float(), atol=1e-2, name="autocast logits")
    hf_out.loss.backward()
    our_out.loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, param in ours.named_parameters():  # bfloat16 rounding: compare at each tensor's scale
        expected = hf_params[name].grad
        scale = expected.abs().max().item()
        assert_close(param.grad, expected, atol=2e-2 * scale + 1e-5, name=f"autocast grad {name}")
    hf_half, ours_half = hf.to(torch.bfloat16), ours.to(torch.bfloat16)
    assert_close(*(real_positions_only(m(**inputs), inputs["attention_mask"]).logits.float() for m in (ours_half, hf_half)), atol=1e-2,
                 name="bfloat16 logits")


@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForTokenClassification"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(class_name):
    """Recomputing blocks in backward (dropout on: the RNG state is replayed) changes nothing."""
    kwargs = dict(SMALL_CONFIG, dropout=0.3, attention_dropout=0.2)
    plain = our_model(class_name, **kwargs).train()
    checkpointed = our_model(class_name, **kwargs).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.gradient_checkpointing_enable()
    assert checkpointed.base_model.transformer.gradient_checkpointing
    inputs = make_inputs(class_name, plain.config, padding="partial", labels=False)
    results, block_calls = [], []
    for model in (plain, checkpointed):
        calls = [0]
        for block in model.base_model.transformer.layer:  # count runs (recompute skips hooks)
            def counted(*args, _forward=block.forward):
                calls[0] += 1
                return _forward(*args)
            block.forward = counted
        torch.manual_seed(7)
        out = model(**inputs)[0]
        out.float().pow(2).mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        block_calls.append(calls[0])
    layers = SMALL_CONFIG["n_layers"]
    assert block_calls == [layers, 2 * layers]  # each block ran again during backward
    assert_close(results[1][0], results[0][0], atol=0.0, name="checkpointed output")
    for name, grad in results[0][1].items():
        assert_close(results[1][1][name], grad, atol=1e-6, name=f"checkpointed grad {name}")
    checkpointed.gradient_checkpointing_disable()
    assert not checkpointed.base_model.transformer.gradient_checkpointing


@pytest.mark.parametrize("new_size", [80, 40])
def test_resize_position_embeddings_learned(new_size):
    hf, ours = make_pair("DistilBertForSequenceClassification")
    old = ours.get_position_embeddings().weight.detach().clone()
    hf.resize_position_embeddings(new_size)
    ours.resize_position_embeddings(new_size)
    assert ours.config.max_position_embeddings == hf.config.max_position_embeddings == new_size
    table = ours.get_position_embeddings().weight
    assert table.shape == hf.get_position_embeddings().weight.shape == (new_size, old.shape[1])
    keep = min(new_size, old.shape[0])
    assert torch.equal(table[:keep], old[:keep])
    assert torch.equal(table[:keep], hf.get_position_embeddings().weight[:keep])
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (2, new_size))
    assert ours(ids).logits.shape == (2, 2)  # the longest sequence now fits
    with pytest.raises(ValueError, match=f"exceeds max_position_embeddings={new_size}"):
        ours(torch.randint(1, SMALL_CONFIG["vocab_size"], (1, new_size + 1)))


def test_resize_position_embeddings_sinusoidal_recomputes_the_table():
    ours = our_model("DistilBertModel", **SMALL_CONFIG, sinusoidal_pos_embds=True)
    ours.resize_position_embeddings(100)
    table = ours.get_position_embeddings().weight
    assert torch.equal(table, distilbert_fast.modeling.sinusoidal_embeddings(100, SMALL_CONFIG["dim"]))
    assert not table.requires_grad
