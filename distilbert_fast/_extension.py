"""Loads the compiled extension ``distilbert_fast._C`` and checks it matches the running torch."""

import re

import torch

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "distilbert_fast's compiled extension (distilbert_fast._C) is missing or failed to load: "
        f"{exc}. Build it with `pip install --no-build-isolation -e .` (or `make setup`) "
        "in the repository root."
    ) from exc

BUILD_INFO = dict(_C.build_info())


def _release(version: str) -> str:
    """'2.13.0+cpu' -> '2.13.0', '2.11.0a0+git1234' -> '2.11.0'"""
    match = re.match(r"\d+\.\d+\.\d+", version)
    return match.group(0) if match else version


if _release(torch.__version__) != BUILD_INFO["torch_version"]:
    raise ImportError(
        f"distilbert_fast._C was built against torch {BUILD_INFO['torch_version']} but torch "
        f"{torch.__version__} is installed; the C++ ABI differs between releases. Rebuild with "
        "`pip install --no-build-isolation -e .`."
    )
