"""Weights as code: checkpoints a person can read, diff, edit, patch with deltas, load in part,
analyse, and run with NumPy alone. See docs/weights_as_code.md.

Imports are lazy: `dynlm.weights.format`, `.safe_loader`, `.store` and `.numpy_runtime` use NumPy
only, so reading a code checkpoint never has to import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CodeCheckpoint": "store",
    "export_code_checkpoint": "codeckpt",
    "import_code_checkpoint": "codeckpt",
    "load_code_checkpoint": "codeckpt",
    "load_code_tokenizer": "codeckpt",
    "load_only": "codeckpt",
    "annotate": "codeckpt",
    "rehash": "codeckpt",
    "diff": "delta",
    "apply_delta": "delta",
    "Delta": "delta",
    "clone": "lineage",
    "specialize": "lineage",
    "share_cells": "lineage",
    "lineage_of": "lineage",
    "CodeFormSaver": "lineage",
    "Experiment": "experiment",
    "analyze": "analysis",
    "find_neurons_for": "neurons",
    "NumpyLM": "numpy_runtime",
    "UnsafeCheckpointError": "safe_loader",
    "LoadLimits": "safe_loader",
    "load_pretrained": "loading",
    "load_tokenizer": "loading",
    "read_training_info": "loading",
    "parse_file": "safe_loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"dynlm.weights.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dynlm.weights' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
