"""DistilBertAdapterModel's packed entry point (``model(input_ids=<1-D packed ids>, cu_seqlens=...,
max_seqlen=...)``, as DistilBertModel and the task classes take it): each head kind, with no
adapter, a Stack of a LoRA and a bottleneck adapter, and a Parallel (par_bn included) with a head
per child, against the padded call of the same batch (outputs at real positions, loss and every
gradient); and the inputs it refuses, each by name."""

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close

from distilbert_fast import DistilBertAdapterModel, DistilBertConfig, LoRAConfig, Parallel, ParBnConfig, Stack

LENGTHS = [5, 1, 7, 3]  # one full-length row (7), one of a single token
SEQ = max(LENGTHS)


def heads_model():
    model = DistilBertAdapterModel(DistilBertConfig(**SMALL_CONFIG)).eval()
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("l", config=LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]))
    model.add_adapter("p", config=ParBnConfig(reduction_factor=4, mh_adapter=True))
    model.add_adapter("q", config=ParBnConfig(reduction_factor=2, mh_adapter=True, non_linearity="gelu"))
    model.add_classification_head("cls", num_labels=3)
    model.add_classification_head("ml", num_labels=4, multilabel=True)
    model.add_tagging_head("tag", num_labels=5)
    model.add_masked_lm_head("mlm")
    model.add_qa_head("qa")
    model.add_tagging_head("p", num_labels=5)  # the Parallel's heads: one per child
    model.add_tagging_head("q", num_labels=6)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapters." in name or ".loras." in name or name.startswith("heads."):
                param.copy_(0.3 * torch.randn_like(param))
    return model


def padded_and_packed(head):
    """(padded inputs, packed inputs, mask) of LENGTHS with labels for ``head``'s kind."""
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (len(LENGTHS), SEQ))
    mask = (torch.arange(SEQ)[None] < torch.tensor(LENGTHS)[:, None]).long()
    real = mask.bool()
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    padded = {"input_ids": ids, "attention_mask": mask}
    packed = {"input_ids": ids[real], "cu_seqlens": cu_seqlens, "max_seqlen": SEQ}
    if head in ("tag", "mlm", "p", "q"):
        labels = torch.randint(0, 5, (len(LENGTHS), SEQ)).masked_fill(~real, -100)
        if head == "mlm":
            labels[:, ::2] = -100
        padded["labels"], packed["labels"] = labels, labels[real]
    elif head == "cls":
        padded["labels"] = packed["labels"] = torch.randint(0, 3, (len(LENGTHS),))
    elif head == "ml":
        padded["labels"] = packed["labels"] = torch.randint(0, 2, (len(LENGTHS), 4)).float()
    return padded, packed, mask


def run(model, inputs, **kwargs):
    """The outputs' tensors (each head's, for a MultiHeadOutput) and every parameter's gradient."""
    model.zero_grad()
    out = model(**inputs, **kwargs)
    outputs = out.head_outputs if hasattr(out, "head_outputs") else [out]
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.logits for o in outputs], out.loss, grads


SETUPS = {"none": None, "stack": Stack("l", "a"), "par_bn": "p"}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("head", ["cls", "ml", "tag", "mlm"])
def test_packed_entry_matches_the_padded_call(head, setup):
    model = heads_model()
    padded, packed, mask = padded_and_packed(head)
    kwargs = {"head": head, "adapter_names": SETUPS[setup]}
    (expected,), expected_loss, expected_grads = run(model, padded, **kwargs)
    (got,), loss, grads = run(model, packed, **kwargs)
    if head in ("tag", "mlm"):
        assert got.shape[0] == mask.sum()  # packed: one row per real token
        expected = expected[mask.bool()]
    assert_close(got, expected, atol=2e-5, name="logits")
    assert_close(loss, expected_loss, atol=2e-6, name="loss")
    assert set(grads) == set(expected_grads) and any(".adapters." in n or ".loras." in n for n in grads) == (
        setup != "none")
    for name, grad in expected_grads.items():
        assert_close(grads[name], grad, atol=2e-5, name=name)


def test_packed_question_answering_loss_is_each_sequence_alone():
    """QA positions count from each sequence's first token, and each sequence's loss is over its
    own tokens: the mean of the losses of each sequence run alone (no padding)."""
    model = heads_model()
    _, packed, mask = padded_and_packed("qa")
    starts, ends = torch.tensor([1, 0, 6, 2]), torch.tensor([3, 0, 6, 2])
    out = model(**packed, head="qa", adapter_names=Stack("l", "a"), start_positions=starts, end_positions=ends)
    rows = packed["cu_seqlens"].tolist()
    alone = [model(packed["input_ids"][None, a:b], head="qa", adapter_names=Stack("l", "a"),
                   start_positions=starts[i:i + 1], end_positions=ends[i:i + 1])
             for i, (a, b) in enumerate(zip(rows, rows[1:]))]
    assert_close(out.start_logits, torch.cat([o.start_logits[0] for o in alone]), atol=2e-5, name="start")
    assert_close(out.end_logits, torch.cat([o.end_logits[0] for o in alone]), atol=2e-5, name="end")
    assert_close(out.loss, torch.stack([o.loss for o in alone]).mean(), atol=2e-6, name="loss")


def test_packed_parallel_runs_a_head_per_copy():
    """Parallel("p", "q") of two par_bn adapters on packed input: head i on copy i, each equal to
    its child run alone with its head, on the packed and on the padded call alike, with the summed
    loss's gradients."""
    model = heads_model()
    padded, packed, mask = padded_and_packed("p")
    setup = Parallel("p", "q")
    logits, loss, grads = run(model, packed, adapter_names=setup)
    padded_logits, padded_loss, padded_grads = run(model, padded, adapter_names=setup)
    for i, name in enumerate("pq"):
        alone = model(**packed, adapter_names=name).logits  # runs head `name`, as the package picks it
        assert logits[i].shape == (mask.sum(), 5 if name == "p" else 6)
        assert_close(logits[i], alone, atol=2e-5, name=f"head {name}")
        assert_close(logits[i], padded_logits[i][mask.bool()], atol=2e-5, name=f"head {name} padded")
    assert_close(loss, padded_loss, atol=2e-6, name="loss")
    assert set(grads) == set(padded_grads)
    assert any(".adapters.p." in n for n in grads) and any(".adapters.q." in n for n in grads)
    for name, grad in padded_grads.items():
        assert_close(grads[name], grad, atol=2e-5, name=name)


def test_packed_entry_refuses_what_it_cannot_take():
    model = heads_model()
    model.add_multiple_choice_head("mc", num_choices=2)
    _, packed, _ = padded_and_packed("tag")
    mask = torch.ones(1, packed["input_ids"].shape[0], dtype=torch.long)
    with pytest.raises(ValueError, match="cu_seqlens: head 'mc' is a multiple-choice head"):
        model(**{**packed, "labels": None}, head="mc")
    with pytest.raises(ValueError, match="labels must hold one label per packed token"):
        model(**{**packed, "labels": packed["labels"][:-1]}, head="tag")
    with pytest.raises(ValueError, match="labels must hold one entry per sequence"):
        model(**{**packed, "labels": torch.tensor([0, 1])}, head="cls")
    with pytest.raises(ValueError, match="start_positions must hold one entry per sequence"):
        model(**{k: v for k, v in packed.items() if k != "labels"}, head="qa",
              start_positions=torch.tensor([0]), end_positions=torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="attention_mask must be None with packed input"):
        model(**packed, attention_mask=mask, head="tag")
    with pytest.raises(ValueError, match="max_seqlen must be given"):
        model(**{k: v for k, v in packed.items() if k != "max_seqlen"}, head="tag")


@pytest.mark.parametrize("head, labels", [("cls", [2, 1, 0]), ("ml", [[1.0, 0.0, 1.0, 0.0]] * 3)])
def test_packed_classification_label_of_an_empty_sequence_is_refused(head, labels):
    """As the task classes: an empty sequence (cu_seqlens [0, 3, 3, 7]) has no token to pool, so a
    label that counts for it is a ValueError naming labels; single-label classification ignores
    a -100 label, so it may carry one (the loss is then the batch's without it)."""
    model = heads_model()
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (7,))
    packed = dict(input_ids=ids, cu_seqlens=torch.tensor([0, 3, 3, 7], dtype=torch.int32), max_seqlen=4)
    with pytest.raises(ValueError, match="labels must not count for an empty sequence .*found sequence 1"):
        model(**packed, labels=torch.tensor(labels), head=head)
    if head == "cls":
        ignored = model(**packed, labels=torch.tensor([2, -100, 0]), head=head).loss
        without = model(input_ids=ids, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), max_seqlen=4,
                        labels=torch.tensor([2, 0]), head=head).loss
        assert_close(ignored, without, atol=1e-6, name="loss")
