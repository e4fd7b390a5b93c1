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

The eager backend is not wrapped (``Backend.traceable``): its forward is plain torch, so a tracer
inlines it, Inductor fuses it, export and ONNX see standard ATen ops, and torch's autograd
differentiates it.

Adding an op: a custom op ``<op>(tensors..., scalars..., str backend) -> (outputs..., Tensor[] rng)``
whose impl calls the backend's forward, a fake giving the outputs' shapes, and ``_register_recompute``
with the op's Function; then ``functional.<op>`` calls this module's wrapper when ``tracing()``.
"""

import contextlib

import torch

from . import backends, functional

Tensor = torch.Tensor
_CPU_RNG_BYTES = torch.get_rng_state().numel()


def tracing() -> bool:
    """Whether a tracer (dynamo, export, jit.trace, fx) is recording this call: then the ops take
    their custom-op form, and the model skips its data-dependent input checks."""
    exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return (
        torch.compiler.is_compiling()
        or (exporting is not None and exporting())
        or torch.jit.is_tracing()
        or torch.fx._symbolic_trace.is_fx_symbolic_tracing()
    )


# -- saving by name, and the RNG state of a forward with dropout --------------------------------
def _save(ctx, **tensors):
    """ctx.save_for_backward by name: ``_saved(ctx).q`` in the backward."""
    ctx.saved_names = tuple(tensors)
    ctx.save_for_backward(*tensors.values())


def _saved(ctx):
    return dict(zip(ctx.saved_names, ctx.saved_tensors))


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


def _needs(ctx, indices) -> list[bool]:
    return [bool(ctx.needs_input_grad[i]) for i in indices]


def _scatter(grads: list[Tensor], needs: list[bool], indices, n_inputs: int) -> tuple:
    """The backward's per-input tuple: ``grads`` (one per True in ``needs``) at ``indices``."""
    out = [None] * n_inputs
    it = iter(grads)
    for i, need in zip(indices, needs):
        if need:
            out[i] = next(it)
    return tuple(out)


# -- masked attention ----------------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::masked_attention", mutates_args=())
def _masked_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, head_mask: Tensor | None,
    dropout_p: float, scale: float, need_weights: bool, backend: str,
) -> tuple[Tensor, Tensor, list[Tensor]]:
    rng = _rng_state(q.device, dropout_p)
    impl = backends.attention_runner(_backend(backend), need_weights)
    with torch.no_grad():
        (out, weights), _, _ = impl.attention_forward(
            q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
    weights = weights.contiguous() if need_weights else q.new_empty(0)
    return out.contiguous(), weights, rng


@_masked_attention.register_fake
def _(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, backend):
    batch, heads, seq, _ = q.shape
    weights = q.new_empty((batch, heads, seq, seq) if need_weights else (0,))
    return _empty_like(q), weights, _fake_rng_state(q.device, dropout_p)


_ATTENTION_GRAD_INPUTS = (0, 1, 2, 4)  # q, k, v, head_mask


def _masked_attention_setup(ctx, inputs, output):
    q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, backend = inputs
    _save(ctx, q=q, k=k, v=v, key_padding_mask=key_padding_mask, head_mask=head_mask)
    ctx.rng = output[2]
    ctx.args = (dropout_p, scale, need_weights, backend)


def _masked_attention_grad(ctx, grad_out, grad_weights, _grad_rng):
    saved = _saved(ctx)
    needs = _needs(ctx, _ATTENTION_GRAD_INPUTS)
    needs[3] = needs[3] and saved["head_mask"] is not None
    grads = _masked_attention_backward(
        grad_out, grad_weights if ctx.args[2] else None, saved["q"], saved["k"], saved["v"],
        saved["key_padding_mask"], saved["head_mask"], list(ctx.rng), *ctx.args, needs)
    return _scatter(grads, needs, _ATTENTION_GRAD_INPUTS, 9)


@torch.library.custom_op("distilbert_fast::masked_attention_backward", mutates_args=())
def _masked_attention_backward(
    grad_out: Tensor, grad_weights: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
    key_padding_mask: Tensor | None, head_mask: Tensor | None, rng: list[Tensor],
    dropout_p: float, scale: float, need_weights: bool, backend: str, needs: list[bool],
) -> list[Tensor]:
    impl = _backend(backend)

    def run(q, k, v, head_mask):
        return functional.MaskedAttentionFunction.apply(
            q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, impl)

    return _recompute_grads(run, dict(q=q, k=k, v=v, head_mask=head_mask), needs,
                            (grad_out, grad_weights), rng, q.device)


@_masked_attention_backward.register_fake
def _(grad_out, grad_weights, q, k, v, key_padding_mask, head_mask, rng, dropout_p, scale,
      need_weights, backend, needs):
    return _fake_grads([q, k, v, head_mask], needs)


_masked_attention.register_autograd(_masked_attention_grad, setup_context=_masked_attention_setup)


def masked_attention(q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, impl):
    """The traced form of ``functional.masked_attention`` (arguments already checked)."""
    if impl.traceable:
        (out, weights), _, _ = impl.attention_forward(
            q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights)
        return out, weights
    out, weights, _ = _masked_attention(
        q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights, impl.name)
    return out, (weights if need_weights else None)


# -- bias + activation ---------------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::bias_activation", mutates_args=())
def _bias_activation(x: Tensor, bias: Tensor | None, activation: str, backend: str) -> Tensor:
    with torch.no_grad():
        y, _, _ = _backend(backend).bias_activation_forward(x, bias, activation)
    return y.contiguous()


@_bias_activation.register_fake
def _(x, bias, activation, backend):
    return _empty_like(x)


def _bias_activation_setup(ctx, inputs, output):
    x, bias, activation, backend = inputs
    _save(ctx, x=x, bias=bias)
    ctx.args = (activation, backend)


def _bias_activation_grad(ctx, grad_out):
    saved = _saved(ctx)
    needs = _needs(ctx, (0, 1))
    needs[1] = needs[1] and saved["bias"] is not None
    grads = _bias_activation_backward(grad_out, saved["x"], saved["bias"], *ctx.args, needs)
    return _scatter(grads, needs, (0, 1), 4)


@torch.library.custom_op("distilbert_fast::bias_activation_backward", mutates_args=())
def _bias_activation_backward(
    grad_out: Tensor, x: Tensor, bias: Tensor | None, activation: str, backend: str, needs: list[bool],
) -> list[Tensor]:
    impl = _backend(backend)

    def run(x, bias):
        return functional.BiasActivationFunction.apply(x, bias, activation, impl)

    return _recompute_grads(run, dict(x=x, bias=bias), needs, (grad_out,), [], x.device)


@_bias_activation_backward.register_fake
def _(grad_out, x, bias, activation, backend, needs):
    return _fake_grads([x, bias], needs)


_bias_activation.register_autograd(_bias_activation_grad, setup_context=_bias_activation_setup)


def bias_activation(x, bias, activation, impl):
    if impl.traceable:
        return impl.bias_activation_forward(x, bias, activation)[0]
    return _bias_activation(x, bias, activation, impl.name)


# -- residual + LayerNorm ------------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::residual_layernorm", mutates_args=())
def _residual_layernorm(
    x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor, eps: float,
    x_bias: Tensor | None, dropout_p: float, backend: str,
) -> tuple[Tensor, list[Tensor]]:
    rng = _rng_state(x.device, dropout_p)
    with torch.no_grad():
        y, _, _ = _backend(backend).residual_layernorm_forward(
            x, residual, weight, bias, eps, x_bias, dropout_p)
    return y.contiguous(), rng


@_residual_layernorm.register_fake
def _(x, residual, weight, bias, eps, x_bias, dropout_p, backend):
    # the output's dtype is what the eager backend gives (promotion with the residual; float32
    # under CUDA autocast): every backend matches it
    eager = backends._registry["eager"]
    y, _, _ = eager.residual_layernorm_forward(x, residual, weight, bias, eps, x_bias, 0.0)
    return _empty_like(y), _fake_rng_state(x.device, dropout_p)


_LAYERNORM_GRAD_INPUTS = (0, 1, 2, 3, 5)  # x, residual, weight, bias, x_bias


def _residual_layernorm_setup(ctx, inputs, output):
    x, residual, weight, bias, eps, x_bias, dropout_p, backend = inputs
    _save(ctx, x=x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    ctx.rng = output[1]
    ctx.args = (eps, dropout_p, backend)


def _residual_layernorm_grad(ctx, grad_out, _grad_rng):
    saved = _saved(ctx)
    needs = [need and saved[name] is not None for need, name in
             zip(_needs(ctx, _LAYERNORM_GRAD_INPUTS), ("x", "residual", "weight", "bias", "x_bias"))]
    grads = _residual_layernorm_backward(grad_out, *saved.values(), list(ctx.rng), *ctx.args, needs)
    return _scatter(grads, needs, _LAYERNORM_GRAD_INPUTS, 8)


@torch.library.custom_op("distilbert_fast::residual_layernorm_backward", mutates_args=())
def _residual_layernorm_backward(
    grad_out: Tensor, x: Tensor, residual: Tensor | None, weight: Tensor, bias: Tensor,
    x_bias: Tensor | None, rng: list[Tensor], eps: float, dropout_p: float, backend: str,
    needs: list[bool],
) -> list[Tensor]:
    impl = _backend(backend)

    def run(x, residual, weight, bias, x_bias):
        return functional.ResidualLayerNormFunction.apply(
            x, residual, weight, bias, eps, x_bias, dropout_p, impl)

    inputs = dict(x=x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    return _recompute_grads(run, inputs, needs, (grad_out,), rng, x.device)


@_residual_layernorm_backward.register_fake
def _(grad_out, x, residual, weight, bias, x_bias, rng, eps, dropout_p, backend, needs):
    return _fake_grads([x, residual, weight, bias, x_bias], needs)


_residual_layernorm.register_autograd(_residual_layernorm_grad, setup_context=_residual_layernorm_setup)


def residual_layernorm(x, residual, weight, bias, eps, x_bias, dropout_p, impl):
    if impl.traceable:
        return impl.residual_layernorm_forward(x, residual, weight, bias, eps, x_bias, dropout_p)[0]
    return _residual_layernorm(x, residual, weight, bias, eps, x_bias, dropout_p, impl.name)[0]


# -- linear + bias + activation ------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::linear_activation", mutates_args=())
def _linear_activation(
    x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, backend: str,
) -> Tensor:
    # needs_grad=False: this forward saves nothing (the backward recomputes), so a backend may
    # take its inference path
    with torch.no_grad():
        y, _, _ = _backend(backend).linear_activation_forward(x, weight, bias, activation, False)
    return y.contiguous()


@_linear_activation.register_fake
def _(x, weight, bias, activation, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_activation_setup(ctx, inputs, output):
    x, weight, bias, activation, backend = inputs
    _save(ctx, x=x, weight=weight, bias=bias)
    ctx.args = (activation, backend)


def _linear_activation_grad(ctx, grad_out):
    saved = _saved(ctx)
    needs = _needs(ctx, (0, 1, 2))
    needs[2] = needs[2] and saved["bias"] is not None
    grads = _linear_activation_backward(grad_out, *saved.values(), *ctx.args, needs)
    return _scatter(grads, needs, (0, 1, 2), 5)


@torch.library.custom_op("distilbert_fast::linear_activation_backward", mutates_args=())
def _linear_activation_backward(
    grad_out: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, activation: str, backend: str,
    needs: list[bool],
) -> list[Tensor]:
    impl = _backend(backend)

    def run(x, weight, bias):
        return functional.LinearActivationFunction.apply(x, weight, bias, activation, impl)

    return _recompute_grads(run, dict(x=x, weight=weight, bias=bias), needs, (grad_out,), [], x.device)


@_linear_activation_backward.register_fake
def _(grad_out, x, weight, bias, activation, backend, needs):
    return _fake_grads([x, weight, bias], needs)


_linear_activation.register_autograd(_linear_activation_grad, setup_context=_linear_activation_setup)


def linear_activation(x, weight, bias, activation, impl):
    if impl.traceable:
        return impl.linear_activation_forward(x, weight, bias, activation, torch.is_grad_enabled())[0]
    return _linear_activation(x, weight, bias, activation, impl.name)


# -- linear --------------------------------------------------------------------------------------
@torch.library.custom_op("distilbert_fast::linear", mutates_args=())
def _linear(x: Tensor, weight: Tensor, bias: Tensor | None, backend: str) -> Tensor:
    with torch.no_grad():
        return _backend(backend).linear(x, weight, bias).contiguous()


@_linear.register_fake
def _(x, weight, bias, backend):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, backend = inputs
    _save(ctx, x=x, weight=weight)
    ctx.has_bias = bias is not None


def _linear_grad(ctx, grad_out):
    saved = _saved(ctx)
    need_dx, need_dweight, need_dbias = ctx.needs_input_grad[:3]
    dx, dweight = backends.linear_grads(saved["x"], saved["weight"], grad_out, need_dx, need_dweight)
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
