"""The transformers side of our outputs: a twin of each output class that is also a
``transformers.utils.ModelOutput``, which pipelines and Trainer test for with isinstance.

Imported only where transformers is already loaded (see ``distilbert_fast.outputs``)."""

import sys
from dataclasses import dataclass

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
