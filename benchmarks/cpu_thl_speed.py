"""THL vs the standard transformer at the quick preset's sizes (thl-quick vs standard-quick, about
1.25M parameters each) on CPU, in one process: training tokens/s through the one TrainStep, the
two models' steps interleaved so that a shared machine slows both alike (the ratio is the figure),
and the inference state bytes after 256 .. 2048 tokens of context.

    python benchmarks/cpu_thl_speed.py [--out benchmarks/results] [--rounds 3]

Writes thl_speed_cpu.json and thl_speed_cpu.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dynlm
from dynlm.train.trainer import TrainStep

PRESETS = ("standard-quick", "thl-quick")
CONTEXTS = (256, 1024, 2048)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.manual_seed(0)
    models = {p: dynlm.build_model(p).train() for p in PRESETS}
    steps = {p: TrainStep(m, m, torch.optim.AdamW(m.parameters(), lr=1e-3), torch.device("cpu"), torch.float32, 1.0)
             for p, m in models.items()}
    x = torch.randint(0, 2048, (args.batch, args.seq_len))
    for p in PRESETS:
        steps[p]([x])  # warm-up
    seconds = {p: 0.0 for p in PRESETS}
    for _ in range(args.rounds):
        for p in PRESETS:
            t = time.perf_counter()
            steps[p]([x])
            seconds[p] += time.perf_counter() - t
    tokens = args.rounds * args.batch * args.seq_len
    report: dict[str, Any] = {"device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, shared)",
                              "torch": torch.__version__, "commit": commit, "batch": args.batch,
                              "seq_len": args.seq_len, "rounds": args.rounds, "models": {}}
    for p, model in models.items():
        model.eval()
        sizes = {}
        with torch.no_grad():
            state, fed = model.init_state(1, max_length=max(CONTEXTS)), 0
            for n in CONTEXTS:
                state = model(torch.randint(0, 2048, (1, n - fed)), state=state).state
                fed = n
                sizes[n] = model.state_nbytes(state)
        report["models"][p] = {"parameters": model.num_parameters(), "train_tokens_per_s": tokens / seconds[p],
                               "state_bytes": sizes}
    speed = {p: e["train_tokens_per_s"] for p, e in report["models"].items()}
    ratio = speed["thl-quick"] / speed["standard-quick"]
    report["thl_over_standard_train_tokens_per_s"] = ratio
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "thl_speed_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# THL vs standard on CPU: training speed and state bytes", "",
             f"{report['device']}, torch {report['torch']}, commit {commit}. Batch {args.batch} x {args.seq_len} "
             f"tokens, {args.rounds} interleaved steps each (after one warm-up). The machine was shared with other "
             "jobs: the absolute tokens/s are not a measurement, the ratio is. Produced by "
             "`benchmarks/cpu_thl_speed.py`.", "",
             "| model | params | train tokens/s | " + " | ".join(f"state bytes @ {n}" for n in CONTEXTS) + " |",
             "|---|---|---|" + "---|" * len(CONTEXTS)]
    for p, e in report["models"].items():
        lines.append(f"| {p} | {e['parameters'] / 1e6:.2f}M | {e['train_tokens_per_s']:,.0f} | " +
                     " | ".join(f"{e['state_bytes'][n]:,}" for n in CONTEXTS) + " |")
    lines += ["", f"THL / standard training tokens/s: {ratio:.3f}"]
    (args.out / "thl_speed_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
