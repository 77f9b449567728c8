"""Training: one trainer for every architecture.

    from dynlm.train import train
    run_dir = train("quick")                                   # mode preset, YAML file or dict
    run_dir = train("my_run.yaml", ["train.max_steps=2000"])   # with a.b=c overrides
    run_dir = train(resume=run_dir)                            # exact resume

Names are imported on first use, so that `dynlm.train.config` (read by the CLI to register its
commands) does not pull in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"RunConfig": "config", "load_run_config": "config", "list_modes": "config", "register_alias": "config",
            "train": "run", "Trainer": "trainer", "TrainingError": "trainer"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dynlm.train' has no attribute '{name}'")
    return getattr(importlib.import_module(f"dynlm.train.{_EXPORTS[name]}"), name)
