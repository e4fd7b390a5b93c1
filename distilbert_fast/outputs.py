"""Model outputs with HuggingFace's field names and behaviour.

An output works by attribute (``out.logits``), by key (``out["logits"]``), by index over the
fields that are set (``out[0]``) and as a tuple (``out.to_tuple()``); fields left as None are
skipped by keys, indexing and ``to_tuple``, exactly as in ``transformers.utils.ModelOutput``.

Where transformers has been imported (a Trainer, a pipeline or sentence-transformers is in use),
an output is created as a subclass of both our class and ``transformers.utils.ModelOutput``
(built once per class by ``distilbert_fast.integrations.transformers``), because those clients
test ``isinstance(out, transformers.utils.ModelOutput)``. Without transformers loaded, nothing of
it is imported.
"""

import sys
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch

from .ops.custom import tracing


class ModelOutput(OrderedDict):
    # True on the transformers-compatible twins (see distilbert_fast.integrations.transformers)
    _transformers_twin = False

    def __new__(cls, *args, **kwargs):
        # Under a tracer the plain class (a registered pytree node) is made: the twins are
        # transformers' pytree nodes, which torch.export does not take, and creating one while
        # dynamo traces would break the graph.
        if not cls._transformers_twin and "transformers" in sys.modules and not tracing():
            from .integrations.transformers import output_twin

            cls = output_twin(cls)
        return super().__new__(cls)  # (no arguments: torch 2.11's dynamo traces dict.__new__(cls) only)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("_transformers_twin"):
            return  # transformers.utils.ModelOutput registers its own subclasses
        # Let torch.compile / torch.export / DDP see through outputs as they do through dicts.
        flatten = lambda out: (list(out.values()), list(out.keys()))  # noqa: E731
        unflatten = lambda values, keys: cls(**dict(zip(keys, values)))  # noqa: E731
        torch.utils._pytree.register_pytree_node(
            cls,
            flatten,
            unflatten,
            serialized_type_name=f"{cls.__module__}.{cls.__name__}",
        )

    def __post_init__(self):
        class_fields = fields(self)
        first = getattr(self, class_fields[0].name)
        if isinstance(first, dict) and all(getattr(self, f.name) is None for f in class_fields[1:]):
            # transformers' rule: an output made from one mapping takes its fields from it
            # (accelerate's convert_to_fp32 under mixed precision rebuilds outputs as type(out)(dict))
            super().__setattr__(class_fields[0].name, None)
            OrderedDict.__delitem__(self, class_fields[0].name)  # (set by __init__'s setattr)
            for name, value in first.items():
                setattr(self, name, value)
            return
        for field in class_fields:
            value = getattr(self, field.name)
            if value is not None:
                super().__setitem__(field.name, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def __setattr__(self, name, value):
        if value is not None and name in self.__dataclass_fields__:
            super().__setitem__(name, value)
        super().__setattr__(name, value)

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        super().__setattr__(key, value)

    def _immutable(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} does not support removing or bulk-updating keys")

    __delitem__ = pop = popitem = setdefault = update = clear = _immutable

    def __reduce__(self):
        # Pickle as the dataclass it is, not as an OrderedDict (a twin pickles as our class).
        cls = type(self).__bases__[0] if self._transformers_twin else type(self)
        return cls, tuple(getattr(self, f.name) for f in fields(self))

    def to_tuple(self) -> tuple:
        return tuple(self[k] for k in self.keys())


@dataclass
class BaseModelOutput(ModelOutput):
    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class _LogitsOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class MaskedLMOutput(_LogitsOutput):
    """logits: (batch, seq, vocab_size)"""


@dataclass
class SequenceClassifierOutput(_LogitsOutput):
    """logits: (batch, num_labels)"""


@dataclass
class TokenClassifierOutput(_LogitsOutput):
    """logits: (batch, seq, num_labels)"""


@dataclass
class MultipleChoiceModelOutput(_LogitsOutput):
    """logits: (batch, num_choices)"""


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
