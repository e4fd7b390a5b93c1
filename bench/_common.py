"""Helpers every benchmark in bench/ shares: timing, where a number came from, results files.

    timing = time_fn(lambda: model(**inputs), device, warmup=2, repeats=10, max_time_s=5.0)
    row = {**environment(device), "median_ms": timing.median_ms, ...}
    append_rows("bench/results/model.csv", [row])

Timing follows STYLE.md ("Benchmarks that can be trusted"): warm up first, then time each call
separately and report the median with p20/p80. CPU calls are timed with time.perf_counter; CUDA
calls with a pair of CUDA events around each call, read after one synchronize.
"""

import csv
import datetime
import math
import os
import platform
import socket
import subprocess
import time
from dataclasses import dataclass

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
RESULTS_DIR = os.path.join(BENCH_DIR, "results")


# -- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int  # timed calls (warm-up calls not counted)
    timer: str  # "perf_counter" or "cuda_event"


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linearly interpolated (numpy's default)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_fn(fn, device: torch.device, warmup: int, repeats: int, max_time_s: float,
            min_repeats: int = 3, flush_cache: bool = False) -> Timing:
    """Times ``fn()`` on ``device``.

    ``warmup`` untimed calls come first (at least one: lazy init, autotuning and compilation
    happen there). The last of them, synchronised, estimates one call's cost; from it the number
    of timed calls is ``max_time_s / estimate``, at least ``min_repeats`` and at most ``repeats``, so
    slow shapes stay near the time budget and fast ones get ``repeats`` samples.

    ``flush_cache`` (CUDA only) overwrites a 256 MiB buffer before each timed call, outside the
    timed region, so a small kernel is not timed on a warm L2 cache (triton's do_bench does the
    same). Whole-model benchmarks do not need it.
    """
    is_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    warmup = max(1, warmup)
    for _ in range(warmup - 1):
        fn()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    estimate_s = time.perf_counter() - start
    n = min(repeats, max(min_repeats, math.ceil(max_time_s / max(estimate_s, 1e-9))))

    if is_cuda:
        cache = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device=device) if flush_cache else None
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for i in range(n):
            if cache is not None:
                cache.zero_()
            starts[i].record()
            fn()
            ends[i].record()
        torch.cuda.synchronize()
        times_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        timer = "cuda_event"
    else:
        times_ms = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times_ms.append((time.perf_counter() - start) * 1e3)
        timer = "perf_counter"

    return Timing(
        median_ms=percentile(times_ms, 50),
        p20_ms=percentile(times_ms, 20),
        p80_ms=percentile(times_ms, 80),
        repeats=n,
        timer=timer,
    )


def time_interleaved(calls: dict, device: torch.device, warmup: int, repeats: int,
                     max_time_s: float) -> dict:
    """{name: Timing} of ``calls`` ({name: fn}) timed in round-robin rounds (a, b, a, b, ...), so
    a change in the machine's load (it is shared) hits every provider alike; median and p20/p80
    per provider. ``warmup`` rounds first (at least one); then up to ``repeats`` rounds, stopping
    after 3 once ``max_time_s`` per provider is spent."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(max(1, warmup)):
        for fn in calls.values():
            fn()
    sync()
    samples = {name: [] for name in calls}
    start = time.perf_counter()
    for i in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            sync()
            samples[name].append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= 3 and time.perf_counter() - start > max_time_s * len(calls):
            break
    return {name: Timing(percentile(v, 50), percentile(v, 20), percentile(v, 80), len(v), "perf_counter")
            for name, v in samples.items()}


def uniform_lengths(batch: int, lo: int, hi: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` sequence lengths for a ragged batch "uniform in [lo, hi]": the distribution's
    quantiles at (i + 0.5) / batch, in an order shuffled by ``generator``. Every run times the same
    representative batch (mean (lo + hi) / 2, longest near hi); a random draw made the padding,
    and so every speedup from packing, depend on the draw (32 x U[16, 256]: 4302 or 5005 real
    tokens, by what the generator had drawn before)."""
    quantiles = (torch.arange(batch, dtype=torch.float64) + 0.5) / batch
    lengths = (lo + quantiles * (hi - lo)).round().long()
    return lengths[torch.randperm(batch, generator=generator)]


# -- where a number came from ----------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", *args],  # read-only: never rewrites the index
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str:
    """Short HEAD commit, with '-dirty' if the working tree differs from it (tracked changes or
    untracked files; the results folder itself does not count)."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return "unknown"
    status = _git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return commit + ("-dirty" if status else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def load_1m() -> float:
    """The 1-minute load average: other work on the machine skews CPU timings, so it is recorded."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def environment(device: torch.device) -> dict:
    """The columns that say where and when a result was measured (load_1m is taken now, before
    the benchmark itself loads the machine)."""
    try:
        import transformers
        transformers_version = transformers.__version__
    except ImportError:
        transformers_version = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{socket.gethostname()} ({cpu_model()}, {os.cpu_count()} cores)",
        "device": device_name(device),
        "device_type": device.type,
        "threads": torch.get_num_threads(),
        "load_1m": f"{load_1m():.2f}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "transformers": transformers_version,
    }


# -- results files ---------------------------------------------------------------------------------


def append_rows(path: str, rows: list[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path``, creating it (and its folder) with a header if
    absent. If the file's header lacks some of the rows' columns (a benchmark grew a column), the
    file is rewritten once with the union of columns, old rows left blank in the new ones."""
    if not rows:
        return
    columns = list(rows[0])
    for row in rows[1:]:
        columns += [c for c in row if c not in columns]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            existing = list(reader.fieldnames or [])
            missing = [c for c in columns if c not in existing]
            old_rows = list(reader) if missing else None
        if missing:
            existing += missing
            with open(path, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=existing)
                writer.writeheader()
                writer.writerows(old_rows)
        columns = existing
        mode, header = "a", False
    else:
        mode, header = "w", True

    with open(path, mode, newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)


def format_table(header: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A plain text table; columns whose index is in ``right`` are right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
