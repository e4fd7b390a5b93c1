"""optimize() benchmark: a transformers DistilBERT model before and after distilbert_fast.optimize().

    python bench/bench_optimize.py                   # CPU fp32, 2 threads: 8x128 and ragged 32 x U[16, 256]
    python bench/bench_optimize.py --device cuda     # fp16 on a GPU
    python bench/bench_optimize.py --quick           # smoke test, nothing recorded

One DistilBERT-base-shaped transformers model with random weights, and a deep copy of it that is
optimised in place; both run every shape in one process, their calls alternating (forward,
inference). The
ragged batch pads 32 sequences of lengths drawn from U[16, 256] to the longest, as a tokenizer
with padding=True would. Rows (median with p20/p80, real tokens/s, the speedup over the
unoptimised model, max abs diff at real positions) are appended to bench/results/optimize.csv.

--gemm-floor adds a ``gemm-floor`` row: only the matrix products the optimised model runs on the
real tokens (bench_model.gemm_floor, through our op layer's linear), nothing else, no output to
check. The unoptimised model's time over it bounds the speedup any implementation that keeps
those GEMMs can reach, measured in the same interleaved rounds.
"""

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also under python -m
from _common import RESULTS_DIR, append_rows, environment, format_table, time_interleaved, uniform_lengths  # noqa: E402

import distilbert_fast  # noqa: E402

MODEL_CONFIG = dict(vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768, hidden_dim=3072)
MODEL_NAME = "distilbert-base-random"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or float16 (CUDA default)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--fixed", default="8x128", help="unpadded shapes BATCHxSEQ, comma-separated")
    p.add_argument("--ragged", default="32x16-256", help="BATCHxMIN-MAX ragged batches, comma-separated")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--max-time", type=float, default=8.0, help="seconds per provider and shape")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "optimize.csv"))
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time only the GEMMs of the optimised model on the real tokens")
    p.add_argument("--quick", action="store_true", help="tiny shapes, nothing recorded")
    return p.parse_args(argv)


def make_batches(args, device, vocab):
    """[(label, batch, seq, is_ragged, input_ids, attention_mask)]"""
    gen = torch.Generator().manual_seed(0)
    out = []
    for spec in filter(None, args.fixed.split(",")):
        b, s = map(int, spec.split("x"))
        ids = torch.randint(1, vocab, (b, s), generator=gen)
        out.append((spec, b, s, False, ids, torch.ones(b, s, dtype=torch.long)))
    for spec in filter(None, args.ragged.split(",")):
        b, lengths = spec.split("x")
        b = int(b)
        lo, hi = map(int, lengths.split("-"))
        lens = uniform_lengths(b, lo, hi, gen)
        s = int(lens.max())
        ids = torch.randint(1, vocab, (b, s), generator=gen)
        mask = (torch.arange(s)[None, :] < lens[:, None]).long()
        out.append((f"{b}xU[{lo},{hi}]", b, s, True, ids * mask, mask))
    return [(label, b, s, r, ids.to(device), mask.to(device)) for label, b, s, r, ids, mask in out]


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.fixed, args.ragged, args.repeats, args.max_time = "2x16", "4x4-24", 3, 0.5
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    reference = transformers.DistilBertModel(transformers.DistilBertConfig(**MODEL_CONFIG)).eval().to(device, dtype)
    optimized = distilbert_fast.optimize(copy.deepcopy(reference))
    providers = {"hf": reference, "hf+optimize": optimized}
    floor = None
    if args.gemm_floor:
        from bench_model import gemm_floor

        floor = gemm_floor(reference, "cpu" if device.type == "cpu" else None)
    env = environment(device)
    rows = []
    for label, batch, seq, ragged, ids, mask in make_batches(args, device, MODEL_CONFIG["vocab_size"]):
        real = int(mask.sum())
        with torch.inference_mode():
            expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
            calls = {name: (lambda m=model: m(input_ids=ids, attention_mask=mask)) for name, model in providers.items()}
            if floor is not None:
                packed = {"input_ids": ids[mask.bool()]}
                calls["gemm-floor"] = lambda: floor(packed)
            timings = time_interleaved(calls, device, args.warmup, args.repeats, args.max_time)
            for name in calls:
                if name in providers:
                    out = providers[name](input_ids=ids, attention_mask=mask).last_hidden_state
                    diff = f"{(out - expected).abs()[mask.bool()].max().item():.3e}"
                else:
                    diff = ""  # (the floor computes no model)
                t = timings[name]
                rows.append({
                    **env, "model": MODEL_NAME, "dtype": str(dtype).removeprefix("torch."), "provider": name,
                    "shape": label, "batch": batch, "seq": seq, "ragged": int(ragged), "real_tokens": real,
                    "median_ms": f"{t.median_ms:.4f}", "p20_ms": f"{t.p20_ms:.4f}", "p80_ms": f"{t.p80_ms:.4f}",
                    "tokens_per_s": f"{real / t.median_ms * 1e3:.1f}",
                    "speedup_vs_hf": f"{timings['hf'].median_ms / t.median_ms:.3f}",
                    "max_abs_diff": diff, "repeats": t.repeats, "timer": t.timer,
                })
                print(f"{label:>14} {name:>12} {t.median_ms:9.2f} ms  x{timings['hf'].median_ms / t.median_ms:.2f}  "
                      f"diff {diff or '-'}", flush=True)
    columns = ["shape", "provider", "median_ms", "p20_ms", "p80_ms", "tokens_per_s", "speedup_vs_hf", "max_abs_diff"]
    print(format_table(columns, [[row[c] for c in columns] for row in rows], right=set(range(2, len(columns)))))
    if not args.quick:
        append_rows(args.output, rows)
        print(f"appended {len(rows)} rows to {args.output}")


if __name__ == "__main__":
    main()
