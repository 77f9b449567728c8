"""Training checkpoints: a normal dynlm checkpoint plus a `trainer/` folder that makes resume exact.

    run/
      config.yaml                 the resolved run config
      step-000500/                written every `save_every` steps; the newest `keep_last` are kept
        config.json  model.safetensors  tokenizer.json  training.json
        trainer/
          optimizer.safetensors   AdamW moments and step counts, keyed "<parameter name>/<state>"
          state.json              step, data position, learning-rate schedule, RNG states of every
                                  rank, NaN counters, best validation figure, optimizer groups
      last/                       the newest step checkpoint (hard links: no extra disk space)
      best/                       the best validation bits per byte so far (model + tokenizer only)

Every directory is written to a temporary folder that then takes its place (`atomic_directory`),
so a crash, a full disk, a kill or Ctrl-C at any point of a save leaves a loadable checkpoint.
No pickle: tensors in safetensors, everything else in JSON."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dynlm.checkpoint import read_config, read_safetensors, save_checkpoint
from dynlm.errors import CheckpointError
from dynlm.fileio import atomic_directory, json_text

TRAINER_DIR = "trainer"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
TRAINING_INFO_FILE = "training.json"
TRAINER_FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# RNG states (JSON; torch's byte states in base64)


def capture_rng_state(device: torch.device) -> dict[str, Any]:
    """This process's Python, NumPy and torch (CPU and current CUDA device) RNG states."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
    }
    if device.type == "cuda":
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state(device).numpy().tobytes()).decode("ascii")
    return state


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["cuda"])), dtype=torch.uint8),
                                 device)


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> safetensors + JSON


def optimizer_state_to_files(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's `get_optimizer_state_dict`)
    as flat tensors {"<param>/<key>": tensor} and JSON-able parameter groups."""
    tensors: dict[str, torch.Tensor] = {}
    for param_name, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            tensors[f"{param_name}/{key}"] = value.detach().contiguous().cpu()
    groups = []
    for group in state_dict["param_groups"]:
        groups.append({k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()})
    return tensors, groups


def optimizer_state_from_files(tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat_name, tensor in tensors.items():
        param_name, _, key = flat_name.rpartition("/")
        state.setdefault(param_name, {})[key] = tensor
    param_groups = [{k: (tuple(v) if k == "betas" else v) for k, v in group.items()} for group in groups]
    return {"state": state, "param_groups": param_groups}


# ---------------------------------------------------------------------------------------------
# Writing


def save_training_checkpoint(directory: Path, model: torch.nn.Module, tokenizer: Any,
                             model_tensors: dict[str, torch.Tensor] | None, training_info: dict[str, Any],
                             optimizer_state: dict[str, Any] | None = None,
                             trainer_state: dict[str, Any] | None = None) -> Path:
    """One atomic checkpoint directory. With `optimizer_state` and `trainer_state` it can be
    resumed from; without them (best/) it is a model checkpoint only."""

    def write_extra(tmp: Path) -> None:
        (tmp / TRAINING_INFO_FILE).write_text(json_text(training_info))
        if optimizer_state is None or trainer_state is None:
            return
        folder = tmp / TRAINER_DIR
        folder.mkdir()
        tensors, groups = optimizer_state_to_files(optimizer_state)
        save_file(tensors, str(folder / OPTIMIZER_FILE), metadata={"format": "pt"})
        state = {"format_version": TRAINER_FORMAT_VERSION, **trainer_state, "optimizer_param_groups": groups}
        (folder / STATE_FILE).write_text(json_text(state))

    return save_checkpoint(model, directory, tokenizer=tokenizer, state_dict=model_tensors, write_extra=write_extra)


def link_directory(source: Path, destination: Path) -> None:
    """Make `destination` an atomic copy of `source` made of hard links (a copy where the file
    system has no hard links)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    with atomic_directory(destination) as tmp:
        shutil.rmtree(tmp)
        shutil.copytree(source, tmp, copy_function=link_or_copy)


def step_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-XXXXXX directory, oldest first."""
    if not run_dir.is_dir():
        return []
    found = []
    for path in run_dir.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def prune_step_checkpoints(run_dir: Path, keep_last: int) -> None:
    for _, path in step_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Reading


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """The `trainer/state.json` of a checkpoint; CheckpointError naming the file when it is
    missing, truncated or of another version."""
    path = directory / TRAINER_DIR / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this checkpoint cannot be resumed from")
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(state, dict) or state.get("format_version") != TRAINER_FORMAT_VERSION:
        raise CheckpointError(f"{path}: unknown trainer state format")
    for key in ("step", "sampler", "rng", "optimizer_param_groups"):
        if key not in state:
            raise CheckpointError(f"{path}: no '{key}' entry")
    return state


def read_optimizer_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / TRAINER_DIR / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; this checkpoint cannot be resumed from")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated files
        raise CheckpointError(f"{path}: unreadable or truncated ({str(e).splitlines()[0]})") from None


def validate_resumable(directory: Path) -> dict[str, Any]:
    """Read everything a resume needs (weights, optimizer, state) so a broken checkpoint is found
    before training starts. Returns the trainer state."""
    read_config(directory)
    read_safetensors(directory)
    state = read_trainer_state(directory)
    read_optimizer_tensors(directory)
    return state


def find_resume_checkpoint(run_dir: Path) -> tuple[Path, list[str]]:
    """The newest checkpoint of a run that can be resumed from, and why newer ones were skipped.
    `last/` is tried first, then step directories from the newest."""
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run folder")
    candidates = [run_dir / "last"] + [path for _, path in reversed(step_checkpoints(run_dir))]
    problems = []
    for path in candidates:
        if not path.is_dir():
            continue
        try:
            validate_resumable(path)
            return path, problems
        except CheckpointError as e:
            problems.append(str(e))
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise CheckpointError(f"{run_dir}: no checkpoint to resume from{detail}")
