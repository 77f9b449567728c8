"""The one checkpoint format: a directory with `config.json` (Hugging Face-like fields plus a
`dynlm` section naming the architecture and the format version), `model.safetensors` (sharded with
an index when large), `tokenizer.json` and optional `generation_config.json`. No pickle.

Writes are atomic: everything goes to a temporary sibling folder that is renamed into place, so
an interrupted save leaves the previous checkpoint untouched."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dynlm.errors import CheckpointError
from dynlm.output_dir import follow_umask

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
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """`model.safetensors`, or shards plus a Hugging Face index when over `max_shard_bytes`."""
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if size + n > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                    "weight_map": weight_map}, indent=2))


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint; errors name the file."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
    elif (directory / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} (or {INDEX_NAME}) in the checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    for fname in files:
        path = directory / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named in {INDEX_NAME})")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    return tensors


def atomic_directory(directory: Path):
    """Context manager yielding a temporary folder that replaces `directory` on success."""
    import contextlib

    @contextlib.contextmanager
    def _ctx():
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
        try:
            yield tmp
            follow_umask(tmp)  # mkdtemp folders are 0700 and safetensors files 0600
            old = None
            if directory.exists():
                old = directory.parent / f".{directory.name}.old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    return _ctx()


def save_checkpoint(model: DynModel, directory: str | Path, tokenizer: Any = None,
                    generation_config: dict[str, Any] | None = None,
                    extra_files: dict[str, bytes] | None = None,
                    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                    state_dict: dict[str, torch.Tensor] | None = None,
                    write_extra: Callable[[Path], None] | None = None) -> Path:
    """Write `model` as a checkpoint directory, atomically. `state_dict` replaces the model's own
    tensors (e.g. a full state dict gathered from a sharded model); `write_extra(tmp_dir)` may add
    files inside the same atomic write (the trainer's `trainer/` folder)."""
    from dynlm.registry import get_architecture

    directory = Path(directory)
    config = model.config
    with atomic_directory(directory) as tmp:
        write_safetensors(state_dict if state_dict is not None else model_state_dict(model), tmp, max_shard_bytes)
        class_name = get_architecture(model.architecture)[1].__name__  # not a wrapper's (FSDP) class name
        cfg = {"architectures": [class_name], "model_type": config.family,
               **hf_config_fields(config),
               "dynlm": {"format_version": FORMAT_VERSION, "architecture": model.architecture,
                         "config": config.to_dict()}}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)
        if generation_config:
            (tmp / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
        for name, data in (extra_files or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        if write_extra is not None:
            write_extra(tmp)
    return directory


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
                    strict: bool = True) -> None:
    """Copy tensors into the model; a missing, unexpected or misshapen tensor is an error naming
    the source file and the tensor."""
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
    model.load_state_dict(tensors, strict=False)


def model_state_dict_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model_state_dict(model).items()}


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DynModel:
    """Build the model named in `config.json` and load its weights."""
    from dynlm.config import model_config
    from dynlm.registry import get_architecture

    directory = Path(directory)
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
    tensors = read_safetensors(directory)
    model = model_class(config)
    load_state_into(model, tensors, str(directory / WEIGHTS_NAME))
    if config.tie_word_embeddings and hasattr(model, "lm_head"):
        model.lm_head.weight = model.model.embed_tokens.weight
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
