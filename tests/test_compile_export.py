"""The model and its ops under the PyTorch tracers: torch.compile (fullgraph, no graph breaks),
torch.export, torch.onnx.export (run in onnxruntime) and torch.jit.trace, on the eager, cpu and
triton backends (triton under Triton's interpreter on CPU), each compared with the same model run
eagerly. Also the custom ops themselves (torch.library.opcheck: schema, fake, autograd
registration) and the input checks, which stay in eager mode and are skipped under a tracer.

Small models (SMALL_CONFIG, one or two layers) keep the compile times short.
"""

import pytest
import torch

import distilbert_fast
from conftest import SMALL_CONFIG, assert_close
from distilbert_fast import DistilBertConfig, DistilBertForSequenceClassification, DistilBertModel, ops
from distilbert_fast.ops import custom

CPU_BACKENDS = ["eager", "cpu"] + (["triton"] if "triton" in ops.registered_backends() else [])
OPS = ("masked_attention", "bias_activation", "residual_layernorm", "linear_activation", "linear")


def _backend_params(names):
    return [pytest.param(n, marks=pytest.mark.skipif(
        n not in ops.available_backends(torch.zeros(1)), reason=f"backend {n} cannot run on CPU here"))
        for n in names]


BACKENDS = _backend_params(CPU_BACKENDS)
FUSED = _backend_params([n for n in CPU_BACKENDS if n != "eager"])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def small_model(cls=DistilBertModel, backend="eager", **config):
    config = DistilBertConfig(**{**SMALL_CONFIG, "n_layers": 1, **config})
    return cls(config).set_backend(backend).eval()


def inputs(batch=2, seq=7):
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, seq - 3:] = 0
    return ids, mask


def graph_breaks(fn, *args, **kwargs) -> int:
    explanation = torch._dynamo.explain(fn)(*args, **kwargs)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


# -- the ops --------------------------------------------------------------------------------------
def test_every_hot_op_is_a_custom_op_with_a_backward_op():
    for name in OPS:
        assert hasattr(torch.ops.distilbert_fast, name), name
    for name in OPS[:-1]:  # linear's backward is two matmuls, traced as such
        assert hasattr(torch.ops.distilbert_fast, f"{name}_backward"), name


def _op_samples(backend):
    """(op, args) for each custom op on ``backend``, inputs requiring grad, with dropout where
    the op has it."""
    q, k, v = (torch.randn(2, 2, 5, 8, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    head_mask = torch.rand(2, requires_grad=True)
    x = torch.randn(3, 5, 8, requires_grad=True)
    residual = torch.randn(3, 5, 8, requires_grad=True)
    w8, b8 = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    weight = torch.randn(6, 8, requires_grad=True)
    b6 = torch.randn(6, requires_grad=True)
    # packed: sequences of 2 and 5 tokens, max_seqlen above the longest
    qp, kp, vp = (torch.randn(7, 2, 8, requires_grad=True) for _ in range(3))
    cu_seqlens = torch.tensor([0, 2, 7], dtype=torch.int32)
    d = torch.ops.distilbert_fast
    return [
        (d.masked_attention, (q, k, v, mask, head_mask, 0.0, 0.35, False, backend)),
        (d.masked_attention, (q, k, v, None, None, 0.0, 0.35, True, backend)),
        (d.bias_activation, (x, w8, "gelu", backend)),
        (d.residual_layernorm, (x, residual, w8, b8, 1e-12, b8, 0.0, backend)),
        (d.residual_layernorm, (x, None, w8, b8, 1e-5, None, 0.25, backend)),
        (d.linear_activation, (x, weight, b6, "gelu_new", backend)),
        (d.linear, (x, weight, b6, backend)),
        (d.varlen_attention, (qp, kp, vp, cu_seqlens, 6, head_mask, 0.0, 0.35, backend)),
        (d.varlen_attention, (qp, kp, vp, cu_seqlens, 5, None, 0.25, 0.35, backend)),
    ]


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    """torch.library.opcheck: the schema, the fake against the real outputs (shapes, dtypes,
    strides), the autograd registration, and AOT dispatch (a traced forward and backward)."""
    for op, args in _op_samples(backend):
        # a forward with dropout draws new masks per call: only the fake and autograd hold there
        tests = ("test_schema", "test_faketensor", "test_autograd_registration")
        if not any(isinstance(a, float) and a == 0.25 for a in args):
            tests += ("test_aot_dispatch_dynamic",)
        torch.library.opcheck(op, args, test_utils=tests)


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_op_with_dropout_has_the_eager_gradients(backend):
    """Under compile the backward recomputes the forward with the forward's RNG state restored:
    the same dropout masks, so the same outputs and gradients as the eager-mode op."""
    x = torch.randn(4, 6, 16, requires_grad=True)
    residual = torch.randn(4, 6, 16, requires_grad=True)
    weight, bias = torch.randn(16, requires_grad=True), torch.randn(16, requires_grad=True)

    def run(fn):
        torch.manual_seed(7)
        y = fn(x, residual, weight, bias)
        grads = torch.autograd.grad(y.pow(2).sum(), (x, residual, weight, bias))
        return y.detach(), grads

    def op(x, residual, weight, bias):
        return ops.residual_layernorm(x, residual, weight, bias, dropout_p=0.3, backend=backend)

    y_eager, grads_eager = run(op)
    y_compiled, grads_compiled = run(torch.compile(op, backend="aot_eager", fullgraph=True))
    assert torch.equal(y_compiled, y_eager)
    for name, a, b in zip(("x", "residual", "weight", "bias"), grads_compiled, grads_eager):
        assert_close(a, b, atol=1e-6, name=name)


# -- torch.compile ----------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_model_compiles_without_graph_breaks(backend):
    model = small_model(DistilBertForSequenceClassification, backend)
    ids, mask = inputs()
    assert graph_breaks(model, input_ids=ids, attention_mask=mask) == 0
    expected = model(input_ids=ids, attention_mask=mask).logits  # eager mode: packed
    assert ops.last_backend("varlen_attention") == backend
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_close(compiled(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, name="logits")
    if backend != "eager":  # a custom op records its backend when the compiled graph runs it
        assert ops.last_backend("masked_attention") == backend


def test_model_on_the_default_backend_compiles_without_graph_breaks():
    """A drop-in user sets no backend: the automatic choice, and a use_backend block around the
    compiled call, trace without a graph break (use_backend is read when the graph compiles)."""
    model = small_model(DistilBertForSequenceClassification, None)
    ids, mask = inputs()
    assert graph_breaks(model, input_ids=ids, attention_mask=mask) == 0
    expected = model(input_ids=ids, attention_mask=mask).logits
    with ops.use_backend("eager"):
        assert graph_breaks(model, input_ids=ids, attention_mask=mask) == 0
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert_close(compiled(input_ids=ids, attention_mask=mask).logits, expected, atol=1e-5, name="logits")


@pytest.mark.skipif("cpu" not in ops.available_backends(torch.zeros(1, dtype=torch.bfloat16)),
                    reason="the cpu backend does not run bfloat16 here")
def test_compiled_bf16_packed_inference_takes_the_flash_kernel(monkeypatch):
    """bf16 packed inference on long equal-length sequences: the cpu backend's varlen attention
    runs PyTorch's flash CPU kernel inside the custom op, compiled with no graph breaks, the same
    output as eager mode."""
    from distilbert_fast.ops import cpu_backend

    if not cpu_backend.FLASH_ATTENTION:
        pytest.skip("this torch has no flash attention CPU kernel")
    seq = cpu_backend.FLASH_MIN_SEQLEN
    model = small_model(DistilBertModel, "cpu", max_position_embeddings=seq).to(torch.bfloat16)
    ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (3 * seq,))
    cu = torch.arange(0, 4 * seq, seq, dtype=torch.int32)
    calls = []
    flash = cpu_backend._FLASH_CPU
    monkeypatch.setattr(cpu_backend, "_FLASH_CPU", lambda *a, **kw: calls.append(1) or flash(*a, **kw))

    def forward(ids, cu):
        return model(input_ids=ids, cu_seqlens=cu, max_seqlen=seq).last_hidden_state

    with torch.no_grad():
        expected = forward(ids, cu)
        assert len(calls) == model.config.n_layers
        assert graph_breaks(forward, ids, cu) == 0
        calls.clear()
        out = torch.compile(forward, fullgraph=True, backend="aot_eager")(ids, cu)
    assert len(calls) == model.config.n_layers
    assert_close(out, expected, atol=0, name="last_hidden_state")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_training_step_matches_eager(backend):
    """fullgraph compile of forward + backward (dropout off): the same loss and gradients."""
    model = small_model(DistilBertForSequenceClassification, backend).train()
    model.config.dropout = model.config.attention_dropout = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = inputs()
    labels = torch.tensor([0, 1])

    def step(fn):
        model.zero_grad()
        loss = fn(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_eager, grads_eager = step(model)
    loss_compiled, grads_compiled = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_close(loss_compiled, loss_eager, atol=1e-6, name="loss")
    assert grads_compiled.keys() == grads_eager.keys()
    for name in grads_eager:
        assert_close(grads_compiled[name], grads_eager[name], atol=1e-5, name=name)


@pytest.mark.skipif(tuple(int(n) for n in torch.__version__.split(".")[:2]) < (2, 13),
                    reason="torch 2.11's is_exporting() reads True under torch.compile: the padded computation stays")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_packs_a_ragged_batch_where_dynamic_shapes_are_allowed(backend):
    """With torch._dynamo.config.capture_dynamic_output_shape_ops, a compiled base model packs a
    padded batch inside its one graph (the real-token count a symbol): eager mode's outputs,
    zeros at padding, on two batch shapes. Without the flag the padded computation (the test
    above: masked_attention)."""
    model = small_model(backend=backend, n_layers=2)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True), torch.no_grad():
        compiled = torch.compile(model, backend=count)
        for lengths in ([12, 5, 1], [9, 9, 3, 7]):
            seq = max(lengths)
            ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (len(lengths), seq))
            mask = (torch.arange(seq) < torch.tensor(lengths)[:, None]).long()
            expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
            assert_close(got, expected, atol=1e-5, name=f"last_hidden_state {lengths}")
    assert graphs and all("real_token_rows" in str(gm.graph) for gm in graphs)


@pytest.mark.parametrize("backend", FUSED)
def test_packed_entry_compiles_once_for_every_max_seqlen(backend):
    """A compiled packed entry point serves batches of any max_seqlen with one dynamic graph
    (the varlen op takes it as a SymInt): an ``int`` in the op's schema made every new
    max_seqlen a recompile (4 graphs for 4 batches), up to dynamo's recompile limit."""
    model = small_model(backend=backend)
    graphs = []

    def count(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, backend=count, fullgraph=True)
    with torch.no_grad():
        for lengths in ([5, 1, 8], [2, 7, 3, 4], [3, 3, 4, 2, 6], [9, 10, 1]):
            cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
            ids = torch.randint(0, SMALL_CONFIG["vocab_size"], (sum(lengths),))
            kwargs = dict(input_ids=ids, cu_seqlens=cu, max_seqlen=max(lengths))
            assert_close(compiled(**kwargs).last_hidden_state, model(**kwargs).last_hidden_state, atol=1e-5,
                         name=f"last_hidden_state {lengths}")
    assert len(graphs) <= 2  # the first batch's static graph, then one dynamic graph


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_packed_training_step_matches_eager(backend):
    """fullgraph compile of forward + backward on packed input (dropout off): the varlen op's
    backward op (max_seqlen a SymInt) gives eager mode's loss and gradients, on a second batch of
    other sizes too (the dynamic graph)."""
    model = small_model(DistilBertForSequenceClassification, backend).train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for lengths in ([5, 1, 8], [2, 7, 3, 4]):
        cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        kwargs = dict(input_ids=torch.randint(0, SMALL_CONFIG["vocab_size"], (sum(lengths),)), cu_seqlens=cu,
                      max_seqlen=max(lengths), labels=torch.randint(0, 2, (len(lengths),)))
        results = []
        for fn in (model, compiled):
            model.zero_grad()
            loss = fn(**kwargs).loss
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
        assert_close(loss_compiled, loss_eager, atol=1e-6, name=f"loss {lengths}")
        assert grads_compiled.keys() == grads_eager.keys()
        for name in grads_eager:
            assert_close(grads_compiled[name], grads_eager[name], atol=1e-5, name=f"{name} {lengths}")


def test_model_compiles_with_inductor_on_the_cpu_backend():
    """Inductor proper (C++ code generation) around the opaque cpu ops. Under a tracer a padded
    batch runs the padded computation (packing would size a tensor from the mask's values), so
    padding positions hold computed values there and zeros in eager mode: real positions agree."""
    model = small_model(backend="cpu")
    ids, mask = inputs()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        got = compiled(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert_close(got[real], expected[real], atol=1e-5, name="last_hidden_state")


# -- torch.export, ONNX, jit.trace ------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_export(backend):
    model = small_model(DistilBertForSequenceClassification, backend)
    ids, mask = inputs()
    program = torch.export.export(model, (), dict(input_ids=ids, attention_mask=mask))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    ours = {t for t in targets if t.startswith("distilbert_fast.")}
    if backend == "eager":
        assert not ours  # plain ATen ops, nothing custom
    elif ops.backends._registry[backend].traceable:  # triton: one triton op per kernel launcher
        assert "distilbert_fast.triton_attention_fwd.default" in ours
        assert not ours & {f"distilbert_fast.{op}.default" for op in OPS}
    else:
        assert "distilbert_fast.masked_attention.default" in ours
    ids2, mask2 = inputs()
    expected = model(input_ids=ids2, attention_mask=mask2).logits
    got = program.module()(input_ids=ids2, attention_mask=mask2).logits
    assert_close(got, expected, atol=1e-5, name="logits")


@pytest.mark.parametrize("backend", BACKENDS)
def test_export_with_a_dynamic_batch_and_length(backend):
    """One exported program serves every padded batch: batch and seq as torch.export Dims, run on
    other shapes (one row, longer rows) with the eager model's logits."""
    model = small_model(DistilBertForSequenceClassification, backend)
    ids, mask = inputs()
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("seq", min=2, max=SMALL_CONFIG["max_position_embeddings"])
    program = torch.export.export(model, (), dict(input_ids=ids, attention_mask=mask),
                                  dynamic_shapes=dict(input_ids={0: batch, 1: seq}, attention_mask={0: batch, 1: seq}))
    for shape in ((1, 5), (5, 11)):
        ids2 = torch.randint(0, SMALL_CONFIG["vocab_size"], shape)
        mask2 = (torch.arange(shape[1]) < torch.randint(1, shape[1] + 1, (shape[0], 1))).long()
        expected = model(input_ids=ids2, attention_mask=mask2).logits
        assert_close(program.module()(input_ids=ids2, attention_mask=mask2).logits, expected, atol=1e-5,
                     name=f"logits {shape}")


@pytest.mark.parametrize("backend", FUSED)
def test_export_of_the_packed_entry_with_dynamic_tokens_and_batch(backend):
    """The packed entry point exported once (tokens and sequences as Dims, max_seqlen a fixed upper
    bound) runs any packed batch, a single sequence too, with the eager model's outputs. The eager
    backend's varlen attention pads into a (batch, ...) layout whose batch - 1 the tracer guards
    against 1, so there the batch Dim must start at 2 sequences."""
    model = small_model(backend=backend)
    max_seqlen = 8

    def packed(lengths):
        cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        return torch.randint(0, SMALL_CONFIG["vocab_size"], (int(cu[-1]),)), cu

    ids, cu = packed([4, 7, 2])
    tokens, sequences = torch.export.Dim("tokens", min=2, max=4096), torch.export.Dim("sequences", min=2, max=257)
    program = torch.export.export(model, (), dict(input_ids=ids, cu_seqlens=cu, max_seqlen=max_seqlen),
                                  dynamic_shapes=dict(input_ids={0: tokens}, cu_seqlens={0: sequences}, max_seqlen=None))
    for lengths in ([5], [8, 1, 3, 6, 2]):
        ids2, cu2 = packed(lengths)
        expected = model(input_ids=ids2, cu_seqlens=cu2, max_seqlen=max_seqlen).last_hidden_state
        got = program.module()(input_ids=ids2, cu_seqlens=cu2, max_seqlen=max_seqlen).last_hidden_state
        assert_close(got, expected, atol=1e-5, name=f"last_hidden_state {lengths}")


def _packed(lengths):
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    return torch.randint(0, SMALL_CONFIG["vocab_size"], (int(cu[-1]),)), cu


def _export_packed(model, max_seqlen, min_cu_seqlens):
    ids, cu = _packed([4, 7, 2])
    tokens = torch.export.Dim("tokens", min=1, max=4096)
    sequences = torch.export.Dim("sequences", min=min_cu_seqlens, max=257)
    return torch.export.export(model, (), dict(input_ids=ids, cu_seqlens=cu, max_seqlen=max_seqlen),
                               dynamic_shapes=dict(input_ids={0: tokens}, cu_seqlens={0: sequences}, max_seqlen=None))


def _backed_size_oblivious():
    config = torch.fx.experimental._config
    if not hasattr(config, "backed_size_oblivious"):
        pytest.skip("this torch has no torch.fx.experimental._config.backed_size_oblivious")
    return config.patch(backed_size_oblivious=True)


HEADS = {"DistilBertForSequenceClassification": ("eager", "cpu"), "DistilBertForQuestionAnswering": ("cpu",),
         "DistilBertForTokenClassification": ("cpu",)}


@pytest.mark.parametrize("class_name,backend", [(c, b) for c, backends in HEADS.items() for b in backends])
def test_export_of_a_heads_packed_entry_serves_one_sequence_too(class_name, backend):
    """A task head's packed entry point exported once with a sequences Dim allowing one sequence
    (cu_seqlens of 2 entries) runs batches of 1 and 5 sequences with the eager model's outputs.
    A sequence-level output has cu_seqlens.shape[0] - 1 rows, and torch.export's default 0/1
    specialisation guards that size against 1 (a contiguity check of any tensor of that size):
    export under torch.fx.experimental._config.patch(backed_size_oblivious=True), as
    torch.onnx's exporter does, takes batch 1 as a symbol like any other."""
    model = small_model(getattr(distilbert_fast, class_name), backend)
    with _backed_size_oblivious():
        program = _export_packed(model, 8, min_cu_seqlens=2)
    for lengths in ([5], [1], [8, 1, 3, 6, 2]):
        ids, cu = _packed(lengths)
        expected = model(input_ids=ids, cu_seqlens=cu, max_seqlen=8)
        got = program.module()(input_ids=ids, cu_seqlens=cu, max_seqlen=8)
        assert list(got.keys()) == list(expected.keys())
        for key in expected.keys():
            assert_close(got[key], expected[key], atol=1e-5, name=f"{key} {lengths}")


def test_export_of_a_sequence_heads_packed_entry_without_the_option():
    """The documented minimum without backed_size_oblivious: a sequences Dim from 3 entries (2
    sequences); a single sequence then runs as [text, empty] (cu_seqlens [0, n, n]) and its row
    is the first. A Dim allowing 2 entries fails in torch with the guard it names."""
    model = small_model(DistilBertForSequenceClassification, "cpu")
    with pytest.raises(Exception, match=r"3 <= L\['cu_seqlens'\]\.size\(\)\[0\]"):
        _export_packed(model, 8, min_cu_seqlens=2)
    program = _export_packed(model, 8, min_cu_seqlens=3)
    ids, cu = _packed([6])
    expected = model(input_ids=ids, cu_seqlens=cu, max_seqlen=8).logits
    got = program.module()(input_ids=ids, cu_seqlens=torch.cat([cu, cu[-1:]]), max_seqlen=8).logits
    assert got.shape == (2, SMALL_CONFIG.get("num_labels", 2))
    assert_close(got[:1], expected, atol=1e-5, name="logits")


class _Logits(torch.nn.Module):
    """model(input_ids, attention_mask).logits, the signature an ONNX graph has."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


@pytest.mark.parametrize("backend", ["eager", None])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime(tmp_path, backend, exporter):
    """Both of torch.onnx's exporters (the TorchScript-based one that older scripts call with
    dynamic_axes too), on any backend: while exporting, every op records its plain ATen code
    (ONNX has no node for our custom ops)."""
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        dynamic = dict(dynamic_shapes=dict(input_ids={0: "batch", 1: "seq"}, attention_mask={0: "batch", 1: "seq"}))
    else:
        dynamic = dict(dynamic_axes=dict(input_ids={0: "batch", 1: "seq"}, attention_mask={0: "batch", 1: "seq"}))
    model = small_model(DistilBertForSequenceClassification, backend, n_layers=2)
    ids, mask = inputs(batch=2, seq=9)
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        _Logits(model).eval(), (ids, mask), str(path),
        input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamo=exporter == "dynamo", **dynamic,
    )
    assert not model.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, seq in ((2, 9), (3, 5)):  # the traced shapes and others
        ids, mask = inputs(batch, seq)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert_close(torch.from_numpy(got), expected, atol=1e-5, name=f"logits {batch}x{seq}")


class _PackedLogits(torch.nn.Module):
    """The packed entry point with a fixed max_seqlen (a graph input must be a tensor)."""

    def __init__(self, model, max_seqlen):
        super().__init__()
        self.model, self.max_seqlen = model, max_seqlen

    def forward(self, input_ids, cu_seqlens):
        return self.model(input_ids=input_ids, cu_seqlens=cu_seqlens, max_seqlen=self.max_seqlen).logits


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_onnx_export_of_the_packed_entry_runs_in_onnxruntime(tmp_path, exporter):
    """The packed entry point exported with dynamic tokens and sequences runs other packed
    batches in onnxruntime, one sequence too, with the eager model's logits. (The sequence index
    of each token came from torch.searchsorted, which neither exporter has, and the eager varlen
    key mask from index_fill_(..., True), which TorchScript's alias analysis asserted on.)"""
    ort = pytest.importorskip("onnxruntime")
    axes = dict(input_ids={0: "tokens"}, cu_seqlens={0: "sequences"})
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        dynamic = dict(dynamic_shapes=axes)
    else:
        dynamic = dict(dynamic_axes=axes)
    model = small_model(DistilBertForSequenceClassification, None, n_layers=2)

    def packed(lengths):
        cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
        return torch.randint(0, SMALL_CONFIG["vocab_size"], (int(cu[-1]),)), cu

    path = tmp_path / "packed.onnx"
    torch.onnx.export(_PackedLogits(model, 8).eval(), packed([4, 7, 2]), str(path), input_names=["input_ids", "cu_seqlens"],
                      output_names=["logits"], dynamo=exporter == "dynamo", **dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for lengths in ([5, 3], [8, 1, 1, 6, 2], [3]):
        ids, cu = packed(lengths)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "cu_seqlens": cu.numpy()})
        expected = model(input_ids=ids, cu_seqlens=cu, max_seqlen=8).logits
        assert_close(torch.from_numpy(got), expected, atol=1e-5, name=f"logits {lengths}")


def test_onnx_export_of_the_model_itself_with_positional_inputs(tmp_path):
    """torch.onnx.export(model, (input_ids, attention_mask)) as tutorials write it for HF's model:
    the TorchScript-based exporter passes every forward argument by position, adapter_names too."""
    ort = pytest.importorskip("onnxruntime")
    model = small_model(DistilBertForSequenceClassification, None, n_layers=2)
    ids, mask = inputs(batch=2, seq=9)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (ids, mask), str(path), input_names=["input_ids", "attention_mask"],
                      output_names=["logits"], dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                                             "attention_mask": {0: "batch", 1: "seq"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids, mask = inputs(3, 5)
    (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert_close(torch.from_numpy(got), model(ids, attention_mask=mask).logits, atol=1e-5, name="logits")
    # adapter_names by position, as that exporter passes it
    assert_close(model(ids, mask, *[None] * 10).logits, model(ids, attention_mask=mask).logits, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jit_trace(backend):
    model = small_model(backend=backend)
    ids, mask = inputs()
    with torch.no_grad():
        traced = torch.jit.trace(model, (ids, mask), strict=False)
        ids2, mask2 = inputs()
        expected = model(input_ids=ids2, attention_mask=mask2).last_hidden_state
        got = traced(ids2, mask2)["last_hidden_state"]
    real = mask2.bool()  # traced: the padded computation; eager mode: packed, zeros at padding
    assert_close(got[real], expected[real], atol=1e-5, name="last_hidden_state")


# -- the input checks -------------------------------------------------------------------------------
def test_id_range_check_runs_eagerly_and_is_skipped_while_tracing():
    model = small_model()
    bad = torch.tensor([[1, SMALL_CONFIG["vocab_size"]]])
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 99\), found 99"):
        model(input_ids=bad)
    assert not custom.tracing()
    ids, _ = inputs()
    # the check's .tolist() would be a graph break (a data-dependent value); while tracing it is
    # skipped, and the eager check above still runs after the model was compiled
    assert graph_breaks(model, input_ids=ids) == 0
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model(input_ids=bad)


class _Probe(torch.nn.Module):
    """x + 1 where custom.tracing() held when the call was traced, x + 2 in eager mode."""

    def forward(self, x):
        return x + (1 if custom.tracing() else 2)


def test_tracing_is_false_in_eager_mode_and_true_under_each_tracer():
    x = torch.zeros(1)
    traced = {
        "torch.compile": torch.compile(_Probe(), backend="eager", fullgraph=True),
        "torch.export": torch.export.export(_Probe(), (x,)).module(),
        # check_trace=False: the check re-runs the module eagerly
        "torch.jit.trace": torch.jit.trace(_Probe(), x, check_trace=False),
    }
    assert _Probe()(x).item() == 2
    for name, module in traced.items():
        assert module(x).item() == 1, name


@pytest.mark.parametrize("backend", FUSED)
def test_backend_stays_observable_under_compile(backend):
    """last_backend() is recorded by the custom ops at each call of the compiled graph, and
    clearing it does not make dynamo recompile. A traceable backend's graph (triton's: its kernels
    as triton ops) runs no op of ours: there it is recorded when the graph is traced."""
    model = small_model(backend=backend)
    ids, mask = inputs()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ops.backends._last.clear()
    compiled(input_ids=ids, attention_mask=mask)
    when_traced = ops.last_backend()
    ops.backends._last.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled(input_ids=ids, attention_mask=mask)  # the same graph, not a retrace
    # linear only where the backend has its own GEMM (cpu); F.linear is inlined, not an op
    recorded = ("masked_attention", "residual_layernorm", "linear_activation") + (
        ("linear",) if backend == "cpu" else ())
    if ops.backends._registry[backend].traceable:
        assert {op: when_traced.get(op) for op in recorded + ("linear",)} == {
            op: backend for op in recorded + ("linear",)}
        assert ops.last_backend() == {}
    else:
        assert ops.last_backend() == {op: backend for op in recorded}
