"""`dynlm arena`: every registered architecture, the same data and budget, one report.

    dynlm arena quick                                   # all architectures, CPU, minutes (make quickstart)
    dynlm arena quick --corpus ./my_texts/ --archs standard,mod
    dynlm arena gpu-small --budget flops=2e17           # the published comparison, on a GPU
    dynlm arena gpu-small --resume arena/gpu-small      # continue after a crash or Ctrl-C
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from dynlm.errors import ConfigError


def _seeds(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def register(sub: argparse._SubParsersAction) -> None:
    from dynlm.train.arena import list_tiers

    p = sub.add_parser(
        "arena", help="train and score every architecture on the same data and budget (tiers: "
                      + ", ".join(list_tiers()) + ")",
        description="Train every registered architecture (or --archs) on the same corpus, split and seeds under "
                    "one budget, score each in bits per byte with the one evaluator, and write report.md, "
                    "report.json and plots into the output folder. TIER is a shipped tier (" + ", ".join(list_tiers())
                    + ") or a YAML file.")
    p.add_argument("tier", nargs="?", help="arena tier or YAML file (optional with --resume)")
    p.add_argument("--out", type=Path, help="output folder (default: arena/<tier>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the arena in DIR: finished arms are kept")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--budget", action="append", default=[], metavar="KIND=AMOUNT",
                   help="tokens=N, flops=F or seconds=S (repeatable; default: the tier's budgets)")
    p.add_argument("--archs", help="comma-separated architectures (default: every registered one)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds (default: the tier's)")
    p.add_argument("--corpus", help="corpus name, file, folder or glob (default: the tier's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override shared by every arm, e.g. --set train.batch_size=16")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dynlm.train.arena import run_arena

    if args.resume is not None and args.out is not None and args.out != args.resume:
        raise ConfigError("--out and --resume name different folders", "--resume DIR continues DIR")
    if args.resume is not None and args.force:
        raise ConfigError("--force starts over and --resume continues: give one")
    if args.tier is None and args.resume is None:
        raise ConfigError("give a tier (e.g. quick) or --resume DIR")
    out = args.resume or args.out or Path("arena") / Path(args.tier).stem
    overrides = list(args.set) + ([f"data.corpus={args.corpus}"] if args.corpus else [])
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    command = "dynlm arena " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if len(sys.argv) > 2 else \
        f"dynlm arena {args.tier}"
    report = run_arena(args.tier, out, budgets=args.budget or None, seeds=args.seeds, archs=archs,
                       run_overrides=overrides, resume=args.resume is not None, force=args.force, command=command)
    print(_summary_table(report))
    print(f"\nreport: {Path(out) / 'report.md'} (plots: {', '.join(report['plots']) or 'none'}; "
          f"data: report.json)")
    return 0


def _summary_table(report: dict) -> str:
    budgets = list(report["summary"])
    lines = ["| architecture | " + " | ".join(f"val bpb, {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    groups = list(dict.fromkeys(g for b in budgets for g in report["summary"][b]))
    for group in groups:
        cells = []
        for b in budgets:
            entry = report["summary"][b].get(group, {}).get("val_bpb")
            if entry is None:
                cells.append("")
            else:
                spread = f" ± {entry['std']:.4f}" if entry["n"] > 1 else ""
                cells.append(f"{entry['mean']:.4f}{spread} (n={entry['n']})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    skipped = [f"{a}: {info['skip']}" for a, info in report["architectures"].items() if info["skip"]]
    if skipped:
        lines.append("skipped: " + "; ".join(skipped))
    return "\n".join(lines)
