"""Checkpoint files in HuggingFace's layout: read, check, adapt to a model, write.

    model.safetensors                  (preferred)   pytorch_model.bin      (weights_only load)
    model.safetensors.index.json  +  model-00001-of-0000N.safetensors ...   (sharded)
    pytorch_model.bin.index.json  +  pytorch_model-00001-of-0000N.bin ...   (sharded)

Nothing here downloads: every path is a local directory.
"""

import json
import os
import re
import tempfile
import warnings

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load
from safetensors.torch import save_file as safetensors_save
from tqdm.auto import tqdm

from .configuration import local_directory

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

__all__ = [
    "CheckpointWarning",
    "load_state_dict",
    "load_into_model",
    "save_state_dict",
    "resolve_dtype",
    "local_directory",
]


class CheckpointWarning(UserWarning):
    """Keys missing from or unexpected in a checkpoint, or weights re-initialised on load."""


# -- reading -------------------------------------------------------------------------------------


def load_state_dict(directory, use_safetensors: bool | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint in ``directory``, on CPU. ``use_safetensors``: None prefers
    safetensors and falls back to .bin; True or False insists on one format."""
    directory = local_directory(directory)
    candidates = []
    if use_safetensors in (None, True):
        candidates += [(SAFE_WEIGHTS, _read_safetensors), (SAFE_INDEX, _read_safetensors)]
    if use_safetensors in (None, False):
        candidates += [(TORCH_WEIGHTS, _read_torch_bin), (TORCH_INDEX, _read_torch_bin)]
    for name, reader in candidates:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if name.endswith(".index.json"):
                return _read_sharded(directory, path, reader)
            return reader(path)
    raise FileNotFoundError(
        f"{directory} holds no weights: expected one of {[name for name, _ in candidates]}"
    )


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors_load(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: not a valid safetensors file (truncated or corrupt?): {exc}") from exc


def _read_torch_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - garbage bytes reach the unpickler as any error type
        raise ValueError(
            f"cannot load {path} with torch.load(weights_only=True): the file is truncated or "
            f"corrupt, or holds objects other than tensors: {exc}"
        ) from exc
    if not isinstance(state_dict, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items()
    ):
        raise ValueError(f"{path} does not hold a state_dict (a dict of name -> tensor)")
    return state_dict


def _read_sharded(directory: str, index_path: str, reader) -> dict[str, torch.Tensor]:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {exc}") from exc
    shards = sorted(set(weight_map.values()))
    missing_files = [s for s in shards if not os.path.isfile(os.path.join(directory, s))]
    if missing_files:
        raise FileNotFoundError(f"{index_path} names shards that are not in {directory}: {missing_files}")
    state_dict = {}
    for shard in tqdm(shards, desc="Loading checkpoint shards", disable=len(shards) < 2):
        state_dict.update(reader(os.path.join(directory, shard)))
    absent = sorted(set(weight_map) - set(state_dict))
    if absent:
        raise ValueError(f"the shards of {index_path} lack tensors its weight_map lists: {absent}")
    return state_dict


# -- adapting a checkpoint to a model -------------------------------------------------------------


def load_into_model(model, state_dict: dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False):
    """Loads ``state_dict`` into ``model`` the way HuggingFace does: renames legacy LayerNorm keys,
    adds or strips the base-model prefix, refuses wrong shapes (or re-initialises them with
    ``ignore_mismatched_sizes``), reports missing / unexpected keys in one warning and re-ties
    tied weights. Returns ``(missing, unexpected)``."""
    missing, unexpected, _ = _load_into_model(model, state_dict, ignore_mismatched_sizes)
    return missing, unexpected


def load_into_model_with_info(model, state_dict: dict[str, torch.Tensor], ignore_mismatched_sizes: bool = False) -> dict:
    """load_into_model, returning what transformers' ``from_pretrained(output_loading_info=True)``
    returns beside the model, in its types: sets ``missing_keys``, ``unexpected_keys`` and
    ``mismatched_keys`` ((key, checkpoint shape, model shape) of each re-initialised weight, shapes
    as torch.Size), and the list ``error_msgs`` (empty: a load that fails raises)."""
    missing, unexpected, mismatched = _load_into_model(model, state_dict, ignore_mismatched_sizes)
    return {"missing_keys": set(missing), "unexpected_keys": set(unexpected),
            "mismatched_keys": {(k, torch.Size(a), torch.Size(b)) for k, a, b in mismatched}, "error_msgs": []}


def _load_into_model(model, state_dict, ignore_mismatched_sizes):
    """load_into_model's work; returns (missing, unexpected, mismatched) lists."""
    state_dict = {_modern_key(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}
    state_dict = _match_prefix(model, state_dict)

    expected = model.state_dict()
    mismatched = [
        (k, tuple(v.shape), tuple(expected[k].shape))
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        listing = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in mismatched)
        if not ignore_mismatched_sizes:
            raise ValueError(
                f"checkpoint shapes do not match {type(model).__name__}: {listing}. Check the "
                "config, or pass ignore_mismatched_sizes=True to re-initialise those weights."
            )
        warnings.warn(f"re-initialised weights whose shapes differ: {listing}", CheckpointWarning, stacklevel=4)
        for key, _, _ in mismatched:
            del state_dict[key]

    result = model.load_state_dict(state_dict, strict=False)
    tied = set(model._tied_weights_keys) if model.config.tie_word_embeddings else set()
    # re-initialised mismatched weights were reported above, not again as missing
    reinitialised = {key for key, _, _ in mismatched} if ignore_mismatched_sizes else set()
    missing = [k for k in result.missing_keys if k not in tied and k not in reinitialised]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        warnings.warn(
            f"{type(model).__name__}: the checkpoint lacks {len(missing)} keys, left at their "
            f"initial values: {missing}; and has {len(unexpected)} unexpected keys, ignored: "
            f"{unexpected}",
            CheckpointWarning,
            stacklevel=4,
        )
    model.tie_weights()
    return missing, unexpected, mismatched


def _modern_key(key: str) -> str:
    """Old TF-style LayerNorm names: '.gamma' -> '.weight', '.beta' -> '.bias'."""
    return re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))


def _match_prefix(model, state_dict):
    prefix = model.base_model_prefix + "."
    model_keys = model.state_dict().keys()
    has_prefix = any(k.startswith(prefix) for k in state_dict)
    expects_prefix = any(k.startswith(prefix) for k in model_keys)
    if has_prefix and not expects_prefix:  # task checkpoint -> base model
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    if expects_prefix and not has_prefix:  # base checkpoint -> task model
        return {prefix + k if prefix + k in model_keys else k: v for k, v in state_dict.items()}
    return state_dict


def resolve_dtype(dtype, state_dict=None, config_dtype=None) -> torch.dtype:
    """torch.float16, 'float16' or 'auto' -> a torch.dtype. 'auto' is what config.json records
    (``config_dtype``), else the checkpoint's first floating dtype, else float32."""
    resolved = _resolve_dtype(dtype, state_dict, config_dtype)
    if not resolved.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r} ({resolved})")
    return resolved


def _resolve_dtype(dtype, state_dict, config_dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if config_dtype is not None:
            return _resolve_dtype(str(config_dtype).removeprefix("torch."), None, None)
        for tensor in (state_dict or {}).values():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.float32
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype must be a torch.dtype, its name, or 'auto', got {dtype!r}")


# -- writing -------------------------------------------------------------------------------------


def save_state_dict(state_dict, directory, tied_keys=None, safe_serialization=True, max_shard_size="50GB"):
    """Writes ``state_dict`` to ``directory`` in HuggingFace's layout, dropping the alias keys of
    tied weights (``tied_keys``: key -> the key it aliases), sharding above ``max_shard_size``.
    Each file is written to a temporary name and renamed, so a crash never leaves a half file
    under a real name; weight files of the same format left from an earlier save are removed."""
    if os.path.isfile(directory):
        raise ValueError(f"save_pretrained needs a directory, but {directory!s} is a file")
    os.makedirs(directory, exist_ok=True)
    tensors = {}
    for key, value in state_dict.items():
        source = (tied_keys or {}).get(key)
        if source is not None and source in state_dict and value.data_ptr() == state_dict[source].data_ptr():
            continue
        tensors[key] = value.detach().contiguous()

    weights_name, index_name = (SAFE_WEIGHTS, SAFE_INDEX) if safe_serialization else (TORCH_WEIGHTS, TORCH_INDEX)
    shards = _split_into_shards(tensors, _parse_size(max_shard_size))
    if len(shards) == 1:
        files = {weights_name: shards[0]}
    else:
        stem, ext = weights_name.rsplit(".", 1)
        files = {f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}": s for i, s in enumerate(shards)}

    for name, shard in files.items():
        _atomic_write(directory, name, lambda path, shard=shard: _write_tensors(path, shard, safe_serialization))
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in files.items() for key in shard},
        }
        _atomic_write(directory, index_name, lambda path: _write_json(path, index))
    _remove_stale(directory, weights_name, index_name, keep=set(files) | ({index_name} if len(files) > 1 else set()))


def _write_tensors(path, tensors, safe_serialization):
    if safe_serialization:
        safetensors_save(tensors, path, metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def _atomic_write(directory, name, write):
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, os.path.join(directory, name))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_stale(directory, weights_name, index_name, keep):
    stem, ext = weights_name.rsplit(".", 1)
    pattern = re.compile(rf"^{re.escape(stem)}(-\d{{5}}-of-\d{{5}})?\.{re.escape(ext)}$")
    for name in os.listdir(directory):
        if name not in keep and (pattern.match(name) or name == index_name):
            os.remove(os.path.join(directory, name))


def _split_into_shards(tensors, max_bytes):
    shards, current, current_bytes = [], {}, 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = {}, 0
        current[key] = tensor
        current_bytes += size
    shards.append(current)
    return shards


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _parse_size(size) -> int:
    """50_000_000, '50MB' (10**6) or '50MiB' (2**20) -> bytes."""
    if isinstance(size, int) and size > 0:
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if not match:
        raise ValueError(f"max_shard_size must be a positive int or a size like '5GB', got {size!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2)])
