"""The first FFN matmul with its epilogue, act(x @ W^T + b), against the bare matmul.

    python bench/bench_linear_activation.py                  # default shapes for the device
    python bench/bench_linear_activation.py --tokens 4096 --dtype float16 --no-record

Providers, side by side in one process, interleaved per shape:

    matmul          x @ W^T alone (torch, cuBLAS on a GPU): the bar the fused kernel is held to
    eager           act(F.linear(x, W, b)), e.g. F.gelu: what HuggingFace runs
    ours[NAME]      distilbert_fast's linear_activation on op backend NAME (every backend
                    auto-eligible on the device: on a GPU the triton backend's fused kernel)

Modes: fwd (inference, under no_grad) and fwd+bwd (gradients of x, W and b). Each row records the
median ms (p20/p80), TFLOP/s of the matmul part (2 M N K per forward, 3x that with the backward)
and the ratio to ``matmul`` in the same mode (fwd+bwd: to matmul's forward and backward). The
issue's target on an H100 in float16: ours[triton] fwd within 5% of matmul fwd. Rows are appended
to bench/results/linear_activation.csv.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also under python -m
from _common import RESULTS_DIR, append_rows, environment, format_table, time_fn  # noqa: E402

from distilbert_fast import ops  # noqa: E402
from distilbert_fast.ops.eager import activation_forward  # noqa: E402

DEFAULTS = {
    "cpu": dict(tokens="128,1024", dtypes="float32", repeats=10, max_time=2.0),
    # two shapes by default so the GPU check stays short; --tokens 1024,8192,32768,65536 for more
    "cuda": dict(tokens="8192,32768", dtypes="float16,bfloat16", repeats=50, max_time=0.5),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (rows of x)")
    p.add_argument("--dtype", default=None, help="comma-separated dtypes (float32, float16, bfloat16)")
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=3072)
    p.add_argument("--activation", default="gelu")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--max-time", type=float, default=None, help="seconds of timed calls per measurement")
    p.add_argument("--no-record", action="store_true", help="do not append rows to the results file")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "linear_activation.csv"))
    return p.parse_args(argv)


def providers(device, activation):
    """name -> fn(x, weight, bias) for the forward."""
    found = {
        "matmul": lambda x, w, b: torch.matmul(x, w.t()),
        "eager": lambda x, w, b: activation_forward(F.linear(x, w, b), activation),
    }
    probe = torch.zeros(1, device=device)
    for name in ops.registered_backends():
        backend = ops.backends._registry[name]
        if backend.unsupported_reason(probe) is None and backend.auto_eligible(probe):
            found[f"ours[{name}]"] = (
                lambda x, w, b, name=name: ops.linear_activation(x, w, b, activation, backend=name))
    return found


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    defaults = DEFAULTS[device.type]
    tokens_list = [int(t) for t in (args.tokens or defaults["tokens"]).split(",")]
    dtypes = [DTYPES[d] for d in (args.dtype or defaults["dtypes"]).split(",")]
    repeats = args.repeats or defaults["repeats"]
    max_time = args.max_time or defaults["max_time"]
    k, n = args.in_features, args.out_features
    env = environment(device)
    rows, table = [], []
    fns = providers(device, args.activation)
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(0)
        weight = (torch.randn(n, k, device=device, generator=gen) * k**-0.5).to(dtype).requires_grad_(True)
        bias = torch.randn(n, device=device, generator=gen).to(dtype).requires_grad_(True)
        for tokens in tokens_list:
            x = torch.randn(tokens, k, device=device, generator=gen).to(dtype).requires_grad_(True)
            grad = torch.randn(tokens, n, device=device, generator=gen).to(dtype)
            flops = 2.0 * tokens * n * k
            results = {}
            for mode in ("fwd", "fwd+bwd"):
                for name, fn in fns.items():
                    if mode == "fwd":
                        def call(fn=fn):
                            with torch.no_grad():
                                fn(x, weight, bias)
                    else:
                        def call(fn=fn):
                            torch.autograd.grad(fn(x, weight, bias), (x, weight, bias), grad,
                                                allow_unused=True)
                    timing = time_fn(call, device, warmup=3, repeats=repeats, max_time_s=max_time)
                    results[(mode, name)] = timing
            for (mode, name), timing in results.items():
                base = results[(mode, "matmul")].median_ms
                work = flops * (1 if mode == "fwd" else 3)
                tflops = work / (timing.median_ms * 1e-3) / 1e12
                rows.append({
                    **env, "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                    "in_features": k, "out_features": n, "activation": args.activation, "mode": mode,
                    "provider": name, "median_ms": f"{timing.median_ms:.4f}",
                    "p20_ms": f"{timing.p20_ms:.4f}", "p80_ms": f"{timing.p80_ms:.4f}",
                    "repeats": timing.repeats, "tflops": f"{tflops:.2f}",
                    "ratio_to_matmul": f"{timing.median_ms / base:.3f}",
                })
                table.append([str(dtype).removeprefix("torch."), tokens, mode, name,
                              f"{timing.median_ms:.3f}", f"{tflops:.1f}", f"{timing.median_ms / base:.3f}"])
    print(f"{env['device']}, x ({'/'.join(map(str, tokens_list))}, {k}) @ W^T ({n}, {k}), {args.activation}")
    print(format_table(["dtype", "tokens", "mode", "provider", "median ms", "TFLOP/s", "vs matmul"],
                       table, right={1, 4, 5, 6}))
    if not args.no_record:
        append_rows(args.output, rows)
        print(f"appended {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
