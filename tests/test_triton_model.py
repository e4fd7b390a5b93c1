"""The whole model on backend="triton" against backend="eager", and how the triton backend is
chosen (or refused).

At a tiny config (conftest.SMALL_CONFIG: every op, including the fused linear + activation, runs
on triton's kernels), with padding and a fully-masked row: outputs and the gradient of every
parameter. Dropout cannot match eager's draws (another generator), so in training the checks are
determinism per seed and gradient checkpointing. Without CUDA this runs under Triton's
interpreter; with CUDA on the GPU, half precision included.
"""

import os
import subprocess
import sys

import pytest
import torch

import distilbert_fast
from conftest import SMALL_CONFIG, assert_close
from distilbert_fast import ops

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
HAS_TRITON = "triton" in ops.registered_backends()
RUNS_HERE = HAS_TRITON and "triton" in ops.available_backends(torch.zeros(1, device=DEVICE))
needs_triton_here = pytest.mark.skipif(not RUNS_HERE, reason=f"the triton backend cannot run on {DEVICE} here")

MODEL_OPS = ("masked_attention", "residual_layernorm", "linear_activation")


def make_models(class_name="DistilBertModel", dtype=torch.float32, **config):
    """(eager_model, triton_model) with the same weights, in eval mode, on DEVICE."""
    kwargs = {**SMALL_CONFIG, **config}
    eager = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**kwargs, backend="eager"))
    tri = getattr(distilbert_fast, class_name)(distilbert_fast.DistilBertConfig(**kwargs, backend="triton"))
    tri.load_state_dict(eager.state_dict())
    return eager.to(DEVICE, dtype).eval(), tri.to(DEVICE, dtype).eval()


def make_inputs(batch=4, seq=9):
    """Row 1 right-padded, row 2 fully masked, row 3 left-padded."""
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2] = 0
    mask[3, :2] = 0
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))


def forward_backward(model, inputs, **kwargs):
    """(outputs[0], {name: grad}) for the loss sum(out * fixed random weights)."""
    model.zero_grad()
    out = model(**inputs, **kwargs)[0]
    gen = torch.Generator().manual_seed(99)
    (out.float() * torch.randn(out.shape, generator=gen).to(DEVICE)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(grads, expected, rel):
    assert grads.keys() == expected.keys()
    for name, g in grads.items():
        scale = expected[name].abs().max().item()
        assert_close(g.float(), expected[name].float(), atol=rel * scale + 1e-7, name=f"grad {name}")


@needs_triton_here
@pytest.mark.parametrize("class_name", ["DistilBertModel", "DistilBertForMaskedLM"])  # + the MLM head's op
def test_model_matches_eager(class_name):
    eager, tri = make_models(class_name)
    inputs = make_inputs()
    out_e, grads_e = forward_backward(eager, inputs)
    out_t, grads_t = forward_backward(tri, inputs)
    assert {op: ops.last_backend(op) for op in MODEL_OPS} == {op: "triton" for op in MODEL_OPS}
    assert torch.isfinite(out_t).all()
    assert_close(out_t, out_e, atol=2e-5, name="output")
    assert_grads_close(grads_t, grads_e, rel=1e-4)
    assert set(grads_t) == {n for n, p in tri.named_parameters() if p.requires_grad}


@needs_triton_here
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_model_within_eager_error(dtype):
    """In half precision, triton's error vs the float32 model is at most about twice eager's."""
    if "triton" not in ops.available_backends(torch.zeros(1, dtype=dtype, device=DEVICE)):
        pytest.skip(f"triton does not run {dtype} on {DEVICE}")
    reference, _ = make_models()
    eager, tri = make_models(dtype=dtype)
    inputs = make_inputs()
    with torch.no_grad():
        ref = reference(**inputs)[0].double()
        err_eager = (eager(**inputs)[0].double() - ref).abs().max().item()
        err_triton = (tri(**inputs)[0].double() - ref).abs().max().item()
    assert err_triton <= 2 * err_eager + 1e-3, (err_triton, err_eager)


@needs_triton_here
def test_output_attentions_runs_the_eager_attention_path():
    """need_weights=True: the weights come from eager's code on the triton backend, so they equal
    eager's, and the rest of the model still matches."""
    eager, tri = make_models()
    inputs = make_inputs()
    out_e = eager(**inputs, output_attentions=True)
    out_t = tri(**inputs, output_attentions=True)
    assert ops.last_backend("masked_attention") == "triton"
    for a_t, a_e in zip(out_t.attentions, out_e.attentions):
        assert_close(a_t, a_e, atol=1e-6, name="attention weights")
    assert_close(out_t.last_hidden_state, out_e.last_hidden_state, atol=2e-5, name="output")


def _train_run(seed, checkpointing=False):
    torch.manual_seed(0)
    # one layer, two heads: the interpreter's attention dropout is slow; every dropout site remains
    _, model = make_models(dropout=0.2, attention_dropout=0.3, n_layers=1, n_heads=2)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    torch.manual_seed(seed)
    return forward_backward(model, make_inputs())


@needs_triton_here
def test_training_dropout_is_deterministic_per_seed_and_checkpointing_safe():
    """Dropout seeds come from torch's generator: the same torch.manual_seed gives bit-identical
    outputs and gradients; gradient checkpointing (which restores the RNG state to recompute a
    block) reproduces them exactly; another seed drops other units."""
    out1, grads1 = _train_run(seed=3)
    out2, grads2 = _train_run(seed=3)
    out_ckpt, grads_ckpt = _train_run(seed=3, checkpointing=True)
    out3, _ = _train_run(seed=4)
    assert torch.equal(out1, out2)
    assert all(torch.equal(grads1[n], grads2[n]) for n in grads1)
    assert torch.equal(out1, out_ckpt)
    assert all(torch.equal(grads1[n], grads_ckpt[n]) for n in grads1)
    assert not torch.equal(out1, out3)


# -- choosing the backend ---------------------------------------------------------------------------
@needs_triton_here
def test_auto_never_picks_triton_on_cpu():
    """Under the interpreter triton can run on CPU (it is available and an explicit choice runs
    it), but auto, the default, never picks it there."""
    cpu = torch.zeros(2, 8)
    assert "triton" in ops.available_backends(cpu) or ON_CUDA
    assert ops.resolve_backend("bias_activation", cpu).name != "triton"
    eager, _ = make_models()
    model = eager.cpu().set_backend("auto")
    model(**{k: v.cpu() for k, v in make_inputs().items()})
    assert all(ops.last_backend(op) != "triton" for op in MODEL_OPS)
    if not ON_CUDA:
        ops.bias_activation(cpu, None, backend="triton")
        assert ops.last_backend("bias_activation") == "triton"


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_auto_picks_triton_on_cuda():
    assert ops.resolve_backend("bias_activation", torch.zeros(2, 8, device="cuda")).name == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_cpu_without_the_interpreter_is_a_clear_error():
    """In a fresh process without TRITON_INTERPRET, triton on a CPU tensor is an error saying why,
    not a fallback; setting the variable after the import is named as the mistake it is."""
    script = """
import os, torch, distilbert_fast
from distilbert_fast import ops
x = torch.randn(2, 8)
assert "triton" not in ops.available_backends(x)
model = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(
    vocab_size=30, dim=16, n_layers=1, n_heads=2, hidden_dim=24, backend="triton"))
for _ in range(2):
    try:
        model(torch.randint(0, 30, (1, 5)))
    except RuntimeError as e:
        print("ERROR:", e)
    os.environ["TRITON_INTERPRET"] = "1"
print("last:", ops.last_backend())
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len([line for line in lines if line.startswith("ERROR:")]) == 2, result.stdout
    assert "backend 'triton' cannot run" in lines[0]
    assert "the triton backend runs on CUDA; on CPU only under TRITON_INTERPRET=1" in lines[0]
    assert "TRITON_INTERPRET=1 was set after the triton kernels were loaded" in lines[1]
    assert "triton" not in lines[2]  # nothing ran on it


@needs_triton_here
def test_unsupported_dtypes_are_refused_by_name():
    for dtype in (torch.float64,) + (() if ON_CUDA else (torch.bfloat16,)):
        x = torch.randn(2, 8, dtype=dtype, device=DEVICE)
        with pytest.raises(RuntimeError, match=f"backend 'triton' cannot run bias_activation.*{dtype}"):
            ops.bias_activation(x, None, backend="triton")


@pytest.mark.skipif(not (ON_CUDA and torch.cuda.device_count() >= 2 and HAS_TRITON),
                    reason="needs two CUDA devices and the triton backend")
def test_model_on_a_second_gpu_runs_its_kernels_there():
    """Triton launches on the current device; the backend makes the tensors' device current, so a
    model on cuda:1 while cuda:0 is current computes there (forward and backward) and equals eager."""
    eager, tri = make_models()
    eager, tri = eager.to("cuda:1"), tri.to("cuda:1")
    inputs = {k: v.to("cuda:1") for k, v in make_inputs().items()}
    torch.cuda.set_device(0)

    def run(model):
        model.zero_grad()
        out = model(**inputs)[0]
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(99)).to(out.device)
        (out.float() * weights).sum().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

    out_e, grads_e = run(eager)
    out_t, grads_t = run(tri)
    torch.cuda.synchronize(1)
    assert ops.last_backend("masked_attention") == "triton" or ops.last_backend("varlen_attention") == "triton"
    assert out_t.device == torch.device("cuda:1")
    assert_close(out_t, out_e, atol=1e-4, name="output on cuda:1")
    assert_grads_close(grads_t, grads_e, 1e-3)
