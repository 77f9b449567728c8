"""`dynlm train`: train a model from a mode preset or a YAML file, with `a.b=c` overrides.

    dynlm train quick                                   # the quickstart preset (CPU, minutes)
    dynlm train my_run.yaml model.num_layers=8 train.lr=1e-3
    dynlm train --resume runs/my_run                    # continue exactly where it stopped (Ctrl-C saves)
    torchrun --nproc_per_node 2 -m dynlm train ...      # data parallel, same config
"""

from __future__ import annotations

import argparse
import sys

from dynlm.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    from dynlm.train.config import list_modes

    p = sub.add_parser(
        "train", help="train a model (presets: " + ", ".join(list_modes()) + ", or a YAML file)",
        description="Train a model. CONFIG is a mode preset (" + ", ".join(list_modes()) + ") or a YAML file "
                    "(which may start from a preset with 'preset: NAME'); KEY=VALUE items override config "
                    "fields, e.g. train.lr=1e-3 model.num_layers=8. Everything goes to out_dir/run_name.")
    p.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help="preset or YAML file, then overrides")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest good checkpoint")
    p.add_argument("--force", action="store_true",
                   help="start over in a run folder that already holds a run (its contents are replaced)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dynlm.train import train
    from dynlm.train.config import list_modes, load_run_config
    from dynlm.weights.lineage import CodeFormSaver
    from dynlm.weights.loading import load_pretrained

    configs = [item for item in args.items if "=" not in item]
    overrides = [item for item in args.items if "=" in item]
    if len(configs) > 1:
        raise ConfigError(f"more than one config given: {', '.join(configs)}", "give one preset or YAML file")
    if args.resume and configs:
        raise ConfigError(f"--resume continues a run with its saved config; '{configs[0]}' cannot be combined with it",
                          "overrides such as train.max_steps=N still apply")
    if not args.items and not args.resume:  # `dynlm train` alone: say what is about to happen
        run = load_run_config("quick")
        sys.stderr.write(f"no config given: training the '{run.mode}' preset ({run.model.get('preset')}, "
                         f"{run.train.max_steps} steps on {run.data.corpus}) into {run.out_dir}/{run.run_name}; "
                         f"Ctrl-C stops and saves. Presets: {', '.join(list_modes())} (dynlm train --help)\n")
    # init_from in any format, and train.code_form: both live in the layers above training
    train(configs[0] if configs else (None if args.resume else "quick"), overrides, resume=args.resume,
          force=args.force, callbacks=[CodeFormSaver()], load_model=load_pretrained)
    return 0
