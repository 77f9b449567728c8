"""Deltas: store only what changed between two models, and apply it back.

Per cell, one of three kinds (compare git-theta's update types and PEFT's LoRA adapters):

    dense    the arithmetic difference new - base in the cell's dtype, plus the few positions
             where base + difference does not round back to new exactly (stored as new values);
             applying it is bit-exact
    sparse   the positions that changed (as gaps between consecutive flat indices, which
             compress well) and their new values; bit-exact
    lowrank  u @ v (truncated SVD at a rank), an approximation of the difference whose relative
             Frobenius error is recorded in the cell

`kind="auto"` picks, for each cell, the smallest exact encoding (dense or sparse); it also
considers low rank when `max_rel_error` is given. A delta records the weights hash of its base
and refuses to apply to anything else.

    delta = diff("base/", "tuned/", "delta/")          # a folder: delta.py (+ delta.safetensors)
    apply_delta("base/", "delta/", "tuned2/")           # == tuned/ for exact deltas
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynlm.checkpoint import write_safetensors
from dynlm.errors import CheckpointError
from dynlm.fileio import atomic_directory
from dynlm.weights.codeckpt import Source, read_source, to_torch, write_code_form
from dynlm.weights.format import (
    DELTA_FILE,
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    Cell,
    DeltaCell,
    Inline,
    Literal,
    Ref,
    as_float,
    cell_sha256,
    contiguous,
    from_float,
    render_module,
    write_pieces,
)
from dynlm.weights.safe_loader import parse_file
from dynlm.weights.store import CodeCheckpoint, Tensor, make_payload, now, weights_sha256, write_safetensors_numpy

DELTA_BLOBS = "delta.safetensors"
KINDS = ("auto", "dense", "sparse", "lowrank")


# ---------------------------------------------------------------------------------------------
# One cell


def _bits(arr: np.ndarray) -> np.ndarray:
    """The raw bit patterns (so that -0.0 != 0.0 and NaN == NaN, as bytes compare)."""
    flat = contiguous(arr).reshape(-1)
    return flat.view(f"u{flat.dtype.itemsize}") if flat.dtype != np.bool_ else flat


def _gaps(indices: np.ndarray) -> np.ndarray:
    """Sorted flat indices -> first index, then differences (small numbers that deflate well)."""
    return np.diff(indices, prepend=0).astype(np.int64)


def _indices(gaps: np.ndarray, numel: int, where: str) -> np.ndarray:
    if gaps.size and (gaps[1:] <= 0).any() or (gaps.size and gaps[0] < 0):
        raise CheckpointError(f"{where}: index gaps must be positive (indices strictly increasing)")
    indices = np.cumsum(gaps)
    if indices.size and indices[-1] >= numel:
        raise CheckpointError(f"{where}: an index points past the tensor's {numel} elements")
    return indices


def _add(base: np.ndarray, difference: np.ndarray, dtype: str) -> np.ndarray:
    """base + difference in the cell's arithmetic: floats in float32 (float64 for float64) then
    rounded to the dtype; integers wrap around; booleans flip (xor)."""
    kind = DTYPES[dtype].kind
    if kind == "bool":
        return np.logical_xor(base, difference)
    if kind == "int":
        return (base + difference).astype(base.dtype)  # modular, like the subtraction that made it
    return from_float(as_float(base, dtype) + as_float(difference, dtype), dtype)


def _subtract(new: np.ndarray, base: np.ndarray, dtype: str) -> np.ndarray:
    kind = DTYPES[dtype].kind
    if kind == "bool":
        return np.logical_xor(new, base)
    if kind == "int":
        with np.errstate(over="ignore"):
            return (new - base).astype(new.dtype)
    return from_float(as_float(new, dtype) - as_float(base, dtype), dtype)


def _part(cell_name: str, part: str, arr: np.ndarray, dtype: str, mode: str) -> Cell:
    name = f"{cell_name}:{part}"
    payload = make_payload(arr, dtype, mode, literal_max=64)
    if payload is None:  # hybrid: a Ref into delta.safetensors (written by the caller)
        payload = Ref(DELTA_BLOBS, name)
    return Cell(name=name, shape=tuple(arr.shape), dtype=dtype, sha256=cell_sha256(arr, dtype), data=payload)


def _size(parts: list[Cell], arrays: dict[str, np.ndarray]) -> int:
    """Bytes a part list costs in the file (its encoded payload, or raw bytes for a Ref)."""
    total = 0
    for p in parts:
        if isinstance(p.data, Inline):
            total += len(memoryview(p.data.b85))
        elif isinstance(p.data, Literal):
            total += 12 * len(p.data.values)
        else:
            total += arrays[p.name].nbytes
    return total


@dataclass
class _Candidate:
    kind: str
    parts: list[Cell]
    arrays: dict[str, np.ndarray]
    rel_error: float = 0.0

    @property
    def size(self) -> int:
        return _size(self.parts, self.arrays)


def _sparse(name: str, new: np.ndarray, changed: np.ndarray, dtype: str, mode: str) -> _Candidate:
    indices = np.flatnonzero(changed)
    gaps, values = _gaps(indices), new.reshape(-1)[indices]
    arrays = {f"{name}:index_gaps": gaps, f"{name}:values": values}
    return _Candidate("sparse", [_part(name, "index_gaps", gaps, "int64", mode),
                                 _part(name, "values", values, dtype, mode)], arrays)


def _dense(name: str, base: np.ndarray, new: np.ndarray, dtype: str, mode: str) -> _Candidate:
    difference = _subtract(new, base, dtype)
    wrong = np.flatnonzero(_bits(_add(base, difference, dtype)) != _bits(new))  # rounding misses
    parts = [_part(name, "difference", difference, dtype, mode)]
    arrays = {f"{name}:difference": difference}
    if wrong.size:
        fix_gaps, fix_values = _gaps(wrong), new.reshape(-1)[wrong]
        parts += [_part(name, "fix_index_gaps", fix_gaps, "int64", mode),
                  _part(name, "fix_values", fix_values, dtype, mode)]
        arrays.update({f"{name}:fix_index_gaps": fix_gaps, f"{name}:fix_values": fix_values})
    return _Candidate("dense", parts, arrays)


def _lowrank(name: str, base: np.ndarray, new: np.ndarray, dtype: str, mode: str, rank: int | None,
             max_rel_error: float | None) -> _Candidate | None:
    if base.ndim != 2 or DTYPES[dtype].kind != "float":
        return None
    work = np.float64 if dtype == "float64" else np.float32
    difference = (as_float(new, dtype).astype(work) - as_float(base, dtype).astype(work))
    total = float(np.square(difference, dtype=np.float64).sum())
    if total == 0.0:
        return None
    u, s, vt = np.linalg.svd(difference, full_matrices=False)
    energy = np.square(s.astype(np.float64))
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r]: energy beyond rank r
    if rank is None:
        target = (max_rel_error or 0.0) ** 2 * total
        rank = int(np.argmax(tail <= target))
    rank = max(1, min(rank, s.size))
    left = (u[:, :rank] * s[:rank]).astype(work)  # [m, r]
    right = vt[:rank].astype(work)  # [r, n]
    error = math.sqrt(float(np.square(difference - left @ right, dtype=np.float64).sum()) / total)
    part_dtype = "float64" if dtype == "float64" else "float32"
    arrays = {f"{name}:u": left, f"{name}:v": right}
    parts = [_part(name, "u", left, part_dtype, mode), _part(name, "v", right, part_dtype, mode)]
    return _Candidate("lowrank", parts, arrays, error)


def diff_cell(name: str, base: np.ndarray, new: np.ndarray, dtype: str, kind: str = "auto", mode: str = "inline",
              rank: int | None = None,
              max_rel_error: float | None = None) -> tuple[DeltaCell, dict[str, np.ndarray]]:
    """The delta of one tensor (which must differ) and the arrays of its parts."""
    changed = _bits(base) != _bits(new)
    count = int(np.count_nonzero(changed))
    candidates: list[_Candidate] = []
    itemsize = base.dtype.itemsize
    # the sparse form cannot win when most elements changed (each needs an index and a value)
    if kind == "sparse" or (kind == "auto" and count * (itemsize + 1) < base.size * itemsize):
        candidates.append(_sparse(name, new, changed, dtype, mode))
    if kind in ("auto", "dense"):
        candidates.append(_dense(name, base, new, dtype, mode))
    if kind == "lowrank" or (kind == "auto" and max_rel_error is not None):
        lowrank = _lowrank(name, base, new, dtype, mode, rank, max_rel_error)
        if lowrank is not None and (kind == "lowrank" or max_rel_error is None or lowrank.rel_error <= max_rel_error):
            candidates.append(lowrank)
        elif kind == "lowrank":  # not a float matrix: the exact dense form instead
            candidates.append(_dense(name, base, new, dtype, mode))
    best = min(candidates, key=lambda c: c.size)
    is_float = DTYPES[dtype].kind == "float"
    moved = (as_float(new, dtype).astype(np.float64) - as_float(base, dtype)).reshape(-1)[changed.reshape(-1)] \
        if is_float else None
    stats: dict[str, Any] = {"changed": count, "changed_fraction": float(f"{count / max(base.size, 1):.4g}"),
                             "bytes": best.size}
    if moved is not None and moved.size and np.isfinite(moved).all():
        stats["max_abs_change"] = float(f"{float(np.abs(moved).max()):.4g}")
        stats["rms_change"] = float(f"{math.sqrt(float(np.square(moved).sum()) / base.size):.4g}")
    if best.kind == "lowrank":
        stats["rank"] = int(best.arrays[f"{name}:u"].shape[1])
    cell = DeltaCell(name=name, kind=best.kind, shape=tuple(base.shape), dtype=dtype,
                     base_sha256=cell_sha256(base, dtype), result_sha256=cell_sha256(new, dtype), parts=best.parts,
                     rel_error=float(f"{best.rel_error:.6g}"), stats=stats)
    return cell, best.arrays


def apply_cell(cell: DeltaCell, base: np.ndarray, parts: dict[str, np.ndarray], where: str) -> np.ndarray:
    """base -> new for one cell (bit-exact for dense and sparse)."""
    if cell_sha256(base, cell.dtype) != cell.base_sha256:
        raise CheckpointError(f"{where}: this base tensor is not the one the delta was made from (sha256 differs)")
    if tuple(base.shape) != tuple(cell.shape):
        raise CheckpointError(f"{where}: base shape {tuple(base.shape)} != delta shape {tuple(cell.shape)}")

    def part(key: str) -> np.ndarray:
        if f"{cell.name}:{key}" not in parts:
            raise CheckpointError(f"{where}: a {cell.kind} delta needs the part '{key}'")
        return parts[f"{cell.name}:{key}"]

    flat = base.reshape(-1)
    if cell.kind == "sparse":
        out = flat.copy()
        out[_indices(part("index_gaps"), flat.size, where)] = part("values")
    elif cell.kind == "dense":
        out = _add(flat, part("difference").reshape(-1), cell.dtype)
        if f"{cell.name}:fix_index_gaps" in parts:
            out[_indices(part("fix_index_gaps"), flat.size, where)] = part("fix_values")
    else:  # lowrank
        low = part("u") @ part("v")
        if low.shape != base.shape:
            raise CheckpointError(f"{where}: u @ v has shape {low.shape}, the cell {base.shape}")
        out = from_float(as_float(base, cell.dtype) + low, cell.dtype).reshape(-1)
    out = out.reshape(base.shape)
    if cell.kind != "lowrank" and cell_sha256(out, cell.dtype) != cell.result_sha256:
        raise CheckpointError(f"{where}: applying the delta did not give the recorded result (sha256 differs)")
    return out


# ---------------------------------------------------------------------------------------------
# Whole models


class Delta:
    """A delta folder, parsed safely (delta.py follows the same never-run grammar)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.file = self.path / DELTA_FILE
        parsed = parse_file(self.file, "delta")
        if parsed.variables.get("FORMAT") != FORMAT_NAME or parsed.variables.get("VERSION") != FORMAT_VERSION:
            raise CheckpointError(f"{self.file}: not a {FORMAT_NAME} version {FORMAT_VERSION} delta")
        self._parsed = parsed
        self.header: dict[str, Any] = parsed.variables.get("DELTA", {})
        self.cells: list[DeltaCell] = parsed.variables.get("CELLS", [])
        for key in ("base_weights_sha256", "result_weights_sha256"):
            if not isinstance(self.header.get(key), str):
                raise CheckpointError(f"{self.file}: DELTA has no '{key}'")
        self._parts = CodeCheckpoint.from_cells(self.path, self.file, [p for c in self.cells for p in c.parts])

    @property
    def exact(self) -> bool:
        return all(c.kind != "lowrank" for c in self.cells)

    def parts_of(self, cell: DeltaCell) -> dict[str, np.ndarray]:
        return {p.name: self._parts.array(p.name) for p in cell.parts}

    def summary(self) -> dict[str, Any]:
        kinds: dict[str, int] = {}
        for c in self.cells:
            kinds[c.kind] = kinds.get(c.kind, 0) + 1
        return {"path": str(self.path), "cells": len(self.cells), "kinds": kinds, "exact": self.exact,
                "base_weights_sha256": self.header["base_weights_sha256"],
                "result_weights_sha256": self.header["result_weights_sha256"],
                "per_cell": [{"name": c.name, "kind": c.kind, "rel_error": c.rel_error, **c.stats} for c in self.cells]}


def diff(base: Any, new: Any, out_dir: str | Path, kind: str = "auto", mode: str = "inline",
         rank: int | None = None, max_rel_error: float | None = None, note: str = "",
         extra: dict[str, Any] | None = None, result_label: str | None = None) -> Delta:
    """The delta that turns `base` into `new` (models or checkpoint folders of the same
    architecture), written to `out_dir`. `extra` goes into the header as its "lineage";
    `result_label` names the result in the header instead of `new`'s path (a temporary one)."""
    if kind not in KINDS:
        raise CheckpointError(f"unknown delta kind '{kind}'", "use " + ", ".join(KINDS))
    if kind == "lowrank" and rank is None and max_rel_error is None:
        raise CheckpointError("a low-rank delta needs a rank or a maximum relative error",
                              "give --rank R or --max-rel-error E")
    if mode not in ("inline", "hybrid"):
        raise CheckpointError(f"unknown mode '{mode}'", "use 'inline' or 'hybrid'")
    a, b = read_source(base), read_source(new)
    _check_compatible(a, b)
    cells: list[DeltaCell] = []
    blobs: dict[str, Tensor] = {}
    unchanged = 0
    for name, (base_arr, dtype) in a.tensors.items():
        new_arr, new_dtype = b.tensors[name]
        if dtype != new_dtype or base_arr.shape != new_arr.shape:
            raise CheckpointError(f"'{name}' is {dtype}{list(base_arr.shape)} in {a.label} and "
                                  f"{new_dtype}{list(new_arr.shape)} in {b.label}; a delta needs the same tensors")
        if np.array_equal(_bits(base_arr), _bits(new_arr)):
            unchanged += 1
            continue
        cell, arrays = diff_cell(name, base_arr, new_arr, dtype, kind, mode, rank, max_rel_error)
        cells.append(cell)
        for p in cell.parts:
            if not isinstance(p.data, (Inline, Literal)):
                blobs[p.name] = (arrays[p.name], p.dtype)
    counts: dict[str, int] = {"unchanged": unchanged}
    for c in cells:
        counts[c.kind] = counts.get(c.kind, 0) + 1
    header = {
        "base_weights_sha256": weights_sha256(a.cell_hashes()),
        "result_weights_sha256": weights_sha256(b.cell_hashes()),
        "base": a.label, "result": result_label or b.label, "time": now(),
        "exact": all(c.kind != "lowrank" for c in cells),
        "kinds": counts, "note": note,
    }
    if extra:
        header["lineage"] = json.loads(json.dumps(extra, default=str))
    _write_delta(Path(out_dir), header, cells, blobs)
    return Delta(out_dir)


def _check_compatible(a: Source, b: Source) -> None:
    config_a, config_b = a.config.get("dynlm", {}), b.config.get("dynlm", {})
    if config_a.get("config") != config_b.get("config"):
        keys = sorted(k for k in set(config_a.get("config", {})) | set(config_b.get("config", {}))
                      if config_a.get("config", {}).get(k) != config_b.get("config", {}).get(k))
        raise CheckpointError(f"{a.label} and {b.label} have different model configs ({', '.join(keys[:5])}); "
                              "a delta is between two versions of one architecture")
    if set(a.tensors) != set(b.tensors):
        only = sorted(set(a.tensors) ^ set(b.tensors))
        raise CheckpointError(f"{a.label} and {b.label} hold different tensors ({', '.join(only[:3])})")


def _write_delta(out_dir: Path, header: dict[str, Any], cells: list[DeltaCell], blobs: dict[str, Tensor]) -> None:
    kinds = ", ".join(f"{v} {k}" for k, v in header["kinds"].items())
    doc = (f"A dynlm weights delta: {kinds}.\n\nIt applies only to the weights whose hash is base_weights_sha256 "
           "(dynlm weights apply BASE THIS -o OUT).\nDeltaCell kinds: dense = difference (+ exact fix-ups), "
           "sparse = index gaps + new values,\nlowrank = u @ v approximating the difference (rel_error = "
           "Frobenius error / norm of the difference).")
    pieces = render_module(doc, [("FORMAT", FORMAT_NAME), ("VERSION", FORMAT_VERSION), ("DELTA", header),
                                 ("CELLS", cells)], with_import=True)
    with atomic_directory(out_dir) as tmp:
        with open(tmp / DELTA_FILE, "wb") as f:
            write_pieces(f, pieces)
        if blobs:
            write_safetensors_numpy(tmp / DELTA_BLOBS, blobs, {"format": "dynlm-weights-delta"})


def apply_delta(base: Any, delta: str | Path | Delta, out_dir: str | Path, mode: str | None = None,
                allow_approximate: bool = True) -> Path:
    """Apply a delta to `base` (it must be the delta's base: same weights hash) and write the
    result: a code checkpoint when `base` is one (its history records the delta), a dynlm
    checkpoint otherwise."""
    delta = delta if isinstance(delta, Delta) else Delta(delta)
    source = read_source(base)
    actual = weights_sha256(source.cell_hashes())
    if actual != delta.header["base_weights_sha256"]:
        expected = delta.header["base_weights_sha256"]
        raise CheckpointError(f"{delta.path} was made against weights {expected[:16]}..., {source.label} has "
                              f"weights {actual[:16]}...; a delta applies only to its own base")
    if not delta.exact and not allow_approximate:
        raise CheckpointError(f"{delta.path} holds low-rank (approximate) cells")
    tensors = dict(source.tensors)
    for cell in delta.cells:
        if cell.name not in tensors:
            raise CheckpointError(f"{delta.file}: line {cell.lineno}: {source.label} has no tensor '{cell.name}'")
        arr, dtype = tensors[cell.name]
        if dtype != cell.dtype:
            raise CheckpointError(f"{delta.file}: line {cell.lineno}: '{cell.name}' is {dtype} in the base, "
                                  f"{cell.dtype} in the delta")
        where = f"{delta.file}: line {cell.lineno}: cell '{cell.name}'"
        tensors[cell.name] = (apply_cell(cell, arr, delta.parts_of(cell), where), dtype)
    out_dir = Path(out_dir)
    event = {"event": "delta applied", "delta": str(delta.path), "exact": delta.exact}
    if source.code is not None or mode is not None:
        previous = source.code
        parents = [*(previous.model_info.get("parents", []) if previous else []),
                   {"relation": "delta", "path": source.label,
                    "base_weights_sha256": delta.header["base_weights_sha256"], "delta": str(delta.path)}]
        write_mode = mode or (previous.model_info.get("mode", "inline") if previous else "inline")
        return write_code_form(out_dir, tensors, source.files, write_mode, event, previous, source.label,
                               parents=parents)
    with atomic_directory(out_dir) as tmp:
        write_safetensors({n: to_torch(a, d) for n, (a, d) in tensors.items()}, tmp)
        for name, data in source.files.items():
            (tmp / name).write_bytes(data)
    return out_dir
