"""Beyond one device: a process per device, torchrun shards, and a Ray Data adapter.

- ``WorkerPool(path, options, devices)``: one worker process per device (each loads the model
  itself); the main process reads the input, hands windows of it to the workers round-robin (at
  most two in flight per worker, so memory stays bounded) and yields the results in input order.
  ``devices``: 'all' (every GPU; without one, one worker per CPU core), a count, or a list of
  device names. CPU workers share the cores: each gets cores / workers torch threads.
- ``torchrun_rank()``: (rank, world_size, local_rank) from torchrun's environment; the CLI gives
  each rank the input records with ordinal % world_size == rank and its own output part.
- ``RayPredictor``: a callable class for ``ray.data.Dataset.map_batches`` (an actor pool; pass
  ``num_gpus=1`` per actor on GPUs).
"""

import multiprocessing
import os
import pickle
import queue
import signal
import time

import numpy as np
import torch

from .engine import InferenceEngine, _chunks, advance, progress_bar


def torchrun_rank() -> tuple[int, int, int]:
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def resolve_devices(devices) -> list[str]:
    if devices == "all":
        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu"] * (os.cpu_count() or 1)
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = int(devices)
        if n < 1:
            raise ValueError(f"devices must be at least 1, got {n}")
        if torch.cuda.is_available():
            if n > torch.cuda.device_count():
                raise ValueError(f"devices={n} but only {torch.cuda.device_count()} GPUs are visible")
            return [f"cuda:{i}" for i in range(n)]
        return ["cpu"] * n
    if isinstance(devices, str):
        devices = [d.strip() for d in devices.split(",") if d.strip()]
    if not devices or not all(isinstance(d, str) for d in devices):
        raise ValueError(f"devices must be 'all', a count or a list of device names, got {devices!r}")
    return list(devices)


def _worker(path, options, device, threads, inbox, outbox):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent stops us
    try:
        if threads:
            torch.set_num_threads(threads)
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            # this process's GPU as the current device too, where anything launches on it by default
            torch.cuda.set_device(torch.device(device))
        engine = InferenceEngine.from_pretrained(path, device=device, **{**options, "progress": False})
        outbox.put(("ready", None, engine.model.config.dim))
    except BaseException as exc:  # reported to the parent
        outbox.put(("error", None, _picklable(exc)))
        return
    while True:
        job = inbox.get()
        if job is None:
            return
        seq, chunk = job
        try:
            tokens_before = engine.stats["tokens"]
            results = engine(chunk)
            outbox.put(("ok", seq, (results, engine.stats["tokens"] - tokens_before)))
        except BaseException as exc:
            outbox.put(("error", seq, _picklable(exc)))


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` itself where it pickles (its type reaches the parent: a ValueError stays one), else
    a RuntimeError with its repr."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(repr(exc))


def _worker_error(exc: BaseException, where: str) -> BaseException:
    """A worker's exception, re-raised in the parent with its type and where it happened (so the
    CLI reports a bad model or option in one line, as with one process)."""
    try:
        error = type(exc)(f"a worker failed ({where}): {exc}")
    except Exception:
        error = RuntimeError(f"a worker failed ({where}): {exc!r}")
    return error


class WorkerPool:
    """Results of ``InferenceEngine`` over many devices, in input order (see the module doc)."""

    def __init__(self, path, options: dict, devices):
        self.devices = resolve_devices(devices)
        cpu_workers = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // cpu_workers) if cpu_workers else None
        self.window = options.get("window") or 2048
        self.progress, self.task_name = options.get("progress"), options.get("task", "embed")
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._outbox = ctx.Queue()
        self._inboxes, self._procs = [], []
        for device in self.devices:
            inbox = ctx.Queue()
            proc = ctx.Process(target=_worker, daemon=True,
                               args=(path, options, device, threads if device == "cpu" else None, inbox, self._outbox))
            proc.start()
            self._inboxes.append(inbox)
            self._procs.append(proc)
        self.embedding_dim = None  # the model's hidden size, as the workers loaded it (this process has no model)
        for _ in self._procs:
            kind, _, payload = self._get()
            if kind == "error":
                self.close()
                raise _worker_error(payload, "loading the model")
            self.embedding_dim = payload

    def _get(self):
        while True:
            try:
                return self._outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [p for p in self._procs if not p.is_alive()]
                if dead:  # killed (out of memory, a signal) or crashed: its windows will never come
                    code = dead[0].exitcode
                    how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    raise ChildProcessError(f"a worker process on {self.devices[self._procs.index(dead[0])]} died "
                                            f"({how}); the results so far are written, rerun to resume")

    def stream(self, items, total=None):
        """Results in input order. If reading ``items`` fails, the results of every item read
        before come first (the windows already with the workers are waited for), then the error.
        The progress bar (the engine's option ``progress``) is this process's: the workers have none."""
        bar = progress_bar(self.progress, total, self.task_name)
        try:
            yield from self._stream(items, bar)
        finally:
            if bar is not None:
                bar.close()

    def _stream(self, items, bar):
        chunks = _chunks(items, self.window)
        in_flight, done, next_seq, sent, tokens = 0, {}, 0, 0, 0
        limit = 2 * len(self._procs)
        exhausted, failure = False, None
        while True:
            while not exhausted and in_flight < limit:
                try:
                    chunk = next(chunks, None)
                except Exception as exc:  # raised once the items read before it were handed on
                    chunk, failure = None, exc
                if chunk is None:
                    exhausted = True
                    break
                self._inboxes[sent % len(self._inboxes)].put((sent, chunk))
                sent += 1
                in_flight += 1
            if next_seq == sent and exhausted:
                if failure is not None:
                    raise failure
                return
            while next_seq not in done:
                kind, seq, payload = self._get()
                if kind == "error":
                    raise _worker_error(payload, f"window {seq}")
                done[seq] = payload
            in_flight -= 1
            results, window_tokens = done.pop(next_seq)
            tokens += window_tokens
            advance(bar, len(results), tokens)
            yield from results
            next_seq += 1

    def close(self):
        """Stops the workers: idle ones exit at once; one still busy has work nobody will read
        (the stream was left early, or stopped by Ctrl-C) and is terminated after a second,
        rather than waited for (10 s each before)."""
        for inbox in self._inboxes:
            inbox.put(None)
        deadline = time.monotonic() + 1.0
        for proc in self._procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self._procs, self._inboxes = [], []


class _SingleRunner:
    def __init__(self, engine):
        self.engine = engine
        self.embedding_dim = engine.model.config.dim

    def stream(self, items):
        return self.engine.stream(items)

    def close(self):
        pass


def make_runner(path, options: dict, device=None, devices=None):
    """An object with ``stream(items)`` and ``close()``: one engine here, or a WorkerPool."""
    if devices is not None and devices != "1":
        return WorkerPool(path, options, devices)
    return _SingleRunner(InferenceEngine.from_pretrained(path, device=device, **options))


class RayPredictor:
    """For ``ds.map_batches(RayPredictor, fn_constructor_kwargs={"path": ..., "task": "embed"},
    concurrency=n, batch_format="numpy")`` (add ``num_gpus=1`` on GPUs): reads ``column`` (and
    ``pair_column``), adds ``output_column`` (embeddings as a (rows, dim) array; other tasks' results
    as JSON strings, which every Ray format can hold)."""

    def __init__(self, path, task="embed", column="text", pair_column=None, output_column=None, device=None,
                 **options):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.engine = InferenceEngine.from_pretrained(path, task=task, device=device, progress=False, **options)
        self.task, self.column, self.pair_column = task, column, pair_column
        self.output_column = output_column or {"embed": "embedding"}.get(task, "result")

    def __call__(self, batch: dict) -> dict:
        texts = _text_column(batch, self.column)
        pairs = None if self.pair_column is None else _text_column(batch, self.pair_column)
        results = self.engine(texts, pairs)
        if self.task == "embed":
            dim = self.engine.model.config.dim
            batch[self.output_column] = np.stack(results) if results else np.zeros((0, dim), np.float32)
        else:
            import json

            from .io import to_json

            batch[self.output_column] = np.array([json.dumps(to_json(r), ensure_ascii=False) for r in results])
        return batch


def _text_column(batch: dict, column: str) -> list:
    """The column's values, which must be strings: a missing value (None, NaN) was embedded as
    the text 'None' / 'nan' and a number as its digits, with no word."""
    if column not in batch:
        if not any(len(values) for values in batch.values()):  # an empty batch may come without its columns
            return []
        raise KeyError(f"the batch has no column {column!r}; its columns: {sorted(batch)}")
    values = list(batch[column])
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"column {column!r} must hold strings, got {type(value).__name__} {value!r} in row {row} "
                            "of this batch (filter or fill missing values first)")
    return values
