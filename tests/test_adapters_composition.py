"""Split, BatchSplit, Average, MultiTask, and Fuse and Parallel inside the outer Stack (parity with the adapters
package itself is in test_adapters_oracle.py's task cases): a padded batch packed inside, the padded computation
(pack=False) and packed input (cu_seqlens) give the same result at every real position, with
gradients; BatchSplit rows of children that share no adapter place equal each child alone;
and the package's refusals (LoRA in a Split, sizes that do not add up, setups too deep)."""

import pytest
import torch
from conftest import SMALL_CONFIG, assert_close

from distilbert_fast import (
    Average,
    BatchSplit,
    DistilBertAdapterModel,
    DistilBertConfig,
    DistilBertModel,
    Fuse,
    LoRAConfig,
    MultiTask,
    Parallel,
    SeqBnConfig,
    Split,
    Stack,
)

MASK_LENGTHS = [5, 7, 2]  # real tokens per row of the padded batch (seq 7)
SETUPS = {
    "batch_split": BatchSplit("a", "h", batch_sizes=[1, 2]),
    "batch_split_lora_bottleneck": BatchSplit("l", Stack("a", "m"), batch_sizes=[2, 1]),
    "split": Split("a", "b", splits=[3, 4]),
    "split_in_batch_split": BatchSplit(Split("a", "b", splits=[2, 5]), "b", batch_sizes=[2, 1]),
    "stack_fuse": Stack("l", Fuse("a", "b")),
    "fuse_of_stack": Fuse(Stack("h", "a"), "b"),
    "stack_batch_split": Stack("h", BatchSplit("a", Stack("b", "m"), batch_sizes=[1, 2])),
    "stack_parallel": Stack("l", Parallel(Stack("h", "a"), "b")),  # (copy i: rows i * 3 .. i * 3 + 2)
    "average": Average("a", Stack("h", "b"), weights=[0.7, 0.3]),
    "average_lora": Stack("h", Average("l", "m", weights=[3.0, -1.0], normalize_weights=False)),
    "average_of_splits": Average(Split("a", "b", splits=[3, 4]), BatchSplit("h", "b", batch_sizes=[2, 1])),
    "batch_split_of_average": BatchSplit(Average("a", "b"), "h", batch_sizes=[2, 1]),
    "multi_task": MultiTask(Stack("l", "a"), Average("h", "b"), "m"),
    "stack_multi_task": Stack("h", MultiTask("l", "m", "a")),
    "parallel_of_average_and_batch_split": Parallel(Average("a", "h"),
                                                    BatchSplit("l", Stack("m", "b"), batch_sizes=[1, 2])),
}
TASK_IDS = torch.tensor([1, 0, 2])  # (forward(task_ids=...) of the MultiTask setups: row r's child)


def composed_model(cls=DistilBertModel):
    torch.manual_seed(0)
    model = cls(DistilBertConfig(**SMALL_CONFIG)).eval()
    model.add_adapter("a", SeqBnConfig(reduction_factor=4))
    model.add_adapter("b", SeqBnConfig(reduction_factor=2, non_linearity="gelu", scaling="learned"))
    model.add_adapter("h", "double_seq_bn")
    model.add_adapter("l", LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]))
    model.add_adapter("m", LoRAConfig(r=3, alpha=3))
    model.add_adapter_fusion(["a", "b"])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter" in name or ".loras." in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def batch():
    ids = torch.randint(1, SMALL_CONFIG["vocab_size"], (3, 7))
    mask = (torch.arange(7)[None] < torch.tensor(MASK_LENGTHS)[:, None]).long()
    return ids, mask


def hidden_and_grads(model, **inputs):
    """The hidden states at real positions, and the gradients of a weighted sum of them."""
    model.zero_grad()
    out = model(**inputs).last_hidden_state
    mask = inputs.get("attention_mask")
    out = out if mask is None else out[mask.bool().repeat(out.shape[0] // mask.shape[0], 1)]
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(SETUPS))
def test_packed_padded_and_packed_input_agree(name):
    model = composed_model()
    ids, mask = batch()
    real = mask.bool()
    setup = SETUPS[name]
    tasks = {"task_ids": TASK_IDS} if any(isinstance(b, MultiTask) for b in setup.blocks()) else {}
    packed, packed_grads = hidden_and_grads(model, input_ids=ids, attention_mask=mask, adapter_names=setup, **tasks)
    padded, padded_grads = hidden_and_grads(model, input_ids=ids, attention_mask=mask, adapter_names=setup,
                                            pack=False, **tasks)
    cu_seqlens = torch.tensor([0, *torch.tensor(MASK_LENGTHS).cumsum(0)], dtype=torch.int32)
    entry, entry_grads = hidden_and_grads(model, input_ids=ids[real], cu_seqlens=cu_seqlens,
                                          max_seqlen=max(MASK_LENGTHS), adapter_names=setup, **tasks)
    plain = model(input_ids=ids, attention_mask=mask).last_hidden_state[real]
    assert (packed[:len(plain)] - plain).abs().max() > 1e-2  # the setup changes the output
    assert_close(packed, padded, atol=2e-5, name="packed vs padded")
    assert_close(entry, padded, atol=2e-5, name="packed input vs padded")
    assert set(packed_grads) == set(padded_grads) == set(entry_grads)
    assert all(any(f".{n}." in g for g in packed_grads) for n in setup.flatten())  # every adapter trains
    for key, grad in padded_grads.items():
        atol = 2e-5 * (1 + grad.abs().max().item())  # (fp32 sums of up to ~1000)
        assert_close(packed_grads[key], grad, atol=atol, name=f"grad {key} packed")
        assert_close(entry_grads[key], grad, atol=atol, name=f"grad {key} packed input")


def test_batch_split_rows_of_children_apart_equal_each_child_alone():
    """Where no two children hold an adapter at the same place (a LoRA and a bottleneck adapter,
    two LoRAs), each child's rows are that child alone: the rows of a child with no adapter at a
    place get the plain residual + LayerNorm there (the package fails on the bottleneck one)."""
    model = composed_model()
    ids, mask = batch()
    real = mask.bool()
    for setup in (BatchSplit("l", "a", batch_sizes=[2, 1]), BatchSplit("m", "l", "a", batch_sizes=1)):
        out = model(ids, attention_mask=mask, adapter_names=setup).last_hidden_state
        start = 0
        for child, size in zip(setup, setup.batch_sizes):
            rows = slice(start, start + size)
            alone = model(ids[rows], attention_mask=mask[rows], adapter_names=child).last_hidden_state
            assert_close(out[rows][real[rows]], alone[real[rows]], atol=2e-5, name=f"{setup} rows of {child}")
            start += size


def test_batch_split_heads_take_their_rows_labels_and_mask():
    """On DistilBertAdapterModel a BatchSplit runs head i on child i's rows with those rows'
    labels and attention mask (set_active_adapters makes the active head that BatchSplit, as
    the package; its heads get the whole batch's mask, which a token head's loss cannot take);
    the loss is the heads' sum. Packed input is refused (the heads take rows of a padded batch)."""
    model = composed_model(DistilBertAdapterModel)
    model.add_tagging_head("a", num_labels=3)
    model.add_tagging_head("h", num_labels=2)
    ids, mask = batch()
    setup = BatchSplit("a", "h", batch_sizes=[1, 2])
    model.set_active_adapters(setup)
    assert model.active_head == setup
    labels = torch.randint(0, 2, (3, 7))
    out = model(ids, attention_mask=mask, labels=labels)
    hidden = model.distilbert(ids, attention_mask=mask, adapter_names=setup)
    losses = []
    for head_out, name, rows in zip(out.head_outputs, ("a", "h"), (slice(0, 1), slice(1, 3))):
        rows_out = type(hidden)(last_hidden_state=hidden.last_hidden_state[rows])
        expected = model.heads[name](rows_out, mask[rows], labels=labels[rows])
        real = mask[rows].bool()
        assert_close(head_out.logits[real], expected.logits[real], atol=1e-5, name=f"head {name}")
        assert_close(head_out.loss, expected.loss, atol=1e-6, name=f"loss {name}")
        losses.append(expected.loss)
    assert_close(out.loss, sum(losses), atol=1e-6, name="loss")
    with pytest.raises(ValueError, match="BatchSplit heads"):
        model(ids[mask.bool()], cu_seqlens=torch.tensor([0, 5, 12, 14], dtype=torch.int32), max_seqlen=7)
    with pytest.raises(IndexError, match=r"batch has a size of 2 which is not equal to the sum of batch_sizes \[1, 2\]"):
        model(ids[:2], attention_mask=mask[:2])


def test_the_package_refusals():
    """What the package refuses, refused alike: LoRA in a Split (NotImplementedError), batch sizes
    or splits that do not add up to the batch / padded length (IndexError), setups nested too deep
    (ValueError); and ours: a Parallel inside another block, sizes that are not one per child."""
    model = composed_model()
    ids, mask = batch()
    with pytest.raises(NotImplementedError, match="LoRA adapters in a Parallel inside a Stack"):
        model(ids, attention_mask=mask, adapter_names=Stack("a", Parallel("l", "b")))
    with pytest.raises(NotImplementedError, match="LoRA adapters do not run in a Split"):
        model(ids, attention_mask=mask, adapter_names=Split("a", "l", splits=[3, 4]))
    with pytest.raises(IndexError, match=r"sequence length 7 which is not equal to the sum of splits \[3, 3\]"):
        model(ids, attention_mask=mask, adapter_names=Split("a", "b", splits=3), pack=False)
    with pytest.raises(IndexError, match="batch has a size of 3"):
        model(ids, attention_mask=mask, adapter_names=BatchSplit("l", "m", batch_sizes=[1, 1]))
    with pytest.raises(ValueError, match="too deep"):
        model(ids, attention_mask=mask, adapter_names=BatchSplit(Stack("a", Split("a", "b", splits=[3, 4])), "b",
                                                                 batch_sizes=[1, 2]))
    with pytest.raises(ValueError, match="too deep"):
        model.set_active_adapters(Split(BatchSplit(Split("a", "b", splits=1), "a", batch_sizes=1), "b", splits=1))
    with pytest.raises(TypeError, match="a Parallel is the outer block or in the outer Stack"):
        BatchSplit(Parallel("a", "b"), "h", batch_sizes=1)
    with pytest.raises(ValueError, match="batch_sizes must be an int >= 0 or a list of one per child"):
        BatchSplit("a", "b", batch_sizes=[1, 2, 3])
    with pytest.raises(ValueError, match="no adapter fusion named 'b,a'"):
        model.set_active_adapters(Stack("l", Fuse("b", "a")))


def test_average_weights_as_the_package_keeps_them():
    """Average's weights: 1 / n each by default, divided by their sum unless
    normalize_weights=False; to_dict keeps them, from_dict normalises again (as the package's);
    weights that are not one number per child, or sum to 0 where they are normalised, are refused."""
    assert Average("a", "b", "c").weights == [1 / 3] * 3
    assert Average("a", "b", weights=[3, 1]).weights == [0.75, 0.25]
    unnormalised = Average("a", Stack("b", "c"), weights=[2.0, -0.5], normalize_weights=False)
    assert unnormalised.weights == [2.0, -0.5]
    data = unnormalised.to_dict()
    single = [{"type": "single", "children": [name]} for name in "abc"]
    assert data == {"type": "Average", "children": [single[0], {"type": "Stack", "children": single[1:]}],
                    "kwargs": {"weights": [2.0, -0.5]}}
    assert Stack.from_dict(data).weights == pytest.approx([2.0 / 1.5, -0.5 / 1.5])
    assert Stack.from_dict(MultiTask("a", Average("b", "c")).to_dict()) == MultiTask("a", Average("b", "c"))
    for weights, match in (([1.0], "one number per child"), ("ab", "one number per child"),
                           ([1.0, -1.0], "must not sum to 0")):
        with pytest.raises(ValueError, match=match):
            Average("a", "b", weights=weights)
    Average("a", "b", weights=[1.0, -1.0], normalize_weights=False)  # (nothing to divide)


def test_average_is_the_package_weighted_mean_of_its_children():
    """Average of two bottleneck adapters with normalize_weights=False: mean_i(w_i * out_i), as the
    package computes it; for one adapter only the weights [2, 0] give it alone (mean of 2 * out
    and 0); a LoRA's update likewise. (The package's own numbers: test_adapters_oracle.py.)"""
    model = composed_model()
    ids, mask = batch()
    real = mask.bool()

    def hidden(setup):
        return model(ids, attention_mask=mask, adapter_names=setup).last_hidden_state[real]

    for alone, other in (("a", "b"), ("l", "m")):
        got = hidden(Average(alone, other, weights=[2.0, 0.0], normalize_weights=False))
        assert_close(got, hidden(alone), atol=2e-5, name=f"Average({alone}, {other}) weights [2, 0]")
        assert (hidden(Average(alone, other)) - hidden(alone)).abs().max() > 1e-2


def test_multi_task_rows_take_their_task_by_index_or_name():
    """MultiTask: task_ids as child indices or as child names give one result; a row's result
    depends on its own task only (rows with the same task agree with a batch of those rows);
    without task_ids, or with ids not one per row or an unknown name, a ValueError says so."""
    model = composed_model()
    ids, mask = batch()
    real = mask.bool()
    setup = MultiTask("l", "a", "b")
    by_index = model(ids, attention_mask=mask, adapter_names=setup, task_ids=torch.tensor([2, 0, 2])).last_hidden_state
    by_name = model(ids, attention_mask=mask, adapter_names=setup, task_ids=["b", "l", "b"]).last_hidden_state
    assert_close(by_name[real], by_index[real], atol=0, name="names vs indices")
    rows = torch.tensor([0, 2])
    alone = model(ids[rows], attention_mask=mask[rows], adapter_names=setup, task_ids=["b", "b"]).last_hidden_state
    assert_close(by_index[rows][real[rows]], alone[real[rows]], atol=2e-5, name="rows of task b")
    other = model(ids, attention_mask=mask, adapter_names=setup, task_ids=torch.tensor([1, 0, 2])).last_hidden_state
    assert (other[0] - by_index[0])[real[0]].abs().max() > 1e-2
    assert_close(other[1:][real[1:]], by_index[1:][real[1:]], atol=2e-5, name="rows whose task stayed")
    for kwargs, match in (({}, r"needs forward\(task_ids=...\)"),
                          ({"task_ids": torch.tensor([0, 1])}, r"one per row \(3\), got torch.int64 of shape \(2,\)"),
                          ({"task_ids": torch.tensor([0.0, 1.0, 1.0])}, "integer child indices"),
                          ({"task_ids": ["a", "zz", "a"]}, "'zz' is not a child of MultiTask")):
        with pytest.raises(ValueError, match=match):
            model(ids, attention_mask=mask, adapter_names=setup, **kwargs)


def test_average_and_multi_task_nest_as_the_package_allows():
    """The package's ALLOWED_NESTINGS and depth rules: an Average may hold Stacks, Splits and
    BatchSplits and sit in a Stack, Split, BatchSplit or Parallel; a MultiTask holds Stacks and Averages
    (the package takes a Fuse and then fails in its forward); a Parallel goes in neither; below
    the outer block's children only Stacks of names."""
    model = composed_model()
    for setup in (Stack("a", Average("a", "b")), Split(Average("a", "b"), "h", splits=[3, 4]),
                  Average(Split("a", "b", splits=[3, 4]), "h"), Stack("l", MultiTask("l", "m"))):
        model.set_active_adapters(setup)
    bad = [
        (lambda: Fuse(Average("a", "b"), "h"), TypeError, "Fuse children must be adapter names"),
        (lambda: MultiTask(Fuse("a", "b"), "h"), TypeError, "cannot hold a Fuse"),
        (lambda: Average(Parallel("a", "b"), "h"), TypeError, "a Parallel is the outer block or in the outer Stack"),
        (lambda: Parallel(Split("a", "b", splits=1), "h"), TypeError, "Parallel children must be"),
        (lambda: model.set_active_adapters(Parallel(Average(Split("a", "b", splits=[3, 4]), "h"), "b")), ValueError,
         "too deep"),
        (lambda: MultiTask(Parallel("a", "b"), "h"), TypeError, "a Parallel is the outer block or in the outer Stack"),
        (lambda: Average(MultiTask("a", "b"), "h"), TypeError, "Average children must be"),
        (lambda: model.set_active_adapters(Stack("a", Average(Split("a", "b", splits=[3, 4]), "h"))), ValueError,
         "too deep"),
        (lambda: model.set_active_adapters(Stack("a", MultiTask(Average("a", "b"), "h"))), ValueError, "too deep"),
    ]
    for make, error, match in bad:
        with pytest.raises(error, match=match):
            make()


def test_multi_task_and_average_on_the_heads_model_keep_the_active_head():
    """On DistilBertAdapterModel a MultiTask or an Average names no head (the package's
    parse_heads_from_composition gives none), so set_active_adapters keeps the active head, and
    forward(task_ids=...) runs it on the setup's hidden states."""
    model = composed_model(DistilBertAdapterModel)
    model.add_classification_head("x", num_labels=3)
    ids, mask = batch()
    for setup in (MultiTask("a", Stack("l", "b")), Average("a", "b")):
        model.set_active_adapters(setup)
        assert model.active_head == "x" and model.active_adapters == setup
        tasks = {"task_ids": torch.tensor([0, 1, 1])} if isinstance(setup, MultiTask) else {}
        logits = model(ids, attention_mask=mask, **tasks).logits
        hidden = model.distilbert(ids, attention_mask=mask, **tasks)
        assert_close(logits, model.heads["x"](hidden, mask).logits, atol=1e-6, name=repr(setup))
        plain = model.distilbert(ids, attention_mask=mask, adapter_names="a").last_hidden_state
        assert (hidden.last_hidden_state - plain)[mask.bool()].abs().max() > 1e-2
