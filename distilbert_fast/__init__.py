"""distilbert_fast: a drop-in, fast DistilBERT for PyTorch.

    from distilbert_fast import DistilBertForSequenceClassification
    model = DistilBertForSequenceClassification.from_pretrained("path/to/local/checkpoint")

The classes mirror HuggingFace's (names, parameters, state_dict keys, forward arguments,
outputs). The hot ops run on a backend chosen per call: see ``distilbert_fast.ops``.
"""

from . import _extension, ops
from .adapters import AdapterSetup, BnConfig, DoubleSeqBnConfig, LoRAConfig, Parallel, ParBnConfig, SeqBnConfig, Stack
from .adapters import AdapterFusionConfig, Average, BatchSplit, Fuse, MultiTask, Split
from .configuration import DistilBertConfig
from .heads import DistilBertAdapterModel, DistilBertModelWithHeads, MultiHeadOutput
from .modeling import (
    DistilBertForMaskedLM,
    DistilBertForMultipleChoice,
    DistilBertForQuestionAnswering,
    DistilBertForSequenceClassification,
    DistilBertForTokenClassification,
    DistilBertModel,
    DistilBertPreTrainedModel,
)
from .integrations.optimize import is_optimized, optimize, unoptimize
from .ops import available_backends, last_backend, set_default_backend, use_backend
from .tokenization import BatchEncoding, DistilBertTokenizer, DistilBertTokenizerFast
from .outputs import (
    BaseModelOutput,
    MaskedLMOutput,
    ModelOutput,
    MultipleChoiceModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutput,
    TokenClassifierOutput,
)

__version__ = "0.1.0"
BUILD_INFO = _extension.BUILD_INFO

__all__ = [
    "BUILD_INFO",
    "AdapterFusionConfig",
    "AdapterSetup",
    "BaseModelOutput",
    "BatchEncoding",
    "BnConfig",
    "DistilBertAdapterModel",
    "DistilBertConfig",
    "DistilBertForMaskedLM",
    "DistilBertForMultipleChoice",
    "DistilBertForQuestionAnswering",
    "DistilBertForSequenceClassification",
    "DistilBertForTokenClassification",
    "DistilBertModel",
    "DistilBertModelWithHeads",
    "DistilBertPreTrainedModel",
    "DistilBertTokenizer",
    "DistilBertTokenizerFast",
    "DoubleSeqBnConfig",
    "Average",
    "BatchSplit",
    "Fuse",
    "LoRAConfig",
    "MaskedLMOutput",
    "ModelOutput",
    "MultiHeadOutput",
    "MultiTask",
    "MultipleChoiceModelOutput",
    "ParBnConfig",
    "Parallel",
    "QuestionAnsweringModelOutput",
    "SeqBnConfig",
    "SequenceClassifierOutput",
    "Split",
    "Stack",
    "TokenClassifierOutput",
    "available_backends",
    "is_optimized",
    "optimize",
    "unoptimize",
    "last_backend",
    "ops",
    "set_default_backend",
    "use_backend",
]
