"""Per-op benchmark: each hot op of distilbert_fast.ops on every backend, beside plain torch.

    python bench/bench_ops.py                       # default shapes and dtypes for the device
    python bench/bench_ops.py --ops residual_layernorm,bias_activation --dtypes float32
    python bench/bench_ops.py --quick               # smoke test of every provider, nothing recorded

Ops: residual_layernorm, bias_activation, masked_attention, varlen_attention (packed, q/k/v strided
thirds of one fused projection, sequences of equal length; on CPU only by default), and linear_activation where
``distilbert_fast.ops`` has it. Modes: ``fwd`` (under torch.no_grad, as in inference) and
``fwd+bwd`` (forward, then backward of a fixed upstream gradient into every input).

Providers, all timed in the same process and interleaved (round-robin rounds over the providers,
so a change in machine load hits all of them alike):

    ours[NAME]   distilbert_fast.ops on backend NAME, for each backend available on the device
    torch        the op written in plain torch (the composite the fused kernels replace)
    compile      torch.compile of that composite (skipped, with the reason printed, where it fails)
    sdpa         torch.nn.functional.scaled_dot_product_attention (masked_attention; varlen_attention,
                 whose sequences are all of one length: one call on (batch, heads, seq, head_dim) views)
    ours[cpu,own-kernel]  varlen_attention on the cpu backend's own C++ kernel only (its bf16
                 inference otherwise takes PyTorch's flash CPU kernel where a batch suits it)

For each case it prints median ms with p20/p80, achieved GB/s (the op's minimal traffic: each
input read once, each output written once) or TFLOP/s (attention, linear), the speedup against
``torch``, and the max abs difference of the forward output to ``torch``. On CUDA it first measures
the card's copy bandwidth (a large device-to-device copy) and prints GB/s against it. Each run
appends one row per case and provider to bench/results/ops.csv (``--output`` to change).
"""

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also under python -m
from _common import RESULTS_DIR, append_rows, environment, format_table, percentile  # noqa: E402

from distilbert_fast import ops  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPS = ("residual_layernorm", "bias_activation", "masked_attention", "varlen_attention", "linear_activation")

DEFAULTS = {
    # CPU: the target shapes (LN 4096x768, bias+GELU 4096x3072, attention 8x12x128x64 with
    # padding) plus a smaller one each; about 3 minutes on a 2-core machine.
    "cpu": dict(
        dtypes="float32", rounds=5, max_time=1.0,
        residual_layernorm="1024x768,4096x768", bias_activation="1024x3072,4096x3072",
        masked_attention="8x12x128x64", varlen_attention="8x12x512x64", linear_activation="1024x768x3072",
    ),
    # CUDA: tokens 1k-64k, hidden 768 and 3072, seq 128 and 512; about 3 minutes on an H100.
    "cuda": dict(
        dtypes="float16,bfloat16", rounds=5, max_time=0.25,
        residual_layernorm="1024x768,8192x768,65536x768",
        bias_activation="1024x3072,8192x3072,65536x3072",
        masked_attention="32x12x128x64,8x12x512x64,32x12x512x64", varlen_attention="none",
        linear_activation="8192x768x3072,65536x768x3072",
    ),
}
QUICK = dict(
    dtypes=None, rounds=2, max_time=0.05,
    residual_layernorm="64x96", bias_activation="64x96", masked_attention="2x2x16x8", varlen_attention="2x2x16x8",
    linear_activation="64x32x48",
)


# -- the ops as cases: inputs, the composite in plain torch, cost model -----------------------------


@dataclass
class Case:
    op: str
    shape: tuple
    dtype: torch.dtype
    inputs: dict  # name -> tensor (float ones get requires_grad in fwd+bwd)
    ours: Callable  # (backend, **inputs) -> output tensor
    torch_fn: Callable  # (**inputs) -> output tensor
    bytes_fwd: int  # minimal traffic of the forward
    bytes_bwd: int  # ... and of the backward alone
    flops_fwd: float = 0.0  # for compute-bound ops (attention, linear); 0 elsewhere
    note: str = ""
    extra: dict = field(default_factory=dict)  # more providers: name -> (**inputs) -> output


def _torch_residual_layernorm(x, residual, weight, bias, x_bias):
    return F.layer_norm(x + x_bias + residual, (x.shape[-1],), weight, bias, 1e-12)


def _torch_bias_gelu(x, bias):
    return F.gelu(x + bias)


def _torch_masked_attention(q, k, v, key_padding_mask):
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~key_padding_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.matmul(scores.softmax(-1), v)


def _sdpa(q, k, v, key_padding_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :])


def _heads_first(t, batch):
    """(batch * seq, heads, head_dim) packed rows of equal-length sequences as (batch, heads, seq,
    head_dim) views."""
    return t.view(batch, -1, *t.shape[1:]).transpose(1, 2)


def _torch_varlen_attention(q, k, v, cu_seqlens):
    batch = cu_seqlens.shape[0] - 1
    out = _torch_masked_attention(*(_heads_first(t, batch) for t in (q, k, v)),
                                  torch.ones(batch, q.shape[0] // batch, dtype=torch.bool, device=q.device))
    return out.transpose(1, 2).reshape(q.shape)


def _sdpa_varlen(q, k, v, cu_seqlens):
    batch = cu_seqlens.shape[0] - 1
    out = F.scaled_dot_product_attention(*(_heads_first(t, batch) for t in (q, k, v)))
    return out.transpose(1, 2).reshape(q.shape)


def _own_kernel_varlen(q, k, v, cu_seqlens):
    from distilbert_fast.ops import cpu_backend

    flash, cpu_backend.FLASH_ATTENTION = cpu_backend.FLASH_ATTENTION, False
    try:
        return ops.varlen_attention(q, k, v, cu_seqlens, q.shape[0] // (cu_seqlens.shape[0] - 1), backend="cpu")
    finally:
        cpu_backend.FLASH_ATTENTION = flash


def _torch_linear_gelu(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias))


def make_case(op: str, shape: tuple, dtype: torch.dtype, device: torch.device, gen) -> Case:
    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)

    size = torch.tensor([], dtype=dtype).element_size()
    if op == "residual_layernorm":
        tokens, dim = shape
        inputs = dict(x=randn(tokens, dim), residual=randn(tokens, dim), weight=1 + randn(dim, scale=0.1),
                      bias=randn(dim), x_bias=randn(dim))
        n = tokens * dim * size
        return Case(
            op, shape, dtype, inputs,
            ours=lambda backend, x, residual, weight, bias, x_bias: ops.residual_layernorm(
                x, residual, weight, bias, 1e-12, x_bias, backend=backend),
            torch_fn=_torch_residual_layernorm,
            bytes_fwd=3 * n,  # read x, residual; write y
            bytes_bwd=4 * n,  # read dy and the inputs again (or a saved sum); write dx (= dresidual)
        )
    if op == "bias_activation":
        tokens, dim = shape
        inputs = dict(x=randn(tokens, dim), bias=randn(dim))
        n = tokens * dim * size
        return Case(
            op, shape, dtype, inputs,
            ours=lambda backend, x, bias: ops.bias_activation(x, bias, "gelu", backend=backend),
            torch_fn=_torch_bias_gelu,
            bytes_fwd=2 * n,  # read x; write y
            bytes_bwd=3 * n,  # read dy, x; write dx
            note="gelu",
        )
    if op == "masked_attention":
        batch, heads, seq, head_dim = shape
        # Padding: sequence lengths spread evenly from half to all of seq.
        lengths = torch.linspace(seq // 2, seq, batch).round().long()
        mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(device)
        inputs = dict(q=randn(*shape), k=randn(*shape), v=randn(*shape), key_padding_mask=mask)
        return Case(
            op, shape, dtype, inputs,
            ours=lambda backend, q, k, v, key_padding_mask: ops.masked_attention(
                q, k, v, key_padding_mask, backend=backend)[0],
            torch_fn=_torch_masked_attention,
            bytes_fwd=4 * batch * heads * seq * head_dim * size,
            bytes_bwd=8 * batch * heads * seq * head_dim * size,
            flops_fwd=4.0 * batch * heads * seq * seq * head_dim,  # q k^T and P v, padded keys included
            note=f"lengths {seq // 2}..{seq}",
            extra={"sdpa": _sdpa},
        )
    if op == "varlen_attention":
        batch, heads, seq, head_dim = shape
        # q, k, v: thirds of one fused (tokens, 3 * dim) projection, as the model gives them
        q, k, v = randn(batch * seq, 3, heads, head_dim).unbind(1)
        cu_seqlens = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
        extra = {"sdpa": _sdpa_varlen}
        if device.type == "cpu" and "cpu" in ops.available_backends(q):
            extra["ours[cpu,own-kernel]"] = _own_kernel_varlen
        return Case(
            op, shape, dtype, dict(q=q, k=k, v=v, cu_seqlens=cu_seqlens),
            ours=lambda backend, q, k, v, cu_seqlens: ops.varlen_attention(q, k, v, cu_seqlens, seq, backend=backend),
            torch_fn=_torch_varlen_attention,
            bytes_fwd=4 * batch * heads * seq * head_dim * size,
            bytes_bwd=8 * batch * heads * seq * head_dim * size,
            flops_fwd=4.0 * batch * heads * seq * seq * head_dim,
            note=f"{batch} sequences of {seq}",
            extra=extra,
        )
    if op == "linear_activation":
        tokens, d_in, d_out = shape
        inputs = dict(x=randn(tokens, d_in), weight=randn(d_out, d_in, scale=d_in**-0.5), bias=randn(d_out))
        return Case(
            op, shape, dtype, inputs,
            ours=lambda backend, x, weight, bias: ops.linear_activation(x, weight, bias, "gelu", backend=backend),
            torch_fn=_torch_linear_gelu,
            bytes_fwd=(tokens * d_in + d_in * d_out + tokens * d_out) * size,
            bytes_bwd=(2 * tokens * d_out + 2 * tokens * d_in + 2 * d_in * d_out) * size,
            flops_fwd=2.0 * tokens * d_in * d_out,
            note="gelu",
        )
    raise ValueError(f"unknown op {op!r}")


# -- timing, interleaved ------------------------------------------------------------------------------


class Sampler:
    """Times calls of one function on one device, a few at a time, so that several providers can
    take turns (rounds) and see the same machine load. CPU: perf_counter; CUDA: events, with the L2
    cache flushed before each timed call so a small op is not timed on a warm cache."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def estimate_ms(self, fn) -> float:
        """One call's cost, after a warm-up call."""
        fn()
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - start) * 1e3

    def sample(self, fn, n: int) -> list[float]:
        if not self.cuda:
            out = []
            for _ in range(n):
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
            return out
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for s, e in zip(starts, ends):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def copy_bandwidth_gbps(device: torch.device, sampler: Sampler) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second (the card's practical
    memory roofline)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    sampler.estimate_ms(fn)
    ms = percentile(sampler.sample(fn, 10), 50)
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


# -- providers ----------------------------------------------------------------------------------------


@dataclass
class Provider:
    name: str
    forward: Callable  # (**inputs) -> output
    error: str = ""  # why it cannot run (printed, no timing)


def _allow_recompiles(limit: int = 256) -> None:
    """Every case compiles the same composite for a new shape or dtype (dynamic=False): past
    dynamo's default recompile limit (8) it would silently run uncompiled."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(limit, getattr(dynamo_config, name)))


def providers_for(case: Case, device, compile_enabled: bool) -> list[Provider]:
    probe = next(iter(case.inputs.values()))
    out = [Provider(f"ours[{b}]", lambda b=b, **kw: case.ours(b, **kw)) for b in ops.available_backends(probe)]
    out.append(Provider("torch", case.torch_fn))
    if compile_enabled:
        out.append(Provider("compile", torch.compile(case.torch_fn, dynamic=False)))
    out += [Provider(name, fn) for name, fn in case.extra.items()]
    return out


def make_call(provider: Provider, case: Case, mode: str) -> Callable:
    """A no-argument callable running one forward (no_grad) or forward+backward."""
    if mode == "fwd":
        inputs = case.inputs

        def call():
            with torch.no_grad():
                return provider.forward(**inputs)
        return call
    inputs = {k: (v.detach().requires_grad_(True) if v.is_floating_point() else v) for k, v in case.inputs.items()}
    with torch.no_grad():
        upstream = torch.randn_like(case.torch_fn(**case.inputs))
    wants = [v for v in inputs.values() if v.requires_grad]

    def call():
        out = provider.forward(**inputs)
        torch.autograd.backward(out, upstream, inputs=wants)
        for v in wants:
            v.grad = None
    return call


def run_case(case: Case, mode: str, providers: list[Provider], sampler: Sampler, rounds: int,
             max_time: float) -> dict[str, dict]:
    """Warms every provider up, then times them in `rounds` round-robin rounds. Returns per
    provider: samples (ms), max_diff of the forward to torch, or error."""
    with torch.no_grad():
        reference = case.torch_fn(**case.inputs).double()
    calls, results = {}, {}
    for p in providers:
        try:
            with torch.no_grad():
                out = p.forward(**case.inputs)
            diff = (out.double() - reference).abs().max().item() if out.numel() else 0.0
            call = make_call(p, case, mode)
            est = sampler.estimate_ms(call)
            calls[p.name] = (call, est)
            results[p.name] = dict(samples=[], max_diff=diff)
        except Exception as exc:  # noqa: BLE001 - a provider that cannot run is reported, not fatal
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            results[p.name] = dict(error=message)
            print(f"  {case.op} {mode} {p.name}: skipped ({message})", flush=True)
    for _ in range(rounds):
        for name, (call, est) in calls.items():
            per_round = max(1, min(20, int(max_time * 1e3 / rounds / max(est, 1e-3))))
            results[name]["samples"] += sampler.sample(call, per_round)
    return results


# -- command line -------------------------------------------------------------------------------------


def parse_shapes(text: str | None) -> list[tuple]:
    if not text or text == "none":
        return []
    return [tuple(int(n) for n in item.split("x")) for item in text.split(",")]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--dtypes", default=None,
                   help=f"comma-separated of {list(DTYPES)} (default cpu: float32; cuda: float16,bfloat16)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated of {list(OPS)}")
    p.add_argument("--modes", default="fwd,fwd+bwd", help="comma-separated of fwd, fwd+bwd")
    for op, example in (("residual_layernorm", "TOKENSxDIM"), ("bias_activation", "TOKENSxDIM"),
                        ("masked_attention", "BATCHxHEADSxSEQxHEAD_DIM"),
                        ("varlen_attention", "BATCHxHEADSxSEQxHEAD_DIM"), ("linear_activation", "TOKENSxINxOUT")):
        p.add_argument(f"--{op.replace('_', '-')}", dest=op, default=None,
                       help=f"comma-separated {example} shapes (default cpu: {DEFAULTS['cpu'][op]}; "
                            f"cuda: {DEFAULTS['cuda'][op]}); 'none' to skip")
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile provider")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds over the providers")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds of timed calls per provider and case, spread over the rounds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads before timing (default: torch's; on a shared, loaded "
                        "machine 1 thread gives steadier ratios, as no parallel region waits on a "
                        "descheduled thread)")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "ops.csv"), help="results CSV to append to")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few calls, nothing recorded")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    settings = dict(DEFAULTS[device.type])
    if args.quick:
        settings.update({k: v for k, v in QUICK.items() if v is not None})
    for key in ("dtypes", "rounds", "max_time", *OPS):
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    dtypes = [DTYPES[d] for d in settings["dtypes"].split(",")]
    modes = args.modes.split(",")
    wanted = args.ops.split(",")
    for op in wanted:
        if op not in OPS:
            print(f"--ops: unknown op {op!r}; choose from {list(OPS)}", file=sys.stderr)
            return 2
    if "linear_activation" in wanted and not hasattr(ops, "linear_activation"):
        print("linear_activation: skipped (distilbert_fast.ops has no linear_activation in this build)")
        wanted.remove("linear_activation")

    if args.threads is not None:
        if args.threads < 1:
            print("--threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    if not args.no_compile:
        _allow_recompiles()
    env = environment(device)
    sampler = Sampler(device)
    copy_gbps = copy_bandwidth_gbps(device, sampler) if device.type == "cuda" else None
    print(f"device: {env['device']} | torch {env['torch']} | threads {env['threads']} | load {env['load_1m']}"
          + (f" | measured copy bandwidth {copy_gbps:.0f} GB/s" if copy_gbps else ""), flush=True)

    gen = torch.Generator().manual_seed(0)
    rows, table = [], []
    for op in wanted:
        for shape in parse_shapes(settings[op]):
            for dtype in dtypes:
                case = make_case(op, shape, dtype, device, gen)
                providers = providers_for(case, device, compile_enabled=not args.no_compile)
                for mode in modes:
                    results = run_case(case, mode, providers, sampler, settings["rounds"], settings["max_time"])
                    base = results.get("torch", {}).get("samples")
                    base_ms = percentile(base, 50) if base else None
                    for p in providers:
                        r = results[p.name]
                        row = {**env, "op": op, "mode": mode, "provider": p.name,
                               "dtype": str(dtype).replace("torch.", ""), "shape": "x".join(map(str, shape)),
                               "note": case.note, "copy_gbps": f"{copy_gbps:.1f}" if copy_gbps else ""}
                        if "error" in r:
                            row["error"] = r["error"]
                            rows.append(row)
                            table.append([op, mode, row["dtype"], row["shape"], p.name, "skipped", "", "", "", "", ""])
                            continue
                        med = percentile(r["samples"], 50)
                        nbytes = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
                        flops = case.flops_fwd * (1.0 if mode == "fwd" else 3.5)  # bwd ~ 2.5x fwd
                        gbps = nbytes / (med * 1e-3) / 1e9
                        tflops = flops / (med * 1e-3) / 1e12 if flops else None
                        row.update(
                            median_ms=f"{med:.4f}", p20_ms=f"{percentile(r['samples'], 20):.4f}",
                            p80_ms=f"{percentile(r['samples'], 80):.4f}", repeats=len(r["samples"]),
                            gbps=f"{gbps:.2f}", tflops=f"{tflops:.4f}" if tflops else "",
                            speedup_vs_torch=f"{base_ms / med:.3f}" if base_ms else "",
                            max_diff_vs_torch=f"{r['max_diff']:.2e}",
                        )
                        rows.append(row)
                        rate = f"{tflops:.3f} TFLOP/s" if tflops else (
                            f"{gbps:.1f} GB/s" + (f" ({100 * gbps / copy_gbps:.0f}% of copy)" if copy_gbps else ""))
                        table.append([op, mode, row["dtype"], row["shape"], p.name, f"{med:.3f}",
                                      f"{percentile(r['samples'], 20):.3f}-{percentile(r['samples'], 80):.3f}",
                                      rate, row["speedup_vs_torch"] and f"{base_ms / med:.2f}x",
                                      row["max_diff_vs_torch"], str(len(r["samples"]))])
                    print(format_table(
                        ["op", "mode", "dtype", "shape", "provider", "median ms", "p20-p80", "rate", "vs torch",
                         "max diff", "n"], table[-len(providers):], right={5, 7, 8, 9, 10}), flush=True)
    print()
    print(format_table(["op", "mode", "dtype", "shape", "provider", "median ms", "p20-p80", "rate", "vs torch",
                        "max diff", "n"], table, right={5, 7, 8, 9, 10}))
    if args.quick:
        print("(--quick: nothing recorded)")
    else:
        append_rows(args.output, rows)
        print(f"appended {len(rows)} rows to {os.path.relpath(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
