"""Reading inputs and writing outputs for the command line: records with line numbers, bad
input reported (never dropped silently), outputs that can be resumed and are never torn.

Inputs: .txt (one text a line), .jsonl (``text_field``, ``pair_field``, ``id_field``), .csv /
.tsv (``column``, ``pair_column``, an ``id`` column if present; the first row is the header);
'-' reads stdin in ``input_format``. Every line is decoded as UTF-8 on its own, so one bad line
is reported and the rest still read.

Outputs: .jsonl, one result a line ({"line": n, "id": ..., **result}), appended as whole lines
and fsync'd; on resume a partial last line (a killed run) is cut off and the input lines up to
the last written one are skipped. .npy (embed): rows appended to ``OUT.partial`` and their line
numbers to ``OUT.partial.lines``; at the end ``OUT`` and ``OUT.lines.jsonl`` (row -> line, id) are
written to temporary names and renamed (a rerun over a finished .npy resumes from those two).
``OUT.run.json`` records the settings that shape the results (task, model, input, options): a
rerun with other settings is refused rather than mixing two kinds of results in one file.
"""

import csv
import json
import os
import re
import sys
from dataclasses import dataclass

import numpy as np

FORMATS = ("txt", "jsonl", "csv", "tsv")


class _NoId:
    """A record without an id field (a JSON null id is None, and is written as null)."""

    def __repr__(self):
        return "NO_ID"


NO_ID = _NoId()


@dataclass
class Record:
    line: int  # 1-based line number in the input (the first line of a csv record)
    text: str | None  # None: bad input (see error)
    pair: str | None = None
    id: object = NO_ID  # the input's id field as it is (a JSON null is None), NO_ID where there is none
    error: str | None = None


def input_format(path: str, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
        return fmt
    if path == "-":
        return "txt"
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext in FORMATS:
        return ext
    if ext == "json":
        return "jsonl"
    raise ValueError(f"cannot tell the input format of {path!r} from its extension: expected .txt, .jsonl, .csv or "
                     ".tsv, or pass --input-format")


_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _lines(stream, errors="strict"):
    """(line number, str or None for invalid UTF-8, error) of a binary stream, newline stripped.
    A UTF-8 byte order mark at the start (Excel's "CSV UTF-8", Notepad) is not part of the text.
    With ``errors="surrogateescape"`` a bad line still comes as text (its bad bytes as lone
    surrogates), beside its error."""
    for number, raw in enumerate(stream, start=1):
        raw = raw.rstrip(b"\n").rstrip(b"\r")
        if number == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        elif number == 1 and raw[:2] in _UTF16_BOMS:  # (every line was 'invalid UTF-8', a million reports)
            raise ValueError("the input is UTF-16 (it starts with a UTF-16 byte order mark, as Windows' 'Unicode' "
                             "saves): convert it to UTF-8 first, e.g. iconv -f UTF-16 -t UTF-8")
        try:
            yield number, raw.decode("utf-8"), None
        except UnicodeDecodeError as exc:
            text = raw.decode("utf-8", errors) if errors != "strict" else None
            yield number, text, f"invalid UTF-8 ({exc.reason} at byte {exc.start})"


def read_records(path, fmt=None, *, text_field="text", pair_field=None, id_field="id", column=None,
                 pair_column=None, id_required=False):
    """Yields a Record per input record, bad ones with ``error`` set and ``text`` None. With
    ``id_required`` (an --id-field named by the user) a record without it is bad input, and a
    csv header without it an error: a misspelt field gave every line no id, without a word."""
    fmt = input_format(path, fmt)
    stream = sys.stdin.buffer if path == "-" else open(path, "rb")
    try:
        if fmt == "txt":
            for number, text, error in _lines(stream):
                yield _checked(Record(number, text, error=error))
        elif fmt == "jsonl":
            for number, text, error in _lines(stream):
                yield _checked(_json_record(number, text, error, text_field, pair_field, id_field, id_required))
        else:
            yield from _csv_records(stream, "," if fmt == "csv" else "\t", column or text_field, pair_column or pair_field,
                                    id_field, id_required)
    finally:
        if stream is not sys.stdin.buffer:
            stream.close()


def _checked(record: Record) -> Record:
    if record.error is None:
        if record.text is None or not record.text.strip() or (record.pair is not None and not record.pair.strip()):
            record.error = "empty text"
    if record.error is not None:
        record.text = record.pair = None
    return record


def _json_record(number, text, error, text_field, pair_field, id_field, id_required=False) -> Record:
    if error is not None:
        return Record(number, None, error=error)
    if not text.strip():
        return Record(number, None, error="empty line")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Record(number, None, error=f"invalid JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return Record(number, None, error=f"expected a JSON object, got {type(obj).__name__}")
    record = Record(number, None, id=obj.get(id_field, NO_ID))
    if id_required and id_field not in obj:
        record.error = f"missing field {id_field!r} (--id-field)"
        return record
    for name, attr in ((text_field, "text"), (pair_field, "pair")):
        if name is None:
            continue
        if name not in obj:
            record.error = f"missing field {name!r}"
            return record
        if not isinstance(obj[name], str):
            record.error = f"field {name!r} must be a string, got {type(obj[name]).__name__}"
            return record
        try:  # a \ud800-style escape decodes to a lone surrogate, which no tokenizer takes (the window failed)
            obj[name].encode("utf-8")
        except UnicodeEncodeError as exc:
            record.error = f"field {name!r} holds a lone surrogate {obj[name][exc.start]!r} (not valid Unicode)"
            return record
        setattr(record, attr, obj[name])
    return record


def _csv_records(stream, delimiter, column, pair_column, id_field, id_required=False):
    # csv needs str lines: each physical line is decoded on its own, a bad one with its bad bytes
    # escaped, so that csv still sees it (a quoted field may span lines) and the record holding it
    # is reported at its own first line
    numbers, errors = [], {}  # the physical lines csv read for the record at hand, and their errors

    def decoded():
        for number, text, error in _lines(stream, errors="surrogateescape"):
            numbers.append(number)
            if error is not None:
                errors[number] = error
            yield text + "\n"

    _lift_csv_field_limit()
    reader = csv.reader(decoded(), delimiter=delimiter)
    header = None
    for row in reader:  # csv reads no line beyond the record it returns
        first, bad = numbers[0], min(errors, default=None)
        error = None if bad is None else errors[bad] + ("" if bad == first else f" on line {bad}")
        numbers.clear()
        errors.clear()
        if header is None:
            if error is not None:
                raise ValueError(f"the input's header (line {first}) is not valid: {error}")
            header = row
            for name in (column, pair_column, id_field if id_required else None):
                if name is not None and name not in header:
                    raise ValueError(f"column {name!r} is not in the input's header {header}")
            continue
        record = Record(first, None, error=error)
        if error is None:
            record.id = NO_ID if id_field not in header else _cell(header, row, id_field)
            if not row:
                record.error = "empty line"
            elif len(row) != len(header):
                record.error = f"expected {len(header)} fields, got {len(row)}"
            else:
                record.text = _cell(header, row, column)
                if pair_column is not None:
                    record.pair = _cell(header, row, pair_column)
        yield _checked(record)


def _lift_csv_field_limit():
    """csv refuses a field over 128 KiB (csv.Error at that record, the run lost): a text has no
    such limit here (the tokenizer truncates or splits it), so the limit is the largest C long."""
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits (Windows)
            limit //= 2


def _cell(header, row, name):
    if name is None or name not in header:
        return None
    i = header.index(name)
    return row[i] if i < len(row) else None


# -- outputs -------------------------------------------------------------------------------------------


def to_json(result) -> object:
    """A task result as JSON-able data (numpy arrays and scalars to lists and floats)."""
    if isinstance(result, np.ndarray):
        return result.tolist()
    if isinstance(result, dict):
        return {k: to_json(v) for k, v in result.items()}
    if isinstance(result, (list, tuple)):
        return [to_json(v) for v in result]
    if isinstance(result, np.generic):
        return result.item()
    return result


RESULT_KEY = {"embed": "embedding", "classify": "labels", "tag": "words", "fill-mask": "masks", "qa": "answers"}


def result_fields(task: str, result) -> dict:
    """The fields a result adds to its output line: dicts as they are, anything else under the
    task's key."""
    if isinstance(result, dict):
        return to_json(result)
    return {RESULT_KEY[task]: to_json(result)}


def _fsync(f):
    f.flush()
    os.fsync(f.fileno())


class JsonlWriter:
    """Appends result lines to a .jsonl; ``done_line`` is the last input line already written."""

    def __init__(self, path, task, resume=True, settings=None):
        self.path, self.task = path, task
        self.done_line, self.existing = 0, 0
        if resume and os.path.exists(path):
            self.done_line, self.existing = _resume_jsonl(path)
        _check_settings(path, settings, resume=resume and self.existing > 0)
        if not resume and os.path.exists(path):
            os.remove(path)
        self._f = open(path, "ab")
        self._buffer = []

    def add(self, record: Record, result):
        line = {"line": record.line}
        if record.id is not NO_ID:
            line["id"] = record.id
        line.update(result_fields(self.task, result))
        self._buffer.append(json.dumps(line, ensure_ascii=False) + "\n")

    def flush(self):
        if self._buffer:
            self._f.write("".join(self._buffer).encode("utf-8"))  # whole lines in one write
            self._buffer.clear()
            _fsync(self._f)

    def close(self):
        self.flush()
        self._f.close()


def _resume_jsonl(path):
    """(last input line written, lines kept) of an earlier run's output; a partial last line (the
    run was killed mid-write) is cut off."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
            _fsync(f)
    lines = data[:end].splitlines()
    if not lines:
        return 0, 0
    try:
        return int(json.loads(lines[-1])["line"]), len(lines)
    except (ValueError, KeyError, TypeError, IndexError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise ValueError(f"{path} is not an output of this command (its last line has no \"line\" number), so it "
                         "cannot be resumed: pass --no-resume to overwrite it, or choose another --output") from None


def settings_path(path: str) -> str:
    return path + ".run.json"


# Options added after outputs were first recorded, with the value that gives the results of the
# runs before them: such a record lacks the key, and resumes with that value (and only with it).
SETTINGS_BEFORE_OPTION = {"entities": None, "align_to_words": False, "decoding": "best-span"}


def _check_settings(path, settings, resume):
    """Refuses to resume ``path`` if the run that wrote it had other settings (another model, input,
    task option...: the file would mix two kinds of results); else records ``settings``. An
    output without a record (from before it was kept) resumes as it is."""
    if settings is None:
        return
    record = settings_path(path)
    if resume and os.path.exists(record):
        with open(record, encoding="utf-8") as f:
            before = json.load(f)
        before = {**{k: v for k, v in SETTINGS_BEFORE_OPTION.items() if k in settings}, **before}
        changed = sorted(k for k in before.keys() | settings.keys() if before.get(k) != settings.get(k))
        if changed:
            diff = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed)
            raise ValueError(f"{path} was written by a run with other settings ({diff}); resuming it would mix "
                             "their results: pass --no-resume to start it over, or choose another --output")
        return
    data = (json.dumps(settings, indent=1, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    _write_atomic(record, lambda f: f.write(data))


class NpyWriter:
    """Embeddings to .npy, resumable (see the module docstring)."""

    def __init__(self, path, task, resume=True, settings=None, dim=None):
        if task != "embed":
            raise ValueError(f".npy output holds embeddings: the task must be 'embed', got {task!r}")
        self.path = path
        self.partial, self.lines_path = path + ".partial", path + ".partial.lines"
        self.index_path = os.path.splitext(path)[0] + ".lines.jsonl"
        self.done_line, self.existing, self.dim = 0, 0, None
        unfinished = os.path.exists(self.partial) and os.path.exists(self.lines_path)
        finished = not unfinished and os.path.exists(path) and os.path.exists(self.index_path)
        _check_settings(path, settings, resume=resume and (finished or unfinished))  # before anything changes
        if resume and finished:
            self._reopen_finished()
        if resume and (finished or unfinished):
            self._resume()
        if not resume:
            for p in (self.partial, self.lines_path):
                if os.path.exists(p):
                    os.remove(p)
        # the model's dim, for an output with no row (np.load(f) @ other.T needs (0, dim), not (0, 0))
        self.dim = self.dim or dim
        self._rows = open(self.partial, "ab")
        self._lines = open(self.lines_path, "ab")
        self._buffer, self._line_buffer = [], []

    def _reopen_finished(self):
        """A finished output back into the partial files, so that a rerun skips its rows (and a
        rerun over a grown input adds to them) instead of recomputing everything."""
        array = np.load(self.path)
        with open(self.index_path, "rb") as f:
            entries = [json.loads(e) for e in f.read().splitlines()]
        if array.ndim != 2 or array.dtype != np.float32 or len(entries) != len(array):
            raise ValueError(f"{self.path} and {self.index_path} do not belong together ({array.shape} {array.dtype}, "
                             f"{len(entries)} lines), so they cannot be resumed: pass --no-resume to overwrite them")
        with open(self.lines_path, "wb") as f:
            f.write(b"".join((json.dumps({**e, "dim": array.shape[1]}, ensure_ascii=False) + "\n").encode("utf-8")
                             for e in entries))
        with open(self.partial, "wb") as f:
            f.write(array.tobytes())

    def _resume(self):
        done_line, kept = _resume_jsonl(self.lines_path)
        with open(self.lines_path, "rb") as f:
            entries = f.read().splitlines()
        size = os.path.getsize(self.partial)
        dim = json.loads(entries[0])["dim"] if entries else None
        rows = size // (4 * dim) if dim else 0
        keep = min(rows, kept)  # rows are written before their line numbers
        with open(self.partial, "rb+") as f:
            f.truncate(keep * 4 * (dim or 0))
        with open(self.lines_path, "wb") as f:
            f.write(b"".join(e + b"\n" for e in entries[:keep]))
        self.existing, self.dim = keep, dim
        self.done_line = int(json.loads(entries[keep - 1])["line"]) if keep else 0

    def add(self, record: Record, result):
        vector = np.asarray(result, dtype=np.float32)
        self.dim = self.dim or vector.shape[0]
        if vector.shape != (self.dim,):
            raise ValueError(f"{self.path} holds vectors of {self.dim} floats, got one of shape {vector.shape}")
        self._buffer.append(vector.tobytes())
        entry = {"line": record.line, "dim": self.dim}
        if record.id is not NO_ID:
            entry["id"] = record.id
        self._line_buffer.append(json.dumps(entry, ensure_ascii=False) + "\n")

    def flush(self):
        if self._buffer:
            self._rows.write(b"".join(self._buffer))
            _fsync(self._rows)
            self._lines.write("".join(self._line_buffer).encode("utf-8"))
            _fsync(self._lines)
            self._buffer.clear()
            self._line_buffer.clear()

    def close(self):
        self.flush()
        self._rows.close()
        self._lines.close()
        data = np.fromfile(self.partial, dtype=np.float32)
        array = data.reshape(-1, self.dim) if self.dim else np.zeros((0, 0), dtype=np.float32)
        _write_atomic(self.path, lambda f: np.save(f, array))
        with open(self.lines_path, "rb") as f:
            index = b"".join(_without_dim(e) for e in f.read().splitlines())
        _write_atomic(self.index_path, lambda f: f.write(index))
        os.remove(self.partial)
        os.remove(self.lines_path)


def _without_dim(entry: bytes) -> bytes:
    obj = json.loads(entry)
    obj.pop("dim", None)
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def _write_atomic(path, write):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        _fsync(f)
    os.replace(tmp, path)


def open_writer(path, task, resume=True, settings=None, dim=None):
    """The writer for ``path`` (.jsonl, or .npy for embed); ``settings`` (a JSON-able dict): what
    shaped the results, checked against the earlier run's on resume (see ``_check_settings``);
    ``dim``: the embeddings' size (an .npy with no row is (0, dim)). The output is this run's
    alone until the writer closes (see ``_lock_output``)."""
    if not (path.endswith(".npy") or path.endswith(".jsonl") or path.endswith(".json")):
        raise ValueError(f"output must end in .jsonl or .npy (embeddings), got {path!r}")
    unlock = _lock_output(path)
    try:
        if path.endswith(".npy"):
            writer = NpyWriter(path, task, resume, settings, dim)
        else:
            writer = JsonlWriter(path, task, resume, settings)
    except BaseException:
        unlock()
        raise
    close = writer.close

    def close_and_unlock():
        try:
            close()
        finally:
            unlock()

    writer.close = close_and_unlock
    return writer


def _lock_output(path):
    """Takes ``path``.lock (flock, released by the OS if the run is killed) or refuses: two runs
    given the same --output (a job started twice) both resumed from the same line and appended
    the same results twice, interleaved. Returns the function that releases it."""
    try:
        import fcntl
    except ImportError:  # (no flock on this platform: unlocked, as before)
        return lambda: None
    lock_path = path + ".lock"
    while True:
        f = open(lock_path, "a+b")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ValueError(f"another run is writing {path} (it holds {lock_path}): wait for it to end, or "
                             "choose another --output") from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino:
                break  # (else the run before removed it as this one opened it: take the new one)
        except FileNotFoundError:
            pass
        f.close()

    def unlock():
        try:  # removed before the lock is released, so that no run locks a file no longer at lock_path
            os.remove(lock_path)
        except OSError:
            pass
        f.close()

    return unlock


def rank_path(path: str, rank: int, world: int) -> str:
    """The output part of one torchrun rank: out.jsonl -> out.rank00001-of-00002.jsonl."""
    stem, ext = os.path.splitext(path)
    return f"{stem}.rank{rank:05d}-of-{world:05d}{ext}"


_RANK_PART = re.compile(r"\.rank(\d{5})-of-(\d{5})\.(jsonl|npy)$")


def _check_rank_parts(parts):
    """Parts named rankR-of-W (as the ranks write them) must be each rank of one world once."""
    ranks = [_RANK_PART.search(part) for part in parts]
    if all(ranks):
        worlds, found = {int(m.group(2)) for m in ranks}, sorted(int(m.group(1)) for m in ranks)
        if len(worlds) != 1 or found != list(range(worlds.pop())):
            raise ValueError(f"merge needs each rank's part once: got ranks {found} of "
                             f"{sorted({int(m.group(2)) for m in ranks})} ranks")


def _add_line(source: dict, line: int, part: str):
    if line in source:
        raise ValueError(f"input line {line} is in both {source[line]} and {part}")
    source[line] = part


def merge_parts(parts, output):
    """Merges torchrun ranks' parts into ``output`` in input-line order: .jsonl parts into a
    .jsonl, .npy parts (each with its .lines.jsonl) into a .npy and its .lines.jsonl."""
    npy = [part.endswith(".npy") for part in parts]
    if output.endswith(".npy") != all(npy) or any(npy) != all(npy):
        raise ValueError(f"merge writes .jsonl parts into a .jsonl and .npy parts into a .npy: got --output {output!r} "
                         f"and parts {parts}")
    return merge_npy(parts, output) if all(npy) else merge_jsonl(parts, output)


def merge_jsonl(parts, output):
    """Merges the ranks' .jsonl parts into one file in input-line order (write, then rename).
    Refused: a line that is not a result (a rank killed mid-write: rerun it to resume), an input
    line in two parts (a part given twice), a rank's part missing (names rankR-of-W)."""
    _check_rank_parts(parts)
    lines, source = [], {}
    for part in parts:
        with open(part, "rb") as f:
            for number, raw in enumerate(f.read().splitlines(), start=1):
                try:
                    line = int(json.loads(raw)["line"])
                except (ValueError, KeyError, TypeError, IndexError):
                    raise ValueError(f"{part}:{number} is not a result line of this command (no \"line\" number); "
                                     "a rank stopped mid-write resumes when rerun") from None
                _add_line(source, line, part)
                lines.append((line, raw))
    lines.sort(key=lambda x: x[0])
    _write_atomic(output, lambda f: f.write(b"".join(raw + b"\n" for _, raw in lines)))
    return len(lines)


def merge_npy(parts, output):
    """Merges the ranks' finished .npy parts (rows and their PART.lines.jsonl) into ``output`` and
    its .lines.jsonl, rows in input-line order (each written, then renamed). Refused as
    merge_jsonl refuses, and a part still unfinished (only its .partial files: rerun that rank)."""
    _check_rank_parts(parts)
    arrays, entries, source = [], [], {}
    for part in parts:
        index = os.path.splitext(part)[0] + ".lines.jsonl"
        if not os.path.exists(part) and os.path.exists(part + ".partial"):
            raise ValueError(f"{part} is unfinished (only {part}.partial is there): rerun that rank to finish it")
        array = np.load(part)
        with open(index, "rb") as f:
            lines = [json.loads(raw) for raw in f.read().splitlines()]
        if array.shape == (0, 0) and not lines:  # a rank given no line, written before its (0, dim)
            continue
        if array.ndim != 2 or len(lines) != len(array) or (arrays and array.shape[1] != arrays[0].shape[1]):
            raise ValueError(f"{part} ({array.shape}) and {index} ({len(lines)} lines) do not fit the other parts")
        for entry in lines:
            _add_line(source, int(entry["line"]), part)
        arrays.append(array)
        entries.extend(lines)
    order = np.argsort([int(e["line"]) for e in entries], kind="stable")
    rows = np.concatenate(arrays)[order] if arrays else np.zeros((0, 0), np.float32)
    _write_atomic(output, lambda f: np.save(f, rows))
    index = b"".join((json.dumps(entries[i], ensure_ascii=False) + "\n").encode("utf-8") for i in order)
    _write_atomic(os.path.splitext(output)[0] + ".lines.jsonl", lambda f: f.write(index))
    return len(entries)


__all__ = ["FORMATS", "JsonlWriter", "NpyWriter", "Record", "merge_jsonl", "merge_npy", "merge_parts", "open_writer",
           "rank_path", "read_records"]
