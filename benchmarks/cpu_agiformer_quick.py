"""`dynlm train quick` for the standard model (BPE-2048) and AGIFORMER (bytes) at equal steps on
the default corpus, then each best checkpoint's bits per byte and per character on the full
validation split (the one evaluator), and training throughput in tokens/s and bytes/s.

    python benchmarks/cpu_agiformer_quick.py [--out benchmarks/results] [--runs runs/agi-quick] [-- overrides...]

Writes agiformer_quick_cpu.json and agiformer_quick_cpu.md into --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynlm
from dynlm.eval.evaluate import evaluate
from dynlm.train.run import train

ARCHITECTURES = ("standard", "agiformer")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/agi-quick"))
    parser.add_argument("--eval-bytes", type=int, default=65536, help="validation bytes scored (evenly spaced)")
    parser.add_argument("overrides", nargs="*", help="extra run overrides, e.g. train.max_steps=300")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                                        f"{torch.get_num_threads()} threads, shared machine)",
                              "torch": torch.__version__, "command": "dynlm train quick model.type=<arch>",
                              "overrides": args.overrides, "models": {}}
    for arch in ARCHITECTURES:
        t0 = time.perf_counter()
        run_dir = train("quick", [f"model.type={arch}", f"out_dir={args.runs}", f"run_name={arch}",
                                  "train.final_eval=[]", *args.overrides])
        summary = json.loads((run_dir / "eval.json").read_text())
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        records = [r for r in records if r.get("event") == "train"]
        model = dynlm.load_pretrained(run_dir / "best")
        tokenizer = dynlm.load_tokenizer(run_dir / "best")
        seq_len = int(model.config.max_position_embeddings) if arch != "agiformer" else 256
        seq_len = min(seq_len, 256)  # the training length of the quick preset, for both
        result = evaluate(model, tokenizer, "shakespeare", split="val", seq_len=seq_len, max_bytes=args.eval_bytes)
        tokens_per_s = float(np.median([r["tokens_per_s"] for r in records[1:] or records]))
        report["models"][arch] = {
            "run_dir": str(run_dir), "steps": records[-1]["step"], "parameters": model.num_parameters(),
            "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "train_tokens_per_s": tokens_per_s, "bytes_per_token": result["bytes_per_token"],
            "train_bytes_per_s": tokens_per_s * result["bytes_per_token"],
            "train_bytes_seen": records[-1]["tokens"] * result["bytes_per_token"],
            "val_bpb": result["bpb"], "val_bpc": result.get("bpc"), "val_loss_nats": result["loss_nats"],
        }
        print(f"{arch}: {json.dumps(report['models'][arch])}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agiformer_quick_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# `dynlm train quick`: standard (BPE-2048) vs AGIFORMER (bytes), CPU", "",
             f"{report['device']}, torch {report['torch']}. Same preset schedule, corpus, batch (8 x 256) and "
             f"steps (`dynlm train quick model.type=...`{' ' + ' '.join(args.overrides) if args.overrides else ''}); "
             "a step holds 2048 tokens: 2048 bytes for AGIFORMER, about 2.5 times more text for BPE. Scored on "
             f"{args.eval_bytes:,} bytes of the Shakespeare validation split (evenly spaced pieces), context 256 "
             "tokens. Produced by `benchmarks/cpu_agiformer_quick.py`; "
             "throughput on a shared 2-core machine is indicative only.", "",
             "| model | params | steps | train bytes seen | train tokens/s | train bytes/s | val bits/byte | "
             "val bits/char |", "|---|---|---|---|---|---|---|---|"]
    for arch, e in report["models"].items():
        bpc = "" if e["val_bpc"] is None else f"{e['val_bpc']:.4f}"
        lines.append(f"| {arch} | {e['parameters'] / 1e6:.2f}M | {e['steps']} | {e['train_bytes_seen'] / 1e6:.2f}M | "
                     f"{e['train_tokens_per_s']:,.0f} | {e['train_bytes_per_s']:,.0f} | {e['val_bpb']:.4f} | {bpc} |")
    (args.out / "agiformer_quick_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
