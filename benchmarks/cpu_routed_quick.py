"""`dynlm train quick` for standard, MoD and DTF on the default corpus, same steps, then the
validation bits per byte of each best checkpoint with top-k routing and with the causal router
(what generation runs), plus the causal router's agreement with top-k.

    python benchmarks/cpu_routed_quick.py [--out benchmarks/results] [--runs runs/routed-quick] [-- overrides...]

Writes routed_quick_cpu.json and routed_quick_cpu.md into --out.
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
from dynlm.train.bench import source_commit
from dynlm.train.run import train

ARCHITECTURES = ("standard", "mod", "dtf")


def routing_report(model, tokens: np.ndarray, seq_len: int, windows: int = 32) -> dict[str, float]:
    """Mean routing metrics of eval-mode (causal router) forwards over validation windows."""
    x = torch.as_tensor(np.asarray(tokens[: windows * seq_len], dtype=np.int64)).view(windows, seq_len)
    model.eval()
    with torch.no_grad():
        metrics = [model(x[i : i + 8]).metrics for i in range(0, windows, 8)]
    keys = ("route/causal_acc", "route/causal_frac", "route/router_bce")
    return {key: float(np.mean([m[key] for m in metrics])) for key in keys}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--runs", type=Path, default=Path("runs/routed-quick"))
    parser.add_argument("overrides", nargs="*", help="extra run overrides, e.g. train.max_steps=100")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report: dict[str, Any] = {"device": f"CPU ({platform.processor() or platform.machine()}, "
                                        f"{torch.get_num_threads()} threads)",
                              "torch": torch.__version__, "commit": source_commit(),
                              "command": "dynlm train quick model.type=<arch>",
                              "overrides": args.overrides, "models": {}}
    for arch in ARCHITECTURES:
        t0 = time.perf_counter()
        run_dir = train("quick", [f"model.type={arch}", f"out_dir={args.runs}", f"run_name={arch}",
                                  *args.overrides])
        summary = json.loads((run_dir / "eval.json").read_text())
        train_records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_records = [r for r in train_records if r.get("event") == "train"]
        model = dynlm.load_pretrained(run_dir / "best")
        tokenizer = dynlm.load_tokenizer(run_dir / "best")
        seq_len = summary["evaluation"]["val"]["seq_len"]
        entry: dict[str, Any] = {
            "run_dir": str(run_dir), "steps": train_records[-1]["step"], "best_step": summary["best_step"],
            "parameters": model.num_parameters(), "flops_per_token": model.flops_per_token(seq_len),
            "train_seconds": summary["train_seconds"], "wall_seconds": time.perf_counter() - t0,
            "train_tokens_per_s": float(np.median([r["tokens_per_s"] for r in train_records[1:] or train_records])),
            "final_train_loss": train_records[-1]["loss"],
            "val_bpb_trainer": summary["evaluation"]["val"]["bpb"],
            "last_train_metrics": {k[len("model/"):]: v for k, v in train_records[-1].items()
                                   if k.startswith("model/")},
        }
        modes = ("causal", "topk") if hasattr(model, "set_routing") else ("dense",)
        for mode in modes:
            if mode != "dense":
                model.set_routing(mode)
            result = evaluate(model, tokenizer, "shakespeare", split="val", seq_len=seq_len)
            entry[f"val_bpb_{mode}"] = result["bpb"]
        if hasattr(model, "set_routing"):
            model.set_routing("auto")
            from dynlm.data.shards import prepare_corpus

            val_tokens = prepare_corpus("shakespeare", tokenizer, show_progress=False)["val"].tokens
            entry["eval_routing"] = routing_report(model, val_tokens, seq_len)
        report["models"][arch] = entry
        print(f"{arch}: {json.dumps({k: v for k, v in entry.items() if k.startswith('val_')})}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routed_quick_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
    dense_flops = report["models"]["standard"]["flops_per_token"]
    lines = ["# `dynlm train quick`: standard vs MoD vs DTF (CPU)", "",
             f"{report['device']}, torch {report['torch']}. Same preset, data, steps and seed for all three "
             f"(`dynlm train quick model.type=...`{' ' + ' '.join(args.overrides) if args.overrides else ''}). "
             "Produced by `benchmarks/cpu_routed_quick.py`.", "",
             "| model | params | FLOPs/token (rel.) | steps | train tokens/s | val bpb causal router | "
             "val bpb top-k | causal agreement | causal routes |", "|---|---|---|---|---|---|---|---|---|"]
    for arch, e in report["models"].items():
        routing = e.get("eval_routing", {})
        causal = e.get("val_bpb_causal", e.get("val_bpb_dense"))
        topk = e.get("val_bpb_topk", e.get("val_bpb_dense"))
        agree = routing.get("route/causal_acc")
        frac = routing.get("route/causal_frac")
        lines.append(f"| {arch} | {e['parameters'] / 1e6:.2f}M | {e['flops_per_token'] / dense_flops:.3f} | "
                     f"{e['steps']} | {e['train_tokens_per_s']:,.0f} | {causal:.4f} | {topk:.4f} | "
                     f"{'' if agree is None else f'{agree:.3f}'} | {'' if frac is None else f'{frac:.3f}'} |")
    lines += ["", "Causal agreement: share of tokens where the causal router's decision equals top-k's on the "
              "same hidden states (eval forwards on validation windows); causal routes: share of tokens it "
              "sends through a routed layer (top-k sends 12.5%)."]
    (args.out / "routed_quick_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
