"""AGIFORMER's refinement steps with and without ACT halting, at equal training steps, on CPU.

    nice -n 10 python benchmarks/cpu_agiformer_halting.py [--out benchmarks/results] [--steps 300] [--seeds 0,1,2]

Both variants: `dynlm train quick model.type=agiformer` on the agiformer-tiny model with 3
refinement steps, the same batches (same seed), the same number of steps; "on" adds
`model.halting=true` (per-position halting, ponder cost 0.01 in aux_loss). Each run's best
checkpoint is scored on the same validation bytes by the one evaluator. Writes
agiformer_halting_cpu.json and agiformer_halting_cpu.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynlm
from dynlm.eval.evaluate import evaluate
from dynlm.train.run import train


def run_one(halting: bool, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    name = f"halting-{'on' if halting else 'off'}-seed{seed}"
    overrides = ["model.type=agiformer", "model.preset=agiformer-tiny", "model.reasoning_steps=3",
                 f"model.halting={str(halting).lower()}", f"data.seq_len={args.seq_len}",
                 f"train.max_steps={args.steps}", "train.warmup_steps=10", "train.eval_every=0",
                 "train.progress=false", "train.plot=false", "train.sample_prompt=null", "train.final_eval=[]",
                 f"train.seed={seed}", f"out_dir={args.runs}", f"run_name={name}"]
    t0 = time.perf_counter()
    run_dir = train("quick", overrides)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if r.get("event") == "train"]
    model = dynlm.load_pretrained(run_dir / "best")
    tokenizer = dynlm.load_tokenizer(run_dir / "best")
    with torch.no_grad():
        result = evaluate(model, tokenizer, "shakespeare", split="val", seq_len=args.seq_len,
                          max_bytes=args.eval_bytes)
    ponder = [r["model/ponder_steps"] for r in records if "model/ponder_steps" in r]
    return {"run_dir": str(run_dir), "steps": records[-1]["step"], "seed": seed,
            "parameters": model.num_parameters(), "wall_seconds": time.perf_counter() - t0,
            "train_tokens_per_s": float(np.median([r["tokens_per_s"] for r in records[1:] or records])),
            "val_bpb": result["bpb"], "mean_refinement_steps_last_log": ponder[-1] if ponder else 3.0}


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# AGIFORMER refinement: ACT halting on vs off, CPU, equal steps", "",
             f"{report['device']}, torch {report['torch']}. {report['setup']} Produced by "
             f"`benchmarks/cpu_agiformer_halting.py` at commit {report['commit']}; tokens/s on a shared 2-core "
             "machine are indicative only.", "",
             "| halting | seed | params | steps | train tokens/s | refinement steps per patch (last log) | "
             "val bits/byte |", "|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        lines.append(f"| {r['halting']} | {r['seed']} | {r['parameters']:,} | {r['steps']} | "
                     f"{r['train_tokens_per_s']:,.0f} | {r['mean_refinement_steps_last_log']:.2f} | "
                     f"{r['val_bpb']:.4f} |")
    lines += ["", "| halting | mean val bits/byte over seeds | spread (max - min) | median tokens/s |",
              "|---|---|---|---|"]
    for variant, s in report["summary"].items():
        lines.append(f"| {variant} | {s['mean_bpb']:.4f} | {s['spread_bpb']:.4f} | {s['median_tokens_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/agi-halting"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--eval-bytes", type=int, default=16384, help="validation bytes scored (evenly spaced)")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    report: dict[str, Any] = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                  "shared machine)", "torch": torch.__version__,
        "setup": f"agiformer-tiny with 3 refinement steps, `dynlm train quick` schedule, batch 8 x {args.seq_len} "
                 f"bytes, {args.steps} steps, seeds {args.seeds}; scored on {args.eval_bytes:,} bytes of the "
                 "Shakespeare validation split.",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 check=False).stdout.strip() or "unknown",
        "runs": []}
    for seed in seeds:
        for halting in (False, True):
            row = {"halting": "on" if halting else "off", **run_one(halting, seed, args)}
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
    report["summary"] = {}
    for variant in ("off", "on"):
        rows = [r for r in report["runs"] if r["halting"] == variant]
        bpb = [r["val_bpb"] for r in rows]
        report["summary"][variant] = {"mean_bpb": statistics.fmean(bpb), "spread_bpb": max(bpb) - min(bpb),
                                      "median_tokens_per_s": statistics.median(r["train_tokens_per_s"] for r in rows)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agiformer_halting_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "agiformer_halting_cpu.md").write_text(to_markdown(report))
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
