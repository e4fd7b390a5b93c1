"""DistilBERT in PyTorch, a drop-in for HuggingFace's: same modules, parameter names, state_dict
keys, forward arguments and outputs. The hot ops (masked attention, bias + activation, residual +
LayerNorm) go through ``distilbert_fast.ops``, whose backend is chosen per call.

Reading order: embeddings -> attention -> FFN -> block -> encoder -> pretrained base -> model ->
task heads.
"""


import contextvars
import functools
import inspect
import os
import sys
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import checkpoint

from . import checkpoint as ckpt
from .adapters import (
    ModelAdaptersMixin,
    adapters_state_of,
    parallel_channels_of,
    repeat_rows,
    replicate_for_parallel,
    widen_cu_seqlens,
    widen_packing,
)
from .configuration import ATTN_IMPLEMENTATIONS, LOADING_KWARGS, DistilBertConfig
from .ops import (
    bias_activation,
    canonical_activation,
    linear,
    linear_activation,
    masked_attention,
    residual_layernorm,
    varlen_attention,
)
from .deferred_checks import (
    DeferredChecks,
    cu_seqlens_flag,
    deferred_message,
    describe_cu_seqlens,
    describe_ids,
    id_range_message,
    ids_flag,
    safe_cu_seqlens,
    safe_ids,
)
from .packing import (Packing, check_cu_seqlens, compiled_packing_of, packing_of, sequence_positions,
                      varlen_to_padded_index)
from .ops.backends import AUTO, check_backend_name
from .ops.eager import activation_forward
from .tracing import compiling_with_dynamic_shapes, tracing
from .outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

LAYER_NORM_EPS = 1e-12


def _is_plain_linear(layer: nn.Module) -> bool:
    """True when layer(x) is just x @ W^T + b: a Linear no hook watches. A layer that adds to it
    (a LoRA in use, e.g. PEFT's) or carries hooks must run as the module."""
    acts_as_linear = type(layer) is nn.Linear or getattr(layer, "acts_as_linear", lambda: False)()
    return acts_as_linear and not _watched(layer)


def _project(layer: nn.Linear, x: torch.Tensor, backend: str | None) -> torch.Tensor:
    """layer(x) for a projection layer, on the backend's GEMM (ops.linear) when the layer is just
    a Linear; otherwise as the module, so a LoRA applies and hooks fire."""
    if _is_plain_linear(layer):
        return linear(x, layer.weight, layer.bias, backend=backend)
    return layer(x)


def _project_without_bias(layer: nn.Linear, x: torch.Tensor, backend: str | None) -> torch.Tensor:
    """layer(x) - bias_of(layer), for a caller that folds the bias into a later fused op: the
    bare GEMM for a plain Linear; the module, less its bias, for anything else (a LoRA in use, a
    dynamically quantized Linear)."""
    if _is_plain_linear(layer):
        return linear(x, layer.weight, backend=backend)
    out, bias = layer(x), bias_of(layer)
    return out if bias is None else out - bias


def _watched(module) -> bool:
    """Whether hooks watch ``module``'s calls (its own, or global ones): a module our fused ops
    stand in for (a LayerNorm, the activation, a dropout, a projection) then runs as the module,
    on what transformers gives it, and a hooked attention or FFN returns HF's output (bias and
    dropout included) for the hooks to see, which the block then does not fold in. (Runs a
    dozen times a layer: _global_hooks' and _hooked's dicts are read inline, _hooked called only
    when the module has a hook.)"""
    g, m = _torch_module, module
    return bool(g._global_forward_hooks or g._global_forward_pre_hooks or g._global_backward_hooks
                or g._global_backward_pre_hooks or (
                    (m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or m._forward_hooks
                     or _ACCELERATE_HOOK in m.__dict__) and _hooked(m)))


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    """A projection's bias as a tensor: a Linear's parameter, or what torch.ao's quantized
    Linear returns from its ``bias()`` method (quantize_dynamic replaces the model's Linears)."""
    bias = getattr(layer, "bias", None)
    return bias() if callable(bias) else bias


# Writes no version counter sees, watched by global hooks registered with the first cache:
# - a fused optimizer (torch.optim's fused=True, the Trainer's default "adamw_torch_fused") writes
#   parameters in place without bumping their versions (the cache went stale after
#   Trainer.train()): every optimizer step counts as a possible write;
# - PEFT merges a LoRA into the weight through .data (merge_and_unload): it wraps and unwraps
#   q_lin / k_lin / v_lin by setattr, and a projection set anew drops its module's cache.
_optimizer_steps = 0
_hooks = None
_FUSED_PROJECTIONS = frozenset({"q_lin", "k_lin", "v_lin"})


def _count_optimizer_step(optimizer, args, kwargs):
    global _optimizer_steps
    _optimizer_steps += 1


def _forget_stack_of_swapped(module, name, submodule):
    if name in _FUSED_PROJECTIONS and module.__dict__.get("_qkv_cache") is not None:
        module.__dict__["_qkv_cache"] = None


class _StackedCache:
    """A tensor built from ``sources`` (the fused QKV weight), valid while each source is the same
    tensor (a weak reference: a replaced weight is neither kept alive nor mistaken for a new one
    at its address) at the same version counter, over the same storage and dtype
    (``model.to(torch.bfloat16)`` or ``.to(device)`` swap a parameter's data without a new version),
    and no optimizer has stepped since (see _optimizer_steps); a projection set anew on its module
    drops it (_forget_stack_of_swapped). Copies and pickles start empty."""

    def __init__(self, sources=(), stacked=None):
        global _hooks
        if sources and _hooks is None:
            _hooks = (register_optimizer_step_post_hook(_count_optimizer_step),
                      nn.modules.module.register_module_module_registration_hook(_forget_stack_of_swapped))
        self.refs = tuple(weakref.ref(t) for t in sources)
        self.states = tuple(self._state(t) for t in sources)
        self.steps = _optimizer_steps
        self.stacked = stacked

    @staticmethod
    def _state(t):
        return t._version, t.data_ptr(), t.dtype, t.device

    def holds(self, sources) -> bool:
        return self.steps == _optimizer_steps and len(sources) == len(self.refs) and all(
            ref() is t and state == self._state(t) for ref, state, t in zip(self.refs, self.states, sources))

    def __reduce__(self):
        return (_StackedCache, ())


class Varlen(NamedTuple):
    """What attention needs of packed tokens (total, dim): sequence b is rows cu_seqlens[b] to
    cu_seqlens[b + 1] - 1 (int32, on the tokens' device); max_seqlen is a host int."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def sinusoidal_embeddings(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim): sin on even columns, cos on odd ones, as HuggingFace builds them (float64
    arithmetic, then float32)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)[None, :]
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode="floor") / dim)
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, 0::2] = torch.sin(angle[:, 0::2])
    out[:, 1::2] = torch.cos(angle[:, 1::2])
    return out.float()


class Activation(nn.Module):
    """The FFN's (and the masked-LM head's) activation, a module as transformers has it, so a hook
    on it fires. The fused ops take its ``name``; called as a module (when hooks watch it), it
    computes transformers' function in plain torch."""

    def __init__(self, name: str):
        super().__init__()
        self.name = canonical_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activation_forward(x, self.name)

    def extra_repr(self) -> str:
        return self.name


def _layer_norm(norm: nn.LayerNorm, h, residual, backend, h_bias=None, dropout_p=0.0) -> torch.Tensor:
    """norm(dropout(h + h_bias) + residual) (h_bias, residual: None for none) in one op; as HF
    computes it, the LayerNorm run as its module, when hooks watch the LayerNorm."""
    if _watched(norm):
        if h_bias is not None:
            h = h + h_bias
        if dropout_p:
            h = F.dropout(h, dropout_p)
        return norm(h if residual is None else h + residual)
    return residual_layernorm(h, residual, norm.weight, norm.bias, norm.eps, x_bias=h_bias,
                              dropout_p=dropout_p, backend=backend)


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)
        self.register_buffer(
            "position_ids", torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )

    def forward(self, input_ids=None, inputs_embeds=None, position_ids=None) -> torch.Tensor:
        if input_ids is not None:
            inputs_embeds = self.word_embeddings(input_ids)  # (batch, seq, dim)
        if position_ids is None:
            position_ids = self.position_ids[:, : inputs_embeds.size(1)]  # (1, seq)
        position_embeddings = self.position_embeddings(position_ids).expand_as(inputs_embeds)
        embeddings = _layer_norm(self.LayerNorm, inputs_embeds, position_embeddings, self.config.backend)
        return self.dropout(embeddings)  # (batch, seq, dim)


class DistilBertSelfAttention(nn.Module):
    """Multi-head self-attention. ``forward`` returns the heads' output projected by out_lin's
    weight but not its bias, which the block folds into the residual LayerNorm; with hooks on the
    module (``_watched``), HF's output, bias included."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.n_heads = config.n_heads
        self.dim = config.dim
        self.attention_head_size = config.dim // config.n_heads
        self.scaling = self.attention_head_size**-0.5
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout = nn.Dropout(p=config.attention_dropout)
        self._qkv_cache = None  # a _StackedCache of the fused projection; see _fused_qkv

    def train(self, mode: bool = True):
        # train() / eval() drop the cache: the one call that code editing weights through
        # ``.data`` (an EMA copied in, pruning) makes before it evaluates
        self._qkv_cache = None
        return super().train(mode)

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        """hidden_states (batch, seq, dim) with attention_mask (batch, seq) bool (True: a real
        token; not transformers' 4-D mask) or None; or packed tokens (total, dim) with a
        ``Varlen`` in place of the mask. The block passes all but hidden_states by keyword, as
        transformers' block does (what a hook with_kwargs sees)."""
        backend = self.config.backend
        dropout_p = self.dropout.p if self.training else 0.0
        q, k, v = self._qkv(hidden_states)  # (..., heads, head_dim) each
        if q.shape[0] != hidden_states.shape[0]:  # a LoRA of a Parallel adapter setup replicated the batch
            attention_mask, _ = replicate_for_parallel(q.shape[0] // hidden_states.shape[0], attention_mask, None)
        if isinstance(attention_mask, Varlen):
            context = varlen_attention(
                q, k, v, attention_mask.cu_seqlens, attention_mask.max_seqlen,
                head_mask=head_mask, dropout_p=dropout_p, scale=self.scaling, backend=backend,
            )  # (total, heads, head_dim)
            weights = None
        else:
            context, weights = masked_attention(
                q.transpose(1, 2),  # (batch, heads, seq, head_dim) views
                k.transpose(1, 2),
                v.transpose(1, 2),
                key_padding_mask=attention_mask,
                head_mask=head_mask,
                dropout_p=dropout_p,
                scale=self.scaling,
                need_weights=output_attentions,
                backend=backend,
            )
            context = context.transpose(1, 2)  # (batch, seq, heads, head_dim)
        context = context.reshape(*q.shape[:-2], self.dim)
        if returns_whole_attention(self):
            return _project(self.out_lin, context, backend), weights
        return _project_without_bias(self.out_lin, context, backend), weights

    def _qkv(self, hidden):
        """q, k, v: (..., heads, head_dim) views of one (..., 3 * dim) projection of hidden
        (..., dim) (flash-attn's Wqkv), or of three when a projection must run as its module."""
        heads = (*hidden.shape[:-1], self.n_heads, self.attention_head_size)
        fused = self._fused_qkv()
        if fused is None:
            layers = (self.q_lin, self.k_lin, self.v_lin)
            q, k, v = (_project(layer, hidden, self.config.backend) for layer in layers)
            # A LoRA of a Parallel adapter setup returns its copies of the batch: the projections
            # without one repeat theirs to match (the package's match_attn_matrices_for_parallel).
            rows = max(q.shape[0], k.shape[0], v.shape[0])
            return tuple(repeat_rows(t, rows // t.shape[0]).view(rows, *heads[1:]) for t in (q, k, v))
        qkv = linear(hidden, *fused, backend=self.config.backend)  # (..., 3 * dim)
        return qkv.view(*hidden.shape[:-1], 3, self.n_heads, self.attention_head_size).unbind(-3)

    def _fused_qkv(self):
        """(weight (3 * dim, dim), bias (3 * dim,)): q_lin, k_lin and v_lin stacked; None when one
        of them must run as its module (a forward hook, an active LoRA, a PEFT wrapper, no bias).

        The parameters stay q_lin / k_lin / v_lin's (HF's state_dict, tying, optimizers). Where a
        gradient may flow to them the stack is built each forward (torch.cat passes the gradient
        back); otherwise it is cached (_StackedCache), keyed by each tensor and its version
        counter, so an in-place update (load_state_dict) or a move rebuilds it; so do an optimizer
        step, a projection set anew (a merged LoRA) and train() / eval(). Other writes through
        ``param.data`` bypass the version counter: call ``model.eval()`` after them."""
        layers = (self.q_lin, self.k_lin, self.v_lin)
        if not all(_is_plain_linear(layer) and layer.bias is not None for layer in layers):
            return None
        weights = [layer.weight for layer in layers]
        biases = [layer.bias for layer in layers]
        tensors = weights + biases
        if tracing() or (  # a traced graph must not bake the cached stack in as a constant
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        ):
            return torch.cat(weights), torch.cat(biases)
        cache = getattr(self, "_qkv_cache", None)  # (optimize()'s views start without one)
        if cache is None or not cache.holds(tensors):
            # a normal tensor even under inference_mode, so later autograd use may save it
            with torch.inference_mode(False), torch.no_grad():
                cache = self._qkv_cache = _StackedCache(tensors, (torch.cat(weights), torch.cat(biases)))
        return cache.stacked


class FFN(nn.Module):
    """lin1 -> activation -> lin2 -> dropout, in chunks of ``chunk_size_feed_forward`` tokens
    when set (transformers' apply_chunking_to_forward). ``forward`` stops before lin2's bias: the
    block folds that bias and the dropout into the residual LayerNorm; when hooks watch the
    module or its dropout (``returns_whole``), HF's output, bias and dropout included."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(p=config.dropout)
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.activation = Activation(config.activation)

    def forward(self, x):
        chunk, whole = self.chunk_size_feed_forward, returns_whole(self)
        if chunk > 0:  # the same result, less memory
            token_dim = x.dim() - 2  # seq of (batch, seq, dim), tokens of packed (total, dim)
            return torch.cat([self.ff_chunk(part, whole) for part in x.split(chunk, dim=token_dim)], dim=token_dim)
        return self.ff_chunk(x, whole)

    def ff_chunk(self, x, whole: bool):
        """lin1 -> activation -> lin2 (-> lin2's bias and the dropout when ``whole``)."""
        backend = self.config.backend
        activation = self.activation
        if _watched(activation):  # lin1, then the activation as its module
            h = activation(_project(self.lin1, x, backend))
        elif _is_plain_linear(self.lin1):  # act(lin1(x)) as one op: the backend may fuse it
            h = linear_activation(x, self.lin1.weight, self.lin1.bias, activation.name, backend=backend)
        else:  # a LoRA on lin1: run the module, then bias-free activation
            h = bias_activation(self.lin1(x), None, activation.name, backend=backend)
        # (batch, seq, hidden_dim)
        if whole:
            return self.dropout(_project(self.lin2, h, backend))
        return _project_without_bias(self.lin2, h, backend)  # (batch, seq, dim)


def returns_whole(ffn) -> bool:
    """Whether ``ffn`` returns HF's output (lin2's bias and the dropout in): for hooks on it or on
    its dropout to see, in chunks (each chunk draws its dropout mask in turn, as in HF), and when
    accelerate offloads lin2 (_offloaded); otherwise the block folds those into its residual
    LayerNorm."""
    return ffn.chunk_size_feed_forward > 0 or _watched(ffn) or _watched(ffn.dropout) or _offloaded(ffn.lin2)


def returns_whole_attention(attention) -> bool:
    """Whether ``attention`` returns HF's output (out_lin's bias in): for hooks on it to see, and
    when accelerate offloads out_lin; otherwise the block folds the bias into its LayerNorm."""
    return _watched(attention) or _offloaded(attention.out_lin)


def _offloaded(layer: nn.Module) -> bool:
    """Whether an accelerate hook sits on ``layer`` (cpu_offload, disk_offload, dispatch_model):
    its weights may be in place (off the meta device) only during its own call, so no caller
    reads them around it (a bias folded into a later op). (optimize()'s projections may be
    NamedTuples: no hook; a hook below an optimised model runs transformers' forward anyway.)"""
    return _ACCELERATE_HOOK in getattr(layer, "__dict__", ())


class TransformerBlock(nn.Module):
    """Post-LN block: x = LN(x + attention(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.attention = DistilBertSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        # Bottleneck adapters after the attention / FFN sublayer: modules set by
        # distilbert_fast.adapters when an adapter is added (None: a plain block).
        self.attention_adapters = None
        self.output_adapters = None

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
        """The block's output, as transformers 5's block returns it (what a forward hook on a
        layer sees); (output, attention weights) with output_attentions. attention_mask: see
        DistilBertSelfAttention.forward."""
        x = hidden_states
        attn_bias = None if returns_whole_attention(self.attention) else bias_of(self.attention.out_lin)
        # (as transformers calls its attention: what a hook sees)
        attn, weights = self.attention(x, attention_mask=attention_mask, **_set_options(head_mask, output_attentions))
        if attn.shape[0] != x.shape[0]:  # a LoRA of a Parallel adapter setup replicated the batch
            x = repeat_rows(x, attn.shape[0] // x.shape[0])
        x = self._residual_layernorm(attn, x, attn_bias, 0.0, self.sa_layer_norm, self.attention_adapters)
        if returns_whole(self.ffn):  # its output holds lin2's bias and the dropout already
            h_bias, dropout_p = None, 0.0
        else:
            h_bias, dropout_p = bias_of(self.ffn.lin2), self.ffn.dropout.p if self.training else 0.0
        out = self._residual_layernorm(self.ffn(x), x, h_bias, dropout_p, self.output_layer_norm,
                                       self.output_adapters)
        return (out, weights) if output_attentions else out

    def _residual_layernorm(self, h, x, h_bias, dropout_p, layer_norm, adapters):
        """LayerNorm(dropout(h + h_bias) + x): the sublayer's bias, dropout, residual and LayerNorm
        in one op (see _layer_norm). Active bottleneck adapters of this sublayer go between the
        sublayer and its residual + LayerNorm, and call the same op themselves."""
        if adapters is not None and adapters.active_setup() is not None:
            return adapters(h, x, h_bias, dropout_p, layer_norm)
        return _layer_norm(layer_norm, h, x, self.config.backend, h_bias, dropout_p)


def _set_options(head_mask, output_attentions) -> dict:
    """The keywords a layer or attention call passes besides the hidden states and the mask:
    only those set, so that a hook sees the call transformers makes (no keywords) unless a
    head mask or attention weights are asked for."""
    options = {}
    if head_mask is not None:
        options["head_mask"] = head_mask
    if output_attentions:
        options["output_attentions"] = True
    return options


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.n_layers = config.n_layers
        self.layer = nn.ModuleList([TransformerBlock(config) for _ in range(config.n_layers)])
        self.gradient_checkpointing = False

    def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False,
                output_hidden_states=False):
        """The layers over hidden_states (batch, seq, dim) or packed (total, dim); attention_mask:
        see DistilBertSelfAttention.forward. The base model passes every argument by keyword, as
        transformers' does (what a hook with_kwargs sees)."""
        x = hidden_states
        all_hidden_states = (x,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        layers = (x, attention_mask, head_mask, output_attentions, all_hidden_states, all_attentions)
        state = adapters_state_of(self.layer)
        if state is None:
            return self._layers(*layers)
        # (rows: where a Parallel adapter setup replicates the batch; cu_seqlens: the rows a
        # BatchSplit / Split setup splits packed tokens by)
        cu_seqlens = attention_mask.cu_seqlens if isinstance(attention_mask, Varlen) else None
        with state.calling(rows=x.shape[0], cu_seqlens=cu_seqlens):
            return self._layers(*layers)

    def _layers(self, x, key_padding_mask, head_mask, output_attentions, all_hidden_states, all_attentions):
        rows = x.shape[0]  # batch, or packed tokens
        for i, layer in enumerate(self.layer):
            layer_head_mask = None if head_mask is None else head_mask[i]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # The recomputation in backward runs under this forward's context variables (the
                # backend chosen with use_backend, the adapters chosen for this call); a traced
                # graph holds those already (a compiled backward recomputes from the graph).
                run = layer if tracing() else functools.partial(contextvars.copy_context().run, layer)
                out = checkpoint(run, x, key_padding_mask, use_reentrant=False,
                                 **_set_options(layer_head_mask, output_attentions))
            else:  # (as transformers calls its layers: what a hook sees)
                out = layer(x, key_padding_mask, **_set_options(layer_head_mask, output_attentions))
            x, weights = out if output_attentions else (out, None)
            if x.shape[0] != rows:  # a Parallel adapter setup replicated the batch in this layer
                key_padding_mask, all_hidden_states = replicate_for_parallel(
                    x.shape[0] // rows, key_padding_mask, all_hidden_states)
                rows = x.shape[0]
            if all_hidden_states is not None:
                all_hidden_states = all_hidden_states + (x,)
            if all_attentions is not None:
                all_attentions = all_attentions + (weights,)
        return BaseModelOutput(last_hidden_state=x, hidden_states=all_hidden_states, attentions=all_attentions)


# -- the pretrained-model base: init, weight tying, loading and saving --------------------------


# Tokenizer outputs that are not model inputs: forward accepts and ignores them, as transformers 5
# does, so model(**tokenizer(...)) works with any BERT-family tokenizer's output.
_IGNORED_INPUTS = ("token_type_ids", "offset_mapping", "special_tokens_mask", "length",
                   "overflow_to_sample_mapping",
                   # transformers 5's model keywords (TransformersKwargs, use_cache) that its DistilBERT
                   # takes and does nothing with; other unknown keywords stay a TypeError (a typo such
                   # as label= would otherwise pass silently, as it does in transformers)
                   "num_items_in_batch", "output_router_logits", "seq_idx", "use_cache")


def _ignoring_tokenizer_outputs(forward):
    """Wraps a model class's forward so it drops _IGNORED_INPUTS keywords (also when forward is
    called directly, as sentence-transformers does). inspect.signature still shows forward's own
    arguments, so clients that filter inputs by it (Trainer) drop those columns themselves."""

    @functools.wraps(forward)
    def forward_ignoring(self, *args, **kwargs):
        for key in _IGNORED_INPUTS:
            kwargs.pop(key, None)
        flat = pop_flattened(kwargs)
        if flat is None and self._token_outputs and len(args) <= 1 and kwargs.get("cu_seqlens") is None:
            flat = flattened_by_positions(kwargs.get("position_ids"), kwargs.get("attention_mask"))
        if flat is not None:
            return _forward_flattened(forward, self, args, kwargs, flat)
        return forward(self, *args, **kwargs)

    forward_ignoring._ignores_tokenizer_outputs = True
    return forward_ignoring


# transformers' flash-attention keywords for a flattened batch (DataCollatorWithFlattening with
# return_flash_attn_kwargs=True): its sequences concatenated into one row, and where each starts.
_FLATTENED_INPUTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def pop_flattened(kwargs: dict) -> dict | None:
    """The flattened-batch keywords popped from ``kwargs``, or None if it holds none."""
    if not any(key in kwargs for key in _FLATTENED_INPUTS):
        return None
    return {key: kwargs.pop(key, None) for key in _FLATTENED_INPUTS}


def flattened_by_positions(position_ids, attention_mask) -> dict | None:
    """The flattened-batch keywords of a padding-free batch given by its position ids alone
    (DataCollatorWithFlattening's default: one (1, total) row, no attention mask, position ids
    0 .. len - 1 per sequence), or None where position_ids are not that. transformers' DistilBERT
    runs such a row as one sequence on eager / sdpa (each sequence then attends to the others;
    its flash-attention models read the boundaries from the position ids, as here): ours runs each
    sequence alone. Reads position_ids on the host (on a GPU, one copy: the packed forward that
    follows then takes the host's cu_seqlens and max_seqlen without another sync); never while
    tracing or capturing."""
    if (attention_mask is not None or not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
            or position_ids.shape[0] != 1 or position_ids.shape[1] < 2 or tracing()
            or (position_ids.is_cuda and torch.cuda.is_current_stream_capturing())):
        return None
    positions = position_ids[0].cpu()
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() < 2 or int(starts[0]) != 0:
        return None  # one sequence (or none): nothing to split
    total = positions.numel()
    cu_seqlens = torch.cat([starts, starts.new_tensor([total])]).to(torch.int32)
    if not torch.equal(positions, sequence_positions(cu_seqlens, total)[1].to(positions.dtype)):
        return None  # not 0 .. len - 1 per sequence: the caller's own position ids
    return {"cu_seq_lens_q": cu_seqlens, "cu_seq_lens_k": None, "max_length_q": int(cu_seqlens.diff().max()),
            "max_length_k": None}


def packed_from_flattened(flat: dict, inputs: dict) -> int:
    """Turns a flattened batch into the packed entry point's arguments, in place in ``inputs``
    (forward's arguments by name): the (1, total) rows become (total,) ones, cu_seq_lens_q
    becomes cu_seqlens and max_seqlen. Returns total. Each sequence then attends within itself,
    as transformers' flash-attention models compute a flattened batch; position ids are the
    caller's (the collator restarts them per sequence), or restart per sequence."""
    cu_seqlens = flat["cu_seq_lens_q"]
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seq_lens_q must be a tensor with a flattened batch, got {type(cu_seqlens).__name__}")
    if flat["cu_seq_lens_k"] is not None and not torch.equal(flat["cu_seq_lens_k"], cu_seqlens):
        raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q (self-attention), got other boundaries")
    if inputs.get("attention_mask") is not None:
        raise ValueError("attention_mask must be None with a flattened batch (cu_seq_lens_q)")
    total = None
    for key in ("input_ids", "inputs_embeds"):
        x = inputs.get(key)
        if x is not None:
            if x.dim() < 2 or x.shape[0] != 1:
                raise ValueError(f"{key} must have shape (1, total{', dim' if key == 'inputs_embeds' else ''}) "
                                 f"in a flattened batch, got {tuple(x.shape)}")
            inputs[key], total = x[0], x.shape[1]
    for key in ("labels", "position_ids"):
        x = inputs.get(key)
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] == 1:
            inputs[key] = x[0]
    max_seqlen = flat["max_length_q"]
    inputs["cu_seqlens"] = cu_seqlens.to(torch.int32)
    inputs["max_seqlen"] = int(cu_seqlens.diff().max()) if max_seqlen is None else int(max_seqlen)
    return total


def as_one_row(out, total: int):
    """A packed forward's outputs in a flattened batch's shapes: each per-token tensor (total, ...)
    as (1, total, ...); the loss and per-sequence outputs as they are."""

    def one_row(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
            return value.unsqueeze(0)
        if isinstance(value, tuple):
            return tuple(one_row(v) for v in value)
        return value

    if isinstance(out, tuple):
        return tuple(one_row(v) for v in out)
    for key, value in list(out.items()):
        if key != "loss":
            out[key] = one_row(value)
    return out


def _forward_flattened(forward, model, args, kwargs, flat: dict):
    """A flattened batch (``flat``: its keywords, from pop_flattened), (1, total) ids with
    cu_seq_lens_q, run on the packed entry point (see packed_from_flattened). Token outputs come
    back (1, total, ...)."""
    name = type(model).__name__
    if not model._token_outputs:
        raise ValueError(
            f"{name} gives one output per sequence, so it does not take a flattened batch "
            "(cu_seq_lens_q, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives it); "
            "pass a padded batch, or use a token-level model (the base model, masked LM, token "
            "classification, question answering)"
        )
    signature = inspect.signature(forward)
    if "labels" not in signature.parameters:
        kwargs.pop("labels", None)  # the collator's (ids as labels, for causal LMs), as transformers drops them
    bound = signature.bind(model, *args, **kwargs).arguments
    bound.pop("self", None)
    total = packed_from_flattened(flat, bound)
    return as_one_row(forward(model, **bound), total)


class DistilBertPreTrainedModel(ModelAdaptersMixin, nn.Module):
    config_class = DistilBertConfig
    base_model_prefix = "distilbert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # state_dict keys that alias another parameter when weights are tied: (key, source key)
    _tied_weights_keys: dict[str, str] = {}
    # True on the transformers-compatible twins (see distilbert_fast.integrations.transformers)
    _transformers_twin = False
    # Whether every output but the loss is per token (a flattened batch is then taken as one row)
    _token_outputs = False

    def __new__(cls, *args, **kwargs):
        # Where transformers is loaded, the model is made as a twin that is also a
        # transformers.PreTrainedModel, which Trainer's save tests for; nothing else changes.
        if not cls._transformers_twin and "transformers" in sys.modules:
            from .integrations.transformers import model_twin

            cls = model_twin(cls)
        return super().__new__(cls)

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        config = DistilBertConfig.coerce(config)  # ours, or a transformers DistilBertConfig
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"  # transformers' default, which clients read
        self.name_or_path = getattr(config, "name_or_path", "")  # as transformers' models (PEFT records it)
        # the module classes device-map planning keeps whole: none, as transformers' post_init
        # makes it for DistilBERT (a set, not the class default None: PEFT's FSDP wrap policy joins it)
        self._no_split_modules = set()
        if config.dim % config.n_heads != 0:
            raise ValueError(f"config.n_heads={config.n_heads} must divide config.dim={config.dim} evenly")
        canonical_activation(config.activation)
        if config.backend is not None:
            check_backend_name(config.backend)
        self.config = config

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_ignores_tokenizer_outputs", False):
            cls.forward = _ignoring_tokenizer_outputs(forward)

    # -- initialisation --------------------------------------------------------------------------
    def post_init(self):
        self.init_weights()

    def init_weights(self):
        """(Re)initialises every weight as a freshly made model has them, then ties the tied ones,
        as transformers' ``init_weights``."""
        self.apply(self._init_weights)
        self.tie_weights()

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        """HuggingFace's init: normal(0, initializer_range) for Linear and Embedding weights, zero
        biases and padding row, LayerNorm at identity, sinusoidal position table if configured."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(mean=0.0, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if isinstance(module, Embeddings) and self.config.sinusoidal_pos_embds:
            table = module.position_embeddings.weight
            table.copy_(sinusoidal_embeddings(*table.shape))
            table.requires_grad_(False)  # fixed, as in the original DistilBERT

    def set_attn_implementation(self, attn_implementation):
        """Records transformers' attention implementation name in ``config._attn_implementation``
        (as transformers' ``set_attn_implementation``). Every name runs our attention op, which
        gives transformers' eager values; the op backend is chosen by ``backend``, not here."""
        if isinstance(attn_implementation, dict):  # transformers' per-sub-config form
            attn_implementation = attn_implementation.get("", self.config._attn_implementation)
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {list(ATTN_IMPLEMENTATIONS)}, "
                             f"got {attn_implementation!r}")
        self.config._attn_implementation = attn_implementation

    # -- embeddings ------------------------------------------------------------------------------
    @property
    def base_model(self) -> "DistilBertModel":
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.word_embeddings

    def set_input_embeddings(self, new_embeddings: nn.Embedding):
        self.base_model.embeddings.word_embeddings = new_embeddings

    def get_output_embeddings(self) -> nn.Module | None:
        return None

    def get_position_embeddings(self) -> nn.Embedding:
        return self.base_model.embeddings.position_embeddings

    def tie_weights(self):
        """Shares the output projection's weight with the word embeddings when
        config.tie_word_embeddings (as after init, load and resize)."""
        output = self.get_output_embeddings()
        if output is not None and self.config.tie_word_embeddings:
            output.weight = self.get_input_embeddings().weight

    @torch.no_grad()
    def resize_token_embeddings(self, new_num_tokens=None, pad_to_multiple_of=None, mean_resizing=True):
        """Resizes the word embeddings (and a tied or untied output layer) to ``new_num_tokens``,
        optionally rounded up to ``pad_to_multiple_of``. New rows are drawn around the old rows'
        mean (``mean_resizing``) or from the normal init, as HuggingFace does. Returns the
        input embedding module."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        if pad_to_multiple_of is not None:
            if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1:
                raise ValueError(f"pad_to_multiple_of must be a positive int, got {pad_to_multiple_of!r}")
            target = old.num_embeddings if new_num_tokens is None else new_num_tokens
            new_num_tokens = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        if not isinstance(new_num_tokens, int) or new_num_tokens < 1:
            raise ValueError(f"new_num_tokens must be a positive int, got {new_num_tokens!r}")

        old_weight = old.weight
        new_weight = self._resized_rows(old_weight, new_num_tokens, mean_resizing)
        old.weight = nn.Parameter(new_weight, requires_grad=old_weight.requires_grad)
        old.num_embeddings = new_num_tokens
        if old.padding_idx is not None and old.padding_idx >= new_num_tokens:
            old.padding_idx = None

        output = self.get_output_embeddings()
        if output is not None:
            if not self.config.tie_word_embeddings:
                output.weight = nn.Parameter(
                    self._resized_rows(output.weight, new_num_tokens, mean_resizing),
                    requires_grad=output.weight.requires_grad,
                )
            if output.bias is not None:
                # HF resizes a tied head only through tie_weights, which zero-pads the bias
                # (_adjust_bias): mean_resizing applies to the bias only when untied.
                output.bias = nn.Parameter(
                    self._resized_bias(
                        output.bias, new_num_tokens, mean_resizing and not self.config.tie_word_embeddings
                    ),
                    requires_grad=output.bias.requires_grad,
                )
            output.out_features = new_num_tokens
        self.config.vocab_size = new_num_tokens
        self.tie_weights()
        return old

    def _resized_rows(self, old: torch.Tensor, n: int, mean_resizing: bool) -> torch.Tensor:
        new = torch.empty(n, old.shape[1], dtype=old.dtype, device=old.device)
        keep = min(n, old.shape[0])
        new[:keep] = old[:keep]
        added = n - keep
        if added > 0:
            if mean_resizing:
                new[keep:] = _sample_around_mean(old, added)
            else:
                new[keep:].normal_(mean=0.0, std=self.config.initializer_range)
        return new

    @staticmethod
    def _resized_bias(old: torch.Tensor, n: int, mean_resizing: bool) -> torch.Tensor:
        new = torch.zeros(n, dtype=old.dtype, device=old.device)
        keep = min(n, old.shape[0])
        new[:keep] = old[:keep]
        if n > keep and mean_resizing:
            mean = old.float().mean()
            std = old.float().std() if old.numel() > 1 else torch.zeros(())
            new[keep:] = torch.normal(mean.item(), 1e-9 * std.item(), size=(n - keep,)).to(old)
        return new

    def resize_position_embeddings(self, new_num_position_embeddings: int):
        """Grows or shrinks the position table to ``new_num_position_embeddings`` rows: learned
        rows are kept (new ones drawn from the init), a sinusoidal table is recomputed."""
        embeddings = self.base_model.embeddings
        old = embeddings.position_embeddings.weight
        n = new_num_position_embeddings
        if n == old.shape[0]:
            return
        if self.config.sinusoidal_pos_embds:
            new = sinusoidal_embeddings(n, old.shape[1]).to(old)
        else:
            new = self._resized_rows(old.detach(), n, mean_resizing=False)
        embeddings.position_embeddings = nn.Embedding(n, old.shape[1], device=old.device, dtype=old.dtype)
        with torch.no_grad():
            embeddings.position_embeddings.weight.copy_(new)
        embeddings.position_embeddings.weight.requires_grad_(old.requires_grad)
        embeddings.position_ids = torch.arange(n, device=embeddings.position_ids.device).expand((1, -1))
        self.config.max_position_embeddings = n

    # -- conveniences HuggingFace users reach for ---------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters counted once each (tied ones once); ``exclude_embeddings`` leaves out the
        embedding tables, as transformers does."""
        skipped = set()
        if exclude_embeddings:
            skipped = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        unique = {
            id(p): p for p in self.parameters()
            if (p.requires_grad or not only_trainable) and id(p) not in skipped
        }
        return sum(p.numel() for p in unique.values())

    def can_generate(self) -> bool:
        return False

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """transformers' example batch, as it gives it: three rows of five ids."""
        return {"input_ids": torch.tensor([[7, 6, 0, 0, 1], [1, 2, 3, 0, 0], [0, 0, 0, 4, 5]])}

    def get_memory_footprint(self, return_buffers: bool = True) -> int:
        """Bytes held by the parameters (and buffers), as transformers counts them."""
        tensors = list(self.parameters()) + (list(self.buffers()) if return_buffers else [])
        return sum(t.nelement() * t.element_size() for t in tensors)

    def enable_input_require_grads(self):
        """Makes the input embeddings' output require grad (a forward hook, as transformers'), so
        gradient checkpointing reaches adapters or LoRA weights with the embeddings frozen."""

        def make_inputs_require_grads(module, inputs, output):  # (transformers' name: see has_hooks_below)
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(make_inputs_require_grads)

    def disable_input_require_grads(self):
        self._require_grads_hook.remove()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, every_n_layers=1, offload=False):
        """Recomputes each layer in backward (torch.utils.checkpoint, use_reentrant=False).
        transformers' keywords are accepted; ``use_reentrant`` is ignored (non-reentrant is
        always used), ``every_n_layers`` must be 1 and ``offload`` False."""
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(
                f"gradient_checkpointing_kwargs must be a dict or None, got {type(gradient_checkpointing_kwargs).__name__}"
            )
        if every_n_layers != 1:
            raise ValueError(f"every_n_layers must be 1, got {every_n_layers!r}")
        if offload:
            raise ValueError("offload=True is not supported; pass offload=False")
        self.base_model.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.base_model.transformer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.base_model.transformer.gradient_checkpointing

    @property
    def backend(self) -> str:
        """The op backend this model asks for ('auto' unless set)."""
        return self.config.backend or AUTO

    def set_backend(self, name: str | None):
        """Runs this model's ops on backend ``name`` ('auto', 'eager', ...); None clears it."""
        if name is not None:
            check_backend_name(name)
        self.config.backend = None if name == AUTO else name
        return self

    # -- checkpoints -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory, *, config=None, dtype="auto", torch_dtype=None,
                        backend=None, use_safetensors=None, ignore_mismatched_sizes=False,
                        output_loading_info=False, **config_kwargs):
        """Loads config.json and the weights (model.safetensors, pytorch_model.bin, or either
        sharded with an index) from a local directory. A checkpoint of the base model loads into a
        task model and the reverse (the 'distilbert.' prefix is added or stripped). Missing and
        unexpected keys are reported in one warning; wrong shapes are an error unless
        ``ignore_mismatched_sizes``, which re-initialises those weights with a warning.
        ``dtype`` (or its old name ``torch_dtype``) defaults to 'auto', as in transformers 5: the
        dtype config.json records, else the checkpoint's; pass torch.float32 to upcast.
        ``output_loading_info=True`` returns ``(model, info)`` as transformers does, ``info`` the
        dict of ``missing_keys``, ``unexpected_keys``, ``mismatched_keys`` and ``error_msgs``."""
        directory = ckpt.local_directory(directory)
        device = _device_from_map(config_kwargs.get("device_map"))
        attn_implementation = config_kwargs.get("attn_implementation")
        if config_kwargs.get("subfolder"):
            directory = ckpt.local_directory(os.path.join(directory, config_kwargs["subfolder"]))
        # transformers' loading keywords (device_map, attn_implementation, hub options) are not
        # model settings: they never reach the config or config.json.
        config_kwargs = {k: v for k, v in config_kwargs.items() if k not in LOADING_KWARGS}
        if config is None:
            config = DistilBertConfig.from_pretrained(directory, **config_kwargs)
        else:
            config = DistilBertConfig.coerce(config)
            for key, value in config_kwargs.items():
                setattr(config, key, value)
        if backend is not None:
            config.backend = None if backend == AUTO else backend
        model = cls(config)
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        model._adapters_from_config()  # adapters saved with the model, before their weights load
        state_dict = ckpt.load_state_dict(directory, use_safetensors=use_safetensors)
        info = ckpt.load_into_model_with_info(model, state_dict, ignore_mismatched_sizes=ignore_mismatched_sizes)
        if torch_dtype is not None:
            dtype = torch_dtype
        config_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        model.to(ckpt.resolve_dtype(dtype, state_dict, config_dtype))
        # as transformers: the config names the dtype the model was loaded in (the JSON's spelling)
        model.config.dtype = str(model.dtype).removeprefix("torch.")
        if device is not None:
            model.to(device)
        model.eval()
        return (model, info) if output_loading_info else model

    def save_pretrained(self, directory, *, safe_serialization=True, max_shard_size="50GB", state_dict=None,
                        is_main_process=True, push_to_hub=False, **hub_kwargs):
        """Writes config.json and the weights (model.safetensors by default, pytorch_model.bin
        with ``safe_serialization=False``), sharded with an index above ``max_shard_size``.
        transformers' ``is_main_process`` (False: write nothing) is honoured; ``push_to_hub``
        must be False (there is no network), and the hub's other keywords are then ignored."""
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported: distilbert_fast never uploads; save "
                             "to a directory and upload it with huggingface_hub")
        if not is_main_process:
            return
        self.config.architectures = [type(self).__name__]
        self.config.dtype = str(self.dtype).removeprefix("torch.")
        if self.has_adapters() or getattr(self.config, "adapters", None):
            self._adapters_to_config()  # rebuilt by from_pretrained, as the package does
        if state_dict is None:
            state_dict = self.state_dict()
        self.config.save_pretrained(directory)
        ckpt.save_state_dict(
            state_dict,
            directory,
            tied_keys=self._tied_weights_keys if self.config.tie_word_embeddings else {},
            safe_serialization=safe_serialization,
            max_shard_size=max_shard_size,
        )


def _device_from_map(device_map):
    """transformers' device_map for a model that fits one device: a device, 'auto' (CUDA when
    available) or {'': device}. Splitting a model across devices is not supported."""
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map must place the whole model on one device ({{'': device}}), got {device_map!r}")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, (str, int, torch.device)):
        return torch.device(device_map)
    raise TypeError(f"device_map must be a device, 'auto' or {{'': device}}, got {device_map!r}")


def _sample_around_mean(old: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` rows from N(mean, 1e-9 * cov) of ``old``'s rows (HuggingFace's mean_resizing),
    or the mean itself where that covariance is not positive definite."""
    rows = old.detach().float()
    mean = rows.mean(0)
    centered = rows - mean
    covariance = 1e-9 * (centered.T @ centered) / rows.shape[0]
    try:
        dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
        return dist.sample((count,)).to(old.dtype)
    except (ValueError, RuntimeError):  # not positive definite
        return mean.expand(count, -1).to(old.dtype)


# -- the base model ------------------------------------------------------------------------------


class DistilBertModel(DistilBertPreTrainedModel):
    _token_outputs = True

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.embeddings = Embeddings(self.config)  # (ours: config may be transformers')
        self.transformer = Transformer(self.config)
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        head_mask=None,
        inputs_embeds=None,
        output_attentions=None,
        output_hidden_states=None,
        return_dict=None,
        position_ids=None,
        cu_seqlens=None,
        max_seqlen=None,
        pack=True,
    ):
        """HF's forward on a padded batch, or on packed tokens when ``cu_seqlens`` is given:
        input_ids (total,) (or inputs_embeds (total, dim)) holding the sequences one after the
        other, cu_seqlens (batch + 1,) int32, max_seqlen a Python int; the outputs are then
        packed too ((total, dim)). Position ids of packed input default to 0 .. len - 1 per
        sequence.

        A padded batch with padding is packed after the embeddings and scattered back at the end
        (``pack=False`` keeps the padded computation): real positions are HF's, padding positions
        of the returned hidden states hold zeros."""
        config = self.config
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = config.return_dict if return_dict is None else return_dict

        if cu_seqlens is not None or max_seqlen is not None:
            head_mask = self._layer_head_masks(head_mask)
            out = self._forward_packed_input(input_ids, attention_mask, head_mask, inputs_embeds,
                                             output_attentions, output_hidden_states, position_ids,
                                             cu_seqlens, max_seqlen)
            return out if return_dict else out.to_tuple()

        if not tracing() and _inputs_checked.get():
            packing = None  # a task head's plan checked this batch and chose the padded computation
        else:
            packing = self.plan_packing(input_ids, attention_mask, inputs_embeds, output_attentions,
                                        pack, position_ids=position_ids)
        head_mask = self._layer_head_masks(head_mask)
        if packing is not None:
            # real tokens only from here on; positions are those of the padded layout
            if position_ids is None:
                position_ids = self.embeddings.position_ids[:, : packing.seq]
            out = self._forward_packed(
                None if input_ids is None else packing.unpad(input_ids),
                None if inputs_embeds is None else packing.unpad(inputs_embeds),
                packing.unpad(position_ids),
                Varlen(packing.cu_seqlens, packing.max_seqlen),
                head_mask,
                output_hidden_states,
            )
            out = pad_output(out, widen_packing(packing, parallel_channels_of(out.last_hidden_state.shape[0],
                                                                              packing.total)))
        else:
            key_padding_mask = None if attention_mask is None else _as_keep_mask(attention_mask)
            embeddings = self.embeddings(input_ids, inputs_embeds, position_ids)  # (batch, seq, dim)
            out = self.transformer(hidden_states=embeddings, attention_mask=key_padding_mask, head_mask=head_mask,
                                   output_attentions=output_attentions, output_hidden_states=output_hidden_states)
        return out if return_dict else out.to_tuple()

    def _forward_packed(self, input_ids, inputs_embeds, position_ids, varlen, head_mask,
                        output_hidden_states):
        """The model on packed tokens: ids (total,) or embeds (total, dim), position_ids
        (total,) -> BaseModelOutput of (total, dim) tensors."""
        embeddings = self.embeddings(input_ids, inputs_embeds, position_ids)  # (total, dim)
        return self.transformer(hidden_states=embeddings, attention_mask=varlen, head_mask=head_mask,
                                output_attentions=False, output_hidden_states=output_hidden_states)

    def _forward_packed_input(self, input_ids, attention_mask, head_mask, inputs_embeds,
                              output_attentions, output_hidden_states, position_ids, cu_seqlens,
                              max_seqlen):
        """The packed entry point: checks the packed arguments, then _forward_packed."""
        config = self.config
        if cu_seqlens is None or max_seqlen is None:
            missing = "cu_seqlens" if cu_seqlens is None else "max_seqlen"
            raise ValueError(f"{missing} must be given with packed input (both cu_seqlens and max_seqlen, or neither)")
        if attention_mask is not None:
            raise ValueError("attention_mask must be None with packed input (cu_seqlens says where sequences end)")
        if output_attentions:
            raise ValueError("output_attentions=True is not supported with packed input (cu_seqlens); "
                             "pass a padded batch to get attention weights")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            if input_ids.dim() != 1:
                raise ValueError(f"input_ids must be 1-D (total_tokens,) with cu_seqlens, got shape "
                                 f"{tuple(input_ids.shape)}")
            like = input_ids
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError("inputs_embeds must be a floating-point torch.Tensor")
            if inputs_embeds.dim() != 2 or inputs_embeds.shape[-1] != config.dim:
                raise ValueError(f"inputs_embeds must have shape (total_tokens, {config.dim}) with "
                                 f"cu_seqlens, got {tuple(inputs_embeds.shape)}")
            like = inputs_embeds
        total = like.shape[0]
        if total == 0:
            raise ValueError("packed input must hold at least 1 token, got 0")
        check_cu_seqlens(cu_seqlens, total, max_seqlen, config.max_position_embeddings, like.device)
        # The values of ids and of device cu_seqlens: checked here on the CPU; on a GPU on the
        # device, raised at the next sync (deferred_checks); not again when a task head's plan
        # made this packed batch from a checked padded one.
        checked = tracing() or _inputs_checked.get()
        if input_ids is not None and not checked:
            input_ids = self._check_or_defer_ids("input_ids", input_ids, config.vocab_size)
        if cu_seqlens.device.type != "cpu" and not checked:
            self._deferred().record("cu_seqlens", cu_seqlens_flag(cu_seqlens, total, max_seqlen),
                                    describe_cu_seqlens)
            cu_seqlens = safe_cu_seqlens(cu_seqlens, total)
        cu_seqlens = cu_seqlens.to(like.device, non_blocking=True)
        if position_ids is None:
            # 0 .. len - 1 per sequence, on the device; clamped so that unchecked (GPU) cu_seqlens
            # can never index outside the position table
            position_ids = sequence_positions(cu_seqlens, total)[1]
            position_ids = position_ids.clamp_(0, config.max_position_embeddings - 1)
        else:
            if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (total,):
                raise ValueError(f"position_ids must have shape (total_tokens,) = ({total},) with "
                                 f"cu_seqlens, got {getattr(position_ids, 'shape', position_ids)}")
            _check_id_dtype("position_ids", position_ids)
            if not checked:
                position_ids = self._check_or_defer_ids("position_ids", position_ids,
                                                        config.max_position_embeddings)
        return self._forward_packed(input_ids, inputs_embeds, position_ids,
                                    Varlen(cu_seqlens, max_seqlen), head_mask, output_hidden_states)

    def _check_or_defer_ids(self, name: str, ids: torch.Tensor, upper: int) -> torch.Tensor:
        """ids of packed input, checked to lie in [0, upper): here when on the CPU; on a GPU by a
        device-side flag raised at the next sync (no sync now), the ids clamped meanwhile so that
        no gather reads outside its table. Returns the ids to use."""
        _check_id_dtype(name, ids)
        if ids.device.type == "cpu" or ids.numel() == 0:
            _check_ids(name, ids, upper)
            return ids
        self._deferred().record(name, ids_flag(ids, upper), describe_ids(name, upper))
        return safe_ids(ids, upper)

    def _deferred(self) -> DeferredChecks:
        """This model's pending device-side input checks (made on first use)."""
        checks = getattr(self, "_deferred_checks", None)
        if checks is None:
            checks = self._deferred_checks = DeferredChecks()
        return checks

    def raise_deferred(self) -> None:
        """Raises the first failed input check of the packed forwards this model ran on a GPU
        since the last read (see deferred_checks): one sync, none when nothing is pending. A
        padded forward reads them in its own sync."""
        checks = getattr(self, "_deferred_checks", None)
        if checks is not None:
            checks.raise_now()

    def plan_packing(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                     output_attentions=False, pack=True, exact=None, position_ids=None) -> Packing | None:
        """Checks a padded batch's inputs and decides whether it runs packed: the Packing if so,
        None for the padded computation. Reads a few numbers back to the host in one go (one sync
        on a GPU): attention_mask's statistics, the range of input_ids and position_ids, and the
        pending device-side checks of earlier packed forwards (deferred_checks). None without a
        mask, ids or pending checks.

        It packs when there is padding, unless ``pack`` is False, attention weights are asked
        for, a row is all padding (HF attends uniformly over its padding: only the padded
        computation gives those values), a position in ``exact`` is padding, or a hook sits on a
        module below this model (it then sees the (batch, seq, ...) tensors HF's model gives it,
        as NEFTune's noise hook on the input embeddings needs). ``exact`` says
        where the caller needs HF's values: None (real tokens only), "first" (position 0 of
        every row: [CLS] pooling), "all", or a (batch, seq) bool tensor (labels that count)."""
        batch, seq = self._check_inputs(input_ids, inputs_embeds)
        _check_position_ids_shape(position_ids, batch, seq)
        if tracing():
            # Under a tracer no host sync (no value checks): the padded computation, unless
            # torch.compile allows data-dependent sizes (the number of real tokens a symbol), no
            # padding position needs HF's values (exact None: no rows to pool or labels there, and
            # an all-padding row gets zeros) and the batch is on the CPU (on CUDA the sync that
            # sizes it would keep CUDA graphs off). The packed entry point traces without a sync.
            if (compiling_with_dynamic_shapes() and pack and exact is None and not output_attentions
                    and attention_mask is not None and attention_mask.device.type == "cpu"
                    and not has_hooks_below(self)):
                return compiled_packing_of(_as_keep_mask(attention_mask))
            return None
        if attention_mask is None:
            checks = self._value_checks(input_ids, position_ids)  # [(flag, describe)], on the device
            _raise_failed(checks, _read([flag for flag, _ in checks]))  # the one sync
            return None
        if not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"attention_mask must have shape (batch, seq) = {(batch, seq)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must hold 0/1 (or bool), got dtype {attention_mask.dtype}")
        keep = _as_keep_mask(attention_mask)
        lengths = keep.sum(dim=1)
        if isinstance(exact, torch.Tensor):
            if exact.numel() != batch * seq:  # (HF's token losses read labels.view(-1))
                raise ValueError(f"labels must hold one label per token of input_ids (batch, seq) = "
                                 f"{(batch, seq)}, got shape {tuple(exact.shape)}")
            exact_padding = (exact.reshape(batch, seq) & ~keep).any()
        elif exact == "first":
            exact_padding = (~keep[:, 0]).any()
        else:
            exact_padding = torch.tensor(exact == "all", device=keep.device)
        not_binary = torch.zeros((), dtype=torch.bool, device=keep.device)
        if attention_mask.dtype != torch.bool:
            not_binary = ((attention_mask != 0) & (attention_mask != 1)).any()
        stats = torch.stack([not_binary.long(), lengths.sum(), lengths.max(), lengths.min(),
                             exact_padding.long()])
        checks = self._value_checks(input_ids, position_ids)
        values = _read([stats, *(flag.to(stats.device) for flag, _ in checks)])  # the one sync
        _raise_failed(checks, values[1:])
        not_binary, total, max_seqlen, min_seqlen, exact_padding = values[0]
        if not_binary:
            raise ValueError(
                "attention_mask must hold only 0 and 1 (1 = real token, 0 = padding), got other "
                "values; an additive mask (0 / -inf or -1e9) is not accepted: pass the 0/1 mask "
                "the tokenizer returns"
            )
        if (not pack or output_attentions or total == batch * seq or min_seqlen == 0 or exact_padding
                or has_hooks_below(self)):
            return None
        return packing_of(keep, total, max_seqlen)

    def _value_checks(self, input_ids, position_ids) -> list:
        """The device-side checks a padded forward reads in its one sync: input_ids and
        position_ids in range, then the deferred checks of earlier packed forwards."""
        config, checks = self.config, []
        for name, ids, upper in (("input_ids", input_ids, config.vocab_size),
                                 ("position_ids", position_ids, config.max_position_embeddings)):
            if ids is not None:
                _check_id_dtype(name, ids)
                if ids.numel():
                    checks.append((ids_flag(ids, upper), describe_ids(name, upper)))
        deferred = getattr(self, "_deferred_checks", None)
        if deferred is not None:
            checks += [(flag, lambda bad, d=describe: deferred_message(d(bad)))
                       for flag, describe in deferred.take()]
        return checks

    def _check_inputs(self, input_ids, inputs_embeds) -> tuple[int, int]:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor):
                raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
            if input_ids.dim() != 2:
                raise ValueError(
                    f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}"
                )
            _check_id_dtype("input_ids", input_ids)  # the values: in plan_packing's one sync
            batch, seq = input_ids.shape
        else:
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError("inputs_embeds must be a floating-point torch.Tensor")
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.dim:
                raise ValueError(
                    f"inputs_embeds must have shape (batch, seq, {self.config.dim}), "
                    f"got {tuple(inputs_embeds.shape)}"
                )
            batch, seq = inputs_embeds.shape[:2]
        if seq > self.config.max_position_embeddings:
            raise ValueError(
                f"sequence length {seq} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; truncate the input"
            )
        if seq == 0:
            raise ValueError("input sequence length must be at least 1, got 0")
        if batch == 0:  # (else an error from deep inside an op, or a reduction over no rows)
            name, shape = ("input_ids", input_ids.shape) if input_ids is not None else ("inputs_embeds", inputs_embeds.shape)
            raise ValueError(f"{name} must hold at least one sequence (batch >= 1), got shape {tuple(shape)}")
        return batch, seq

    def _layer_head_masks(self, head_mask):
        """head_mask (heads,) or (layers, heads) -> (layers, heads) in the model's dtype, or None."""
        if head_mask is None:
            return None
        layers, heads = self.config.n_layers, self.config.n_heads
        if not isinstance(head_mask, torch.Tensor):
            raise TypeError(f"head_mask must be a torch.Tensor, got {type(head_mask).__name__}")
        if head_mask.dim() == 1 and head_mask.shape[0] == heads:
            head_mask = head_mask.unsqueeze(0).expand(layers, heads)
        elif tuple(head_mask.shape) != (layers, heads):
            raise ValueError(
                f"head_mask must have shape ({heads},) or ({layers}, {heads}), "
                f"got {tuple(head_mask.shape)}"
            )
        return head_mask.to(self.dtype)


def _as_keep_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """attention_mask (nonzero = real token) -> bool, True = real token."""
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0


def has_hooks_below(base: nn.Module) -> bool:
    """Whether a call of the ``base`` model would run a hook inside it: a forward, forward-pre or
    backward hook on a module below it (its own fire around our forward alike), or a global
    hook; enable_input_require_grads' hook aside."""
    return _global_hooks() or _hooks_in(list(base._modules.values()))


def _hooks_in(stack: list, stop: nn.Module | None = None) -> bool:
    """Whether a hook (see _hooked) sits on a module of ``stack`` or below one (not below
    ``stop``). A plain walk over _modules (a quarter of Module.modules()' time), which runs every
    call, with _hooked's four dicts read inline first (most modules have none)."""
    while stack:
        m = stack.pop()
        if m is None:
            continue
        if (m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or m._forward_hooks
                or _ACCELERATE_HOOK in m.__dict__) and _hooked(m):
            return True
        if m is not stop:
            stack.extend(m._modules.values())
    return False


_torch_module = nn.modules.module  # (one name to look up: the checks run a dozen times a layer)


def _global_hooks() -> bool:
    """Whether a global module hook is registered (torch.nn.modules.module's
    register_module_forward_hook, ..._forward_pre_hook, ..._full_backward_hook,
    ..._full_backward_pre_hook): it fires on every module call."""
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


# accelerate's hooks (cpu_offload, disk_offload, dispatch_model with offloaded or split layers)
# are no torch hooks: add_hook_to_module wraps the module's forward, whose pre_forward loads
# offloaded weights (on the meta device until then) and moves inputs to the execution device.
_ACCELERATE_HOOK = "_hf_hook"


def _hooked(m: nn.Module) -> bool:
    """Whether a forward, forward-pre or backward hook sits on ``m`` itself (global hooks aside),
    enable_input_require_grads' hook aside, or an accelerate hook (the module must then be
    called for its weights to be in place)."""
    return bool(m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or _ACCELERATE_HOOK in m.__dict__ or (
        m._forward_hooks and not all(map(_only_requires_grad, m._forward_hooks.values()))))


def _only_requires_grad(hook) -> bool:
    """The enable_input_require_grads hook of transformers' model or ours, or PEFT's copy of it:
    ``output.requires_grad_(True)``, the same on any layout."""
    return (getattr(hook, "__name__", None) in ("make_inputs_require_grads", "make_inputs_require_grad")
            and getattr(hook, "__module__", "").split(".")[0] in ("transformers", "peft", "distilbert_fast"))


def pad_output(out: BaseModelOutput, packing: Packing) -> BaseModelOutput:
    """A packed BaseModelOutput scattered back to the padded layout (zeros at padding)."""
    hidden_states = out.hidden_states
    if hidden_states is not None:
        hidden_states = tuple(packing.pad(h) for h in hidden_states)
    return BaseModelOutput(packing.pad(out.last_hidden_state), hidden_states, out.attentions)


def _check_position_ids_shape(position_ids, batch: int, seq: int) -> None:
    """position_ids of a padded batch: (seq,), (1, seq), (batch, seq) or another shape that
    broadcasts to (batch, seq), as HF's embeddings take them; a ValueError otherwise."""
    if not isinstance(position_ids, torch.Tensor):
        return  # None, or not a tensor: _check_id_dtype names it
    try:
        fits = position_ids.dim() <= 2 and torch.broadcast_shapes(position_ids.shape, (batch, seq)) == (batch, seq)
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"position_ids must have shape (batch, seq) = {(batch, seq)} or broadcast to it "
                         f"(e.g. (1, seq)), got {tuple(position_ids.shape)}")


def _check_id_dtype(name: str, ids) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (torch.long), got {ids.dtype}")


def _check_ids(name: str, ids: torch.Tensor, upper: int) -> None:
    """ids must be an integer tensor with values in [0, upper): checked here, so a bad id is a
    ValueError rather than an index error on CPU or a device-side assert on GPU (one sync on a
    GPU: the model's own paths fold this check into their one sync, or defer it)."""
    _check_id_dtype(name, ids)
    if ids.numel() == 0 or tracing():
        return  # a tracer cannot branch on the values: the traced graph runs unchecked
    failed, bad = ids_flag(ids, upper).tolist()  # one device sync
    if failed:
        raise ValueError(id_range_message(name, upper, bad))


def _read(tensors: list[torch.Tensor]) -> list[list[int]]:
    """The values of small int64 tensors on one device, read in one sync (none if empty)."""
    if not tensors:
        return []
    sizes = [t.numel() for t in tensors]
    flat = torch.cat([t.reshape(-1) for t in tensors]).tolist()
    out, start = [], 0
    for n in sizes:
        out.append(flat[start:start + n])
        start += n
    return out


def _raise_failed(checks: list, values: list[list[int]]) -> None:
    """The first failed check of ``checks`` [(flag, describe)], given the flags' host values."""
    for (_, describe), (failed, detail) in zip(checks, values):
        if failed:
            raise ValueError(describe(detail))


# Set by a task head around its base model call once plan_packing has checked the batch (its one
# sync), so the base model does not check (or sync) again.
_inputs_checked = contextvars.ContextVar("distilbert_fast_inputs_checked", default=False)


# -- task heads ----------------------------------------------------------------------------------


class Encoded:
    """The base model's output as a task head sees it: rows of packed tokens (total, dim) when
    ``cu_seqlens`` is set, else the padded (batch, seq, dim). ``packing`` is set when the caller
    passed a padded batch that ran packed: the head's token outputs go back through ``tokens_out``
    and its token labels through ``token_labels``."""

    def __init__(self, out: BaseModelOutput, cu_seqlens=None, packing: Packing | None = None):
        self.out, self.packing = out, packing
        self.hidden = out.last_hidden_state
        self.cu_seqlens = None if cu_seqlens is None else cu_seqlens.to(self.hidden.device, non_blocking=True)

    def first_tokens(self) -> torch.Tensor:
        return first_tokens(self.hidden, self.cu_seqlens)

    def token_labels(self, labels):
        if self.packing is None or labels is None:
            return labels
        return self.packing.unpad(labels.reshape(-1, self.packing.seq))  # (flat labels too, as HF takes them)

    def tokens_out(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.packing is None else self.packing.pad(t)

    @property
    def hidden_states(self):
        states = self.out.hidden_states
        if self.packing is None or states is None:
            return states
        return tuple(self.packing.pad(h) for h in states)

    @property
    def attentions(self):
        return self.out.attentions


def first_tokens(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(batch, dim): each sequence's first ([CLS]) token of padded (batch, seq, dim) states, or of
    packed (total, dim) ones whose sequences ``cu_seqlens`` delimits (an empty packed sequence
    gets a neighbour's: its pooled output means nothing)."""
    if cu_seqlens is None:
        return hidden[:, 0]
    return hidden.index_select(0, cu_seqlens[:-1].long().clamp(max=hidden.shape[0] - 1))


def _encode(model, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
            output_hidden_states, position_ids, cu_seqlens, max_seqlen, exact=None) -> Encoded:
    """Runs ``model.distilbert`` for a task head: on packed input as given; on a padded batch
    packed when the base model's plan allows it and padding is nowhere in ``exact`` (where the
    head needs HF's values; see DistilBertModel.plan_packing), else padded."""
    base = model.distilbert
    if cu_seqlens is not None or max_seqlen is not None:
        out = base(input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                   output_hidden_states, return_dict=True, position_ids=position_ids,
                   cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        total = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        channels = parallel_channels_of(out.last_hidden_state.shape[0], total)  # (adapters.Parallel)
        return Encoded(out, widen_cu_seqlens(cu_seqlens, channels, total))
    attentions = model.config.output_attentions if output_attentions is None else output_attentions
    if _head_hooked(model, base):
        exact = "all"  # a hook on the head's modules or the base model sees HF's (batch, seq, ...) tensors
    packing = base.plan_packing(input_ids, attention_mask, inputs_embeds, attentions, exact=exact,
                                position_ids=position_ids)  # the forward's one sync
    args = (base, packing, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
            output_hidden_states, position_ids)
    if tracing():  # nothing is checked while tracing anyway (and dynamo need not see the flag)
        return _encode_planned(*args)
    token = _inputs_checked.set(True)  # the base model call below: inputs already checked
    try:
        return _encode_planned(*args)
    finally:
        _inputs_checked.reset(token)


def _encode_planned(base, packing, input_ids, attention_mask, head_mask, inputs_embeds,
                    output_attentions, output_hidden_states, position_ids) -> Encoded:
    if packing is None:  # (by keyword, as transformers' heads call theirs: what a hook with_kwargs sees)
        out = base(input_ids=input_ids, attention_mask=attention_mask, head_mask=head_mask,
                   inputs_embeds=inputs_embeds, output_attentions=output_attentions,
                   output_hidden_states=output_hidden_states, return_dict=True, position_ids=position_ids,
                   pack=False)
        return Encoded(out)
    if position_ids is None:
        position_ids = base.embeddings.position_ids[:, : packing.seq]
    out = base(
        None if input_ids is None else packing.unpad(input_ids),
        None,
        head_mask,
        None if inputs_embeds is None else packing.unpad(inputs_embeds),
        output_attentions,
        output_hidden_states,
        return_dict=True,
        position_ids=packing.unpad(position_ids),
        cu_seqlens=packing.cu_seqlens,
        max_seqlen=packing.max_seqlen,
    )
    packing = widen_packing(packing, parallel_channels_of(out.last_hidden_state.shape[0], packing.total))
    return Encoded(out, packing.cu_seqlens, packing)


def _head_hooked(model: nn.Module, base: nn.Module) -> bool:
    """Whether a hook watches a module of task model ``model`` outside its ``base`` model, or the
    base model itself (the modules below it: see has_hooks_below), or any module (a global hook)."""
    return _global_hooks() or _hooks_in(list(model._modules.values()), stop=base)


def _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, tokens=(), sequences=()) -> None:
    """Packed input (cu_seqlens given): each (name, labels) of ``tokens`` must hold one label per
    packed token, each of ``sequences`` one entry per sequence; a ValueError naming it, not a
    loss's shape error (padded labels passed with packed ids, say)."""
    if cu_seqlens is None:
        return
    total = (input_ids if input_ids is not None else inputs_embeds).shape[0]
    batch = cu_seqlens.shape[0] - 1
    for name, labels in tokens:
        if isinstance(labels, torch.Tensor) and labels.numel() != total:
            raise ValueError(f"{name} must hold one label per packed token, shape ({total},), with "
                             f"cu_seqlens, got shape {tuple(labels.shape)}")
    for name, labels in sequences:
        if isinstance(labels, torch.Tensor) and (labels.dim() == 0 or labels.shape[0] != batch):
            raise ValueError(f"{name} must hold one entry per sequence, shape ({batch}, ...), with "
                             f"cu_seqlens of {batch} sequences, got shape {tuple(labels.shape)}")


def _empty_labelled_message(sequence: int) -> str:
    return (f"labels must not count for an empty sequence (cu_seqlens[b] == cu_seqlens[b + 1]), found "
            f"sequence {sequence}: it has no token to pool, so its logits mean nothing (a padded "
            "batch's fully padded row would pool its padding, which packed input does not hold); "
            "leave it out of cu_seqlens and labels, or label it -100 (single-label classification "
            "ignores it)")


def _check_no_empty_labelled_sequence(base, cu_seqlens, counted) -> None:
    """ValueError naming labels where a sequence of packed input has no token but its label
    counts in the loss (``counted``: (batch,) bool, None when every label counts). With
    cu_seqlens and labels on the CPU it is checked at once; on a GPU a device-side flag reported
    at the next sync (deferred_checks), so the forward never waits; skipped while tracing."""
    if tracing():
        return
    cu = cu_seqlens if counted is None else cu_seqlens.to(counted.device, non_blocking=True)
    bad = cu[1:] == cu[:-1]  # (batch,): empty sequences
    if counted is not None:
        bad = bad & counted
    if bad.device.type == "cpu":
        if bad.any():
            raise ValueError(_empty_labelled_message(int(bad.nonzero()[0, 0])))
        return
    flag = torch.stack([bad.any().long(), bad.long().argmax()])
    base._deferred().record("labels", flag, _empty_labelled_message)


def _counted(labels, ignore_index=-100):
    """Where token labels count in a loss (None without labels): those positions must be HF's."""
    return None if labels is None else labels != ignore_index


class DistilBertForMaskedLM(DistilBertPreTrainedModel):
    _token_outputs = True
    _tied_weights_keys = {"vocab_projector.weight": "distilbert.embeddings.word_embeddings.weight"}

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.activation = Activation(config.activation)
        self.distilbert = DistilBertModel(self.config)
        self.vocab_transform = nn.Linear(config.dim, config.dim)
        self.vocab_layer_norm = nn.LayerNorm(config.dim, eps=LAYER_NORM_EPS)
        self.vocab_projector = nn.Linear(config.dim, config.vocab_size)
        self.post_init()
        self.mlm_loss_fct = nn.CrossEntropyLoss()

    def get_output_embeddings(self) -> nn.Linear:
        return self.vocab_projector

    def set_output_embeddings(self, new_embeddings: nn.Linear):
        self.vocab_projector = new_embeddings

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        enc = _encode(self, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                      output_hidden_states, position_ids, cu_seqlens, max_seqlen, exact=_counted(labels))
        _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, tokens=[("labels", labels)])
        hidden, backend = enc.hidden, self.config.backend  # (batch, seq, dim), or packed (total, dim)
        if _watched(self.activation) or _offloaded(self.vocab_transform):
            # the activation as its module, on vocab_transform's output, bias included
            hidden = self.activation(_project(self.vocab_transform, hidden, backend))
        else:
            hidden = bias_activation(_project_without_bias(self.vocab_transform, hidden, backend),
                                     bias_of(self.vocab_transform), self.activation.name, backend=backend)
        hidden = _layer_norm(self.vocab_layer_norm, hidden, None, backend)
        logits = _project(self.vocab_projector, hidden, backend)  # (..., vocab_size)
        loss = None
        if labels is not None:
            loss = self.mlm_loss_fct(logits.view(-1, logits.size(-1)), enc.token_labels(labels).reshape(-1))
        output = MaskedLMOutput(loss, enc.tokens_out(logits), enc.hidden_states, enc.attentions)
        return _finish(output, return_dict)


class DistilBertForSequenceClassification(DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(self.config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        enc = _encode(self, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                      output_hidden_states, position_ids, cu_seqlens, max_seqlen, exact="first")
        _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, sequences=[("labels", labels)])
        logits = _pool_and_classify(self, enc.first_tokens())  # (batch, num_labels)
        loss = None
        if labels is not None:
            self._infer_problem_type(labels)
            if enc.cu_seqlens is not None and enc.packing is None:  # packed input
                # a label counts unless cross-entropy ignores it
                counted = (labels.reshape(-1) != -100
                           if self.config.problem_type == "single_label_classification" else None)
                _check_no_empty_labelled_sequence(self.distilbert, cu_seqlens, counted)
            loss = self._loss(logits, labels)
        return _finish(SequenceClassifierOutput(loss, logits, enc.hidden_states, enc.attentions), return_dict)

    def _infer_problem_type(self, labels):
        """HuggingFace's rule: infer problem_type once, and record it in the config."""
        if self.config.problem_type is None:
            if self.num_labels == 1:
                self.config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                self.config.problem_type = "single_label_classification"
            else:
                self.config.problem_type = "multi_label_classification"

    def _loss(self, logits, labels):
        """MSE, cross-entropy or BCE-with-logits, as config.problem_type says (HF's; forward
        infers it first)."""
        if self.config.problem_type == "regression":
            if self.num_labels == 1:
                return F.mse_loss(logits.squeeze(), labels.squeeze())
            return F.mse_loss(logits, labels)
        if self.config.problem_type == "single_label_classification":
            return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return F.binary_cross_entropy_with_logits(logits, labels)


def span_loss(start_logits, end_logits, start_positions=None, end_positions=None):
    """HuggingFace's question-answering loss: the mean of the start and end cross-entropies, with
    positions outside the sequence clamped to seq_len, which the loss ignores. None without labels."""
    if start_positions is None or end_positions is None:
        return None
    if start_positions.dim() > 1:
        start_positions = start_positions.squeeze(-1)
    if end_positions.dim() > 1:
        end_positions = end_positions.squeeze(-1)
    ignored = start_logits.size(1)
    start_positions = start_positions.clamp(0, ignored)
    end_positions = end_positions.clamp(0, ignored)
    return (
        F.cross_entropy(start_logits, start_positions, ignore_index=ignored)
        + F.cross_entropy(end_logits, end_positions, ignore_index=ignored)
    ) / 2


def packed_span_loss(start_logits, end_logits, start_positions, end_positions, cu_seqlens, max_seqlen):
    """span_loss for packed logits (total,): each sequence's positions count from its first
    token; positions outside [0, len) are clamped to [0, len] and len is ignored, as span_loss
    does per row. None without labels."""
    if start_positions is None or end_positions is None:
        return None
    total, batch = start_logits.shape[0], cu_seqlens.shape[0] - 1
    index = varlen_to_padded_index(cu_seqlens, total, max_seqlen)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()

    def loss(logits, positions):
        # (batch, max_seqlen), the lowest value past each sequence's end: softmax weight 0
        rows = logits.new_full((batch * max_seqlen,), torch.finfo(logits.dtype).min)
        rows = rows.index_copy(0, index, logits).view(batch, max_seqlen)
        positions = torch.minimum(positions.reshape(-1).clamp(min=0), lengths)
        positions = positions.masked_fill(positions == lengths, -100)
        return F.cross_entropy(rows, positions, ignore_index=-100)

    return (loss(start_logits, start_positions) + loss(end_logits, end_positions)) / 2


class DistilBertForQuestionAnswering(DistilBertPreTrainedModel):
    _token_outputs = True

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        if config.num_labels != 2:
            raise ValueError(f"config.num_labels must be 2 for question answering, got {config.num_labels}")
        self.distilbert = DistilBertModel(self.config)
        self.qa_outputs = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.qa_dropout)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                start_positions=None, end_positions=None, output_attentions=None,
                output_hidden_states=None, return_dict=None, position_ids=None, cu_seqlens=None,
                max_seqlen=None):
        """On packed input, start/end positions count from each sequence's first token and each
        sequence's loss is over its own tokens."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        # HF's loss normalises over every position, padding too: with labels, no padding is skipped
        labelled = start_positions is not None and end_positions is not None
        enc = _encode(self, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                      output_hidden_states, position_ids, cu_seqlens, max_seqlen,
                      exact="all" if labelled else None)
        _check_packed_labels(cu_seqlens, input_ids, inputs_embeds,
                             sequences=[("start_positions", start_positions), ("end_positions", end_positions)])
        hidden = self.dropout(enc.hidden)  # (batch, seq, dim), or packed (total, dim)
        logits = self.qa_outputs(hidden)  # (..., 2)
        # (index_select, not split + contiguous: a contiguity check of the strided view makes
        # torch.export guard that the number of tokens is not 1)
        start_logits, end_logits = (logits.index_select(-1, logits.new_tensor([i], dtype=torch.long)).squeeze(-1)
                                    for i in (0, 1))
        if enc.cu_seqlens is not None and enc.packing is None:
            loss = packed_span_loss(start_logits, end_logits, start_positions, end_positions,
                                    enc.cu_seqlens, max_seqlen)
        else:
            loss = span_loss(start_logits, end_logits, start_positions, end_positions)
        result = QuestionAnsweringModelOutput(loss, enc.tokens_out(start_logits), enc.tokens_out(end_logits),
                                              enc.hidden_states, enc.attentions)
        return _finish(result, return_dict)


class DistilBertForTokenClassification(DistilBertPreTrainedModel):
    _token_outputs = True

    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(self.config)
        self.dropout = nn.Dropout(config.dropout)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None):
        return_dict = self.config.return_dict if return_dict is None else return_dict
        enc = _encode(self, input_ids, attention_mask, head_mask, inputs_embeds, output_attentions,
                      output_hidden_states, position_ids, cu_seqlens, max_seqlen, exact=_counted(labels))
        _check_packed_labels(cu_seqlens, input_ids, inputs_embeds, tokens=[("labels", labels)])
        logits = self.classifier(self.dropout(enc.hidden))  # (..., num_labels)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.view(-1, self.num_labels), enc.token_labels(labels).reshape(-1))
        output = TokenClassifierOutput(loss, enc.tokens_out(logits), enc.hidden_states, enc.attentions)
        return _finish(output, return_dict)


class DistilBertForMultipleChoice(DistilBertPreTrainedModel):
    def __init__(self, config: DistilBertConfig):
        super().__init__(config)
        self.distilbert = DistilBertModel(self.config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, 1)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, head_mask=None, inputs_embeds=None,
                labels=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                position_ids=None, cu_seqlens=None, max_seqlen=None):
        """input_ids, attention_mask: (batch, num_choices, seq); inputs_embeds: (batch,
        num_choices, seq, dim). Packed input is not taken (the choices' grouping would be lost);
        a padded batch runs packed inside where it can."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        if cu_seqlens is not None or max_seqlen is not None:
            raise ValueError("DistilBertForMultipleChoice takes padded (batch, num_choices, seq) input; "
                             "cu_seqlens / max_seqlen (packed input) are not supported")
        first = input_ids if input_ids is not None else inputs_embeds
        if first is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        expected_dims = 3 if input_ids is not None else 4
        if first.dim() != expected_dims:
            name = "input_ids" if input_ids is not None else "inputs_embeds"
            raise ValueError(
                f"{name} must have {expected_dims} dims (batch, num_choices, seq"
                f"{'' if expected_dims == 3 else ', dim'}), got {tuple(first.shape)}"
            )
        num_choices = first.shape[1]
        enc = _encode(self, _merge_choices(input_ids, 2), _merge_choices(attention_mask, 2), head_mask,
                      _merge_choices(inputs_embeds, 3), output_attentions, output_hidden_states,
                      _merge_choices(position_ids, 2), None, None, exact="first")
        logits = _pool_and_classify(self, enc.first_tokens()).view(-1, num_choices)  # (batch, num_choices)
        loss = None if labels is None else F.cross_entropy(logits, labels)
        return _finish(MultipleChoiceModelOutput(loss, logits, enc.hidden_states, enc.attentions), return_dict)


def _merge_choices(t, model_dims):
    """(batch, num_choices, ...) -> (batch * num_choices, ...); tensors already of the model's
    rank (e.g. a broadcastable (1, seq) position_ids) pass through."""
    if t is None or t.dim() <= model_dims:
        return t
    return t.reshape(-1, *t.shape[2:])


def _pool_and_classify(head: nn.Module, first_tokens: torch.Tensor) -> torch.Tensor:
    """The [CLS] pooling shared by sequence classification and multiple choice: each sequence's
    first token (batch, dim) -> pre_classifier -> ReLU -> dropout -> classifier."""
    pooled = F.relu(head.pre_classifier(first_tokens))  # (batch, dim)
    return head.classifier(head.dropout(pooled))


def _finish(output, return_dict: bool):
    return output if return_dict else output.to_tuple()


__all__ = [
    "DistilBertPreTrainedModel",
    "DistilBertModel",
    "DistilBertForMaskedLM",
    "DistilBertForSequenceClassification",
    "DistilBertForQuestionAnswering",
    "DistilBertForTokenClassification",
    "DistilBertForMultipleChoice",
    "sinusoidal_embeddings",
]
