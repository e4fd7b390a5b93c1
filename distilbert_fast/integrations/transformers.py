"""The transformers side of our classes, imported only where transformers is already loaded:

- a twin of each output class that is also a ``transformers.utils.ModelOutput``, which pipelines
  and Trainer test for with isinstance (see ``distilbert_fast.outputs``);
- a twin of each model class that is also a ``transformers.PreTrainedModel``, which
  ``Trainer._save`` tests for before it calls ``save_pretrained`` (otherwise it writes a bare
  safetensors state_dict: no config.json, and an error on tied weights). See ``model_twin``.
"""

import copyreg
import sys
from dataclasses import dataclass

import torch.nn as nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput as TransformersModelOutput

_TWINS: dict[type, type] = {}


def output_twin(cls: type) -> type:
    """The subclass of both ``cls`` (one of our dataclass outputs) and transformers' ModelOutput,
    with the same name and fields, made once per class. It is registered in this module under
    its name, so it pickles; its ``__reduce__`` pickles as ``cls`` itself."""
    twin = _TWINS.get(cls)
    if twin is None:
        body = {"__module__": __name__, "__qualname__": cls.__qualname__, "_transformers_twin": True}
        twin = dataclass(type(cls.__name__, (cls, TransformersModelOutput), body))
        _TWINS[cls] = twin
        setattr(sys.modules[__name__], cls.__name__, twin)
    return twin


class _Absent:
    """A class attribute that reads as missing (AttributeError, so ``hasattr`` is False): hides a
    PreTrainedModel method our class does not have. Assigning the name on an instance still works
    (a non-data descriptor)."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, instance, owner=None):
        raise AttributeError(f"{owner.__name__!r} object has no attribute {self.name!r}")


class _PreTrainedModelBase(PreTrainedModel):
    """PreTrainedModel as a base for isinstance only: its __init__ (which wants a transformers
    config and sets up loading machinery) is skipped; our class's __init__ runs instead."""

    def __init__(self, *args, **kwargs):
        nn.Module.__init__(self)


# PreTrainedModel's own properties that work on any module and that Trainer reads on a PreTrainedModel
_KEPT = frozenset({"is_activation_checkpointing"})


def _resolve(cls: type, name: str):
    """(defining class, raw attribute) of ``name`` along ``cls``'s MRO, or (None, None)."""
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass, klass.__dict__[name]
    return None, None


def _is_plain_data(value) -> bool:
    return not callable(value) and not hasattr(value, "__get__")


def model_twin(cls: type) -> type:
    """The subclass of both ``cls`` (one of our model classes) and transformers' PreTrainedModel,
    made once per class, with ``cls``'s name. transformers' clients that branch on
    ``isinstance(model, PreTrainedModel)`` (Trainer's save, DDP's unused-parameter choice) then
    take their PreTrainedModel path, which calls our ``save_pretrained``.

    The twin behaves exactly as ``cls``: every method and property it has comes from ``cls`` (or
    torch's nn.Module, as for ``cls``); PreTrainedModel's methods that ``cls`` lacks read as
    missing, so clients probing with ``hasattr`` see what they see on ``cls``; only
    PreTrainedModel's class-level defaults (``_keys_to_ignore_on_save = None``...) show through.
    A twin pickles and deep-copies as ``cls`` (which makes the twin again where transformers is
    loaded)."""
    twin = _TWINS.get(cls)
    if twin is not None:
        return twin
    body = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "_transformers_twin": True,
            "__reduce_ex__": _reduce_as_base, "is_custom_code": classmethod(_is_custom_code)}
    module_side = set(nn.Module.__mro__)
    for klass in PreTrainedModel.__mro__:
        if klass in module_side:
            continue
        for name, value in klass.__dict__.items():
            if name.startswith("__") or name in body or name in _KEPT:
                continue
            owner, ours = _resolve(cls, name)
            if owner is not None and owner not in module_side:
                continue  # cls's own attribute comes first in the twin's MRO anyway
            if owner is not None:
                body[name] = ours  # nn.Module's, which PreTrainedModel would otherwise override
            elif not _is_plain_data(value):
                body[name] = _Absent()
    twin = type(cls.__name__, (cls, _PreTrainedModelBase), body)
    _TWINS[cls] = twin
    return twin


def _is_custom_code(cls) -> bool:
    """True: transformers' internals (PEFT's weight-conversion lookup walks every PreTrainedModel
    in a model) must treat our class as modeling code of its own, not as its native class of the
    same name, and apply no checkpoint conversions of theirs."""
    return True


def _reduce_as_base(self, protocol):
    """Pickles (and deep-copies) a twin as its plain class, made again by that class's __new__
    (which gives the twin again where transformers is loaded), so the pickle loads without
    transformers."""
    reduced = nn.Module.__reduce_ex__(self, protocol)
    if reduced[0] is copyreg.__newobj__ and reduced[1] == (type(self),):
        base = type(self).__mro__[1]
        reduced = (base.__new__, (base,), *reduced[2:])
    return reduced
