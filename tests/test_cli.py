"""The command line (python -m distilbert_fast): inputs and outputs, bad input, resume after a
killed run, CPU worker processes, torchrun shards, the Ray Data adapter. A tiny random model with
the real vocab keeps it fast; the engine's results themselves are checked against HF in
test_engine.py, and here the CLI's outputs are checked against the engine's."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import reference_vocab_dir

import distilbert_fast  # noqa: E402
from distilbert_fast.__main__ import main  # noqa: E402
from distilbert_fast.engine import InferenceEngine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["The quick brown fox.", "Hello world!", "Ünïcödé àccents 中文", "a", "Paris is in France. " * 40,
         "Short one.", "Another line of text here."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_model")
    config = distilbert_fast.DistilBertConfig(vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=128, id2label={0: "NO", 1: "YES"})
    distilbert_fast.DistilBertForSequenceClassification(config).save_pretrained(path)
    shutil.copy(os.path.join(reference_vocab_dir(), "vocab.txt"), path)
    return str(path)


def expected_embeddings(model_dir, texts):
    engine = InferenceEngine.from_pretrained(model_dir, task="embed", device="cpu", dtype="float32")
    return np.stack(engine(texts))


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def run_cli(*args):
    """The CLI in a fresh process: (returncode, stderr)."""
    # one torch thread: the tiny model gains nothing from more, and the test runs beside others
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "distilbert_fast", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    return proc.returncode, proc.stderr


def run_as_ranks(common, output, monkeypatch, world=2):
    """What each of ``world`` torchrun ranks runs: the CLI with RANK / WORLD_SIZE set, each writing
    its part of ``output``."""
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        assert main([*common, "--output", str(output)]) == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")


def summary_of(stderr):
    return json.loads([line for line in stderr.splitlines() if line.startswith("{")][-1])


def test_txt_to_jsonl_embed(model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--dtype", "float32",
                 "--device", "cpu", "--max-batch-tokens", "64"]) == 0
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == list(range(1, len(TEXTS) + 1))
    np.testing.assert_allclose(np.array([r["embedding"] for r in rows]), expected_embeddings(model_dir, TEXTS),
                               atol=1e-6, rtol=0)
    summary = summary_of(capsys.readouterr().err)
    assert (summary["read"], summary["written"], summary["skipped"]) == (7, 7, 0)


def test_jsonl_bad_input_reported_and_rest_processed(model_dir, tmp_path, capsys):
    lines = [
        json.dumps({"id": "a", "body": TEXTS[0]}).encode(),
        b'{"id": "b", "body": "unterminated',  # invalid JSON
        json.dumps({"id": "c", "other": "x"}).encode(),  # missing field
        b'{"id": "d", "body": "bad \xff\xfe utf-8"}',  # invalid UTF-8
        json.dumps({"id": "e", "body": ""}).encode(),  # empty text
        json.dumps({"id": "f", "body": 42}).encode(),  # not a string
        b"[1, 2]",  # not an object
        b'{"id": "g", "body": "lone \\ud800 surrogate"}',  # valid JSON, not valid Unicode (ended the run)
        json.dumps({"id": 7, "body": TEXTS[1]}, ensure_ascii=False).encode(),
    ]
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    assert main(["classify", "--model", model_dir, "--input", str(src), "--output", str(out), "--text-field", "body",
                 "--dtype", "float32", "--device", "cpu", "--top-k", "2"]) == 0
    err = capsys.readouterr().err
    for number, reason in ((2, "invalid JSON"), (3, "missing field 'body'"), (4, "invalid UTF-8"), (5, "empty text"),
                           (6, "field 'body' must be a string"), (7, "expected a JSON object"),
                           (8, "field 'body' holds a lone surrogate '\\ud800'")):
        assert f"in.jsonl:{number}: {reason}" in err, err
    rows = read_jsonl(out)
    assert [(r["line"], r["id"]) for r in rows] == [(1, "a"), (9, 7)]
    engine = InferenceEngine.from_pretrained(model_dir, task="classify", device="cpu", dtype="float32", top_k=2)
    assert [r["labels"] for r in rows] == engine([TEXTS[0], TEXTS[1]])
    summary = summary_of(err)
    assert (summary["read"], summary["written"], summary["skipped"]) == (9, 2, 7)


def test_strict_stops_at_first_bad_line(model_dir, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_bytes(b"fine\n\nnever reached\n")
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--strict",
                 "--dtype", "float32", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "in.txt:2: empty text (--strict)" in err
    assert all(r["line"] < 2 for r in read_jsonl(out))


def test_csv_and_tsv_columns(model_dir, tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_text('id,text,label\n1,"first, with a comma",x\n2,"a quoted\nnewline",y\n3,,z\n4,"last one",w\n',
                   encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--column", "text",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    rows = read_jsonl(out)
    assert [(r["line"], r["id"]) for r in rows] == [(2, "1"), (3, "2"), (6, "4")]
    np.testing.assert_allclose([r["embedding"] for r in rows],
                               expected_embeddings(model_dir, ["first, with a comma", "a quoted\nnewline", "last one"]),
                               atol=1e-6)
    assert "in.csv:5: empty text" in capsys.readouterr().err
    tsv = tmp_path / "in.tsv"
    tsv.write_text("text\tid\nalpha\tA\nbeta\tB\n", encoding="utf-8")
    assert main(["embed", "--model", model_dir, "--input", str(tsv), "--output", str(out), "--no-resume",
                 "--dtype", "float32", "--device", "cpu"]) == 0
    assert [r["id"] for r in read_jsonl(out)] == ["A", "B"]


def test_an_id_field_named_must_be_there(model_dir, tmp_path, capsys):
    """--id-field doc_id (misspelt, or absent) gave every output line no id, without a word. Named
    explicitly, it must be in a csv's header (a one-line error) and in each JSON line (a line
    without it is bad input, reported); not named, 'id' is copied where present, as before. A
    blank csv line is reported as 'empty line' (was 'expected 2 fields, got 0')."""
    common = ["embed", "--model", model_dir, "--dtype", "float32", "--device", "cpu", "--no-resume"]
    src = tmp_path / "in.jsonl"
    src.write_text('{"text": "a", "doc_id": 7}\n{"text": "b", "id": 8}\n{"text": "c", "doc_id": null}\n',
                   encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main([*common, "--input", str(src), "--output", str(out), "--id-field", "doc_id"]) == 0
    assert [(r["line"], r.get("id")) for r in read_jsonl(out)] == [(1, 7), (3, None)]
    assert "in.jsonl:2: missing field 'doc_id' (--id-field)" in capsys.readouterr().err
    assert main([*common, "--input", str(src), "--output", str(out)]) == 0
    assert [(r["line"], r.get("id")) for r in read_jsonl(out)] == [(1, None), (2, 8), (3, None)]
    csv_src = tmp_path / "in.csv"
    csv_src.write_text("key,text\nk1,hello\n\nk2,world\n", encoding="utf-8")
    capsys.readouterr()
    assert main([*common, "--input", str(csv_src), "--output", str(out), "--id-field", "doc_id"]) == 2
    assert "column 'doc_id' is not in the input's header ['key', 'text']" in capsys.readouterr().err
    assert main([*common, "--input", str(csv_src), "--output", str(out), "--id-field", "key"]) == 0
    assert [(r["line"], r["id"]) for r in read_jsonl(out)] == [(2, "k1"), (4, "k2")]
    assert "in.csv:3: empty line" in capsys.readouterr().err
    txt = tmp_path / "in.txt"
    txt.write_text("hello\n", encoding="utf-8")
    assert main([*common, "--input", str(txt), "--output", str(tmp_path / "txt.jsonl"), "--id-field", "id"]) == 2
    assert "--id-field needs a .jsonl, .csv or .tsv input" in capsys.readouterr().err


def test_csv_invalid_utf8_inside_a_quoted_multiline_field(model_dir, tmp_path, capsys):
    """The record holding the bad bytes is reported once, at its first line, naming the bad line;
    the records after it are read as they are (the bad line was dropped before csv saw it, so the
    quote that opened on line 3 swallowed the next record and two wrong lines were reported)."""
    src = tmp_path / "in.csv"
    src.write_bytes(b'id,text\n1,"fine"\n2,"starts well\nthen \xff\xfe bad\nends here"\n3,"after it"\n'
                    b'4,"bad \xc3 on its own line"\n5,last\n')
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--dtype", "float32",
                 "--device", "cpu"]) == 0
    rows = read_jsonl(out)
    assert [(r["line"], r["id"]) for r in rows] == [(2, "1"), (6, "3"), (8, "5")]
    np.testing.assert_allclose([r["embedding"] for r in rows],
                               expected_embeddings(model_dir, ["fine", "after it", "last"]), atol=1e-6)
    err = capsys.readouterr().err
    assert "in.csv:3: invalid UTF-8 (invalid start byte at byte 5) on line 4" in err
    assert "in.csv:7: invalid UTF-8 (invalid continuation byte at byte 7)" in err
    assert summary_of(err)["skipped"] == 2 and summary_of(err)["written"] == 3
    src.write_bytes(b'id,te\xffxt\n1,one\n')
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(tmp_path / "o.jsonl"),
                 "--device", "cpu"]) == 2
    assert "header (line 1) is not valid: invalid UTF-8 (invalid start byte at byte 5)" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["csv", "jsonl", "txt"])
def test_byte_order_mark_and_a_megabyte_text(model_dir, tmp_path, capsys, suffix):
    """A UTF-8 BOM (Excel's "CSV UTF-8", Notepad) is not part of the first header or line, and a
    1 MB text is one record (csv's own 128 KiB field limit failed the run with csv.Error)."""
    big = "word " * 200_000
    texts = ["first text", big.strip(), "last, one"]
    body = {"csv": "text,id\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(texts)),
            "jsonl": "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)),
            "txt": "".join(t + "\r\n" for t in texts)}[suffix]
    src = tmp_path / f"in.{suffix}"
    src.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    out = tmp_path / "out.jsonl"
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--dtype", "float32",
                 "--device", "cpu"]) == 0
    summary = summary_of(capsys.readouterr().err)
    assert (summary["read"], summary["written"], summary["skipped"]) == (3, 3, 0)
    rows = read_jsonl(out)
    np.testing.assert_allclose([r["embedding"] for r in rows], expected_embeddings(model_dir, texts), atol=1e-6)
    if suffix != "txt":
        assert [str(r["id"]) for r in rows] == ["0", "1", "2"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be"])
def test_a_utf16_input_is_one_error_not_a_report_per_line(model_dir, tmp_path, capsys, encoding):
    """A file saved as Windows' 'Unicode' (UTF-16 with its byte order mark) was read as UTF-8:
    every line reported as invalid and skipped, and the run 'succeeded' with nothing written."""
    src = tmp_path / "in.txt"
    src.write_bytes(("\ufeff" if encoding == "utf-16-be" else "").encode(encoding)
                    + "".join(f"line {i}\r\n" for i in range(50)).encode(encoding))
    assert src.read_bytes()[:2] in (b"\xff\xfe", b"\xfe\xff")
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(tmp_path / "out.jsonl"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the input is UTF-16" in err[0] and "iconv -f UTF-16 -t UTF-8" in err[0], err


def test_stdin_and_npy_output(model_dir, tmp_path, monkeypatch, capsys):
    data = ("\n".join(TEXTS[:3]) + "\n\n" + TEXTS[3] + "\n").encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))
    out = tmp_path / "out.npy"
    assert main(["embed", "--model", model_dir, "--input", "-", "--output", str(out), "--dtype", "float32",
                 "--device", "cpu", "--normalize"]) == 0
    array = np.load(out)
    engine = InferenceEngine.from_pretrained(model_dir, device="cpu", dtype="float32", normalize=True)
    np.testing.assert_allclose(array, np.stack(engine(TEXTS[:4])), atol=1e-6)
    assert [r["line"] for r in read_jsonl(tmp_path / "out.lines.jsonl")] == [1, 2, 3, 5]
    assert not os.path.exists(str(out) + ".partial")
    assert "-:4: empty text" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing input", "output type", "unknown column",
                                  "task the model cannot run", "pair field of a txt", "pair field for tag"])
def test_user_errors_are_one_line_and_leave_no_output(model_dir, tmp_path, capsys, case):
    src = tmp_path / "in.csv"
    src.write_text("id,text\n1,hello\n", encoding="utf-8")
    txt = tmp_path / "in.txt"
    txt.write_text("hello\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = {"missing input": ["embed", "--input", str(tmp_path / "nope.txt"), "--output", str(out)],
            "output type": ["embed", "--input", str(src), "--output", str(tmp_path / "out.csv")],
            "unknown column": ["embed", "--input", str(src), "--output", str(out), "--column", "body"],
            "task the model cannot run": ["qa", "--input", str(src), "--output", str(out), "--pair-field", "text"],
            # (these two were found at the first batch, the output opened; tag dropped the pairs)
            "pair field of a txt": ["qa", "--input", str(txt), "--output", str(out), "--pair-field", "text"],
            "pair field for tag": ["tag", "--input", str(src), "--output", str(out), "--pair-field", "id"],
            }[case]
    model = reference_vocab_dir() if case == "task the model cannot run" else model_dir  # a BERT folder: embed only
    assert main([*args, "--model", model, "--device", "cpu", "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"python -m distilbert_fast {args[0]}: error: "), err
    assert "Traceback" not in "\n".join(err)
    assert {"missing input": "nope.txt", "output type": ".jsonl or .npy",
            "unknown column": "'body'", "task the model cannot run": "task='embed' only",
            "pair field of a txt": "--pair-field needs a .jsonl, .csv or .tsv input",
            "pair field for tag": "tag takes one text per line"}[case] in err[-1]
    if case != "unknown column":  # (found once the input is read: the output exists, empty and resumable)
        assert not out.exists()


def test_ids_as_they_are_a_missing_folder_made_and_one_output_one_run(model_dir, tmp_path, capsys):
    """jsonl ids: a number stays a number, a string a string, and a null id was dropped from its
    line (as if the field were absent); it is null now, in .jsonl and .npy's .lines.jsonl. An
    output in a folder not there yet failed ('No such file ... out.jsonl.run.json.tmp'); it is
    made. Two runs given the same output (a job started twice) both appended the same lines; the
    second is refused while the first runs."""
    from distilbert_fast.engine import io as engine_io

    src = tmp_path / "in.jsonl"
    ids = [7, "7", None, 1.5, "absent"]
    src.write_text("".join(json.dumps({"text": f"text {i}", **({} if v == "absent" else {"id": v})}) + "\n"
                           for i, v in enumerate(ids)), encoding="utf-8")
    for suffix in ("jsonl", "npy"):
        out = tmp_path / "runs" / "first" / f"out.{suffix}"
        assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--dtype", "float32",
                     "--device", "cpu"]) == 0
        rows = read_jsonl(out if suffix == "jsonl" else tmp_path / "runs" / "first" / "out.lines.jsonl")
        assert [r.get("id", "absent") for r in rows] == ids
        assert [type(r.get("id")) for r in rows] == [int, str, type(None), float, type(None)]
        assert "id" in rows[2] and "id" not in rows[4]
    assert not list((tmp_path / "runs" / "first").glob("*.lock"))
    out = tmp_path / "busy.jsonl"
    holder = engine_io.open_writer(str(out), "embed")  # a run writing it
    try:
        capsys.readouterr()
        assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--device", "cpu"]) == 2
        assert f"another run is writing {out}" in capsys.readouterr().err.splitlines()[-1]
    finally:
        holder.close()
    assert main(["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--device", "cpu"]) == 0
    assert len(read_jsonl(out)) == 5


def test_sentence_transformers_folder_embeds_as_encode(tmp_path):
    """``--model`` a sentence-transformers folder (the real all-MiniLM-L6-v2): its pooling and
    normalisation by default; --no-normalize turns the latter off."""
    st = pytest.importorskip("sentence_transformers")
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    path = reference_vocab_dir()
    expected = st.SentenceTransformer(path, device="cpu").encode(TEXTS, convert_to_numpy=True)
    for flags, want in (([], expected), (["--no-normalize"], None)):
        out = tmp_path / f"out{len(flags)}.npy"
        assert main(["embed", "--model", path, "--input", str(src), "--output", str(out), "--dtype", "float32",
                     "--device", "cpu", *flags]) == 0
        got = np.load(out)
        if want is not None:
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        else:
            assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)
            np.testing.assert_allclose(got / np.linalg.norm(got, axis=1, keepdims=True), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("suffix", ["jsonl", "npy"])
def test_resume_after_killed_run_equals_uninterrupted(model_dir, tmp_path, suffix):
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i} {'word ' * (i % 17)}\n" for i in range(6_000)), encoding="utf-8")
    args = ["embed", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu",
            "--window", "256", "--progress", "off"]
    full, part = tmp_path / f"full.{suffix}", tmp_path / f"part.{suffix}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocesses run (OMP_NUM_THREADS=1): bit-identical results
    try:
        assert main([*args, "--output", str(full)]) == 0  # the uninterrupted run, in this process
    finally:
        torch.set_num_threads(threads)

    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distilbert_fast", *args, "--output", str(part)], env=env,
                            stderr=subprocess.DEVNULL)
    # npy: rows go to OUT.partial first, then their line numbers to OUT.partial.lines
    growing = str(part) + (".partial.lines" if suffix == "npy" else "")
    torn = str(part) + (".partial" if suffix == "npy" else "")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(growing) or os.path.getsize(growing) < 4_000):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    with open(torn, "ab") as f:  # as if killed in the middle of a write
        f.write(b'{"line": 99999, "embe' if suffix == "jsonl" else b"\x00\x01\x02")
    code, err = run_cli(*args, "--output", str(part))
    assert code == 0, err
    summary = summary_of(err)
    assert summary["already_written"] > 0 and summary["already_written"] + summary["written"] == 6_000
    if suffix == "jsonl":
        assert part.read_bytes() == full.read_bytes()
    else:
        assert np.array_equal(np.load(part), np.load(full))
        assert (tmp_path / "part.lines.jsonl").read_bytes() == (tmp_path / "full.lines.jsonl").read_bytes()


def test_output_that_is_the_input_or_not_ours_is_refused_and_kept(model_dir, tmp_path, capsys):
    """--output naming the input (--no-resume deleted the input, resuming read it as results), or a
    .jsonl this command did not write (a KeyError traceback): one-line errors, files untouched."""
    src = tmp_path / "in.jsonl"
    content = b'{"text": "hello", "id": 1}\n{"text": "world"}\n'
    src.write_bytes(content)
    common = ["embed", "--model", model_dir, "--dtype", "float32", "--device", "cpu"]
    for flags in ([], ["--no-resume"]):
        assert main([*common, "--input", str(src), "--output", str(src), *flags]) == 2
        assert "is the input file" in capsys.readouterr().err.splitlines()[-1]
        assert src.read_bytes() == content
    txt = tmp_path / "in.txt"
    txt.write_text("a\nb\n", encoding="utf-8")
    assert main([*common, "--input", str(txt), "--output", str(src)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "is not an output of this command" in err.splitlines()[-1]
    assert src.read_bytes() == content
    assert main([*common, "--input", str(txt), "--output", str(src), "--no-resume"]) == 0  # as asked: overwritten
    assert [r["line"] for r in read_jsonl(src)] == [1, 2]


@pytest.mark.parametrize("suffix", ["jsonl", "npy"])
def test_rerun_with_other_settings_is_refused_and_a_finished_output_resumes(model_dir, tmp_path, capsys, suffix):
    """A finished output rerun skips every line (a finished .npy was recomputed), a grown input adds
    only its new lines, and a rerun with another option, model or input is an error naming what
    changed (it appended results of another kind to the file)."""
    src = tmp_path / "in.txt"
    src.write_text("".join(t + "\n" for t in TEXTS[:4]), encoding="utf-8")
    out = tmp_path / f"out.{suffix}"
    common = ["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--device", "cpu",
              "--dtype", "float32", "--progress", "off"]
    assert main(common) == 0
    assert main(common) == 0
    summary = summary_of(capsys.readouterr().err)
    assert (summary["already_written"], summary["written"]) == (4, 0)
    with open(src, "a", encoding="utf-8") as f:
        f.write("".join(t + "\n" for t in TEXTS[4:]))
    assert main([*common, "--max-batch-tokens", "64"]) == 0  # speed-only options may change
    summary = summary_of(capsys.readouterr().err)
    assert (summary["already_written"], summary["written"]) == (4, len(TEXTS) - 4)
    if suffix == "npy":
        got = np.load(out)
        assert [r["line"] for r in read_jsonl(tmp_path / "out.lines.jsonl")] == list(range(1, len(TEXTS) + 1))
    else:
        got = np.array([r["embedding"] for r in read_jsonl(out)])
    np.testing.assert_allclose(got, expected_embeddings(model_dir, TEXTS), atol=1e-6)
    before = out.read_bytes()
    assert main([*common, "--normalize"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "other settings (normalize: None then, True now)" in err and "--no-resume" in err
    assert out.read_bytes() == before
    assert main([*common, "--normalize", "--no-resume"]) == 0
    got = np.load(out) if suffix == "npy" else np.array([r["embedding"] for r in read_jsonl(out)])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_write_what_is_done_and_say_how_to_resume(model_dir, tmp_path, stop):
    """Ctrl-C printed a KeyboardInterrupt traceback and no summary; SIGTERM (a scheduler's
    preemption) ended the run at once, losing the results since the last flush. Both now write
    every result computed, print one line and the summary, and exit 128 + the signal number; the
    rerun completes the output with no line twice."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"text number {i} {'word ' * (i % 17)}\n" for i in range(2_000)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = ["embed", "--model", model_dir, "--input", str(src), "--output", str(out), "--dtype", "float32",
            "--device", "cpu", "--window", "128", "--progress", "off"]
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "distilbert_fast", *args], env=env, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or out.stat().st_size == 0):
        time.sleep(0.05)
    proc.send_signal(getattr(signal, stop))
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + getattr(signal, stop), err[-2000:]
    assert "Traceback" not in err and f"stopped by {stop}: the results so far are written" in err
    summary = summary_of(err)
    written = summary["written"]
    assert 0 < written < 2_000 and len(read_jsonl(out)) == written
    assert summary["skipped"] == 0
    code, err = run_cli(*args)
    assert code == 0, err
    assert summary_of(err)["already_written"] == written
    assert [r["line"] for r in read_jsonl(out)] == list(range(1, 2_001))


@pytest.mark.parametrize("stop", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_waits_for_the_end_of_a_held_block(stop):
    """A record's bookkeeping (queued and counted, or written to the buffer) is held together: a
    signal inside ``held()`` raises KeyboardInterrupt at the block's end, after all of it ran."""
    from distilbert_fast.__main__ import _stop_signals_as_interrupts

    state = _stop_signals_as_interrupts()
    done = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with state["held"]():
                os.kill(os.getpid(), getattr(signal, stop))
                time.sleep(0.05)  # the handler has run by now (it runs between bytecodes)
                done.append("rest of the block")
        assert done == ["rest of the block"] and state["signal"] == stop
        with pytest.raises(KeyboardInterrupt):  # outside a held block it interrupts at once
            os.kill(os.getpid(), getattr(signal, stop))
            time.sleep(1)
            done.append("never")
        assert done == ["rest of the block"]
    finally:
        state["restore"]()


def test_cpu_worker_processes_equal_one_process(model_dir, tmp_path, capsys):
    """... and both show the progress bar (texts/s and tokens/s) when asked; with --devices the
    bar is the parent's (there was none before)."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i} {'x ' * (i % 9)}\n" for i in range(300)), encoding="utf-8")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    common = ["classify", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu",
              "--window", "64", "--top-k", "2", "--progress", "on"]
    assert main([*common, "--output", str(one)]) == 0
    code, err = run_cli(*common, "--output", str(two), "--devices", "2")
    assert code == 0, err
    for shown in (capsys.readouterr().err, err):
        final = shown.replace("\r", "\n").splitlines()
        assert any(line.startswith("classify: 300 texts") and "tokens/s" in line for line in final), shown
    a, b = read_jsonl(one), read_jsonl(two)
    assert [r["line"] for r in a] == [r["line"] for r in b] == list(range(1, 301))
    for x, y in zip(a, b):
        assert [l["label"] for l in x["labels"]] == [l["label"] for l in y["labels"]]
        np.testing.assert_allclose([l["score"] for l in x["labels"]], [l["score"] for l in y["labels"]], atol=1e-6)


def test_worker_processes_keep_results_before_a_strict_stop_and_errors_are_one_line(model_dir, tmp_path, capsys):
    """--devices 2 --strict: the windows already with the workers were dropped when the input
    failed (20 of the 29 lines before the bad one written); a worker's ValueError (a bad model
    folder, an option the model cannot take) was a RuntimeError traceback instead of one line."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"text {i}"}) + "\n" if i != 30 else "not json\n"
                           for i in range(1, 41)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    common = ["embed", "--input", str(src), "--dtype", "float32", "--device", "cpu", "--devices", "2"]
    code, err = run_cli(*common, "--model", model_dir, "--output", str(out), "--strict", "--window", "4")
    assert code == 1, err
    assert "in.jsonl:30: invalid JSON" in err and summary_of(err)["written"] == 29
    rows = read_jsonl(out)
    assert [r["line"] for r in rows] == list(range(1, 30))
    np.testing.assert_allclose([r["embedding"] for r in rows],
                               expected_embeddings(model_dir, [f"text {i}" for i in range(1, 30)]), atol=1e-6)
    assert main([*common, "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("python -m distilbert_fast embed: error: a worker failed")


def test_a_worker_killed_mid_run_is_a_clear_error_not_a_hang(model_dir):
    """A worker killed (out of memory, say) while its windows are out: the stream raises
    ChildProcessError naming the device and the signal (an OSError: the CLI prints one line)."""
    from distilbert_fast.engine.workers import WorkerPool

    pool = WorkerPool(model_dir, {"task": "embed", "dtype": "float32", "window": 8}, 2)
    try:
        stream = pool.stream(f"text {i}" for i in range(10_000))
        next(stream)
        os.kill(pool._procs[1].pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(ChildProcessError, match=r"a worker process on cpu died \(killed by SIGKILL\)"):
            for _ in stream:
                pass
        assert time.monotonic() - started < 30
    finally:
        pool.close()


def test_torchrun_two_ranks_equal_one_process(model_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    src = tmp_path / "in.txt"
    src.write_text("".join(f"sentence {i} {'y ' * (i % 11)}\n" for i in range(201)) + "\n", encoding="utf-8")
    common = ["embed", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu"]
    one = tmp_path / "one.jsonl"
    assert main([*common, "--output", str(one)]) == 0
    out = tmp_path / "ranks.jsonl"
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "distilbert_fast",
                           *common, "--output", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = sorted(str(p) for p in tmp_path.glob("ranks.rank*-of-00002.jsonl"))
    assert len(parts) == 2
    lines = [[r["line"] for r in read_jsonl(p)] for p in parts]
    assert lines[0] and lines[1] and not set(lines[0]) & set(lines[1])  # disjoint shards
    merged = tmp_path / "merged.jsonl"
    assert main(["merge", "--output", str(merged), *parts]) == 0
    a, b = read_jsonl(one), read_jsonl(merged)
    assert [r["line"] for r in a] == [r["line"] for r in b]
    np.testing.assert_allclose([r["embedding"] for r in a], [r["embedding"] for r in b], atol=1e-6)


def test_merge_refuses_a_missing_rank_a_part_twice_and_a_torn_part(model_dir, tmp_path, monkeypatch, capsys):
    """merge silently wrote duplicated lines (a part given twice), a file without a rank's lines,
    and tracebacks for a torn or foreign part; each is now a one-line error and writes nothing."""
    src = tmp_path / "in.txt"
    src.write_text("".join(f"line {i}\n" for i in range(9)), encoding="utf-8")
    common = ["embed", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu"]
    run_as_ranks(common, tmp_path / "out.jsonl", monkeypatch)
    assert main([*common, "--output", str(tmp_path / "one.jsonl")]) == 0
    parts = [str(tmp_path / f"out.rank0000{r}-of-00002.jsonl") for r in (0, 1)]
    merged = tmp_path / "merged.jsonl"
    capsys.readouterr()
    torn = tmp_path / "torn.rank00001-of-00002.jsonl"
    torn.write_bytes(open(parts[1], "rb").read() + b'{"line": 8, "embe')
    for bad, reason in (([parts[0]], "each rank's part once: got ranks [0] of [2]"),
                        ([parts[0], parts[1], parts[1]], "each rank's part once: got ranks [0, 1, 1]"),
                        ([parts[0], parts[1], str(tmp_path / "one.jsonl")], "input line 1 is in both"),
                        ([parts[0], str(torn)], "torn.rank00001-of-00002.jsonl:5 is not a result line")):
        assert main(["merge", "--output", str(merged), *bad]) == 2
        assert reason in capsys.readouterr().err.splitlines()[-1]
        assert not merged.exists()
    assert main(["merge", "--output", str(merged), *parts]) == 0
    assert merged.read_bytes() == (tmp_path / "one.jsonl").read_bytes()


def test_an_empty_npy_has_the_models_dim(model_dir, tmp_path, monkeypatch, capsys):
    """No text to embed (every line bad, or a rank given none) wrote a (0, 0) .npy, so
    ``np.load(f) @ other.T`` failed, and merge refused such a rank's part beside the others
    ('do not fit the other parts'). It is (0, dim): one process, --devices 2 (the parent has no
    model: the workers say the dim), and a rank of two given one line between them."""
    src = tmp_path / "empty.txt"
    src.write_text("\n   \n\n", encoding="utf-8")
    common = ["embed", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu"]
    assert main([*common, "--output", str(tmp_path / "one.npy")]) == 0
    code, err = run_cli(*common, "--output", str(tmp_path / "two.npy"), "--devices", "2")
    assert code == 0, err
    for name in ("one.npy", "two.npy"):
        array = np.load(tmp_path / name)
        assert array.shape == (0, 16) and array.dtype == np.float32
        assert (array @ np.ones((3, 16), np.float32).T).shape == (0, 3)
    assert main([*common, "--output", str(tmp_path / "one.npy")]) == 0  # resumed from the empty one: still (0, 16)
    assert np.load(tmp_path / "one.npy").shape == (0, 16)
    single = tmp_path / "single.txt"
    single.write_text("the only line\n", encoding="utf-8")
    common[common.index(str(src))] = str(single)
    run_as_ranks(common, tmp_path / "ranks.npy", monkeypatch)
    assert np.load(tmp_path / "ranks.rank00001-of-00002.npy").shape == (0, 16)
    merged = tmp_path / "merged.npy"
    assert main(["merge", "--output", str(merged), *sorted(map(str, tmp_path.glob("ranks.rank*.npy")))]) == 0
    np.testing.assert_allclose(np.load(merged), expected_embeddings(model_dir, ["the only line"]), atol=1e-6)


def test_merge_of_npy_parts_equals_one_process(model_dir, tmp_path, monkeypatch, capsys):
    """Ranks writing embeddings to .npy could not be merged: merge read each .npy as result lines
    ('out.rank00000-of-00002.npy:1 is not a result line ... a rank stopped mid-write'), and merging
    their .lines.jsonl gave line numbers without vectors. .npy parts merge into a .npy and its
    .lines.jsonl, as one process writes them; a mix of kinds and an unfinished part are refused."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": f"line {i} " + "z " * i, "id": f"r{i}"}) + "\n" for i in range(9)),
                   encoding="utf-8")
    common = ["embed", "--model", model_dir, "--input", str(src), "--dtype", "float32", "--device", "cpu"]
    run_as_ranks(common, tmp_path / "out.npy", monkeypatch)
    assert main([*common, "--output", str(tmp_path / "one.npy")]) == 0
    parts = [str(tmp_path / f"out.rank0000{r}-of-00002.npy") for r in (0, 1)]
    merged = tmp_path / "merged.npy"
    capsys.readouterr()
    unfinished = tmp_path / "cut.rank00001-of-00002.npy"
    unfinished.with_suffix(".npy.partial").write_bytes(b"")
    for bad, reason in (([parts[0]], "each rank's part once: got ranks [0] of [2]"),
                        ([parts[0], str(unfinished)], "cut.rank00001-of-00002.npy is unfinished"),
                        ([parts[0], parts[1].replace(".npy", ".lines.jsonl")], "merge writes .jsonl parts into")):
        assert main(["merge", "--output", str(merged), *bad]) == 2
        assert reason in capsys.readouterr().err.splitlines()[-1]
        assert not merged.exists()
    assert main(["merge", "--output", str(merged), *parts]) == 0
    np.testing.assert_allclose(np.load(merged), np.load(tmp_path / "one.npy"), atol=1e-6, rtol=0)
    assert (tmp_path / "merged.lines.jsonl").read_bytes() == (tmp_path / "one.lines.jsonl").read_bytes()
    assert [json.loads(e)["id"] for e in (tmp_path / "merged.lines.jsonl").read_text().splitlines()] == [
        f"r{i}" for i in range(9)]


def test_ray_data_map_batches_equals_one_process(model_dir):
    ray = pytest.importorskip("ray")
    from distilbert_fast.engine.workers import RayPredictor

    texts = [f"ray text {i} {'z ' * (i % 7)}" for i in range(40)]
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except Exception as exc:  # a sandbox without the sockets/shared memory ray needs
        pytest.skip(f"ray cannot start here: {exc}")
    try:
        ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(texts)])
        kwargs = {"path": model_dir, "task": "embed", "dtype": "float32", "device": "cpu"}
        out = ds.map_batches(RayPredictor, fn_constructor_kwargs=kwargs, concurrency=2, batch_size=8,
                             batch_format="numpy").take_all()
        nothing = ds.filter(lambda row: False).map_batches(RayPredictor, fn_constructor_kwargs=kwargs, concurrency=1,
                                                            batch_size=8, batch_format="numpy").take_all()
    finally:
        ray.shutdown()
    got = np.stack([r["embedding"] for r in sorted(out, key=lambda r: r["i"])])
    np.testing.assert_allclose(got, expected_embeddings(model_dir, texts), atol=1e-6)
    assert nothing == []  # an empty dataset: no rows, no error


def test_ray_predictor_refuses_missing_texts_instead_of_embedding_none(model_dir):
    """A null in the text column (None, or NaN from pandas) was embedded as the text 'None' /
    'nan' without a word. The predictor is a plain callable, so no Ray cluster is needed here."""
    from distilbert_fast.engine.workers import RayPredictor

    predictor = RayPredictor(model_dir, task="embed", dtype="float32", device="cpu")
    batch = predictor({"text": np.array(["a text", "another"], dtype=object), "i": np.array([0, 1])})
    np.testing.assert_allclose(batch["embedding"], expected_embeddings(model_dir, ["a text", "another"]), atol=1e-6)
    for missing in (None, float("nan"), 7):
        with pytest.raises(TypeError, match="column 'text' must hold strings, got .* in row 1"):
            predictor({"text": np.array(["a text", missing], dtype=object)})
    # an empty batch (an empty dataset, a filter that kept nothing): (0, dim), not (0, 0)
    empty = predictor({"text": np.array([], dtype=object), "i": np.array([], dtype=np.int64)})
    assert empty["embedding"].shape == (0, 16) and empty["embedding"].dtype == np.float32


def test_bench_subcommand_runs_the_engine_benchmark(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "engine", "--help"])
    assert exit_info.value.code == 0
    assert "max-batch-tokens" in capsys.readouterr().out


def test_an_output_recorded_before_an_option_existed_resumes_with_the_value_it_was_made_with(tmp_path, capsys):
    """qa's align_to_words and decoding came after outputs were first recorded: such a record
    lacks them, and every rerun was refused ('align_to_words: None then, True now'), even one that
    gives the old results. It now resumes exactly when the options give the results it was made
    with (align_to_words off, best-span decoding), and names the option otherwise."""
    model = tmp_path / "qa_model"
    config = distilbert_fast.DistilBertConfig(vocab_size=30522, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                              max_position_embeddings=128)
    distilbert_fast.DistilBertForQuestionAnswering(config).save_pretrained(model)
    shutil.copy(os.path.join(reference_vocab_dir(), "vocab.txt"), model)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"q": t, "c": TEXTS[0]}) + "\n" for t in TEXTS[:3]), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    common = ["qa", "--model", str(model), "--input", str(src), "--output", str(out), "--text-field", "q",
              "--pair-field", "c", "--device", "cpu", "--dtype", "float32", "--progress", "off"]
    assert main([*common, "--no-align-to-words"]) == 0
    record = tmp_path / "out.jsonl.run.json"
    settings = json.loads(record.read_text(encoding="utf-8"))
    assert (settings.pop("align_to_words"), settings.pop("decoding")) == (False, "best-span")
    record.write_text(json.dumps(settings), encoding="utf-8")  # as a run before the two options wrote it
    before = out.read_bytes()
    capsys.readouterr()
    assert main(common) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert "other settings (align_to_words: False then, True now)" in err, err
    assert main([*common, "--no-align-to-words", "--decoding", "pipeline"]) == 2
    assert "decoding: 'best-span' then, 'pipeline' now" in capsys.readouterr().err
    assert main([*common, "--no-align-to-words"]) == 0
    assert summary_of(capsys.readouterr().err)["already_written"] == 3
    assert out.read_bytes() == before
