"""InferenceEngine: texts in, results out, in input order, with bounded memory.

    from distilbert_fast.engine import InferenceEngine
    engine = InferenceEngine.from_pretrained("path/to/checkpoint", task="embed", normalize=True)
    vectors = engine(["first text", "second text"])          # a list, in input order
    for result in engine.stream(texts_of_any_length): ...     # a generator, in input order

The input is read in windows of ``window`` items, on the caller's thread, one window ahead. A
background thread tokenizes a window (the tokenizer's C++ threads, GIL released), sorts its rows by length and packs them into batches of at
most ``max_batch_tokens`` real tokens. The main thread queues every batch of a window on the
device; on CUDA it then puts the previous window's results back in input order and yields them,
so the device computes one window while the host finishes the one before and never waits for the
host's per-item work (on CPU the batches run as they are queued, and each window's results are
yielded at once). At most three windows are held at any time (one being tokenized, one queued,
one being finished).
"""

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..tokenization import DistilBertTokenizerFast
from .batching import PackedBatch, pack_batch, plan_batches
from .checkpoints import inspect_checkpoint, load_model
from .tasks import TASKS

DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 16384}
DEFAULT_WINDOW = 2048


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX512_BF16 or AMX): there bf16 GEMMs beat fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """'auto' -> fp16 on CUDA; bf16 on a CPU with native bf16, else fp32. A name or torch.dtype
    passes through (checked)."""
    if dtype == "auto" or dtype is None:
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    if isinstance(dtype, str):
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}.get(dtype, dtype)
        dtype = getattr(torch, dtype, None) if isinstance(getattr(torch, dtype, None), torch.dtype) else dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', got {dtype!r}")
    return dtype


def resolve_device(device) -> torch.device:
    """None -> CUDA if available, else CPU; a name or torch.device, checked here rather than at
    the first batch (an unknown name, or CUDA where torch has none, was a traceback from torch)."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device={str(device)!r}, but torch sees no CUDA device (torch.cuda.is_available() "
                             "is False): use device='cpu'")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device={str(device)!r}, but torch sees {count} CUDA device(s)")
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {str(device)!r}")
    return device


def check_backend(backend, device: torch.device, dtype: torch.dtype) -> None:
    """A backend named explicitly must run on ``device`` in ``dtype``: found here, not as a
    RuntimeError at the first batch (e.g. 'triton' on a CPU without TRITON_INTERPRET)."""
    if backend is None or backend == "auto":
        return
    from ..ops.backends import available_backends, check_backend_name

    check_backend_name(backend)
    available = available_backends(torch.empty(0, device=device, dtype=dtype))
    if backend not in available:
        raise ValueError(f"backend={backend!r} cannot run on {device} in {dtype}; there: 'auto' or one of "
                         f"{available}")


@dataclass
class DeviceBatch:
    """One batch's inputs on the model's device (what tasks' ``forward`` reads)."""

    ids: torch.Tensor  # (total,) int64
    cu_seqlens: torch.Tensor  # (batch + 1,) int32
    max_seqlen: int
    row_of_token: torch.Tensor  # (total,) int64
    lengths: torch.Tensor  # (batch,) int64
    mask_positions: torch.Tensor  # (masks,) int64: positions of the mask token (fill-mask)


@dataclass
class _Window:
    items: list  # the inputs: str, or (text, pair)
    enc: object  # batching.Encoded
    batches: list  # [(PackedBatch, host tensors)]
    tokens: int


class InferenceEngine:
    """Runs one task over many inputs. Build it with ``from_pretrained``; call it on a list or
    ``stream`` an iterable."""

    def __init__(self, model, tokenizer, task, *, device, max_batch_tokens=None, max_batch_rows=None,
                 window=DEFAULT_WINDOW, progress=None, cuda_graphs=None):
        self.model, self.tokenizer, self.task, self.device = model, tokenizer, task, torch.device(device)
        if max_batch_tokens is None:
            max_batch_tokens = DEFAULT_BATCH_TOKENS.get(self.device.type, 8192)
        self.max_batch_tokens = max_batch_tokens
        if isinstance(self.max_batch_tokens, bool) or not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be a positive int, got {max_batch_tokens!r}")
        if max_batch_rows is not None and (not isinstance(max_batch_rows, int) or max_batch_rows < 1):
            raise ValueError(f"max_batch_rows must be a positive int or None, got {max_batch_rows!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self.max_batch_rows, self.window, self.progress = max_batch_rows, window, progress
        self._pin = self.device.type == "cuda"
        self._overlap = self._pin  # the device computes a window while the host finishes the one before
        self._graphs = None
        if cuda_graphs is None:
            from .cuda_graphs import graphs_pay
            cuda_graphs = graphs_pay(model, self.device, task)
        if cuda_graphs:
            from .cuda_graphs import GraphedForward
            self._graphs = GraphedForward(task, model, self.device, self.max_batch_tokens)
        self.stats = {"texts": 0, "tokens": 0, "batches": 0, "seconds": 0.0}
        # On CUDA: how long the device waited between batches (device_idle_s) against the span
        # from the first batch's start to the last one's end (device_span_s), from timing events
        # around each batch: the gap before a batch is zero whenever it was queued in time.
        self._last_done = None
        if self._pin:
            self.stats.update(device_idle_s=0.0, device_span_s=0.0)

    @classmethod
    def from_pretrained(cls, path, task="embed", *, device=None, dtype="auto", backend=None, max_batch_tokens=None,
                        max_batch_rows=None, window=DEFAULT_WINDOW, max_length=None, overflow=None, stride=None,
                        progress=None, cuda_graphs=None, tokenizer_threads=None, **task_options):
        """Loads the model for ``task`` ('embed', 'classify', 'tag', 'fill-mask', 'qa') and its
        tokenizer from a local directory: our (or transformers') DistilBERT checkpoint, or for
        embed also a BERT encoder or a sentence-transformers model folder, whose pooling,
        normalisation and max_seq_length are the defaults (see ``checkpoints``). ``device``: 'cpu', 'cuda', 'cuda:1' (default: CUDA if
        available). ``dtype``: 'auto' (fp16 on CUDA; bf16 on a CPU with native bf16, else fp32),
        'float32', 'float16', 'bfloat16'. ``max_length``: tokens per row (default the model's
        limit; qa 384); ``overflow``: 'truncate' or 'split' (windows overlapping by ``stride``
        tokens) for texts longer than that. Task options: embed ``pooling``, ``normalize``;
        classify ``top_k``, ``multi_label``, ``threshold``; tag ``aggregation``; fill-mask
        ``top_k``; qa ``top_k``, ``max_answer_len``, ``handle_impossible_answer``, ``align_to_words``."""
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(map(repr, TASKS))}, got {task!r}")
        device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        check_backend(backend, device, torch_dtype)
        task_class = TASKS[task]
        _check_task_options(task_class, task_options)
        checkpoint = inspect_checkpoint(path)
        model = load_model(checkpoint, task_class.model_class, torch_dtype, backend).to(device).eval()
        tokenizer = DistilBertTokenizerFast.from_pretrained(checkpoint.model_dir, num_threads=tokenizer_threads)
        if task == "embed":  # a sentence-transformers model's pooling, where the caller gave none
            task_options = {**checkpoint.embed_defaults,
                            **{name: value for name, value in task_options.items() if value is not None}}
        task_obj = task_class(model.config, tokenizer,
                              max_length=max_length if max_length is not None else checkpoint.max_length,
                              overflow=overflow, stride=stride, **task_options)
        return cls(model, tokenizer, task_obj, device=device, max_batch_tokens=max_batch_tokens,
                   max_batch_rows=max_batch_rows, window=window, progress=progress, cuda_graphs=cuda_graphs)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the public calls ---------------------------------------------------------------------------
    def __call__(self, texts, text_pairs=None) -> list:
        """Results for a list of texts (or of (text, pair) tuples, or texts plus ``text_pairs``)."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of str (one text: pass [text])")
        items = list(texts) if text_pairs is None else list(zip(texts, text_pairs, strict=True))
        return list(self.stream(items, total=len(items)))

    def stream(self, items, total=None):
        """Yields one result per item of ``items`` (any iterable: str, or (text, pair) tuples for
        qa / pairs), in input order, holding at most three windows in memory. ``items`` is read
        on the caller's thread (a sqlite3 cursor, say, refuses any other), a window ahead of the
        one the model runs. If reading or tokenizing ``items`` fails, the results of every item
        before the failing window come first, then the error."""
        chunks = _chunks(items, self.window)
        preparer = _Preparer(self._prepare)
        bar = progress_bar(self.progress, total, self.task.name)
        self._last_done = None
        failure = None  # the input's error: raised once the windows before it are yielded
        read = 0  # items read so far (a bad item is named by its index)

        def read_ahead() -> bool:
            """Reads the next window of items and hands it to the preparer; False at the end."""
            nonlocal failure, read
            if failure is not None:
                return False
            try:
                chunk = next(chunks)
            except StopIteration:
                return False
            except Exception as exc:  # (the items read before it came as a window of their own)
                failure = exc
                return False
            preparer.submit(chunk, read)
            read += len(chunk)
            return True

        try:
            queued = None  # (window, its launched batches), results not read yet
            in_preparation = int(read_ahead())
            while in_preparation:
                in_preparation += read_ahead()  # the next window is tokenized while this one runs
                try:
                    window = preparer.take()
                except Exception as exc:  # the tokenizer refused an item: the queued window's results first
                    failure = exc
                    break
                in_preparation -= 1
                start = time.perf_counter()
                launched = self._launch(window)
                self.stats["seconds"] += time.perf_counter() - start
                if queued is not None:
                    yield from self._finish(*queued, bar)
                queued = (window, launched)
                if not self._overlap:  # on CPU the batches ran as they were queued: nothing to overlap
                    yield from self._finish(*queued, bar)
                    queued = None
            if queued is not None:
                yield from self._finish(*queued, bar)
            if failure is not None:
                raise failure
        finally:
            preparer.close()
            chunks.close()
            if bar is not None:
                bar.close()

    # -- host side: tokenize and batch (the preparer's thread) ------------------------------------------
    def _prepare(self, chunk: list, start: int = 0) -> _Window:
        """Tokenizes and packs one window, whose first item is item ``start`` of the input."""
        texts, pairs = _split_items(chunk, self.task, start)
        try:
            enc = self.task.encode(self.tokenizer, texts, pairs)
        except ValueError as exc:  # the tokenizer refuses the window: name the item
            bad = _invalid_unicode(chunk)
            if bad is None:
                raise
            raise ValueError(f"item {start + bad} is not valid Unicode: {exc}") from None
        # The ids are checked here, where they are made, on the host: the model's packed forward
        # on a GPU only flags bad ids on the device (it must not sync), and the engine's batches
        # (cu_seqlens from the planner) are valid by construction.
        vocab_size = self.model.config.vocab_size
        if enc.ids.size and int(enc.ids.max()) >= vocab_size:
            raise ValueError(f"the tokenizer made id {int(enc.ids.max())}, but the model's vocab_size is "
                             f"{vocab_size}: the tokenizer's vocab does not belong to this model")
        batches = []
        for rows in plan_batches(enc.lengths, self.max_batch_tokens, self.max_batch_rows):
            batch = pack_batch(enc, rows)
            batches.append((batch, self._host_tensors(batch)))
        return _Window(chunk, enc, batches, int(enc.cu[-1]))

    def _host_tensors(self, batch: PackedBatch) -> dict:
        host = {
            "ids": torch.from_numpy(batch.ids),
            "cu_seqlens": torch.from_numpy(batch.cu_seqlens),
            "row_of_token": torch.from_numpy(batch.row_of_token()),
            "lengths": torch.from_numpy(np.diff(batch.cu_seqlens).astype(np.int64)),
            "mask_positions": torch.from_numpy(np.nonzero(batch.ids == self.tokenizer.mask_token_id)[0]),
        }
        if self._pin:
            host = {k: v.pin_memory() for k, v in host.items()}
        return host

    # -- device side: queue a window's batches, then read their results ---------------------------
    def _launch(self, window: _Window) -> list:
        """Queues every batch of ``window`` (inputs in, model, outputs back to the host, all
        asynchronous on CUDA); returns [(batch, host outputs, started, done)]."""
        launched = []
        with torch.inference_mode():
            for batch, host in window.batches:
                started = _timing_event() if self._pin else None
                inputs = DeviceBatch(max_seqlen=batch.max_seqlen, **{
                    k: v.to(self.device, non_blocking=self._pin) for k, v in host.items()})
                forward = self._graphs if self._graphs is not None and self._graphs.fits(batch) else self.task.forward
                out = forward(self.model, inputs)
                out = {k: v.to("cpu", non_blocking=self._pin) for k, v in out.items()}
                launched.append((batch, out, started, _timing_event() if self._pin else None))
                self.stats["batches"] += 1
        return launched

    def _finish(self, window: _Window, launched: list, bar) -> list:
        """The results of ``window``'s items, in input order, once its batches are done."""
        start = time.perf_counter()
        values = [None] * (len(window.enc.cu) - 1)
        for pending in launched:
            self._collect(pending, values)
        enc, items = window.enc, window.items
        bounds = np.searchsorted(enc.item, np.arange(len(items) + 1))  # rows of item i: bounds[i]..bounds[i+1]
        results = []
        for i, item in enumerate(items):
            rows = np.arange(bounds[i], bounds[i + 1])
            text, pair = item if isinstance(item, tuple) else (item, None)
            results.append(self.task.combine(i, rows, [values[r] for r in rows], enc, text, pair))
        self.stats["seconds"] += time.perf_counter() - start
        self.stats["texts"] += len(items)
        self.stats["tokens"] += window.tokens
        advance(bar, len(items), self.stats["tokens"])
        return results

    def _collect(self, pending, values):
        batch, out, started, done = pending
        if done is not None:
            done.synchronize()
            self._account_device_time(started, done)
        host = {k: v.numpy() for k, v in out.items()}
        for row, value in zip(batch.rows.tolist(), self.task.split(host, batch)):
            values[row] = value

    def _account_device_time(self, started, done):
        """Adds the device's wait before this batch (from the previous batch's end) to the idle
        time, and this batch's span to the total. Both events have completed here."""
        if self._last_done is not None:
            self.stats["device_idle_s"] += self._last_done.elapsed_time(started) / 1e3
            self.stats["device_span_s"] += self._last_done.elapsed_time(done) / 1e3
        else:
            self.stats["device_span_s"] += started.elapsed_time(done) / 1e3
        self._last_done = done

    @property
    def device_idle_fraction(self) -> float | None:
        """The fraction of the device's time spent waiting between batches so far (CUDA only)."""
        span = self.stats.get("device_span_s")
        return self.stats["device_idle_s"] / span if span else None


def _check_task_options(task_class, options: dict):
    """An option the task does not take (top_k for embed, say) is named, with the task's options,
    before the model loads (it was a TypeError from the task's __init__ after it)."""
    import inspect

    known = [name for name, p in inspect.signature(task_class.__init__).parameters.items()
             if p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("self", "config", "tokenizer")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"task {task_class.name!r} takes no option {', '.join(map(repr, unknown))}; its options: "
                        f"{', '.join(known)}")


def progress_bar(progress, total, task_name):
    """A tqdm bar counting texts, or None: ``progress`` True / False, or None for 'when stderr is a
    terminal' (off for non-interactive use)."""
    show = progress if progress is not None else sys.stderr.isatty()
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=" texts", desc=task_name, dynamic_ncols=True)


def advance(bar, texts: int, tokens_so_far: int):
    """Counts ``texts`` more done on ``bar`` (if any) and shows the tokens/s so far beside texts/s."""
    if bar is None:
        return
    bar.update(texts)
    elapsed = bar.format_dict["elapsed"] or 1e-9
    bar.set_postfix_str(f"{tokens_so_far / elapsed:,.0f} tokens/s", refresh=False)


def _timing_event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _split_items(chunk, task, start=0):
    """(texts, pairs or None) of a window's items, checked; a bad one is named by its index in the
    input (``start``: the window's first), which among a million items is the one thing to know."""
    first = chunk[0]
    if isinstance(first, tuple):
        if not task.takes_pairs:
            raise TypeError(f"{task.name} takes one text per item, got a tuple: {first!r} (item {start})")
        for i, item in enumerate(chunk):
            if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
                raise TypeError(f"items must all be (text, pair) tuples of str like the first; got {item!r} "
                                f"(item {start + i})")
        return [a for a, _ in chunk], [b for _, b in chunk]
    if task.needs_pairs:
        raise TypeError(f"this task takes (question, context) pairs, got {type(first).__name__} (item {start})")
    for i, item in enumerate(chunk):
        if not isinstance(item, str):
            raise TypeError(f"items must be str (or (text, pair) tuples), got {type(item).__name__} {item!r:.60} "
                            f"(item {start + i})")
    return chunk, None


def _invalid_unicode(chunk) -> int | None:
    """The index of the first item holding a lone surrogate (no UTF-8 form), or None."""
    for i, item in enumerate(chunk):
        for text in item if isinstance(item, tuple) else (item,):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                return i
    return None


def _chunks(items, size):
    """Lists of ``size`` items. If reading ``items`` fails, the items read so far come first (a
    KeyboardInterrupt passes at once: the run stops)."""
    chunk = []
    try:
        for item in items:
            chunk.append(item)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except Exception:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk


class _Preparer:
    """Prepares windows (``prepare(chunk)``: tokenize, sort, pack) on a daemon thread, in the order
    they are submitted; ``take()`` returns the next one or raises its exception; ``close()`` stops
    the thread. It never reads the caller's iterable: the caller reads it and submits the chunks."""

    _STOP = object()

    def __init__(self, prepare):
        self._prepare = prepare
        self._inbox, self._outbox = queue.Queue(), queue.Queue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="engine-prepare")
        self._thread.start()

    def _run(self):
        while True:
            job = self._inbox.get()
            if job is self._STOP or self._stopped.is_set():  # (a stream left early: no more work)
                return
            try:
                self._outbox.put((self._prepare(*job), None))
            except BaseException as exc:  # handed to the consumer
                self._outbox.put((None, exc))

    def submit(self, chunk: list, start: int):
        self._inbox.put((chunk, start))

    def take(self):
        window, exc = self._outbox.get()
        if exc is not None:
            raise exc
        return window

    def close(self):
        self._stopped.set()
        self._inbox.put(self._STOP)
        self._thread.join(timeout=5)


def set_cpu_threads(n: int | None):
    """Torch intra-op threads for a CPU worker (None: leave torch's default)."""
    if n:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
