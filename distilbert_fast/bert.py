"""A BERT-family encoder (BertModel: all-MiniLM-L6-v2, bge, e5, ...) as a DistilBertModel.

BERT's block is DistilBERT's (post-LN attention and FFN, the same parameter shapes under other
names); BERT adds token-type embeddings and a pooler. The conversion folds token type 0's
embedding into every position embedding and drops the pooler, so the converted model computes
BertModel's last hidden states exactly for single texts (every token of type 0), which is what
sentence embeddings take. Pairs (token type 1) would differ, so callers that convert refuse them.
"""

import re

import torch

from .checkpoint import _modern_key
from .configuration import DistilBertConfig

# transformers' BertConfig defaults for the keys a config.json may leave out
_BERT_DEFAULTS = {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "position_embedding_type": "absolute",
                  "pad_token_id": 0, "max_position_embeddings": 512, "type_vocab_size": 2}

_LAYER_NAMES = {
    "attention.self.query": "attention.q_lin",
    "attention.self.key": "attention.k_lin",
    "attention.self.value": "attention.v_lin",
    "attention.output.dense": "attention.out_lin",
    "attention.output.LayerNorm": "sa_layer_norm",
    "intermediate.dense": "ffn.lin1",
    "output.dense": "ffn.lin2",
    "output.LayerNorm": "output_layer_norm",
}
_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)")


def is_bert_config(config: dict) -> bool:
    return config.get("model_type") == "bert"


def distilbert_config_from_bert(bert: dict, **overrides) -> DistilBertConfig:
    """The DistilBertConfig of the converted encoder; ValueError naming the key where BERT's config
    asks for what DistilBERT's block does not compute."""
    bert = {**_BERT_DEFAULTS, **bert}
    for key, allowed in (("position_embedding_type", "absolute"), ("layer_norm_eps", 1e-12),
                         ("is_decoder", False), ("add_cross_attention", False)):
        if key in bert and bert[key] != allowed:
            raise ValueError(f"a BERT checkpoint with {key}={bert[key]!r} cannot run as DistilBERT "
                             f"(needs {key}={allowed!r})")
    return DistilBertConfig(
        vocab_size=bert["vocab_size"], max_position_embeddings=bert["max_position_embeddings"],
        n_layers=bert["num_hidden_layers"], n_heads=bert["num_attention_heads"], dim=bert["hidden_size"],
        hidden_dim=bert["intermediate_size"], activation=bert["hidden_act"], pad_token_id=bert["pad_token_id"],
        **overrides)


def bert_to_distilbert(bert: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A BertModel state_dict (with or without the 'bert.' prefix of a task model) as a
    DistilBertModel state_dict: token_type_embeddings[0] is folded into every position
    embedding; the pooler, heads and buffers are left out."""
    bert = {_modern_key(key): value for key, value in bert.items()}
    if any(key.startswith("bert.") for key in bert):
        bert = {key[len("bert."):]: value for key, value in bert.items() if key.startswith("bert.")}
    out = {
        "embeddings.word_embeddings.weight": bert["embeddings.word_embeddings.weight"],
        "embeddings.position_embeddings.weight": bert["embeddings.position_embeddings.weight"]
        + bert["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm.weight": bert["embeddings.LayerNorm.weight"],
        "embeddings.LayerNorm.bias": bert["embeddings.LayerNorm.bias"],
    }
    for key, value in bert.items():
        match = _LAYER_KEY.fullmatch(key)
        if match:
            layer, name, kind = match.groups()
            out[f"transformer.layer.{layer}.{_LAYER_NAMES[name]}.{kind}"] = value
    return out


__all__ = ["bert_to_distilbert", "distilbert_config_from_bert", "is_bert_config"]
