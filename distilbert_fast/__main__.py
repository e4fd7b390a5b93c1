"""The command line: ``python -m distilbert_fast <task> --model DIR --input FILE --output FILE``.

    python -m distilbert_fast embed --model ckpt --input texts.txt --output vectors.npy --normalize
    python -m distilbert_fast classify --model ckpt --input reviews.jsonl --text-field body --output labels.jsonl
    python -m distilbert_fast qa --model ckpt --input squad.jsonl --text-field question --pair-field context --output answers.jsonl
    torchrun --nproc_per_node 2 -m distilbert_fast embed ...      # each rank writes its own part
    python -m distilbert_fast merge --output all.jsonl out.rank*.jsonl      # or all.npy out.rank*.npy
    python -m distilbert_fast bench [engine|model|ops|tokenizer ...] [options of that benchmark]

A rerun with the same output resumes where the last run stopped. Bad input lines (invalid JSON
or UTF-8, a missing field, an empty text) are reported with their line number and skipped
(``--strict`` stops at the first); the summary counts read, written and skipped.
"""

import argparse
import collections
import contextlib
import json
import os
import signal
import sys
import threading
import time

from .engine.tasks import AGGREGATIONS, FUNCTIONS, POOLINGS, QA_DECODINGS, TASKS


class BadInput(Exception):
    pass


def _int_or_none(value):
    return None if value in ("none", "all", "None") else value if value == "auto" else int(value)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m distilbert_fast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for task in TASKS:
        p = sub.add_parser(task, help=f"run the {task} task over an input file")
        p.add_argument("--model", required=True, help="local checkpoint directory (config, weights, vocab)")
        p.add_argument("--input", required=True, help="input file (.txt, .jsonl, .csv, .tsv) or - for stdin")
        p.add_argument("--output", required=True, help="output file: .jsonl, or .npy for embed")
        p.add_argument("--input-format", choices=("txt", "jsonl", "csv", "tsv"), help="default: from the extension")
        p.add_argument("--text-field", default="text", help="jsonl field (csv/tsv column) of the text")
        p.add_argument("--pair-field", default=None, help="jsonl field of the second text (qa: the context)")
        p.add_argument("--column", default=None, help="csv/tsv column of the text (default --text-field)")
        p.add_argument("--id-field", default=None, help="field copied to each output line (default: 'id', where "
                                                          "present); once named, every record must have it")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
        p.add_argument("--devices", default=None, help="'all' (one worker per GPU, or per CPU core), a count, "
                                                       "or a comma list like cuda:0,cuda:1")
        p.add_argument("--dtype", default="auto", help="auto, float32, float16, bfloat16")
        p.add_argument("--backend", default=None, help="op backend: auto, eager, cpu, triton, cuda")
        p.add_argument("--max-batch-tokens", type=int, default=None)
        p.add_argument("--max-length", type=int, default=None, help="tokens per row (default: the model's limit)")
        p.add_argument("--overflow", choices=("truncate", "split"), default=None, help="texts longer than max-length")
        p.add_argument("--stride", type=int, default=None, help="overlap of split windows, in tokens")
        p.add_argument("--window", type=int, default=2048, help="texts sorted by length together")
        p.add_argument("--strict", action="store_true", help="stop at the first bad input line")
        p.add_argument("--no-resume", action="store_true", help="start over instead of resuming the output")
        p.add_argument("--progress", choices=("auto", "on", "off"), default="auto")
        if task == "embed":
            p.add_argument("--pooling", choices=POOLINGS, default=None,
                           help="default: a sentence-transformers model's own, else mean")
            p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                           help="L2-normalise the embeddings (default: a sentence-transformers model's "
                                "own choice, else no)")
            p.add_argument("--prompt", default=None,
                           help="text put before every input (default: a sentence-transformers model's default "
                                "prompt, else none)")
        if task in ("classify", "fill-mask", "qa"):
            p.add_argument("--top-k", type=_int_or_none, default={"fill-mask": 5, "classify": "auto"}.get(task, 1),
                           help="results per input ('all' for every one; classify's 'auto': 1, or every label "
                                "over --threshold for a multi-label model)")
        if task == "classify":
            p.add_argument("--multi-label", action="store_true", default=None)
            p.add_argument("--threshold", type=float, default=0.5)
            p.add_argument("--function-to-apply", choices=FUNCTIONS, default=None,
                           help="scores from the logits (default: the model's kind, as HF's pipeline)")
        if task == "tag":
            p.add_argument("--aggregation", choices=AGGREGATIONS, default="first",
                           help="a word's label from its tokens' (simple: one entry per token)")
            p.add_argument("--entities", action="store_true", default=None,
                           help="HF pipeline's entity groups (B-X I-X... as one, 'O' left out) instead of words")
        if task == "qa":
            p.add_argument("--max-answer-len", type=int, default=15)
            p.add_argument("--handle-impossible-answer", action="store_true", default=None,
                           help="the empty answer competes with the spans (SQuAD 2 models)")
            p.add_argument("--align-to-words", action=argparse.BooleanOptionalAction, default=True,
                           help="widen answers to whole words, as HF's pipeline (default: on; off for languages "
                                "written without spaces)")
            p.add_argument("--decoding", choices=QA_DECODINGS, default="best-span",
                           help="pipeline: transformers 4's QuestionAnsweringPipeline scoring, answers equal to its "
                                "(same-text answers' scores summed, [CLS] in the softmax)")
    merge = sub.add_parser("merge", help="merge the .jsonl (or .npy) parts written by torchrun ranks, in input order")
    merge.add_argument("--output", required=True)
    merge.add_argument("parts", nargs="+")
    bench = sub.add_parser("bench", help="run a benchmark of bench/ (default: engine)", add_help=False)
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def task_options(args) -> dict:
    names = {"embed": ("pooling", "normalize", "prompt"), "classify": ("top_k", "multi_label", "threshold", "function_to_apply"),
             "tag": ("aggregation", "entities"), "fill-mask": ("top_k",), "qa": ("top_k", "max_answer_len", "handle_impossible_answer", "align_to_words", "decoding")}[args.command]
    return {name: getattr(args, name) for name in names}


def engine_options(args) -> dict:
    return dict(task=args.command, dtype=args.dtype, backend=args.backend, max_batch_tokens=args.max_batch_tokens,
                max_length=args.max_length, overflow=args.overflow, stride=args.stride, window=args.window,
                progress={"auto": None, "on": True, "off": False}[args.progress], **task_options(args))


def run_settings(args) -> dict:
    """What shapes the results of a run (not how fast it goes): recorded with the output, and a
    resumed run must match it (see ``io.open_writer``)."""
    options = engine_options(args)
    for name in ("max_batch_tokens", "window", "progress", "backend"):  # speed only
        options.pop(name)
    source = args.input if args.input == "-" else os.path.abspath(args.input)
    return {"model": os.path.abspath(args.model), "input": source, "input_format": args.input_format,
            "text_field": args.column or args.text_field, "pair_field": args.pair_field, "id_field": args.id_field or "id",
            **options}


def run_task(args) -> int:
    from .engine import io
    from .engine.workers import make_runner, torchrun_rank

    rank, world, local_rank = torchrun_rank()
    output = io.rank_path(args.output, rank, world) if world > 1 else args.output
    device = args.device
    if world > 1 and device is not None and device.startswith("cuda") and ":" not in device:
        device = f"cuda:{local_rank}"
    needs_pair = TASKS[args.command].needs_pairs
    if needs_pair and args.pair_field is None:
        raise SystemExit(f"{args.command} needs --pair-field (the context of each question)")
    if args.pair_field is not None:  # (found at the first batch before, the output already opened)
        if not TASKS[args.command].takes_pairs:
            raise ValueError(f"{args.command} takes one text per line: --pair-field has no use here")
        if io.input_format(args.input, args.input_format) == "txt":
            raise ValueError("--pair-field needs a .jsonl, .csv or .tsv input: a .txt line is one text")
    if args.id_field is not None and io.input_format(args.input, args.input_format) == "txt":
        raise ValueError("--id-field needs a .jsonl, .csv or .tsv input: a .txt line has no fields")
    if args.input != "-" and not os.path.isfile(args.input):
        raise FileNotFoundError(f"--input {args.input!r} is not a file")
    if args.input != "-" and os.path.exists(output) and os.path.samefile(args.input, output):
        raise ValueError(f"--output {output!r} is the input file: choose another output")  # (--no-resume deleted it)
    # the model first: a model or option the task cannot take leaves no output file behind
    runner = make_runner(args.model, engine_options(args), device=device, devices=args.devices)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)  # (results/run2/out.jsonl)
        writer = io.open_writer(output, args.command, resume=not args.no_resume, settings=run_settings(args),
                                dim=runner.embedding_dim)
    except BaseException:
        runner.close()
        raise
    counts = collections.Counter(resumed=writer.existing)
    pending = collections.deque()  # records handed to the engine, in order
    stopped_by = _stop_signals_as_interrupts()
    held = stopped_by["held"]  # a record's bookkeeping is never cut in half by Ctrl-C / SIGTERM

    def items():
        records = io.read_records(args.input, args.input_format, text_field=args.column or args.text_field,
                                  pair_field=args.pair_field, id_field=args.id_field or "id", column=args.column,
                                  id_required=args.id_field is not None)
        for ordinal, record in enumerate(records):
            if world > 1 and ordinal % world != rank:
                continue  # another rank's shard
            if record.line <= writer.done_line:
                continue  # written by an earlier run
            with held():
                if record.error is None:
                    pending.append(record)
                else:
                    counts["skipped"] += 1
            if record.error is not None:
                print(f"{args.input}:{record.line}: {record.error}", file=sys.stderr, flush=True)
                if args.strict:
                    raise BadInput(f"{args.input}:{record.line}: {record.error} (--strict)")
                continue
            yield (record.text, record.pair) if args.pair_field is not None else record.text

    start = time.perf_counter()
    status = 0
    try:
        for n, result in enumerate(runner.stream(items()), start=1):
            with held():
                writer.add(pending.popleft(), result)
                counts["written"] += 1
                if n % 256 == 0:
                    writer.flush()
    except BadInput as exc:
        print(str(exc), file=sys.stderr)
        status = 1
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (a scheduler's preemption, torchrun stopping a rank)
        name = stopped_by.get("signal", "SIGINT")
        print(f"stopped by {name}: the results so far are written; rerun the same command to resume",
              file=sys.stderr)
        status = 128 + getattr(signal, name)
    finally:
        stopped_by["restore"]()
        writer.close()
        runner.close()
    seconds = time.perf_counter() - start
    # read = written + skipped + unfinished (read ahead, not yet run when the run stopped: a rerun
    # does them). Summed, not counted apart: a Ctrl-C between counting a record and queueing it
    # made the two disagree by one.
    summary = {"read": counts["written"] + counts["skipped"] + len(pending), "written": counts["written"],
               "skipped": counts["skipped"],
               "unfinished": len(pending), "already_written": counts["resumed"], "output": output,
               "seconds": round(seconds, 3),
               "texts_per_s": round(counts["written"] / max(seconds, 1e-9), 1)}
    print(json.dumps(summary), file=sys.stderr)
    return status


def _stop_signals_as_interrupts() -> dict:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so a stopped run writes what
    it has and its summary (SIGTERM's default ended it at once, the results since the last flush
    lost). Inside ``held()`` (a record counted and queued, or written to the output's buffer, or
    a flush) the interrupt waits for the block's end: cut there, a .npy row would outlive its line
    number or a flushed buffer be written twice. Returns {'signal': name once one came,
    'held': context manager, 'restore': callable}."""
    state = {"restore": lambda: None, "held": contextlib.nullcontext}
    if threading.current_thread() is not threading.main_thread():
        return state
    holding, arrived = [False], []

    def interrupt(signum, frame):
        state["signal"] = signal.Signals(signum).name
        if holding[0]:
            arrived.append(signum)
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held():
        if threading.current_thread() is not threading.main_thread():
            yield  # (the engine may read the input on a thread of its own; signals come to the main one)
            return
        holding[0] = True
        try:
            yield
        finally:
            holding[0] = False
        if arrived:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    state["held"] = held
    state["restore"] = lambda: [signal.signal(s, handler) for s, handler in previous.items()]
    return state


def run_merge(args) -> int:
    from .engine.io import merge_parts

    n = merge_parts(args.parts, args.output)
    print(json.dumps({"merged": n, "output": args.output}), file=sys.stderr)
    return 0


def run_bench(argv) -> int:
    import runpy

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    name = argv[0] if argv and not argv[0].startswith("-") else "engine"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    script = os.path.join(repo, "bench", f"bench_{name}.py")
    if not os.path.isfile(script):
        raise SystemExit(f"no benchmark {script}: `bench` runs bench/bench_<name>.py of a source checkout")
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":
        return run_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "merge":
            return run_merge(args)
        return run_task(args)
    except (ValueError, TypeError, OSError) as exc:
        # what the user can fix (a missing file, a bad option, a model the task cannot run): one
        # line, as argparse reports, not a traceback; the output written so far stays resumable
        if os.environ.get("DISTILBERT_FAST_TRACEBACK"):
            raise
        print(f"python -m distilbert_fast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
