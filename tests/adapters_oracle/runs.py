"""What both sides of the adapters oracle do around one forward (compare.py in the package's venv,
tests/test_adapters_oracle.py in ours): torch only, so either interpreter imports it."""

import torch


def prepare(model):
    """Eval mode, every parameter trainable, no gradients yet."""
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    model.zero_grad()


def outputs_and_grads(model, out) -> dict:
    """The forward's tensors (each head's under "head<i>.<key>"), then the backward of its loss if
    it has one and the parameters' gradients under "grads"."""
    result = {}
    for key, value in out.items():
        if key == "head_outputs":
            for i, head_out in enumerate(value):
                result.update({f"head{i}.{k}": v.detach() for k, v in head_out.items() if torch.is_tensor(v)})
        elif torch.is_tensor(value):
            result[key] = value.detach()
    if out.get("loss") is not None:
        out["loss"].backward()
        result["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return result


def fusion_attentions(attentions) -> dict:
    """forward(output_adapter_fusion_attentions=True)'s {fusion: {layer: {location: array}}} as
    {"attn <fusion> <layer> <location>": tensor}."""
    return {f"attn {fusion} {layer} {place}": torch.as_tensor(probs)
            for fusion, layers in attentions.items() for layer, places in layers.items()
            for place, probs in places.items()}


# AdapterSetup's head selection on a heads model with adapters "a", "b", "c", heads "a"
# (classification, 2 labels), "b" (classification, 3) and "t" (tagging, active: added last), no
# active adapters. Each scenario: AdapterSetup blocks, outer to inner, as (adapter_setup (a name
# or a list = Stack, or None), head_setup, ignore_empty), and the forward's head=.
HEAD_SELECTION = {
    "setup picks its head": dict(blocks=[("a", None, False)]),
    "stack picks its last adapter's head": dict(blocks=[(["a", "b"], None, False)]),
    "head_setup overrides": dict(blocks=[("a", "b", False)]),
    "head_setup without adapters": dict(blocks=[(None, "b", False)]),
    "head_setup list": dict(blocks=[("a", ["a", "b"], False)]),
    "head_setup list of two kinds": dict(blocks=[("a", ["a", "t"], False)]),
    "unknown head_setup": dict(blocks=[(["b", "a"], "zz", False)]),
    "setup without a head": dict(blocks=[("c", None, False)]),
    "inner block decides": dict(blocks=[("a", "b", False), ("a", None, False)]),
    "inner empty block: active head": dict(blocks=[("a", "b", False), (None, None, False)]),
    "inner empty block ignored": dict(blocks=[("a", "b", False), (None, None, True)]),
    "head= wins": dict(blocks=[("a", "b", False)], head="t"),
}


def run_head_selection(model, adapter_setup_class, inputs) -> dict:
    """{scenario: [logits of each head] or "ValueError"} for HEAD_SELECTION."""
    import contextlib

    result = {}
    model.eval()
    for name, scenario in HEAD_SELECTION.items():
        with contextlib.ExitStack() as blocks, torch.no_grad():
            for setup, head_setup, ignore_empty in scenario["blocks"]:
                blocks.enter_context(adapter_setup_class(setup, head_setup=head_setup, ignore_empty=ignore_empty))
            try:
                out = model(**inputs, head=scenario.get("head"))
            except ValueError:
                result[name] = "ValueError"
                continue
        heads = getattr(out, "head_outputs", None)
        result[name] = [o.logits for o in heads] if heads is not None else [out.logits]
    return result


# average_adapter calls: (new name, adapters averaged, keyword arguments), on bottleneck adapters
# "x", "y" (one config but for dropout) and LoRAs "lx", "ly"
AVERAGES = [
    ("avg_bn", ["x", "y"], dict(weights=[0.7, 0.3])),
    ("avg_bn_equal", ["x", "y"], {}),
    ("avg_bn_unnormalised", ["x", "y"], dict(weights=[2.0, -1.0], normalize_weights=False)),
    ("avg_lora", ["lx", "ly"], dict(weights=[0.6, 0.4])),
    ("avg_lora_negate_b", ["lx", "ly"], dict(weights=[1.0, -0.5], combine_strategy="lora_linear_only_negate_b",
                                              normalize_weights=False)),
    ("avg_lora_svd", ["lx", "ly"], dict(weights=[0.5, 0.5], combine_strategy="lora_delta_w_svd", svd_rank=3)),
]
