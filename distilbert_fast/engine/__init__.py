"""The batch inference engine: texts in, results out (see engine.py), on one device or many
(workers.py), and the command line (``python -m distilbert_fast``)."""

from .engine import InferenceEngine, cpu_has_native_bf16, resolve_dtype
from .tasks import TASKS

__all__ = ["TASKS", "InferenceEngine", "cpu_has_native_bf16", "resolve_dtype"]
