"""Export a model or checkpoint to code form, import it back bit-exactly, and load code
checkpoints into torch models (whole, or only some cells).

    export_code_checkpoint("runs/x/best", "code/", mode="inline")     # or a model object
    import_code_checkpoint("code/", "model/")                          # the original files back
    model = load_code_checkpoint("code/")                              # what dynlm.load_pretrained calls
    tensors = load_only("code/", ["embedding", "layer_0"])             # decodes only those cells
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynlm.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT_VERSION
from dynlm.checkpoint import (
    INDEX_NAME,
    finish_loading,
    is_dynlm_checkpoint,
    model_state_dict,
    model_state_dict_shapes,
    safetensors_files,
    save_checkpoint,
    write_safetensors,
)
from dynlm.config import model_config
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError, DynlmError, did_you_mean
from dynlm.fileio import atomic_directory
from dynlm.interop.gguf import load_gguf
from dynlm.interop.hf import load_hf_checkpoint
from dynlm.registry import get_architecture
from dynlm.weights.format import (
    DEFAULT_LITERAL_MAX,
    DTYPES,
    Cell,
    Inline,
    Literal,
    Ref,
    Shared,
    as_float,
    cell_sha256,
    contiguous,
    float_text,
    tensor_stats,
)
from dynlm.weights.safe_loader import LoadLimits
from dynlm.weights.store import (
    CodeCheckpoint,
    Tensor,
    build_cells,
    convert_dtype,
    is_code_checkpoint,
    load_vocab_tokenizer,
    model_header,
    now,
    read_safetensors_arrays,
    rewrite_weights_file,
    weights_sha256,
    write_folder,
)

if TYPE_CHECKING:
    from dynlm.models.base import DynModel

_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
                 "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}
_DTYPE_NAMES = {v: k for k, v in _TORCH_DTYPES.items()}


def to_numpy(tensor: torch.Tensor) -> Tensor:
    """torch tensor -> (storage array, dtype name), sharing memory where possible."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype not in _DTYPE_NAMES:
        raise CheckpointError(f"tensors of dtype {tensor.dtype} cannot be stored in a code checkpoint")
    name = _DTYPE_NAMES[tensor.dtype]
    if name == "bfloat16":
        return tensor.view(torch.int16).numpy().view(np.uint16), name
    return tensor.numpy(), name


def to_torch(arr: np.ndarray, dtype: str) -> torch.Tensor:
    arr = contiguous(arr)
    if not arr.flags.writeable:
        arr = arr.copy()
    if dtype == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def tensor_order(names: list[str]) -> list[str]:
    """A readable order: the model body ("model.*": embedding, layers 0, 1, ..., 10 in numeric
    order, final norm), then anything else, the LM head last."""
    def key(name: str) -> tuple[int, list[Any]]:
        group = 0 if name.startswith("model.") else 2 if name.startswith("lm_head") else 1
        return group, [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]

    return sorted(names, key=key)


def read_checkpoint_dir(directory: Path) -> tuple[dict[str, Tensor], dict[str, bytes]]:
    """Tensors (storage arrays) and JSON files of a dynlm checkpoint directory."""
    files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and p.suffix == ".json"}
    tensors: dict[str, Tensor] = {}
    for file in safetensors_files(directory):
        tensors.update(read_safetensors_arrays(file))
    return {n: tensors[n] for n in tensor_order(list(tensors))}, files


def _clean_event(event: dict[str, Any] | None) -> dict[str, Any] | None:
    """An event as plain literals: paths become strings, numpy numbers Python numbers, and
    non-finite floats their names ("nan", "inf"), which a literal cannot hold."""
    if event is None:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("event"), str):
        raise CheckpointError(f"a history event is a dict with an 'event' name, got {event!r}")

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return clean(event)


@dataclass
class Source:
    """The weights and JSON files of a model, wherever they came from."""

    tensors: dict[str, Tensor]
    files: dict[str, bytes]
    label: str
    code: CodeCheckpoint | None = None  # set when the source is a code checkpoint

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.files["config.json"])

    def cell_hashes(self) -> dict[str, str]:
        if self.code is not None:
            return self.code.cell_hashes()
        return {n: cell_sha256(a, d) for n, (a, d) in self.tensors.items()}


def read_source(source: DynModel | str | Path, tokenizer: Any = None) -> Source:
    """A model object, a dynlm checkpoint, a code checkpoint, or anything `load_pretrained` reads."""
    if not isinstance(source, (str, Path)):
        # config.json and the tokenizer files exactly as save_checkpoint writes them (no weights);
        # the tensors straight from the model, sharing its memory
        with tempfile.TemporaryDirectory(prefix="dynlm-export-") as tmp:
            save_checkpoint(source, tmp, tokenizer=tokenizer, state_dict={})
            files = {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.suffix == ".json"}
        state = model_state_dict(source)
        tensors = {n: to_numpy(state[n]) for n in tensor_order(list(state))}
        return Source(tensors, files, type(source).__name__)
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and is_code_checkpoint(path):
        code = CodeCheckpoint(path)
        tensors = {n: (a, code.cells[n].dtype) for n, a in code.arrays().items()}
        return Source(tensors, code.json_files(), str(path), code)
    if path.is_dir() and is_dynlm_checkpoint(path):
        tensors, files = read_checkpoint_dir(path)
        return Source(tensors, files, str(path))
    # a Hugging Face directory or a .gguf file: through the model
    if path.is_file() and path.suffix == ".gguf":
        model = load_gguf(path)
    elif path.is_dir() and (path / "config.json").is_file():
        model = load_hf_checkpoint(path)
    else:
        raise CheckpointError(f"{path}: not a checkpoint", "give a checkpoint directory or a .gguf file")
    if tokenizer is None:
        try:
            tokenizer = load_tokenizer(path)
        except DynlmError:  # exported without a tokenizer
            tokenizer = None
    out = read_source(model, tokenizer)
    out.label = str(path)
    return out


def write_code_form(out_dir: str | Path, tensors: dict[str, Tensor], files: dict[str, bytes], mode: str = "inline",
                    event: dict[str, Any] | None = None, previous: CodeCheckpoint | None = None,
                    source_label: str = "", literal_max: int = DEFAULT_LITERAL_MAX,
                    notes: dict[str, str] | None = None, parents: list[dict[str, Any]] | None = None) -> Path:
    """Write tensors + JSON files as a code checkpoint; cells and the model carry `previous`'s
    history, and `event` is appended to every cell that changed and to the model's history."""
    event = _clean_event(event)
    cell_event = event if event is not None or previous is None else {"event": "changed"}
    cells, blobs = build_cells(tensors, mode, literal_max, previous.cells if previous else None, cell_event, notes)
    if previous is not None:  # the model's parents and history carry over
        info = dict(previous.model_info)
    else:
        info = {"architecture": json.loads(files["config.json"]).get("dynlm", {}).get("architecture")}
    changed = sum(1 for c in cells if previous is None or c.name not in previous.cells
                  or previous.cells[c.name].sha256 != c.sha256)
    entry = {**(event or {"event": "exported"}), "time": now(), "cells_changed": changed}
    if source_label:
        entry["source"] = source_label
    info["history"] = [*info.get("history", []), entry]
    if parents is not None:
        info["parents"] = parents
    return write_folder(out_dir, cells, model_header(cells, info, mode), files, blobs)


def export_code_checkpoint(model_or_dir: DynModel | str | Path, out_dir: str | Path, mode: str = "inline",
                           tokenizer: Any = None, history_event: dict[str, Any] | None = None,
                           dtype: str | None = None, literal_max: int = DEFAULT_LITERAL_MAX,
                           notes: dict[str, str] | None = None, inherit_from: str | Path | None = None,
                           parents: list[dict[str, Any]] | None = None) -> Path:
    """Write a model (or a checkpoint directory: dynlm, code form, or anything `load_pretrained`
    reads) as a code checkpoint.

    mode: "inline" (self-contained .py files) or "hybrid" (manifest .py + blobs.safetensors).
    history_event: e.g. {"event": "trained", "steps": 2000, "corpus": "shakespeare"}; appended to
        the history of every cell that changed and to the model's history. Cell histories carry
        over from `inherit_from`, else from an existing code checkpoint at `out_dir`, else from
        the source when it is one.
    dtype: store floating tensors as "bfloat16" / "float16" / "float32" (rounding; recorded).
    notes: {cell name: note} to set.
    """
    out_dir = Path(out_dir)
    source = read_source(model_or_dir, tokenizer)
    previous = source.code
    if inherit_from is not None:
        previous = CodeCheckpoint(inherit_from)
    elif is_code_checkpoint(out_dir):
        previous = CodeCheckpoint(out_dir)
    tensors, event = source.tensors, _clean_event(history_event)
    if dtype is not None:
        before = {n: d for n, (_, d) in tensors.items()}
        tensors = convert_dtype(tensors, dtype)
        converted = sorted({before[n] for n, (_, d) in tensors.items() if before[n] != d})
        if converted and event is None:
            event = {"event": "converted", "from": ", ".join(converted), "to": dtype}
    return write_code_form(out_dir, tensors, source.files, mode, event, previous, source.label, literal_max,
                           notes, parents)


def import_code_checkpoint(code_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a code checkpoint back as a dynlm checkpoint directory: the same config, tokenizer
    and (bit-exact) tensors as the checkpoint it was exported from."""
    ckpt = CodeCheckpoint(code_dir)
    arrays = ckpt.arrays()
    tensors = {n: to_torch(a, ckpt.cells[n].dtype) for n, a in arrays.items()}
    files = ckpt.json_files()
    weight_map = json.loads(files[INDEX_NAME])["weight_map"] if INDEX_NAME in files else None
    for shard in set((weight_map or {}).values()):
        if not re.match(r"^[A-Za-z0-9_.-]+\.safetensors$", shard):
            raise CheckpointError(f"{code_dir}: bad shard name '{shard}' in SAFETENSORS_INDEX")
    with atomic_directory(Path(out_dir)) as tmp:
        write_safetensors(tensors, tmp, weight_map=weight_map)  # sharded: the same shards as the original
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    return Path(out_dir)


def _model_config_of(ckpt: CodeCheckpoint):
    section = ckpt.config.get("dynlm")
    if not isinstance(section, dict) or "config" not in section:
        raise CheckpointError(f"{ckpt.path / 'config.py'}: CONFIG has no 'dynlm' section")
    if section.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{ckpt.path / 'config.py'}: format version {section.get('format_version')} "
                              f"is not supported (this dynlm reads version {CHECKPOINT_FORMAT_VERSION})")
    return model_config(section["config"])


def build_empty_model(ckpt: CodeCheckpoint) -> DynModel:
    config = _model_config_of(ckpt)
    return get_architecture(config.type)[1](config)


def check_cells_match_config(ckpt: CodeCheckpoint) -> None:
    """Refuse a checkpoint whose config implies other tensors than its cells declare, before the
    model is allocated: the model is first built on the meta device (no memory), so a config that
    claims a huge model next to small cells costs nothing."""
    with torch.device("meta"):
        expected = model_state_dict_shapes(build_empty_model(ckpt))
    where = str(ckpt.weights_file)
    missing = [n for n in expected if n not in ckpt.cells]
    unexpected = [n for n in ckpt.cells if n not in expected]
    if missing or unexpected:
        parts = [f"missing cells {missing[:3]}{'...' if len(missing) > 3 else ''}" if missing else "",
                 f"unexpected cells {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}" if unexpected else ""]
        raise CheckpointError(f"{where}: does not match the model config: " + "; ".join(p for p in parts if p))
    for name, shape in expected.items():
        if tuple(ckpt.cells[name].shape) != shape:
            raise CheckpointError(f"{ckpt.where(ckpt.cells[name])}: shape {tuple(ckpt.cells[name].shape)}, the config "
                                  f"implies {shape}")


def load_code_checkpoint(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                         shared_root: str | Path | None = None, limits: LoadLimits | None = None) -> DynModel:
    """Build the model a code checkpoint describes and load its cells (each verified by hash).
    `limits`: the loader's budgets (`dynlm.weights.LoadLimits`; default `default_limits()`)."""
    ckpt = CodeCheckpoint(path, shared_root=shared_root, limits=limits)
    check_cells_match_config(ckpt)  # sizes: cells against payloads (CodeCheckpoint), config against cells (here)
    tensors = {n: to_torch(a, ckpt.cells[n].dtype) for n, a in ckpt.arrays().items()}
    return finish_loading(build_empty_model(ckpt), tensors, str(ckpt.weights_file), device, dtype)


def load_only(path: str | Path, cells: list[str] | str, model: torch.nn.Module | None = None,
              shared_root: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Decode only the selected cells (globs, names, prefixes, or "embedding" / "layer_0" /
    "head" / "norm"); copy them into `model` when one is given. Returns {name: tensor}."""
    ckpt = CodeCheckpoint(path, shared_root=shared_root)
    names = ckpt.select(cells)
    tensors = {n: to_torch(a, ckpt.cells[n].dtype) for n, a in ckpt.arrays(names).items()}
    if model is not None:
        own = model.state_dict()
        for name, tensor in tensors.items():
            if name not in own:
                raise CheckpointError(f"{ckpt.weights_file}: the model has no tensor '{name}'")
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise CheckpointError(f"{ckpt.weights_file}: cell '{name}' has shape {tuple(tensor.shape)}, "
                                      f"the model's is {tuple(own[name].shape)}")
        model.load_state_dict(tensors, strict=False)
    return tensors


def load_code_tokenizer(path: str | Path) -> Any:
    """The tokenizer stored in a code checkpoint's vocab.py."""
    return load_vocab_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Editing the manifest: notes, hashes after a hand edit


def _rewrite(ckpt: CodeCheckpoint, cells: list[Cell]) -> None:
    info = dict(ckpt.model_info)
    info["weights_sha256"] = weights_sha256({c.name: c.sha256 for c in cells if c.sha256})
    rewrite_weights_file(ckpt.weights_file, cells, info)


def annotate(path: str | Path, cell_name: str, note: str) -> Cell:
    """Set a cell's note (recorded in its history); only weights.py changes."""
    ckpt = CodeCheckpoint(path)
    if cell_name not in ckpt.cells:
        raise CheckpointError(f"{path}: no cell '{cell_name}'", did_you_mean(cell_name, ckpt.cells))
    cell = ckpt.cells[cell_name]
    cell.note = note
    cell.history.append({"event": "annotated", "time": now(), "note": note})
    _rewrite(ckpt, list(ckpt.cells.values()))
    return cell


def rehash(path: str | Path) -> list[str]:
    """Recompute sha256 and statistics of cells edited by hand; their history records the edit.
    Returns the names of the cells that changed."""
    ckpt = CodeCheckpoint(path)
    changed = []
    stamp = now()
    for cell in ckpt.cells.values():
        if isinstance(cell.data, Shared):
            continue  # the shared file is the one to rehash
        arr = ckpt.array(cell.name, verify=False)
        digest = cell_sha256(arr, cell.dtype)
        if digest != cell.sha256:
            cell.history.append({"event": "edited", "time": stamp, "previous_sha256": cell.sha256})
            cell.sha256 = digest
            cell.stats = tensor_stats(arr, cell.dtype)
            changed.append(cell.name)
    if changed:
        ckpt.model_info.setdefault("history", []).append({"event": "edited", "time": stamp, "cells": changed})
        _rewrite(ckpt, list(ckpt.cells.values()))
    return changed


def describe_cell(ckpt: CodeCheckpoint, name: str, values: int = 8) -> dict[str, Any]:
    """Everything about one cell, and its first values (decoded and verified)."""
    cell = ckpt.cells[name]
    payload = cell.data
    if isinstance(payload, Literal):
        kind = "Literal"
    elif isinstance(payload, Inline):
        kind = "Inline " + "+".join(m for m, _ in payload.planes) + f" ({len(payload.b85):,} base85 chars)"
    elif isinstance(payload, Ref):
        kind = f"Ref {payload.file}:{payload.key}"
    else:
        kind = f"Shared {payload.path}:{payload.name}"
    arr = ckpt.array(name)
    flat = arr.reshape(-1)[:values]
    if DTYPES[cell.dtype].kind == "float":  # shortest decimals of the cell's own dtype
        head = [float(float_text(v, cell.dtype)) for v in as_float(flat, cell.dtype).tolist()]
    else:
        head = flat.tolist()
    return {"name": name, "line": cell.lineno, "shape": list(cell.shape), "dtype": cell.dtype, "sha256": cell.sha256,
            "payload": kind, "stats": cell.stats, "note": cell.note, "history": cell.history, "first_values": head}
