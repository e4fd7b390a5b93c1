"""DistilBertConfig: HuggingFace's DistilBERT configuration, read from and written to config.json."""

import copy
import json
import logging
import os
from typing import Any

logger = logging.getLogger("distilbert_fast")

CONFIG_NAME = "config.json"

PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")

# Keys that configure a run, not the model: accepted for compatibility, never written out
# (_attn_implementation is transformers' run-time choice too: its to_dict drops it).
_RUNTIME_ONLY = ("backend", "_attn_implementation")

# transformers' attention implementation names a model accepts (set_attn_implementation,
# from_pretrained's attn_implementation=): all run our attention op, with eager's values.
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")

# transformers' PreTrainedConfig() values of the keys every config has: to_diff_dict leaves out a
# key whose value is this default, as transformers' does (the architecture keys are always kept).
_BASE_DEFAULTS = {
    "architectures": None, "output_hidden_states": False, "return_dict": True, "dtype": None,
    "chunk_size_feed_forward": 0, "is_encoder_decoder": False, "id2label": {0: "LABEL_0", 1: "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "problem_type": None, "_name_or_path": "", "output_attentions": False,
}

# transformers' from_pretrained keywords about loading, not the model: never stored in the config.
LOADING_KWARGS = (
    "device_map", "low_cpu_mem_usage", "attn_implementation", "cache_dir", "force_download",
    "local_files_only", "token", "revision", "trust_remote_code", "proxies", "subfolder",
    "use_auth_token", "resume_download", "_from_auto", "_from_pipeline", "_commit_hash",
    "adapter_kwargs", "key_mapping", "offload_folder", "offload_state_dict", "variant",
    "weights_only", "tp_plan",
)


class DistilBertConfig:
    """Configuration of a DistilBERT model, with HuggingFace's parameters, defaults and aliases.

    Unknown keyword arguments are kept as attributes and written back by ``to_dict``, as
    HuggingFace does, so a config.json round-trips through this class unchanged.
    """

    model_type = "distilbert"
    # transformers' class attributes of a config that is not composite (clients read them)
    sub_configs: dict = {}
    base_config_key = ""
    # the hub revision a transformers config was loaded from; transformers 5.17's pipeline()
    # reads it from any model's config (a class attribute: never written to config.json)
    _commit_hash = None
    attribute_map = {
        "hidden_size": "dim",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
    }

    def __init__(
        self,
        vocab_size: int = 30522,
        max_position_embeddings: int = 512,
        sinusoidal_pos_embds: bool = False,
        n_layers: int = 6,
        n_heads: int = 12,
        dim: int = 768,
        hidden_dim: int = 4 * 768,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation: str = "gelu",
        initializer_range: float = 0.02,
        qa_dropout: float = 0.1,
        seq_classif_dropout: float = 0.2,
        pad_token_id: int | None = 0,
        **kwargs: Any,
    ):
        # Aliases may arrive as keywords too (hidden_size=..., num_hidden_layers=...).
        for alias, name in self.attribute_map.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name == "dim":
                    dim = value
                elif name == "n_heads":
                    n_heads = value
                else:
                    n_layers = value

        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.sinusoidal_pos_embds = sinusoidal_pos_embds
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.dim = dim
        self.hidden_dim = hidden_dim
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation = activation
        self.initializer_range = initializer_range
        self.qa_dropout = qa_dropout
        self.seq_classif_dropout = seq_classif_dropout
        self.pad_token_id = pad_token_id

        # The parts of HuggingFace's PretrainedConfig that DistilBERT's models read.
        self.bos_token_id = kwargs.pop("bos_token_id", None)
        self.eos_token_id = kwargs.pop("eos_token_id", None)
        self.tie_word_embeddings = kwargs.pop("tie_word_embeddings", True)
        self.output_attentions = kwargs.pop("output_attentions", False)
        self.output_hidden_states = kwargs.pop("output_hidden_states", False)
        self.return_dict = kwargs.pop("return_dict", True)
        self.chunk_size_feed_forward = kwargs.pop("chunk_size_feed_forward", 0)
        self.architectures = kwargs.pop("architectures", None)
        self.problem_type = kwargs.pop("problem_type", None)
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"problem_type must be one of {PROBLEM_TYPES} or None, got {self.problem_type!r}"
            )

        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
            if num_labels is not None and num_labels != len(self.id2label):
                # as transformers: num_labels wins, the labels are renamed (with a warning)
                label2id = None
                self.num_labels = num_labels
        else:
            self.num_labels = 2 if num_labels is None else num_labels
        if label2id is not None:
            self.label2id = {k: int(v) for k, v in label2id.items()}
        elif "label2id" not in self.__dict__:
            self.label2id = {v: k for k, v in self.id2label.items()}

        # Not part of the model: which op backend to run (see distilbert_fast.ops).
        self.backend = kwargs.pop("backend", None)
        # transformers' bookkeeping every config has: where it was loaded from (name_or_path), the
        # dtype the weights were saved in, the attention implementation a model runs (set by
        # model.set_attn_implementation; never saved), and that DistilBERT is no encoder-decoder
        self._name_or_path = str(kwargs.pop("name_or_path", kwargs.pop("_name_or_path", "")))
        self.dtype = kwargs.pop("dtype", None)
        torch_dtype = kwargs.pop("torch_dtype", None)  # its old name
        if self.dtype is None and torch_dtype is not None:
            self.dtype = str(torch_dtype).removeprefix("torch.")
        self.is_encoder_decoder = kwargs.pop("is_encoder_decoder", False)
        self._attn_implementation = kwargs.pop("attn_implementation", kwargs.pop("_attn_implementation", None))

        # Keep whatever else the file held (transformers_version, dtype, ...) so it round-trips.
        for key, value in kwargs.items():
            setattr(self, key, value)

    # -- aliases ---------------------------------------------------------------------------------
    def __setattr__(self, key, value):
        super().__setattr__(self.attribute_map.get(key, key), value)

    def __getattr__(self, key):
        # Called only when normal lookup fails: resolve aliases.
        name = type(self).attribute_map.get(key)
        if name is not None:
            return getattr(self, name)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{key}'")

    def __iter__(self):
        # transformers' config iterates over its attributes' names, so ``"text_config" in config``
        # works (PEFT's prompt tuning asks that of every model's config)
        yield from self.__dict__

    def get_text_config(self, decoder=None, encoder=None) -> "DistilBertConfig":
        """The config of the text model: this one (transformers' answer for a model that is not
        composite). Trainer asks it when given a tokenizer (processing_class), to align the
        tokenizer's special tokens with the config."""
        return self

    # -- labels ----------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, num_labels: int):
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        id2label = getattr(self, "id2label", None)
        if id2label is None or len(id2label) != num_labels:
            if id2label is not None and any(name != f"LABEL_{i}" for i, name in id2label.items()):
                # a classifier fine-tuned anew for another task: from_pretrained(..., num_labels=5)
                logger.warning("num_labels=%s disagrees with id2label, which has %d entries %s: the "
                               "labels become LABEL_0 .. LABEL_%s", num_labels, len(id2label),
                               list(id2label.values())[:8], num_labels - 1)
            self.id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    @property
    def use_return_dict(self) -> bool:
        return self.return_dict

    @property
    def name_or_path(self) -> str:
        """The directory the config was loaded from ('' for a new one), as transformers' config."""
        return self._name_or_path

    @name_or_path.setter
    def name_or_path(self, value):
        self._name_or_path = str(value)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_ONLY}
        out["model_type"] = self.model_type
        if out.get("dtype") is not None and not isinstance(out["dtype"], str):  # a torch.dtype, as transformers writes it
            out["dtype"] = str(out["dtype"]).removeprefix("torch.")
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """``to_dict`` without what a config gets by default, as transformers' ``to_diff_dict``:
        the keys every config has (labels, return_dict, ...) are left out when at transformers'
        default; DistilBERT's own keys and any extra key are always kept; never _name_or_path."""
        return {key: value for key, value in self.to_dict().items()
                if key != "_name_or_path" and (key not in _BASE_DEFAULTS or value != _BASE_DEFAULTS[key])}

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as JSON: what differs from the defaults (``use_diff=True``, transformers'
        default), or every key (``use_diff=False``)."""
        config_dict = self.to_diff_dict() if use_diff is True else self.to_dict()
        return json.dumps(config_dict, indent=2, sort_keys=True) + "\n"

    def update(self, config_dict: dict[str, Any]) -> None:
        """Sets each key of ``config_dict`` as an attribute (aliases resolved), as transformers' does."""
        for key, value in config_dict.items():
            setattr(self, key, value)

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """Writes ``to_json_string(use_diff)`` to ``json_file_path``, as transformers does."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs: Any):
        """The config of ``config_dict`` with ``kwargs`` on top. With ``return_unused_kwargs``, as
        transformers: (config, the keywords that are no attribute of a config, which are left out)."""
        config_dict = dict(config_dict)
        model_type = config_dict.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"config has model_type={model_type!r}; DistilBertConfig expects "
                f"{cls.model_type!r}"
            )
        unused = {}
        if return_unused_kwargs:
            unused = {k: v for k, v in kwargs.items() if not _is_attribute(cls(**config_dict), k)}
            kwargs = {k: v for k, v in kwargs.items() if k not in unused}
        config = cls(**{**config_dict, **kwargs})
        return (config, unused) if return_unused_kwargs else config

    @classmethod
    def get_config_dict(cls, directory: str | os.PathLike, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the dict config.json in ``directory`` holds, ``kwargs``), as transformers'."""
        path = os.path.join(local_directory(directory), CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!s} has no {CONFIG_NAME}")
        return _read_json_object(path), kwargs

    def update_from_string(self, update_str: str) -> None:
        """Sets attributes from "key=value,key=value", each value read as the type the attribute
        has now (bool: true/false/1/0), as transformers' ``update_from_string``."""
        for pair in update_str.split(","):
            key, _, text = pair.partition("=")
            if not _is_attribute(self, key):
                raise ValueError(f"key {key} isn't in the original config dict")
            old = getattr(self, key)
            if isinstance(old, bool):
                if text.lower() not in ("true", "1", "y", "yes", "false", "0", "n", "no"):
                    raise ValueError(f"can't derive true or false from {text} (key {key})")
                value = text.lower() in ("true", "1", "y", "yes")
            elif isinstance(old, (int, float, str)):
                value = type(old)(text)
            else:
                raise TypeError(f"you can only update int, float, bool or string values in the config, got "
                                f"{text} for key {key}")
            setattr(self, key, value)

    @classmethod
    def coerce(cls, config) -> "DistilBertConfig":
        """``config`` as our DistilBertConfig: ours is returned as is; a transformers
        DistilBertConfig (anything with model_type 'distilbert' and ``to_dict``) is converted
        through its dict, without transformers' private and run-time keys."""
        if isinstance(config, cls):
            return config
        if getattr(config, "model_type", None) == cls.model_type and callable(getattr(config, "to_dict", None)):
            values = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
            for key in ("transformers_version", "dtype", "is_encoder_decoder"):
                values.pop(key, None)
            coerced = cls.from_dict(values)
            coerced._name_or_path = str(getattr(config, "name_or_path", "") or "")
            coerced._attn_implementation = getattr(config, "_attn_implementation", None)
            return coerced
        raise TypeError(f"config must be a DistilBertConfig, got {type(config).__name__}")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "DistilBertConfig":
        return cls.from_dict(_read_json_object(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, return_unused_kwargs: bool = False, **kwargs: Any):
        """Reads ``directory/config.json``. ``directory`` must be a local directory: there is no
        download. Keyword arguments override values from the file; with ``return_unused_kwargs``,
        as transformers: (config, the keywords that are no attribute of a config, left out)."""
        path = os.path.join(local_directory(directory), CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory!s} has no {CONFIG_NAME}")
        config = cls.from_json_file(path)
        config._name_or_path = os.fspath(directory)
        unused = {}
        for key, value in kwargs.items():
            if return_unused_kwargs and not _is_attribute(config, key):
                unused[key] = value
            else:
                setattr(config, key, value)
        return (config, unused) if return_unused_kwargs else config

    def save_pretrained(self, directory: str | os.PathLike, push_to_hub: bool = False, **kwargs: Any) -> None:
        """Writes ``directory/config.json``. transformers' hub keywords are accepted; ``push_to_hub``
        must be False (there is no network)."""
        if push_to_hub:
            raise ValueError("push_to_hub=True is not supported: distilbert_fast never uploads; save to a "
                             "directory and upload it with huggingface_hub")
        if os.path.isfile(directory):
            raise ValueError(f"save_pretrained needs a directory, but {directory!s} is a file")
        os.makedirs(directory, exist_ok=True)
        self.to_json_file(os.path.join(directory, CONFIG_NAME))

    def __eq__(self, other):
        # equal settings are equal configs wherever each was loaded from (name_or_path)
        if not isinstance(other, DistilBertConfig):
            return False
        mine, theirs = self.to_dict(), other.to_dict()
        mine.pop("_name_or_path", None), theirs.pop("_name_or_path", None)
        return mine == theirs

    def __repr__(self):
        return f"{type(self).__name__} {self.to_json_string()}"


def _is_attribute(config: DistilBertConfig, key: str) -> bool:
    return key in config.__dict__ or key in type(config).attribute_map or hasattr(type(config), key)


def _read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            config_dict = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config_dict, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config_dict).__name__}")
    return config_dict


def local_directory(name: str | os.PathLike) -> str:
    """Returns ``name`` if it is an existing directory, else raises a clear error.

    distilbert_fast never downloads: a hub name such as 'distilbert-base-uncased' must first be
    fetched to a local directory (for example with huggingface_hub's snapshot_download).
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"expected a directory path, got {type(name).__name__}")
    if os.path.isdir(name):
        return os.fspath(name)
    if os.path.exists(name):
        raise NotADirectoryError(f"{name!s} is a file; from_pretrained expects a directory")
    raise FileNotFoundError(
        f"{name!s} is not a local directory. distilbert_fast loads only from local directories "
        "and never downloads; fetch the checkpoint first (e.g. huggingface_hub.snapshot_download)."
    )
