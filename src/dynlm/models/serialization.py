"""Writing the one checkpoint format (see `dynlm.checkpoint`, which reads it): a directory with
`config.json` (Hugging Face-like fields plus a `dynlm` section naming the architecture and the
format version), `model.safetensors` (sharded with an index when large), `tokenizer.json` and
optional `generation_config.json`. No pickle.

The writer sits in the models layer so that `DynModel.save_pretrained` can use it without
importing the checkpoint layer above it (layers import one way; see docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from dynlm.fileio import atomic_directory, json_text
from dynlm.registry import get_architecture

if TYPE_CHECKING:
    from dynlm.models.base import DynModel

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


def hf_config_fields(config: Any) -> dict[str, Any]:
    """The Hugging Face names of the transformer fields (Qwen2 / Llama style)."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied duplicates (e.g. a tied LM head) removed: safetensors refuses shared
    storage, and the loader re-ties them from the config."""
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


def write_safetensors(tensors: dict[str, torch.Tensor], directory: Path,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      weight_map: dict[str, str] | None = None) -> None:
    """`model.safetensors`, or shards plus a Hugging Face index when over `max_shard_bytes`.
    `weight_map` ({tensor: shard file}) reproduces given shards instead (an index is written
    unless the map names `model.safetensors` alone). The index itself is written last, after
    every shard it names."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if weight_map is None:
        if total <= max_shard_bytes:
            save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
            return
        groups: list[list[str]] = [[]]
        size = 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            if size + n > max_shard_bytes and groups[-1]:
                groups.append([])
                size = 0
            groups[-1].append(name)
            size += n
        weight_map = {name: f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
                      for i, group in enumerate(groups) for name in group}
    for shard in dict.fromkeys(weight_map.values()):
        save_file({k: tensors[k] for k, v in weight_map.items() if v == shard}, str(directory / shard),
                  metadata={"format": "pt"})
    if set(weight_map.values()) != {WEIGHTS_NAME}:
        (directory / INDEX_NAME).write_text(json_text({"metadata": {"total_size": total}, "weight_map": weight_map}))


def save_checkpoint(model: DynModel, directory: str | Path, tokenizer: Any = None,
                    generation_config: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` as a checkpoint directory, atomically. `state_dict` replaces the model's own
    tensors (e.g. a full state dict gathered from a sharded model); `write_extra(tmp_dir)` may add
    files inside the same atomic write (the trainer's `trainer/` folder)."""
    directory = Path(directory)
    config = model.config
    with atomic_directory(directory) as tmp:
        write_safetensors(state_dict if state_dict is not None else model_state_dict(model), tmp, max_shard_bytes)
        class_name = get_architecture(model.architecture)[1].__name__  # not a wrapper's (FSDP) class name
        cfg = {"architectures": [class_name], "model_type": config.family,
               **hf_config_fields(config),
               "dynlm": {"format_version": FORMAT_VERSION, "architecture": model.architecture,
                         "config": config.to_dict()}}
        (tmp / "config.json").write_text(json_text(cfg))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if generation_config:
            (tmp / "generation_config.json").write_text(json_text(generation_config))
        for name, data in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if write_extra is not None:
            write_extra(tmp)
    return directory
