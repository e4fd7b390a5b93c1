"""Adapters for DistilBERT, as the AdapterHub ``adapters`` package (1.3) defines them.

    bottleneck adapters   BnConfig, with the presets "seq_bn" ("pfeiffer") and "double_seq_bn"
                          ("houlsby"): a down-projection, a non-linearity and an up-projection
                          after the attention sublayer (mh_adapter) and/or the FFN (output_adapter)
    LoRA                  LoRAConfig ("lora"): low-rank updates of q_lin / k_lin / v_lin, which
                          ``merge_adapter`` folds into the weights
    composition           Stack("a", "b"): adapters applied one after the other;
                          Parallel("a", "b"): side by side, the batch replicated at the first
                          layer holding one of them (bottleneck adapters, par_bn and LoRA);
                          Fuse("a", "b"): AdapterFusion of bottleneck adapters (add_adapter_fusion),
                          alone or in the outer Stack; Split("a", "b", splits=[4, 60]): parts of
                          each sequence through each; BatchSplit("a", "b", batch_sizes=[2, 3]):
                          rows of the batch through each (bottleneck adapters and LoRA);
                          Average("a", "b", weights=[...]): the children's outputs averaged;
                          MultiTask("a", "b") with forward(task_ids=...): each row through its
                          task's child
    files                 adapter_config.json + pytorch_adapter.bin (or adapter.safetensors),
                          with that package's key names, so adapters move between the two

The arithmetic follows that package step for step (where the bottleneck sits, the residual and
the block's LayerNorm, scaling, initialisation, LoRA's alpha / r); tests/adapters_oracle checks it
against the package itself. Where the package's layout allows, the work runs on the fast ops:
an adapter's residual and the block's LayerNorm go through ``residual_layernorm``, its
down-projection's activation through ``bias_activation``.

Modules live in the base model under the package's names:
``transformer.layer.<i>.attention_adapters.adapters.<name>`` (mh_adapter),
``transformer.layer.<i>.output_adapters.adapters.<name>`` (output_adapter) and
``transformer.layer.<i>.attention.{q,k,v}_lin.loras.<name>``. The model-level API
(``add_adapter``, ``train_adapter``, ``save_adapter`` ... and ``adapter_names=`` in forward) is
``ModelAdaptersMixin``, a base of every model class.
"""

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import threading
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .ops import bias_activation, residual_layernorm
from .ops.eager import ACTIVATIONS as OP_ACTIVATIONS
from .tracing import tracing

logger = logging.getLogger("distilbert_fast.adapters")

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "pytorch_adapter.bin"
ADAPTER_SAFE_WEIGHTS_NAME = "adapter.safetensors"
# the head saved with an adapter (a flexible head of DistilBertAdapterModel, or a task class's head)
HEAD_CONFIG_NAME = "head_config.json"
HEAD_WEIGHTS_NAME = "pytorch_model_head.bin"
HEAD_SAFE_WEIGHTS_NAME = "model_head.safetensors"
ADAPTER_SETUP_CONFIG_NAME = "adapter_setup.json"  # save_adapter_setup's

# The module-name fragments under which each adapter's weights live (the package's filter).
_WEIGHT_GROUPS = ("attention_adapters.adapters", "output_adapters.adapters", "loras")


# -- configurations ------------------------------------------------------------------------------


class AdapterConfig(Mapping):
    """Base of the adapter configurations: a frozen dataclass that reads like a dict, as in the
    ``adapters`` package (``config["reduction_factor"]``, ``config.to_dict()``)."""

    architecture: str | None = None

    def __getitem__(self, key):
        return self.__dict__[key]

    def __iter__(self):
        return iter(self.__dict__)

    def __len__(self):
        return len(self.__dict__)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "AdapterConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, config: Mapping) -> "AdapterConfig":
        """A config from a dict (e.g. adapter_config.json's "config"); the class is chosen by its
        "architecture" key (None: bottleneck, "lora": LoRA)."""
        if isinstance(config, AdapterConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"adapter config must be a dict or AdapterConfig, got {type(config).__name__}")
        architecture = config.get("architecture")
        target = {None: BnConfig, "bottleneck": BnConfig, "lora": LoRAConfig}.get(architecture)
        if target is None:
            raise ValueError(
                f"adapter architecture {architecture!r} is not supported by distilbert_fast; "
                "supported: bottleneck adapters (architecture None) and 'lora'"
            )
        if cls not in (AdapterConfig, target):
            raise ValueError(f"config with architecture {architecture!r} is not a {cls.__name__}")
        names = {f.name for f in dataclasses.fields(target)}
        values = {k: v for k, v in config.items() if k != "architecture" or target is LoRAConfig}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown {target.__name__} keys {unknown}")
        return target(**values)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_unsupported(config, defaults: dict[str, Any]):
    """The package's options we do not implement must keep their default value."""
    for key, default in defaults.items():
        if getattr(config, key) != default:
            raise NotImplementedError(
                f"{type(config).__name__}.{key}={getattr(config, key)!r} is not supported by "
                f"distilbert_fast (only {default!r})"
            )


# Activations a bottleneck may use, by the package's names (transformers' ACT2FN, lower-cased).
ADAPTER_ACTIVATIONS = ("relu", "gelu", "gelu_new", "swish", "silu", "tanh", "sigmoid", "leakyrelu", "linear")


@dataclasses.dataclass(frozen=True, eq=True)
class BnConfig(AdapterConfig):
    """A bottleneck adapter, with the ``adapters`` package's fields and defaults.

    mh_adapter / output_adapter: place an adapter after the attention sublayer / after the FFN.
    reduction_factor: hidden size / bottleneck size (> 0), or a mapping from layer index (as a
    string) to factor with a "default" entry. non_linearity: the bottleneck's activation.
    original_ln_before: add the residual and apply the block's LayerNorm before the adapter.
    original_ln_after: add the residual and apply the block's LayerNorm after it.
    residual_before_ln: the adapter's own residual is taken before that first LayerNorm (True),
    after it (False), or after the residual sum ("post_add").
    ln_before / ln_after: a new LayerNorm before / after the bottleneck;
    adapter_residual_before_ln: add the adapter residual before ln_after.
    init_weights: "bert", "mam_adapter" or "houlsby"; scaling: a float, "learned" or "channel".
    leave_out: layer indices without this adapter. dropout: on the up-projection's output.
    """

    mh_adapter: bool
    output_adapter: bool
    reduction_factor: float | Mapping
    non_linearity: str
    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    init_weights: str = "bert"
    init_weights_seed: int | None = None
    is_parallel: bool = False
    scaling: float | str = 1.0
    use_gating: bool = False
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    inv_adapter: str | None = None
    inv_adapter_reduction_factor: float | None = None
    cross_adapter: bool = False
    leave_out: list = dataclasses.field(default_factory=list)
    dropout: float = 0.0
    phm_layer: bool = False
    phm_dim: int = 4
    factorized_phm_W: bool | None = True
    shared_W_phm: bool | None = False
    shared_phm_rule: bool | None = True
    factorized_phm_rule: bool | None = False
    phm_c_init: str | None = "normal"
    phm_init_range: float | None = 0.0001
    learn_phm: bool | None = True
    hypercomplex_nonlinearity: str | None = "glorot-uniform"
    phm_rank: int | None = 1
    phm_bias: bool | None = True
    stochastic_depth: float | None = 0.0

    def __post_init__(self):
        factors = self.reduction_factor
        if isinstance(factors, Mapping):
            if "default" not in factors:
                raise ValueError(
                    "reduction_factor mapping must have a 'default' entry, e.g. {'1': 8, 'default': 16}, "
                    f"got {dict(factors)!r}"
                )
            factors = factors.values()
        else:
            factors = [factors]
        for factor in factors:
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
                raise ValueError(f"reduction_factor must be a number > 0, got {factor!r}")
        _check_choice("non_linearity", str(self.non_linearity).lower(), ADAPTER_ACTIVATIONS)
        _check_choice("init_weights", self.init_weights, ("bert", "mam_adapter", "houlsby"))
        _check_choice("residual_before_ln", self.residual_before_ln, (True, False, "post_add"))
        if self.residual_before_ln == "post_add" and not self.original_ln_before:
            raise ValueError("residual_before_ln='post_add' needs original_ln_before=True")
        if not (isinstance(self.scaling, (int, float)) or self.scaling in ("learned", "channel")):
            raise ValueError(f"scaling must be a float, 'learned' or 'channel', got {self.scaling!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        _check_unsupported(
            self,
            {"use_gating": False, "inv_adapter": None, "phm_layer": False, "stochastic_depth": 0.0},
        )
        if not (self.mh_adapter or self.output_adapter):
            raise ValueError("a bottleneck config needs mh_adapter=True or output_adapter=True")


@dataclasses.dataclass(frozen=True, eq=True)
class SeqBnConfig(BnConfig):
    """Pfeiffer et al. (2020): one adapter after the FFN, between two applications of the
    block's LayerNorm (the package's "seq_bn", formerly "pfeiffer")."""

    original_ln_before: bool = True
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping = 16


@dataclasses.dataclass(frozen=True, eq=True)
class DoubleSeqBnConfig(BnConfig):
    """Houlsby et al. (2019): adapters after attention and after the FFN, each before the
    block's residual + LayerNorm (the package's "double_seq_bn", formerly "houlsby")."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    residual_before_ln: bool | str = True
    adapter_residual_before_ln: bool = False
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = True
    output_adapter: bool = True
    non_linearity: str = "swish"
    reduction_factor: float | Mapping = 16


@dataclasses.dataclass(frozen=True, eq=True)
class ParBnConfig(BnConfig):
    """He et al. (2021): an adapter beside the FFN, fed the FFN's input, its output added to the
    FFN's before the block's residual + LayerNorm (the package's "par_bn"; is_parallel=True)."""

    original_ln_before: bool = False
    original_ln_after: bool = True
    ln_before: bool = False
    ln_after: bool = False
    mh_adapter: bool = False
    output_adapter: bool = True
    non_linearity: str = "relu"
    reduction_factor: float | Mapping = 2
    init_weights: str = "mam_adapter"
    is_parallel: bool = True
    scaling: float | str = 4.0


@dataclasses.dataclass(frozen=True, eq=True)
class LoRAConfig(AdapterConfig):
    """LoRA (Hu et al., 2021) on the attention projections named in attn_matrices: the layer
    computes W x + b + (alpha / r) * B A dropout(x), with A (r, in) Kaiming-uniform and B zero at
    init ("lora"), or both normal(0, 0.02) ("bert")."""

    architecture: str | None = "lora"
    selfattn_lora: bool = True
    intermediate_lora: bool = False
    output_lora: bool = False
    leave_out: list = dataclasses.field(default_factory=list)
    r: int = 8
    alpha: int = 8
    dropout: float = 0.0
    attn_matrices: list = dataclasses.field(default_factory=lambda: ["q", "v"])
    composition_mode: str = "add"
    init_weights: str = "lora"
    init_weights_seed: int | None = None
    use_gating: bool = False
    use_dora: bool = False
    vera_d: float | None = None
    vera_b: float | None = None
    dtype: str | None = None

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r must be a positive int, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"alpha must be a number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [m for m in self.attn_matrices if m not in ("q", "k", "v")]
        if bad or not self.attn_matrices:
            raise ValueError(f"attn_matrices must be a non-empty subset of ['q', 'k', 'v'], got {self.attn_matrices!r}")
        _check_choice("init_weights", self.init_weights, ("lora", "bert"))
        # The FFN's lin1 / lin2 run as fused ops on their weights, not as modules: LoRA there
        # would be skipped silently, so it is refused instead.
        _check_unsupported(
            self,
            {"architecture": "lora", "selfattn_lora": True, "intermediate_lora": False,
             "output_lora": False, "composition_mode": "add", "use_gating": False,
             "use_dora": False, "vera_d": None, "vera_b": None, "dtype": None},
        )


ADAPTER_CONFIG_MAP: dict[str, AdapterConfig] = {
    "pfeiffer": SeqBnConfig(),
    "houlsby": DoubleSeqBnConfig(),
    "seq_bn": SeqBnConfig(),
    "double_seq_bn": DoubleSeqBnConfig(),
    "par_bn": ParBnConfig(),
    "scaled_par_bn": ParBnConfig(scaling="learned"),
    "lora": LoRAConfig(),
}
DEFAULT_ADAPTER_CONFIG = "seq_bn"


@dataclasses.dataclass(frozen=True, eq=True)
class AdapterFusionConfig(AdapterConfig):
    """AdapterFusion (Pfeiffer et al., 2021), the package's fields: attention over the fused
    adapters' outputs with a query / key / value projection each (or none), the query taken
    before or after the block's LayerNorm, the residual added to the values before or to the
    result after, a temperature annealed from 50 to 1 per forward, the value projection before or
    after the softmax and initialised to the identity; ``regularization`` adds
    get_fusion_regularization_loss's pull of the value projection towards the identity."""

    key: bool = True
    query: bool = True
    value: bool = True
    query_before_ln: bool = False
    regularization: bool = True
    residual_before: bool = False
    temperature: bool = False
    value_before_softmax: bool = True
    value_initialized: str | bool = True
    dropout_prob: float | None = None

    @classmethod
    def from_dict(cls, config: Mapping) -> "AdapterFusionConfig":
        if isinstance(config, AdapterFusionConfig):
            return config
        if not isinstance(config, Mapping):
            raise TypeError(f"fusion config must be a dict or AdapterFusionConfig, got {type(config).__name__}")
        names = {f.name for f in dataclasses.fields(AdapterFusionConfig)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"unknown AdapterFusionConfig keys {unknown}")
        return AdapterFusionConfig(**config)


@dataclasses.dataclass(frozen=True, eq=True)
class StaticAdapterFusionConfig(AdapterFusionConfig):
    """The package's "static" fusion: no value projection, no regularization."""

    value: bool = False
    regularization: bool = False
    value_initialized: str | bool = False


DynamicAdapterFusionConfig = AdapterFusionConfig  # the package's "dynamic" fusion (the default)
ADAPTERFUSION_CONFIG_MAP = {"static": StaticAdapterFusionConfig(), "dynamic": DynamicAdapterFusionConfig()}
DEFAULT_ADAPTERFUSION_CONFIG = "dynamic"
ADAPTERFUSION_CONFIG_NAME = "adapter_fusion_config.json"
ADAPTERFUSION_WEIGHTS_NAME = "pytorch_model_adapter_fusion.bin"
ADAPTERFUSION_SAFE_WEIGHTS_NAME = "model_adapter_fusion.safetensors"


def load_fusion_config(config) -> AdapterFusionConfig:
    """An AdapterFusionConfig from a preset name ("dynamic", "static"), a dict, or a config."""
    if config is None:
        config = DEFAULT_ADAPTERFUSION_CONFIG
    if isinstance(config, str):
        if config not in ADAPTERFUSION_CONFIG_MAP:
            raise ValueError(f"unknown fusion config {config!r}; presets: {sorted(ADAPTERFUSION_CONFIG_MAP)}")
        return ADAPTERFUSION_CONFIG_MAP[config]
    return AdapterFusionConfig.from_dict(config)


def load_adapter_config(config) -> AdapterConfig:
    """An AdapterConfig from a preset name, a dict, or a config (returned as is)."""
    if config is None:
        config = DEFAULT_ADAPTER_CONFIG
    if isinstance(config, AdapterConfig):
        return config
    if isinstance(config, str):
        if config not in ADAPTER_CONFIG_MAP:
            raise ValueError(f"unknown adapter config {config!r}; presets: {sorted(ADAPTER_CONFIG_MAP)}")
        return ADAPTER_CONFIG_MAP[config]
    return AdapterConfig.from_dict(config)


# -- composition ---------------------------------------------------------------------------------


class Stack:
    """Adapters applied one after the other, in order: ``Stack("lang", "task")``. A Stack may also
    hold a Fuse, a Split or a BatchSplit (``Stack("lang", Fuse("a", "b"))``), as the package's."""

    def __init__(self, *children):
        if not children:
            raise ValueError(f"{type(self).__name__} needs at least one adapter name")
        for child in children:
            if not isinstance(child, str) and type(child) not in _NESTS[type(self)]:
                where = (" (a Parallel is the outer block or in the outer Stack)" if isinstance(child, Parallel) else
                         " (the package runs a MultiTask as a BatchSplit, which cannot hold a Fuse)"
                         if isinstance(child, Fuse) and isinstance(self, MultiTask) else "")
                raise TypeError(f"{type(self).__name__} children must be adapter names (str) or "
                                f"{' / '.join(t.__name__ for t in _NESTS[type(self)])}, got {type(child).__name__}{where}")
        self.children = list(children)

    def __iter__(self):
        return iter(self.children)

    def __len__(self):
        return len(self.children)

    def __getitem__(self, i):
        return self.children[i]

    def _kwargs(self) -> dict:
        return {}

    def to_dict(self) -> dict:
        """The package's AdapterCompositionBlock.to_dict (adapter_setup.json's form)."""
        data = {"type": type(self).__name__,
                "children": [{"type": "single", "children": [c]} if isinstance(c, str) else c.to_dict()
                             for c in self.children]}
        if self._kwargs():
            data["kwargs"] = self._kwargs()
        return data

    @staticmethod
    def from_dict(data: Mapping) -> "Stack":
        """A block from the package's to_dict form."""
        blocks = {cls.__name__: cls for cls in (Stack, Parallel, Fuse, Split, BatchSplit, Average, MultiTask)}
        if not isinstance(data, Mapping) or data.get("type") not in blocks:
            raise ValueError(f"adapter setup must be a dict with 'type' one of {sorted(blocks)}, got {data!r}")
        children = [c["children"][0] if c["type"] == "single" else Stack.from_dict(c) for c in data["children"]]
        return blocks[data["type"]](*children, **data.get("kwargs", {}))

    def __eq__(self, other):
        return type(other) is type(self) and self.children == other.children and self._kwargs() == other._kwargs()

    __hash__ = None

    def __repr__(self):
        kwargs = "".join(f", {k}={v!r}" for k, v in self._kwargs().items())
        return f"{type(self).__name__}[{', '.join(map(str, self.children))}{kwargs}]"

    def first(self) -> str:
        child = self.children[0]
        return child if isinstance(child, str) else child.first()

    def last(self) -> str:
        child = self.children[-1]
        return child if isinstance(child, str) else child.last()

    def heads(self) -> list[str]:
        """The heads this setup runs on DistilBertAdapterModel, as the package's
        parse_heads_from_composition: a Stack's last adapter (or, where it ends in a BatchSplit,
        that block's heads; none where it ends in a Fuse or a Split)."""
        final = self.children[-1]
        return [final] if isinstance(final, str) else final.heads() if isinstance(final, (BatchSplit, Parallel)) else []

    def head_batch_sizes(self) -> list[int] | None:
        """Where the setup ends in a BatchSplit: its batch_sizes (head i takes those rows)."""
        final = self.children[-1]
        return final.head_batch_sizes() if isinstance(final, BatchSplit) else None

    def flatten(self) -> set[str]:
        return set(self.names())

    def names(self) -> list[str]:
        """Every adapter name, in order of appearance."""
        return [name for child in self.children for name in ([child] if isinstance(child, str) else child.names())]

    def blocks(self):
        """This block and every block inside it."""
        yield self
        for child in self.children:
            if not isinstance(child, str):
                yield from child.blocks()

    def is_plain(self) -> bool:
        """A Stack of adapter names only."""
        return type(self) is Stack and all(isinstance(child, str) for child in self.children)

    @property
    def parallel_channels(self) -> int:
        """The copies of the batch this setup makes (a Stack holding a Parallel: its children's)."""
        return max([1] + [child.parallel_channels for child in self.children if not isinstance(child, str)])


class _HeadlessBlock(Stack):
    """A block after which DistilBertAdapterModel runs no head: the package's
    parse_heads_from_composition gives none for a Fuse, Split, Average or MultiTask."""

    def heads(self) -> list[str]:
        return []

    def head_batch_sizes(self):
        return None


class Parallel(Stack):
    """Adapters side by side on the same input, as the ``adapters`` package's ``Parallel``:
    ``Parallel("a", "b")`` or ``Parallel(Stack("lang", "a"), "b")``. The layers below the first
    one holding an adapter of the setup run once; there the batch is replicated, one copy per
    child, and each copy runs its child's adapters from then on. The model's outputs hold the
    copies one after the other along the batch: rows ``i * batch:(i + 1) * batch`` are child i's
    (on DistilBertAdapterModel each child's head gets its own rows). A LoRA of the setup
    replicates the batch at its projection (in the first layer holding one, each of q / k / v
    with a LoRA replicates its own input, and attention repeats the projections that have none),
    as the package's ``LoRALinear.compose_parallel``. Its children are names, Stacks of names, and
    (as the package allows) Averages or BatchSplits, each running on its own copy."""

    def __init__(self, *children):
        super().__init__(*children)
        for child in self.children:
            if type(child) is Stack and not child.is_plain():
                raise TypeError(f"Parallel children must be adapter names (str), Stacks of names, Averages or "
                                f"BatchSplits, got {child!r}")

    def heads(self) -> list[str]:
        """The head of each child: its (last) adapter's name, as the package pairs them."""
        return [child if isinstance(child, str) else child.last() for child in self.children]

    def head_batch_sizes(self):
        return None

    @property
    def parallel_channels(self) -> int:
        return len(self.children)


class Fuse(_HeadlessBlock):
    """AdapterFusion of bottleneck adapters, as the package's ``Fuse("a", "b", name=None)``: each
    child (an adapter, or a Stack of adapters) runs on the same input and a fusion layer (added by
    ``add_adapter_fusion``) attends over their outputs. A Fuse is the whole setup or a child of
    the outer Stack (``Stack("lang", Fuse("a", "b"))``), as in the package."""

    def __init__(self, *children, name: str | None = None):
        super().__init__(*children)
        self._name = name

    @property
    def name(self) -> str:
        return self._name or ",".join(c if isinstance(c, str) else c.last() for c in self.children)

    def _kwargs(self):
        return {} if self._name is None else {"name": self._name}


def _sizes(value, children, argument: str) -> list[int]:
    sizes = [value] * len(children) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(sizes, (list, tuple)) or len(sizes) != len(children)
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sizes)):
        raise ValueError(f"{argument} must be an int >= 0 or a list of one per child ({len(children)}), got {value!r}")
    return list(sizes)


class Split(_HeadlessBlock):
    """The package's ``Split("a", "b", splits=[4, 60])`` of bottleneck adapters: along the
    sequence, positions 0-3 of every sequence go through "a" and 4-63 through "b" (``splits``:
    one length per child, or one int for all); they must add up to the padded length. LoRA
    refuses it, as in the package."""

    def __init__(self, *children, splits):
        super().__init__(*children)
        self.splits = _sizes(splits, children, "splits")

    def _kwargs(self):
        return {"splits": self.splits}


class BatchSplit(Stack):
    """The package's ``BatchSplit("a", "b", batch_sizes=[2, 3])``: rows 0-1 of the batch go
    through "a", rows 2-4 through "b" (bottleneck adapters and LoRA); on DistilBertAdapterModel
    each child's head takes its rows. ``batch_sizes`` (one per child, or one int for all) must add
    up to the batch."""

    def __init__(self, *children, batch_sizes):
        super().__init__(*children)
        self.batch_sizes = _sizes(batch_sizes, children, "batch_sizes")

    def heads(self) -> list[str]:
        return [child if isinstance(child, str) else child.last() for child in self.children]

    def head_batch_sizes(self):
        return list(self.batch_sizes)

    def _kwargs(self):
        return {"batch_sizes": self.batch_sizes}


class Average(_HeadlessBlock):
    """The package's ``Average("a", "b", weights=None, normalize_weights=True)``: each child
    (bottleneck adapters or LoRA) runs on the same input and their outputs are averaged, as the
    package computes it: ``mean_i(w_i * out_i)``, i.e. ``sum_i(w_i * out_i) / n`` (so the
    default weights, ``1 / n`` each, give the plain mean divided by n once more), with ``weights``
    divided by their sum when ``normalize_weights``. Bottleneck adapters then take the last
    child's residual + LayerNorm; a LoRA adds the average to the projection. Where fewer children
    than weights hold an adapter at a place, the package broadcasts a single one over the weights
    (``out * sum(w) / n``) and fails on more; so does this."""

    def __init__(self, *children, weights=None, normalize_weights: bool = True):
        super().__init__(*children)
        if weights is None:
            self.weights = [1 / len(children)] * len(children)
            return
        if (not isinstance(weights, (list, tuple)) or len(weights) != len(children)
                or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in weights)):
            raise ValueError(f"weights must be a list of one number per child ({len(children)}), got {weights!r}")
        if normalize_weights and sum(weights) == 0:
            raise ValueError(f"weights must not sum to 0 with normalize_weights=True, got {weights!r}")
        self.weights = [w / sum(weights) for w in weights] if normalize_weights else list(weights)

    def _kwargs(self):
        return {"weights": self.weights}


class MultiTask(_HeadlessBlock):
    """The package's ``MultiTask("a", "b")``: each row of the batch goes through the child its
    task id names, ``forward(..., task_ids=...)`` (a tensor of child indices, one per row, or a
    list of child names), as a BatchSplit of the rows sorted by task would (bottleneck adapters
    and LoRA). Its children are names, Stacks or Averages (the package also takes a Fuse, then
    fails in the forward: it runs a MultiTask as a BatchSplit, which cannot hold one)."""


# What each block may hold besides adapter names: the package's ALLOWED_NESTINGS, less what the
# package's forward refuses (a Fuse inside a MultiTask)
_NESTS = {
    Stack: (Fuse, Split, BatchSplit, Parallel, Average, MultiTask),
    Parallel: (Stack, BatchSplit, Average),
    Fuse: (Stack,),
    Split: (Stack, Split, BatchSplit, Average),
    BatchSplit: (Stack, Split, BatchSplit, Average),
    Average: (Stack, Split, BatchSplit),
    MultiTask: (Stack, Average),
}


def validate_composition(setup, level: int = 0):
    """The package's depth rules: below the outer block's children only Stacks (of names) and
    names; a Stack inside another block holds names only."""
    if isinstance(setup, str):
        return
    if level > 1 and type(setup) is not Stack:
        raise ValueError(f"Adapter setup is too deep. Cannot have {setup} at level {level}.")
    for child in setup:
        if level >= 1 and type(setup) is Stack and not isinstance(child, str):
            raise ValueError(f"Specified adapter setup is too deep. Cannot have {type(child).__name__} at level {level}")
        validate_composition(child, level + 1)


def parse_composition(setup) -> Stack | None:
    """None / a name / a list of names / a composition block -> a block (or None), as the
    package reads them (and checks their depth)."""
    if setup is None:
        return setup
    if isinstance(setup, Stack):
        validate_composition(setup)
        return setup
    if isinstance(setup, str):
        return Stack(setup)
    if isinstance(setup, (list, tuple)):
        if not setup:
            return None
        return Stack(*setup)
    raise TypeError(
        "adapter setup must be an adapter name, a list of names, a Stack, Parallel, Fuse, Split, BatchSplit, "
        "Average or MultiTask, got "
        f"{type(setup).__name__}"
    )


# What one forward hands its adapter layers: the call's setup (AdapterSetup /
# forward(adapter_names=...)), which overrides the model's active adapters, and the rows of the
# encoder's input (where a Parallel setup replicates the batch) with the cu_seqlens of packed
# input (what BatchSplit / Split split packed tokens by). In eager mode each is a context
# variable, so threads and async tasks each have their own, and gradient checkpointing
# recomputes under the forward's values. Dynamo cannot trace ContextVar.get: while a tracer
# records a forward they are plain attributes of the model's AdaptersState instead (see
# AdaptersState.calling), which dynamo traces and guards on, so a compiled model recompiles
# (or takes another cached graph) when the setup changes, never reusing a stale one.
_CALL_SETUP: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_adapter_setup", default=None)
_ENCODER_ROWS: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_encoder_rows", default=None)
# forward(task_ids=...): the task of each row, for a MultiTask setup
_TASK_IDS: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_task_ids", default=None)
# forward(output_adapter_fusion_attentions=True)'s record: {fusion: {layer: {location: probs}}}
_FUSION_ATTENTIONS: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_fusion_attentions", default=None)
# an AdapterSetup block's head setup (read by DistilBertAdapterModel's forward)
_CALL_HEADS: contextvars.ContextVar = contextvars.ContextVar("distilbert_fast_head_setup", default=None)
# The call setup open on this thread (an AdapterSetup block, or an eager forward's adapter_names
# around a compiled submodule), for a compiled model: dynamo guards on a threading.local's
# attributes per thread (but not per async task: see AdapterSetup).
_BLOCK = threading.local()


class AdapterSetup:
    """``with AdapterSetup(Stack("a", "b")): model(...)`` runs those adapters in that block, as
    the package's ``AdapterSetup(adapter_setup, head_setup=None, ignore_empty=False)``.

    On DistilBertAdapterModel a forward without ``head=`` runs the heads of ``head_setup``: a
    head name, a list of names (each head on the whole batch, a MultiHeadOutput), or by default
    the setup's own (its last adapter's name; one per child of a Parallel, head i on copy i of the
    batch); an unknown head is a ValueError, as in the package. The innermost block decides
    (one with neither setup falls back to the model's active adapters and heads), except that
    with ``ignore_empty=True`` a block with neither is no block at all.

    In eager mode the block is seen per thread and per async task. A compiled model
    (torch.compile) sees it per thread only: where async tasks on one thread interleave
    AdapterSetup blocks around a compiled model, pass ``adapter_names=`` to each call instead."""

    def __init__(self, adapter_setup, head_setup=None, ignore_empty: bool = False):
        self.adapter_setup = parse_composition(adapter_setup)
        self.head_setup = (parse_head_setup(head_setup, "head_setup") if head_setup
                           else parse_heads_from_composition(self.adapter_setup))
        self._empty = ignore_empty and self.adapter_setup is None and self.head_setup is None
        self._token = None

    def __enter__(self):
        if not self._empty:
            self._token = _set_call_setup(self.adapter_setup, self.head_setup)
        return self

    def __exit__(self, *exc):
        if not self._empty:
            _reset_call_setup(self._token)


def parse_heads_from_composition(setup: Stack | None) -> str | list[str] | None:
    """The heads an adapter setup runs on a model with heads, as the package's
    parse_heads_from_composition: a Stack's last adapter, a Parallel's or a BatchSplit's (last)
    adapter per child; none for a setup ending in a Fuse or a Split."""
    heads = [] if setup is None else setup.heads()
    if not heads:
        return None
    return heads if setup.parallel_channels > 1 or setup.head_batch_sizes() is not None else heads[0]


def parse_head_setup(head_setup, argument: str) -> str | list[str]:
    """A head setup (a head name, or a list / tuple / Parallel of names) -> a name or a list."""
    if isinstance(head_setup, str):
        return head_setup
    if isinstance(head_setup, Parallel):
        head_setup = head_setup.children
    if isinstance(head_setup, (list, tuple)) and all(isinstance(name, str) for name in head_setup):
        return list(head_setup)
    raise TypeError(f"{argument} must be a head name or a list of head names, got {head_setup!r}")


def call_head_setup():
    """The head setup of the innermost AdapterSetup block open here (None: none, or none given)."""
    return getattr(_BLOCK, "heads", None) if tracing() else _CALL_HEADS.get()


def _set_call_setup(setup, heads=None):
    token = _CALL_SETUP.set(setup), _CALL_HEADS.set(heads)
    _BLOCK.setup, _BLOCK.heads = setup, heads
    return token


def _reset_call_setup(token):
    _CALL_SETUP.reset(token[0])
    _CALL_HEADS.reset(token[1])
    # this context's values again (also after out-of-order exits)
    _BLOCK.setup, _BLOCK.heads = _CALL_SETUP.get(), _CALL_HEADS.get()


def adapters_state_of(blocks) -> "AdaptersState | None":
    """The AdaptersState of the transformer ``blocks``' adapter layers (bottleneck adapters or
    LoRA, which a Parallel setup may run); None when they hold none."""
    # (getattr: optimize() runs transformers' own blocks, which have none, through our forward)
    for block in blocks:
        attention = getattr(block, "attention", None)
        layers = (getattr(block, "attention_adapters", None), getattr(block, "output_adapters", None),
                  *(getattr(attention, name, None) for name in ("q_lin", "k_lin", "v_lin")))
        for layer in layers:
            if isinstance(layer, (BottleneckLayer, LoRALinear)):
                return layer.state
    return None


def replicate_for_parallel(channels: int, mask, hidden_states):
    """After a Parallel setup replicated the hidden states ``channels`` times inside a layer:
    the attention mask for the replicated batch (a (batch, seq) mask repeated, or a packed
    ``Varlen`` whose cu_seqlens describe the copies one after the other, computed on the device
    without a sync) and the hidden states recorded so far, repeated likewise."""
    if isinstance(mask, torch.Tensor):
        mask = mask.repeat(channels, *([1] * (mask.dim() - 1)))
    elif mask is not None:  # Varlen(cu_seqlens, max_seqlen)
        mask = mask._replace(cu_seqlens=_repeat_cu_seqlens(mask.cu_seqlens, channels))
    if hidden_states is not None:
        hidden_states = tuple(repeat_rows(h, channels) for h in hidden_states)
    return mask, hidden_states


def repeat_rows(t: torch.Tensor, channels: int) -> torch.Tensor:
    """t's rows (dim 0: the batch, or packed tokens) repeated ``channels`` times, copy after copy."""
    return t.repeat(channels, *([1] * (t.dim() - 1)))


def _repeat_cu_seqlens(cu_seqlens: torch.Tensor, channels: int, total=None) -> torch.Tensor:
    """cu_seqlens (batch + 1,) of ``total`` tokens -> (channels * batch + 1,) of the packed batch
    repeated ``channels`` times."""
    total = cu_seqlens[-1:] if total is None else total
    offsets = torch.arange(channels, device=cu_seqlens.device, dtype=cu_seqlens.dtype)[:, None] * total
    starts = (cu_seqlens[None, :-1] + offsets).reshape(-1)
    return torch.cat([starts, (cu_seqlens[-1:] * channels)])


def parallel_copies(setup: "Parallel", encoder_rows: int | None, *tensors):
    """In a layer running the Parallel ``setup``: ``tensors`` (rows first) replicated once per
    child, unless an earlier layer did (they still have the ``encoder_rows`` of the encoder's
    input), and the rows of each child's copy (a slice per child)."""
    channels = setup.parallel_channels
    if tensors[0].shape[0] == encoder_rows:  # not yet replicated
        tensors = tuple(repeat_rows(t, channels) for t in tensors)
    rows = tensors[0].shape[0] // channels
    return tensors, [slice(i * rows, (i + 1) * rows) for i in range(channels)]


def parallel_channels_of(rows: int, input_rows: int) -> int:
    """How many copies a Parallel setup made of an input of ``input_rows`` rows, given the
    ``rows`` of the encoder's output (1: none)."""
    if rows == input_rows or input_rows == 0:
        return 1
    if rows % input_rows:
        raise RuntimeError(f"the encoder returned {rows} rows for {input_rows} input rows")
    return rows // input_rows


def widen_packing(packing, channels: int):
    """The Packing of a padded batch whose packed tokens a Parallel setup repeated ``channels``
    times: the copies scatter back to (channels * batch, seq, ...), copy after copy."""
    if channels == 1:
        return packing
    cells = packing.batch * packing.seq
    offsets = torch.arange(channels, device=packing.indices.device)[:, None] * cells
    return dataclasses.replace(
        packing,
        indices=(packing.indices[None] + offsets).reshape(-1),
        cu_seqlens=_repeat_cu_seqlens(packing.cu_seqlens, channels, packing.total),
        batch=packing.batch * channels,
    )


def widen_cu_seqlens(cu_seqlens: torch.Tensor, channels: int, total: int) -> torch.Tensor:
    """cu_seqlens of packed input whose ``total`` tokens a Parallel setup repeated."""
    return cu_seqlens if channels == 1 else _repeat_cu_seqlens(cu_seqlens, channels, total)


class AdaptersState:
    """What one model's adapter layers share: the adapter configs by name, the active setup,
    and the values the running forward hands its layers (see ``calling``)."""

    def __init__(self):
        self.configs: dict[str, AdapterConfig] = {}
        self.active_setup: Stack | None = None
        # the running forward's call setup and encoder input (rows, cu_seqlens) while a tracer records it
        self.traced_setup: Stack | None = None
        self.traced_encoder: tuple | None = None
        self.traced_task_ids = None
        # set_active_adapters(skip_layers=...): blocks where no adapter runs, whatever the setup
        self.skip_layers: frozenset[int] = frozenset()
        self.model_frozen = False  # freeze_model's last call (adapter_summary reports it)
        # add_adapter_fusion's: fusion name -> (its config, the fused adapters' names)
        self.fusions: dict[str, tuple[AdapterFusionConfig, list[str]]] = {}

    def call_setup(self) -> Stack | None:
        """The setup of this call (forward(adapter_names=...), an AdapterSetup block), or None."""
        if tracing():
            setup = self.traced_setup
            return getattr(_BLOCK, "setup", None) if setup is None else setup
        return _CALL_SETUP.get()

    def current_setup(self) -> Stack | None:
        """The setup in force: this call's, else the model's active setup."""
        setup = self.call_setup()
        return self.active_setup if setup is None else setup

    def _encoder(self) -> tuple:
        encoder = self.traced_encoder if tracing() else _ENCODER_ROWS.get()
        return (None, None) if encoder is None else encoder

    def encoder_rows(self) -> int | None:
        return self._encoder()[0]

    def encoder_cu_seqlens(self) -> torch.Tensor | None:
        """The cu_seqlens of the encoder's packed input (None: padded input), for the blocks that
        split it by rows or positions (BatchSplit, Split)."""
        return self._encoder()[1]

    def task_ids(self, setup: "MultiTask", batch: int, device) -> torch.Tensor:
        """forward(task_ids=...) as a tensor of child indices (batch,) on ``device``, for the
        MultiTask ``setup`` (a list of names: each one's index among its children)."""
        ids = self.traced_task_ids if tracing() else _TASK_IDS.get()
        if ids is None:
            raise ValueError(f"the MultiTask adapter setup {setup!r} needs forward(task_ids=...): the child "
                             "(index or name) of each row")
        if isinstance(ids, (list, tuple)) and ids and all(isinstance(t, str) for t in ids):
            names = [c if isinstance(c, str) else None for c in setup.children]
            unknown = [t for t in ids if t not in names]
            if unknown:
                raise ValueError(f"task_ids: {unknown[0]!r} is not a child of {setup!r}")
            ids = [names.index(t) for t in ids]
        ids = torch.as_tensor(ids, device=device)
        if ids.shape != (batch,) or ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"task_ids must be integer child indices, one per row ({batch}), got "
                             f"{ids.dtype} of shape {tuple(ids.shape)}")
        return ids

    @contextlib.contextmanager
    def calling(self, setup: Stack | None = None, rows: int | None = None, cu_seqlens=None, task_ids=None):
        """The block of a forward running with call setup ``setup`` (None: keep the caller's),
        with ``rows`` rows at the encoder's input (packed tokens of ``cu_seqlens``, or a padded
        batch) or with ``task_ids``: context variables in eager mode, plain attributes (which
        dynamo traces and guards on) while a tracer records."""
        encoder = None if rows is None else (rows, cu_seqlens)
        if tracing():
            saved = self.traced_setup, self.traced_encoder, self.traced_task_ids
            if setup is not None:
                self.traced_setup = setup
            if encoder is not None:
                self.traced_encoder = encoder
            if task_ids is not None:
                self.traced_task_ids = task_ids
            try:
                yield
            finally:
                self.traced_setup, self.traced_encoder, self.traced_task_ids = saved
            return
        setup_token = None if setup is None else _set_call_setup(setup)
        rows_token = None if encoder is None else _ENCODER_ROWS.set(encoder)
        task_token = None if task_ids is None else _TASK_IDS.set(task_ids)
        try:
            yield
        finally:
            if task_token is not None:
                _TASK_IDS.reset(task_token)
            if rows_token is not None:
                _ENCODER_ROWS.reset(rows_token)
            if setup_token is not None:
                _reset_call_setup(setup_token)


# -- modules -------------------------------------------------------------------------------------


class Activation(nn.Module):
    """An adapter's or head's activation, by the package's name (no parameters)."""

    def __init__(self, name: str | None):
        super().__init__()
        self.name = None if name is None else str(name).lower()
        if self.name is not None:
            _check_choice("activation", self.name, ADAPTER_ACTIVATIONS)
        # the name bias_activation knows it by, when it has it
        op_name = {"swish": "silu"}.get(self.name, self.name)
        self.op_name = op_name if op_name in OP_ACTIVATIONS else None

    def forward(self, x):
        name = self.name
        if name in (None, "linear"):
            return x
        if name == "leakyrelu":
            return F.leaky_relu(x)
        if name == "tanh":
            return torch.tanh(x)
        if name == "sigmoid":
            return torch.sigmoid(x)
        return bias_activation(x, None, self.op_name)

    def extra_repr(self):
        return repr(self.name)


def run_sequential(modules, x, backend):
    """Runs Linear / Activation / LayerNorm / Dropout modules in order on the fast ops: a Linear
    followed by an activation the ops know becomes F.linear + bias_activation, a LayerNorm
    becomes residual_layernorm with no residual."""
    modules = list(modules)
    i = 0
    while i < len(modules):
        module = modules[i]
        after = modules[i + 1] if i + 1 < len(modules) else None
        if isinstance(module, nn.Linear) and isinstance(after, Activation) and after.op_name:
            x = bias_activation(F.linear(x, module.weight), module.bias, after.op_name, backend=backend)
            i += 2
            continue
        if isinstance(module, nn.LayerNorm):
            x = residual_layernorm(x, None, module.weight, module.bias, module.eps, backend=backend)
        elif isinstance(module, Activation) and module.op_name:
            x = bias_activation(x, None, module.op_name, backend=backend)
        else:
            x = module(x)
        i += 1
    return x


def _fix_seed(seed):
    if seed:  # the package reseeds only for a truthy seed
        torch.manual_seed(seed)


class BottleneckAdapter(nn.Module):
    """One bottleneck adapter: the package's ``Adapter`` (same submodule and parameter names)."""

    def __init__(self, name: str, input_size: int, down_sample: int, config: BnConfig):
        super().__init__()
        self.name = name
        self.input_size = input_size
        self.add_layer_norm_before = config.ln_before
        self.add_layer_norm_after = config.ln_after
        self.adapter_residual_before_ln = config.adapter_residual_before_ln
        self.residual_before_ln = config.residual_before_ln
        self.original_ln_before = config.original_ln_before
        self.original_ln_after = config.original_ln_after
        self.is_parallel = config.is_parallel

        seq = []
        if self.add_layer_norm_before:
            self.adapter_norm_before = nn.LayerNorm(input_size)
            seq.append(self.adapter_norm_before)
        self.down_sample = max(1, down_sample)
        seq.append(nn.Linear(input_size, self.down_sample))
        self.non_linearity = Activation(config.non_linearity)
        seq.append(self.non_linearity)
        self.adapter_down = nn.Sequential(*seq)
        self.adapter_up = nn.Linear(self.down_sample, input_size)

        if isinstance(config.scaling, (int, float)):
            self.scaling = float(config.scaling)
        elif config.scaling == "learned":
            self.scaling = nn.Parameter(torch.ones(1))
        else:  # "channel"
            self.scaling = nn.Parameter(torch.ones(input_size))
        if self.add_layer_norm_after:
            self.adapter_norm_after = nn.LayerNorm(input_size)
        self.dropout = nn.Dropout(p=config.dropout)

        _fix_seed(config.init_weights_seed)
        self._init_weights(config.init_weights)

    @torch.no_grad()
    def _init_weights(self, scheme: str):
        linears = [m for m in self.adapter_down if isinstance(m, nn.Linear)]
        if scheme == "bert":
            for module in [*self.adapter_down, self.adapter_up]:
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, 0.02)
                    module.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    module.bias.zero_()
        elif scheme == "mam_adapter":
            for module in linears:
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5))
                nn.init.zeros_(module.bias)
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)
        else:  # "houlsby"
            for module in [*linears, self.adapter_up]:
                nn.init.trunc_normal_(module.weight, mean=0, std=1e-2, a=-2e-2, b=2e-2)
                nn.init.zeros_(module.bias)

    def pre_forward(self, hidden, x, layer_norm, backend):
        """(adapter input, adapter residual) from the sublayer output ``hidden`` and the block's
        residual input ``x``: the package's ``Adapter.pre_forward``. A parallel adapter (par_bn)
        takes the sublayer's input ``x``, also as the residual it hands on (its own output has
        none: it joins the sublayer's output in ``post_forward``), as ParallelAdapter.pre_forward."""
        if self.is_parallel:
            return x, x
        residual = hidden if self.residual_before_ln is True else None
        if self.original_ln_before:
            if self.residual_before_ln == "post_add":
                residual = hidden + x
                hidden = residual_layernorm(residual, None, layer_norm.weight, layer_norm.bias,
                                            layer_norm.eps, backend=backend)
            else:
                hidden = residual_layernorm(hidden, x, layer_norm.weight, layer_norm.bias,
                                            layer_norm.eps, backend=backend)
        if not self.residual_before_ln:
            residual = hidden
        return hidden, residual

    def _down(self, hidden, backend):
        return run_sequential(self.adapter_down, hidden, backend)

    def _scaled_up(self, down):
        """The up-projection without its bias, and the bias, both times the scaling: so the bias
        can be folded into the op that adds the residual."""
        up, bias = F.linear(down, self.adapter_up.weight), self.adapter_up.bias
        if not (isinstance(self.scaling, float) and self.scaling == 1.0):
            up, bias = up * self.scaling, bias * self.scaling
        return up, bias

    def forward(self, hidden, residual, backend=None):
        """The adapter's output: dropout(up(act(down(hidden))) * scaling) + residual, with
        the optional ln_after as the package orders it."""
        return self.output(self.scaled_up(hidden, backend), residual, backend)

    def scaled_up(self, hidden, backend=None):
        """The package's ``up``: up(act(down(hidden))) * scaling, before dropout (what a fusion
        layer attends over)."""
        up, bias = self._scaled_up(self._down(hidden, backend))
        return up + bias

    def output(self, up, residual, backend=None):
        """The adapter's output from its scaled up-projection ``up``."""
        out = self.dropout(up)
        if self.is_parallel:  # the package's ParallelAdapter.forward: no residual here
            if self.add_layer_norm_after:
                norm = self.adapter_norm_after
                out = residual_layernorm(out, None, norm.weight, norm.bias, norm.eps, backend=backend)
            return out
        if self.add_layer_norm_after:
            norm = self.adapter_norm_after
            if self.adapter_residual_before_ln:
                return residual_layernorm(out, residual, norm.weight, norm.bias, norm.eps, backend=backend)
            out = residual_layernorm(out, None, norm.weight, norm.bias, norm.eps, backend=backend)
        return out + residual

    def forward_with_block_ln(self, hidden, residual, x, layer_norm, backend=None):
        """forward + the package's post_forward with original_ln_after, in one op:
        LayerNorm(dropout(up + up_bias) + (adapter residual + block residual))."""
        up, bias = self._scaled_up(self._down(hidden, backend))
        dropout_p = self.dropout.p if self.training else 0.0
        return residual_layernorm(up, residual + x, layer_norm.weight, layer_norm.bias, layer_norm.eps,
                                  x_bias=bias, dropout_p=dropout_p, backend=backend)

    def post_forward(self, hidden, x, layer_norm, backend=None, sublayer=None):
        """The block's residual + LayerNorm (original_ln_after); a parallel adapter's output first
        joins ``sublayer``, the sublayer's output, as the package's ParallelAdapter.post_forward."""
        if self.is_parallel:
            hidden = hidden + sublayer
        if self.original_ln_after:
            return residual_layernorm(hidden, x, layer_norm.weight, layer_norm.bias, layer_norm.eps,
                                      backend=backend)
        return hidden


class BottleneckLayer(nn.Module):
    """The bottleneck adapters at one place of one block (the package's ``BottleneckLayer``):
    location "mh_adapter" (after attention) or "output_adapter" (after the FFN)."""

    def __init__(self, location_key: str, layer_idx: int, model_config, state: AdaptersState):
        super().__init__()
        self.location_key = location_key
        self.layer_idx = layer_idx
        self.model_config = model_config
        self.state = state
        self.adapters = nn.ModuleDict()
        self.adapter_fusion_layer = nn.ModuleDict()  # by fusion name, as the package's

    def add_adapter(self, name: str, config: BnConfig, like: torch.Tensor) -> bool:
        """Adds adapter ``name`` here if the config places one here, on ``like``'s device and
        dtype. Returns whether it did."""
        if not getattr(config, self.location_key) or self.layer_idx in config.leave_out:
            return False
        factor = config.reduction_factor
        if isinstance(factor, Mapping):
            factor = factor.get(str(self.layer_idx), factor["default"])
        dim = self.model_config.dim
        adapter = BottleneckAdapter(name, dim, int(dim // factor), config)
        adapter.train(self.training)
        self.adapters[name] = adapter.to(like.device, like.dtype)
        return True

    def active_setup(self) -> Stack | None:
        """The setup in force, if it names an adapter of this layer; else None (plain block)."""
        if not self.adapters or self.layer_idx in self.state.skip_layers:
            return None
        setup = self.state.current_setup()
        if setup is None or not any(name in self.adapters for name in setup.names()):
            return None
        return setup

    def forward(self, h, x, h_bias, dropout_p, layer_norm):
        """The sublayer output ``h`` (before its bias ``h_bias`` and dropout), the block's
        residual input ``x``: the adapters of the active Stack in order, then the block's
        residual + LayerNorm, as the package's ``bottleneck_layer_forward``."""
        backend = self.model_config.backend
        hidden = h if h_bias is None else h + h_bias.to(h.dtype)
        if dropout_p > 0.0:
            hidden = F.dropout(hidden, dropout_p, training=True)
        setup = self.active_setup()
        if isinstance(setup, Parallel):
            return self._forward_parallel(setup, hidden, x, layer_norm, backend)
        if not setup.is_plain():
            return self._forward_composed(setup, hidden, x, layer_norm, backend)
        names = [name for name in setup if name in self.adapters]
        sublayer = hidden
        for i, name in enumerate(names):
            adapter = self.adapters[name]
            hidden, residual = adapter.pre_forward(hidden, x, layer_norm, backend)
            last = i == len(names) - 1
            if last and adapter.original_ln_after and not adapter.add_layer_norm_after:
                # (a parallel adapter's output joins the sublayer's: that is its residual here)
                return adapter.forward_with_block_ln(hidden, sublayer if adapter.is_parallel else residual, x,
                                                     layer_norm, backend)
            hidden = adapter(hidden, residual, backend)
        return self.adapters[names[-1]].post_forward(hidden, x, layer_norm, backend, sublayer)

    def add_fusion_layer(self, name: str, config: AdapterFusionConfig, adapter_names, like: torch.Tensor):
        """The fusion layer ``name`` here, where every fused adapter's config places one here (as
        the package's add_fusion_layer)."""
        configs = self.state.configs
        if all(getattr(configs[n], self.location_key, False) for n in adapter_names):
            fusion = AdapterFusion(config, self.model_config.dim)
            fusion.train(self.training)
            self.adapter_fusion_layer[name] = fusion.to(like.device, like.dtype)

    # The package's composition of bottleneck adapters (its BottleneckLayer.compose_*), for a
    # setup holding a Fuse, a Split or a BatchSplit: a _BnState goes through the blocks, then the
    # last adapter applied finishes with the block's residual + LayerNorm. Where the package
    # slices the batch (BatchSplit) or the sequence (Split) and concatenates the parts, each part
    # here runs on every position and keeps its own (torch.where by position): the same result
    # per position, on padded and packed input alike, with no host sync (bottleneck adapters
    # are a small share of a layer's work).
    def _forward_composed(self, setup: Stack, hidden, x, layer_norm, backend):
        if self.location_key == "output_adapter" and self.model_config.chunk_size_feed_forward and any(
                isinstance(block, (Split, BatchSplit, MultiTask)) for block in setup.blocks()):
            raise NotImplementedError("Split / BatchSplit / MultiTask adapter setups do not run with "
                                      "chunk_size_feed_forward > 0")
        run = _Composition(self, layer_norm, backend)
        state = run.compose(setup, _BnState(hidden, x, x), 0)
        last = state.last if state.last is not None else next(n for n in setup.names() if n in self.adapters)
        out = self.adapters[last].post_forward(state.hidden, state.x, layer_norm, backend, hidden)
        if isinstance(setup, (BatchSplit, MultiTask)) and run.bare_rows is not None:
            # the rows of children with no adapter here get the plain residual + LayerNorm, as
            # they would alone (the package fails where the first child has none here)
            plain = residual_layernorm(hidden, x, layer_norm.weight, layer_norm.bias, layer_norm.eps, backend=backend)
            out = torch.where(run.bare_rows, plain, out)
        return out

    def _forward_parallel(self, setup: "Parallel", hidden, x, layer_norm, backend):
        """The package's compose_parallel: the batch replicated once per child (unless an
        earlier layer did), the first adapter's pre_forward on all copies, each child's
        adapters on its own copy (a Stack child as a Stack: pre_forward and adapter per name),
        then the last child's last adapter's post_forward (residual + block LayerNorm) on all.
        A child with no adapter here (a LoRA-only child, or one left out of this layer) gets
        this place's plain residual + LayerNorm on its copy, as it would alone (the package
        fails on such a setup). A parallel adapter (par_bn) last adds the sublayer's output of
        each copy, as the package's ParallelAdapter.post_forward (which fails in the layer that
        replicates a batch of more than one row: it adds the output of the batch not yet
        replicated; its result for one row, or once a LoRA below replicated, is this one)."""
        present = [name for name in setup.names() if name in self.adapters]
        (hidden, x), parts = parallel_copies(setup, self.state.encoder_rows(), hidden, x)
        first = setup.first() if setup.first() in self.adapters else present[0]
        sublayer, (hidden, residual) = hidden, self.adapters[first].pre_forward(hidden, x, layer_norm, backend)
        outputs, last, bare = [], None, []
        for part, child in zip(parts, setup):
            out, last = hidden[part], None
            if isinstance(child, (Average, BatchSplit)):  # (as the package's compose_* on this copy)
                state = _BnState(out, x[part], residual[part])
                state = _Composition(self, layer_norm, backend).compose(child, state, 1)
                out, last = state.hidden, state.last
            elif isinstance(child, Stack):
                for name in child:
                    if name in self.adapters:
                        out, child_residual = self.adapters[name].pre_forward(out, x[part], layer_norm, backend)
                        out, last = self.adapters[name](out, child_residual, backend), name
            elif child in self.adapters:
                out, last = self.adapters[child](out, residual[part], backend), child
            outputs.append(out)
            bare.append(last is None)
        # the package finishes with the last child's adapter (which must be here); else ours: the
        # last one of the setup that is
        last = last if last is not None else present[-1]
        out = self.adapters[last].post_forward(torch.cat(outputs), x, layer_norm, backend, sublayer)
        if not any(bare):
            return out
        return torch.cat([
            residual_layernorm(sublayer[part], x[part], layer_norm.weight, layer_norm.bias, layer_norm.eps,
                               backend=backend) if is_bare else out[part]
            for part, is_bare in zip(parts, bare)
        ])


class _BnState(NamedTuple):
    """The package's BottleneckState: the hidden states, the block's residual input, the
    adapter residual, the last adapter's scaled up-projection (for a Fuse) and its name."""

    hidden: torch.Tensor
    x: torch.Tensor
    residual: torch.Tensor
    up: torch.Tensor | None = None
    last: str | None = None


def token_coordinates(state: AdaptersState, t: torch.Tensor):
    """For the rows of ``t`` (a padded batch (batch, seq, dim) or packed tokens (total, dim) of
    the encoder's input): each position's row in the batch and position in its sequence, shaped
    to broadcast against ``t``, and the batch size and padded length (None when packed). Packed,
    from the encoder's cu_seqlens on the device (no host sync)."""
    if t.dim() == 3:
        batch, seq = t.shape[:2]
        rows = torch.arange(batch, device=t.device)[:, None, None]
        return rows, torch.arange(seq, device=t.device)[None, :, None], batch, seq
    cu_seqlens = state.encoder_cu_seqlens()
    if cu_seqlens is None or t.shape[0] != state.encoder_rows():
        raise NotImplementedError("Split / BatchSplit adapter setups need the encoder's packed tokens here")
    tokens = torch.arange(t.shape[0], device=t.device, dtype=cu_seqlens.dtype)
    rows = torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)
    return rows[:, None], (tokens - cu_seqlens[rows])[:, None], cu_seqlens.shape[0] - 1, None


def _check_batch_split(setup: "BatchSplit", batch: int):
    if sum(setup.batch_sizes) != batch:
        raise IndexError(f"The given batch has a size of {batch} which is not equal to the sum of "
                         f"batch_sizes {setup.batch_sizes}")


def child_rows(state: AdaptersState, setup: "BatchSplit | MultiTask", t: torch.Tensor) -> list[torch.Tensor]:
    """For each child of a BatchSplit (its rows of the batch) or a MultiTask (the rows of its
    task id): a mask over ``t``'s positions (padded or packed; see token_coordinates)."""
    rows, _, batch, _ = token_coordinates(state, t)
    if isinstance(setup, MultiTask):
        tasks = state.task_ids(setup, batch, t.device)[rows]
        return [tasks == i for i in range(len(setup))]
    _check_batch_split(setup, batch)
    starts = [sum(setup.batch_sizes[:i]) for i in range(len(setup))]
    return [(rows >= start) & (rows < start + size) for start, size in zip(starts, setup.batch_sizes)]


def weighted_mean(setup: "Average", outputs: list[torch.Tensor]) -> torch.Tensor:
    """The package's Average: mean over the children of weight * output (one output broadcast
    over every weight, as there, where only one child has an adapter at this place)."""
    if len(outputs) not in (1, len(setup.weights)):
        raise ValueError(f"{setup!r}: {len(outputs)} of its {len(setup.weights)} children have an adapter at this "
                         "place; the package averages one or all of them")
    stacked = torch.stack(outputs)
    weights = torch.tensor(setup.weights, dtype=stacked.dtype, device=stacked.device)
    return torch.mean(stacked * weights.view(-1, *[1] * (stacked.dim() - 1)), dim=0)


def _check_split(setup: "Split", seq: int | None):
    """The package's check: the splits add up to the padded length. Packed input has none (the
    positions of a sequence beyond the splits, which the package refuses, keep the first
    adapter's pre_forward there)."""
    if seq is not None and sum(setup.splits) != seq:
        raise IndexError(f"The given input has sequence length {seq} which is not equal to the sum of splits "
                         f"{setup.splits}")


def _select(mask, new, old):
    """Per position: ``new`` where ``mask``, else ``old`` (None stays None)."""
    if new is None or old is None:
        return None
    return new if new is old else torch.where(mask, new, old)


class _Composition:
    """One bottleneck layer's run of a composed setup, as the package's compose_stack /
    compose_fuse / compose_split / compose_batch_split (see BottleneckLayer._forward_composed)."""

    def __init__(self, layer: "BottleneckLayer", layer_norm, backend):
        self.layer, self.adapters, self.layer_norm, self.backend = layer, layer.adapters, layer_norm, backend
        self.bare_rows = None  # the outer BatchSplit's rows whose child has no adapter here (a mask)

    def compose(self, setup: Stack, state: _BnState, lvl: int) -> _BnState:
        if not any(name in self.adapters for name in setup.names()):
            return state  # (a block with no adapter here: the package fails in its pre_block)
        if isinstance(setup, Fuse):
            return self.fuse(setup, state, lvl)
        if isinstance(setup, Split):
            return self.split(setup, state, lvl)
        if isinstance(setup, (BatchSplit, MultiTask)):
            return self.batch_split(setup, state, lvl)
        if isinstance(setup, Average):
            return self.average(setup, state, lvl)
        if isinstance(setup, Parallel):  # (inside a Stack; an outer Parallel is _forward_parallel's)
            return self.parallel(setup, state, lvl)
        for child in setup:  # a Stack: each adapter's pre_forward, then the adapter
            if not isinstance(child, str):
                state = self.compose(child, state, lvl + 1)
            elif child in self.adapters:
                state = self.single(child, self.pre_block(child, state))
        return state

    def child(self, child, state: _BnState, lvl: int) -> _BnState | None:
        """A child of a Fuse / Split / BatchSplit (no pre_forward of its own for a name, as
        there); None for a name with no adapter here."""
        if not isinstance(child, str):
            return self.compose(child, state, lvl + 1)
        return self.single(child, state) if child in self.adapters else None

    def pre_block(self, setup, state: _BnState) -> _BnState:
        """The pre_forward of the setup's first adapter (the package's pre_block; where that one
        is not in this layer, the first one that is)."""
        name = setup if isinstance(setup, str) else setup.first()
        if name not in self.adapters:
            name = next(n for n in setup.names() if n in self.adapters)
        hidden, residual = self.adapters[name].pre_forward(state.hidden, state.x, self.layer_norm, self.backend)
        return state._replace(hidden=hidden, residual=residual)

    def single(self, name: str, state: _BnState) -> _BnState:
        adapter = self.adapters[name]
        up = adapter.scaled_up(state.hidden, self.backend)
        return state._replace(hidden=adapter.output(up, state.residual, self.backend), up=up, last=name)

    def fuse(self, setup: "Fuse", state: _BnState, lvl: int) -> _BnState:
        """The last adapter's pre_forward (the query before or after the block's LayerNorm), each
        child's scaled up-projection of that input, the fusion layer's attention over them."""
        if setup.name not in self.layer.adapter_fusion_layer:  # (its adapters are not all here: the package fails)
            return state
        config = self.layer.state.fusions[setup.name][0]
        last = self.adapters[setup.last()]
        hidden, residual = last.pre_forward(state.hidden, state.x, self.layer_norm, self.backend)
        query = state.x if last.is_parallel else state.hidden if config.query_before_ln else hidden
        state = state._replace(hidden=hidden, residual=residual)
        ups = [s.up for s in (self.child(c, state, lvl) for c in setup) if s is not None and s.up is not None]
        if ups:
            record = None if tracing() else _FUSION_ATTENTIONS.get()
            hidden, probs = self.layer.adapter_fusion_layer[setup.name](query, torch.stack(ups, dim=-2), residual)
            if record is not None:  # forward(output_adapter_fusion_attentions=True)
                places = record.setdefault(setup.name, {}).setdefault(self.layer.layer_idx, {})
                places[self.layer.location_key] = probs.detach().float().cpu()
        return state._replace(hidden=hidden, last=setup.last())

    def split(self, setup: "Split", state: _BnState, lvl: int) -> _BnState:
        """Positions [s_i, s_i + splits[i]) of every sequence through child i."""
        _, positions, _, seq = token_coordinates(self.layer.state, state.hidden)
        _check_split(setup, seq)
        state = self.pre_block(setup, state)
        hidden, last, start = state.hidden, None, 0
        for child, size in zip(setup, setup.splits):
            child_state = self.child(child, state._replace(last=None), lvl)
            if child_state is not None:
                hidden = _select((positions >= start) & (positions < start + size), child_state.hidden, hidden)
                last = child_state.last or last
            start += size
        return state._replace(hidden=hidden, last=last)

    def parallel(self, setup: "Parallel", state: _BnState, lvl: int) -> _BnState:
        """The package's compose_parallel inside a Stack (Stack("lang", Parallel("a", "b"))): the
        state replicated once per child (unless an earlier layer did), the first adapter's
        pre_forward on all copies, each child on its copy."""
        fields = [t for t in state[:4] if t is not None]
        fields, parts = parallel_copies(setup, self.layer.state.encoder_rows(), *fields)
        state = _BnState(*fields, *([None] if state.up is None else []), last=state.last)
        state = self.pre_block(setup, state)
        copies = []
        for part, child in zip(parts, setup):
            copy = _BnState(*(None if t is None else t[part] for t in state[:4]), last=state.last)
            copies.append(self.child(child, copy, lvl) or copy)
        ups = [c.up for c in copies]
        return _BnState(*(torch.cat([c[i] for c in copies]) for i in range(3)),
                        None if any(u is None for u in ups) else torch.cat(ups), last=copies[-1].last)

    def batch_split(self, setup: "BatchSplit | MultiTask", state: _BnState, lvl: int) -> _BnState:
        """Rows [b_i, b_i + batch_sizes[i]) of the batch (a MultiTask: the rows of task i) through
        child i; every part of the state (residuals, up-projections) comes from the child of its
        row. A MultiTask runs the first adapter's pre_forward twice, as the package's
        compose_multi_task (its own, then its compose_batch_split's)."""
        masks = child_rows(self.layer.state, setup, state.hidden)
        if isinstance(setup, MultiTask):
            state = self.pre_block(setup, state)
        state = self.pre_block(setup, state)
        merged = None
        for child, mine in zip(setup, masks):
            child_state = self.child(child, state, lvl)
            if child_state is None or child_state.last is None and not isinstance(child, str):
                if lvl == 0:
                    self.bare_rows = mine if self.bare_rows is None else self.bare_rows | mine
                child_state = child_state or state
            if merged is None:
                merged = child_state
            else:
                merged = _BnState(*(_select(mine, new, old) for new, old in zip(child_state[:4], merged[:4])),
                                  last=child_state.last)
        return merged

    def average(self, setup: "Average", state: _BnState, lvl: int) -> _BnState:
        """The package's compose_average: the first adapter's pre_forward, each child on that
        input, the weighted mean of their hidden states; the rest of the state is the first
        child's, the last adapter the last child's."""
        state = self.pre_block(setup, state)
        children = [s for s in (self.child(c, state, lvl) for c in setup) if s is not None]
        return children[0]._replace(hidden=weighted_mean(setup, [c.hidden for c in children]), last=children[-1].last)


class AdapterFusion(nn.Module):
    """The package's ``BertFusion`` (same parameter names): attention of each token's query over
    the fused adapters' outputs (..., n_adapters, dim)."""

    def __init__(self, config: AdapterFusionConfig, dim: int):
        super().__init__()
        self.config = config
        self.dropout = nn.Dropout(config.dropout_prob or 0.0)  # DistilBERT's config has no attention_probs_dropout_prob
        if not (config.query or config.key or config.value):
            self.dense = nn.Linear(dim, 1)  # (unused, as in the package; kept for its state_dict)
        for key, bias in (("query", True), ("key", True), ("value", False)):
            if config[key]:
                linear = nn.Linear(dim, dim, bias=bias)
                with torch.no_grad():
                    linear.weight.normal_(0.0, 0.02)
                    if bias:
                        linear.bias.zero_()
                setattr(self, key, linear)
        if config.value and config.value_initialized:
            with torch.no_grad():
                self.value.weight.fill_(0.000001).fill_diagonal_(1.0)
        self.T = 50.0 if config.temperature else 1.0
        self.reduction = self.T / 1000.0

    def forward(self, query, values, residual):
        """query, residual (..., dim); values (..., n, dim): the fused hidden states (..., dim)
        and the attention over the n adapters (..., n)."""
        config = self.config
        if config.residual_before:
            values = values + residual.unsqueeze(-2)  # (the package adds in place: its keys too)
        query = self.query(query) if config.query else query
        keys = self.key(values) if config.key else values
        if config.value and config.value_before_softmax:
            values = self.value(values)
        scores = self.dropout((query.unsqueeze(-2) @ keys.transpose(-2, -1)).squeeze(-2))  # (..., n)
        probs = torch.softmax(scores / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)  # the temperature anneals per forward, as there
        context = (probs.unsqueeze(-2) @ values).squeeze(-2)
        if config.value and not config.value_before_softmax:
            context = self.value(context)
        return (context if config.residual_before else context + residual), probs


class LoRA(nn.Module):
    """One LoRA update: lora_A (r, in_features), lora_B (out_features, r), scaling alpha / r."""

    def __init__(self, in_features: int, out_features: int, config: LoRAConfig):
        super().__init__()
        self.r = config.r
        self.lora_alpha = config.alpha
        self.scaling = config.alpha / config.r
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0.0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.zeros(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        _fix_seed(config.init_weights_seed)
        with torch.no_grad():
            if config.init_weights == "lora":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B)
            else:  # "bert"
                nn.init.normal_(self.lora_A, std=0.02)
                nn.init.normal_(self.lora_B, std=0.02)

    @property
    def delta_w(self) -> torch.Tensor:
        return self.lora_B @ self.lora_A  # (out_features, in_features)

    def forward(self, hidden):
        return self.lora_dropout(hidden) @ self.lora_A.t() @ self.lora_B.t() * self.scaling


class LoRALinear(nn.Linear):
    """An nn.Linear (sharing the wrapped layer's weight and bias) plus named LoRA updates.

    With no LoRA of the active setup here, or with one merged into the weight, it is exactly
    ``F.linear(x, weight, bias)``: ``acts_as_linear()`` says so, for fused paths that want to
    treat it as a plain Linear."""

    def __init__(self, linear: nn.Linear, attn_key: str, layer_idx: int, state: AdaptersState):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.attn_key = attn_key
        self.layer_idx = layer_idx
        self.state = state
        self.loras = nn.ModuleDict()
        self.merged: str | None = None

    def add_adapter(self, name: str, config: LoRAConfig) -> bool:
        if self.attn_key not in config.attn_matrices or self.layer_idx in config.leave_out:
            return False
        lora = LoRA(self.in_features, self.out_features, config)
        lora.train(self.training)
        self.loras[name] = lora.to(self.weight.device, self.weight.dtype)
        return True

    def _active_names(self) -> list[str]:
        if self.merged or not self.loras or self.layer_idx in self.state.skip_layers:
            return []
        setup = self.state.current_setup()
        return [] if setup is None else [name for name in setup.names() if name in self.loras]

    def acts_as_linear(self) -> bool:
        return not self._active_names()

    def forward(self, x):
        out = F.linear(x, self.weight, self.bias)
        if not self._active_names():
            return out
        setup = self.state.current_setup()
        if not isinstance(setup, Parallel):
            update = self._stacked_update(setup, x) if setup.is_plain() else self._composed_update(setup, x, None)
            return out if update is None else out + update
        # The package's compose_parallel: replicate the input (unless an earlier layer did),
        # then each child's LoRAs on its own copy.
        (x, out), parts = parallel_copies(setup, self.state.encoder_rows(), x, out)
        copies = []
        for part, child in zip(parts, setup):
            update = (self._stacked_update([child], x[part]) if isinstance(child, str) else
                      self._stacked_update(child, x[part]) if child.is_plain() else
                      self._composed_update(child, x[part], None))  # (an Average or a BatchSplit)
            copies.append(out[part] if update is None else out[part] + update)
        return torch.cat(copies)

    def _stacked_update(self, names, x):
        """The update of the LoRAs of ``names`` held here (None: none), a Stack feeding each
        LoRA the previous one's output, as the package does."""
        hidden = None
        for name in names:
            if name in self.loras:
                hidden = self.loras[name](x if hidden is None else hidden)
        return hidden

    def _composed_update(self, setup, x, hidden):
        """The package's LoRALinear composition of a setup holding a BatchSplit or a MultiTask
        (each child's LoRAs on its rows), an Average (the children's updates averaged) or blocks
        that leave LoRA out; a Split or Fuse of LoRAs held here is refused, as in the package.
        ``hidden``: the update so far (None: none yet)."""
        if isinstance(setup, str):
            return self.loras[setup](x if hidden is None else hidden) if setup in self.loras else hidden
        if isinstance(setup, Parallel) and any(name in self.loras for name in setup.names()):
            raise NotImplementedError(f"LoRA adapters in a Parallel inside a Stack do not run in distilbert_fast, got "
                                      f"{setup!r} (a Parallel of LoRAs runs as the outer block)")
        if isinstance(setup, (Split, Fuse, Parallel)):
            if any(name in self.loras for name in setup.names()):
                raise NotImplementedError(f"LoRA adapters do not run in a {type(setup).__name__} composition "
                                          f"(as in the adapters package), got {setup!r}")
            return hidden
        if not any(name in self.loras for name in setup.names()):
            return hidden  # (an Average with no LoRA here: the package fails on its empty mean)
        if isinstance(setup, (BatchSplit, MultiTask)):
            merged = None
            for i, (child, mine) in enumerate(zip(setup, child_rows(self.state, setup, x))):
                update = self._composed_update(child, x, hidden)
                if i == 0 or (update is None and merged is None):
                    merged = update
                else:  # (a child with no LoRA here: no update on its rows)
                    new = torch.zeros_like(merged) if update is None else update
                    merged = torch.where(mine, new, torch.zeros_like(new) if merged is None else merged)
            return merged
        if isinstance(setup, Average):  # each child's update of the same input, averaged
            updates = [self._composed_update(c, x, hidden) for c in setup if not isinstance(c, str) or c in self.loras]
            present = next(u for u in updates if u is not None)
            return weighted_mean(setup, [torch.zeros_like(present) if u is None else u for u in updates])
        for child in setup:  # a Stack: each LoRA takes the previous one's output, as there
            hidden = self._composed_update(child, x, hidden)
        return hidden

    @torch.no_grad()
    def merge_adapter(self, name: str):
        if name not in self.loras or self.merged == name:
            return
        if self.merged:
            raise ValueError(
                f"LoRA {self.merged!r} is already merged into this layer; call reset_adapter() first"
            )
        lora = self.loras[name]
        self.weight.add_(lora.delta_w.to(self.weight.dtype) * lora.scaling)
        self.merged = name

    @torch.no_grad()
    def reset_adapter(self):
        if self.merged:
            lora = self.loras[self.merged]
            self.weight.sub_(lora.delta_w.to(self.weight.dtype) * lora.scaling)
            self.merged = None


# -- the model-level API -------------------------------------------------------------------------


class ModelAdaptersMixin:
    """The adapter API of every model class (the ``adapters`` package's ``ModelAdaptersMixin``,
    on a model after ``adapters.init(model)``): ``add_adapter``, ``train_adapter``,
    ``set_active_adapters``, ``save_adapter``, ``load_adapter`` ... and ``adapter_names=`` in
    ``forward`` (the setup for that call, as ``with AdapterSetup(...)``).

    The adapters live in the base model (``self.base_model``), and a task model shares its base
    model's adapter state: adding an adapter through either is seen by both."""

    # Whether forward takes labels with a Parallel setup (one head per copy); the task classes'
    # single head would see every copy's rows against one batch of labels.
    _parallel_labels_ok = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        forward = cls.__dict__.get("forward")
        if forward is not None and not getattr(forward, "_takes_adapter_names", False):
            cls.forward = _taking_adapter_names(forward)

    @property
    def _adapters_state(self) -> "AdaptersState":
        base = self.base_model
        state = base.__dict__.get("_adapters_state_")
        if state is None:
            state = base.__dict__["_adapters_state_"] = AdaptersState()
        return state

    # -- adding, activating, deleting ------------------------------------------------------------
    @property
    def adapters_config(self) -> dict[str, AdapterConfig]:
        """The added adapters' configs by name (read-only view)."""
        return dict(self._adapters_state.configs)

    def has_adapters(self) -> bool:
        return bool(self._adapters_state.configs)

    def _check_adapter_name(self, name, argument: str | None = None):
        if name not in self._adapters_state.configs:
            raise ValueError(
                ("" if argument is None else f"{argument}: ")
                + f"no adapter named {name!r}; this model has adapters {sorted(self._adapters_state.configs)}"
            )

    def add_adapter(self, adapter_name: str, config=None, overwrite_ok: bool = False, set_active: bool = False):
        """Adds adapter ``adapter_name`` with ``config``: a preset name ("seq_bn" / "pfeiffer",
        "double_seq_bn" / "houlsby", "lora"), a dict, or a BnConfig / LoRAConfig."""
        if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
            raise ValueError(f"adapter_name must be a non-empty str without '.', got {adapter_name!r}")
        config = load_adapter_config(config)
        if adapter_name in self._adapters_state.configs:
            if not overwrite_ok:
                raise ValueError(
                    f"an adapter named {adapter_name!r} already exists; pass overwrite_ok=True to replace it"
                )
            self._delete_adapter(adapter_name)  # (its fusions stay, as in the package)
        added = 0
        for i, block in enumerate(self.base_model.transformer.layer):
            if isinstance(config, BnConfig):
                for key, attr in (("mh_adapter", "attention_adapters"), ("output_adapter", "output_adapters")):
                    if getattr(block, attr) is None:
                        setattr(block, attr, BottleneckLayer(key, i, self.config, self._adapters_state))
                    added += getattr(block, attr).add_adapter(adapter_name, config, block.sa_layer_norm.weight)
            else:
                attention = block.attention
                for key in ("q", "k", "v"):
                    linear = getattr(attention, f"{key}_lin")
                    if not isinstance(linear, LoRALinear):
                        linear = LoRALinear(linear, key, i, self._adapters_state)
                        setattr(attention, f"{key}_lin", linear)
                    added += linear.add_adapter(adapter_name, config)
        if not added:
            raise ValueError(f"adapter {adapter_name!r} with config {config} adds no module to any layer")
        self._adapters_state.configs[adapter_name] = config
        if set_active:
            self.set_active_adapters(adapter_name)

    def _adapter_layers(self):
        for block in self.base_model.transformer.layer:
            for layer in (block.attention_adapters, block.output_adapters):
                if layer is not None:
                    yield layer, "adapters"
            for key in ("q", "k", "v"):
                linear = getattr(block.attention, f"{key}_lin")
                if isinstance(linear, LoRALinear):
                    yield linear, "loras"

    def _adapter_modules(self, name: str):
        for layer, attr in self._adapter_layers():
            modules = getattr(layer, attr)
            if name in modules:
                yield modules[name]

    def delete_adapter(self, adapter_name: str):
        """Removes adapter ``adapter_name`` (un-merging it) and the fusions over it; an unknown
        name is skipped with a warning, as in the package. (The package keeps the fusions, whose
        layers then fuse what is left, and save_pretrained writes a config it cannot load.)"""
        if adapter_name not in self._adapters_state.configs:
            logger.warning("delete_adapter: no adapter named %r to delete; this model has adapters %s",
                           adapter_name, sorted(self._adapters_state.configs))
            return
        self._delete_adapter(adapter_name)
        for fusion, (_, fused) in list(self._adapters_state.fusions.items()):
            if adapter_name in fused:
                logger.info("delete_adapter: deleting adapter fusion %r, which fuses %r", fusion, adapter_name)
                self.delete_adapter_fusion(fusion)

    def _delete_adapter(self, adapter_name: str):
        for layer, attr in self._adapter_layers():
            if attr == "loras" and layer.merged == adapter_name:
                layer.reset_adapter()
            modules = getattr(layer, attr)
            if adapter_name in modules:
                del modules[adapter_name]
        del self._adapters_state.configs[adapter_name]
        active = self._adapters_state.active_setup
        if active is not None and adapter_name in active.flatten():
            self._adapters_state.active_setup = _without(active, adapter_name)

    @property
    def active_adapters(self) -> Stack | None:
        return self._adapters_state.active_setup

    @active_adapters.setter
    def active_adapters(self, adapter_setup):
        self.set_active_adapters(adapter_setup)

    def _parse_setup(self, adapter_setup, argument: str = "adapter_setup") -> Stack | None:
        setup = parse_composition(adapter_setup)
        for name in setup.names() if setup is not None else ():
            self._check_adapter_name(name, argument)
        for block in () if setup is None else setup.blocks():
            if isinstance(block, Fuse) and block.name not in self._adapters_state.fusions:
                raise ValueError(f"{argument}: no adapter fusion named {block.name!r} (add_adapter_fusion adds it); "
                                 f"this model has {sorted(self._adapters_state.fusions)}")
        return setup

    def set_active_adapters(self, adapter_setup, skip_layers=None):
        """The adapters every forward uses (None: none), unless a call passes ``adapter_names``;
        no adapter runs in the blocks listed in ``skip_layers`` (until the next call). As in the
        package, this un-merges a merged LoRA."""
        setup = self._parse_setup(adapter_setup)
        n_layers = len(self.base_model.transformer.layer)
        skip = list(skip_layers or ())
        if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers for i in skip):
            raise ValueError(f"skip_layers must be block indices in [0, {n_layers}), got {skip_layers!r}")
        self.reset_adapter()
        self._adapters_state.active_setup = setup
        self._adapters_state.skip_layers = frozenset(skip)

    def freeze_model(self, freeze: bool = True):
        """Freezes (or unfreezes) every parameter of the base model, adapters included."""
        for param in self.base_model.parameters():
            param.requires_grad = not freeze
        self._adapters_state.model_frozen = freeze

    def adapter_summary(self, as_dict: bool = False):
        """The package's table of the added adapters: name, architecture ("bottleneck" or
        "lora"), #param, %param (of the base model without adapters), active, train (every
        weight trainable), then the full model's row; ``as_dict``: the rows as dicts."""
        active = self.active_adapters
        rows = []
        for name, config in self._adapters_state.configs.items():
            params = [p for module in self._adapter_modules(name) for p in module.parameters()]
            rows.append({"name": name, "architecture": config.architecture or "bottleneck",
                         "#param": sum(p.numel() for p in params),
                         "active": active is not None and name in active.flatten(),
                         "train": all(p.requires_grad for p in params)})
        base_params = sum(p.numel() for p in self.base_model.parameters()) - sum(r["#param"] for r in rows)
        for row in rows:
            row["%param"] = row["#param"] / base_params * 100
        rows.append({"name": "Full model", "#param": base_params, "%param": 100.0,
                     "train": not self._adapters_state.model_frozen})
        if as_dict:
            return rows
        header = ["name", "architecture", "#param", "%param", "active", "train"]
        row_format = "{:<25}{:<15}{:>12,}{:>12.3f}{:>8}{:>8}"
        lines = ["=" * 80, "{:<25}{:<15}{:>12}{:>12}{:>8}{:>8}".format(*(h.title() for h in header)), "-" * 80]
        lines += [row_format.format(*(row.get(h, "") for h in header)) for row in rows]
        lines.insert(len(lines) - 1, "-" * 80)
        lines.append("=" * 80)
        return "\n".join(lines)

    def train_adapter(self, adapter_setup, train_embeddings: bool = False):
        """Training mode for the given adapters: the base model frozen (but the word embeddings
        with ``train_embeddings``), those adapters trainable and active. As in the package, the
        active head stays (a head named like the adapter is not activated: set_active_adapters
        does that)."""
        setup = self._parse_setup(adapter_setup)
        if setup is None:
            raise ValueError(f"adapter_setup must name at least one adapter to train, got {adapter_setup!r}")
        self.train()
        self.freeze_model(True)
        for name in setup.names():
            for module in self._adapter_modules(name):
                for param in module.parameters():
                    param.requires_grad = True
        ModelAdaptersMixin.set_active_adapters(self, setup)  # the base model's: heads unchanged
        if train_embeddings:
            self.get_input_embeddings().weight.requires_grad = True
        elif self.base_model is not self:
            # as the package's models with heads: output embeddings (the masked-LM projector, tied
            # to the word embeddings: its bias too) train only with train_embeddings
            self._freeze_output_embeddings()

    def _freeze_output_embeddings(self):
        output = self.get_output_embeddings()
        for param in () if output is None else output.parameters():
            param.requires_grad = False

    def merge_adapter(self, name: str):
        """Folds LoRA ``name`` into the weights of the layers it adapts, so inference costs
        nothing extra; ``reset_adapter`` undoes it."""
        self._check_adapter_name(name, "name")
        if not isinstance(self._adapters_state.configs[name], LoRAConfig):
            raise ValueError(f"merge_adapter works on LoRA adapters; {name!r} is a bottleneck adapter")
        for layer, attr in self._adapter_layers():
            if attr == "loras":
                layer.merge_adapter(name)

    def reset_adapter(self):
        for layer, attr in self._adapter_layers():
            if attr == "loras":
                layer.reset_adapter()

    def adapter_to(self, name: str, device=None, dtype=None):
        """Moves adapter ``name``'s modules to ``device`` and / or casts them to ``dtype``, as the
        package's adapter_to (the forward casts nothing: its input must then be of that dtype)."""
        self._check_adapter_name(name, "name")
        for module in self._adapter_modules(name):
            module.to(device=device, dtype=dtype)

    _COMBINE_STRATEGIES = ("linear", "lora_linear_only_negate_b", "lora_delta_w_svd")

    @torch.no_grad()
    def average_adapter(self, adapter_name: str, adapter_list, weights=None, combine_strategy: str = "linear",
                        normalize_weights: bool = True, overwrite_ok: bool = False, set_active: bool = False,
                        svd_rank: int | None = None):
        """Adds adapter ``adapter_name`` as the weighted average of the adapters of
        ``adapter_list`` (of one config but for dropout and init_weights), as the package's
        average_adapter: ``weights`` (default equal) divided by their sum with
        ``normalize_weights``. ``combine_strategy``: "linear" averages every weight; for LoRA,
        "lora_linear_only_negate_b" takes |weight| for A (a negative weight negates B only) and
        "lora_delta_w_svd" averages B @ A and splits it back by an SVD of rank ``svd_rank``."""
        _check_choice("combine_strategy", combine_strategy, self._COMBINE_STRATEGIES)
        names = list(adapter_list)
        if not names:
            raise ValueError("adapter_list must name at least one adapter to average, got []")
        for name in names:
            self._check_adapter_name(name, "adapter_list")
        configs = self._adapters_state.configs
        ignored = ("dropout", "init_weights", "init_weights_seed")
        config = configs[names[0]]
        key = {k: v for k, v in config.to_dict().items() if k not in ignored}
        for name in names[1:]:
            if {k: v for k, v in configs[name].to_dict().items() if k not in ignored} != key:
                raise ValueError(f"adapter_list: adapters {names[0]!r} and {name!r} have different configs; "
                                 "only adapters of one config (but for dropout and init_weights) average")
        lora = isinstance(config, LoRAConfig)
        if combine_strategy != "linear" and not lora:
            raise ValueError(f"combine_strategy {combine_strategy!r} is for LoRA adapters; {names[0]!r} is a "
                             "bottleneck adapter (use 'linear')")
        if combine_strategy == "lora_delta_w_svd" and svd_rank is None:
            raise ValueError("svd_rank must be set when using 'lora_delta_w_svd'")
        if svd_rank is not None:
            if lora:
                config = config.replace(r=svd_rank)
            else:
                logger.warning("average_adapter: svd_rank applies to LoRA adapters only; ignored")
        if weights is None:
            weights = [1.0 / len(names)] * len(names)
        elif len(weights) != len(names):
            raise ValueError(f"weights must hold one weight per adapter ({len(names)}), got {len(weights)}")
        elif normalize_weights:
            weights = [w / sum(weights) for w in weights]
        self.add_adapter(adapter_name, config, overwrite_ok=overwrite_ok)
        for layer, attr in self._adapter_layers():
            modules = getattr(layer, attr)
            if adapter_name in modules:
                modules[adapter_name].load_state_dict(
                    _averaged_state([modules[n] for n in names], weights, combine_strategy, svd_rank))
        if set_active:
            self.set_active_adapters(adapter_name)

    # -- AdapterFusion ---------------------------------------------------------------------------
    def add_adapter_fusion(self, adapter_names, config=None, name: str | None = None, overwrite_ok: bool = False,
                           set_active: bool = False):
        """Adds a fusion layer over the bottleneck adapters ``adapter_names`` (a Fuse, a list, or
        a comma-separated str), named ``name`` (default: the names joined by commas), with
        ``config`` ("dynamic", the default, "static", a dict or an AdapterFusionConfig)."""
        if isinstance(adapter_names, Fuse):
            name = adapter_names.name if name is None else name
            adapter_names = adapter_names.children
        elif isinstance(adapter_names, str):
            adapter_names = adapter_names.split(",")
        adapter_names = list(adapter_names)
        for adapter in adapter_names:
            self._check_adapter_name(adapter, "adapter_names")
            if not isinstance(self._adapters_state.configs[adapter], BnConfig):
                raise ValueError(f"adapter_names: {adapter!r} is a LoRA; AdapterFusion fuses bottleneck adapters")
        name = ",".join(adapter_names) if name is None else name
        config = load_fusion_config(config)
        fusions = self._adapters_state.fusions
        if name in fusions:
            if not overwrite_ok:
                raise ValueError(f"an adapter fusion named {name!r} already exists; pass overwrite_ok=True to replace it")
            self.delete_adapter_fusion(name)
        fusions[name] = (config, adapter_names)
        for block in self.base_model.transformer.layer:
            for layer in (block.attention_adapters, block.output_adapters):
                if layer is not None:
                    layer.add_fusion_layer(name, config, adapter_names, block.sa_layer_norm.weight)
        if set_active:
            self.set_active_adapters(Fuse(*adapter_names, name=name))

    def _fusion_name(self, adapter_names, argument: str) -> str:
        if isinstance(adapter_names, Fuse):
            name = adapter_names.name
        else:
            name = adapter_names if isinstance(adapter_names, str) else ",".join(adapter_names)
        if name not in self._adapters_state.fusions:
            raise ValueError(f"{argument}: no adapter fusion named {name!r}; this model has "
                             f"{sorted(self._adapters_state.fusions)}")
        return name

    def adapter_fusion_to(self, adapter_names, device=None, dtype=None):
        """Moves the fusion layer of ``adapter_names`` to ``device`` and / or ``dtype``."""
        for fusion in self._fusion_layers(self._fusion_name(adapter_names, "adapter_names")):
            fusion.to(device=device, dtype=dtype)

    def _fusion_layers(self, name: str):
        for layer, attr in self._adapter_layers():
            if attr == "adapters" and name in layer.adapter_fusion_layer:
                yield layer.adapter_fusion_layer[name]

    def delete_adapter_fusion(self, adapter_names):
        """Removes the fusion layer of ``adapter_names`` (a Fuse, a list, or its name); an unknown
        one is skipped with a warning, as in the package."""
        name = adapter_names.name if isinstance(adapter_names, Fuse) else (
            adapter_names if isinstance(adapter_names, str) else ",".join(adapter_names))
        if name not in self._adapters_state.fusions:
            logger.warning("delete_adapter_fusion: no adapter fusion named %r to delete; this model has %s",
                           name, sorted(self._adapters_state.fusions))
            return
        for layer, attr in self._adapter_layers():
            if attr == "adapters" and name in layer.adapter_fusion_layer:
                del layer.adapter_fusion_layer[name]
        del self._adapters_state.fusions[name]
        active = self._adapters_state.active_setup
        if active is not None and any(isinstance(b, Fuse) and b.name == name for b in active.blocks()):
            self._adapters_state.active_setup = _without_fusion(active, name)

    def train_adapter_fusion(self, adapter_setup, unfreeze_adapters: bool = False):
        """Training mode for the fusion layers of ``adapter_setup`` (a Fuse, a list of the fused
        adapters, or a block holding a Fuse as a child, e.g. Stack("lang", Fuse("a", "b"))): the
        model frozen but those fusion layers (and the setup's adapters with
        ``unfreeze_adapters``), the setup active; as in the package, the active head stays and
        its output embeddings freeze."""
        setup = self._parse_setup(adapter_setup if isinstance(adapter_setup, Stack) else Fuse(*adapter_setup))
        fuses = [setup] if isinstance(setup, Fuse) else [c for c in setup if isinstance(c, Fuse)]
        if not fuses:
            raise ValueError(f"adapter_setup must be a Fuse, a list of the fused adapters or hold a Fuse, got {setup!r}")
        self.train()
        self.freeze_model(True)
        for module in [*(f for fuse in fuses for f in self._fusion_layers(fuse.name)),
                       *(m for n in setup.flatten() if unfreeze_adapters for m in self._adapter_modules(n))]:
            for param in module.parameters():
                param.requires_grad = True
        ModelAdaptersMixin.set_active_adapters(self, setup)
        if self.base_model is not self:
            self._freeze_output_embeddings()

    def get_fusion_regularization_loss(self):
        """The package's: 0.01 * |I - W_value|^2 summed over the trainable value projections of
        every fusion layer (None without one)."""
        loss = None
        for layer, attr in self._adapter_layers():
            for fusion in getattr(layer, "adapter_fusion_layer", {}).values() if attr == "adapters" else ():
                value = getattr(fusion, "value", None)
                if value is not None and value.weight.requires_grad:
                    target = torch.eye(value.weight.shape[0], device=value.weight.device, dtype=value.weight.dtype)
                    term = 0.01 * (target - value.weight).pow(2).sum()
                    loss = term if loss is None else loss + term
        return loss

    def save_adapter_fusion(self, save_directory, adapter_names, meta_dict=None, custom_weights_loaders=None,
                            with_head=False, use_safetensors: bool = False):
        """Writes adapter_fusion_config.json and pytorch_model_adapter_fusion.bin
        (model_adapter_fusion.safetensors with ``use_safetensors``) in the package's format, and
        with ``with_head`` a head beside them, as the package: on DistilBertAdapterModel the head
        named like the fusion (or ``with_head``, a head name), on a task class its own head (the
        package fails there)."""
        _check_no_custom_loaders(custom_weights_loaders)
        name = self._fusion_name(adapter_names, "adapter_names")
        config, fused = self._adapters_state.fusions[name]
        os.makedirs(save_directory, exist_ok=True)
        _write_json(os.path.join(save_directory, ADAPTERFUSION_CONFIG_NAME),
                    {**self._file_meta(name, config.to_dict()), "adapter_names": fused, **(meta_dict or {})})
        tensors = {k: v for k, v in self.state_dict().items() if f"adapter_fusion_layer.{name}." in k}
        _save_tensors(tensors, save_directory,
                      ADAPTERFUSION_SAFE_WEIGHTS_NAME if use_safetensors else ADAPTERFUSION_WEIGHTS_NAME)
        if with_head:
            self._save_fusion_head(save_directory, with_head if isinstance(with_head, str) else name, use_safetensors)

    def _save_fusion_head(self, directory, head_name: str, use_safetensors: bool):
        """save_adapter_fusion's head: a task class's own head (DistilBertModel has none)."""
        if self.base_model is not self:
            self.save_head(directory, use_safetensors=use_safetensors)

    def _load_fusion_head(self, directory, load_as, use_safetensors, set_active):
        """load_adapter_fusion's head: a task class's head saved by the same class."""
        self._load_adapter_head(directory, load_as, use_safetensors)

    def save_all_adapter_fusions(self, save_directory, meta_dict=None, custom_weights_loaders=None,
                                 use_safetensors: bool = False):
        """save_adapter_fusion for every fusion, each into ``save_directory``/<name>, as the package
        (without heads)."""
        os.makedirs(save_directory, exist_ok=True)
        for name in self._adapters_state.fusions:
            self.save_adapter_fusion(os.path.join(save_directory, name), name, meta_dict, custom_weights_loaders,
                                     use_safetensors=use_safetensors)

    def load_adapter_fusion(self, adapter_fusion_name_or_path, load_as: str | None = None,
                            custom_weights_loaders=None, set_active: bool = False, with_head: bool = True,
                            use_safetensors: bool = False, **kwargs):
        """Loads a fusion layer saved by save_adapter_fusion here or in the package (its adapters
        must be loaded first), and with ``with_head`` the head saved beside it, if any (named
        ``load_as`` or as saved; active with ``set_active``), as the package. Returns its name
        here."""
        _check_no_custom_loaders(custom_weights_loaders)
        directory = os.fspath(adapter_fusion_name_or_path)
        meta = _read_json(os.path.join(directory, ADAPTERFUSION_CONFIG_NAME))
        saved = meta["name"]
        name = load_as or saved
        self.add_adapter_fusion(meta.get("adapter_names", saved), meta["config"], name=name, overwrite_ok=True)
        state_dict = _load_tensors(directory, ADAPTERFUSION_SAFE_WEIGHTS_NAME, ADAPTERFUSION_WEIGHTS_NAME,
                                   use_safetensors or None)
        prefix = self.base_model_prefix + "."
        own_prefix = prefix if self.base_model is not self else ""
        state_dict = {own_prefix + k.removeprefix(prefix).replace(f"adapter_fusion_layer.{saved}.",
                                                                   f"adapter_fusion_layer.{name}."): v
                      for k, v in state_dict.items() if f"adapter_fusion_layer.{saved}." in k}
        own = dict(self.named_parameters())
        expected = {k for k in self.state_dict() if f"adapter_fusion_layer.{name}." in k}
        if set(state_dict) != expected:
            self.delete_adapter_fusion(name)
            raise ValueError(f"the fusion weights in {directory} do not fit fusion {name!r} of this model: missing "
                             f"{sorted(expected - set(state_dict))[:5]}, unexpected {sorted(set(state_dict) - expected)[:5]}")
        with torch.no_grad():
            for key, value in state_dict.items():
                own[key].copy_(value)
        if set_active:
            self.set_active_adapters(Fuse(*self._adapters_state.fusions[name][1], name=name))
        if with_head and os.path.isfile(os.path.join(directory, HEAD_CONFIG_NAME)):
            self._load_fusion_head(directory, load_as, use_safetensors or None, set_active)
        return name

    # -- files ------------------------------------------------------------------------------------
    def _adapter_state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter's tensors under the package's keys: this model's state_dict keys,
        "distilbert.transformer.layer.<i>..." (bare "transformer..." on DistilBertModel)."""
        self._check_adapter_name(name)
        return {k: v for k, v in self.state_dict().items() if _is_adapter_key(k, name)}

    def save_adapter(self, save_directory, adapter_name: str, with_head: bool = True, meta_dict=None,
                     custom_weights_loaders=None, use_safetensors: bool = False):
        """Writes adapter_config.json and pytorch_adapter.bin (adapter.safetensors with
        ``use_safetensors``), plus the head if ``with_head``: the head of the same name on
        DistilBertAdapterModel, a task class's own head. The package's arguments in its order;
        ``custom_weights_loaders`` (the package's WeightsLoader objects) must be None."""
        _check_no_custom_loaders(custom_weights_loaders)
        self._check_adapter_name(adapter_name, "adapter_name")
        os.makedirs(save_directory, exist_ok=True)
        config = self._adapters_state.configs[adapter_name]
        meta = self._file_meta(adapter_name, config.to_dict())
        for key, value in (meta_dict or {}).items():
            meta.setdefault(key, value)
        _write_json(os.path.join(save_directory, ADAPTER_CONFIG_NAME), meta)
        _save_tensors(
            self._adapter_state_dict(adapter_name),
            save_directory,
            ADAPTER_SAFE_WEIGHTS_NAME if use_safetensors else ADAPTER_WEIGHTS_NAME,
        )
        if with_head:
            self._save_adapter_head(save_directory, adapter_name, use_safetensors)

    def save_adapter_setup(self, save_directory, adapter_setup, head_setup=None, meta_dict=None,
                           custom_weights_loaders=None, use_safetensors: bool = False):
        """The package's save_adapter_setup: adapter_setup.json (the setup and ``head_setup``),
        each adapter of the setup in <dir>/<name> (save_adapter, with its head), each Fuse of the
        setup (or of its children) in <dir>/<fusion name>, and the heads of ``head_setup``: True,
        the task class's own head in <dir>; a name, a list or a block of names on
        DistilBertAdapterModel, each in <dir>/<head>."""
        _check_no_custom_loaders(custom_weights_loaders)
        setup = self._parse_setup(adapter_setup)
        os.makedirs(save_directory, exist_ok=True)
        _write_json(os.path.join(save_directory, ADAPTER_SETUP_CONFIG_NAME), {
            "adapter_setup": setup.to_dict(),
            "head_setup": head_setup.to_dict() if isinstance(head_setup, Stack) else head_setup,
            "version": f"distilbert_fast.{_version()}"})
        for name in setup.flatten():
            self.save_adapter(os.path.join(save_directory, name), name, meta_dict=meta_dict,
                              use_safetensors=use_safetensors)
        for fuse in _fuses_of(setup):
            self.save_adapter_fusion(os.path.join(save_directory, fuse.name), fuse, meta_dict,
                                     use_safetensors=use_safetensors)
        if head_setup is True:
            self.save_head(save_directory, use_safetensors=use_safetensors)
        else:
            for name in _head_names(head_setup):
                self.save_head(os.path.join(save_directory, name), name, use_safetensors=use_safetensors)

    def load_adapter_setup(self, adapter_setup_name_or_path, version=None, custom_weights_loaders=None,
                           set_active: bool = False, use_safetensors: bool = False, **kwargs):
        """Loads a setup written by save_adapter_setup (here or in the package): its adapters
        (with their heads), fusions and heads; with ``set_active`` the setup is made active and,
        on DistilBertAdapterModel, its head setup the active head. Returns (adapter setup, head
        setup)."""
        _check_no_custom_loaders(custom_weights_loaders)
        directory = os.fspath(adapter_setup_name_or_path)
        meta = _read_json(os.path.join(directory, ADAPTER_SETUP_CONFIG_NAME))
        setup = Stack.from_dict(meta["adapter_setup"])
        head_setup = meta.get("head_setup")
        if isinstance(head_setup, Mapping):
            head_setup = Stack.from_dict(head_setup)
        for name in setup.flatten():
            self.load_adapter(os.path.join(directory, name), use_safetensors=use_safetensors)
        for fuse in _fuses_of(setup):
            self.load_adapter_fusion(os.path.join(directory, fuse.name), use_safetensors=use_safetensors)
        if set_active:
            self.set_active_adapters(setup)
        if head_setup is True:
            self.load_head(directory, use_safetensors=use_safetensors)
        elif head_setup:
            for name in _head_names(head_setup):
                self.load_head(os.path.join(directory, name), name, use_safetensors=use_safetensors)
            if set_active:
                self.active_head = head_setup
        return setup, head_setup

    def save_all_adapters(self, save_directory, with_head: bool = True, meta_dict=None,
                          custom_weights_loaders=None, use_safetensors: bool = False):
        """save_adapter for every adapter, each into ``save_directory``/<name>, as the package."""
        os.makedirs(save_directory, exist_ok=True)
        for name in self._adapters_state.configs:
            self.save_adapter(os.path.join(save_directory, name), name, with_head, meta_dict,
                              custom_weights_loaders, use_safetensors)

    def _task_head_state_dict(self) -> dict[str, torch.Tensor]:
        """A task class's head: every tensor outside the base model (pre_classifier and
        classifier, qa_outputs, vocab_transform ...)."""
        if self.base_model is self:
            raise ValueError(f"{type(self).__name__} has no head: save_head / load_head are for the task "
                             "classes and DistilBertAdapterModel")
        prefix = self.base_model_prefix + "."
        return {k: v for k, v in self.state_dict().items() if not k.startswith(prefix)}

    def save_head(self, save_directory, head_name=None, use_safetensors: bool = False):
        """Writes a task class's head as the package writes a model's static head: head_config.json
        naming the class (null "config" and "name", the labels) and pytorch_model_head.bin
        (model_head.safetensors with ``use_safetensors``). The one head has no name:
        ``head_name`` is ignored, as in the package."""
        tensors = self._task_head_state_dict()
        os.makedirs(save_directory, exist_ok=True)
        meta = self._file_meta(None, None)
        meta["label2id"] = dict(self.config.label2id)
        meta["num_labels"] = self.config.num_labels
        _write_json(os.path.join(save_directory, HEAD_CONFIG_NAME), meta)
        _save_tensors(tensors, save_directory, HEAD_SAFE_WEIGHTS_NAME if use_safetensors else HEAD_WEIGHTS_NAME)

    def load_head(self, save_directory, load_as=None, id2label=None, use_safetensors: bool | None = None):
        """Loads a head written by ``save_head`` of the same task class (here or in the package)
        into this model's head, and its labels (or ``id2label``) into the config. Tied output
        embeddings (the masked-LM projector) keep this model's word embeddings. ``load_as`` is
        ignored: the one head has no name."""
        directory = os.fspath(save_directory)
        tensors = self._task_head_state_dict()
        meta = _read_json(os.path.join(directory, HEAD_CONFIG_NAME))
        if meta.get("model_class") != type(self).__name__:
            raise ValueError(f"the head in {directory} belongs to a {meta.get('model_class')!r}, "
                             f"not a {type(self).__name__}")
        state_dict = _load_tensors(directory, HEAD_SAFE_WEIGHTS_NAME, HEAD_WEIGHTS_NAME, use_safetensors)
        missing, unexpected = sorted(set(tensors) - set(state_dict)), sorted(set(state_dict) - set(tensors))
        if missing or unexpected:
            raise ValueError(f"the head weights in {directory} do not fit {type(self).__name__}'s head: "
                             f"missing {missing}, unexpected {unexpected}")
        for key, value in state_dict.items():
            if tensors[key].shape != value.shape:
                raise ValueError(f"{key}: shape {tuple(value.shape)} in {directory}, model has {tuple(tensors[key].shape)}")
        tied = self.get_output_embeddings()
        tied = tied.weight if tied is not None and tied.weight is self.get_input_embeddings().weight else None
        own = dict(self.named_parameters(remove_duplicate=False))
        own.update(self.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for key, value in state_dict.items():
                if own[key] is not tied:
                    own[key].copy_(value)
        label2id = {label: i for i, label in id2label.items()} if id2label else meta.get("label2id")
        if label2id:
            self.config.label2id = {label: int(i) for label, i in label2id.items()}
            self.config.id2label = {int(i): label for label, i in label2id.items()}

    def _save_adapter_head(self, directory, adapter_name: str, use_safetensors: bool):
        """save_adapter's head (with_head): a task class's own head, as in the package."""
        if self.base_model is not self:
            self.save_head(directory, use_safetensors=use_safetensors)

    def _load_adapter_head(self, directory, name: str, use_safetensors: bool | None, id2label=None):
        """load_adapter's head (with_head): a task class's head saved with the adapter by the same
        class; one of another class is skipped with a warning, as in the package."""
        if self.base_model is self:
            return
        model_class = _read_json(os.path.join(directory, HEAD_CONFIG_NAME)).get("model_class")
        if model_class != type(self).__name__:
            logger.warning("load_adapter: the head in %s belongs to a %s, not a %s; it is not loaded",
                           directory, model_class, type(self).__name__)
            return
        self.load_head(directory, id2label=id2label, use_safetensors=use_safetensors)

    def load_adapter(self, adapter_name_or_path, config=None, version=None, model_name=None,
                     load_as: str | None = None, with_head: bool = True, custom_weights_loaders=None,
                     leave_out=None, id2label=None, set_active: bool = False,
                     use_safetensors: bool | None = None):
        """Loads an adapter saved by ``save_adapter`` here or in the ``adapters`` package (a local
        directory), with its head (``with_head``; ``id2label`` renames its labels). Returns its
        name in this model. The package's arguments in its order: ``config``, ``version`` and
        ``model_name`` pick among the Hub's adapters there, so a local directory ignores them (as
        the package does); ``custom_weights_loaders`` must be None."""
        _check_no_custom_loaders(custom_weights_loaders)
        if config is not None or version is not None or model_name is not None:
            logger.warning("load_adapter: config, version and model_name choose among the Hub's adapters; "
                           "%s's adapter_config.json decides here", adapter_name_or_path)
        directory = os.fspath(adapter_name_or_path)
        meta = _read_json(os.path.join(directory, ADAPTER_CONFIG_NAME))
        if "config" not in meta or "name" not in meta:
            raise ValueError(f"{directory}/{ADAPTER_CONFIG_NAME} lacks the 'config' and 'name' entries")
        if meta.get("model_type", "distilbert") != "distilbert":
            raise ValueError(f"the adapter in {directory} is for model_type {meta['model_type']!r}, not 'distilbert'")
        if meta.get("hidden_size") not in (None, self.config.dim):
            raise ValueError(
                f"the adapter in {directory} is for hidden_size {meta['hidden_size']}, this model has {self.config.dim}"
            )
        config_dict = dict(meta["config"])
        if leave_out is not None:
            config_dict["leave_out"] = sorted(set(leave_out) | set(config_dict.get("leave_out") or []))
        saved_name = meta["name"]
        name = load_as or saved_name
        state_dict = _load_tensors(directory, ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME, use_safetensors)
        left_out = set(config_dict.get("leave_out") or [])  # their saved weights are dropped, as in the package
        state_dict = {
            _rename_adapter_key(k, saved_name, name): v
            for k, v in state_dict.items() if _is_adapter_key(k, saved_name) and _layer_of_key(k) not in left_out
        }
        if name in self._adapters_state.configs:
            logger.warning("load_adapter: replacing the existing adapter %r", name)
        self.add_adapter(name, config_dict, overwrite_ok=True)
        try:
            self._load_adapter_tensors(name, state_dict, directory)
            if with_head and os.path.isfile(os.path.join(directory, HEAD_CONFIG_NAME)):
                self._load_adapter_head(directory, name, use_safetensors, id2label)
        except Exception:
            self.delete_adapter(name)
            raise
        if set_active:
            self.set_active_adapters(name)
        return name

    def _load_adapter_tensors(self, name, state_dict, directory):
        # Files hold the saving model's keys: "distilbert." + ... from a task or heads model, bare
        # from a base model (in either library); this model's may be either.
        prefix = self.base_model_prefix + "."
        own_prefix = prefix if self.base_model is not self else ""
        state_dict = {own_prefix + k.removeprefix(prefix): v for k, v in state_dict.items()}
        expected = self._adapter_state_dict(name)
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"the adapter weights in {directory} do not fit adapter {name!r} of this model: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        own = dict(self.named_parameters(remove_duplicate=False))  # ln_before is also adapter_down.0
        own.update(self.named_buffers(remove_duplicate=False))
        with torch.no_grad():
            for key, value in state_dict.items():
                target = own[key]
                if target.shape != value.shape:
                    raise ValueError(f"{key}: shape {tuple(value.shape)} in {directory}, model has {tuple(target.shape)}")
                target.copy_(value)

    def _file_meta(self, name: str, config) -> dict:
        """The package's build_full_config: what adapter_config.json / head_config.json hold."""
        return {
            "config": config,
            "hidden_size": self.config.dim,
            "model_class": type(self).__name__,
            "model_name": getattr(self.config, "_name_or_path", None) or getattr(self.config, "name_or_path", None),
            "model_type": "distilbert",
            "name": name,
            "version": f"distilbert_fast.{_version()}",
        }

    # -- surviving save_pretrained / from_pretrained ---------------------------------------------
    def _adapters_to_config(self):
        """Records the adapters in the config as the package does (config.adapters), so
        from_pretrained rebuilds them before loading the weights."""
        self.config.adapters = {
            "adapters": {name: name for name in self._adapters_state.configs},
            "config_map": {name: c.to_dict() for name, c in self._adapters_state.configs.items()},
            # (each fusion's config under its own name; the package's reader takes any key)
            "fusions": {name: name for name in self._adapters_state.fusions},
            "fusion_config_map": {name: c.to_dict() for name, (c, _) in self._adapters_state.fusions.items()},
            "fusion_name_map": {name: list(fused) for name, (_, fused) in self._adapters_state.fusions.items()
                                if name != ",".join(fused)},
        }

    def _adapters_from_config(self):
        recorded = getattr(self.config, "adapters", None) or {}
        config_map = recorded.get("config_map", {})
        for name, key in recorded.get("adapters", {}).items():
            if name not in self._adapters_state.configs:
                self.add_adapter(name, config_map.get(key, key))
        fusion_configs, fused = recorded.get("fusion_config_map", {}), recorded.get("fusion_name_map", {})
        for name, key in recorded.get("fusions", {}).items():
            if name not in self._adapters_state.fusions:
                self.add_adapter_fusion(fused.get(name, name.split(",")), fusion_configs.get(key, key), name=name)


def _fuses_of(setup: Stack) -> list:
    """The Fuse blocks a saved setup carries: itself, or its children (as the package's)."""
    return [setup] if isinstance(setup, Fuse) else [child for child in setup if isinstance(child, Fuse)]


def _head_names(head_setup) -> list[str]:
    """The heads of save_adapter_setup's head_setup (a name, a list, a block; None / False: none)."""
    if not head_setup:
        return []
    if isinstance(head_setup, str):
        return [head_setup]
    return sorted(head_setup.flatten()) if isinstance(head_setup, Stack) else list(head_setup)


def _version() -> str:
    from . import __version__

    return __version__


def _averaged_state(modules, weights, strategy: str, svd_rank) -> dict[str, torch.Tensor]:
    """The state_dict of the weighted average of ``modules`` (one place's adapters), by the
    package's combine strategies (see average_adapter)."""
    if strategy == "lora_delta_w_svd":
        delta_w = sum(w * m.delta_w for m, w in zip(modules, weights))  # (out_features, in_features)
        u, s, v = torch.linalg.svd(delta_w)
        return {"lora_A": v[:svd_rank], "lora_B": u[:, :svd_rank] @ torch.diag(s[:svd_rank])}
    average = {}
    for module, weight in zip(modules, weights):
        for key, value in module.state_dict().items():
            negate_b_only = strategy == "lora_linear_only_negate_b" and "lora_A" in key
            average[key] = average.get(key, 0) + (abs(weight) if negate_b_only else weight) * value
    return average


def _without(setup: Stack, name: str) -> Stack | None:
    """``setup`` with adapter ``name`` left out (None when nothing is left): out of a Stack or a
    Parallel; a Fuse, Split or BatchSplit holding it goes as a whole (its fusion, splits or
    batch sizes no longer fit)."""
    if type(setup) not in (Stack, Parallel):
        return None if name in setup.flatten() else setup
    children = []
    for child in setup:
        if isinstance(child, Stack):
            child = _without(child, name)
        if child is not None and child != name:
            children.append(child)
    return type(setup)(*children) if children else None


def _without_fusion(setup: Stack, name: str) -> Stack | None:
    """``setup`` without its Fuse named ``name`` (the whole setup where it is that Fuse), as the
    package's delete_adapter_fusion resets an active setup of that fusion."""
    if isinstance(setup, Fuse):
        return None if setup.name == name else setup
    children = [child for child in setup if not (isinstance(child, Fuse) and child.name == name)]
    return type(setup)(*children, **setup._kwargs()) if children else None


_LABEL_INPUTS = ("labels", "start_positions", "end_positions")


def _taking_adapter_names(forward):
    """Wraps a model class's forward so it takes ``adapter_names=``: the adapter setup (a name, a
    list = Stack, a Stack or a Parallel) for this call, in place of the active adapters; and
    ``task_ids=``: a MultiTask setup's task of each row (as the package's forward context)."""
    signature = inspect.signature(forward)
    takes_it = "adapter_names" in signature.parameters
    # adapter_names comes after forward's positional arguments, also as one: clients that call
    # forward with every argument in signature order (torch.onnx's TorchScript-based exporter) pass
    # it by position
    positional = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in signature.parameters.values()) - 1  # self

    @functools.wraps(forward)
    def forward_with_adapters(self, *args, adapter_names=None, output_adapter_fusion_attentions=False,
                              output_adapter_gating_scores=False, task_ids=None, **kwargs):
        if task_ids is not None:  # (a MultiTask setup's rows, read by the adapter layers)
            with self._adapters_state.calling(task_ids=task_ids):
                return forward_with_adapters(self, *args, adapter_names=adapter_names,
                                             output_adapter_fusion_attentions=output_adapter_fusion_attentions,
                                             output_adapter_gating_scores=output_adapter_gating_scores, **kwargs)
        if not (output_adapter_fusion_attentions or output_adapter_gating_scores):
            return run(self, *args, adapter_names=adapter_names, **kwargs)
        # the package's ForwardContext outputs: each fusion layer's attention over its adapters
        # (and gating scores, always empty: gating is not implemented)
        attentions = {}
        token = _FUSION_ATTENTIONS.set(attentions if output_adapter_fusion_attentions else None)
        try:
            out = run(self, *args, adapter_names=adapter_names, **kwargs)
        finally:
            _FUSION_ATTENTIONS.reset(token)
        mask = signature.bind_partial(self, *args[:positional], **kwargs).arguments.get("attention_mask")
        extra = {}
        if output_adapter_gating_scores:
            extra["adapter_gating_scores"] = {}
        if output_adapter_fusion_attentions:
            extra["adapter_fusion_attentions"] = _padded_attentions(attentions, mask)
        if isinstance(out, tuple):
            return out + tuple(extra.values())
        for key, value in extra.items():
            out[key] = value
        return out

    def run(self, *args, adapter_names=None, **kwargs):
        if not takes_it and len(args) > positional:
            args, adapter_names = args[:positional], args[positional]
        if takes_it:  # the class handles adapter_names itself (DistilBertAdapterModel)
            kwargs["adapter_names"] = adapter_names
        if adapter_names is None and not self._adapters_state.configs:
            return forward(self, *args, **kwargs)  # (no context variable for a compiler to break on)
        setup = None if adapter_names is None else self._parse_setup(adapter_names, "adapter_names")
        in_force = setup if setup is not None else self._adapters_state.current_setup()
        if in_force is not None and in_force.parallel_channels > 1 and not self._parallel_labels_ok:
            given = [k for k in _LABEL_INPUTS if kwargs.get(k) is not None]
            if given:
                raise ValueError(
                    f"{given[0]} with the Parallel adapter setup {in_force!r}: {type(self).__name__}'s "
                    "one head sees every copy of the batch; leave out the labels, or use "
                    "DistilBertAdapterModel with a head per adapter"
                )
        if takes_it or setup is None:
            return forward(self, *args, **kwargs)
        with self._adapters_state.calling(setup):
            return forward(self, *args, **kwargs)

    if not takes_it:
        parameters = list(signature.parameters.values())
        at = next((i for i, p in enumerate(parameters) if p.kind != p.POSITIONAL_OR_KEYWORD), len(parameters))
        parameters.insert(at, inspect.Parameter("adapter_names", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None))
        at = next((i for i, p in enumerate(parameters) if p.kind == p.VAR_KEYWORD), len(parameters))
        parameters[at:at] = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=False) for name in
                             ("output_adapter_fusion_attentions", "output_adapter_gating_scores")]
        parameters.insert(at + 2, inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None))
        forward_with_adapters.__signature__ = signature.replace(parameters=parameters)
    forward_with_adapters._takes_adapter_names = True
    return forward_with_adapters


def _padded_attentions(attentions: dict, attention_mask) -> dict:
    """{fusion: {layer: {location: (batch, seq, n_adapters) numpy array}}}, as the package returns
    them: a padded batch that ran packed gets its tokens' attentions scattered back (zeros at
    padding, as our token outputs); packed input keeps (total, n_adapters)."""
    mask = None if attention_mask is None else attention_mask.reshape(-1, attention_mask.shape[-1]).bool().cpu()
    result = {}
    for name, layers in attentions.items():
        for layer, places in layers.items():
            for place, probs in places.items():
                if probs.dim() == 2 and mask is not None:  # (total, n): packed tokens of a padded batch
                    copies = mask.repeat(probs.shape[0] // int(mask.sum()), 1)  # (a Parallel's copies)
                    padded = probs.new_zeros(*copies.shape, probs.shape[-1])
                    padded[copies] = probs
                    probs = padded
                result.setdefault(name, {}).setdefault(layer, {})[place] = probs.numpy()
    return result


def _is_adapter_key(key: str, name: str) -> bool:
    return any(f"{group}.{name}." in key for group in _WEIGHT_GROUPS)


def _check_no_custom_loaders(custom_weights_loaders):
    if custom_weights_loaders:
        raise ValueError("custom_weights_loaders must be None: the adapters package's WeightsLoader objects "
                         f"do not apply to distilbert_fast, got {custom_weights_loaders!r}")


def _layer_of_key(key: str) -> int | None:
    """The block index of a state_dict key "[distilbert.]transformer.layer.<i>....", else None."""
    parts = key.split(".")
    at = parts.index("layer") if "layer" in parts else -1
    return int(parts[at + 1]) if at > 0 and parts[at - 1] == "transformer" and parts[at + 1].isdigit() else None


def _rename_adapter_key(key: str, old: str, new: str) -> str:
    for group in _WEIGHT_GROUPS:
        key = key.replace(f"{group}.{old}.", f"{group}.{new}.")
    return key


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc


def _save_tensors(tensors, directory, filename):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    path = os.path.join(directory, filename)
    if filename.endswith(".safetensors"):
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory (ln_before's LayerNorm has two names)
        save_file({k: v.clone() for k, v in tensors.items()}, path)
    else:
        torch.save(tensors, path)


def _load_tensors(directory, safe_name, torch_name, use_safetensors):
    """The tensors of ``directory``/``safe_name`` or ``torch_name`` (safetensors preferred
    unless ``use_safetensors`` is False), loaded with weights_only=True."""
    candidates = [] if use_safetensors is False else [safe_name]
    candidates += [] if use_safetensors is True else [torch_name]
    for filename in candidates:
        path = os.path.join(directory, filename)
        if not os.path.isfile(path):
            continue
        if filename.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - corrupt files fail in the unpickler in many ways
            raise ValueError(f"cannot load {path} with torch.load(weights_only=True): {exc}") from exc
    raise FileNotFoundError(f"{directory} holds none of {candidates}")


__all__ = [
    "ADAPTER_CONFIG_MAP",
    "AdapterConfig",
    "AdapterSetup",
    "BnConfig",
    "BottleneckAdapter",
    "BottleneckLayer",
    "DoubleSeqBnConfig",
    "LoRA",
    "LoRAConfig",
    "LoRALinear",
    "ModelAdaptersMixin",
    "MultiTask",
    "AdapterFusionConfig",
    "Average",
    "BatchSplit",
    "DynamicAdapterFusionConfig",
    "Fuse",
    "StaticAdapterFusionConfig",
    "ParBnConfig",
    "Parallel",
    "SeqBnConfig",
    "Split",
    "Stack",
    "load_adapter_config",
    "parse_composition",
]
