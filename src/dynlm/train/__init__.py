"""Training: one trainer for every architecture.

    from dynlm.train import train
    run_dir = train("quick")                                   # mode preset, YAML file or dict
    run_dir = train("my_run.yaml", ["train.max_steps=2000"])   # with a.b=c overrides
    run_dir = train(resume=run_dir)                            # exact resume
"""

from dynlm.train.config import RunConfig, list_modes, load_run_config, register_alias
from dynlm.train.run import train
from dynlm.train.trainer import Trainer, TrainingError

__all__ = ["train", "RunConfig", "load_run_config", "list_modes", "register_alias", "Trainer", "TrainingError"]
