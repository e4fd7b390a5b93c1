"""The hot ops as torch custom ops (``torch.library``), the form tracers see.

Under a tracer (torch.compile's dynamo, torch.export, torch.onnx.export, torch.jit.trace) each hot
op on a fused backend is one ``distilbert_fast::<op>`` node: dynamo does not break the graph on the
pybind11 or Triton calls, export and AOT autograd see an op with a fake implementation (output
shapes and dtypes from the inputs alone) and an autograd formula. The backend is the op's last
argument, a str chosen outside the op (``backends.resolve_backend``, so ``last_backend()`` still
says what ran); it is fixed when the graph is traced.

Outside a tracer the ops run through their autograd Functions (``functional``), as before: those
keep each backend's own saved intermediates (softmax statistics, LayerNorm mean and rstd, dropout
masks or seeds), which differ per backend, while a custom op's ``setup_context`` only sees the op's
inputs and outputs. So the custom op's backward (``<op>_backward``, itself an opaque op) saves the
inputs by name and recomputes: it re-runs the same Function on them, with the forward's RNG state
restored so that dropout draws the same masks, and differentiates it. Compiled training pays one
extra forward of each fused op (as activation checkpointing does); compiled inference pays nothing.
``linear`` needs no recompute: its gradients are two matmuls of its inputs, traced as such.

A ``traceable`` backend is not wrapped: a tracer inlines the forward of its ``traced()`` form.
The eager backend's is plain torch, so Inductor fuses it, export and ONNX see standard ATen ops,
and torch's autograd differentiates it. The triton backend's launches its kernels through one
``torch.library.triton_op`` each, differentiated by the backend's own backward
(``triton_ops``), so Inductor sees the Triton kernels themselves; where torch lacks triton_op
it is wrapped like the others.

Adding an op: a custom op ``<op>(tensors..., scalars..., str backend) -> (outputs..., Tensor[] rng)``
whose impl calls the backend's forward, a fake giving the outputs' shapes, and ``_register_recompute``
with the op's Function; then ``functional.<op>`` calls this module's wrapper when ``tracing()``.
"""

import collections
import contextlib
from typing import NamedTuple

import torch

from ..tracing import tracing  # noqa: F401  (functional and the tests ask custom.tracing())
from . import backends, functional
from .backends import save_named, saved_named

Tensor = torch.Tensor
_CPU_RNG_BYTES = torch.get_rng_state().numel()


# -- the RNG state of a forward with dropout -----------------------------------------------------
def _rng_state(device: torch.device, dropout_p: float) -> list[Tensor]:
    """The generator states a forward with dropout draws from: the CPU generator (the cpu
    backend's masks, the cuda backend's seeds) and the tensor's CUDA generator. Empty without
    dropout."""
    if dropout_p == 0.0:
        return []
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _fake_rng_state(device: torch.device, dropout_p: float) -> list[Tensor]:
    if dropout_p == 0.0:
        return []
    states = [torch.empty(_CPU_RNG_BYTES, dtype=torch.uint8)]
    if device.type == "cuda":
        states.append(torch.empty(torch.cuda.get_rng_state(device).numel(), dtype=torch.uint8))
    return states


@contextlib.contextmanager
def _restored_rng(states: list[Tensor], device: torch.device):
    """Runs the block with the generators as the forward found them, then puts them back."""
    if not states:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(states[0])
        if device.type == "cuda":
            torch.cuda.set_rng_state(states[1], device)
        yield


def _empty_like(t: Tensor) -> Tensor:
    """A contiguous tensor of t's shape and dtype: what the impls return (a custom op's fake must
    give the real strides; Inductor asserts them)."""
    return t.new_empty(t.shape)


def _recompute_grads(run, inputs: dict, needs: list[bool], grad_outputs, rng, device) -> list[Tensor]:
    """The gradients of ``run(**inputs)`` for the inputs flagged in ``needs`` (in order),
    recomputing the forward with the RNG state ``rng``; contiguous, a zero where none flows."""
    leaves = {
        name: None if t is None else t.detach().requires_grad_(need)
        for (name, t), need in zip(inputs.items(), needs)
    }
    with _restored_rng(rng, device), torch.enable_grad():
        outputs = run(**leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs)
             if o is not None and g is not None and o.requires_grad]
    wanted = [leaves[name] for name, need in zip(inputs, needs) if need]
    grads = torch.autograd.grad(
        [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
    )
    return _unaliased([torch.zeros_like(w) if g is None else g.contiguous() for g, w in zip(grads, wanted)],
                      inputs.values())


def _unaliased(outputs: list[Tensor], inputs) -> list[Tensor]:
    """``outputs`` with a copy in place of any that shares memory with an earlier one or an input
    (a custom op's outputs may not alias; a backward may hand the same dz to x and residual)."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for t in outputs:
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(t)
    return result


def _fake_grads(inputs: list, needs: list[bool]) -> list[Tensor]:
    return [_empty_like(t) for t, need in zip(inputs, needs) if need]


def _backend(name: str) -> backends.Backend:
    return backends._registry[name]


def recomputed_op(name: str, args: str, returns: str, apply, forward, fake, grad_args: tuple):
    """Registers ``distilbert_fast::<name>`` and its backward op ``<name>_backward``; returns the
    forward op, whose outputs are ``returns`` plus the RNG state (a Tensor[], empty without dropout).

    args: the op's schema arguments, ending in ``str backend``; a ``float dropout_p`` among them
    makes the forward save the RNG state. forward(backend, *args) -> the outputs, run by the op
    under no_grad; fake(*args) -> the same outputs' fakes (shapes and dtypes from the inputs).
    apply(*args, backend): the op's eager-mode path (its autograd Function's apply); the backward
    op re-runs it on the saved inputs and differentiates it. grad_args: the arguments that get
    gradients, by name.
    """
    arg_names = [a.split()[-1] for a in args.split(", ")]
    tensor_names = [n for a, n in zip(args.split(", "), arg_names) if a.startswith("Tensor")]
    # the op's tensor inputs, saved for the backward by name (as the Functions save theirs)
    saved_inputs = collections.namedtuple(f"{name}_inputs", tensor_names)
    grad_index = [arg_names.index(n) for n in grad_args]
    dropout_index = arg_names.index("dropout_p") if "dropout_p" in arg_names else None

    def rng_args(op_args):
        device = op_args[arg_names.index(tensor_names[0])].device
        return device, (op_args[dropout_index] if dropout_index is not None else 0.0)

    def impl(*op_args):
        backends._last[name] = op_args[-1]  # last_backend(), at each call of a compiled graph
        rng = _rng_state(*rng_args(op_args))
        with torch.no_grad():
            outputs = forward(_backend(op_args[-1]), *op_args[:-1])
        return (*(o.contiguous() for o in outputs), rng)

    def fake_impl(*op_args):
        return (*(_empty_like(o) for o in fake(*op_args[:-1])), _fake_rng_state(*rng_args(op_args)))

    op = torch.library.custom_op(f"distilbert_fast::{name}", impl, mutates_args=(),
                                 schema=f"({args}) -> ({returns}, Tensor[])")
    op.register_fake(fake_impl)

    def backward_impl(grad_outputs, *rest):
        *op_args, rng, needs = rest
        backend = _backend(op_args[-1])

        def run(**leaves):
            call = list(op_args[:-1])
            for i, n in zip(grad_index, grad_args):
                call[i] = leaves[n]
            return apply(*call, backend)

        inputs = {n: op_args[i] for i, n in zip(grad_index, grad_args)}
        return _recompute_grads(run, inputs, needs, grad_outputs, rng, rng_args(op_args)[0])

    def backward_fake(grad_outputs, *rest):
        *op_args, rng, needs = rest
        return _fake_grads([op_args[i] for i in grad_index], needs)

    backward_op = torch.library.custom_op(
        f"distilbert_fast::{name}_backward", backward_impl, mutates_args=(),
        schema=f"(Tensor?[] grad_outputs, {args}, Tensor[] rng, bool[] needs) -> Tensor[]")
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        save_named(ctx, saved_inputs._make(inputs[arg_names.index(n)] for n in tensor_names))
        ctx.other_args = {n: v for n, v in zip(arg_names, inputs) if n not in tensor_names}
        ctx.rng = output[-1]

    def grad(ctx, *grads):
        values = {**saved_named(ctx)._asdict(), **ctx.other_args}
        op_args = [values[n] for n in arg_names]
        needs = [bool(ctx.needs_input_grad[i]) and op_args[i] is not None for i in grad_index]
        grads = backward_op(list(grads[:-1]), *op_args, list(ctx.rng), needs)
        result = [None] * len(arg_names)
        it = iter(grads)
        for i, need in zip(grad_index, needs):
            if need:
                result[i] = next(it)
        return tuple(result)

    op.register_autograd(grad, setup_context=setup_context)
    return op


# -- the hot ops ---------------------------------------------------------------------------------
def _attention_forward(impl, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
    impl = backends.attention_runner(impl, need_weights)
    (out, weights), _, _ = impl.attention_forward(
        q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
    return out, (weights if need_weights else q.new_empty(0))


def _attention_fake(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
    batch, heads, seq, _ = q.shape
    return q, q.new_empty((batch, heads, seq, seq) if need_weights else (0,))


_masked_attention = recomputed_op(
    "masked_attention",
    "Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? head_mask, float dropout_p, "
    "float scale, bool need_weights, str backend",
    "Tensor, Tensor",
    lambda *a: functional.MaskedAttentionFunction.apply(*a),
    _attention_forward,
    _attention_fake,
    grad_args=("q", "k", "v", "head_mask"),
)

_bias_activation = recomputed_op(
    "bias_activation", "Tensor x, Tensor? bias, str activation, str backend", "Tensor",
    lambda *a: functional.BiasActivationFunction.apply(*a),
    lambda impl, x, bias, activation: impl.bias_activation_forward(x, bias, activation)[:1],
    lambda x, bias, activation: (x,),
    grad_args=("x", "bias"),
)


def _layernorm_fake(x, residual, weight, bias, eps, x_bias, dropout_p):
    # the output dtype is the eager backend's (promotion with the residual; float32 under CUDA
    # autocast): every backend matches it
    eager = backends.eager()
    return eager.residual_layernorm_forward(x, residual, weight, bias, eps, x_bias, 0.0)[:1]


_residual_layernorm = recomputed_op(
    "residual_layernorm",
    "Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps, Tensor? x_bias, "
    "float dropout_p, str backend",
    "Tensor", lambda *a: functional.ResidualLayerNormFunction.apply(*a),
    lambda impl, *args: impl.residual_layernorm_forward(*args)[:1],
    _layernorm_fake,
    grad_args=("x", "residual", "weight", "bias", "x_bias"),
)

_linear_activation = recomputed_op(
    "linear_activation", "Tensor x, Tensor weight, Tensor? bias, str activation, str backend", "Tensor",
    lambda *a: functional.LinearActivationFunction.apply(*a),
    # needs_grad=False: this forward saves nothing (the backward recomputes), so a backend may
    # take its inference path
    lambda impl, x, weight, bias, activation: impl.linear_activation_forward(
        x, weight, bias, activation, False)[:1],
    lambda x, weight, bias, activation: (x.new_empty((*x.shape[:-1], weight.shape[0])),),
    grad_args=("x", "weight", "bias"),
)

_varlen_attention = recomputed_op(
    "varlen_attention",
    # SymInt, not int: an int argument is specialised by torch.compile, so each new max_seqlen
    # of the packed entry point would compile the model again
    "Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, SymInt max_seqlen, Tensor? head_mask, "
    "float dropout_p, float scale, str backend",
    "Tensor",
    lambda *a: functional.VarlenAttentionFunction.apply(*a),
    lambda impl, *args: impl.varlen_attention_forward(*args)[:1],
    lambda q, *rest: (q,),  # out is shaped like q
    grad_args=("q", "k", "v", "head_mask"),
)


# The traced forms of functional's wrappers (arguments already checked there).
def masked_attention(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, impl):
    if impl.traceable:
        (out, weights), _, _ = impl.traced().attention_forward(
            q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
        return out, weights
    out, weights, _ = _masked_attention(
        q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, impl.name)
    return out, (weights if need_weights else None)


def bias_activation(x, bias, activation, impl):
    if impl.traceable:
        return impl.traced().bias_activation_forward(x, bias, activation)[0]
    return _bias_activation(x, bias, activation, impl.name)[0]


def residual_layernorm(x, residual, weight, bias, eps, x_bias, dropout_p, impl):
    if impl.traceable:
        return impl.traced().residual_layernorm_forward(x, residual, weight, bias, eps, x_bias, dropout_p)[0]
    return _residual_layernorm(x, residual, weight, bias, eps, x_bias, dropout_p, impl.name)[0]


def linear_activation(x, weight, bias, activation, impl):
    if impl.traceable:
        return impl.traced().linear_activation_forward(x, weight, bias, activation, torch.is_grad_enabled())[0]
    return _linear_activation(x, weight, bias, activation, impl.name)[0]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale, impl):
    if impl.traceable:
        return impl.traced().varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p,
                                                      scale)[0]
    return _varlen_attention(q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale, impl.name)[0]


# -- linear --------------------------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    backends._last["linear"] = backend
    with torch.no_grad():
        return _backend(backend).linear(x, weight, bias).contiguous()


@_linear.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _LinearSaved(NamedTuple):
    x: Tensor
    weight: Tensor


def _linear_setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    save_named(ctx, _LinearSaved(x, weight))
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad_out):
    saved = saved_named(ctx)
    need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    dx, dweight = backends.linear_grads(saved.x, saved.weight, grad_out, need_dx, need_dweight)
    dbias = None
    if ctx.has_bias and need_dbias:
        dbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return dx, dweight, dbias, None


_linear.register_autograd(_linear_grad, setup_context=_linear_setup)


def linear(x, weight, bias, impl):
    """A backend that keeps Backend.linear (F.linear) is traced as F.linear; one with its own
    GEMM is one opaque node. Under autocast F.linear itself, which casts as autocast wants."""
    own_gemm = type(impl).linear is not backends.Backend.linear
    if impl.traceable or not own_gemm or torch.is_autocast_enabled(x.device.type):
        return torch.nn.functional.linear(x, weight, bias)
    return _linear(x, weight, bias, impl.name)
