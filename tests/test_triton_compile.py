"""The triton backend under the compilers with its kernels in sight: each launcher is a
``torch.library.triton_op`` (``distilbert_fast.ops.triton_ops``), so torch.compile's AOT graphs hold
the Triton launches themselves (``triton_kernel_wrapper_functional``), which Inductor schedules and,
on CUDA, captures in CUDA graphs; torch.export keeps one ``distilbert_fast::triton_*`` node per
launcher.

Without CUDA the kernels run under Triton's interpreter: each op eagerly, under
``torch.compile(backend="aot_eager", fullgraph=True)`` and through ``torch.export``, forward and
backward, against the eager backend in float64 (an error at most 2x the eager op's own, plus a small
atol). Inductor needs a GPU for a user Triton kernel (see ``_inductor_unavailable``); its tests, in
default mode and with CUDA graphs (``mode="reduce-overhead"``), run in the GPU run.
"""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.debugging import aot_eager

from conftest import SMALL_CONFIG, assert_close, packed_qkv
from distilbert_fast import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel, ops

triton_backend = pytest.importorskip("distilbert_fast.ops.triton_backend")
from distilbert_fast.ops import triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.skipif("triton" not in ops.available_backends(torch.zeros(1, device=DEVICE)),
                       reason="the triton backend cannot run here"),
    pytest.mark.skipif(not triton_ops.AVAILABLE, reason="this torch has no torch.library.triton_op"),
]
KERNEL_LAUNCH = torch.ops.higher_order.triton_kernel_wrapper_functional


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _t(*shape, dtype, grad=True):
    return torch.randn(*shape).to(DEVICE, dtype).requires_grad_(grad)


# Each case: (name, make(dtype) -> (tensors by name, the op on them given backend=)). Odd sizes,
# a fully-masked row, a residual broadcast over the batch (the position embeddings' layout), both
# linear_activation paths (fused kernel where K * itemsize % 16 == 0, else matmul + kernel).
def _bias_activation(dtype):
    t = dict(x=_t(3, 5, 24, dtype=dtype), bias=_t(24, dtype=dtype))
    return t, lambda backend, x, bias: ops.bias_activation(x, bias, "gelu_new", backend=backend)


def _residual_layernorm(dtype):
    t = dict(x=_t(2, 5, 16, dtype=dtype), residual=_t(5, 16, dtype=dtype), weight=_t(16, dtype=dtype),
             bias=_t(16, dtype=dtype), x_bias=_t(16, dtype=dtype))

    def run(backend, x, residual, weight, bias, x_bias):
        return ops.residual_layernorm(x, residual.expand_as(x), weight, bias, 1e-12, x_bias, backend=backend)
    return t, run


def _linear_activation(k):
    def make(dtype):
        t = dict(x=_t(3, 5, k, dtype=dtype), weight=_t(24, k, dtype=dtype), bias=_t(24, dtype=dtype))
        return t, lambda backend, x, weight, bias: ops.linear_activation(x, weight, bias, "gelu", backend=backend)
    return make


def _masked_attention(dtype):
    t = dict(q=_t(2, 2, 7, 8, dtype=dtype), k=_t(2, 2, 7, 8, dtype=dtype), v=_t(2, 2, 7, 8, dtype=dtype),
             head_mask=torch.rand(2).to(DEVICE, dtype).requires_grad_())

    def run(backend, q, k, v, head_mask):
        mask = torch.ones(2, 7, dtype=torch.bool, device=q.device)  # made in the graph, as the model's
        mask[1, 4:6] = False  # a row with a hole
        return ops.masked_attention(q, k, v, mask, head_mask, backend=backend)[0]
    return t, run


def _varlen_attention(dtype):
    q, k, v, cu_seqlens = packed_qkv([5, 1, 0, 3], heads=2, head_dim=8, dtype=dtype, device=DEVICE)
    t = dict(q=q.detach().requires_grad_(), k=k.detach().requires_grad_(), v=v.detach().requires_grad_(),
             head_mask=torch.rand(2).to(DEVICE, dtype).requires_grad_(), cu_seqlens=cu_seqlens)

    def run(backend, q, k, v, head_mask, cu_seqlens):
        return ops.varlen_attention(q, k, v, cu_seqlens, 6, head_mask, backend=backend)
    return t, run


CASES = {
    "bias_activation": _bias_activation,
    "residual_layernorm": _residual_layernorm,
    "linear_activation_fused": _linear_activation(32),
    "linear_activation_standalone": _linear_activation(9),
    "masked_attention": _masked_attention,
    "varlen_attention": _varlen_attention,
}


def _outputs_and_grads(run, backend, tensors, grad_out_seed=1):
    out = run(backend, **tensors)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed)).to(out)
    grads = torch.autograd.grad(out, [t for t in tensors.values() if t.requires_grad], grad_out)
    return [out.detach(), *grads]


def _as_in_a_model(run):
    """``run`` as compiled here. Without a GPU torch cannot lower a kernel to see which pointers it
    writes (no Triton driver), so it takes every pointer for written, and two things the model
    never does then fail in AOT autograd (torch 2.13): a graph input written through a view (the
    launchers' ``x.view(-1, n)``: 'The size of tensor a (5) must match the size of tensor b (15)'),
    and, with gradients, a graph output that is a view of a written tensor (masked attention's
    (batch, heads, seq, head_dim) view of token-major memory: 'Node permute_17 was invalid, but is
    output'). So on CPU the op takes clones of the inputs and its output is used, as in the model;
    on a GPU (exact analysis) the op takes the graph inputs and gives the graph output."""
    if DEVICE == "cuda":
        return run
    return lambda backend, **tensors: run(backend, **{
        n: t.clone() if t.is_floating_point() else t for n, t in tensors.items()}) * 1


def _graph_inputs(tensors):
    """Exported programs' inputs: on CPU (every pointer taken for written, see _as_in_a_model)
    copies, since export fails on written inputs that share memory (q, k and v as views of one
    QKV tensor: 'expected compiled_fn to be GraphModule'); on a GPU the tensors themselves."""
    return tuple(t.detach() if DEVICE == "cuda" else t.detach().clone() for t in tensors)


def _assert_twice_eager_error(name, got, eager, reference, atol):
    """|got - reference| at most 2x |eager - reference| (max over elements) + atol."""
    bound = 2 * (eager.double() - reference).abs().max().item() + atol
    assert_close(got, reference, atol=bound, name=name)


def _aot_graphs():
    """torch.compile's aot_eager backend, keeping the AOT forward and backward graphs it runs."""
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)
    return lambda gm, inputs: aot_eager(gm, inputs, fw_compiler=keep, bw_compiler=keep), graphs


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


def _ours(targets):
    return {str(t) for t in targets if str(t).startswith("distilbert_fast.")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_compiled_and_exported_ops_launch_the_kernels_and_match_eager(case, dtype):
    """Per op: fullgraph compile (AOT graphs, run as aot_eager does) whose forward and backward
    graphs launch Triton kernels and hold no opaque op of ours; outputs and every gradient within
    the 2x rule of the eager backend in float64, as eager mode's triton are; torch.export with one
    triton op per launcher, whose program gives eager mode's output bit for bit."""
    tensors, run = CASES[case](dtype)
    reference = _outputs_and_grads(run, "eager", {
        n: t.detach().double().requires_grad_() if t.requires_grad else t for n, t in tensors.items()})
    eager = _outputs_and_grads(run, "eager", tensors)
    triton_eager = _outputs_and_grads(run, "triton", tensors)
    backend, graphs = _aot_graphs()
    compiled = _outputs_and_grads(torch.compile(_as_in_a_model(run), backend=backend, fullgraph=True),
                                  "triton", tensors)

    assert len(graphs) == 2  # forward, backward
    for gm in graphs:
        targets = _targets(gm)
        assert KERNEL_LAUNCH in targets, gm.graph
        assert not _ours(targets), gm.graph
    atol = 1e-6 if dtype == torch.float32 else 1e-3
    names = ["out"] + [n for n, t in tensors.items() if t.requires_grad]
    for name, got_c, got_e, e, ref in zip(names, compiled, triton_eager, eager, reference, strict=True):
        _assert_twice_eager_error(f"{name} compiled", got_c, e, ref, atol)
        _assert_twice_eager_error(f"{name} eager mode", got_e, e, ref, atol)

    class Op(torch.nn.Module):
        def forward(self, *args):
            return run("triton", **dict(zip(tensors, args)))

    args = _graph_inputs(tensors.values())
    program = torch.export.export(Op(), args)
    ours = _ours(_targets(program.graph_module))
    assert ours and all(t.startswith("distilbert_fast.triton_") for t in ours), ours
    assert KERNEL_LAUNCH in _targets(program.run_decompositions(decompose_custom_triton_ops=True).graph_module)
    with torch.no_grad():
        assert torch.equal(program.module()(*args), triton_eager[0])


def test_compiled_varlen_attention_with_dropout_draws_eager_modes_masks():
    """The dropout seed is drawn in the graph from the device generator, as eager mode draws it:
    under one manual_seed the compiled op gives eager mode's output and gradients exactly."""
    tensors, _ = _varlen_attention(torch.float32)

    def run(backend, q, k, v, head_mask, cu_seqlens):
        return ops.varlen_attention(q, k, v, cu_seqlens, 6, head_mask, dropout_p=0.3, backend=backend)

    torch.manual_seed(3)
    eager = _outputs_and_grads(run, "triton", tensors)
    torch.manual_seed(3)
    compiled = _outputs_and_grads(torch.compile(_as_in_a_model(run), backend="aot_eager", fullgraph=True),
                                  "triton", tensors)
    for name, a, b in zip(["out", "q", "k", "v", "head_mask"], compiled, eager, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["bias_activation_fwd", "residual_layernorm_fwd", "linear_activation_fwd",
                                  "varlen_attention_fwd", "varlen_attention_bwd"])
def test_opcheck_of_the_triton_ops(name):
    """torch.library.opcheck of the triton ops themselves (schema, fake against real, autograd
    registration, and on a GPU AOT dispatch with dynamic shapes); every forward op and a backward
    op. On CPU AOT dispatch is left out: it returns the op's outputs as the graph's, and with every
    pointer taken for written (see _as_in_a_model) AOT autograd fails on those ('Node view_35 was
    invalid, but is output'); the compile tests above cover AOT dispatch there."""
    f32 = dict(dtype=torch.float32)
    q, k, v, cu_seqlens = packed_qkv([3, 4], heads=2, head_dim=8, device=DEVICE)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    head_mask = torch.rand(2, device=DEVICE)
    out, lse = triton_ops.varlen_attention_fwd(q, k, v, cu_seqlens, 4, head_mask, 0.0, 0.35, None)
    x = _t(3, 5, 16, **f32)
    samples = {
        "bias_activation_fwd": (x, _t(16, **f32), "relu"),
        "residual_layernorm_fwd": (x, _t(5, 16, **f32), _t(16, **f32), _t(16, **f32), 1e-5, None, 0.0, None,
                                   torch.float32),
        "linear_activation_fwd": (x, _t(8, 16, **f32), _t(8, **f32), "silu", True),
        "varlen_attention_fwd": (q, k, v, cu_seqlens, 4, head_mask, 0.0, 0.35, None),
        "varlen_attention_bwd": (q.detach(), k.detach(), v.detach(), out.detach(), lse, torch.randn_like(out),
                                 cu_seqlens, 4, head_mask, 0.0, 0.35, None, True),
    }
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    if DEVICE == "cuda":
        tests += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(getattr(torch.ops.distilbert_fast, f"triton_{name}"), samples[name], test_utils=tests)


def test_without_triton_op_the_backend_is_one_opaque_op_per_op(monkeypatch):
    """On a torch without triton_op (``traceable`` False) the triton backend is traced as the
    other fused backends are, one opaque custom op per op, with the same outputs."""
    model = DistilBertForSequenceClassification(DistilBertConfig(**{**SMALL_CONFIG, "n_layers": 1}))
    model = model.to(DEVICE).set_backend("triton").eval()
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (2, 6), device=DEVICE)
    mask = torch.ones(2, 6, dtype=torch.long, device=DEVICE)
    mask[0, 4:] = 0
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        monkeypatch.setattr(triton_backend.TritonBackend, "traceable", False)
        program = torch.export.export(model, (), dict(input_ids=ids, attention_mask=mask))
        ours = _ours(_targets(program.graph_module))
        assert "distilbert_fast.masked_attention.default" in ours and not any("triton_" in t for t in ours)
        assert_close(program.module()(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5)


def test_device_guard_is_free_off_cuda_and_on_one_gpu():
    """No device switch where none can be needed: a CPU tensor, and every tensor of a one-GPU
    machine (the shared no-op context, no current-device query)."""
    from distilbert_fast.kernels.triton_common import _ON_CURRENT_DEVICE, device_guard

    assert device_guard(torch.zeros(1)) is _ON_CURRENT_DEVICE
    if torch.cuda.is_available() and torch.cuda.device_count() == 1:
        assert device_guard(torch.zeros(1, device="cuda")) is _ON_CURRENT_DEVICE


# -- Inductor -------------------------------------------------------------------------------------
def _inductor_unavailable():
    """Why Inductor cannot run the triton backend's kernels here, or None. Its code for a user
    Triton kernel asks Triton for the active GPU driver (torch.utils._triton.triton_backend); under
    the interpreter there is none ('0 active drivers'), so on CPU only aot_eager runs them."""
    try:
        import triton
        triton.runtime.driver.active.get_current_target()
    except Exception as error:  # noqa: BLE001 - any failure means: no driver
        return f"Inductor compiles user Triton kernels only with a Triton GPU driver: {error}"
    return None


_EMITTED_SOURCES = """
import importlib.util, os, sys, tempfile
from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code as emitted
from distilbert_fast.kernels import triton_attention as ta, triton_bias_activation as tba
from distilbert_fast.kernels import triton_layernorm as tln, triton_linear_activation as tla
kernels = [tba._bias_activation_fwd_kernel, tba._bias_activation_bwd_kernel, tln._residual_layernorm_fwd_kernel,
           tln._residual_layernorm_bwd_kernel, ta._attn_fwd_kernel, ta._attn_bwd_preprocess_kernel,
           ta._attn_bwd_dkdv_kernel, ta._attn_bwd_dq_kernel, tla._linear_activation_fwd_kernel]
folder = tempfile.mkdtemp()
for i, kernel in enumerate(kernels):
    path = os.path.join(folder, f"emitted_{i}.py")  # (triton.jit reads a function's source file)
    with open(path, "w") as f:
        f.write("import triton\\nimport triton.language as tl\\n@triton.jit\\n" + emitted(kernel))
    spec = importlib.util.spec_from_file_location(f"emitted_{i}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    getattr(module, kernel.fn.__name__).cache_key  # resolves every name the kernel and its helpers use
    print(kernel.fn.__name__)
"""


def test_inductor_emits_each_kernel_with_everything_it_names():
    """The step of Inductor's code generation that needs no GPU, checked here for every kernel:
    the source Inductor writes for a user kernel (torch's
    ``user_defined_triton_kernel_transitive_closure_source_code``: the kernel, the jit helpers and
    constants it names, recursively) loads as a module where Triton resolves every name the
    kernel uses (its cache key walks them). Run without the interpreter (a subprocess): only
    @triton.jit kernels, not interpreted ones, are emitted this way."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _EMITTED_SOURCES], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.split()) == 9, result.stdout


@pytest.mark.skipif(_inductor_unavailable() is not None, reason=str(_inductor_unavailable()))
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_compiles_the_kernels_into_its_graph(mode):
    """Inductor (default and CUDA-graph mode) on the triton backend in fp16, padded and packed
    inference: its generated code holds our Triton kernels, no CUDA graph is skipped, and logits
    match eager mode within the 2x rule against float64; three calls, so a CUDA graph replays."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    config = DistilBertConfig(**{**SMALL_CONFIG, "n_layers": 1})
    model = DistilBertModel(config).to(DEVICE).eval()
    lengths = [7, 3, 12]
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (len(lengths), max(lengths)), device=DEVICE)
    mask = (torch.arange(max(lengths), device=DEVICE) < torch.tensor(lengths, device=DEVICE)[:, None]).long()
    cu_seqlens = torch.tensor([0, 7, 10, 22], dtype=torch.int32, device=DEVICE)
    packed_ids = ids[mask.bool()]
    calls = {
        "padded": lambda m: m(input_ids=ids, attention_mask=mask).last_hidden_state,
        "packed": lambda m: m(input_ids=packed_ids, cu_seqlens=cu_seqlens, max_seqlen=12).last_hidden_state,
    }
    with torch.no_grad():
        reference = {k: call(model.double().set_backend("eager")) for k, call in calls.items()}
        model.half()
        eager = {k: call(model.set_backend("eager")) for k, call in calls.items()}
        model.set_backend("triton")
        for kind, call in calls.items():
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(call, mode=None if mode == "default" else mode, fullgraph=True)
            got, code = run_and_get_code(compiled, model)
            for _ in range(2):
                got = compiled(model)
            assert any("_residual_layernorm_fwd_kernel" in c for c in code), kind
            assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
            real = mask.bool() if kind == "padded" else slice(None)
            _assert_twice_eager_error(f"{kind} last_hidden_state", got[real], eager[kind][real],
                                      reference[kind][real], atol=1e-3)


@pytest.mark.skipif(_inductor_unavailable() is not None, reason=str(_inductor_unavailable()))
def test_inductor_training_step_matches_eager_mode():
    """A compiled (Inductor) training step on the triton backend, packed, dropout off: the loss
    and every gradient within the 2x rule of eager mode's against float64."""
    config = DistilBertConfig(**{**SMALL_CONFIG, "n_layers": 1, "dropout": 0.0, "attention_dropout": 0.0})
    model = DistilBertForSequenceClassification(config).to(DEVICE).train()
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (14,), device=DEVICE)
    kwargs = dict(input_ids=ids, cu_seqlens=torch.tensor([0, 5, 6, 14], dtype=torch.int32, device=DEVICE),
                  max_seqlen=8, labels=torch.tensor([0, 1, 1], device=DEVICE))

    def step(fn):
        model.zero_grad()
        loss = fn(**kwargs).loss
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    reference = step(model.double().set_backend("eager"))
    model.float()
    eager = step(model.set_backend("eager"))
    compiled = step(torch.compile(model.set_backend("triton"), fullgraph=True))
    assert len(compiled) == len(eager)
    for i, (got, e, ref) in enumerate(zip(compiled, eager, reference)):
        _assert_twice_eager_error(f"loss/grad {i}", got, e, ref, atol=1e-5)
