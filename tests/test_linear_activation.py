"""The ``linear_activation`` op, act(x @ W^T + b), the FFN's first matmul with its epilogue.

Against a plain-torch autograd reference (act(F.linear(x, W, b))) for every backend that runs on
CPU, by STYLE.md's error rule; on the eager backend (Backend's default implementation) bit for bit
against the composition the model used before, bias_activation(F.linear(x, W)); argument errors;
autocast. The triton backend's fused kernel has its own tests in test_triton_ops.py.
"""

import functools

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close
from distilbert_fast import ops
from test_ops import REF_ACTIVATIONS, check_against_reference, cpu_backends, skip_unless_runs


def ref_linear_activation(x, weight, bias, activation="gelu"):
    return REF_ACTIVATIONS[activation](F.linear(x, weight, bias))


def _args(tokens, k, n, with_bias=True, activation="gelu"):
    return dict(
        x=torch.randn(tokens, k),
        weight=torch.randn(n, k) * k**-0.5,  # keeps pre-activations O(1), where activations bend
        bias=0.5 * torch.randn(n) if with_bias else None,
        activation=activation,
    )


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(1, 32, 37), (7, 40, 100), (65, 64, 48)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    skip_unless_runs(backend, dtype)
    args = _args(*shape)
    op = functools.partial(ops.linear_activation, backend=backend)
    check_against_reference(op, ref_linear_activation, args, ["x", "weight", "bias"], dtype, ["y"])


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("activation", ["gelu_new", "relu", "silu", "swish"])
def test_activations_and_no_bias(backend, activation):
    args = _args(9, 16, 24, with_bias=activation != "relu", activation=activation)
    names = ["x", "weight"] + (["bias"] if args["bias"] is not None else [])
    op = functools.partial(ops.linear_activation, backend=backend)
    check_against_reference(op, ref_linear_activation, args, names, torch.float32, ["y"])


@pytest.mark.parametrize("backend", cpu_backends())
def test_three_dim_input_and_partial_grads(backend):
    """(batch, seq, features) input as in the model; only the weight needs a gradient (frozen x),
    then only x (frozen layer)."""
    args = _args(1, 16, 20)
    args["x"] = torch.randn(2, 5, 16)
    op = functools.partial(ops.linear_activation, backend=backend)
    check_against_reference(op, ref_linear_activation, args, ["weight"], torch.float32, ["y"])
    check_against_reference(op, ref_linear_activation, args, ["x"], torch.float32, ["y"])


def test_eager_is_bit_identical_to_the_composition():
    """The eager backend runs the default implementation: F.linear without the bias, then
    bias_activation. Outputs and every gradient equal that composition exactly."""
    x = torch.randn(3, 11, 32, requires_grad=True)
    lin = torch.nn.Linear(32, 37)
    go = torch.randn(3, 11, 37)
    y = ops.linear_activation(x, lin.weight, lin.bias, "gelu", backend="eager")
    grads = torch.autograd.grad(y, (x, lin.weight, lin.bias), go)
    y_ref = ops.bias_activation(F.linear(x, lin.weight), lin.bias, "gelu", backend="eager")
    grads_ref = torch.autograd.grad(y_ref, (x, lin.weight, lin.bias), go)
    assert torch.equal(y, y_ref)
    assert torch.equal(y, F.gelu(lin(x)))  # and HF's FFN, as the eager path always was
    for name, a, b in zip(["x", "weight", "bias"], grads, grads_ref):
        assert torch.equal(a, b), f"grad {name} differs from the composition's"
    assert ops.last_backend("linear_activation") == "eager"


def test_autocast_casts_like_linear():
    """Under autocast x and the weight are cast as F.linear casts them (bfloat16 on CPU): the
    result is bfloat16 and equals the composition under the same autocast; the float32 weight and
    bias get float32 gradients."""
    x = torch.randn(4, 16)
    lin = torch.nn.Linear(16, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.linear_activation(x, lin.weight, lin.bias, "gelu", backend="eager")
        expected = ops.bias_activation(F.linear(x, lin.weight), lin.bias, "gelu", backend="eager")
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert lin.weight.grad.dtype == torch.float32 and lin.bias.grad.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all()


@pytest.mark.parametrize(
    "override,exc,match",
    [
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(x=torch.tensor(1.0)), ValueError, "x must have at least 1 dim"),
        (dict(x=torch.ones(2, 8, dtype=torch.long)), TypeError, "x must be a floating-point"),
        (dict(weight=torch.randn(6)), ValueError, "weight must have 2 dims"),
        (dict(weight=torch.randn(6, 7)), ValueError, r"weight must have shape \(out_features, 8\)"),
        (dict(weight=torch.randn(6, 8, dtype=torch.float64)), TypeError, "weight must have dtype torch.float32"),
        (dict(weight=torch.randn(6, 8, device="meta")), ValueError, "weight must be on cpu"),
        (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
        (dict(bias=torch.randn(6, device="meta")), ValueError, "bias must be on cpu"),
        (dict(activation="tanh"), ValueError, "activation must be one of"),
    ],
    ids=["x_list", "x_0d", "x_int", "weight_1d", "weight_in_features", "weight_dtype", "weight_device",
         "bias_shape", "bias_device", "activation"],
)
def test_argument_errors(override, exc, match):
    kwargs = dict(x=torch.randn(2, 8), weight=torch.randn(6, 8), bias=torch.randn(6), activation="gelu")
    kwargs.update(override)
    with pytest.raises(exc, match=match):
        ops.linear_activation(**kwargs)


def test_second_order_gradients_are_refused():
    x = torch.randn(3, 4, requires_grad=True)
    y = ops.linear_activation(x, torch.randn(5, 4), None, "gelu")
    with pytest.raises(RuntimeError, match="linear_activation: second-order gradients"):
        torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_swish_is_silu():
    args = _args(3, 8, 6)
    silu = ops.linear_activation(args["x"], args["weight"], args["bias"], "silu")
    swish = ops.linear_activation(args["x"], args["weight"], args["bias"], "swish")
    assert torch.equal(silu, swish)
    assert_close(silu, F.silu(F.linear(args["x"], args["weight"], args["bias"])), atol=1e-6, name="silu")
