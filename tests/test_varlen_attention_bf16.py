"""The cpu backend's bfloat16 inference varlen attention on the CPU's matrix units (AMX, driven by
torch's oneDNN brgemm): which batches take it, its output against a float64 reference by STYLE.md's
rule, its input checks, and a whole model's bf16 packed forward through it.

Where the CPU has no matrix units (or torch's oneDNN cannot drive them) the path-taking tests skip;
the test that such a machine keeps the float32-widening kernel runs everywhere.
"""

import copy

import pytest
import torch

import distilbert_fast
from conftest import SMALL_CONFIG, cu_seqlens_of
from distilbert_fast import _extension, ops
from distilbert_fast.ops import cpu_backend
from test_ops import assert_within_reference_error
from test_packed import ref_varlen_attention, varlen_args

pytestmark = pytest.mark.skipif(
    "cpu" not in ops.available_backends(torch.zeros(1, dtype=torch.bfloat16)),
    reason="the cpu backend does not run bfloat16 here",
)
needs_units = pytest.mark.skipif(not cpu_backend.matrix_units(),
                                 reason="no bf16 matrix units (AMX) that torch's oneDNN brgemm drives")


@pytest.fixture
def unit_calls(monkeypatch):
    """Counts calls of the matrix-unit kernel (a pass-through wrapper on the extension)."""
    calls = []
    kernel = _extension._C.cpu_varlen_attention_bf16_fwd
    monkeypatch.setattr(_extension._C, "cpu_varlen_attention_bf16_fwd",
                        lambda *a: calls.append(a[0].shape) or kernel(*a))
    return calls


def bf16_args(lengths, heads, head_dim, fused=True):
    return {name: value.to(torch.bfloat16) if name in "qkv" else value
            for name, value in varlen_args(lengths, heads, head_dim, fused=fused).items()}


def check_against_float64(args):
    with torch.no_grad():
        out = ops.varlen_attention(**args, backend="cpu")
        ref_d = ref_varlen_attention(**args)
        ref64 = ref_varlen_attention(**{n: v.double() if n in "qkv" else v for n, v in args.items()})
    assert_within_reference_error("out", out, ref_d, ref64, torch.bfloat16)
    assert out.shape == args["q"].shape and out.is_contiguous()


UNIT_CASES = {  # name: (lengths, heads, head_dim)
    "ragged": ([17, 200, 1, 64, 65, 33, 129, 96], 3, 64),
    "one_token_sequences": ([1, 1, 1], 2, 64),
    "single_sequence": ([77], 2, 64),
    "single_token": ([1], 1, 32),
    "max_seqlen_512": ([512, 3, 300], 2, 64),
    "empty_sequences": ([0, 40, 0, 0, 9, 0], 2, 32),
    "head_dim_16": ([31, 5, 70], 4, 16),
    "head_dim_24": ([50, 2, 19], 2, 24),
    "head_dim_128": ([90, 12], 2, 128),
}


@needs_units
@pytest.mark.parametrize("fused", [True, False], ids=["fused_qkv", "separate"])
@pytest.mark.parametrize("case", list(UNIT_CASES))
def test_ragged_bf16_inference_takes_matrix_units_and_matches_float64(case, fused, unit_calls):
    lengths, heads, head_dim = UNIT_CASES[case]
    check_against_float64(bf16_args(lengths, heads, head_dim, fused))
    assert len(unit_calls) == 1


@needs_units
def test_unit_kernel_scale_and_large_scores():
    """A non-default scale, and scores large enough that the softmax's max shift matters."""
    args = bf16_args([45, 130, 7], 2, 64)
    args["q"] = args["q"] * 6
    args["scale"] = 0.4
    check_against_float64(args)


@needs_units
@pytest.mark.parametrize("why", ["grad", "dropout", "head_mask", "float32", "switched_off", "odd_head_dim"])
def test_other_batches_keep_the_widening_kernel(why, unit_calls, monkeypatch):
    """Training (a gradient wanted), dropout, head_mask, float32, the switch off and an odd
    head_dim never take the matrix units; the output is then our float32-widening kernel's."""
    args = bf16_args([9, 70, 2], 2, 17 if why == "odd_head_dim" else 32)
    if why == "grad":
        args["q"].requires_grad_(True)
    elif why == "dropout":
        args["dropout_p"] = 0.1
    elif why == "head_mask":
        args["head_mask"] = torch.rand(2) + 0.5
    elif why == "float32":
        args.update({n: args[n].float() for n in "qkv"})
    elif why == "switched_off":
        monkeypatch.setattr(cpu_backend, "MATRIX_UNITS_ATTENTION", False)
    out = ops.varlen_attention(**args, backend="cpu")
    assert not unit_calls
    if why == "grad":
        out.float().sum().backward()  # the backward runs on the widening kernel's saved state
        assert args["q"].grad is not None and bool(args["q"].grad.isfinite().all())


def test_without_matrix_units_the_widening_kernel_runs(monkeypatch, unit_calls):
    """Where the CPU lacks the units (AVX512-BF16 alone, as AMD's; or oneDNN switched off) bf16
    inference runs the float32-widening kernel; simulated by the extension reporting none."""
    monkeypatch.setattr(_extension._C, "cpu_bf16_matrix_units", lambda: False)
    args = bf16_args([30, 4], 2, 32)
    check_against_float64(args)
    assert not unit_calls


@needs_units
def test_equal_length_long_batches_keep_the_flash_kernel(unit_calls, monkeypatch):
    """A batch the flash CPU kernel suits (one run of equal long sequences) still takes it."""
    if not cpu_backend.FLASH_ATTENTION:
        pytest.skip("this torch has no flash attention CPU kernel")
    flash_calls = []
    flash = cpu_backend._FLASH_CPU
    monkeypatch.setattr(cpu_backend, "_FLASH_CPU", lambda *a, **kw: flash_calls.append(1) or flash(*a, **kw))
    check_against_float64(bf16_args([cpu_backend.FLASH_MIN_SEQLEN] * 2, 2, 64))
    assert flash_calls == [1] and not unit_calls


@needs_units
@pytest.mark.parametrize("change,error,match", [
    (lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()), TypeError,
     "q must have dtype bfloat16"),
    (lambda a: a.update(q=a["q"][..., :7], k=a["k"][..., :7], v=a["v"][..., :7]), ValueError,
     "q must have an even head_dim"),
    (lambda a: a.update(cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32)), ValueError,
     r"cu_seqlens\[-1\] must equal"),
    (lambda a: a.update(max_seqlen=3), ValueError, "max_seqlen must be at least the longest"),
    (lambda a: a.update(k=a["k"][:-1]), ValueError, "k must have shape"),
])
def test_unit_kernel_checks_name_the_argument(change, error, match):
    args = bf16_args([5, 4], 2, 8)
    change(args)
    with pytest.raises(error, match=match):
        _extension._C.cpu_varlen_attention_bf16_fwd(args["q"], args["k"], args["v"], args["cu_seqlens"],
                                                    args["max_seqlen"], 0.125)


@needs_units
def test_bf16_packed_model_runs_the_units_and_stays_as_close_to_float64(unit_calls, monkeypatch):
    """A whole model's bf16 packed forward on a ragged batch: one unit call per layer, and its
    error against the float64 model at most ~2x that of the same forward on the widening kernel."""
    config = distilbert_fast.DistilBertConfig(**{**SMALL_CONFIG, "dim": 128, "n_heads": 2, "hidden_dim": 256})
    model = distilbert_fast.DistilBertModel(config).eval()
    lengths = [3, 1, 40, 17, 64]
    ids = torch.randint(0, config.vocab_size, (sum(lengths),))
    packed = dict(input_ids=ids, cu_seqlens=cu_seqlens_of(lengths), max_seqlen=max(lengths))
    # one copy per dtype: model.to(dtype) after a forward keeps a stale fused QKV cache (the
    # conversion swaps param.data without a version bump; reported to the lead, modeling.py's)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(**packed).last_hidden_state
        units = bf16(**packed).last_hidden_state
        assert len(unit_calls) == config.n_layers
        monkeypatch.setattr(cpu_backend, "MATRIX_UNITS_ATTENTION", False)
        widening = bf16(**packed).last_hidden_state
    assert len(unit_calls) == config.n_layers
    err_units, err_widening = ((out.double() - ref64).abs().max().item() for out in (units, widening))
    assert err_units <= 2 * err_widening + 1e-2, (err_units, err_widening)
