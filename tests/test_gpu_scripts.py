"""The prepared GPU runs (bench/gpu/run1.sh, run2.sh, run3.sh) in their dry-run mode: every step runs here
on the CPU with tiny workloads, so a broken script is found in CI and not in the GPU machine's
short window. Each run must succeed and leave at most 8 files (what the device tool brings back)."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, ".venv", "bin", "python")

pytestmark = pytest.mark.skipif(not os.path.isfile(PYTHON), reason="needs the set-up's .venv")


@pytest.mark.parametrize("script", ["run1.sh", "run2.sh", "run3.sh"])
def test_gpu_run_dry_run_succeeds_within_eight_files(tmp_path, script):
    out = tmp_path / "out"
    env = {**os.environ, "DRY_RUN": "1", "OUT": str(out), "PYTHON": PYTHON, "CI": "1"}
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu", script)], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=1200,
    )
    log = (result.stdout + result.stderr)[-6000:]
    assert result.returncode == 0, log
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert 0 < len(files) <= 8, files
    summary = (out / "summary.txt").read_text()
    expected = {"run1.sh": ["build", "tests", "bench_model"],
                "run2.sh": ["memcheck", "bench_ops", "bench_linear_activation", "rerun"],
                "run3.sh": ["bench_model_float32", "bench_optimize", "bench_engine"]}[script]
    for step in expected:
        assert f"{step} rc=" in summary, summary
