"""Adapter benchmark: what an active adapter costs on a DistilBERT-base-shaped model (inference).

    python bench/bench_adapters.py                       # 8x128 on CPU (float32) / 32x128 on CUDA
    python bench/bench_adapters.py --shape 1x128 --rounds 30 --dtype bfloat16

Providers, all with the same random base weights, timed interleaved (round-robin, one call each
per round, order rotated every round) so that load from other work on the machine hits all alike:

    plain              DistilBertModel, no adapter code at all (the reference)
    none-active        DistilBertAdapterModel with seq_bn, double_seq_bn and LoRA adapters added
                       but none active (should cost nothing: the same ops as plain)
    seq_bn             Pfeiffer adapter active (one bottleneck per layer, after the FFN)
    double_seq_bn      Houlsby adapters active (two bottlenecks per layer)
    lora               LoRA r=8 on q_lin and v_lin, unmerged
    lora-merged        the same LoRA after merge_adapter (should cost nothing)

With ``--parallel``, the Parallel composition against one call per adapter instead (two seq_bn
adapters, one head each; "drop3": adapters only in layers 3-5, AdapterDrop-style, so the lower
half runs once for both; "-lora": two LoRAs r=8 on q_lin and v_lin instead):

    plain              as above
    two-calls          seq_bn "a", then seq_bn "b": two forwards
    parallel           Parallel("a", "b"): one forward, the batch replicated after layer 0's FFN
    two-calls-drop3    as two-calls, adapters left out of layers 0-2
    parallel-drop3     as parallel, the batch replicated in layer 3
    *-lora             the same four with LoRA: the batch replicated at layer 0's (or 3's) q / v

With ``--compose``, BatchSplit against one call per part of the batch (half the rows each; two
seq_bn adapters "a" and "b", or "-lora": two LoRAs r=8):

    plain              as above
    two-calls-rows     rows 0 .. B/2 - 1 with "a", the rest with "b": two forwards of half the batch
    batch-split        BatchSplit("a", "b", batch_sizes=[B/2, B/2]): one forward (each adapter runs
                       on every token and keeps its rows': the cost of that beside one forward saved)
    *-lora             the same with LoRA

Prints median / p20 / p80 per provider and the ratio to plain; appends one row per provider to
bench/results/adapters.csv (see bench/_common.py for the columns that say where it came from).
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also under python -m
from _common import RESULTS_DIR, append_rows, environment, format_table, percentile  # noqa: E402

import distilbert_fast  # noqa: E402
from distilbert_fast import (  # noqa: E402
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertModel,
    BatchSplit,
    LoRAConfig,
    Parallel,
    SeqBnConfig,
)

MODEL_CONFIG = dict(vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768, hidden_dim=3072)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--shape", default=None, help="BATCHxSEQ (default 8x128 on CPU, 32x128 on CUDA)")
    p.add_argument("--rounds", type=int, default=None, help="timed calls per provider (default 10 CPU, 50 CUDA)")
    p.add_argument("--backend", default=None, help="op backend (default: auto)")
    p.add_argument("--parallel", action="store_true", help="Parallel(a, b) against one call per adapter")
    p.add_argument("--compose", action="store_true", help="BatchSplit(a, b) against one call per half batch")
    p.add_argument("--no-record", action="store_true", help="do not append to bench/results/adapters.csv")
    return p.parse_args(argv)


def build_providers(device, dtype, backend):
    config = DistilBertConfig(**MODEL_CONFIG, backend=backend)
    plain = DistilBertModel(config).eval()
    model = DistilBertAdapterModel(copy.deepcopy(config)).eval()
    model.distilbert.load_state_dict(plain.state_dict())
    model.add_adapter("seq_bn", config="seq_bn")
    model.add_adapter("double_seq_bn", config="double_seq_bn")
    model.add_adapter("lora", config=LoRAConfig(r=8, alpha=16))
    with torch.no_grad():  # LoRA's B starts at zero: give it weights, as after training
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    merged = copy.deepcopy(model)
    merged.set_active_adapters("lora")
    merged.merge_adapter("lora")
    for m in (plain, model, merged):
        m.to(device=device, dtype=dtype)
    return {
        "plain": lambda x: plain(x),
        "none-active": lambda x: model(x),
        "seq_bn": lambda x: model(x, adapter_names="seq_bn"),
        "double_seq_bn": lambda x: model(x, adapter_names="double_seq_bn"),
        "lora": lambda x: model(x, adapter_names="lora"),
        "lora-merged": lambda x: merged(x),
    }


def build_parallel_providers(device, dtype, backend):
    config = DistilBertConfig(**MODEL_CONFIG, backend=backend)
    plain = DistilBertModel(config).eval()
    plain.to(device=device, dtype=dtype)
    providers = {"plain": lambda x: plain(x)}
    for kind, adapter_config in (("", SeqBnConfig), ("-lora", LoRAConfig)):
        for drop, suffix in (([], ""), ([0, 1, 2], "-drop3")):
            model = DistilBertAdapterModel(copy.deepcopy(config)).eval()
            model.distilbert.load_state_dict(plain.state_dict())
            for name in "ab":
                model.add_adapter(name, config=adapter_config(leave_out=drop))
                model.add_classification_head(name, num_labels=2)
            model.to(device=device, dtype=dtype)
            providers["two-calls" + suffix + kind] = lambda x, m=model: [m(x, adapter_names=n) for n in "ab"]
            providers["parallel" + suffix + kind] = lambda x, m=model: m(x, adapter_names=Parallel("a", "b"))
    return providers


def build_compose_providers(device, dtype, backend, batch):
    config = DistilBertConfig(**MODEL_CONFIG, backend=backend)
    plain = DistilBertModel(config).eval()
    plain.to(device=device, dtype=dtype)
    providers = {"plain": lambda x: plain(x)}
    half = batch // 2
    for kind, adapter_config in (("", SeqBnConfig), ("-lora", LoRAConfig)):
        model = DistilBertModel(copy.deepcopy(config)).eval()
        model.load_state_dict(plain.state_dict())
        for name in "ab":
            model.add_adapter(name, config=adapter_config())
        model.to(device=device, dtype=dtype)
        providers["two-calls-rows" + kind] = lambda x, m=model: [m(x[:half], adapter_names="a"),
                                                                 m(x[half:], adapter_names="b")]
        split = BatchSplit("a", "b", batch_sizes=[half, batch - half])
        providers["batch-split" + kind] = lambda x, m=model, s=split: m(x, adapter_names=s)
    return providers


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    is_cuda = device.type == "cuda"
    shape = args.shape or ("32x128" if is_cuda else "8x128")
    batch, seq = (int(v) for v in shape.split("x"))
    rounds = args.rounds or (50 if is_cuda else 10)
    dtype = DTYPES[args.dtype]
    env = environment(device)
    torch.manual_seed(0)
    if args.compose:
        providers = build_compose_providers(device, dtype, args.backend, batch)
    else:
        providers = (build_parallel_providers if args.parallel else build_providers)(device, dtype, args.backend)
    x = torch.randint(1, MODEL_CONFIG["vocab_size"], (batch, seq), device=device)
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    samples = {name: [] for name in providers}
    names = list(providers)
    with torch.inference_mode():
        for name in names:  # warm-up
            providers[name](x)
        sync()
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                sync()
                start = time.perf_counter()
                providers[name](x)
                sync()
                samples[name].append((time.perf_counter() - start) * 1e3)
    backend = distilbert_fast.last_backend("residual_layernorm")

    base = percentile(samples["plain"], 50)
    rows, table = [], []
    for name in names:
        med, p20, p80 = (percentile(samples[name], q) for q in (50, 20, 80))
        table.append([name, f"{med:.2f}", f"{p20:.2f}", f"{p80:.2f}", f"{med / base:.3f}"])
        rows.append({**env, "benchmark": "adapters", "provider": name, "backend": backend, "dtype": args.dtype,
                     "shape": shape, "model": "distilbert-base-random", "median_ms": f"{med:.3f}",
                     "p20_ms": f"{p20:.3f}", "p80_ms": f"{p80:.3f}", "ratio_to_plain": f"{med / base:.4f}",
                     "rounds": rounds, "timer": "perf_counter+sync"})
    print(f"{env['device']} ({device.type}), {args.dtype}, batch x seq = {shape}, backend {backend}, "
          f"{rounds} interleaved rounds, load_1m {env['load_1m']}")
    print(format_table(["provider", "median ms", "p20", "p80", "x plain"], table, right={1, 2, 3, 4}))
    if not args.no_record:
        append_rows(os.path.join(RESULTS_DIR, "adapters.csv"), rows)


if __name__ == "__main__":
    main()
