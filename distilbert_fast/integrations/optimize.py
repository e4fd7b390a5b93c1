"""``optimize(model)``: run a live transformers DistilBERT or BERT model on distilbert_fast's ops,
in place.

The model keeps its object, class, modules and parameters: only the ``forward`` of the base model
(``DistilBertModel`` / ``BertModel``) and of its embeddings, encoder, layers and attentions are
replaced, by instance attributes, with distilbert_fast's own forward code (``modeling.py``) run
over the transformers module. That code reads its submodules through a ``_View``: an object
that answers the attribute names our module classes use (``q_lin``, ``sa_layer_norm``, ...) from
the transformers module, live, so a LoRA that PEFT puts in later, a hook or a moved parameter is
seen at once. Task heads, losses and the pooler keep transformers' code; a head's token labels
(MLM, token classification) are shown to its base model's call (``_HeadForward``), which runs
the padded computation when such labels count at padding positions, so the loss is
transformers' there too.

Because the forward that runs is ``modeling.DistilBertModel.forward`` (and ``Transformer`` /
``TransformerBlock`` / ``DistilBertSelfAttention`` / ``FFN`` / ``Embeddings``), whatever those
do (the packed path included) an optimised model does too. ``unoptimize(model)`` deletes the
instance attributes again.

Hooks: our forward fuses or skips modules (LayerNorms, dropouts, the FFN's parts) and runs the
rest on packed tokens, so a hook below the base model would fire on other tensors than
transformers gives it, or not at all. While any forward, forward-pre or backward hook is
registered on a module below the base model (or globally), each call runs transformers' own
forward instead, so every hook sees what it sees on the unoptimised model. The one exception is
the hook of ``enable_input_require_grads`` (PEFT and gradient checkpointing add it): it only
marks the embeddings' output as requiring grad, whatever its layout.
"""

import contextvars
import functools
import inspect
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import modeling
from ..ops.backends import AUTO, check_backend_name
from ..tracing import tracing

_MARK = "_distilbert_fast_optimized"  # on the base model: the modules whose forward we set
_AS_TRANSFORMERS = "_distilbert_fast_as_transformers"  # on the base model: its latest call runs transformers' forward
_MISSING = object()
# (base model, its head's labels) during a head's call: per thread and task, so concurrent calls
# of one model (a server's threads) do not see each other's labels
_TOKEN_LABELS = contextvars.ContextVar("distilbert_fast_token_labels", default=(None, None))
_IGNORE_INDEX = -100  # transformers' CrossEntropyLoss default: labels that do not count


class _Dynamic:
    """A _View value computed at each access (e.g. depends on module.training)."""

    def __init__(self, fn):
        self.fn = fn


class _View:
    """``module`` as one of our module classes (``cls``) sees itself.

    Attribute lookup, first hit wins: ``values`` (fixed or _Dynamic), ``names`` (our name -> a
    dotted path in the transformers module), methods and properties of ``cls`` (bound to the
    view, so ``self.<helper>()`` inside our forward works), then the module itself. Calling the
    view calls the module (its hooks fire)."""

    def __init__(self, module, cls, names=None, values=None):
        # (object.__setattr__ past ours, which writes to the module; not __dict__.update, which
        # torch 2.11's dynamo cannot trace in the view _bert_model_forward makes per call)
        for name, value in (("_module", module), ("_cls", cls), ("_names", names or {}),
                            ("_values", values or {}), ("_class_attrs", _class_attrs(cls))):
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("_module", "_cls", "_names", "_values", "_class_attrs"):
            raise AttributeError(name)
        values = self.__dict__["_values"]
        if name in values:
            value = values[name]
            return value.fn() if isinstance(value, _Dynamic) else value
        path = self.__dict__["_names"].get(name)
        if path is not None:
            return functools.reduce(getattr, path.split("."), self.__dict__["_module"])
        attr = self.__dict__["_class_attrs"].get(name, _MISSING)
        if attr is not _MISSING:
            if isinstance(attr, staticmethod):
                return attr.__func__
            # (functools.partial, not a bound method: torch.compile traces partials)
            if isinstance(attr, classmethod):
                return functools.partial(attr.__func__, self.__dict__["_cls"])
            if isinstance(attr, property):
                return attr.fget(self)
            if inspect.isfunction(attr):
                return functools.partial(attr, self)
            return attr
        return getattr(self.__dict__["_module"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_module"], name, value)

    # copy.deepcopy and pickle of an optimised model copy its views too: without the class's
    # attributes (classmethod objects do not pickle), looked up again on the way back
    def __getstate__(self):
        return {name: value for name, value in self.__dict__.items() if name != "_class_attrs"}

    def __setstate__(self, state):
        for name, value in state.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_class_attrs", _class_attrs(state["_cls"]))

    def __call__(self, *args, **kwargs):
        return self.__dict__["_module"](*args, **kwargs)


_CLASS_ATTRS = {}  # cls -> _class_attrs(cls)


def _class_attrs(cls) -> dict:
    """The attributes distilbert_fast's classes in ``cls``'s MRO define (not nn.Module's), the
    first definition winning: a plain dict, which torch.compile reads without the mappingproxy
    of vars(klass) (a graph break once any dict was mutated)."""
    attrs = _CLASS_ATTRS.get(cls)
    if attrs is None:
        attrs = {}
        for klass in reversed(cls.__mro__):
            if klass.__module__.startswith("distilbert_fast"):
                attrs.update(vars(klass))
        _CLASS_ATTRS[cls] = attrs
    return attrs


class _Config(_View):
    """The transformers config under our config's names, plus the chosen backend."""

    def __init__(self, config, backend, names=None):
        super().__init__(config, object, names, {"backend": backend})


class _InstanceForward:
    """A forward optimize() sets on ``self.module`` (an instance attribute), which reads as the
    module class's own forward to the tools that inspect it: its signature (Trainer keeps the
    dataset columns it names; torch.export binds inputs by it) and its ``__code__`` (torch.export's
    non-strict mode, which torch.onnx.export tries first, reads it)."""

    module: nn.Module

    @property
    def __signature__(self):
        return inspect.signature(type(self.module).forward.__get__(self.module))

    @property
    def __code__(self):
        return type(self.module).forward.__code__


class _Forward(_InstanceForward):
    """The forward optimize() gives ``module`` of the optimised ``base`` model: ``ours``, or the
    module class's own while the base model's call runs as transformers (a hook below it). The
    base model decides at each call and leaves the decision on itself, so the modules it calls,
    also when gradient checkpointing recomputes them in backward, follow it."""

    def __init__(self, module, ours, base):
        self.module, self.ours, self.base = module, ours, base

    def __call__(self, *args, **kwargs):
        module = self.module
        if module is self.base:
            module.__dict__[_AS_TRANSFORMERS] = modeling.has_hooks_below(module)
        if self.base.__dict__.get(_AS_TRANSFORMERS):
            return type(module).forward(module, *args, **kwargs)
        return self.ours(*args, **kwargs)


def _set_forward(base, module, fn, record):
    # an instance attribute: nn.Module.__call__ finds it before the class's
    module.forward = _Forward(module, fn, base)
    record.append(module)


class _HeadForward(_InstanceForward):
    """The forward optimize() gives a task head over an optimised base model: transformers' own,
    with the head's ``labels`` left on the base model for the call. Its loss reads the logits at
    every position whose label is not -100, padding included, where the packed path holds zeros:
    with such labels the base model runs the padded computation (our own heads' ``exact``)."""

    def __init__(self, head, base):
        self.module, self.base = head, base

    def __call__(self, *args, **kwargs):
        head = self.module
        if tracing():  # (a traced graph runs the padded computation: labels change nothing)
            return type(head).forward(head, *args, **kwargs)
        labels = kwargs.get("labels", _MISSING)
        if labels is _MISSING:
            index = _labels_index(type(head))
            labels = args[index] if index is not None and len(args) > index else None
        if not isinstance(labels, torch.Tensor):
            return type(head).forward(head, *args, **kwargs)
        token = _TOKEN_LABELS.set((self.base, labels))
        try:
            return type(head).forward(head, *args, **kwargs)
        finally:
            _TOKEN_LABELS.reset(token)


@functools.cache
def _labels_index(head_cls) -> int | None:
    """The position of ``labels`` among the head's forward arguments (after self), or None."""
    names = list(inspect.signature(head_cls.forward).parameters)[1:]
    return names.index("labels") if "labels" in names else None


def _set_head_forwards(model, base, record):
    """A _HeadForward on each module of ``model`` that calls ``base`` as its child and takes labels."""
    for head in model.modules():
        if any(child is base for child in head.children()) and _labels_index(type(head)) is not None:
            head.forward = _HeadForward(head, base)
            record.append(head)


def _with_token_labels(view, input_ids, inputs_embeds):
    """``view`` for one call of the base model: when its head's labels lie over the tokens (one
    per token of the (batch, seq) input), its packing plan keeps transformers' values wherever
    they count."""
    if tracing():
        return view  # (_HeadForward leaves no labels while tracing)
    base, labels = _TOKEN_LABELS.get()
    if base is not view._module:
        return view
    like = input_ids if input_ids is not None else inputs_embeds
    if labels is None or like is None or like.dim() < 2 or labels.numel() != like.shape[0] * like.shape[1]:
        return view
    exact = labels.to(like.device).reshape(like.shape[:2]) != _IGNORE_INDEX  # (flat labels too)
    plan = functools.partial(modeling.DistilBertModel.plan_packing, view, exact=exact)
    return _View(view._module, view._cls, view._names, {**view._values, "plan_packing": plan})


# -- DistilBERT ----------------------------------------------------------------------------------


def _optimize_distilbert(model, backend, record, pack):
    config = _Config(model.config, backend)
    emb = model.embeddings
    _set_forward(model, emb, functools.partial(modeling.Embeddings.forward, _View(emb, modeling.Embeddings, values={"config": config})), record)
    transformer = model.transformer
    _set_forward(model, transformer, functools.partial(modeling.Transformer.forward, _View(
        transformer, modeling.Transformer, values={"gradient_checkpointing": _checkpointing(transformer)})), record)
    activation = modeling.Activation(model.config.activation)  # (our FFN reads its name)
    for block in transformer.layer:
        attention = _View(block.attention, modeling.DistilBertSelfAttention, values={"config": config})
        _set_forward(model, block.attention, functools.partial(modeling.DistilBertSelfAttention.forward, attention), record)
        ffn = _View(block.ffn, modeling.FFN, values={"config": config, "activation": activation})
        _set_forward(model, block.ffn, functools.partial(modeling.FFN.forward, ffn), record)
        view = _View(block, modeling.TransformerBlock,
                     values={"config": config, "attention_adapters": None, "output_adapters": None})
        _set_forward(model, block, functools.partial(modeling.TransformerBlock.forward, view), record)
    base = _View(model, modeling.DistilBertModel, values={"config": config})
    _set_forward(model, model, functools.partial(_distilbert_model_forward, base, pack=pack,
                                                 masks_heads=_takes_head_mask(model)), record)


def _distilbert_model_forward(view, input_ids=None, attention_mask=None, inputs_embeds=None,
                              position_ids=None, head_mask=None, output_attentions=None,
                              output_hidden_states=None, return_dict=None, pack=True, masks_heads=True,
                              **kwargs):
    """transformers 5's DistilBertModel signature (other keywords, e.g. token_type_ids, are
    ignored as transformers 5 ignores them) over our DistilBertModel.forward. A flattened batch
    (DataCollatorWithFlattening's keywords, which transformers' heads pass down) runs on the packed
    entry point: each sequence attends within itself, as transformers computes it with flash
    attention (its sdpa and eager attention ignore those keywords and attend across the row); so
    does one given by its position ids alone (modeling.flattened_by_positions)."""
    flattened, view = _flattened_or_labelled(view, kwargs, input_ids, inputs_embeds, position_ids, attention_mask)
    return _our_base_forward(view, flattened, input_ids, attention_mask, head_mask if masks_heads else None,
                             inputs_embeds, output_attentions, output_hidden_states, return_dict, position_ids, pack)


def _flattened_or_labelled(view, kwargs, input_ids, inputs_embeds, position_ids, attention_mask):
    """(flattened, view): a flattened batch's packing (DataCollatorWithFlattening's keywords, popped
    from ``kwargs``, or its position ids alone), or None and ``view`` showing its head's token
    labels (_with_token_labels)."""
    flattened = modeling.pop_flattened(kwargs) or modeling.flattened_by_positions(position_ids, attention_mask)
    if flattened is None:
        view = _with_token_labels(view, input_ids, inputs_embeds)
    return flattened, view


def _takes_head_mask(model) -> bool:
    """Whether the installed transformers' forward of ``model`` applies ``head_mask``
    (transformers 4); transformers 5 takes it into **kwargs and ignores it, so an optimised
    model ignores it too: its outputs stay the unoptimised model's."""
    return "head_mask" in inspect.signature(type(model).forward).parameters


def _our_base_forward(view, flattened, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                      output_hidden_states, return_dict, position_ids, pack):
    """Our DistilBertModel.forward over ``view``; a flattened batch (``flattened``, from
    modeling.pop_flattened) on the packed entry point, its outputs in the row's (1, total, ...)
    shapes."""
    if flattened is None:
        return modeling.DistilBertModel.forward(
            view, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions, output_hidden_states,
            return_dict, position_ids=position_ids, pack=pack,
        )
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                  position_ids=position_ids)
    total = modeling.packed_from_flattened(flattened, inputs)  # (refuses an attention_mask)
    out = modeling.DistilBertModel.forward(
        view, inputs["input_ids"], None, head_mask, inputs["inputs_embeds"], output_attentions,
        output_hidden_states, return_dict, position_ids=inputs["position_ids"], cu_seqlens=inputs["cu_seqlens"],
        max_seqlen=inputs["max_seqlen"],
    )
    return modeling.as_one_row(out, total)


def _checkpointing(encoder):
    """transformers' gradient_checkpointing_enable sets the flag on the layers (and on some
    encoders); our Transformer.forward checkpoints each layer itself when it is set."""
    return _Dynamic(functools.partial(_checkpointing_set, encoder))  # (a partial: copies and pickles take it)


def _checkpointing_set(encoder) -> bool:
    return bool(getattr(encoder, "gradient_checkpointing", False)) or any(
        getattr(layer, "gradient_checkpointing", False) for layer in encoder.layer)


# -- BERT ----------------------------------------------------------------------------------------

_BERT_CONFIG_NAMES = {"n_layers": "num_hidden_layers", "n_heads": "num_attention_heads", "dim": "hidden_size"}


def _optimize_bert(model, backend, record, pack):
    hf_config = model.config
    if getattr(hf_config, "is_decoder", False) or getattr(hf_config, "add_cross_attention", False):
        raise ValueError("optimize() supports BERT as an encoder only: config.is_decoder and "
                         "config.add_cross_attention must be False")
    if getattr(hf_config, "position_embedding_type", "absolute") != "absolute":
        raise ValueError("optimize() supports position_embedding_type='absolute' only, got "
                         f"{hf_config.position_embedding_type!r}")
    config = _Config(hf_config, backend, _BERT_CONFIG_NAMES)
    activation = modeling.Activation(hf_config.hidden_act)

    emb = model.embeddings
    _set_forward(model, emb, functools.partial(_bert_embeddings_forward, _View(emb, modeling.Embeddings, values={"config": config})), record)
    encoder = model.encoder
    _set_forward(model, encoder, functools.partial(modeling.Transformer.forward, _View(
        encoder, modeling.Transformer, values={"gradient_checkpointing": _checkpointing(encoder)})), record)
    for layer in encoder.layer:
        attention = _bert_attention_view(layer.attention, config)
        _set_forward(model, layer.attention, functools.partial(_bert_attention_forward, attention), record)
        # what the block sees: in training it must not fold the bias (the attention adds it
        # before BERT's dropout)
        dense = layer.attention.output.dense
        block_attention = _View(layer.attention, modeling.DistilBertSelfAttention, attention._names, {
            **attention._values, "out_lin": _Dynamic(functools.partial(_bias_unless_training, layer.attention, dense))})
        ffn = _View(layer, modeling.FFN,
                    names={"lin1": "intermediate.dense", "lin2": "output.dense", "dropout": "output.dropout"},
                    values={"config": config, "activation": activation})
        view = _View(layer, modeling.TransformerBlock,
                     names={"sa_layer_norm": "attention.output.LayerNorm", "output_layer_norm": "output.LayerNorm"},
                     values={"config": config, "attention": block_attention, "ffn": _FFNCall(ffn, layer),
                             "attention_adapters": None, "output_adapters": None})
        _set_forward(model, layer, functools.partial(modeling.TransformerBlock.forward, view), record)
    base = _View(model, modeling.DistilBertModel, names={"transformer": "encoder"}, values={"config": config})
    _set_forward(model, model, functools.partial(_bert_model_forward, base, pack=pack,
                                                 masks_heads=_takes_head_mask(model)), record)


class _FFNCall(_View):
    """BERT's FFN is two modules (intermediate, output): run our FFN.forward over both directly."""

    def __init__(self, ffn_view, layer):
        super().__init__(layer, modeling.FFN, ffn_view._names,
                         {**ffn_view._values, "chunk_size_feed_forward": layer.chunk_size_feed_forward})

    def __call__(self, *args, **kwargs):
        return modeling.FFN.forward(self, *args, **kwargs)


def _bert_attention_view(attention, config):
    """BertAttention (self.query/key/value, output.dense) as our DistilBertSelfAttention."""
    heads = attention.self.num_attention_heads
    return _View(attention, modeling.DistilBertSelfAttention,
                 names={"q_lin": "self.query", "k_lin": "self.key", "v_lin": "self.value", "dropout": "self.dropout",
                        "out_lin": "output.dense"},
                 values={"config": config, "n_heads": heads, "attention_head_size": attention.self.attention_head_size,
                         "dim": heads * attention.self.attention_head_size, "scaling": attention.self.scaling})


class _Projection(NamedTuple):  # (a NamedTuple: torch.compile traces it, not SimpleNamespace)
    weight: torch.Tensor
    bias: torch.Tensor | None


def _bias_unless_training(attention, dense):
    """out_lin as the block sees it. BERT applies dropout to dense(context) + bias before the
    residual: in training the block must not fold the bias into its LayerNorm, since
    _bert_attention_forward adds it before the dropout."""
    return _Projection(dense.weight, None if attention.training else dense.bias)


def _bert_attention_forward(view, *args, **kwargs):
    out, weights = modeling.DistilBertSelfAttention.forward(view, *args, **kwargs)
    if view.training:
        out = view.output.dropout(out + view.output.dense.bias)
    return out, weights


_TYPES_ADDED = object()  # token_type_ids of inputs_embeds that already hold the token types


def _bert_embeddings_forward(view, input_ids=None, inputs_embeds=None, position_ids=None, token_type_ids=None):
    """word + token type embeddings, then our Embeddings.forward adds the positions, LayerNorm
    and dropout (in transformers' order of additions)."""
    if inputs_embeds is None:
        inputs_embeds = view.word_embeddings(input_ids)
    if token_type_ids is not _TYPES_ADDED:
        inputs_embeds = _with_token_types(view, inputs_embeds, token_type_ids)
    return modeling.Embeddings.forward(view, None, inputs_embeds, position_ids)


def _with_token_types(embeddings, inputs_embeds, token_type_ids):
    """inputs_embeds (..., dim) + the token type embeddings (type 0 where token_type_ids is None)."""
    if token_type_ids is None:
        token_type_ids = torch.zeros(inputs_embeds.shape[:-1], dtype=torch.long, device=inputs_embeds.device)
    else:
        modeling._check_ids("token_type_ids", token_type_ids, embeddings.token_type_embeddings.num_embeddings)
    return inputs_embeds + embeddings.token_type_embeddings(token_type_ids)


class _EmbeddingsCall:
    """BertEmbeddings as our model calls it (ids, embeds, positions), with this call's token types;
    its other attributes (position_ids, ...) are the module's."""

    def __init__(self, module, token_type_ids):
        self._module, self._token_type_ids = module, token_type_ids

    def __call__(self, input_ids, inputs_embeds, position_ids):
        return self._module(input_ids, inputs_embeds, position_ids, self._token_type_ids)

    def __getattr__(self, name):
        return getattr(self._module, name)


def _bert_model_forward(view, input_ids=None, attention_mask=None, token_type_ids=None, position_ids=None,
                        inputs_embeds=None, head_mask=None, output_attentions=None,
                        output_hidden_states=None, return_dict=None, pack=True, masks_heads=True, **kwargs):
    """transformers' BertModel signature over our DistilBertModel.forward (a flattened batch as
    in _distilbert_model_forward); the pooler after."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    flattened, view = _flattened_or_labelled(view, kwargs, input_ids, inputs_embeds, position_ids, attention_mask)
    module = view._module
    embeddings = module.embeddings
    if token_type_ids is not None:
        # token types join the word embeddings here, in the caller's padded layout, so that the
        # packing of a padded batch (which gathers ids or embeddings) carries them along
        if inputs_embeds is None:
            modeling._check_ids("input_ids", input_ids, embeddings.word_embeddings.num_embeddings)
            inputs_embeds, input_ids = embeddings.word_embeddings(input_ids), None
        inputs_embeds = _with_token_types(embeddings, inputs_embeds, token_type_ids)
        token_type_ids = _TYPES_ADDED
    per_call = _View(module, modeling.DistilBertModel, view._names, values={
        **view._values,
        "embeddings": _EmbeddingsCall(embeddings, token_type_ids),
    })
    out = _our_base_forward(per_call, flattened, input_ids, attention_mask, head_mask if masks_heads else None,
                            inputs_embeds, output_attentions, output_hidden_states, True, position_ids, pack)
    pooled = module.pooler(out.last_hidden_state) if module.pooler is not None else None
    result = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=out.last_hidden_state, pooler_output=pooled,
        hidden_states=out.hidden_states, attentions=out.attentions,
        # as transformers' encoder: () with attentions (none without cross-attention layers)
        cross_attentions=() if out.attentions is not None else None,
    )
    return_dict = module.config.return_dict if return_dict is None else return_dict  # (use_return_dict is deprecated)
    return result if return_dict else result.to_tuple()


# -- entry points --------------------------------------------------------------------------------


def _base_models(model):
    import transformers

    kinds = ((transformers.DistilBertModel, _optimize_distilbert), (transformers.BertModel, _optimize_bert))
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [(m, fn) for m in model.modules() for cls, fn in kinds if isinstance(m, cls)]
    if not found:
        raise TypeError(
            "model must be or contain a transformers DistilBertModel or BertModel (a task head, a "
            f"PEFT model or a sentence-transformers model wrapping one), got {type(model).__name__}"
        )
    return found


def optimize(model, backend: str | None = None):
    """Makes the forward of every transformers ``DistilBertModel`` / ``BertModel`` in ``model``
    (the model itself, its base model, or one wrapped by PEFT or sentence-transformers) run on
    distilbert_fast's ops, in place, and returns ``model``. The object, its class and its
    parameters stay the same; ``unoptimize(model)`` undoes it. ``backend`` picks the op backend
    as in ``use_backend`` (None: the usual rules)."""
    if backend is not None:
        check_backend_name(backend)
        backend = None if backend == AUTO else backend
    # A padded batch runs packed (padding positions of the hidden states hold zeros) unless a
    # question-answering head sits on top: its span softmax and loss run over every position of
    # the padded length, padding included, so it needs transformers' values there.
    pack = not any(type(m).__name__.endswith("ForQuestionAnswering") for m in model.modules())
    for base, optimize_one in _base_models(model):
        if getattr(base, _MARK, None):
            unoptimize(base)
        record = []
        optimize_one(base, backend, record, pack)
        _set_head_forwards(model, base, record)
        object.__setattr__(base, _MARK, record)
    return model


def unoptimize(model):
    """Restores transformers' own forward on every base model ``optimize`` changed in ``model``;
    returns ``model``."""
    for base, _ in _base_models(model):
        for module in getattr(base, _MARK, None) or ():
            module.__dict__.pop("forward", None)
        base.__dict__.pop(_MARK, None)
    return model


def is_optimized(model) -> bool:
    return any(getattr(base, _MARK, None) for base, _ in _base_models(model))
