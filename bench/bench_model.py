"""Model benchmark: distilbert_fast beside HuggingFace transformers, forward pass, inference.

    python bench/bench_model.py                    # default shapes for the device, all providers
    python bench/bench_model.py --shapes 1x128,32x128 --varlen 64x512 --compile
    python bench/bench_model.py --quick            # smoke test of every provider, nothing recorded
    python bench/bench_model.py --threads 2 --backends cpu --shapes 8x128 --varlen none \
        --ragged 32x16-256,8x16-512                # packed vs padded (issue #13's CPU rows)
    python bench/bench_model.py --threads 2 --backends cpu --shapes 8x128 --varlen none \
        --ragged 32x16-256 --compile --interleave  # ours compiled beside HF compiled

One DistilBERT-base-shaped model with random weights is built in transformers and loaded, with the
same state_dict, into ours. Every provider runs every shape in the same process:

    hf-eager        transformers, eager attention (the reference for the diff column)
    hf-sdpa         transformers, torch scaled_dot_product_attention
    ours[NAME]      distilbert_fast on op backend NAME, for each backend available on the device:
                    the padded entry point, which packs a batch with padding inside
    ...:padded      the same with pack=False: every layer computes the padding too
    ...:packed      the packed entry point (1-D ids + cu_seqlens, max_seqlen): real tokens only,
                    no unpad/pad (what the batch engine calls)
    ...+compile     (with --compile) torch.compile (inductor, dynamic=False) of hf-sdpa, of ours
                    (under a tracer the padded entry point computes the padding) and of ours on
                    the packed entry point (ours[NAME]:packed+compile); each compiles once per
                    shape, with inductor's caches off, in its first call, timed on its own
                    (compile_s: that call, compilation and one forward) and not in the median;
                    on CPU also ours[NAME]+compile:dynamic-sizes, compiled with
                    torch._dynamo.config.capture_dynamic_output_shape_ops, where the padded
                    entry point packs inside the graph
    ort             (with --onnxruntime; CPU, float32) hf-eager's model exported to ONNX and fused by
                    onnxruntime's BERT optimizer, run by onnxruntime on the padded batch: the
                    strongest fp32 peer on CPU (it prints which fusions matched)
    gemm-floor[NAME] (with --gemm-floor) only the matrix products ours[NAME]:packed runs (each
                    layer's fused QKV, out_lin, lin1, lin2 on the real tokens, no bias), through the
                    same op: not a model (no output checked), a floor under any implementation
                    that keeps those GEMMs, so "vs hf-eager" on its row is the most a speedup
                    over hf-eager can be on these GEMMs

Each provider is timed on its own, one after the other, or with --interleave in round-robin rounds
over all providers of a shape (one call each per round), so that load from other work on a
shared machine hits them alike. For each shape it prints a line per provider as it finishes, then a table: median latency with
p20/p80, real (unpadded) tokens per second, the speedup against hf-eager and hf-sdpa, and the max
abs difference of last_hidden_state to hf-eager on non-padded positions. Each run appends one row
per provider and shape to bench/results/model.csv (see bench/_common.py for the columns that say
where a number came from).
"""

import argparse
import copy
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, also under python -m
from _common import (  # noqa: E402
    RESULTS_DIR, append_rows, environment, format_table, time_fn, time_interleaved, uniform_lengths,
)

import distilbert_fast  # noqa: E402

# DistilBERT-base (distilbert-base-uncased's shape); the same keywords build both configs.
MODEL_CONFIG = dict(
    vocab_size=30522, max_position_embeddings=512, n_layers=6, n_heads=12, dim=768, hidden_dim=3072,
)
MODEL_NAME = "distilbert-base-random"

DEFAULTS = {
    # Sized so the whole default run stays under ~3 minutes on a 2-core CPU.
    "cpu": dict(shapes="1x128,8x128,2x512", varlen="8x256", ragged="none", warmup=2, repeats=10, max_time=5.0),
    "cuda": dict(shapes="1x128,32x128,128x128,32x512", varlen="64x512", ragged="none", warmup=10, repeats=100,
                 max_time=1.0),
}
QUICK = dict(shapes="1x16,2x32", varlen="4x32", ragged="4x8-32", warmup=1, repeats=3, max_time=0.5)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# -- command line ----------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="weights and activations (default: float32 on cpu, float16 on cuda)")
    p.add_argument("--shapes", default=None,
                   help="comma-separated BATCHxSEQ of full-length batches, e.g. 1x128,32x128,8x512 "
                        f"(default cpu: {DEFAULTS['cpu']['shapes']}; cuda: {DEFAULTS['cuda']['shapes']}); "
                        "'none' for no full-length shapes")
    p.add_argument("--varlen", default=None,
                   help="comma-separated BATCHxMAX of variable-length batches: lengths spread evenly "
                        "from 0.2 to 1.0 x MAX (mean 0.6 x MAX), shuffled, padded to MAX with "
                        f"attention_mask (default cpu: {DEFAULTS['cpu']['varlen']}; cuda: "
                        f"{DEFAULTS['cuda']['varlen']}); 'none' to skip")
    p.add_argument("--ragged", default=None,
                   help="comma-separated BATCHxLO-HI of ragged batches: lengths drawn uniformly from "
                        "[LO, HI] (seeded), padded to the longest, e.g. 32x16-256 (default: none)")
    p.add_argument("--backends", default=None,
                   help="comma-separated op backends of ours to run (default: every backend in "
                        "distilbert_fast.ops.available_backends for the device and dtype)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of hf-sdpa, ours[BACKEND] and ours[BACKEND]:packed "
                        "(compiled once per shape, dynamic=False, inductor's caches off; the "
                        "compiling first call is timed apart, as compile_s)")
    p.add_argument("--interleave", action="store_true",
                   help="time the providers of a shape in round-robin rounds (after each one's checked "
                        "first call), --repeats rounds at most, at least 3, stopping once --max-time "
                        "per provider is spent: ratios that hold up on a shared machine")
    p.add_argument("--onnxruntime", action="store_true",
                   help="also run hf-eager's model exported to ONNX, fused, in onnxruntime (CPU, float32)")
    p.add_argument("--gemm-floor", action="store_true",
                   help="also time only the GEMMs of ours on the real tokens (see gemm-floor above)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls before timing; the first one's output is the one checked "
                        "against hf-eager (default cpu: 2, cuda: 10; compiled providers get 2 more)")
    p.add_argument("--repeats", type=int, default=None,
                   help="most timed calls per provider and shape (default cpu: 10, cuda: 100)")
    p.add_argument("--max-time", type=float, default=None,
                   help="seconds of timed calls to aim for per provider and shape; fewer than "
                        "--repeats calls are made when one call is slow, but at least 3 (or --repeats if less) "
                        "(default cpu: 5, cuda: 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU runs (default: torch's choice; recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs (default 0)")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke test: shapes {QUICK['shapes']}, varlen {QUICK['varlen']}, "
                        f"{QUICK['repeats']} repeats; records nothing (implies --no-record)")
    p.add_argument("--no-record", action="store_true", help="do not append rows to the results file")
    p.add_argument("--output", default=os.path.join(RESULTS_DIR, "model.csv"),
                   help="results CSV to append to, created with a header if absent "
                        "(default: bench/results/model.csv)")
    args = p.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA device")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device.type == "cuda" else "float32")]
    defaults = QUICK if args.quick else DEFAULTS[args.device.type]
    for name in ("shapes", "varlen", "ragged", "warmup", "repeats", "max_time"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.quick:
        args.no_record = True
    try:
        args.shapes = parse_shapes(args.shapes)
        args.varlen = parse_shapes(args.varlen)
        args.ragged = parse_ragged(args.ragged)
    except ValueError as exc:
        p.error(str(exc))
    if not args.shapes and not args.varlen and not args.ragged:
        p.error("nothing to run: --shapes and --varlen are both empty")
    if args.warmup < 1 or args.repeats < 1 or args.max_time <= 0:
        p.error("--warmup and --repeats must be at least 1, --max-time positive")
    return args


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x128,8x512' -> [(1, 128), (8, 512)]; '' or 'none' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    shapes = []
    for item in text.split(","):
        try:
            batch, seq = (int(v) for v in item.lower().strip().split("x"))
        except ValueError:
            raise ValueError(f"shape {item!r} is not BATCHxSEQ, e.g. 8x128") from None
        if batch < 1 or not 1 <= seq <= MODEL_CONFIG["max_position_embeddings"]:
            raise ValueError(
                f"shape {item!r}: batch must be >= 1 and seq in [1, "
                f"{MODEL_CONFIG['max_position_embeddings']}]"
            )
        shapes.append((batch, seq))
    return shapes


def parse_ragged(text: str) -> list[tuple[int, int, int]]:
    """'32x16-256' -> [(32, 16, 256)]; '' or 'none' -> []."""
    if text.strip().lower() in ("", "none"):
        return []
    shapes = []
    for item in text.split(","):
        try:
            batch, span = item.lower().strip().split("x")
            lo, hi = (int(v) for v in span.split("-"))
            batch = int(batch)
        except ValueError:
            raise ValueError(f"ragged shape {item!r} is not BATCHxLO-HI, e.g. 32x16-256") from None
        if batch < 1 or not 1 <= lo <= hi <= MODEL_CONFIG["max_position_embeddings"]:
            raise ValueError(f"ragged shape {item!r}: batch >= 1 and 1 <= LO <= HI <= "
                             f"{MODEL_CONFIG['max_position_embeddings']}")
        shapes.append((batch, lo, hi))
    return shapes


# -- inputs ----------------------------------------------------------------------------------------


@dataclass
class Case:
    batch: int
    seq: int
    varlen: bool
    inputs: dict  # input_ids, attention_mask: (batch, seq), on the device
    keep: torch.Tensor  # (batch, seq) bool, True at real (non-padded) tokens
    real_tokens: int
    label: str = ""  # how the lengths were drawn, when not the default

    @property
    def name(self) -> str:
        return f"{self.batch}x{self.seq}" + (f" {self.label}" if self.label else " var" if self.varlen else "")

    @property
    def packed_inputs(self) -> dict:
        """The same sequences as packed input: 1-D ids, cu_seqlens (int32, host), max_seqlen."""
        lengths = self.keep.sum(1)
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)).cpu()
        return {"input_ids": self.inputs["input_ids"][self.keep], "cu_seqlens": cu_seqlens,
                "max_seqlen": int(lengths.max())}


def make_case(batch: int, seq: int, varlen: bool, device, generator) -> Case:
    """Random token ids in [1, vocab) (0 is [PAD]: never time on zeros). Full-length batches still
    carry an all-ones attention_mask, as a tokenizer's output does."""
    ids = torch.randint(1, MODEL_CONFIG["vocab_size"], (batch, seq), generator=generator)
    if varlen:
        if batch == 1:
            lengths = torch.tensor([round(0.6 * seq)])
        else:  # evenly from 0.2 to 1.0 x seq: mean 0.6 x seq, longest = seq
            lengths = torch.linspace(0.2 * seq, seq, batch).round().long()
            lengths = lengths[torch.randperm(batch, generator=generator)]
        lengths = lengths.clamp(min=1)
        keep = torch.arange(seq)[None, :] < lengths[:, None]
    else:
        keep = torch.ones(batch, seq, dtype=torch.bool)
    ids = ids.masked_fill(~keep, 0)
    inputs = {"input_ids": ids.to(device), "attention_mask": keep.long().to(device)}
    return Case(batch, seq, varlen, inputs, keep.to(device), int(keep.sum()))


def make_ragged_case(batch: int, lo: int, hi: int, device, generator) -> Case:
    """Lengths uniform in [lo, hi] (its quantiles, shuffled), padded to the longest."""
    lengths = uniform_lengths(batch, lo, hi, generator)
    seq = int(lengths.max())
    ids = torch.randint(1, MODEL_CONFIG["vocab_size"], (batch, seq), generator=generator)
    keep = torch.arange(seq)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~keep, 0)
    inputs = {"input_ids": ids.to(device), "attention_mask": keep.long().to(device)}
    return Case(batch, seq, True, inputs, keep.to(device), int(keep.sum()), label=f"U[{lo},{hi}]")


# -- providers -------------------------------------------------------------------------------------


@dataclass
class Provider:
    label: str  # "hf-eager", "hf-sdpa", "ours[eager]", "ours[eager]+compile", ...
    impl: str  # "hf" or "ours"
    backend: str  # ours: the op backend; hf: the attention implementation
    compiled: bool
    forward: Callable[[dict], torch.Tensor]  # inputs -> last_hidden_state (batch, seq, dim)
    packed: bool = False  # takes case.packed_inputs, returns (real_tokens, dim)
    checked: bool = True  # its output is last_hidden_state, compared with hf-eager's

    def inputs(self, case: "Case") -> dict:
        return case.packed_inputs if self.packed else case.inputs


class _CountSdpa:
    """Counts calls of torch.nn.functional.scaled_dot_product_attention while active."""

    def __enter__(self):
        self.calls, self._orig = 0, torch.nn.functional.scaled_dot_product_attention

        def counting(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = counting
        return self

    def __exit__(self, *exc):
        torch.nn.functional.scaled_dot_product_attention = self._orig


def build_providers(args) -> list[Provider]:
    import transformers

    # Which of our backends to run, checked first: building the models takes a while.
    available = distilbert_fast.available_backends(torch.empty(1, device=args.device, dtype=args.dtype))
    if args.backends is None:
        backends = available
    else:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        missing = [b for b in backends if b not in available]
        if missing:
            sys.exit(f"backend(s) {missing} not available on {args.device.type} in {args.dtype}; "
                     f"available: {available}")

    transformers.logging.set_verbosity_error()
    torch.manual_seed(args.seed)

    # transformers 5 reads the attention implementation from the config: set it before
    # construction, one config per model.
    def hf_model(attn: str):
        config = transformers.DistilBertConfig(**MODEL_CONFIG)
        config._attn_implementation = attn
        return transformers.DistilBertModel(config).eval()

    hf_eager = hf_model("eager")
    state_dict = hf_eager.state_dict()
    hf_sdpa = hf_model("sdpa")
    hf_sdpa.load_state_dict(state_dict, strict=True)
    ours = distilbert_fast.DistilBertModel(distilbert_fast.DistilBertConfig(**MODEL_CONFIG)).eval()
    ours.load_state_dict(state_dict, strict=True)

    for model in (hf_eager, hf_sdpa, ours):
        model.to(device=args.device, dtype=args.dtype)

    # Check the attention implementation really took effect: only hf-sdpa may call SDPA.
    probe = {"input_ids": torch.ones(1, 8, dtype=torch.long, device=args.device)}
    for model, want in ((hf_eager, "eager"), (hf_sdpa, "sdpa")):
        with torch.inference_mode(), _CountSdpa() as count:
            model(**probe)
        if model.config._attn_implementation != want or (count.calls > 0) != (want == "sdpa"):
            raise RuntimeError(f"hf-{want}: config says {model.config._attn_implementation!r} and "
                               f"it called SDPA {count.calls} times")

    def last_hidden(model, **extra):
        return lambda inputs: model(**inputs, **extra).last_hidden_state

    providers = [
        Provider("hf-eager", "hf", "eager", False, last_hidden(hf_eager)),
        Provider("hf-sdpa", "hf", "sdpa", False, last_hidden(hf_sdpa)),
    ]
    ours_by_backend = {}
    for name in backends:
        # One copy per backend, so a compiled copy never sees its backend change under it.
        ours_by_backend[name] = copy.deepcopy(ours).set_backend(name)
        providers.append(Provider(f"ours[{name}]", "ours", name, False, last_hidden(ours_by_backend[name])))
        if args.ragged or args.varlen:  # the padded computation, beside the default (packing)
            providers.append(Provider(f"ours[{name}]:padded", "ours", name, False,
                                      last_hidden(ours_by_backend[name], pack=False)))
        providers.append(Provider(f"ours[{name}]:packed", "ours", name, False,
                                  last_hidden(ours_by_backend[name]), packed=True))

    if args.onnxruntime:
        providers.append(Provider("ort", "ort", "onnxruntime", False, onnxruntime_forward(hf_eager, args)))
    if args.gemm_floor:
        for name, model in ours_by_backend.items():
            providers.append(Provider(f"gemm-floor[{name}]", "bound", name, False, gemm_floor(model, name),
                                      packed=True, checked=False))

    if args.compile:
        # dynamic=False: one specialised graph per shape, as a serving setup would use. Allow
        # enough recompiles for every shape (the limit's name changed across torch versions).
        for limit in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, max(64, getattr(torch._dynamo.config, limit)))
        # every compile cold, so compile_s is what a fresh process pays (not a cache hit left by
        # an earlier run or another provider)
        from torch._inductor import config as inductor_config

        inductor_config.force_disable_caches = True
        providers.append(Provider("hf-sdpa+compile", "hf", "sdpa", True,
                                  last_hidden(torch.compile(hf_sdpa, dynamic=False))))
        for name, model in ours_by_backend.items():
            compiled = torch.compile(model, dynamic=False)
            providers.append(Provider(f"ours[{name}]+compile", "ours", name, True, last_hidden(compiled)))
            providers.append(Provider(f"ours[{name}]:packed+compile", "ours", name, True,
                                      last_hidden(compiled), packed=True))
            if args.device.type == "cpu":
                # a copy (its own dynamo cache entry), traced with data-dependent sizes allowed:
                # the padded entry point then packs inside the graph (README, torch.compile)
                dynamic = torch.compile(copy.deepcopy(model), dynamic=False)

                def with_dynamic_sizes(inputs, dynamic=dynamic):
                    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
                        return dynamic(**inputs).last_hidden_state

                providers.append(Provider(f"ours[{name}]+compile:dynamic-sizes", "ours", name, True,
                                          with_dynamic_sizes))
    return providers


def gemm_floor(model, backend: str) -> Callable[[dict], torch.Tensor]:
    """The matrix products of ``model``'s packed forward on the real tokens, nothing else: per
    layer x @ Wqkv^T (3*dim, dim), then out_lin, lin1, lin2, each through the op layer's linear on
    ``backend`` (the op ours runs them with). The values do not matter to a GEMM's time."""
    from distilbert_fast.ops.functional import linear

    weights = []
    for layer in model.transformer.layer:
        attention, ffn = layer.attention, layer.ffn
        qkv = torch.cat([attention.q_lin.weight, attention.k_lin.weight, attention.v_lin.weight]).detach()
        weights.append([qkv] + [m.weight.detach() for m in (attention.out_lin, ffn.lin1, ffn.lin2)])

    def forward(inputs):
        total = inputs["input_ids"].shape[0]
        x = torch.randn(total, MODEL_CONFIG["dim"], device=weights[0][0].device, dtype=weights[0][0].dtype)
        with torch.inference_mode():
            for qkv, out, lin1, lin2 in weights:
                linear(x, qkv, None, backend=backend)
                hidden = linear(linear(x, out, None, backend=backend), lin1, None, backend=backend)
                x = linear(hidden, lin2, None, backend=backend)
        return x

    return forward


def onnxruntime_forward(hf_model, args) -> Callable[[dict], torch.Tensor]:
    """hf_model exported to ONNX (the TorchScript exporter: its graph is the one onnxruntime's
    BERT fusions match best), fused by onnxruntime.transformers' optimizer, in an onnxruntime
    session with torch's thread count."""
    import tempfile
    import warnings

    import onnxruntime
    from onnxruntime.transformers import optimizer

    if args.device.type != "cpu" or args.dtype != torch.float32:
        sys.exit("--onnxruntime runs on CPU in float32")
    directory = tempfile.mkdtemp(prefix="bench-ort-")
    path = os.path.join(directory, "model.onnx")
    probe = torch.ones(2, 16, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(hf_model, (probe, probe), path, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                          dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes})
    config = hf_model.config
    fused = optimizer.optimize_model(path, model_type="bert", num_heads=config.n_heads, hidden_size=config.dim)
    matched = {op: n for op, n in fused.get_fused_operator_statistics().items() if n}
    print(f"ort: onnxruntime {onnxruntime.__version__}, fused operators {matched}")
    fused.save_model_to_file(path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def forward(inputs):
        feed = {name: inputs[name].cpu().numpy() for name in ("input_ids", "attention_mask")}
        return torch.from_numpy(session.run(None, feed)[0])

    return forward


# -- one measurement -------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    provider: Provider
    median_ms: float = float("nan")
    p20_ms: float = float("nan")
    p80_ms: float = float("nan")
    repeats: int = 0
    timer: str = ""
    max_abs_diff: float = float("nan")
    compile_s: float = float("nan")  # compiled providers: the first call (compilation + a forward)
    error: str = ""

    @property
    def tokens_per_s(self) -> float:
        return self.case.real_tokens / (self.median_ms / 1e3)

    def set_timing(self, timing) -> None:
        self.median_ms, self.p20_ms, self.p80_ms = timing.median_ms, timing.p20_ms, timing.p80_ms
        self.repeats, self.timer = timing.repeats, timing.timer


def measure(provider: Provider, case: Case, reference, args,
            timed: bool = True) -> tuple[Result, torch.Tensor | None]:
    """Runs and checks one provider's first call on one case, then (``timed``) warms it up and
    times it; returns the result and the first call's output."""
    result = Result(case, provider)
    try:
        # The first warm-up call is the checked one (compilation, if any, happens in it too).
        inputs = provider.inputs(case)
        distilbert_fast.ops.backends._last.clear()
        start = time.perf_counter()
        out = provider.forward(inputs)
        if provider.compiled:
            result.compile_s = time.perf_counter() - start
        if provider.impl in ("ours", "bound") and not provider.compiled:
            ran = set(distilbert_fast.last_backend().values())
            if ran != {provider.backend}:
                raise RuntimeError(f"asked for backend {provider.backend!r}, ops ran on {ran}")
        if reference is not None and provider.checked:
            real = out if provider.packed else out[case.keep]
            diff = (real.float() - reference[case.keep].float()).abs()
            result.max_abs_diff = diff.max().item()
        if not timed:
            return result, out
        warmup = args.warmup - 1 + (2 if provider.compiled else 0)
        timing = time_fn(lambda: provider.forward(inputs), args.device,
                         warmup=max(1, warmup), repeats=args.repeats, max_time_s=args.max_time)
    except Exception as exc:  # a failing provider is reported; the others still run
        result.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        return result, None
    result.set_timing(timing)
    return result, out


def time_together(results: list, args) -> None:
    """Times the (first-call-checked) providers of ``results``, one shape's, interleaved."""
    calls = {r.provider.label: (lambda p=r.provider, inputs=r.provider.inputs(r.case): p.forward(inputs))
             for r in results}
    timings = time_interleaved(calls, args.device, args.warmup, args.repeats, args.max_time)
    for r in results:
        r.set_timing(timings[r.provider.label])


# -- output ----------------------------------------------------------------------------------------


def speedup(result: Result, baseline: Result | None) -> str:
    if baseline is None or result.error or baseline.error:
        return "-"
    return f"{baseline.median_ms / result.median_ms:.2f}x"


def table_cells(r: Result, by_label: dict) -> list[str]:
    if r.error:
        return [r.case.name, f"{r.case.real_tokens}", r.provider.label, "FAILED", "", "", "", "", "", "",
                r.error]
    diff = "ref" if r.provider.label == "hf-eager" else f"{r.max_abs_diff:.1e}" if r.provider.checked else "-"
    return [
        r.case.name,
        f"{r.case.real_tokens}",
        r.provider.label,
        f"{r.median_ms:.2f}",
        f"{r.p20_ms:.2f}-{r.p80_ms:.2f}",
        f"{r.tokens_per_s:,.0f}",
        speedup(r, by_label.get("hf-eager")),
        speedup(r, by_label.get("hf-sdpa")),
        speedup(r, by_label.get("ort")),
        diff,
        f"{r.compile_s:.1f}" if r.provider.compiled else "",
    ]


TABLE_HEADER = ["shape", "tokens", "provider", "median ms", "p20-p80 ms", "tokens/s",
                "vs hf-eager", "vs hf-sdpa", "vs ort", "max|diff|", "compile s"]


def csv_row(r: Result, env: dict, args) -> dict:
    return {
        **env,
        "model": MODEL_NAME,
        "dtype": str(args.dtype).removeprefix("torch."),
        "provider": r.provider.label,
        "backend": r.provider.backend,
        "compiled": int(r.provider.compiled),
        "batch": r.case.batch,
        "seq": r.case.seq,
        "varlen": int(r.case.varlen),
        "lengths": r.case.label or ("0.2-1.0 x seq" if r.case.varlen else "full"),
        "real_tokens": r.case.real_tokens,
        "median_ms": f"{r.median_ms:.4f}",
        "p20_ms": f"{r.p20_ms:.4f}",
        "p80_ms": f"{r.p80_ms:.4f}",
        "tokens_per_s": f"{r.tokens_per_s:.1f}",
        "max_abs_diff": f"{r.max_abs_diff:.3e}",
        "repeats": r.repeats,
        "timer": r.timer,
        "compile_s": f"{r.compile_s:.1f}" if r.provider.compiled else "",
    }


# -- main ------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = environment(args.device)
    dtype_name = str(args.dtype).removeprefix("torch.")
    print(f"machine  {env['machine']}\ndevice   {env['device']} ({args.device.type}, {env['threads']} threads)")
    print(f"versions torch {env['torch']}, transformers {env['transformers']}, distilbert_fast "
          f"{distilbert_fast.__version__} @ {env['commit']}")
    print(f"model    {MODEL_NAME} {MODEL_CONFIG}, {dtype_name}")
    if float(env["load_1m"]) > 0.5 * (os.cpu_count() or 1):
        print(f"warning: the machine is busy (load {env['load_1m']} on {os.cpu_count()} cores): "
              "timings will be noisy; the load is recorded with each row")

    providers = build_providers(args)
    print(f"providers {', '.join(p.label for p in providers)}  (built in {time.perf_counter() - started:.1f} s)\n")

    generator = torch.Generator().manual_seed(args.seed)
    cases = [make_case(b, s, False, args.device, generator) for b, s in args.shapes]
    cases += [make_case(b, s, True, args.device, generator) for b, s in args.varlen]
    cases += [make_ragged_case(b, lo, hi, args.device, generator) for b, lo, hi in args.ragged]

    results: list[Result] = []
    total = len(cases) * len(providers)

    def report(result, by_label):
        cells = table_cells(result, by_label)
        print(f"[{results.index(result) + 1:>2}/{total}] {cells[0]:<11} {cells[2]:<22} " + (
            f"FAILED {result.error}" if result.error else
            f"{cells[3]:>9} ms (p20-p80 {cells[4]}, n={result.repeats})  {cells[5]:>8} tok/s  "
            f"{cells[6]:>6} vs hf-eager  {cells[7]:>6} vs hf-sdpa  diff {cells[9]}"
            + (f"  compile {cells[10]} s" if result.provider.compiled else "")
        ), flush=True)

    with torch.inference_mode():
        for case in cases:
            reference = None  # hf-eager's output, the first provider's
            by_label: dict[str, Result] = {}
            for provider in providers:
                result, out = measure(provider, case, reference, args, timed=not args.interleave)
                if provider.label == "hf-eager":
                    reference, result.max_abs_diff = out, 0.0
                by_label[provider.label] = result
                results.append(result)
                if result.error or not args.interleave:
                    report(result, by_label)
            if args.interleave:
                ready = [r for r in by_label.values() if not r.error]
                time_together(ready, args)
                for result in ready:
                    report(result, by_label)

    # Final table, one block per shape; ratios are against the same shape's hf rows.
    rows = []
    for case in cases:
        block = [r for r in results if r.case is case]
        by_label = {r.provider.label: r for r in block}
        rows += [table_cells(r, by_label) for r in block]
    print(f"\n{MODEL_NAME}, {dtype_name}, {env['device']}, {env['threads']} threads; "
          f"median of timed forward calls, tokens = real (unpadded) tokens; "
          f"speedup = baseline median / this median; max|diff| = vs hf-eager on real tokens; "
          f"compile s = a compiled provider's first call, not in its median\n")
    print(format_table(TABLE_HEADER, rows, right={1, 3, 4, 5, 6, 7, 8, 9, 10}))

    ok = [r for r in results if not r.error]
    if not args.no_record and ok:
        append_rows(args.output, [csv_row(r, env, args) for r in ok])
        print(f"\nappended {len(ok)} rows to {args.output}")
    print(f"total time {time.perf_counter() - started:.1f} s")
    failed = len(results) - len(ok)
    if failed:
        print(f"{failed} measurement(s) FAILED (see above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
