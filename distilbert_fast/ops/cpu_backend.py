"""The ``cpu`` backend: the three hot ops as fused C++ kernels (``csrc/cpu``), bound through the
extension ``distilbert_fast._C``.

- residual + LayerNorm and bias + activation: one pass over memory per row, vectorised
  (at::vec), parallel over rows (at::parallel_for). Their forwards save only the inputs (and
  LayerNorm's per-row mean and rstd); the backwards recompute the rest.
- linear + bias + activation (the FFN's first matmul): the matmul, then the bias and the
  activation; in inference they are applied in place on the matmul's fresh output.
- outputs: every kernel's output, and in inference every projection's, is a ``cpu_empty`` buffer:
  from 1 MiB a block of a process-wide cache on transparent huge pages that a dead output's
  memory returns to (csrc/cpu/buffers.cpp; ``empty_cache`` frees its idle blocks). Fresh memory
  costs page faults on every call otherwise: 39k of them and about 8% of a 4352-token forward on
  a VM after another model ran.
- linear (the other projections) and the matmul of linear + activation: in float32, on CPUs
  with AVX-512, oneDNN's matmul (torch's own ``mkldnn._linear_pointwise``, the GEMM
  torch.compile uses on CPU), which with the bias folded in runs 10-20% faster than the MKL
  sgemm behind torch's F.linear on the AVX-512 Xeon we measured, and about twice as fast on an
  AVX-512 AMD EPYC; on an AVX2-only AMD EPYC it ran 10-15% slower than MKL, so there (and on any
  CPU without AVX-512) torch's GEMM runs (``ONEDNN_LINEAR``). Forward only: the backward runs
  torch's matmuls, as F.linear's does. Training and inference take the same forward, so their
  outputs agree bit for bit.
- masked attention: blocked over keys with an online softmax, never materialising the scores;
  parallel over (batch, head). Varlen attention runs the same kernels with one window per packed
  sequence (parallel over (sequence, head)). ``need_weights=True`` asks for the materialised
  weights, so that call runs the eager backend's code (``Backend.attention_weights``, one rule for
  all backends).
- varlen attention in bfloat16 inference (no gradient wanted, no dropout, no head_mask) on a
  batch of at most ``FLASH_MAX_RUNS`` runs of equal-length sequences of at least
  ``FLASH_MIN_SEQLEN`` tokens (long texts truncated to the model's limit make such batches):
  PyTorch's flash attention CPU kernel (the one ``F.scaled_dot_product_attention`` runs), one call
  per run on views of the packed q, k, v (no mask, no padding). Its bf16 GEMMs run on the CPU's
  bf16 units, which our kernel (bf16 widened to float32) does not use: at 8 x 512 tokens, 2
  threads, it took 40-48 ms against our 93-132 ms on the AVX512-BF16/AMX Xeon we measured. In
  float32 the two were level (126 ms against 130 ms), so float32 keeps our kernel.
- varlen attention in bfloat16 inference on every other batch (ragged ones: dozens of lengths),
  where the CPU has bf16 matrix units (AMX) that torch's oneDNN brgemm micro-kernel drives: our
  kernel's bf16 variant (``cpu_varlen_attention_bf16_fwd``), q k^T and P v as bf16 brgemm calls
  with the softmax in float32 between them, one task per (sequence, head), so a ragged batch is
  one parallel region as before. Measured on the AMX Xeon (bench/bench_varlen_attention.py), 32
  sequences of lengths uniform in [16, 256]: 19 ms against the float32 kernel's 43 (1 thread),
  11 against 22 (2 threads); the engine's bf16 embed of medium texts 1.22x. PyTorch's flash kernel
  on a padded copy with a key mask (its only way to take a ragged batch) took 59 ms: the padding
  costs more than its bf16 GEMMs gain. On equal-length batches the flash path above stays first
  (8 x 512: 39 ms against this kernel's 42). CPUs without AMX (AVX512-BF16 alone, as AMD's) keep
  the float32 kernel. See ``MATRIX_UNITS_ATTENTION``.

Dtypes: float32, bfloat16 (float32 accumulation and statistics) and float64 (float64 throughout,
for gradcheck). Half (float16) is left to the eager backend: ``unsupported_reason`` says so.

Dropout: the keep-masks are drawn here with torch (``bernoulli_`` on a bool tensor) and passed
to the kernels, so a run is reproducible under ``torch.manual_seed``; the masks are not eager's
random stream (eager uses ``native_dropout``), so with dropout the two backends agree in
distribution, not elementwise.

Mixed dtypes in residual + LayerNorm (a residual of another dtype, as under autocast) promote
x + residual like eager does: x is cast to the promoted dtype first. Weights and biases are passed
to the kernels in the accumulation dtype; their gradients come back in it and the op's Function
casts them to the parameters' dtype.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .backends import Backend, linear_grads, register_backend, residual_rows
from .functional import _first_order_only

_DTYPES = (torch.float32, torch.bfloat16, torch.float64)

# /proc/cpuinfo flags each vector ISA of the build needs at run time (see setup.py).
_ISA_FLAGS = {
    "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
    "default": (),
}


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def _onednn_is_faster() -> bool:
    """Whether oneDNN's float32 GEMM beats torch's (MKL's sgemm) on this CPU: where torch runs
    AVX-512 kernels. Measured at DistilBERT's shapes, 2 threads: on an AVX-512 Xeon oneDNN took
    10-20% less time; on an AVX-512 AMD EPYC about half (MKL's AVX-512 code does not run on AMD
    CPUs); on an AVX2-only AMD EPYC (Zen 3) 10-15% more."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


# Whether float32 GEMMs (forward) run on oneDNN (see the module docstring) rather than torch's
# GEMM. ONEDNN_AVAILABLE: whether they can; tests and benchmarks may set ONEDNN_LINEAR either way
# to compare the two.
ONEDNN_AVAILABLE = _has_onednn_linear()
ONEDNN_LINEAR = ONEDNN_AVAILABLE and _onednn_is_faster()


def _linear_operands_suit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x @ weight^T + bias may run on a GEMM call of our own rather than F.linear: no
    autocast (F.linear would cast), x of 2 or more dims (oneDNN mis-handles a 1-d x), CPU operands
    of one dtype and matching shapes (F.linear says clearly what is wrong with others; the GEMMs
    do not)."""
    if torch.is_autocast_enabled("cpu") or x.dim() < 2 or weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        return False
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return all(t.dtype == x.dtype and t.device.type == "cpu" for t in tensors)


def _onednn_suits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether x @ weight^T + bias may run on oneDNN: where it is the faster GEMM, on operands
    that suit our own GEMM calls (``_linear_operands_suit``), float32 and contiguous. Under
    torch.compile the backend's GEMMs run inside opaque custom ops (``custom.linear``), so
    Inductor never has to lower this op."""
    if not ONEDNN_LINEAR or not _linear_operands_suit(x, weight, bias):
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return x.dtype == torch.float32 and all(t.is_contiguous() for t in tensors)


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight^T + bias by oneDNN, outside autograd (the op has no backward of its own)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDnnLinearFunction(torch.autograd.Function):
    """x @ weight^T + bias: oneDNN's matmul forward, F.linear's backward (torch's matmuls)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        _first_order_only("linear")
        x, weight = ctx.saved_tensors
        dx, dweight = linear_grads(x, weight, grad_out, *ctx.needs_input_grad[:2])
        dbias = None
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return dx, dweight, dbias


# PyTorch's flash attention CPU kernel (torch >= 2.2); None where absent. Tests and benchmarks may
# set FLASH_ATTENTION False to compare with our kernel.
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
FLASH_ATTENTION = _FLASH_CPU is not None
# Which packed batches take it: at most FLASH_MAX_RUNS runs of equal-length sequences (one call,
# one parallel region, each), every one at least FLASH_MIN_SEQLEN tokens long. Each call pays for
# waking the threads, which on a loaded machine costs milliseconds: a ragged batch of 20-40
# lengths ran 2-10x slower on it than in our one call, one batch of 8 x 512 2.3-2.9x faster.
FLASH_MAX_RUNS = 2
FLASH_MIN_SEQLEN = 128


# Whether bf16 inference varlen attention may run our kernel's matrix-unit variant where the CPU
# has them (see the module docstring); tests and benchmarks may set it False.
MATRIX_UNITS_ATTENTION = True


def matrix_units() -> bool:
    """Whether this CPU and torch build run bf16 brgemm on matrix units (AMX), as our kernel's
    bf16 inference variant needs; False where the cpu backend is not built."""
    from .. import _extension

    ext = _extension._C
    return hasattr(ext, "cpu_bf16_matrix_units") and bool(ext.cpu_bf16_matrix_units())


def empty_cache() -> int:
    """Frees the idle blocks of the cpu backend's output cache (csrc/cpu/buffers.cpp: outputs of
    1 MiB or more keep their memory for the next call's outputs, up to an eighth of the machine's
    memory and at most 1 GiB), as ``torch.cuda.empty_cache`` does for CUDA's; returns the bytes
    freed (0 where the cpu backend is not built)."""
    from .. import _extension

    ext = _extension._C
    return int(ext.cpu_release_cached_outputs()) if hasattr(ext, "cpu_release_cached_outputs") else 0


def _bf16_inference(q, k, v, head_mask, dropout_p) -> bool:
    """Whether packed attention is bfloat16 inference: no input wants a gradient (so no backward
    needs our saved lse and float32 output), no dropout, no head_mask."""
    if q.dtype != torch.bfloat16 or dropout_p != 0.0 or head_mask is not None:
        return False
    return not (q.requires_grad or k.requires_grad or v.requires_grad)


def _flash_runs(q, k, v, cu_seqlens, head_mask, dropout_p) -> list[tuple[int, int, int]] | None:
    """The runs (first token, sequences, length) the flash CPU kernel would take packed attention
    in, or None where it does not suit (see the module docstring): bfloat16 inference, a few runs
    of long sequences (zero-length sequences are left out)."""
    if not FLASH_ATTENTION or not _bf16_inference(q, k, v, head_mask, dropout_p):
        return None
    cu = cu_seqlens.tolist()
    runs = []
    for b in range(len(cu) - 1):
        length = cu[b + 1] - cu[b]
        if runs and runs[-1][2] == length:
            runs[-1][1] += 1
        elif length > 0:
            if length < FLASH_MIN_SEQLEN or len(runs) == FLASH_MAX_RUNS:
                return None
            runs.append([cu[b], 1, length])
    return [tuple(r) for r in runs]


def _flash_varlen_attention(q, k, v, runs, scale) -> torch.Tensor:
    """Packed attention, (total, heads, head_dim), by the flash CPU kernel: one call per run of
    equal-length sequences, on (sequences, heads, length, head_dim) views of q, k, v."""
    total, heads, head_dim = q.shape
    out = q.new_empty((total, heads, head_dim))
    for first, n, length in runs:
        rows = slice(first, first + n * length)
        o, _ = _FLASH_CPU(*(t[rows].view(n, length, heads, head_dim).transpose(1, 2) for t in (q, k, v)),
                          scale=scale)
        out[rows].view(n, length, heads, head_dim).copy_(o.transpose(1, 2))
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` as a contiguous tensor of the accumulation dtype of ``dtype`` (None stays None)."""
    if t is None:
        return None
    return t.to(_acc_dtype(dtype)).contiguous()


def _keep_mask(shape, p: float, device) -> torch.Tensor | None:
    """A bool keep-mask (True with probability 1 - p), from torch's generator; None if p == 0."""
    if p == 0.0:
        return None
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


class AttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out_acc: torch.Tensor  # the output in the accumulation dtype, unrounded
    lse: torch.Tensor  # (batch, heads, seq) log-sum-exp of each score row
    mask: torch.Tensor | None
    head_mask: torch.Tensor | None  # in the accumulation dtype
    keep: torch.Tensor | None  # dropout keep-mask


class VarlenAttentionSaved(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out_acc: torch.Tensor  # the output in the accumulation dtype, unrounded
    lse: torch.Tensor  # (batch, heads, max_seqlen) log-sum-exp of each score row
    cu_seqlens: torch.Tensor
    head_mask: torch.Tensor | None  # in the accumulation dtype
    keep: torch.Tensor | None  # dropout keep-mask, (batch, heads, max_seqlen, max_seqlen)


class BiasActivationSaved(NamedTuple):
    x2: torch.Tensor  # x as contiguous (rows, features)
    bias: torch.Tensor | None  # in the accumulation dtype


class LayerNormSaved(NamedTuple):
    x2: torch.Tensor  # x as contiguous (rows, dim), in the promoted dtype
    residual: torch.Tensor | None  # (R, dim): row r of x pairs with row r % R
    weight: torch.Tensor
    x_bias: torch.Tensor | None
    keep: torch.Tensor | None
    mean: torch.Tensor
    rstd: torch.Tensor


class CpuBackend(Backend):
    name = "cpu"
    priority = 10

    def __init__(self, ext):
        self._C = ext
        self.isa = ext.build_info()["cpu_isa"]
        # read once here, not lazily: unsupported_reason runs under torch.compile, and dynamo
        # cannot trace a cached_property's lock
        self._isa_missing = self._missing_isa_flags()

    def _missing_isa_flags(self) -> list[str]:
        """CPU flags the build's vector ISA needs that this machine lacks (empty if unknown)."""
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
        except OSError:
            flags = None
        if flags is None:
            return []
        return [flag for flag in _ISA_FLAGS.get(self.isa, ()) if flag not in flags]

    def unsupported_reason(self, tensor):
        if tensor.device.type != "cpu":
            return f"the cpu backend runs on CPU tensors only, got a tensor on {tensor.device}"
        if tensor.dtype not in _DTYPES:
            return f"the cpu backend supports float32, bfloat16 and float64, got {tensor.dtype}"
        if self._isa_missing:
            return (
                f"distilbert_fast._C's CPU kernels were built for {self.isa} but this CPU lacks "
                f"{self._isa_missing}; rebuild with DISTILBERT_FAST_CPU_ISA=avx2 or default"
            )
        return None

    # -- masked attention --------------------------------------------------------------------
    def attention_forward(self, q, k, v, key_padding_mask, head_mask, dropout_p, scale, need_weights):
        batch, heads, seq, _ = q.shape
        keep = _keep_mask((batch, heads, seq, seq), dropout_p, q.device)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        mask = None if key_padding_mask is None else key_padding_mask.contiguous()
        hm = _acc(head_mask, q.dtype)
        out_acc, lse = self._C.cpu_masked_attention_fwd(q, k, v, mask, hm, keep, dropout_p, scale)
        saved = AttentionSaved(q, k, v, out_acc, lse, mask, hm, keep)
        return (out_acc.to(q.dtype), None), saved, (dropout_p, scale)

    def attention_backward(self, saved_tensors, saved_state, grad_out, grad_weights, needs_grad):
        s = saved_tensors
        dropout_p, scale = saved_state
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv, dhead_mask = self._C.cpu_masked_attention_bwd(
            grad_out, s.q, s.k, s.v, s.out_acc, s.lse, s.mask, s.head_mask, s.keep, dropout_p, scale,
            bool(needs_grad[4]),
        )
        return dq, dk, dv, dhead_mask

    # -- varlen attention --------------------------------------------------------------------
    def matrix_units_suit(self, q, k, v, head_mask, dropout_p) -> bool:
        """Whether packed attention runs our bf16 kernel on the CPU's matrix units: bf16 inference,
        an even head_dim (the brgemm operands hold bf16 pairs), and units torch's oneDNN drives
        (asked per call: ``torch.backends.mkldnn`` can be switched off at run time)."""
        return (MATRIX_UNITS_ATTENTION and q.shape[-1] % 2 == 0 and _bf16_inference(q, k, v, head_mask, dropout_p)
                and self._C.cpu_bf16_matrix_units())

    # The same C++ kernels as masked attention, with one window per packed sequence. q, k, v
    # are taken as they come (strided thirds of the fused QKV projection: no copy).
    def varlen_attention_forward(self, q, k, v, cu_seqlens, max_seqlen, head_mask, dropout_p, scale):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        runs = _flash_runs(q, k, v, cu_seqlens, head_mask, dropout_p)
        if runs is not None:
            # inference: nothing is saved (no backward follows)
            return _flash_varlen_attention(q, k, v, runs, scale), (), None
        if self.matrix_units_suit(q, k, v, head_mask, dropout_p):
            out = self._C.cpu_varlen_attention_bf16_fwd(q, k, v, cu_seqlens.contiguous(), max_seqlen, scale)
            return out, (), None
        batch, heads = cu_seqlens.shape[0] - 1, q.shape[1]
        keep = _keep_mask((batch, heads, max_seqlen, max_seqlen), dropout_p, q.device)
        cu = cu_seqlens.contiguous()
        hm = _acc(head_mask, q.dtype)
        out_acc, lse = self._C.cpu_varlen_attention_fwd(q, k, v, cu, max_seqlen, hm, keep, dropout_p, scale)
        saved = VarlenAttentionSaved(q, k, v, out_acc, lse, cu, hm, keep)
        return out_acc.to(q.dtype), saved, (max_seqlen, dropout_p, scale)

    def varlen_attention_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        max_seqlen, dropout_p, scale = saved_state
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv, dhead_mask = self._C.cpu_varlen_attention_bwd(
            grad_out, s.q, s.k, s.v, s.out_acc, s.lse, s.cu_seqlens, max_seqlen, s.head_mask, s.keep,
            dropout_p, scale, bool(needs_grad[5]),
        )
        return dq, dk, dv, dhead_mask

    # -- bias + activation -------------------------------------------------------------------
    def bias_activation_forward(self, x, bias, activation):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        b = _acc(bias, x.dtype)
        y = self._C.cpu_bias_activation_fwd(x2, b, activation)
        return y.view(x.shape), BiasActivationSaved(x2, b), (activation, x.shape)

    def bias_activation_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        activation, shape = saved_state
        dy = grad_out.reshape(s.x2.shape).contiguous()
        dx, dbias = self._C.cpu_bias_activation_bwd(dy, s.x2, s.bias, activation, bool(needs_grad[1]))
        return dx.view(shape), dbias

    # -- linear, linear + bias + activation -------------------------------------------------
    def linear(self, x, weight, bias):
        tensors = (x, weight) if bias is None else (x, weight, bias)
        if not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
            return self._linear_without_grad(x, weight, bias)
        if _onednn_suits(x, weight, bias):
            return OneDnnLinearFunction.apply(x, weight, bias)
        return F.linear(x, weight, bias)

    def _linear_without_grad(self, x, weight, bias):
        """x @ weight^T (+ bias) where no backward follows: oneDNN where it is the faster GEMM,
        else torch's GEMM (the addmm F.linear runs) written into ``cpu_empty``, from 1 MiB a block
        of the output cache (csrc/cpu/buffers.cpp), already faulted in (out= is not
        differentiable)."""
        if _onednn_suits(x, weight, bias):
            return _onednn_linear(x, weight, bias)
        if not _linear_operands_suit(x, weight, bias):
            return F.linear(x, weight, bias)
        h = self._C.cpu_empty([*x.shape[:-1], weight.shape[0]], x)
        x2, h2 = x.reshape(-1, x.shape[-1]), h.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(x2, weight.t(), out=h2)
        else:
            torch.addmm(bias, x2, weight.t(), out=h2)
        return h

    def linear_activation_forward(self, x, weight, bias, activation, needs_grad):
        if needs_grad:
            # the backward needs the pre-activation kept beside the output: the default path
            return super().linear_activation_forward(x, weight, bias, activation, needs_grad)
        # No backward follows (inference): the bias and activation are applied in place on the
        # matmul's fresh output, instead of filling a second buffer of (tokens, 4 * dim).
        h = self._linear_without_grad(x, weight, None)
        self._C.cpu_bias_activation_fwd(h.view(-1, weight.shape[0]), _acc(bias, x.dtype), activation, True)
        return h, (), None

    # -- residual + LayerNorm ----------------------------------------------------------------
    def residual_layernorm_forward(self, x, residual, weight, bias, eps, x_bias, dropout_p):
        shape, dim = x.shape, x.shape[-1]
        dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
        x2 = x.to(dtype).reshape(-1, dim).contiguous()
        res = None if residual is None else residual_rows(residual, dim).to(dtype)
        w, b, xb = _acc(weight, dtype), _acc(bias, dtype), _acc(x_bias, dtype)
        keep = _keep_mask(x2.shape, dropout_p, x.device)
        y, mean, rstd = self._C.cpu_residual_layernorm_fwd(x2, res, w, b, eps, xb, keep, dropout_p)
        saved = LayerNormSaved(x2, res, w, xb, keep, mean, rstd)
        return y.view(shape), saved, (dropout_p, shape)

    def residual_layernorm_backward(self, saved_tensors, saved_state, grad_out, needs_grad):
        s = saved_tensors
        dropout_p, shape = saved_state
        dy = grad_out.to(s.x2.dtype).reshape(s.x2.shape).contiguous()
        needs = [bool(needs_grad[i]) for i in (0, 1, 2, 3, 5)]
        dx, dres, dweight, dbias, dx_bias = self._C.cpu_residual_layernorm_bwd(
            dy, s.x2, s.residual, s.weight, s.x_bias, s.keep, dropout_p, s.mean, s.rstd, needs
        )
        dx = None if dx is None else dx.view(shape)
        dres = None if dres is None else dres.view(shape)
        return dx, dres, dweight, dbias, dx_bias


def register(ext) -> bool:
    """Registers the cpu backend if the extension ``ext`` has its kernels; returns whether it did."""
    if not hasattr(ext, "cpu_residual_layernorm_fwd"):
        return False
    register_backend(CpuBackend(ext))
    return True
