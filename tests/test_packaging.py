"""The package layout: the extension loads and matches torch; our Triton/CUDA kernels ship as
``distilbert_fast.kernels`` and never as a top-level ``kernels`` module (an unrelated PyPI
package), in an editable install and in a plain one."""

import glob
import os
import shutil
import subprocess
import sys

import torch

import distilbert_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_is_built_against_the_running_torch():
    info = distilbert_fast.BUILD_INFO
    assert torch.__version__.startswith(info["torch_version"])
    assert info["with_cuda"] in (True, False)
    assert distilbert_fast._extension._release("2.11.0a0+git1234") == "2.11.0"


def test_kernels_import_inside_the_package():
    import distilbert_fast.kernels as kernels

    assert os.path.samefile(os.path.dirname(kernels.__file__), os.path.join(REPO, "kernels"))


def test_no_top_level_kernels_module_from_us():
    code = "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else '')"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    origin = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd="/", env=env).stdout.strip()
    assert not origin.startswith(REPO), f"a top-level 'kernels' module resolves into the repo: {origin}"


def test_plain_install_layout(tmp_path):
    """setup.py's build_py output is what a wheel holds: kernels/ lands in distilbert_fast/kernels
    and nowhere else. Importing from that tree (with the already-built extension copied in, as a
    wheel would carry it) finds the kernels inside the package."""
    build = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(build)],
                   cwd=REPO, check=True, capture_output=True)
    assert (build / "distilbert_fast" / "kernels" / "__init__.py").is_file()
    assert (build / "distilbert_fast" / "engine" / "engine.py").is_file()  # the batch engine ships too
    assert not (build / "kernels").exists()
    for so in glob.glob(os.path.join(REPO, "distilbert_fast", "_C*.so")):
        shutil.copy(so, build / "distilbert_fast")
    code = "import distilbert_fast.kernels as k, distilbert_fast as d; print(k.__file__); print(d.__file__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(build)}).stdout.split()
    assert out[0].startswith(str(build)) and out[1].startswith(str(build))
