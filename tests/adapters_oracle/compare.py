"""The adapters-package side of the parity test (tests/test_adapters_oracle.py). Runs in
.venv-adapters (AdapterHub `adapters` 1.3 + transformers 4.57), never imports distilbert_fast.

    compare.py produce OUT   for each case: build a DistilBertAdapterModel of the package with
                             random adapter and head weights, run it, and write to OUT/<case>/:
                             base.pt (base-model weights), io.pt (inputs, outputs, gradients of
                             every parameter) and one save_adapter() directory per adapter
    compare.py check DIR     for each case directory DIR/<case>/ holding base.pt and adapters
                             saved by distilbert_fast: load them into the package's model, run
                             it and write DIR/<case>/oracle_out.pt

Both modes also run the TASK_CASES: transformers' own task classes (and the base model) after
``adapters.init(model)``, and Parallel compositions (on a task class, on the base model, and on
DistilBertAdapterModel with a head per adapter); there model.pt holds every weight but the
adapters'. ``compare.py produce OUT REAL.json`` adds the REAL_TASK_CASES, on the real checkpoint
whose weights and sizes REAL.json names.

The cases are listed here only; OUT/manifest.json tells the test what each holds.
"""

import inspect
import json
import os
import sys

import torch

import adapters
import transformers
from adapters import (
    AdapterFusionConfig,
    AdapterSetup,
    BatchSplit,
    Fuse,
    BnConfig,
    DistilBertAdapterModel,
    DoubleSeqBnConfig,
    LoRAConfig,
    Parallel,
    ParBnConfig,
    SeqBnConfig,
    MultiTask,
    Split,
    Stack,
)
from adapters.composition import Average, parse_heads_from_composition
# (this script's folder: shared with test_adapters_oracle.py)
from runs import AVERAGES, fusion_attentions, outputs_and_grads, prepare, run_head_selection

SMALL = dict(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64)
BATCH, SEQ = 3, 7

# name -> adapters to add, the Stack to run, the head (type, name, kwargs)
CASES = {
    "pfeiffer_classification": dict(
        adapters={"pf": SeqBnConfig(reduction_factor=4)},
        setup=["pf"],
        head=("classification", "pf", dict(num_labels=3)),
    ),
    "houlsby_tagging": dict(
        adapters={"ho": DoubleSeqBnConfig(reduction_factor=4)},
        setup=["ho"],
        head=("tagging", "ho", dict(num_labels=5)),
    ),
    "lora_qa": dict(
        adapters={"lo": LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"])},
        setup=["lo"],
        head=("qa", "lo", {}),
    ),
    "stack_multiple_choice": dict(
        adapters={"lang": SeqBnConfig(reduction_factor=4), "task": DoubleSeqBnConfig(reduction_factor=8)},
        setup=["lang", "task"],
        head=("multiple_choice", "task", dict(num_choices=3)),
    ),
    "stack_lora_bottleneck_masked_lm": dict(
        adapters={"lk": LoRAConfig(r=2, alpha=5, attn_matrices=["q", "k", "v"]),
                  "pf": SeqBnConfig(reduction_factor=2)},
        setup=["lk", "pf"],
        head=("masked_lm", "pf", {}),
    ),
    "stack_two_loras_regression": dict(
        adapters={"l1": LoRAConfig(r=4, alpha=4), "l2": LoRAConfig(r=3, alpha=6)},
        setup=["l1", "l2"],
        head=("classification", "l2", dict(num_labels=1)),
    ),
    "custom_bn_multilabel": dict(
        adapters={"cu": BnConfig(
            mh_adapter=True, output_adapter=True, reduction_factor={"0": 4, "default": 8},
            non_linearity="gelu", original_ln_before=True, original_ln_after=True,
            residual_before_ln=False, ln_before=True, ln_after=True, adapter_residual_before_ln=True,
            scaling="learned", init_weights="houlsby", leave_out=[1],
        )},
        setup=["cu"],
        head=("multilabel", "cu", dict(num_labels=4, layers=3, activation_function="relu")),
    ),
    "post_add_channel_scaling": dict(
        adapters={"pa": BnConfig(
            mh_adapter=True, output_adapter=False, reduction_factor=2, non_linearity="tanh",
            original_ln_before=True, original_ln_after=False, residual_before_ln="post_add",
            ln_after=True, scaling="channel", init_weights="mam_adapter",
        )},
        setup=["pa"],
        head=("classification", "pa", dict(num_labels=2, layers=1)),
    ),
    # parallel bottleneck adapters (is_parallel): alone, after a sequential one (whose work the
    # package's ParallelAdapter then drops: it reads the sublayer's input), and before one
    "par_bn_tagging": dict(
        adapters={"pb": ParBnConfig(reduction_factor=4)},
        setup=["pb"],
        head=("tagging", "pb", dict(num_labels=3)),
    ),
    "stack_seq_then_scaled_par_bn_ln_after": dict(
        adapters={"s": SeqBnConfig(reduction_factor=4),
                  "p": ParBnConfig(reduction_factor=2, scaling="learned", mh_adapter=True, ln_after=True)},
        setup=["s", "p"],
        head=("classification", "p", dict(num_labels=3)),
    ),
    "stack_par_bn_then_houlsby": dict(
        adapters={"p": ParBnConfig(reduction_factor=4, non_linearity="gelu"),
                  "h": DoubleSeqBnConfig(reduction_factor=4)},
        setup=["p", "h"],
        head=("qa", "h", {}),
    ),
}


# name -> model class, adapters, setup, whether labels go in (the loss then gives gradients).
# The package's Parallel needs the first and last child's adapters wherever the setup has one
# (it indexes them), hence adapters of one kind per Parallel.
TASK_CASES = {
    "task_model_seq_bn": dict(cls="DistilBertModel", adapters={"a": SeqBnConfig(reduction_factor=4)},
                              setup=Stack("a"), labels=False),
    "task_mlm_lora": dict(cls="DistilBertForMaskedLM", adapters={"a": LoRAConfig(r=4, alpha=8)},
                          setup=Stack("a"), labels=True),
    "task_seqcls_houlsby": dict(cls="DistilBertForSequenceClassification",
                                adapters={"a": DoubleSeqBnConfig(reduction_factor=4)}, setup=Stack("a"),
                                labels=True),
    "task_qa_stack": dict(cls="DistilBertForQuestionAnswering",
                          adapters={"l": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                                    "s": SeqBnConfig(reduction_factor=2)},
                          setup=Stack("l", "s"), labels=True),
    "task_tokcls_custom": dict(cls="DistilBertForTokenClassification", adapters={"a": BnConfig(
        mh_adapter=True, output_adapter=True, reduction_factor=4, non_linearity="gelu",
        original_ln_before=True, residual_before_ln=False, ln_after=True, scaling="learned")},
        setup=Stack("a"), labels=True),
    "task_mc_seq_bn": dict(cls="DistilBertForMultipleChoice", adapters={"a": SeqBnConfig(reduction_factor=4)},
                           setup=Stack("a"), labels=True),
    "parallel_seqcls": dict(cls="DistilBertForSequenceClassification",
                            adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2)},
                            setup=Parallel("a", "b"), labels=False),
    # nothing in layer 0: it runs once, the batch is replicated in layer 1
    "parallel_model_stack_leave_out": dict(
        cls="DistilBertModel",
        adapters={"a": SeqBnConfig(reduction_factor=4, leave_out=[0]),
                  "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu", leave_out=[0]),
                  "c": SeqBnConfig(reduction_factor=2, leave_out=[0])},
        setup=Parallel(Stack("a", "b"), "c"), labels=False),
    "parallel_heads": dict(cls="DistilBertAdapterModel",
                           adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2)},
                           setup=Parallel("a", "b"), labels=True),
    # LoRA replicates the batch at its projections in layer 0, each of q, k, v its own input
    "parallel_tokcls_lora_stack": dict(
        cls="DistilBertForTokenClassification",
        adapters={"a": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                  "b": LoRAConfig(r=3, alpha=6, attn_matrices=["q", "k", "v"]),
                  "c": LoRAConfig(r=2, alpha=2, attn_matrices=["q", "k", "v"])},
        setup=Parallel(Stack("a", "b"), "c"), labels=False),
    # AdapterSetup(Stack("a", "b")) runs head "b", whichever head is active (on our side the heads
    # load in the order of `adapters`, so "a" is the active one there)
    "stack_heads_by_setup": dict(cls="DistilBertAdapterModel",
                                 adapters={"b": LoRAConfig(r=2, alpha=4), "a": SeqBnConfig(reduction_factor=4)},
                                 setup=Stack("a", "b"), labels=True, by_setup=True),
    # q and v only: attention repeats k to match
    "parallel_heads_lora": dict(cls="DistilBertAdapterModel",
                                adapters={"a": LoRAConfig(r=4, alpha=8), "b": LoRAConfig(r=2, alpha=4)},
                                setup=Parallel("a", "b"), labels=True),
    # par_bn in a Parallel. The package's ParallelAdapter.post_forward adds the sublayer's output
    # of the batch not yet replicated, so in the layer that replicates it runs one row only
    # (one_row: the inputs' full-length row), or a batch a LoRA below has replicated already.
    "parallel_par_bn_one_row": dict(
        cls="DistilBertForSequenceClassification",
        adapters={"a": ParBnConfig(reduction_factor=4, mh_adapter=True),
                  "b": ParBnConfig(reduction_factor=2, mh_adapter=True, ln_after=True, scaling="learned")},
        setup=Parallel("a", "b"), labels=False, one_row=True),
    "parallel_heads_par_bn_one_row": dict(
        cls="DistilBertAdapterModel",
        adapters={"a": ParBnConfig(reduction_factor=4), "b": ParBnConfig(reduction_factor=2, non_linearity="gelu")},
        setup=Parallel("a", "b"), labels=True, one_row=True),
    # the first child's pre_forward and the last one's post_forward run on every copy
    "parallel_seq_bn_par_bn_one_row": dict(
        cls="DistilBertModel",
        adapters={"s": SeqBnConfig(reduction_factor=4), "p": ParBnConfig(reduction_factor=2)},
        setup=Parallel("s", "p"), labels=False, one_row=True),
    "parallel_par_bn_houlsby_one_row": dict(
        cls="DistilBertForTokenClassification",
        adapters={"p": ParBnConfig(reduction_factor=2, mh_adapter=True), "h": DoubleSeqBnConfig(reduction_factor=4)},
        setup=Parallel("p", "h"), labels=False, one_row=True),
    "parallel_stacks_par_bn_lora": dict(
        cls="DistilBertForTokenClassification",
        adapters={"p1": ParBnConfig(reduction_factor=4, mh_adapter=True),
                  "p2": ParBnConfig(reduction_factor=2, mh_adapter=True, scaling="learned"),
                  "l1": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                  "l2": LoRAConfig(r=3, alpha=3, attn_matrices=["q", "k", "v"])},
        setup=Parallel(Stack("p1", "l1"), Stack("p2", "l2")), labels=False),
    # BatchSplit: the first child's pre_forward on every row, each child's adapters on its rows,
    # the last child's post_forward on every row (the package's compose_batch_split)
    "batch_split_seqcls": dict(cls="DistilBertForSequenceClassification",
                               adapters={"a": SeqBnConfig(reduction_factor=4, mh_adapter=True),
                                         "b": DoubleSeqBnConfig(reduction_factor=2)},
                               setup=BatchSplit("a", "b", batch_sizes=[1, 2]), labels=True),
    # a head per child on its rows, each with its rows' labels (set_active_adapters' BatchSplit head)
    "batch_split_heads": dict(cls="DistilBertAdapterModel",
                              adapters={"a": SeqBnConfig(reduction_factor=4),
                                        "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu")},
                              setup=BatchSplit("a", "b", batch_sizes=[2, 1]), labels=True),
    "batch_split_lora_tokcls": dict(cls="DistilBertForTokenClassification",
                                    adapters={"a": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                                              "b": LoRAConfig(r=3, alpha=6, attn_matrices=["q", "k", "v"])},
                                    setup=BatchSplit("a", "b", batch_sizes=[1, 2]), labels=True),
    "stack_lora_then_batch_split_of_stack_qa": dict(
        cls="DistilBertForQuestionAnswering",
        adapters={"l": LoRAConfig(r=2, alpha=4), "a": SeqBnConfig(reduction_factor=4),
                  "b": SeqBnConfig(reduction_factor=2, scaling="learned"), "c": SeqBnConfig(reduction_factor=4, ln_after=True)},
        setup=Stack("l", BatchSplit(Stack("a", "b"), "c", batch_sizes=[2, 1])), labels=True),
    # Split: positions 0-2 of every sequence through "a", 3-6 through "b" (SEQ = 7)
    "split_model": dict(cls="DistilBertModel",
                        adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu")},
                        setup=Split("a", "b", splits=[3, 4]), labels=False),
    "split_houlsby_in_batch_split_mlm": dict(
        cls="DistilBertForMaskedLM",
        adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2),
                  "c": DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu")},
        setup=BatchSplit(Split("a", "b", splits=[2, 5]), "c", batch_sizes=[1, 2]), labels=True),
    # a Fuse inside the outer Stack, and a Fuse with a Stack child (the fusion "b,c" over b and c)
    "stack_then_fuse_seqcls": dict(cls="DistilBertForSequenceClassification",
                                   adapters={"s": SeqBnConfig(reduction_factor=4), "a": SeqBnConfig(reduction_factor=4),
                                             "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu")},
                                   fusions=[["a", "b"]], setup=Stack("s", Fuse("a", "b")), labels=True),
    "fuse_of_stack_tokcls": dict(cls="DistilBertForTokenClassification",
                                 adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2),
                                           "c": DoubleSeqBnConfig(reduction_factor=4)},
                                 fusions=[["b", "c"]], setup=Fuse(Stack("a", "b"), "c"), labels=True),
    # a Parallel inside the outer Stack: the batch replicated after "s" (MAD-X's language adapter,
    # then one task adapter and head per copy), and after a LoRA and inside a Stack child
    "stack_then_parallel_heads": dict(cls="DistilBertAdapterModel",
                                      adapters={"s": SeqBnConfig(reduction_factor=4), "a": SeqBnConfig(reduction_factor=4),
                                                "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu")},
                                      setup=Stack("s", Parallel("a", "b")), labels=True),
    "stack_lora_then_parallel_of_stack_tokcls": dict(
        cls="DistilBertForTokenClassification",
        adapters={"l": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]), "a": DoubleSeqBnConfig(reduction_factor=4),
                  "h": DoubleSeqBnConfig(reduction_factor=2), "b": DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu")},
        setup=Stack("l", Parallel(Stack("a", "h"), "b")), labels=False),
    # Average: mean_i(w_i * out_i) of the children on the same input (weights normalised unless
    # normalize_weights=False), then the last child's post_forward; LoRA: the updates averaged
    "average_seqcls": dict(cls="DistilBertForSequenceClassification",
                           adapters={"a": SeqBnConfig(reduction_factor=4),
                                     "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu", scaling="learned")},
                           setup=Average("a", "b", weights=[0.7, 0.3]), labels=True),
    # (unnormalised weights summing to 1: to_dict / from_dict normalise them again, in both libraries)
    "average_houlsby_unnormalised_model": dict(
        cls="DistilBertModel",
        adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2)},
        setup=Average("a", "b", weights=[1.5, -0.5], normalize_weights=False), labels=False),
    "average_lora_tokcls": dict(cls="DistilBertForTokenClassification",
                                adapters={"a": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                                          "b": LoRAConfig(r=3, alpha=6, attn_matrices=["q", "k", "v"]),
                                          "c": LoRAConfig(r=2, alpha=2, attn_matrices=["q", "k", "v"])},
                                setup=Average("a", "b", "c"), labels=True),
    "stack_then_average_of_stack_qa": dict(
        cls="DistilBertForQuestionAnswering",
        adapters={"s": SeqBnConfig(reduction_factor=4), "a": SeqBnConfig(reduction_factor=4),
                  "b": SeqBnConfig(reduction_factor=2, ln_after=True),
                  "c": SeqBnConfig(reduction_factor=4, non_linearity="gelu")},
        setup=Stack("s", Average(Stack("a", "b"), "c", weights=[0.25, 0.75])), labels=True),
    "stack_lora_then_average_of_loras_mlm": dict(
        cls="DistilBertForMaskedLM",
        adapters={"l": LoRAConfig(r=2, alpha=4), "k": LoRAConfig(r=3, alpha=3), "m": LoRAConfig(r=2, alpha=8)},
        setup=Stack("l", Average("k", "m", weights=[2.0, 1.0])), labels=True),
    "average_of_split_and_batch_split_mlm": dict(
        cls="DistilBertForMaskedLM",
        adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu"),
                  "c": SeqBnConfig(reduction_factor=4, scaling="learned")},
        setup=Average(Split("a", "b", splits=[3, 4]), BatchSplit("b", "c", batch_sizes=[1, 2])), labels=True),
    # head i on child i's rows: the Average's last adapter's head ("b"), then "c"'s
    "batch_split_of_average_heads": dict(
        cls="DistilBertAdapterModel",
        adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu"),
                  "c": SeqBnConfig(reduction_factor=4)},
        setup=BatchSplit(Average("a", "b"), "c", batch_sizes=[2, 1]), labels=True),
    "split_of_average_model": dict(
        cls="DistilBertModel",
        adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2),
                  "c": DoubleSeqBnConfig(reduction_factor=4, non_linearity="gelu")},
        setup=Split(Average("a", "b", weights=[0.4, 0.6]), "c", splits=[3, 4]), labels=False),
    # a bottleneck adapter and a LoRA: at each place one child has an adapter, which the package
    # broadcasts over both weights (out * (w_a + w_l) / 2)
    "average_bottleneck_and_lora_mc": dict(
        cls="DistilBertForMultipleChoice",
        adapters={"a": SeqBnConfig(reduction_factor=4), "l": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"])},
        setup=Average("a", "l"), labels=True),
    # MultiTask: row r through the child task_ids[r] names (a BatchSplit of the rows sorted by task;
    # bottleneck adapters: the first adapter's pre_forward twice, as there)
    "multi_task_seqcls": dict(cls="DistilBertForSequenceClassification",
                              adapters={"a": SeqBnConfig(reduction_factor=4, mh_adapter=True),
                                        "b": DoubleSeqBnConfig(reduction_factor=2)},
                              setup=MultiTask("a", "b"), task_ids=torch.tensor([1, 0, 1]), labels=True),
    # in a Stack after a LoRA; task_ids by name (no row for "b")
    "stack_lora_then_multi_task_names_tokcls": dict(
        cls="DistilBertForTokenClassification",
        adapters={"l": LoRAConfig(r=2, alpha=2), "a": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                  "b": LoRAConfig(r=3, alpha=6, attn_matrices=["q", "k", "v"]),
                  "c": LoRAConfig(r=2, alpha=2, attn_matrices=["q", "k", "v"])},
        setup=Stack("l", MultiTask("a", "b", "c")), task_ids=["c", "a", "c"], labels=True),
    "multi_task_of_stack_and_average_model": dict(
        cls="DistilBertModel",
        adapters={"s": SeqBnConfig(reduction_factor=4), "a": SeqBnConfig(reduction_factor=4),
                  "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu"), "c": SeqBnConfig(reduction_factor=2)},
        setup=MultiTask(Stack("s", "a"), Average("b", "c")), task_ids=torch.tensor([0, 1, 0]), labels=False),
    # a Parallel of an Average and a BatchSplit (each on its copy of the batch; head "b" on copy 0,
    # "d" on copy 1), of bottleneck adapters and of LoRAs
    "parallel_of_average_and_batch_split_heads": dict(
        cls="DistilBertAdapterModel",
        adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2, non_linearity="gelu"),
                  "c": SeqBnConfig(reduction_factor=4, scaling="learned"), "d": SeqBnConfig(reduction_factor=2)},
        setup=Parallel(Average("a", "b", weights=[0.6, 0.4]), BatchSplit("c", "d", batch_sizes=[2, 1])), labels=True),
    "parallel_lora_of_average_and_batch_split_tokcls": dict(
        cls="DistilBertForTokenClassification",
        adapters={"a": LoRAConfig(r=2, alpha=4, attn_matrices=["q", "k", "v"]),
                  "b": LoRAConfig(r=3, alpha=6, attn_matrices=["q", "k", "v"]),
                  "c": LoRAConfig(r=2, alpha=2, attn_matrices=["q", "k", "v"])},
        setup=Parallel(Average("a", "b"), BatchSplit("a", "c", batch_sizes=[1, 2])), labels=False),
}
TASK_LABELS = 3  # num_labels of the task classes (2 for question answering)
# Run only where the test passes the real checkpoint fixture (all-MiniLM-L6-v2's weights as a
# DistilBertModel state_dict): Parallel on real weights and sizes (384 wide, 12 heads, 6 layers).
REAL_TASK_CASES = {
    "real_checkpoint_parallel_tokcls": dict(
        cls="DistilBertForTokenClassification",
        adapters={"a": SeqBnConfig(reduction_factor=16), "b": SeqBnConfig(reduction_factor=8, non_linearity="gelu")},
        setup=Parallel("a", "b"), labels=False),
}


def make_task_model(cls, model_config=SMALL):
    config = transformers.DistilBertConfig(**model_config, num_labels=2 if "QuestionAnswering" in cls else TASK_LABELS)
    config._attn_implementation = "eager"
    if cls == "DistilBertAdapterModel":
        return DistilBertAdapterModel(config)
    model = getattr(transformers, cls)(config)
    adapters.init(model)
    return model


def task_inputs(spec, generator, vocab_size):
    cls = spec["cls"]
    kind = {"DistilBertForMaskedLM": "masked_lm", "DistilBertForQuestionAnswering": "qa",
            "DistilBertForTokenClassification": "tagging", "DistilBertForMultipleChoice": "multiple_choice"
            }.get(cls, "classification")
    inputs = inputs_for(kind, {"num_labels": TASK_LABELS, "num_choices": 2}, generator, vocab_size)
    if not spec["labels"]:
        for key in ("labels", "start_positions", "end_positions"):
            inputs.pop(key, None)
    if spec.get("one_row"):
        inputs = {k: v[1:2] for k, v in inputs.items()}  # row 1 has no padding
    if spec.get("task_ids") is not None:  # (a MultiTask setup's: forward(task_ids=...))
        inputs["task_ids"] = spec["task_ids"]
    return inputs


def run_task(model, spec, setup, inputs):
    """Eval-mode forward (and backward with labels), every parameter trainable. The heads
    model gets its setup through set_active_adapters, so a Parallel activates a head per
    adapter (with by_setup, through AdapterSetup, which picks the head too); the others
    through AdapterSetup."""
    prepare(model)
    if spec["cls"] == "DistilBertAdapterModel" and not spec.get("by_setup"):
        model.set_active_adapters(setup)
        out = model(**inputs)
    else:
        with AdapterSetup(setup):
            out = model(**inputs)
    return outputs_and_grads(model, out)


def produce_tasks(out_dir, real=None):
    """The TASK_CASES, and the REAL_TASK_CASES where ``real`` gives the real checkpoint
    ({"weights": a DistilBertModel state_dict file, "config": its sizes})."""
    manifest = {}
    cases = {**TASK_CASES, **(REAL_TASK_CASES if real else {})}
    for i, (case, spec) in enumerate(cases.items()):
        torch.manual_seed(300 + i)
        generator = torch.Generator().manual_seed(400 + i)
        model_config = real["config"] if case in REAL_TASK_CASES else SMALL
        model = make_task_model(spec["cls"], model_config)
        if case in REAL_TASK_CASES:
            missing, unexpected = model.base_model.load_state_dict(torch.load(real["weights"]), strict=False)
            if unexpected or any("prompt_tuning." not in k for k in missing):
                raise SystemExit(f"{case}: the real weights do not fit: missing {missing}, unexpected {unexpected}")
        for name, config in spec["adapters"].items():
            model.add_adapter(name, config=config)
        for fused in spec.get("fusions", ()):
            model.add_adapter_fusion(fused)
        if spec["cls"] == "DistilBertAdapterModel":
            # (by_setup: a head per adapter, so that the setup's choice among them shows)
            heads = spec["setup"].children if spec.get("by_setup") else parse_heads_from_composition(spec["setup"])
            for name in [heads] if isinstance(heads, str) else heads:
                model.add_classification_head(name, num_labels=TASK_LABELS)
        randomise_adapters_and_heads(model, generator)
        inputs = task_inputs(spec, generator, model_config["vocab_size"])
        case_dir = os.path.join(out_dir, case)
        os.makedirs(case_dir)
        weights = {k: v for k, v in model.state_dict().items() if not is_adapter_key(k) and "prompt_tuning." not in k}
        torch.save(weights, os.path.join(case_dir, "model.pt"))
        for fused in spec.get("fusions", ()):
            model.save_adapter_fusion(os.path.join(case_dir, "fusion_" + ",".join(fused)), fused)
        # (a Parallel resizes the mask in place; task_ids may be a list of names)
        saved_inputs = {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}
        result = run_task(model, spec, spec["setup"], inputs)
        torch.save({"inputs": saved_inputs, "outputs": result}, os.path.join(case_dir, "io.pt"))
        for name in spec["adapters"]:
            model.save_adapter(os.path.join(case_dir, "adapter_" + name), name, with_head=True)
        manifest[case] = {"cls": spec["cls"], "adapters": list(spec["adapters"]), "setup": spec["setup"].to_dict(),
                          "fusions": spec.get("fusions", []),
                          "labels": spec["labels"], "num_labels": TASK_LABELS, "config": model_config,
                          "by_setup": spec.get("by_setup", False)}
    return manifest


# train_adapter on every class: (setup, train_embeddings). The heads model gets a masked-LM head
# "a" (tied output embeddings) added after a classification head "b", so "a" is its active head;
# and (TRAIN_ADAPTER_HEADS_MLM_FIRST) the other way round: "b" stays active, train_adapter("a")
# does not activate head "a", and so leaves its output embeddings' bias trainable.
TRAIN_ADAPTER_SETUPS = [("a", False), ("a", True), (Stack("a", "l"), False), (Parallel("a", "l"), False)]
TRAIN_ADAPTER_HEADS_MLM_FIRST = "DistilBertAdapterModel|masked_lm_first"


def trainable_after_train_adapter():
    """{class: [{"trainable": sorted names of the trainable parameters after
    train_adapter(setup, train_embeddings), "summary": adapter_summary(as_dict=True) before and
    after, "active_head": the heads model's active head after}, one per TRAIN_ADAPTER_SETUPS
    entry]}, and those setups (to_dict) for the other side."""
    result = {}
    for key in [*{spec["cls"]: None for spec in TASK_CASES.values()}, TRAIN_ADAPTER_HEADS_MLM_FIRST]:
        cls = key.split("|")[0]
        result[key] = []
        for setup, train_embeddings in TRAIN_ADAPTER_SETUPS:
            model = make_task_model(cls)
            if key == TRAIN_ADAPTER_HEADS_MLM_FIRST:
                model.add_masked_lm_head("a")
                model.add_classification_head("b", num_labels=TASK_LABELS)
            elif cls == "DistilBertAdapterModel":
                model.add_classification_head("b", num_labels=TASK_LABELS)
                model.add_masked_lm_head("a")
            model.add_adapter("a", config=SeqBnConfig(reduction_factor=4))
            model.add_adapter("l", config=LoRAConfig(r=2))
            before = model.adapter_summary(as_dict=True)
            model.train_adapter(setup, train_embeddings=train_embeddings)
            result[key].append({
                "trainable": sorted(n for n, p in model.named_parameters(remove_duplicate=False)
                                    if p.requires_grad and "prompt_tuning." not in n),
                "summary": [before, model.adapter_summary(as_dict=True)],
                "active_head": getattr(model, "active_head", None),
            })
    setups = [{"setup": Stack(s).to_dict() if isinstance(s, str) else s.to_dict(), "train_embeddings": e}
              for s, e in TRAIN_ADAPTER_SETUPS]
    return {"setups": setups, "trainable": result}


# The adapter API whose arguments (names, in order) must be the package's on every class.
API_METHODS = ("add_adapter", "delete_adapter", "set_active_adapters", "train_adapter", "freeze_model",
               "save_adapter", "load_adapter", "save_all_adapters", "merge_adapter", "reset_adapter",
               "has_adapters", "adapter_summary", "save_head",
               "load_head", "delete_head", "add_classification_head", "add_multiple_choice_head",
               "add_tagging_head", "add_qa_head", "add_masked_lm_head", "add_adapter_fusion", "delete_adapter_fusion",
               "save_adapter_fusion", "load_adapter_fusion", "save_all_adapter_fusions", "train_adapter_fusion",
               "adapter_fusion_to", "save_adapter_setup", "load_adapter_setup")


def api_arguments():
    """{class: {method: [argument names]}} of the package's adapter API, on each class (after
    adapters.init for transformers' own)."""
    result = {}
    for cls in {spec["cls"]: None for spec in TASK_CASES.values()}:
        model = make_task_model(cls)
        result[cls] = {name: [p.name for p in inspect.signature(getattr(model, name)).parameters.values()
                              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
                       for name in API_METHODS if hasattr(model, name)}
    return result


def task_checkpoints_as_heads_model(out_dir):
    """Each task class's checkpoint (transformers' save_pretrained) loaded with the package's
    DistilBertAdapterModel.from_pretrained, which converts its head to head "default": writes
    OUT/checkpoint_<class>/ (the checkpoint, and io.pt: inputs and the heads model's outputs) and
    returns {class: the head's config}."""
    result = {}
    for i, cls in enumerate(("DistilBertForSequenceClassification", "DistilBertForTokenClassification",
                             "DistilBertForQuestionAnswering", "DistilBertForMaskedLM")):
        torch.manual_seed(500 + i)
        labels = {"num_labels": 2} if "QuestionAnswering" in cls else {
            "id2label": {0: "neg", 1: "neu", 2: "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
        directory = os.path.join(out_dir, "checkpoint_" + cls)
        getattr(transformers, cls)(transformers.DistilBertConfig(**SMALL, **labels)).save_pretrained(directory)
        model = DistilBertAdapterModel.from_pretrained(directory).eval()
        inputs = inputs_for("tagging", {"num_labels": 3}, torch.Generator().manual_seed(600 + i))
        del inputs["labels"]
        with torch.no_grad():
            out = model(**inputs)
        torch.save({"inputs": inputs, "outputs": {k: v for k, v in out.items() if torch.is_tensor(v)}},
                   os.path.join(directory, "io.pt"))
        result[cls] = {"heads": list(model.heads), "active_head": model.active_head,
                       "config": model.heads["default"].config}
    return result


# save_pretrained / from_pretrained of DistilBertAdapterModel with adapters and heads: the setups
# (a Stack, and the head to run) whose outputs both sides compare
PRETRAINED_SETUPS = [(["l", "a"], "a"), (["p", "l"], "l")]


def make_pretrained_model():
    model = make_model()
    model.add_adapter("a", config="double_seq_bn")
    model.add_adapter("l", config=LoRAConfig(r=2))
    model.add_adapter("p", config="par_bn")
    model.add_classification_head("a", num_labels=3, id2label={0: "x", 1: "y", 2: "z"})
    model.add_masked_lm_head("l")
    return model


def run_pretrained(model, inputs):
    """{"<adapters>|<head>": logits} for PRETRAINED_SETUPS."""
    result = {}
    model.eval()
    with torch.no_grad():
        for setup, head in PRETRAINED_SETUPS:
            with AdapterSetup(Stack(*setup)):
                result[f"{','.join(setup)}|{head}"] = model(**inputs, head=head).logits
    return result


def produce_pretrained(out_dir):
    """OUT/pretrained/: a heads model with adapters and heads, written by save_pretrained, and
    io.pt (inputs, outputs of PRETRAINED_SETUPS)."""
    torch.manual_seed(700)
    model = make_pretrained_model()
    randomise_adapters_and_heads(model, torch.Generator().manual_seed(701))
    directory = os.path.join(out_dir, "pretrained")
    model.save_pretrained(directory)
    inputs = inputs_for("tagging", {"num_labels": 3}, torch.Generator().manual_seed(702))
    del inputs["labels"]
    torch.save({"inputs": inputs, "outputs": run_pretrained(model, inputs)}, os.path.join(directory, "io.pt"))
    return [[setup, head] for setup, head in PRETRAINED_SETUPS]


def produce_head_selection(out_dir):
    """OUT/head_selection/: the heads model of runs.HEAD_SELECTION (save_pretrained) and io.pt
    (inputs, and what each scenario gives)."""
    torch.manual_seed(800)
    model = make_model()
    for name in "abc":
        model.add_adapter(name, config=SeqBnConfig(reduction_factor=4))
    model.add_classification_head("a", num_labels=2)
    model.add_classification_head("b", num_labels=3)
    model.add_tagging_head("t", num_labels=4)
    randomise_adapters_and_heads(model, torch.Generator().manual_seed(801))
    directory = os.path.join(out_dir, "head_selection")
    model.save_pretrained(directory)
    generator = torch.Generator().manual_seed(802)
    inputs = {"input_ids": torch.randint(1, SMALL["vocab_size"], (2, SEQ), generator=generator)}
    torch.save({"inputs": inputs, "outputs": run_head_selection(model, AdapterSetup, inputs)},
               os.path.join(directory, "io.pt"))


def produce_averages(out_dir):
    """OUT/average/: adapters x, y, lx, ly (save_adapter) and each runs.AVERAGES result, saved."""
    torch.manual_seed(900)
    model = make_model()
    model.add_adapter("x", config=SeqBnConfig(reduction_factor=4, scaling="learned", ln_after=True))
    model.add_adapter("y", config=SeqBnConfig(reduction_factor=4, scaling="learned", ln_after=True, dropout=0.1))
    model.add_adapter("lx", config=LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"]))
    model.add_adapter("ly", config=LoRAConfig(r=4, alpha=8, attn_matrices=["q", "v"], init_weights="bert"))
    randomise_adapters_and_heads(model, torch.Generator().manual_seed(901))
    directory = os.path.join(out_dir, "average")
    os.makedirs(directory)
    for name in ("x", "y", "lx", "ly"):
        model.save_adapter(os.path.join(directory, name), name)
    for name, inputs, kwargs in AVERAGES:
        model.average_adapter(name, inputs, **kwargs)
        model.save_adapter(os.path.join(directory, name), name)


# save_adapter_setup / load_adapter_setup: a Fuse inside a Stack, saved with two heads (each on the
# whole batch: a MultiHeadOutput)
SAVED_SETUP, SAVED_HEADS = Stack("s", Fuse("a", "b")), ["c", "t"]


def make_setup_model():
    model = make_model()
    model.add_adapter("s", config=SeqBnConfig(reduction_factor=4))
    model.add_adapter("a", config=DoubleSeqBnConfig(reduction_factor=4))
    model.add_adapter("b", config=DoubleSeqBnConfig(reduction_factor=2, non_linearity="gelu"))
    model.add_adapter_fusion(["a", "b"])
    model.add_classification_head("c", num_labels=3)
    model.add_tagging_head("t", num_labels=2)
    return model


def run_saved_setup(model, inputs):
    """The active setup and heads (as load_adapter_setup(set_active=True) leaves them): {"head<i>": logits}."""
    model.eval()
    with torch.no_grad():
        return {f"head{i}": out.logits for i, out in enumerate(model(**inputs).head_outputs)}


def produce_adapter_setup(out_dir):
    """OUT/adapter_setup/: model.pt (the base weights), the setup (save_adapter_setup) and io.pt."""
    torch.manual_seed(1200)
    model = make_setup_model()
    randomise_adapters_and_heads(model, torch.Generator().manual_seed(1201))
    directory = os.path.join(out_dir, "adapter_setup")
    model.save_adapter_setup(os.path.join(directory, "setup"), SAVED_SETUP, head_setup=SAVED_HEADS)
    torch.save({k: v for k, v in model.state_dict().items() if is_base_key(k)}, os.path.join(directory, "model.pt"))
    model.set_active_adapters(SAVED_SETUP)
    model.active_head = SAVED_HEADS
    inputs = inputs_for("tagging", {"num_labels": 2}, torch.Generator().manual_seed(1202))
    del inputs["labels"]
    torch.save({"inputs": inputs, "outputs": run_saved_setup(model, inputs)}, os.path.join(directory, "io.pt"))


def check_adapter_setup(root):
    """ROOT/adapter_setup/ saved by distilbert_fast: load it and write oracle_out.pt."""
    directory = os.path.join(root, "adapter_setup")
    model = make_model()
    missing, unexpected = model.load_state_dict(torch.load(os.path.join(directory, "model.pt")), strict=False)
    if unexpected or any(is_base_key(k) for k in missing):
        raise SystemExit(f"adapter_setup: base weights do not fit: missing {missing}, unexpected {unexpected}")
    setup, heads = model.load_adapter_setup(os.path.join(directory, "setup"), set_active=True)
    assert (setup, heads) == (SAVED_SETUP, SAVED_HEADS), (setup, heads)
    inputs = torch.load(os.path.join(directory, "io.pt"))["inputs"]
    torch.save(run_saved_setup(model, inputs), os.path.join(directory, "oracle_out.pt"))


# AdapterFusion on the heads model (a classification head "h", labels): adapters to fuse, the
# fusion config (a preset or AdapterFusionConfig's fields)
FUSION_CASES = {
    "fuse_dynamic": dict(adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=2),
                                   "c": SeqBnConfig(reduction_factor=4, non_linearity="gelu")},
                         config="dynamic"),
    "fuse_static_houlsby_query_before_ln_residual_before": dict(
        adapters={"a": DoubleSeqBnConfig(reduction_factor=4), "b": DoubleSeqBnConfig(reduction_factor=2)},
        config=dict(key=True, query=True, value=False, query_before_ln=True, regularization=False,
                    residual_before=True, temperature=False, value_before_softmax=True, value_initialized=False,
                    dropout_prob=None)),
    "fuse_value_after_softmax_temperature": dict(
        adapters={"a": SeqBnConfig(reduction_factor=4), "b": SeqBnConfig(reduction_factor=4, scaling="learned")},
        config=dict(key=False, query=True, value=True, query_before_ln=False, regularization=True,
                    residual_before=False, temperature=True, value_before_softmax=False, value_initialized=True,
                    dropout_prob=None)),
}


def make_fusion_model(spec):
    model = make_model()
    for name, config in spec["adapters"].items():
        model.add_adapter(name, config=config)
    model.add_adapter_fusion(Fuse(*spec["adapters"]), config=spec["config"])
    model.add_classification_head("h", num_labels=3)
    return model


def run_fusion(model, spec, inputs):
    """Outputs and gradients, then (a second forward) each fusion layer's attention over the
    adapters, by forward(output_adapter_fusion_attentions=True)."""
    prepare(model)
    model.set_active_adapters(Fuse(*spec["adapters"]))
    result = outputs_and_grads(model, model(**inputs, head="h"))
    with torch.no_grad():
        out = model(**inputs, head="h", output_adapter_fusion_attentions=True)
    return {**result, **fusion_attentions(out.adapter_fusion_attentions)}


def produce_fusions(out_dir):
    """OUT/<fusion case>/: model.pt (every weight but the adapters', the fusion's and the head's),
    each adapter (save_adapter) and the fusion with the head (save_adapter_fusion(with_head="h")),
    io.pt (inputs, outputs, grads)."""
    manifest = {}
    for i, (case, spec) in enumerate(FUSION_CASES.items()):
        torch.manual_seed(1000 + i)
        generator = torch.Generator().manual_seed(1100 + i)
        model = make_fusion_model(spec)
        randomise_adapters_and_heads(model, generator)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "adapter_fusion_layer" in name:
                    param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        inputs = inputs_for("classification", {"num_labels": 3}, generator)
        case_dir = os.path.join(out_dir, case)
        os.makedirs(case_dir)
        torch.save({k: v for k, v in model.state_dict().items() if not is_adapter_key(k)
                    and not k.startswith("heads.") and "prompt_tuning." not in k},
                   os.path.join(case_dir, "model.pt"))
        torch.save({"inputs": inputs, "outputs": run_fusion(model, spec, inputs)}, os.path.join(case_dir, "io.pt"))
        for name in spec["adapters"]:
            model.save_adapter(os.path.join(case_dir, "adapter_" + name), name, with_head=False)
        # the head "h" travels with the fusion (with_head)
        model.save_adapter_fusion(os.path.join(case_dir, "fusion"), Fuse(*spec["adapters"]), with_head="h")
        manifest[case] = {"adapters": list(spec["adapters"])}
    return manifest


def check_fusions(root, manifest):
    """For each fusion case saved by distilbert_fast under ROOT: load it and write oracle_out.pt."""
    for case, spec in manifest.items():
        case_dir = os.path.join(root, case)
        model = make_model()
        missing, unexpected = model.load_state_dict(torch.load(os.path.join(case_dir, "model.pt")), strict=False)
        fused = [k for k in missing if "adapter_fusion_layer" in k or is_adapter_key(k) or "prompt_tuning." in k]
        if unexpected or len(fused) != len(missing):
            raise SystemExit(f"{case}: weights do not fit: missing {missing}, unexpected {unexpected}")
        for name in spec["adapters"]:
            model.load_adapter(os.path.join(case_dir, "adapter_" + name), with_head=False)
        model.load_adapter_fusion(os.path.join(case_dir, "fusion"))  # with its head "h"
        io = torch.load(os.path.join(case_dir, "io.pt"))
        torch.save(run_fusion(model, {"adapters": {n: None for n in spec["adapters"]}}, io["inputs"]),
                   os.path.join(case_dir, "oracle_out.pt"))


def check_tasks(root, manifest):
    for case, spec in manifest.items():
        case_dir = os.path.join(root, case)
        model = make_task_model(spec["cls"], spec["config"])
        # the base weights first: the heads (flexible, or the task class's own) come with the
        # adapters (saved by us)
        weights = torch.load(os.path.join(case_dir, "model.pt"))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        is_head_key = lambda k: spec["cls"] != "DistilBertModel" and not k.startswith("distilbert.")  # noqa: E731
        if unexpected or any(not (is_adapter_key(k) or is_head_key(k)) and "prompt_tuning." not in k for k in missing):
            raise SystemExit(f"{case}: weights do not fit: missing {missing}, unexpected {unexpected}")
        for name in spec["adapters"]:
            model.load_adapter(os.path.join(case_dir, "adapter_" + name), with_head=True)
        for fused in spec.get("fusions", ()):
            model.load_adapter_fusion(os.path.join(case_dir, "fusion_" + ",".join(fused)))
        io = torch.load(os.path.join(case_dir, "io.pt"))
        setup = Stack.from_dict(spec["setup"])
        result = run_task(model, spec, setup, io["inputs"])
        torch.save(result, os.path.join(case_dir, "oracle_out.pt"))


def make_model():
    config = transformers.DistilBertConfig(**SMALL)
    config._attn_implementation = "eager"
    return DistilBertAdapterModel(config)


def add_head(model, head):
    kind, name, kwargs = head
    if kind == "classification":
        model.add_classification_head(name, **kwargs)
    elif kind == "multilabel":
        model.add_classification_head(name, multilabel=True, **kwargs)
    elif kind == "tagging":
        model.add_tagging_head(name, **kwargs)
    elif kind == "qa":
        model.add_qa_head(name, **kwargs)
    elif kind == "multiple_choice":
        model.add_multiple_choice_head(name, **kwargs)
    elif kind == "masked_lm":
        model.add_masked_lm_head(name, **kwargs)
    else:
        raise ValueError(kind)


def is_adapter_key(key):
    """An adapter's or a fusion layer's weight (they travel in their own files)."""
    return ".adapters." in key or ".loras." in key or ".adapter_fusion_layer." in key


def is_base_key(key):
    """A base-model weight (prompt_tuning.base_model_embeddings aliases the word embeddings)."""
    return key.startswith("distilbert.") and not is_adapter_key(key) and ".prompt_tuning." not in key


@torch.no_grad()
def randomise_adapters_and_heads(model, generator):
    """Adapter and head weights far from their (often zero) init, so each one shows."""
    for name, param in model.named_parameters():
        if is_adapter_key(name) or name.startswith("heads."):
            noise = torch.randn(param.shape, generator=generator) * 0.2
            if ".adapter_fusion_layer." in name:  # around its init (the value projection: the identity)
                noise = param + noise * 0.5
            if "norm" in name and name.endswith("weight") or name.endswith("scaling"):
                noise = noise + 1.0
            param.copy_(noise)


def inputs_for(kind, head_kwargs, generator, vocab_size=SMALL["vocab_size"]):
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    mask[0, 5:] = 0  # padding
    mask[2, 3:] = 0
    ids = torch.randint(1, vocab_size, (BATCH, SEQ), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "classification":
        n = head_kwargs["num_labels"]
        inputs["labels"] = (torch.randn(BATCH, generator=generator) if n == 1
                            else torch.randint(0, n, (BATCH,), generator=generator))
    elif kind == "multilabel":
        inputs["labels"] = torch.randint(0, 2, (BATCH, head_kwargs["num_labels"]), generator=generator).float()
    elif kind == "tagging":
        inputs["labels"] = torch.randint(0, head_kwargs["num_labels"], (BATCH, SEQ), generator=generator)
    elif kind == "qa":
        inputs["start_positions"] = torch.tensor([1, 4, 9])  # 9: outside, ignored
        inputs["end_positions"] = torch.tensor([2, 6, 0])
    elif kind == "multiple_choice":
        choices = head_kwargs["num_choices"]
        inputs["input_ids"] = torch.randint(1, vocab_size, (BATCH, choices, SEQ), generator=generator)
        inputs["attention_mask"] = mask[:, None, :].expand(BATCH, choices, SEQ).contiguous()
        inputs["labels"] = torch.randint(0, choices, (BATCH,), generator=generator)
    elif kind == "masked_lm":
        labels = torch.randint(0, vocab_size, (BATCH, SEQ), generator=generator)
        labels[:, ::2] = -100
        inputs["labels"] = labels
    return inputs


def run(model, setup, head_name, inputs):
    """Eval-mode forward and backward with every parameter trainable: outputs and gradients."""
    prepare(model)
    with AdapterSetup(Stack(*setup)):
        out = model(**inputs, head=head_name)
    return outputs_and_grads(model, out)


def produce(out_dir, real_json=None):
    manifest = {}
    for i, (case, spec) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        generator = torch.Generator().manual_seed(200 + i)
        model = make_model()
        for name, config in spec["adapters"].items():
            model.add_adapter(name, config=config)
        add_head(model, spec["head"])
        randomise_adapters_and_heads(model, generator)
        kind, head_name, head_kwargs = spec["head"]
        inputs = inputs_for(kind, head_kwargs, generator)
        case_dir = os.path.join(out_dir, case)
        os.makedirs(case_dir)
        base = {k: v for k, v in model.state_dict().items() if is_base_key(k)}
        torch.save(base, os.path.join(case_dir, "base.pt"))
        result = run(model, spec["setup"], head_name, inputs)
        torch.save({"inputs": inputs, "outputs": result}, os.path.join(case_dir, "io.pt"))
        for name in spec["adapters"]:
            model.save_adapter(os.path.join(case_dir, "adapter_" + name), name, with_head=True)
        manifest[case] = {"adapters": list(spec["adapters"]), "setup": spec["setup"], "head": head_name,
                          "head_type": kind}
    real = None
    if real_json:
        with open(real_json) as f:
            real = json.load(f)
    task_manifest = produce_tasks(out_dir, real)
    produce_head_selection(out_dir)
    produce_averages(out_dir)
    produce_adapter_setup(out_dir)
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump({"cases": manifest, "task_cases": task_manifest, "train_adapter": trainable_after_train_adapter(),
                   "api_arguments": api_arguments(), "task_checkpoints": task_checkpoints_as_heads_model(out_dir),
                   "pretrained": produce_pretrained(out_dir), "fusion_cases": produce_fusions(out_dir),
                   "adapters_version": adapters.__version__,
                   "transformers_version": transformers.__version__, "torch_version": torch.__version__}, f,
                  indent=2)


def check(root):
    with open(os.path.join(root, "manifest.json")) as f:
        full = json.load(f)
    manifest = full["cases"]
    check_tasks(root, full.get("task_cases", {}))
    check_fusions(root, full.get("fusion_cases", {}))
    if os.path.isdir(os.path.join(root, "adapter_setup")):
        check_adapter_setup(root)
    directory = os.path.join(root, "pretrained")  # saved by our save_pretrained
    if os.path.isdir(directory):
        model = DistilBertAdapterModel.from_pretrained(directory)
        inputs = torch.load(os.path.join(directory, "io.pt"))["inputs"]
        torch.save(run_pretrained(model, inputs), os.path.join(directory, "oracle_out.pt"))
    for case, spec in manifest.items():
        case_dir = os.path.join(root, case)
        model = make_model()
        missing, unexpected = model.load_state_dict(torch.load(os.path.join(case_dir, "base.pt")), strict=False)
        if unexpected or any(is_base_key(k) for k in missing):
            raise SystemExit(f"{case}: base weights do not fit: missing {missing}, unexpected {unexpected}")
        for name in spec["adapters"]:
            model.load_adapter(os.path.join(case_dir, "adapter_" + name), with_head=True)
        io = torch.load(os.path.join(case_dir, "io.pt"))
        result = run(model, spec["setup"], spec["head"], io["inputs"])
        torch.save(result, os.path.join(case_dir, "oracle_out.pt"))


if __name__ == "__main__":
    mode, path, extra = sys.argv[1], sys.argv[2], sys.argv[3:]
    {"produce": produce, "check": check}[mode](path, *extra)
