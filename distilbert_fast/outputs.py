"""Model outputs with HuggingFace's field names and behaviour.

An output works by attribute (``out.logits``), by key (``out["logits"]``), by index over the
fields that are set (``out[0]``) and as a tuple (``out.to_tuple()``); fields left as None are
skipped by keys, indexing and ``to_tuple``, exactly as in ``transformers.utils.ModelOutput``.
"""

from collections import OrderedDict
from dataclasses import dataclass, fields

import torch


class ModelOutput(OrderedDict):
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
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
        for field in fields(self):
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
        # Pickle as the dataclass it is, not as an OrderedDict.
        return type(self), tuple(getattr(self, f.name) for f in fields(self))

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
