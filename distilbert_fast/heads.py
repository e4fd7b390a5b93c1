"""Flexible prediction heads and ``DistilBertAdapterModel`` (alias ``DistilBertModelWithHeads``):
one DistilBERT base model with any number of named heads and adapters, as the AdapterHub
``adapters`` package builds them.

A head is an nn.Sequential with the package's layout and parameter names
(``heads.<name>.<index>.weight``): per layer a Dropout, then a Linear (+ activation) to the
hidden size, and the last layer's Linear to the labels. Head files (head_config.json +
pytorch_model_head.bin) use the package's format, so heads move between the two libraries.
"""

import contextvars
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import (
    HEAD_CONFIG_NAME,
    HEAD_SAFE_WEIGHTS_NAME,
    HEAD_WEIGHTS_NAME,
    Activation,
    BatchSplit,
    Parallel,
    call_head_setup,
    parallel_channels_of,
    _load_tensors,
    _read_json,
    _save_tensors,
    _write_json,
    logger,
    run_sequential,
)
from .configuration import DistilBertConfig
from .modeling import (LAYER_NORM_EPS, DistilBertModel, DistilBertPreTrainedModel, _check_no_empty_labelled_sequence,
                       _check_packed_labels, _encode, _finish, first_tokens, packed_span_loss, span_loss)
from .outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)


def _label2id(id2label):
    return None if id2label is None else {label: int(i) for i, label in id2label.items()}


class PredictionHead(nn.Sequential):
    """A named head; ``config`` holds what head_config.json records (the package's keys)."""

    head_type = None

    def __init__(self, name: str, config: dict):
        super().__init__()
        self.name = name
        self.config = {"head_type": self.head_type, **config}

    def build(self, model, out_features: int | None):
        """Per layer: Dropout, then Linear(dim, dim) + activation, except the last layer's Linear,
        which maps to ``out_features`` (to dim + activation when None)."""
        config, dim = self.config, model.config.dim
        dropout = config.get("dropout_prob")
        if dropout is None:  # the package's fallbacks; DistilBERT's config has neither
            dropout = getattr(model.config, "classifier_dropout", None) or getattr(
                model.config, "hidden_dropout_prob", None) or 0.0
        layers = config["layers"]
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        modules = []
        for i in range(layers):
            modules.append(nn.Dropout(dropout))
            last = i == layers - 1
            if last and out_features is not None:
                modules.append(nn.Linear(dim, out_features, bias=config.get("bias", True)))
            else:
                modules.append(nn.Linear(dim, dim))
                if config["activation_function"]:
                    modules.append(Activation(config["activation_function"]))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)
        self.apply(model._init_weights)
        self.train(model.training)

    def get_output_embeddings(self):
        return None

    def run(self, x, backend):
        return run_sequential(self, x, backend)


class ClassificationHead(PredictionHead):
    head_type = "classification"

    def __init__(self, model, name, num_labels=2, layers=2, activation_function="tanh", id2label=None,
                 use_pooler=False, bias=True, dropout_prob=None):
        if use_pooler:
            raise ValueError("use_pooler=True: DistilBERT has no pooler")
        super().__init__(name, {
            "num_labels": num_labels, "layers": layers, "activation_function": activation_function,
            "label2id": _label2id(id2label), "use_pooler": use_pooler, "bias": bias,
            "dropout_prob": dropout_prob,
        })
        _check_count("num_labels", num_labels)
        self.build(model, num_labels)

    def forward(self, out, attention_mask=None, labels=None, backend=None, cu_seqlens=None, max_seqlen=None):
        logits = self.run(first_tokens(out.last_hidden_state, cu_seqlens), backend)  # (batch, num_labels)
        loss = None
        if labels is not None:
            if self.config["num_labels"] == 1:
                loss = F.mse_loss(logits.view(-1), labels.view(-1))
            else:
                loss = F.cross_entropy(logits.view(-1, self.config["num_labels"]), labels.view(-1))
        return SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)


class MultiLabelClassificationHead(ClassificationHead):
    head_type = "multilabel_classification"

    def forward(self, out, attention_mask=None, labels=None, backend=None, cu_seqlens=None, max_seqlen=None):
        logits = self.run(first_tokens(out.last_hidden_state, cu_seqlens), backend)
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits, labels.float())
        return SequenceClassifierOutput(loss, logits, out.hidden_states, out.attentions)


class MultipleChoiceHead(PredictionHead):
    head_type = "multiple_choice"

    def __init__(self, model, name, num_choices=2, layers=2, activation_function="tanh", id2label=None,
                 use_pooler=False, dropout_prob=None):
        if use_pooler:
            raise ValueError("use_pooler=True: DistilBERT has no pooler")
        super().__init__(name, {
            "num_choices": num_choices, "layers": layers, "activation_function": activation_function,
            "label2id": _label2id(id2label), "use_pooler": use_pooler, "dropout_prob": dropout_prob,
        })
        _check_count("num_choices", num_choices)
        self.build(model, 1)

    def forward(self, out, attention_mask=None, labels=None, backend=None):
        logits = self.run(out.last_hidden_state[:, 0], backend).view(-1, self.config["num_choices"])
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return MultipleChoiceModelOutput(loss, logits, out.hidden_states, out.attentions)


class TaggingHead(PredictionHead):
    head_type = "tagging"

    def __init__(self, model, name, num_labels=2, layers=1, activation_function="tanh", id2label=None,
                 dropout_prob=None):
        super().__init__(name, {
            "num_labels": num_labels, "layers": layers, "activation_function": activation_function,
            "label2id": _label2id(id2label), "dropout_prob": dropout_prob,
        })
        _check_count("num_labels", num_labels)
        self.build(model, num_labels)

    def forward(self, out, attention_mask=None, labels=None, backend=None, cu_seqlens=None, max_seqlen=None):
        logits = self.run(out.last_hidden_state, backend)  # (batch, seq, num_labels), or packed (total, ...)
        loss = None
        if labels is not None:
            flat = labels.view(-1)
            if attention_mask is not None:  # padding positions do not count
                flat = torch.where(attention_mask.view(-1) == 1, flat, torch.full_like(flat, -100))
            loss = F.cross_entropy(logits.view(-1, self.config["num_labels"]), flat)
        return TokenClassifierOutput(loss, logits, out.hidden_states, out.attentions)


class QuestionAnsweringHead(PredictionHead):
    head_type = "question_answering"

    def __init__(self, model, name, num_labels=2, layers=1, activation_function="tanh", id2label=None,
                 dropout_prob=None):
        super().__init__(name, {
            "num_labels": num_labels, "layers": layers, "activation_function": activation_function,
            "label2id": _label2id(id2label), "dropout_prob": dropout_prob,
        })
        if num_labels != 2:
            raise ValueError(f"num_labels must be 2 for a question answering head, got {num_labels}")
        self.build(model, num_labels)

    def forward(self, out, attention_mask=None, start_positions=None, end_positions=None, backend=None,
                cu_seqlens=None, max_seqlen=None):
        """On packed input (cu_seqlens), positions count from each sequence's first token."""
        logits = self.run(out.last_hidden_state, backend)  # (batch, seq, 2), or packed (total, 2)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        if cu_seqlens is None:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        else:
            loss = packed_span_loss(start_logits, end_logits, start_positions, end_positions, cu_seqlens, max_seqlen)
        return QuestionAnsweringModelOutput(loss, start_logits, end_logits, out.hidden_states, out.attentions)


class MaskedLMHead(PredictionHead):
    """The package's BertStyleMaskedLMHead: (Linear + activation + LayerNorm) per extra layer,
    then the vocabulary projection, whose weight is tied to the word embeddings."""

    head_type = "masked_lm"

    def __init__(self, model, name, vocab_size=None, embedding_size=None, layers=2, activation_function="gelu",
                 layer_norm=True, bias=True, shift_labels=False):
        dim = model.config.dim
        super().__init__(name, {
            "vocab_size": vocab_size or model.config.vocab_size, "embedding_size": embedding_size or dim,
            "layers": layers, "activation_function": activation_function, "layer_norm": layer_norm,
            "bias": bias, "shift_labels": shift_labels, "label2id": None,
        })
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        if shift_labels:
            raise ValueError("shift_labels=True is for causal LM heads, not masked LM")
        emb = self.config["embedding_size"]
        modules = []
        for i in range(layers - 1):
            modules.append(nn.Linear(dim if i == 0 else emb, emb))
            if activation_function:
                modules.append(Activation(activation_function))
            if layer_norm:
                modules.append(nn.LayerNorm(emb, eps=getattr(model.config, "layer_norm_eps", LAYER_NORM_EPS)))
        modules.append(nn.Linear(emb, self.config["vocab_size"], bias=bias))
        for i, module in enumerate(modules):
            self.add_module(str(i), module)
        self.apply(model._init_weights)
        self.train(model.training)

    def get_output_embeddings(self):
        return self[len(self) - 1]

    def forward(self, out, attention_mask=None, labels=None, backend=None, cu_seqlens=None, max_seqlen=None):
        logits = self.run(out.last_hidden_state, backend)  # (batch, seq, vocab), or packed (total, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, self.config["vocab_size"]), labels.reshape(-1))
        return MaskedLMOutput(loss, logits, out.hidden_states, out.attentions)


HEAD_TYPES = {
    cls.head_type: cls
    for cls in (ClassificationHead, MultiLabelClassificationHead, MultipleChoiceHead, TaggingHead,
                QuestionAnsweringHead, MaskedLMHead)
}

# The keyword arguments each head's forward takes from the model's forward.
_HEAD_INPUTS = {"labels", "start_positions", "end_positions"}


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class MultiHeadOutput(ModelOutput):
    """The outputs of several active heads, in order; ``loss`` is their sum when all have one.
    ``out[i]`` is head i's output, ``out["loss"]`` the summed loss."""

    head_outputs: list | None = None
    loss: torch.Tensor | None = None

    def __getitem__(self, key):
        return self.head_outputs[key] if isinstance(key, int) else super().__getitem__(key)

    def __len__(self):
        return len(self.head_outputs)

    def __iter__(self):
        return iter(self.head_outputs)


class DistilBertAdapterModel(DistilBertPreTrainedModel):
    """DistilBERT with named flexible heads and adapters (``DistilBertModelWithHeads``).

        model = DistilBertAdapterModel.from_pretrained("path/to/distilbert")
        model.add_adapter("sst", config="seq_bn")
        model.add_classification_head("sst", num_labels=2)
        model.train_adapter("sst")          # base frozen; adapter "sst" and head "sst" train
        out = model(input_ids, labels=labels)
        model(input_ids, adapter_names=Parallel("sst", "nli"))   # one head per adapter: a MultiHeadOutput
    """

    _parallel_labels_ok = True  # each copy of the batch goes to its own head with the labels

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.distilbert = DistilBertModel(self.config)
        self.heads = nn.ModuleDict()
        self._active_heads: list[str] = []
        self.post_init()
        # A config written by save_pretrained lists the heads and adapters to rebuild.
        for name, head_config in dict(getattr(config, "prediction_heads", None) or {}).items():
            self._add_head_from_config(name, dict(head_config), overwrite_ok=True)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        if _LOADING_CHECKPOINT.get() and not self.heads and architecture in _TASK_CLASS_HEADS:
            self._add_task_class_head(architecture)
        self._adapters_from_config()

    @classmethod
    @functools.wraps(DistilBertPreTrainedModel.from_pretrained.__func__)  # its signature and doc
    def from_pretrained(cls, directory, **kwargs):
        token = _LOADING_CHECKPOINT.set(True)  # (a task class's head converts in from_pretrained only)
        try:
            return super().from_pretrained(directory, **kwargs)
        finally:
            _LOADING_CHECKPOINT.reset(token)

    def _add_task_class_head(self, architecture: str):
        """from_pretrained of a task class's checkpoint (config.json's architectures, e.g. a
        fine-tuned DistilBertForSequenceClassification): its head becomes head "default", and the
        checkpoint's head weights load into it (renamed on load), as the package converts a
        static head in from_pretrained."""
        head_config, modules = _TASK_CLASS_HEADS[architecture]
        head_config = dict(head_config)
        if head_config["head_type"] != "masked_lm":
            head_config["label2id"] = dict(self.config.label2id)
            head_config["num_labels"] = len(self.config.label2id)
        self._add_head_from_config("default", head_config)
        renames = {f"{module}.": f"heads.default.{index}." for module, index in modules.items()}

        def rename_task_head_keys(module, state_dict, prefix, *args):
            for key in [k for k in state_dict if k.startswith(prefix)]:
                for old, new in renames.items():
                    if key.startswith(prefix + old) and prefix + new + key[len(prefix + old):] not in state_dict:
                        state_dict[prefix + new + key[len(prefix + old):]] = state_dict.pop(key)

        self.register_load_state_dict_pre_hook(rename_task_head_keys)

    # -- heads ---------------------------------------------------------------------------------
    def _add_head(self, head: PredictionHead, overwrite_ok: bool, set_active: bool = True):
        if head.name in self.heads and not overwrite_ok:
            raise ValueError(
                f"a head named {head.name!r} already exists; pass overwrite_ok=True to replace it"
            )
        config = head.config
        if config.get("label2id", 0) is None:  # the package's default label map
            count = config.get("num_labels", config.get("num_choices"))
            if count is not None:
                config["label2id"] = {f"LABEL_{i}": i for i in range(count)}
        head.to(self.distilbert.embeddings.LayerNorm.weight.device)
        self.heads[head.name] = head
        self.tie_weights()
        if set_active:
            self.active_head = head.name

    def _add_head_from_config(self, name, config: dict, overwrite_ok=False, set_active=True):
        config = dict(config)
        head_type = config.pop("head_type", None)
        if head_type not in HEAD_TYPES:
            raise ValueError(f"head_type must be one of {sorted(HEAD_TYPES)}, got {head_type!r}")
        label2id = config.pop("label2id", None)
        if "id2label" not in config and label2id is not None and head_type != "masked_lm":
            config["id2label"] = {int(i): label for label, i in label2id.items()}
        self._add_head(HEAD_TYPES[head_type](self, name, **config), overwrite_ok, set_active)

    def add_classification_head(self, head_name, num_labels=2, layers=2, activation_function="tanh",
                                overwrite_ok=False, multilabel=False, id2label=None, use_pooler=False):
        cls = MultiLabelClassificationHead if multilabel else ClassificationHead
        self._add_head(cls(self, head_name, num_labels, layers, activation_function, id2label, use_pooler),
                       overwrite_ok)

    def add_multiple_choice_head(self, head_name, num_choices=2, layers=2, activation_function="tanh",
                                 overwrite_ok=False, id2label=None, use_pooler=False):
        self._add_head(MultipleChoiceHead(self, head_name, num_choices, layers, activation_function, id2label,
                                          use_pooler), overwrite_ok)

    def add_tagging_head(self, head_name, num_labels=2, layers=1, activation_function="tanh",
                         overwrite_ok=False, id2label=None):
        self._add_head(TaggingHead(self, head_name, num_labels, layers, activation_function, id2label),
                       overwrite_ok)

    def add_qa_head(self, head_name, num_labels=2, layers=1, activation_function="tanh", overwrite_ok=False,
                    id2label=None):
        self._add_head(QuestionAnsweringHead(self, head_name, num_labels, layers, activation_function, id2label),
                       overwrite_ok)

    def add_masked_lm_head(self, head_name, activation_function="gelu", layers=2, overwrite_ok=False):
        self._add_head(MaskedLMHead(self, head_name, layers=layers, activation_function=activation_function),
                       overwrite_ok)

    def _check_head_name(self, name, argument: str):
        if name not in self.heads:
            raise ValueError(f"{argument}: no head named {name!r}; this model has heads {sorted(self.heads)}")

    @property
    def active_head(self):
        """The head(s) a forward without ``head=`` uses: a name, a list of names, a BatchSplit
        of names (head i on rows of child i), or None."""
        if not self._active_heads:
            return None
        sizes = self.__dict__.get("_head_batch_sizes")
        if sizes is not None:
            return BatchSplit(*self._active_heads, batch_sizes=sizes)
        return self._active_heads[0] if len(self._active_heads) == 1 else list(self._active_heads)

    @active_head.setter
    def active_head(self, names):
        sizes = names.head_batch_sizes() if isinstance(names, BatchSplit) else None
        names = [] if names is None else [names] if isinstance(names, str) else list(names)
        for name in names:
            self._check_head_name(name, "active_head")
        self._active_heads = names
        self._head_batch_sizes = sizes  # (as the package's active_head BatchSplit)
        label2id = self.heads[names[0]].config.get("label2id") if len(names) == 1 else None
        if label2id:  # as the package: one active head's labels become the config's (pipelines read them)
            self.config.id2label = {int(i): label for label, i in label2id.items()}
            self.config.label2id = {label: int(i) for label, i in label2id.items()}

    def delete_head(self, head_name: str):
        """Removes head ``head_name``; an unknown name is skipped with a warning, as in the package."""
        if head_name not in self.heads:
            logger.warning("delete_head: no head named %r to delete; this model has heads %s",
                           head_name, sorted(self.heads))
            return
        del self.heads[head_name]
        if head_name in self._active_heads:
            self._head_batch_sizes = None
        self._active_heads = [name for name in self._active_heads if name != head_name]

    def set_active_adapters(self, adapter_setup, skip_layers=None):
        """As in the package: also activates the head named like the setup's last adapter."""
        super().set_active_adapters(adapter_setup, skip_layers)
        setup = self.active_adapters
        heads = [] if setup is None else setup.heads()  # one per child of a Parallel; none for a Fuse
        if heads and all(name in self.heads for name in heads):
            sizes = setup.head_batch_sizes()
            self.active_head = (BatchSplit(*heads, batch_sizes=sizes) if sizes is not None
                                else heads if setup.parallel_channels > 1 else heads[0])

    def _freeze_output_embeddings(self):
        """train_adapter's: the output embeddings of every active head (tied to the word
        embeddings) train only with ``train_embeddings``, as in the package."""
        for name in self._active_heads:
            output = self.heads[name].get_output_embeddings()
            if output is not None:
                for param in output.parameters():
                    param.requires_grad = False

    # -- tied output embeddings ----------------------------------------------------------------
    def get_output_embeddings(self):
        for name in self._active_heads:
            output = self.heads[name].get_output_embeddings()
            if output is not None:
                return output
        return None

    def tie_weights(self):
        if not self.config.tie_word_embeddings or not hasattr(self, "heads"):
            return
        embeddings = self.get_input_embeddings().weight
        for head in self.heads.values():
            output = head.get_output_embeddings()
            if output is None:
                continue
            output.weight = embeddings
            rows = embeddings.shape[0]
            if output.bias is not None and output.bias.shape[0] != rows:  # after a resize: zero-pad
                with torch.no_grad():
                    bias = torch.zeros(rows, dtype=output.bias.dtype, device=output.bias.device)
                    keep = min(rows, output.bias.shape[0])
                    bias[:keep] = output.bias[:keep]
                output.bias = nn.Parameter(bias, requires_grad=output.bias.requires_grad)
            output.out_features = rows
            head.config["vocab_size"] = rows

    @property
    def _tied_weights_keys(self):
        word = f"{self.base_model_prefix}.embeddings.word_embeddings.weight"
        keys = {}
        for name, head in getattr(self, "heads", {}).items():
            if head.get_output_embeddings() is not None:
                keys[f"heads.{name}.{len(head) - 1}.weight"] = word
        return keys

    # -- forward -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                output_attentions=None, output_hidden_states=None, return_dict=None, head=None,
                adapter_names=None, position_ids=None, cu_seqlens=None, max_seqlen=None, **head_inputs):
        """The base model, then head ``head`` (default: the active head(s); none: the base
        model's output). ``adapter_names`` (a name, a list = Stack, a Stack or a Parallel)
        replaces the active adapters for this call and, much as the package's ``AdapterSetup``,
        runs the head named like its last adapter where there is one (else the active heads;
        where AdapterSetup raises); a Parallel runs the head of each child's (last) adapter, head
        i on copy i of the batch, as ``set_active_adapters(Parallel(...))`` does in the package.
        Without either, an ``AdapterSetup`` block's head setup decides, as in the package, then
        the active heads. ``labels`` /
        ``start_positions`` / ``end_positions`` go to the head(s). Multiple-choice inputs
        (batch, num_choices, seq) are flattened first.

        Packed input, as DistilBertModel's packed entry point: ``input_ids`` (total,) (or
        ``inputs_embeds`` (total, dim)) with ``cu_seqlens`` and ``max_seqlen``, no attention_mask.
        Token-level heads then give packed outputs (total, ...) and take one label per token;
        sequence-level heads pool each sequence's first token and take one label per sequence;
        QA positions count from each sequence's first token. A multiple-choice head is refused
        there (the grouping of the choices would be lost)."""
        unknown = sorted(set(head_inputs) - _HEAD_INPUTS)
        if unknown:
            raise TypeError(f"forward() got unexpected keyword arguments {unknown}")
        return_dict = self.config.return_dict if return_dict is None else return_dict
        setup = None if adapter_names is None else self._parse_setup(adapter_names, "adapter_names")
        in_force = setup
        if setup is None and self._adapters_state.configs:  # (no context variable read without adapters)
            in_force = self._adapters_state.current_setup()
        channels = 1 if in_force is None else in_force.parallel_channels
        heads = self._used_heads(head, setup)
        head_rows = self._head_rows(head, setup, heads)
        if channels > 1 and heads and len(heads) != channels:
            raise ValueError(
                f"the Parallel adapter setup {in_force!r} has {channels} channels but {len(heads)} heads "
                f"are active ({heads}): pass head=None with a head named like each channel's last adapter"
            )
        packed = cu_seqlens is not None or max_seqlen is not None
        if packed and head_rows is not None:
            raise ValueError(f"cu_seqlens: the BatchSplit heads {heads} take rows of a padded batch, not packed input")
        if packed:
            for name in heads:
                if isinstance(self.heads[name], MultipleChoiceHead):
                    raise ValueError(f"cu_seqlens: head {name!r} is a multiple-choice head, which takes padded "
                                     "(batch, num_choices, seq) input, not packed input")
        else:
            flatten = lambda t, rank: t if t is None or t.dim() <= rank else t.reshape(-1, *t.shape[-rank + 1:])  # noqa: E731
            input_ids, attention_mask = flatten(input_ids, 2), flatten(attention_mask, 2)
            inputs_embeds, position_ids = flatten(inputs_embeds, 3), flatten(position_ids, 2)

        with self._adapters_state.calling(setup):
            # a padded batch packed inside where the heads allow it; the heads then see zeros at padding
            enc = _encode(self, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                          output_hidden_states, position_ids, cu_seqlens, max_seqlen,
                          exact=None if packed else self._exact_positions(heads, head_inputs))
            out = BaseModelOutput(enc.tokens_out(enc.hidden), enc.hidden_states, enc.attentions)
        if not heads:
            return out if return_dict else out.to_tuple()
        backend = self.config.backend
        rows = out.last_hidden_state.shape[0]
        channels = parallel_channels_of(rows, (input_ids if input_ids is not None else inputs_embeds).shape[0])
        packed_args = {}
        if packed:  # each head (each copy of a Parallel) sees the sequences of cu_seqlens
            packed_args = dict(cu_seqlens=cu_seqlens.to(out.last_hidden_state.device), max_seqlen=max_seqlen)
        if head_rows is not None and sum(head_rows) != rows:
            raise ValueError(f"The specified batch sizes {head_rows} do not match the actual batch size {rows}")
        outputs, batch_mask = [], attention_mask
        for i, name in enumerate(heads):
            head_input = out
            part = None
            if channels > 1:  # the package's Parallel: head i takes copy i of the batch
                part = slice(i * rows // channels, (i + 1) * rows // channels)
            elif head_rows is not None:  # the package's BatchSplit heads: head i takes child i's rows
                part = slice(sum(head_rows[:i]), sum(head_rows[:i + 1]))
            if part is not None:
                head_input = BaseModelOutput(out.last_hidden_state[part], out.hidden_states, out.attentions)
            labels = _inputs_for(self.heads[name], head_inputs)
            if head_rows is not None:
                labels = {k: v if v is None else v[part] for k, v in labels.items()}
                attention_mask = None if batch_mask is None else batch_mask[part]
            if packed:
                _check_packed_head_labels(self.heads[name], labels, cu_seqlens, input_ids, inputs_embeds,
                                          self.distilbert)
            output = self.heads[name](head_input, attention_mask, backend=backend, **labels, **packed_args)
            if enc.packing is not None and isinstance(self.heads[name], _TOKEN_HEADS):
                output = _zeros_at_padding(output, attention_mask)  # as the task classes' token outputs
            outputs.append(output)
        if len(outputs) == 1:
            return _finish(outputs[0], return_dict)
        losses = [o.loss for o in outputs]
        loss = sum(losses) if all(x is not None for x in losses) else None
        return MultiHeadOutput(outputs, loss)

    def _head_rows(self, head, setup, heads) -> list[int] | None:
        """The rows of each head where they come from a BatchSplit (the call's setup, or the
        active heads set from one): head i on child i's rows; else None."""
        if head is not None:
            return None
        if setup is not None:
            return setup.head_batch_sizes() if heads == setup.heads() else None
        sizes = self.__dict__.get("_head_batch_sizes")
        return sizes if sizes is not None and heads == self._active_heads else None

    def _used_heads(self, head, setup) -> list[str]:
        """The heads a forward runs: ``head``; else with ``adapter_names``, the head named like
        its last adapter (one per child of a Parallel) where there is one, else the active heads;
        else, as the package's _get_used_heads, where the model has heads, the innermost
        AdapterSetup block's head setup (a head that is not there is a ValueError, as there);
        else the active heads."""
        if head is not None:
            self._check_head_name(head, "head")
            return [head]
        if setup is not None:  # (the package's forward has no adapter_names: ours falls back)
            names = setup.heads()
            return names if names and all(name in self.heads for name in names) else list(self._active_heads)
        head_setup = call_head_setup() if self.heads else None
        if head_setup:
            names = [head_setup] if isinstance(head_setup, str) else list(head_setup)
            for name in names:
                self._check_head_name(name, "AdapterSetup's head_setup")
            return names
        return list(self._active_heads)

    def _exact_positions(self, heads, head_inputs):
        """Where the heads need HF's values at padding positions (see
        DistilBertModel.plan_packing's ``exact``): [CLS] for sequence-level heads, every position
        for a QA loss (it normalises over padding too), counted labels for a masked-LM loss."""
        first, labels = False, None
        for name in heads:
            head = self.heads[name]
            if isinstance(head, (ClassificationHead, MultipleChoiceHead)):
                first = True
            elif isinstance(head, QuestionAnsweringHead) and head_inputs.get("start_positions") is not None:
                return "all"
            elif isinstance(head, MaskedLMHead) and head_inputs.get("labels") is not None:
                labels = head_inputs["labels"] != -100
        if labels is None:
            return "first" if first else None
        if first:
            labels = labels.clone()
            labels[:, 0] = True
        return labels

    # -- head files ------------------------------------------------------------------------------
    def save_head(self, save_directory, head_name: str | None = None, use_safetensors: bool = False):
        """Writes head_config.json and pytorch_model_head.bin (model_head.safetensors with
        ``use_safetensors``) in the package's format."""
        if head_name is None:
            if len(self.heads) != 1:
                raise ValueError(f"head_name is needed: this model has heads {sorted(self.heads)}")
            head_name = next(iter(self.heads))
        self._check_head_name(head_name, "head_name")
        os.makedirs(save_directory, exist_ok=True)
        _write_json(os.path.join(save_directory, HEAD_CONFIG_NAME),
                    self._file_meta(head_name, dict(self.heads[head_name].config)))
        prefix = f"heads.{head_name}."
        tensors = {k: v for k, v in self.state_dict().items() if k.startswith(prefix)}
        _save_tensors(tensors, save_directory, HEAD_SAFE_WEIGHTS_NAME if use_safetensors else HEAD_WEIGHTS_NAME)

    def load_head(self, save_directory, load_as: str | None = None, id2label=None,
                  use_safetensors: bool | None = None) -> str:
        """Loads a head written by ``save_head`` here or in the package. Returns its name."""
        return self._load_head(save_directory, load_as, id2label, use_safetensors)

    def _load_head(self, save_directory, load_as=None, id2label=None, use_safetensors=None, set_active=True) -> str:
        directory = os.fspath(save_directory)
        meta = _read_json(os.path.join(directory, HEAD_CONFIG_NAME))
        model_class = meta.get("model_class", "")
        if model_class.replace("ModelWithHeads", "AdapterModel") != "DistilBertAdapterModel":
            raise ValueError(
                f"the head in {directory} belongs to a {model_class!r}, not a DistilBertAdapterModel"
            )
        saved = meta["name"]
        name = load_as or saved
        config = dict(meta["config"])
        if id2label is not None:
            config["label2id"] = _label2id(id2label)
        state_dict = _load_tensors(directory, HEAD_SAFE_WEIGHTS_NAME, HEAD_WEIGHTS_NAME, use_safetensors)
        old, new = f"heads.{saved}.", f"heads.{name}."
        state_dict = {new + k[len(old):]: v for k, v in state_dict.items() if k.startswith(old)}
        self._add_head_from_config(name, config, overwrite_ok=True, set_active=set_active)
        expected = {k for k in self.state_dict() if k.startswith(new)}
        tied = set(self._tied_weights_keys)
        missing = sorted(expected - set(state_dict) - tied)
        unexpected = sorted(set(state_dict) - expected)
        if missing or unexpected:
            self.delete_head(name)
            raise ValueError(
                f"the head weights in {directory} do not fit a {config.get('head_type')} head: "
                f"missing {missing}, unexpected {unexpected}"
            )
        params = dict(self.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for key, value in state_dict.items():
                if key in tied:  # the word embeddings themselves: left as the base model has them
                    continue
                if params[key].shape != value.shape:
                    self.delete_head(name)
                    raise ValueError(f"{key}: shape {tuple(value.shape)} in {directory}, "
                                     f"head has {tuple(params[key].shape)}")
                params[key].copy_(value)
        return name

    # -- the head of save_adapter / load_adapter -------------------------------------------------
    def _save_adapter_head(self, directory, adapter_name: str, use_safetensors: bool):
        if adapter_name in self.heads:
            self.save_head(directory, adapter_name, use_safetensors=use_safetensors)

    def _load_adapter_head(self, directory, name: str, use_safetensors: bool | None, id2label=None):
        """The head saved with the adapter, under the adapter's name; not activated (load_adapter's
        set_active activates it with the adapter), as in the package."""
        if self._head_of_this_class(directory, "load_adapter"):
            self._load_head(directory, name, id2label, use_safetensors, set_active=False)

    @staticmethod
    def _head_of_this_class(directory, caller: str) -> bool:
        """Whether the head in ``directory`` is a heads model's; one of another class (a task
        class's, saved with its adapter) is skipped with a warning, as in the package."""
        model_class = _read_json(os.path.join(directory, HEAD_CONFIG_NAME)).get("model_class") or ""
        if model_class.replace("ModelWithHeads", "AdapterModel") == "DistilBertAdapterModel":
            return True
        logger.warning("%s: the head in %s belongs to a %s, not a DistilBertAdapterModel; it is not loaded",
                       caller, directory, model_class)
        return False

    def _save_fusion_head(self, directory, head_name: str, use_safetensors: bool):
        """save_adapter_fusion's head (with_head): the head named like the fusion, or ``with_head``."""
        if head_name not in self.heads:
            raise ValueError(f"with_head: no head named {head_name!r} to save with the fusion; this model has heads "
                             f"{sorted(self.heads)}")
        self.save_head(directory, head_name, use_safetensors=use_safetensors)

    def _load_fusion_head(self, directory, load_as, use_safetensors, set_active):
        """load_adapter_fusion's head (with_head): named ``load_as`` or as saved; active only with
        set_active, as in the package."""
        if self._head_of_this_class(directory, "load_adapter_fusion"):
            self._load_head(directory, load_as=load_as, use_safetensors=use_safetensors, set_active=set_active)

    # -- checkpoints ---------------------------------------------------------------------------
    def save_pretrained(self, directory, **kwargs):
        """The whole model; config.json records the heads and adapters, which from_pretrained
        rebuilds."""
        self.config.prediction_heads = {name: dict(head.config) for name, head in self.heads.items()}
        self._adapters_to_config()
        super().save_pretrained(directory, **kwargs)


_TOKEN_HEADS = (TaggingHead, QuestionAnsweringHead, MaskedLMHead)

# Set while DistilBertAdapterModel.from_pretrained builds its model.
_LOADING_CHECKPOINT: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_loading_checkpoint",
                                                                     default=False)
# The package's STATIC_TO_FLEX_HEAD_MAP for DistilBERT: a task class's head as a flexible head
# (its config, and the index in that head of each of the task class's modules). Multiple choice
# is left out: the package sets num_choices to the number of labels, which its head then
# reshapes the logits by (wrong for any other count of choices).
_TASK_CLASS_HEADS = {
    "DistilBertForSequenceClassification": (
        {"head_type": "classification", "layers": 2, "activation_function": "relu"},
        {"pre_classifier": 1, "classifier": 4}),
    "DistilBertForTokenClassification": (
        {"head_type": "tagging", "layers": 1, "activation_function": None}, {"classifier": 1}),
    "DistilBertForQuestionAnswering": (
        {"head_type": "question_answering", "layers": 1, "activation_function": None}, {"qa_outputs": 1}),
    "DistilBertForMaskedLM": (
        {"head_type": "masked_lm", "layers": 2, "activation_function": "gelu", "layer_norm": True, "bias": True},
        {"vocab_transform": 0, "vocab_layer_norm": 2, "vocab_projector": 3}),
}


def _zeros_at_padding(output: ModelOutput, attention_mask: torch.Tensor) -> ModelOutput:
    """A token-level head's output with its (batch, seq, ...) logits zeroed where
    ``attention_mask`` is 0 (a batch that ran packed: those positions saw no input)."""
    keep = attention_mask != 0

    def zeroed(v):
        return torch.where(keep.view(*keep.shape, *([1] * (v.dim() - 2))), v, v.new_zeros(()))

    logits = {"logits", "start_logits", "end_logits"}
    return type(output)(**{k: zeroed(v) if k in logits and v is not None else v for k, v in output.items()})


def _check_packed_head_labels(head: PredictionHead, labels: dict, cu_seqlens, input_ids, inputs_embeds, base):
    """Packed input: a token-level head's labels hold one per token, a sequence-level head's one
    per sequence, and a classification label that counts is not an empty sequence's (nothing to
    pool); a ValueError naming them, as the task classes check theirs."""
    given = list(labels.items())
    if isinstance(head, (TaggingHead, MaskedLMHead)):
        _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, tokens=given)
        return
    _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, sequences=given)
    if isinstance(head, ClassificationHead) and labels.get("labels") is not None:
        single_label = type(head) is ClassificationHead and head.config["num_labels"] > 1
        counted = labels["labels"].reshape(-1) != -100 if single_label else None  # (cross-entropy's ignore_index)
        _check_no_empty_labelled_sequence(base, cu_seqlens, counted)


def _inputs_for(head: PredictionHead, inputs: dict) -> dict:
    """The keyword arguments of the model's forward that this head takes."""
    names = ("start_positions", "end_positions") if isinstance(head, QuestionAnsweringHead) else ("labels",)
    unused = sorted(k for k, v in inputs.items() if k not in names and v is not None)
    if unused:
        raise TypeError(f"head {head.name!r} ({head.head_type}) does not take {unused}")
    return {k: inputs[k] for k in names if k in inputs}


# The adapter-transformers name of the same class.
DistilBertModelWithHeads = DistilBertAdapterModel

__all__ = [
    "ClassificationHead",
    "DistilBertAdapterModel",
    "DistilBertModelWithHeads",
    "MaskedLMHead",
    "MultiHeadOutput",
    "MultiLabelClassificationHead",
    "MultipleChoiceHead",
    "PredictionHead",
    "QuestionAnsweringHead",
    "TaggingHead",
]
