"""transformers' BERT family under distilbert_fast.optimize(), hunted as a demanding user would:
every class (BertModel and each task head, NSP and pre-training too) against the same model
unoptimised, on a tiny config and on the real all-MiniLM-L6-v2 checkpoint: token types absent or
given, position_ids, inputs_embeds, head_mask, hidden states and attentions, tuples
(return_dict=False), losses and every gradient, tied embeddings after resize_token_embeddings,
save_pretrained / from_pretrained both ways, gradient checkpointing, torch.compile(fullgraph=True)
with no graph break and torch.export. The reference runs transformers' eager attention, so that
it returns attention weights."""

import copy

import pytest
import torch

from conftest import assert_close, reference_vocab_dir

import distilbert_fast

transformers = pytest.importorskip("transformers")

TINY_BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0)
CLASSES = ["BertModel", "BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering",
           "BertForMaskedLM", "BertForMultipleChoice", "BertForNextSentencePrediction", "BertForPreTraining"]


def pair(class_name, config=None):
    """(reference, optimised copy) of one transformers model, in eval mode."""
    config = config or transformers.BertConfig(**TINY_BERT)
    config._attn_implementation = "eager"
    ref = getattr(transformers, class_name)(config).eval()
    return ref, distilbert_fast.optimize(copy.deepcopy(ref))


def batch(class_name, token_types=True, vocab=99, batch=3, seq=11):
    """A ragged padded batch (rows of 11, 7 and 3 tokens); second segment from position 5."""
    ids = torch.randint(1, vocab, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    inputs = dict(input_ids=ids, attention_mask=mask)
    if token_types:
        inputs["token_type_ids"] = (torch.arange(seq) >= 5).long().expand(batch, seq).contiguous()
    if class_name.endswith("MultipleChoice"):
        inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    return inputs


def labels(class_name, inputs, vocab=99):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = ids.shape[0]
    token_labels = lambda high: torch.randint(0, high, ids.shape).masked_fill(mask == 0, -100)  # noqa: E731
    return {
        "BertForSequenceClassification": lambda: dict(labels=torch.randint(0, 2, (rows,))),
        "BertForMultipleChoice": lambda: dict(labels=torch.randint(0, 2, (rows,))),
        "BertForNextSentencePrediction": lambda: dict(labels=torch.randint(0, 2, (rows,))),
        "BertForQuestionAnswering": lambda: dict(start_positions=torch.tensor([1, 2, 0]),
                                                 end_positions=torch.tensor([3, 5, 2])),
        "BertForTokenClassification": lambda: dict(labels=token_labels(2)),
        "BertForMaskedLM": lambda: dict(labels=token_labels(vocab)),
        "BertForPreTraining": lambda: dict(labels=token_labels(vocab), next_sentence_label=torch.randint(0, 2, (rows,))),
    }.get(class_name, dict)()


def compare(ours, ref, mask, atol=1e-5, path="output"):
    """Equal structure; tensors equal at real positions ((batch, seq, ...) tensors at the mask's
    True entries: the optimised model's padding positions hold zeros)."""
    if isinstance(ref, dict):
        assert list(ours.keys()) == list(ref.keys()), path
        ours, ref = ours.to_tuple(), ref.to_tuple()
    if isinstance(ref, (tuple, list)):
        assert isinstance(ours, (tuple, list)) and len(ours) == len(ref), f"{path}: {len(ours)} entries, want {len(ref)}"
        for i, (a, b) in enumerate(zip(ours, ref)):
            compare(a, b, mask, atol, f"{path}[{i}]")
        return
    if ref is None:
        assert ours is None, path
        return
    assert ours.shape == ref.shape, f"{path}: shape {tuple(ours.shape)}, want {tuple(ref.shape)}"
    if ref.dim() >= 2 and tuple(ref.shape[:2]) == tuple(mask.shape):
        ours, ref = ours[mask.bool()], ref[mask.bool()]
    elif ref.dim() == 4 and ref.shape[0] == mask.shape[0]:  # attentions (batch, heads, seq, seq): real queries
        ours, ref = ours.transpose(1, 2)[mask.bool()], ref.transpose(1, 2)[mask.bool()]
    assert_close(ours, ref, atol=atol, name=path)


def flat_mask(inputs):
    mask = inputs.get("attention_mask")
    return mask.reshape(-1, mask.shape[-1])


CASES = {
    "token_types": {},
    "no_token_types": dict(token_types=False),
    "hidden_states_and_attentions": dict(output_hidden_states=True, output_attentions=True),
    "tuple_with_attentions": dict(return_dict=False, output_attentions=True, output_hidden_states=True),
    "position_ids": dict(position_ids=True),
    "inputs_embeds": dict(inputs_embeds=True),
    "head_mask": dict(head_mask=torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("class_name", CLASSES)
def test_outputs_equal_unoptimised(class_name, case):
    call = dict(CASES[case])
    ref, model = pair(class_name)
    inputs = batch(class_name, token_types=call.pop("token_types", True))
    if call.pop("position_ids", False):
        inputs["position_ids"] = torch.randint(0, 64, inputs["input_ids"].shape)
    if call.pop("inputs_embeds", False):
        inputs["inputs_embeds"] = torch.randn(*inputs.pop("input_ids").shape, 32)
    with torch.no_grad():
        compare(model(**inputs, **call), ref(**inputs, **call), flat_mask(inputs))


@pytest.mark.parametrize("class_name", CLASSES[1:])
def test_losses_and_gradients_equal_unoptimised(class_name):
    ref, model = pair(class_name)
    inputs = batch(class_name)
    inputs.update(labels(class_name, inputs))
    ref.train(), model.train()
    expected, got = ref(**inputs), model(**inputs)
    assert_close(got.loss, expected.loss, atol=1e-5, name="loss")
    expected.loss.backward()
    got.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        want = grads[name].grad
        if want is None:
            assert p.grad is None or not p.grad.any(), name
        else:
            assert_close(p.grad, want, atol=1e-5, name=f"grad {name}")


@pytest.mark.parametrize("class_name", ["BertForMaskedLM", "BertForPreTraining"])
def test_resized_tied_embeddings_save_and_load_both_ways(class_name, tmp_path):
    """resize_token_embeddings keeps the decoder tied to the (new) word embeddings on the
    optimised model; its saved folder loads into transformers, which gives the same outputs, and
    optimising the reloaded model keeps them."""
    ref, model = pair(class_name)
    model.resize_token_embeddings(120)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    inputs = batch(class_name, vocab=120)
    inputs["input_ids"][:, 1] = 110  # a new token
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, class_name).from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = loaded(**inputs)
        compare(model(**inputs), expected, inputs["attention_mask"])
        compare(distilbert_fast.optimize(loaded)(**inputs), expected, inputs["attention_mask"])


@pytest.mark.parametrize("class_name", ["BertForQuestionAnswering", "BertForPreTraining"])
def test_compiles_without_graph_breaks_and_exports(class_name):
    """torch.compile(fullgraph=True) with no graph break and torch.export.export of the heads
    whose outputs test_optimize's compile test does not cover (token-level QA logits; MLM + NSP
    with the pooler): the unoptimised model's outputs at real positions. (Multiple choice and NSP
    compiled and exported as well when tried; left out here for the suite's time.)"""
    torch._dynamo.reset()
    ref, model = pair(class_name)
    inputs = batch(class_name)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_count >= 1 and explanation.graph_break_count == 0, explanation.break_reasons
    with torch.no_grad():
        expected = ref(**inputs)
        compare(torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs), expected, flat_mask(inputs))
        program = torch.export.export(model, (), inputs)
        compare(program.module()(**inputs), expected, flat_mask(inputs))
    torch._dynamo.reset()


def test_gradient_checkpointing_keeps_the_gradients():
    ref, model = pair("BertForTokenClassification")
    inputs = batch("BertForTokenClassification")
    inputs.update(labels("BertForTokenClassification", inputs))
    for m in (ref, model):
        m.gradient_checkpointing_enable()
        m.train()
        m(**inputs).loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name].grad, atol=1e-5, name=f"grad {name}")


def test_real_checkpoint_pairs_with_a_head_loss_and_gradients():
    """all-MiniLM-L6-v2 as BertForSequenceClassification (a new head on the real encoder), on
    sentence pairs (token types 0 and 1, ragged): logits, loss and every gradient equal
    transformers' own."""
    path = reference_vocab_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(["A man is eating food.", "hi", "The new movie is awesome!"],
                       ["Someone eats.", "hello there, how are you doing today?", "I loved every minute of it."],
                       padding=True, return_tensors="pt")
    assert inputs["token_type_ids"].any()
    torch.manual_seed(0)
    ref = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=3, attn_implementation="eager")
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    for m in (ref, model):
        m.train()
        m.config.hidden_dropout_prob = 0.0
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    target = torch.tensor([0, 2, 1])
    expected, got = ref(**inputs, labels=target), model(**inputs, labels=target)
    assert_close(got.logits, expected.logits, atol=1e-5, name="logits")
    assert_close(got.loss, expected.loss, atol=1e-5, name="loss")
    expected.loss.backward()
    got.loss.backward()
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4, name=f"grad {name}")


def test_optimised_distilbert_treats_head_mask_as_transformers_does():
    """The same rule on DistilBERT: transformers 5 takes head_mask into **kwargs and ignores it,
    so the optimised model ignores it too (with transformers 4, which applies it, both apply it)."""
    from conftest import SMALL_CONFIG

    config = transformers.DistilBertConfig(**SMALL_CONFIG)
    ref = transformers.DistilBertForSequenceClassification(config).eval()
    model = distilbert_fast.optimize(copy.deepcopy(ref))
    inputs = batch("DistilBert", token_types=False)
    head_mask = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        compare(model(**inputs, head_mask=head_mask), ref(**inputs, head_mask=head_mask), inputs["attention_mask"])


@pytest.mark.parametrize("class_name", ["BertModel", "BertForTokenClassification"])
def test_flattened_batch_carries_token_types(class_name):
    """The padding-free entry point of transformers' classes (DataCollatorWithFlattening's row,
    cu_seq_lens_q) with token_type_ids of the row (the collator drops them; a caller adds them):
    each sequence attends within itself with its own token types, as the same sequences padded."""
    ref, model = pair(class_name)
    lengths = (5, 9, 2)
    features = [{"input_ids": torch.randint(1, 99, (n,)).tolist()} for n in lengths]
    flat = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    flat.pop("labels", None)
    types = [(torch.arange(n) >= n // 2).long() for n in lengths]
    flat["token_type_ids"] = torch.cat(types)[None]
    padded = {k: torch.zeros(3, max(lengths), dtype=torch.long) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for row, (f, n) in enumerate(zip(features, lengths)):
        padded["input_ids"][row, :n] = torch.tensor(f["input_ids"])
        padded["attention_mask"][row, :n] = 1
        padded["token_type_ids"][row, :n] = types[row]
    key = "last_hidden_state" if class_name == "BertModel" else "logits"
    with torch.no_grad():
        got, expected = model(**flat)[key], ref(**padded)[key]
    assert got.shape[:2] == (1, sum(lengths))
    assert_close(got[0], expected[padded["attention_mask"].bool()], atol=1e-5, name=key)
