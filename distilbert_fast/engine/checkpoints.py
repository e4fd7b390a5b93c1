"""What a checkpoint directory gives the engine, beyond our own DistilBERT checkpoints:

- a BERT-family encoder (config.json with model_type 'bert'), run as DistilBERT after the
  conversion of ``distilbert_fast.bert``: exact for single texts, so only the embed task takes it;
- a sentence-transformers model (modules.json): its Transformer module's folder holds the
  encoder and tokenizer, and its Pooling, Normalize, max_seq_length and default prompt become the
  embed task's defaults, so that the engine's vectors are ``SentenceTransformer(dir).encode``'s. A module the
  engine does not run (Dense, a pooling mode other than cls / mean / max, ...) is refused by name
  rather than giving other vectors.
"""

import json
import os
from dataclasses import dataclass, field

import torch

from .. import modeling
from ..bert import bert_to_distilbert, distilbert_config_from_bert, is_bert_config
from ..checkpoint import load_state_dict
from ..configuration import CONFIG_NAME, local_directory

# sentence-transformers' Pooling config keys -> our pooling names
_POOLING_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                  "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
                  "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken"}


@dataclass
class Checkpoint:
    model_dir: str  # config.json, weights and tokenizer files
    bert_config: dict | None  # a BERT encoder's config.json (converted on load), else None
    embed_defaults: dict = field(default_factory=dict)  # pooling, normalize, prompt (sentence-transformers)
    max_length: int | None = None  # sentence-transformers' max_seq_length


def inspect_checkpoint(path) -> Checkpoint:
    path = local_directory(path)
    model_dir, embed_defaults, max_length = path, {}, None
    modules_file = os.path.join(path, "modules.json")
    if os.path.isfile(modules_file):
        model_dir, embed_defaults, max_length = _sentence_transformers_modules(path, _read_json(modules_file))
    config_file = os.path.join(model_dir, CONFIG_NAME)
    config = _read_json(config_file) if os.path.isfile(config_file) else {}
    return Checkpoint(model_dir, config if is_bert_config(config) else None, embed_defaults, max_length)


def load_model(checkpoint: Checkpoint, model_class, dtype: torch.dtype, backend):
    """The task's model from ``checkpoint``: ``model_class.from_pretrained``, or a BERT encoder
    converted into a DistilBertModel."""
    if checkpoint.bert_config is None:
        return model_class.from_pretrained(checkpoint.model_dir, dtype=dtype, backend=backend)
    if model_class is not modeling.DistilBertModel:
        raise ValueError(
            f"{checkpoint.model_dir} holds a BERT checkpoint (model_type 'bert'), which the engine runs "
            "for task='embed' only (its conversion to DistilBERT is exact for single texts, not for "
            "pairs or BERT's task heads)")
    model = modeling.DistilBertModel(distilbert_config_from_bert(checkpoint.bert_config, backend=backend))
    model.load_state_dict(bert_to_distilbert(load_state_dict(checkpoint.model_dir)), strict=True)
    return model.to(dtype)


def _sentence_transformers_modules(path: str, modules: list):
    """(the Transformer module's folder, embed defaults, max_seq_length) of a sentence-transformers
    model folder."""
    if not isinstance(modules, list) or not modules:
        raise ValueError(f"{path}/modules.json must list the model's modules")
    kinds = [(str(m.get("type", "")).rsplit(".", 1)[-1], os.path.join(path, m.get("path", ""))) for m in modules]
    if kinds[0][0] != "Transformer":
        raise ValueError(f"{path}/modules.json must start with a Transformer module, got {modules[0].get('type')!r}")
    model_dir, defaults, max_length, include_prompt = kinds[0][1], {"normalize": False}, None, True
    settings_file = os.path.join(model_dir, "sentence_bert_config.json")
    if os.path.isfile(settings_file):
        settings = _read_json(settings_file)
        max_length = settings.get("max_seq_length")
        if settings.get("do_lower_case"):
            raise ValueError(f"{settings_file}: do_lower_case=true (lower-casing texts before the "
                             "tokenizer) is not supported by the engine")
    for kind, module_dir in kinds[1:]:
        if kind == "Pooling":
            config = _read_json(os.path.join(module_dir, "config.json"))
            mode = config.get("pooling_mode")  # sentence-transformers >= 6; before: a flag per mode
            if mode is not None:
                modes = [mode] if isinstance(mode, str) else list(mode)
            else:
                modes = [name for key, name in _POOLING_MODES.items() if config.get(key)]
            if len(modes) != 1 or modes[0] not in ("cls", "mean", "max"):
                raise ValueError(f"{module_dir}/config.json: the engine pools with one of cls, mean or max, "
                                 f"got pooling modes {modes}")
            defaults["pooling"] = modes[0]
            include_prompt = config.get("include_prompt", True)
        elif kind == "Normalize":
            defaults["normalize"] = True
        else:
            raise ValueError(f"{path}/modules.json holds a {kind} module, which the engine does not run: "
                             "its vectors would not be SentenceTransformer.encode's")
    model_file = os.path.join(path, "config_sentence_transformers.json")
    model_settings = _read_json(model_file) if os.path.isfile(model_file) else {}
    prompt_name = model_settings.get("default_prompt_name")
    prompt = (model_settings.get("prompts") or {}).get(prompt_name) if prompt_name else None
    if prompt:  # encode() puts the default prompt before every text
        if not include_prompt:
            raise ValueError(f"{model_file}: the default prompt {prompt_name!r} is left out of the pooling "
                             "(include_prompt=false), which the engine does not do")
        defaults["prompt"] = prompt
    return model_dir, defaults, max_length


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)
