"""Lineage: clones that remember their parent, specialisations stored as deltas, cells shared
between models (verified by hash), and a trainer callback that saves in code form.

    clone("base/", "experiment/")                       # MODEL["parents"] names base's weights hash
    specialize("base/", "legal", "contracts.txt", "deltas/legal")   # fine-tune (the trainer) -> delta
    share_cells(["a/", "b/"], ["model.embed_tokens.weight"], "shared/embedding.py")
    lineage_of("experiment/")                           # [this, parent, grandparent, ...]
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynlm.checkpoint import save_checkpoint
from dynlm.errors import CheckpointError
from dynlm.fileio import atomic_open
from dynlm.train.run import train
from dynlm.weights.codeckpt import export_code_checkpoint, import_code_checkpoint, read_source, write_code_form
from dynlm.weights.delta import Delta, diff
from dynlm.weights.format import Cell, Shared, write_pieces
from dynlm.weights.loading import load_pretrained
from dynlm.weights.store import (
    CodeCheckpoint,
    build_cells,
    is_code_checkpoint,
    now,
    render_weights,
    rewrite_weights_file,
    weights_sha256,
)


def clone(source: Any, out_dir: str | Path, note: str = "", mode: str | None = None) -> Path:
    """A copy of `source` in code form whose MODEL["parents"] records the source's weights hash
    and path. Cell histories carry over when the source is a code checkpoint."""
    src = read_source(source)
    parent_hash = weights_sha256(src.cell_hashes())
    parent = {"relation": "clone", "weights_sha256": parent_hash, "path": src.label, "time": now()}
    if note:
        parent["note"] = note
    write_mode = mode or (src.code.model_info.get("mode", "inline") if src.code is not None else "inline")
    return write_code_form(out_dir, src.tensors, src.files, write_mode, {"event": "cloned", "from": src.label},
                           src.code, src.label, parents=[parent])


def lineage_of(path: str | Path) -> list[dict[str, Any]]:
    """This checkpoint, then its parents (each folder's most recent one: clone or delta base) as
    far as their folders exist; each entry says whether the folder still holds the weights the
    child recorded (`verified`)."""
    chain: list[dict[str, Any]] = []
    current: Path | None = Path(path)
    seen: set[Path] = set()
    expected: str | None = None
    while current is not None and is_code_checkpoint(current) and current.resolve() not in seen:
        seen.add(current.resolve())
        ckpt = CodeCheckpoint(current)
        digest = ckpt.weights_sha256
        chain.append({"path": str(current), "weights_sha256": digest,
                      "verified": expected is None or expected == digest,
                      "history": ckpt.model_info.get("history", []), "parents": ckpt.model_info.get("parents", [])})
        parents = ckpt.model_info.get("parents", [])
        current, expected = None, None
        parent = parents[-1] if parents else None  # the most recent: the one this folder was made from
        if isinstance(parent, dict) and parent.get("path"):
            candidate = Path(parent["path"])
            expected = parent.get("weights_sha256") or parent.get("base_weights_sha256")
            if is_code_checkpoint(candidate):
                current = candidate
            else:
                chain.append({"path": str(candidate), "weights_sha256": expected, "verified": False,
                              "missing": not candidate.exists()})
    return chain


# ---------------------------------------------------------------------------------------------
# Training in code form


class CodeFormSaver:
    """A trainer callback: whenever the trainer saves a checkpoint, the same weights are written
    in code form to `out_dir` (one folder, overwritten), and every cell that changed since the
    previous save gets a history entry {"event": "trained", "step": ..., "corpus": ..., ...}.

        train("quick", callbacks=[CodeFormSaver("runs/code")])
        train("quick", ["train.code_form=inline"], callbacks=[CodeFormSaver()])   # <run>/code

    Without `out_dir` and `mode` it follows the run's `train.code_form` (doing nothing when that
    is null) and writes to `<run folder>/code`; the `dynlm train` command always adds one."""

    writes_code_form = True  # tells `train()` that `train.code_form` is taken care of

    def __init__(self, out_dir: str | Path | None = None, mode: str | None = None,
                 extra: dict[str, Any] | None = None):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.mode = mode
        self.extra = dict(extra or {})
        self.saved: list[Path] = []

    def __call__(self, event: str, trainer: Any, info: dict[str, Any]) -> None:
        if event != "save" or not getattr(trainer.ctx, "is_main", True):
            return
        mode = self.mode or trainer.run.train.code_form or ("hybrid" if self.out_dir is not None else None)
        if mode is None:
            return
        out_dir = self.out_dir if self.out_dir is not None else Path(trainer.run_dir) / "code"
        history = {"event": "trained", "step": int(info.get("step", trainer.step)),
                   "tokens_seen": int(trainer.tokens_seen), "corpus": str(trainer.run.data.corpus),
                   "checkpoint": str(info.get("path", "")), **self.extra}
        if trainer.last_val:
            history["val_bpb"] = float(f"{trainer.last_val.get('bpb', float('nan')):.6g}")
        self.saved.append(export_code_checkpoint(Path(info["path"]), out_dir, mode=mode, history_event=history))


def specialize(parent: Any, domain: str, corpus: str, out_dir: str | Path, steps: int = 200,
               overrides: Sequence[str] = (), config: str = "transfer", kind: str = "auto",
               mode: str = "inline", work_dir: str | Path | None = None, callbacks: Sequence[Any] = ()) -> Delta:
    """Fine-tune a clone of `parent` on `corpus` with dynlm's trainer (`dynlm.train.run.train`,
    config preset `config` + `overrides`), and store the result as a delta against the parent.

    The delta's header records the lineage: the parent's weights hash and path, the domain, the
    corpus, the steps, the run folder and the run's final validation figures. The parent keeps
    its tokenizer (`data.tokenizer=init`). `work_dir` keeps the run folder (default: a temporary
    folder, removed afterwards); `callbacks` go to the trainer (e.g. a `CodeFormSaver`)."""
    src = read_source(parent)
    with tempfile.TemporaryDirectory(prefix="dynlm-specialize-") as tmp:
        base = Path(tmp) / "parent"
        if src.code is not None:
            import_code_checkpoint(src.code.path, base)
        elif isinstance(parent, (str, Path)):
            base = Path(parent)
        else:
            save_checkpoint(parent, base)
        runs = Path(work_dir) if work_dir is not None else Path(tmp) / "runs"
        run_dir = train(config, [f"init_from={base}", f"data.corpus={corpus}", "data.tokenizer=init",
                                 f"train.max_steps={steps}", f"out_dir={runs}", f"run_name={_folder_name(domain)}",
                                 *overrides], callbacks=callbacks, load_model=load_pretrained)
        tuned = run_dir / "best" if (run_dir / "best").is_dir() else run_dir / "last"
        if not tuned.is_dir():
            raise CheckpointError(f"{run_dir}: the run saved no checkpoint")
        report = _read_json(run_dir / "eval.json")
        header = {"relation": "specialize", "domain": domain, "corpus": corpus, "steps": steps,
                  "parent": src.label, "run_dir": str(run_dir) if work_dir is not None else None,
                  "evaluation": {k: v for k, v in (report.get("evaluation") or {}).items()
                                 if isinstance(v, dict) or k == "step"}}
        delta = diff(base if src.code is None else src.code.path, tuned, out_dir, kind=kind, mode=mode,
                     note=f"{domain}: fine-tuned {steps} steps on {corpus}", extra=header,
                     result_label=None if work_dir is not None else f"{domain} (temporary run folder, removed)")
    return delta


def _folder_name(text: str) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-")
    return name or "specialized"


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------------------------------------
# Shared cells


def share_cells(checkpoints: Sequence[str | Path], cells: Sequence[str] | str, shared_file: str | Path) -> Path:
    """Move cells that several code checkpoints hold identically (same sha256) into one shared
    file; each checkpoint's cell becomes `Shared(relative path, name)` and is verified against its
    own sha256 whenever it loads. The shared file must lie inside each checkpoint's parent folder
    (the default place `Shared` paths may point to)."""
    shared_file = Path(shared_file)
    if shared_file.suffix != ".py":
        raise CheckpointError(f"{shared_file}: a shared cell file is a .py file")
    ckpts = [CodeCheckpoint(p) for p in checkpoints]
    if not ckpts:
        raise CheckpointError("share_cells needs at least one checkpoint")
    names = ckpts[0].select(cells)
    for ckpt in ckpts:
        root = ckpt.path.resolve().parent
        if root not in shared_file.resolve().parents:
            raise CheckpointError(f"{shared_file} is outside {root}, where {ckpt.path}'s Shared cells may point",
                                  "put the shared file next to the checkpoint folders (e.g. ../shared/)")
    arrays = {}
    for name in names:
        arrays[name] = ckpts[0].array(name)  # decoded and verified
        digest = ckpts[0].cells[name].sha256
        for other in ckpts[1:]:
            if name not in other.cells or other.cells[name].sha256 != digest:
                raise CheckpointError(f"{other.path}: cell '{name}' differs from {ckpts[0].path}'s "
                                      "(only identical cells can be shared)")
            other.array(name)  # its payload must really hash to the recorded sha256
    shared_cells = _shared_file_cells(shared_file, {n: (a, ckpts[0].cells[n].dtype) for n, a in arrays.items()},
                                      {n: ckpts[0].cells[n] for n in names})
    shared_file.parent.mkdir(parents=True, exist_ok=True)
    info = {"shared": True, "cells": len(shared_cells), "weights_sha256":
            weights_sha256({c.name: c.sha256 for c in shared_cells}), "used_by": [str(c.path) for c in ckpts]}
    with atomic_open(shared_file) as f:
        write_pieces(f, render_weights(shared_cells, info))
    for ckpt in ckpts:
        relative = os.path.relpath(shared_file.resolve(), ckpt.path.resolve())
        for name in names:
            cell = ckpt.cells[name]
            cell.data = Shared(path=Path(relative).as_posix(), name=name)
            cell.history.append({"event": "shared", "time": now(), "file": Path(relative).as_posix()})
        rewrite_weights_file(ckpt.weights_file, list(ckpt.cells.values()), ckpt.model_info)
    return shared_file


def _shared_file_cells(shared_file: Path, tensors: dict[str, Any], originals: dict[str, Cell]) -> list[Cell]:
    """The cells of the shared file: those already in it (kept) plus the new ones."""
    existing: dict[str, Cell] = {}
    if shared_file.is_file():
        holder = CodeCheckpoint(shared_file.parent, weights_file=shared_file)
        if holder.model_info.get("shared") is not True:
            raise CheckpointError(f"{shared_file}: exists and is not a shared cell file")
        for name, cell in holder.cells.items():
            if name in tensors and cell.sha256 != originals[name].sha256:
                raise CheckpointError(f"{shared_file}: already holds a different '{name}'")
            existing[name] = cell
        existing = {n: c for n, c in existing.items() if n not in tensors}
        # keep the old payloads: decode and re-encode them with the new ones
        tensors = {**{n: (holder.array(n), c.dtype) for n, c in existing.items()}, **tensors}
        originals = {**existing, **originals}
    cells, _ = build_cells(tensors, "inline", previous=originals)
    return cells


