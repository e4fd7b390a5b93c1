"""Varlen attention in bfloat16 inference on the CPU, on ragged and equal-length packed batches:
each path the cpu backend can take, side by side, interleaved.

    python bench/bench_varlen_attention.py                     # the default batches, 2 threads
    python bench/bench_varlen_attention.py --batches 32xU16-256 --threads 1
    python bench/bench_varlen_attention.py --quick             # smoke test, nothing recorded

Batches: ``NxUlo-hi`` is N sequences of lengths uniform in [lo, hi] (bench/_common.uniform_lengths:
the distribution's quantiles, shuffled, so every run times the same batch); ``NxL`` is N sequences
of L tokens. q, k, v are the thirds of one fused (tokens, 3 * heads * head_dim) projection, as the
model gives them; DistilBERT's 12 heads of 64.

Providers (all under torch.no_grad, timed in round-robin rounds so load hits them alike):

    ours               ops.varlen_attention on the cpu backend, whatever path it picks
    ours[units]        our kernel's bf16 variant on the CPU's matrix units (AMX), forced
    ours[widening]     our float32-widening kernel (the path before matrix units), forced
    ours[flash]        PyTorch's flash CPU kernel on views (equal-length batches only)
    sdpa[padded]       one F.scaled_dot_product_attention call on a padded copy with a key mask,
                       including the copies in and out (what a caller without varlen would do)

Each row's error is the max abs difference to a float64 per-sequence reference. Rows are appended
to bench/results/varlen_attention.csv with the machine, load and commit.

``--engine N`` also runs the engine end to end (embed, bf16, the default token budget) on N texts of
bench_engine's medium band (4-6 sentences, ragged batches), with the cpu backend's attention paths
switched as above (ours: all; flash-only: the engine before the matrix-unit kernel; widening),
interleaved, rows to bench/results/engine.csv (benchmark ``embed-medium-attention``).
"""

import argparse
import contextlib
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, append_rows, environment, format_table, time_interleaved, uniform_lengths  # noqa: E402

from distilbert_fast import ops  # noqa: E402
from distilbert_fast.ops import cpu_backend  # noqa: E402

HEADS, HEAD_DIM = 12, 64
DEFAULT_BATCHES = "32xU16-256,32xU16-512,8x512,64x128"


def parse_batch(text: str) -> list[int]:
    count, _, spec = text.partition("x")
    if spec.startswith("U"):
        lo, hi = (int(n) for n in spec[1:].split("-"))
        return uniform_lengths(int(count), lo, hi, torch.Generator().manual_seed(0)).tolist()
    return [int(spec)] * int(count)


@contextlib.contextmanager
def forced(flash: bool, units: bool):
    saved = cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION
    cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION = flash and saved[0], units
    try:
        yield
    finally:
        cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION = saved


def sdpa_padded(q, k, v, lengths):
    """Padded copy (batch, heads, max, head_dim), key mask, one SDPA call, packed back."""
    batch, longest = len(lengths), max(lengths)
    keep = torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]
    padded = []
    for t in (q, k, v):
        p = t.new_zeros(batch, longest, *t.shape[1:])
        p[keep] = t
        padded.append(p.transpose(1, 2))
    out = F.scaled_dot_product_attention(*padded, attn_mask=keep[:, None, None, :])
    return out.transpose(1, 2)[keep]


def reference(q, k, v, lengths):
    outs, start = [], 0
    for n in lengths:
        qq, kk, vv = (t[start:start + n].double().transpose(0, 1) for t in (q, k, v))
        outs.append((torch.softmax(qq @ kk.transpose(1, 2) * HEAD_DIM ** -0.5, -1) @ vv).transpose(0, 1))
        start += n
    return torch.cat(outs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default=DEFAULT_BATCHES, help=f"comma-separated (default {DEFAULT_BATCHES})")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15, help="round-robin rounds at most")
    p.add_argument("--max-time", type=float, default=3.0, help="seconds per provider and batch")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "varlen_attention.csv"))
    p.add_argument("--quick", action="store_true", help="small batches, few rounds, nothing recorded")
    p.add_argument("--engine", type=int, default=0, help="also the engine on N medium texts (0: skip)")
    p.add_argument("--engine-rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.max_time = "4xU1-40,2x64", 3, 0.05
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    env = environment(device)
    units = cpu_backend.MATRIX_UNITS_ATTENTION and cpu_backend.matrix_units()
    print(f"threads {torch.get_num_threads()}, load {env['load_1m']}, matrix units {units}, commit {env['commit']}")

    rows, table = [], []
    for spec in args.batches.split(","):
        lengths = parse_batch(spec)
        total, longest = sum(lengths), max(lengths)
        qkv = torch.randn(total, 3 * HEADS * HEAD_DIM).to(torch.bfloat16)
        q, k, v = (qkv[:, i * HEADS * HEAD_DIM:(i + 1) * HEADS * HEAD_DIM].view(total, HEADS, HEAD_DIM)
                   for i in range(3))
        cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)

        def ours(flash=True, use_units=True):
            with forced(flash, use_units):
                return ops.varlen_attention(q, k, v, cu, longest, backend="cpu")

        calls = {"ours": ours}
        if units:
            calls["ours[units]"] = lambda: ours(flash=False)
        calls["ours[widening]"] = lambda: ours(flash=False, use_units=False)
        if len(set(lengths)) == 1 and cpu_backend.FLASH_ATTENTION:
            calls["ours[flash]"] = lambda: ours(use_units=False)
        calls["sdpa[padded]"] = lambda: sdpa_padded(q, k, v, lengths)
        with torch.no_grad():
            ref = reference(q, k, v, lengths)
            errors = {name: (fn().double() - ref).abs().max().item() for name, fn in calls.items()}
            timings = time_interleaved(calls, device, warmup=1, repeats=args.rounds, max_time_s=args.max_time)
        base = timings["ours[widening]"].median_ms
        flops = 4.0 * HEADS * HEAD_DIM * sum(n * n for n in lengths)
        for name, t in timings.items():
            table.append([spec, str(total), name, f"{t.median_ms:.2f}", f"{t.p20_ms:.2f}-{t.p80_ms:.2f}",
                          f"{base / t.median_ms:.2f}x", f"{flops / t.median_ms / 1e9:.3f}", f"{errors[name]:.2e}"])
            rows.append({**env, "op": "varlen_attention", "mode": "fwd", "provider": name, "dtype": "bfloat16",
                         "batch": spec, "tokens": total, "heads": HEADS, "head_dim": HEAD_DIM,
                         "median_ms": f"{t.median_ms:.3f}", "p20_ms": f"{t.p20_ms:.3f}", "p80_ms": f"{t.p80_ms:.3f}",
                         "repeats": t.repeats, "speedup_vs_widening": f"{base / t.median_ms:.3f}",
                         "tflops": f"{flops / t.median_ms / 1e9:.4f}", "max_err_vs_float64": f"{errors[name]:.3e}"})
        print(format_table(["batch", "tokens", "provider", "median ms", "p20-p80", "vs widening", "TFLOP/s",
                            "err vs f64"], table, right={1, 3, 4, 5, 6, 7}), flush=True)
        table = []
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if not args.quick:
        append_rows(args.output, rows)
        print(f"appended {len(rows)} rows to {args.output}")
    if args.engine:
        engine_rows = run_engine(args.engine, args.engine_rounds, device)
        if not args.quick:
            append_rows(os.path.join(RESULTS_DIR, "engine.csv"), engine_rows)
    return 0


def run_engine(n_texts: int, rounds: int, device) -> list[dict]:
    """The engine (embed, bf16) on bench_engine's medium texts with each attention path, interleaved."""
    import tempfile

    import bench_engine

    env = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = bench_engine.make_checkpoint(tmp)
        texts = bench_engine.make_corpus(n_texts, seed=1, sentences=(4, 6))
        tokens = bench_engine.count_tokens(path, texts)
        ours = bench_engine.Ours(path, "bfloat16", bench_engine.parse_args([]).max_batch_tokens)
        paths = {"ours-auto": (True, True), "ours-auto-flash-only": (True, False),
                 "ours-auto-own-attention": (False, False)}

        def with_paths(flash, units):
            def call():
                with forced(flash, units):
                    return ours(texts)
            return call

        with torch.no_grad():
            timings = time_interleaved({name: with_paths(*f) for name, f in paths.items()}, device, warmup=1,
                                       repeats=rounds, max_time_s=0.0)
    base = timings["ours-auto-flash-only"].median_ms
    rows = []
    for name, t in timings.items():
        print(f"engine, {n_texts} medium texts ({tokens} tokens): {name} {n_texts / t.median_ms * 1e3:.2f} texts/s "
              f"(p20-p80 {t.p20_ms / 1e3:.2f}-{t.p80_ms / 1e3:.2f} s), {base / t.median_ms:.2f}x flash-only")
        rows.append({**env, "benchmark": "embed-medium-attention", "provider": name, "dtype": "bfloat16",
                     "texts": n_texts, "tokens": tokens, "max_batch_tokens": ours.engine.max_batch_tokens,
                     "seconds": f"{t.median_ms / 1e3:.3f}", "texts_per_s": f"{n_texts / t.median_ms * 1e3:.2f}",
                     "tokens_per_s": f"{tokens / t.median_ms * 1e3:.1f}"})  # engine.csv's own columns
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return rows


if __name__ == "__main__":
    sys.exit(main())
