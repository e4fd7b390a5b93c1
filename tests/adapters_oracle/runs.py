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
