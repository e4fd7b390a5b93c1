"""Host synchronisation on CUDA (issue #13): a packed forward (ids, cu_seqlens, max_seqlen on the
device) never syncs, so a CUDA graph captures it; a padded forward syncs at most once. Counted
with torch.cuda.set_sync_debug_mode, which warns at each synchronising call. A bad id of packed
input is raised at the next sync (deferred_checks). Needs CUDA (skips elsewhere; marked gpu)."""

import warnings

import pytest
import torch
from conftest import SMALL_CONFIG, cu_seqlens_of, cuda_graph_replays

import distilbert_fast
from distilbert_fast import DistilBertConfig
from distilbert_fast.deferred_checks import raise_deferred

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

V = SMALL_CONFIG["vocab_size"]
PACKED_CLASSES = ["DistilBertModel", "DistilBertForMaskedLM", "DistilBertForSequenceClassification",
                  "DistilBertForTokenClassification", "DistilBertForQuestionAnswering"]
BACKENDS = ["eager", "cuda", "triton"]


def _model(class_name, backend):
    backends = distilbert_fast.available_backends()
    if backend not in backends:
        pytest.skip(f"backend {backend} not available here: {backends}")
    config = DistilBertConfig(**SMALL_CONFIG, backend=backend)
    return getattr(distilbert_fast, class_name)(config).cuda().eval()


def _packed_inputs(lengths=(5, 1, 8, 3)):
    ids = torch.randint(0, V, (sum(lengths),))
    return dict(input_ids=ids.cuda(), cu_seqlens=cu_seqlens_of(lengths, "cuda"),
                max_seqlen=max(lengths))


def count_syncs(fn) -> int:
    """The synchronising CUDA calls fn makes (set_sync_debug_mode warns at each)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_name", PACKED_CLASSES)
def test_packed_forward_never_syncs(class_name, backend):
    model, inputs = _model(class_name, backend), _packed_inputs()
    with torch.no_grad():
        model(**inputs)  # warm-up: lazy initialisation (cuBLAS handles, Triton compiles)
        assert count_syncs(lambda: model(**inputs)) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("class_name", PACKED_CLASSES)
def test_padded_forward_syncs_once(class_name, backend):
    model = _model(class_name, backend)
    ids = torch.randint(0, V, (3, 9), device="cuda")
    mask = torch.ones(3, 9, dtype=torch.long, device="cuda")
    mask[0, 6:] = 0
    mask[2, 2:] = 0
    positions = torch.arange(9, device="cuda").expand(3, 9)
    with torch.no_grad():
        model(ids, attention_mask=mask)
        assert count_syncs(lambda: model(ids, attention_mask=mask)) == 1
        assert count_syncs(lambda: model(ids, attention_mask=mask, position_ids=positions)) == 1
        assert count_syncs(lambda: model(ids)) == 1  # the id check alone


def test_bad_packed_id_is_raised_at_the_next_sync():
    model, inputs = _model("DistilBertModel", "cuda" if "cuda" in distilbert_fast.available_backends()
                           else "eager"), _packed_inputs()
    inputs["input_ids"][3] = V + 7
    with torch.no_grad():
        out = model(**inputs)  # no sync: the check is pending, the ids clamped meanwhile
        assert torch.isfinite(out.last_hidden_state).all()
        with pytest.raises(ValueError, match=rf"input_ids must lie in \[0, {V}\), found {V + 7}"):
            raise_deferred(model)
        raise_deferred(model)  # read once: cleared
        model(**inputs)
        ids = torch.randint(0, V, (2, 4), device="cuda")
        with pytest.raises(ValueError, match=r"input_ids must lie in .*found by a packed forward"):
            model(ids, attention_mask=torch.ones_like(ids))  # the padded forward's one sync reads it
        model(ids, attention_mask=torch.ones_like(ids))


def test_bad_cu_seqlens_on_the_device_is_raised_at_the_next_sync():
    model, inputs = _model("DistilBertModel", "eager"), _packed_inputs()
    inputs["cu_seqlens"][2] = 100  # past the end, then decreasing
    with torch.no_grad():
        model(**inputs)  # safe: windows clamped into the packed tensor
        with pytest.raises(ValueError, match="cu_seqlens must be non-decreasing"):
            model.raise_deferred()


@pytest.mark.parametrize("backend", ["eager", "cuda"])
def test_packed_forward_captures_in_a_cuda_graph(backend):
    model, inputs = _model("DistilBertModel", backend), _packed_inputs()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        fresh = torch.randint(0, V, inputs["input_ids"].shape, device="cuda")

        def step():  # new ids copied into the captured input, then the model
            inputs["input_ids"].copy_(fresh)
            return model(**inputs).last_hidden_state

        (replayed,) = cuda_graph_replays(step, replays=1)
        torch.testing.assert_close(replayed, model(**inputs).last_hidden_state)
        assert not torch.equal(replayed, expected)
        raise_deferred(model)  # the captured flags report the replay: nothing failed
