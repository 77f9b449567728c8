"""THL vs the standard transformer on CPU at about equal parameters (thl-quick vs standard-quick):
`dynlm train quick` with each preset for the same steps and data, then the trainer's validation
bits per byte and training tokens/s; plus the inference state bytes of each after 256 .. 4096
tokens of context.

    python benchmarks/cpu_thl_quick.py [--out benchmarks/results] [--runs runs/thl-quick] [-- overrides...]

Writes thl_quick_cpu.json and thl_quick_cpu.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynlm
from dynlm.train.run import train

PRESETS = {"standard": "standard-quick", "thl": "thl-quick"}
CONTEXTS = (256, 1024, 4096)


def state_bytes(model, contexts: tuple[int, ...]) -> dict[int, int]:
    """Bytes of the state after each context length (fed in chunks of 256 random tokens)."""
    model.eval()
    out: dict[int, int] = {}
    with torch.no_grad():
        state = model.init_state(1, max_length=max(contexts))
        fed = 0
        for n in contexts:
            while fed < n:
                step = min(256, n - fed)
                state = model(torch.randint(0, model.config.vocab_size, (1, step)), state=state).state
                fed += step
            out[n] = model.state_nbytes(state)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/thl-quick"))
    parser.add_argument("overrides", nargs="*", help="extra run overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report: dict[str, Any] = {"device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, shared)",
                              "torch": torch.__version__, "commit": commit, "overrides": args.overrides,
                              "models": {}}
    for arch, preset in PRESETS.items():
        run_dir = train("quick", [f"model.preset={preset}", f"model.type={arch}", f"out_dir={args.runs}",
                                  f"run_name={arch}", *args.overrides])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_records = [r for r in records if r.get("event") == "train"]
        evals = [r for r in records if r.get("event") == "eval"]
        model = dynlm.load_pretrained(run_dir / "last")
        report["models"][arch] = {
            "preset": preset, "parameters": model.num_parameters(), "steps": train_records[-1]["step"],
            "train_tokens_per_s": float(np.median([r["tokens_per_s"] for r in train_records[1:] or train_records])),
            "final_train_loss": train_records[-1]["loss"], "val_bpb": evals[-1]["val_bpb"],
            "state_bytes": state_bytes(model, CONTEXTS),
        }
        print(arch, json.dumps(report["models"][arch]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "thl_quick_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    s, t = report["models"]["standard"], report["models"]["thl"]
    lines = ["# THL vs standard, quick preset sizes (CPU)", "",
             f"{report['device']}, torch {report['torch']}, commit {commit}. Same data, steps, batch and seed "
             f"(`dynlm train quick model.preset=<preset>` {' '.join(args.overrides)}). The CPU was shared with other "
             "jobs: tokens/s are indicative, their ratio less so. Produced by `benchmarks/cpu_thl_quick.py`.", "",
             "| model | params | steps | train tokens/s | val bpb | " +
             " | ".join(f"state bytes @ {n}" for n in CONTEXTS) + " |",
             "|---|---|---|---|---|" + "---|" * len(CONTEXTS)]
    for arch, e in report["models"].items():
        lines.append(f"| {arch} ({e['preset']}) | {e['parameters'] / 1e6:.2f}M | {e['steps']} | "
                     f"{e['train_tokens_per_s']:,.0f} | {e['val_bpb']:.4f} | " +
                     " | ".join(f"{e['state_bytes'][n]:,}" for n in CONTEXTS) + " |")
    lines += ["", f"THL / standard training tokens/s: {t['train_tokens_per_s'] / s['train_tokens_per_s']:.3f}."]
    (args.out / "thl_quick_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
