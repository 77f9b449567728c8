"""The one checkpoint format: a directory with `config.json` (Hugging Face-like fields plus a
`dynlm` section naming the architecture and the format version), `model.safetensors` (sharded with
an index when large), `tokenizer.json` and optional `generation_config.json`. No pickle.

Writes are atomic (`dynlm.fileio.atomic_directory`): everything goes to a temporary sibling
folder that then takes the checkpoint's place, so a crash at any point of a save leaves a loadable
checkpoint (the previous one or the new one).

Every way of loading a model (this format, Hugging Face, GGUF, code form) ends in
`finish_loading`: load the state -> re-tie shared weights -> move to the device -> cast -> eval."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dynlm.config import model_config
from dynlm.errors import CheckpointError
from dynlm.fileio import atomic_directory, recover_directory
from dynlm.models.serialization import (
    DEFAULT_MAX_SHARD_BYTES,
    FORMAT_VERSION,
    INDEX_NAME,
    WEIGHTS_NAME,
    hf_config_fields,
    model_state_dict,
    save_checkpoint,
    write_safetensors,
)
from dynlm.registry import get_architecture

if TYPE_CHECKING:
    from dynlm.models.base import DynModel

# the writer lives with the models (`DynModel.save_pretrained` uses it); this module reads
__all__ = ["FORMAT_VERSION", "WEIGHTS_NAME", "INDEX_NAME", "DEFAULT_MAX_SHARD_BYTES", "hf_config_fields",
           "model_state_dict", "write_safetensors", "save_checkpoint", "atomic_directory", "recover_directory",
           "read_safetensors", "safetensors_files", "read_config", "is_dynlm_checkpoint", "load_state_into",
           "finish_loading", "load_checkpoint", "model_state_dict_shapes"]

M = TypeVar("M", bound=torch.nn.Module)

def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, else
    `model.safetensors`; errors name what is missing."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / name for name in dict.fromkeys(weight_map.values())]
    elif (directory / WEIGHTS_NAME).is_file():
        files = [directory / WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (or {INDEX_NAME}) in the checkpoint")
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named in {INDEX_NAME})")
    return files


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint; errors name the file."""
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_files(directory):
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    return tensors


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint directory needs config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a {type(config).__name__}")
    return config


def is_dynlm_checkpoint(directory: str | Path) -> bool:
    directory = Path(directory)
    try:
        return "dynlm" in read_config(directory)
    except CheckpointError:
        return False


def load_state_into(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str,
                    strict: bool = True, assign: bool = False) -> None:
    """Copy tensors into the model (`assign=True`: the tensors become the parameters, no copy);
    a missing, unexpected or misshapen tensor is an error naming the source file and the tensor."""
    expected = model_state_dict_shapes(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        raise CheckpointError(f"{source}: does not match the model config: " + "; ".join(parts))
    for name, shape in expected.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, "
                                  f"the config expects {shape}")
    model.load_state_dict(tensors, strict=False, assign=assign)


def model_state_dict_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the tensors a checkpoint of `model` holds (tied duplicates left out, as
    in `model_state_dict`), without copying anything: works on a model on the meta device."""
    seen: set[int] = set()
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tuple(tensor.shape)
    return out


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DynModel:
    """Build the model named in `config.json` and load its weights."""
    directory = Path(directory)
    recover_directory(directory)  # a save interrupted between its two renames (fileio fallback)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a checkpoint directory (does not exist)")
    cfg = read_config(directory)
    section = cfg.get("dynlm")
    if not isinstance(section, dict) or "config" not in section:
        raise CheckpointError(f"{directory / 'config.json'}: no 'dynlm' section; "
                              "import Hugging Face checkpoints with dynlm.load_pretrained or `dynlm convert`")
    version = section.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{directory / 'config.json'}: format version {version} is not supported "
                              f"(this dynlm reads version {FORMAT_VERSION})")
    config = model_config(section["config"])
    _, model_class = get_architecture(config.type)
    return finish_loading(model_class(config), read_safetensors(directory), str(directory / WEIGHTS_NAME),
                          device, dtype)


def finish_loading(model: M, tensors: dict[str, torch.Tensor], source: str,
                   device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> M:
    """The tail of every loader: copy `tensors` into the freshly built `model` (errors name
    `source`), re-tie a tied LM head to the embedding, move to `device`, cast floating tensors to
    `dtype` when given, and switch to eval mode."""
    with torch.no_grad():
        load_state_into(model, tensors, source)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
