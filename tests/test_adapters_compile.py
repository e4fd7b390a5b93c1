"""Adapters under torch.compile(fullgraph=True): bottleneck adapters, LoRA, Stack and Parallel
(and Fuse, Split, BatchSplit, Average, MultiTask),
chosen by set_active_adapters / train_adapter, by forward(adapter_names=...) or by an
AdapterSetup block, on padded and packed input, trace with no graph break and give eager mode's
outputs; changing the setup between calls of one compiled model gives the new setup's result
(dynamo guards on the setup; a stale graph would give the old one); a compiled training step
gives eager mode's gradients.

Small models (SMALL_CONFIG, two layers; LoRA left out of layer 0, so a Parallel replicates the
batch in layer 0 at the bottleneck and in layer 1 at the LoRA projections) keep compiles short.
"""

import asyncio
import threading

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close

from distilbert_fast import (
    AdapterFusionConfig,
    AdapterSetup,
    Average,
    BatchSplit,
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    DoubleSeqBnConfig,
    Fuse,
    LoRAConfig,
    MultiTask,
    Parallel,
    SeqBnConfig,
    Split,
    Stack,
    ops,
)
from distilbert_fast.adapters import AdapterFusion

BACKENDS = [pytest.param(n, marks=pytest.mark.skipif(
    n not in ops.available_backends(torch.zeros(1)), reason=f"backend {n} cannot run on CPU here"))
    for n in ("eager", "cpu")]

# one of each kind: a bottleneck after the FFN, one after both sublayers, a LoRA on q and v
SETUPS = {
    "bottleneck": "a",
    "lora": "l",
    "stack": Stack("a", "l"),
    "parallel": Parallel("a", Stack("l", "b")),
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def adapter_model(backend="eager", cls=DistilBertForSequenceClassification):
    model = cls(DistilBertConfig(**{**SMALL_CONFIG, "num_labels": 3})).set_backend(backend).eval()
    model.add_adapter("a", SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", DoubleSeqBnConfig(reduction_factor=2, leave_out=[0]))
    model.add_adapter("l", LoRAConfig(r=2, alpha=4, leave_out=[0]))
    with torch.no_grad():  # adapters that change the output (LoRA's B starts at zero), a head that shows it
        for name, p in model.named_parameters():
            if ".adapters." in name or ".loras." in name or "classifier" in name:
                p.copy_(0.3 * torch.randn_like(p))
    return model


def padded_batch():
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    return dict(input_ids=ids, attention_mask=mask)


def packed_batch():
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (9,))
    return dict(input_ids=ids, cu_seqlens=torch.tensor([0, 5, 6, 9], dtype=torch.int32), max_seqlen=5)


def graph_breaks(fn, **kwargs) -> int:
    explanation = torch._dynamo.explain(fn)(**kwargs)
    assert explanation.graph_count >= 1
    return explanation.graph_break_count


def check_sequence(model, compiled, calls):
    """Each (label, setup, run) in ``calls``: run(fn) under ``setup`` on the eager model and on the
    compiled one gives the same logits; the setups' results differ from one another, so a
    stale graph would be caught."""
    seen = {}
    for label, run in calls:
        expected = run(model)
        assert_close(run(compiled), expected, atol=1e-5, name=label)
        seen[label] = expected
    labels = list(seen)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            if seen[a].shape == seen[b].shape:
                assert not torch.allclose(seen[a], seen[b], atol=1e-3), f"{a} and {b} give one result"


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_adapter_names_compile_without_graph_breaks_and_switch(backend, packed):
    """forward(adapter_names=...) for each kind, then back to the first: each call equals eager."""
    model = adapter_model(backend)
    inputs = packed_batch() if packed else padded_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # (a graph break raises)
    order = [*SETUPS, "bottleneck"]
    with torch.no_grad():
        check_sequence(model, compiled, [
            (name, lambda fn, s=SETUPS[name]: fn(**inputs, adapter_names=s).logits) for name in order
        ] + [("none", lambda fn: fn(**inputs).logits)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_active_adapters_and_adapter_setup_blocks_switch_under_compile(backend):
    """set_active_adapters between calls and AdapterSetup blocks around them (A, B, A), on the
    packed entry point; the block is seen per thread."""
    model = adapter_model(backend)
    inputs = packed_batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")

    def active(setup):
        def run(fn):
            model.set_active_adapters(setup)
            return fn(**inputs).logits
        return run

    def block(setup):
        def run(fn):
            with AdapterSetup(setup):
                return fn(**inputs).logits
        return run

    with torch.no_grad():
        check_sequence(model, compiled, [
            ("active bottleneck", active("a")), ("active parallel", active(SETUPS["parallel"])),
        ])
        assert_close(active("a")(compiled), active("a")(model), atol=1e-5, name="active bottleneck again")
        model.set_active_adapters("l")
        check_sequence(model, compiled, [
            ("block bottleneck", block("a")), ("block parallel", block(SETUPS["parallel"])),
            ("active lora", lambda fn: fn(**inputs).logits),  # the block left: the active setup again
        ])
        with AdapterSetup("a"):  # another thread does not see this thread's block
            seen = []
            thread = threading.Thread(target=lambda: seen.append(compiled(**inputs).logits))
            thread.start()
            thread.join()
            in_block = compiled(**inputs).logits
        assert_close(seen[0], model(**inputs).logits, atol=1e-5, name="other thread: active lora")
        assert_close(in_block, model(**inputs, adapter_names="a").logits, atol=1e-5, name="block")


def test_eager_setup_stays_per_async_task_and_thread():
    """In eager mode an AdapterSetup block is seen by its own async task and thread only, also
    when blocks interleave; once they have closed, a compiled model sees none of them."""
    model = adapter_model()
    inputs = packed_batch()
    with torch.no_grad():
        expected = {name: model(**inputs, adapter_names=name).logits for name in ("a", "l")}
        plain = model(**inputs).logits
    results = {}

    @torch.no_grad()
    def run_in_block(name, wait):
        with AdapterSetup(name):
            wait()  # the other task or thread opens its block meanwhile
            results[name] = model(**inputs).logits

    async def interleaved():
        async def in_block(name):
            with AdapterSetup(name):
                await asyncio.sleep(0)
                with torch.no_grad():
                    results[name] = model(**inputs).logits
        await asyncio.gather(in_block("a"), in_block("l"))

    asyncio.run(interleaved())
    for name in ("a", "l"):
        assert_close(results.pop(name), expected[name], atol=1e-6, name=f"task {name}")
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=run_in_block, args=(name, barrier.wait)) for name in ("a", "l")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in ("a", "l"):
        assert_close(results.pop(name), expected[name], atol=1e-6, name=f"thread {name}")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(**inputs).logits, plain, atol=1e-5, name="after the blocks")


def test_parallel_with_a_head_per_adapter_compiles():
    """DistilBertAdapterModel: a Parallel setup runs each child's head on its copy of the batch;
    compiled, then switched to one adapter and back."""
    model = DistilBertAdapterModel(DistilBertConfig(**SMALL_CONFIG)).set_backend("eager").eval()
    model.add_adapter("a", SeqBnConfig(reduction_factor=4))
    model.add_adapter("l", LoRAConfig(r=2, alpha=4, leave_out=[0]))
    model.add_classification_head("a", num_labels=3)
    model.add_tagging_head("l", num_labels=4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name or ".loras." in name or name.startswith("heads."):
                p.copy_(0.3 * torch.randn_like(p))
    inputs = padded_batch()
    parallel = Parallel("a", "l")
    assert graph_breaks(model, **inputs, adapter_names=parallel) == 0
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for setup, head in ((parallel, None), ("a", "a"), (parallel, None)):
            expected = model(**inputs, adapter_names=setup, head=head)
            got = compiled(**inputs, adapter_names=setup, head=head)
            if head is None:
                assert len(got) == 2
                real = inputs["attention_mask"].bool()  # compiled: the padded computation
                assert_close(got[0].logits, expected[0].logits, atol=1e-5, name="head a")
                assert_close(got[1].logits[real], expected[1].logits[real], atol=1e-5, name="head l")
            else:
                assert_close(got.logits, expected.logits, atol=1e-5, name="head a alone")


def training_step(model):
    """step(fn): the loss of fn (the model or its compiled form) on a padded batch (dropout off),
    its backward, and the gradients."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    inputs = padded_batch()
    labels = torch.tensor([0, 2, 1])

    def step(fn):
        model.zero_grad()
        out = fn(**inputs).logits
        loss = torch.nn.functional.cross_entropy(out, labels.repeat(out.shape[0] // 3))
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return step


@pytest.mark.parametrize("setup", ["a", "l", Parallel("a", "l")], ids=["bottleneck", "lora", "parallel"])
def test_compiled_training_step_with_adapters_matches_eager(setup):
    """train_adapter, then a fullgraph-compiled forward + backward (dropout off): the same loss
    and gradients as eager mode, only the adapters (and the head) trained; also with gradient
    checkpointing."""
    model = adapter_model("eager")
    model.train_adapter(setup)
    step = training_step(model)
    loss_eager, grads_eager = step(model)
    assert grads_eager and all(".adapters." in n or ".loras." in n or n.startswith("classifier")
                               or n.startswith("pre_classifier") for n in grads_eager)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss, grads = step(compiled)
        assert_close(loss, loss_eager, atol=1e-6, name="loss")
        assert grads.keys() == grads_eager.keys()
        for name in grads_eager:
            assert_close(grads[name], grads_eager[name], atol=1e-5, name=name)


def fusion_model():
    """adapter_model with a third bottleneck adapter "c" and two fusions of "a" and "c": "a,c"
    (dynamic) and "hot" (a temperature annealed per forward: a float the compiled graph updates)."""
    model = adapter_model("eager")
    model.add_adapter("c", SeqBnConfig(reduction_factor=2, non_linearity="gelu"))
    model.add_adapter_fusion(["a", "c"])
    model.add_adapter_fusion(["a", "c"], name="hot", config={**AdapterFusionConfig().to_dict(), "temperature": True})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters.c." in name or "adapter_fusion_layer" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def temperatures(model):
    return [m.T for m in model.modules() if isinstance(m, AdapterFusion)]


def test_fusion_split_batch_split_and_nested_parallel_compile_without_graph_breaks():
    """Padded: a Fuse in a Stack with a LoRA, a fusion whose temperature anneals per call (one
    recompile); packed: a Split, a BatchSplit of a bottleneck adapter and a Stack (rows and
    positions from cu_seqlens on the device), a Parallel in a Stack. Fullgraph, each call equal to
    eager mode (from the same temperatures), the temperatures annealed as in eager mode."""
    model = fusion_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    calls = [(padded_batch(), setup) for setup in (Stack("l", Fuse("a", "c")), Fuse("a", "c", name="hot"),
                                                   Fuse("a", "c", name="hot"))]
    calls += [(packed_batch(), setup) for setup in (Split("a", "c", splits=[2, 3]),
                                                    BatchSplit("a", Stack("l", "b"), batch_sizes=[1, 2]),
                                                    Stack("l", Parallel("a", "b")))]
    with torch.no_grad():
        for inputs, setup in calls:
            saved = temperatures(model)
            expected = model(**inputs, adapter_names=setup).logits
            after_eager = temperatures(model)
            for module, t in zip((m for m in model.modules() if isinstance(m, AdapterFusion)), saved):
                module.T = t
            got = compiled(**inputs, adapter_names=setup).logits
            assert_close(got, expected, atol=1e-5, name=repr(setup))
            assert temperatures(model) == pytest.approx(after_eager)
    assert temperatures(model)[-1] == pytest.approx(50.0 - 2 * 0.05)  # (two calls)


def test_compiled_adapter_fusion_training_step_matches_eager():
    """train_adapter_fusion of a Fuse inside a Stack: a fullgraph-compiled forward + backward gives
    eager mode's loss and gradients (the fusion layers' and the head's only)."""
    model = fusion_model()
    setup = Stack("b", Fuse("a", "c"))
    model.train_adapter_fusion(setup)
    step = training_step(model)
    loss_eager, grads_eager = step(model)
    assert grads_eager and all("adapter_fusion_layer.a,c." in n or "classifier" in n for n in grads_eager)
    loss, grads = step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert_close(loss, loss_eager, atol=1e-6, name="loss")
    assert grads.keys() == grads_eager.keys()
    for name in grads_eager:
        assert_close(grads[name], grads_eager[name], atol=1e-5, name=name)


def test_average_multi_task_and_parallel_of_blocks_compile_without_graph_breaks():
    """Padded: an Average of bottleneck adapters, a MultiTask (task_ids on the device: other ids
    of one shape give their own result, never a stale one); packed: an Average of LoRAs after a
    bottleneck adapter, a Parallel of an Average and a BatchSplit. Fullgraph, each call equal to
    eager mode, the calls' results all different."""
    model = adapter_model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    padded, packed = padded_batch(), packed_batch()
    multi_task = MultiTask("a", Stack("l", "b"))
    calls = [
        ("padded average", padded, Average("a", "b", weights=[0.8, 0.2]), {}),
        ("padded multi task 101", padded, multi_task, {"task_ids": torch.tensor([1, 0, 1])}),
        ("padded multi task 011", padded, multi_task, {"task_ids": torch.tensor([0, 1, 1])}),
        ("packed lora average", packed, Stack("a", Average("l", "b")), {}),
        ("packed parallel", packed, Parallel(Average("a", "b"), BatchSplit("l", "a", batch_sizes=[1, 2])), {}),
    ]
    with torch.no_grad():
        check_sequence(model, compiled, [
            (label, lambda fn, i=inputs, s=setup, e=extra: fn(**i, adapter_names=s, **e).logits)
            for label, inputs, setup, extra in calls])
