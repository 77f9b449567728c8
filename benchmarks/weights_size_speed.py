"""Weights as code: size and speed against safetensors, on a ~100M-parameter model trained for a
few steps with dynlm's trainer (a real run on Shakespeare, so the weights have moved off their
random initialisation; the run's first and last losses are recorded).

    python benchmarks/weights_size_speed.py [--out benchmarks/results] [--run-dir runs/weights-bench]
                                            [--steps 20] [--repeats 3] [--checkpoint DIR]

Measured, per dtype (float32 as trained, then bfloat16 and float16 conversions of it):
  size   inline / hybrid folders vs the model.safetensors of the same dtype, and the order-0
         entropy bound of the byte planes (no byte-plane coder can go below it; base85 adds 25%)
  export the model in memory -> code form, vs -> safetensors checkpoint (both with the tokenizer)
  load   tensors only (decoded + verified, vs safetensors read with every byte touched), and
         end to end (`dynlm.load_pretrained`, model construction included), for both
  partial loading: one layer's cells vs all

CPU-bound I/O, compression and hashing: run on CPU. The variants are timed round-robin, --repeats
rounds, so that changes in the machine's load hit all of them alike; the best run and the median
are reported, with the load average before and after (a shared machine slows everything).
Writes weights_size_speed.json and weights_size_speed.md into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import dynlm
from dynlm.checkpoint import read_safetensors
from dynlm.train.bench import source_commit
from dynlm.weights import CodeCheckpoint, export_code_checkpoint, load_code_checkpoint
from dynlm.weights.codeckpt import read_checkpoint_dir


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(ValueError, OSError):
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__, "platform": platform.platform()}


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def round_robin(jobs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
                repeats: int) -> dict[str, dict[str, Any]]:
    """Time each job `repeats` times, one run of every job per round, so that a change in the
    machine's load hits all of them alike. A job is (timed function, untimed setup or None).
    Records wall time and this process's CPU time (user + system, all threads): on a machine
    shared with other jobs the CPU time is the steadier measure of the work done."""
    wall: dict[str, list[float]] = {name: [] for name in jobs}
    cpu: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, (fn, setup) in jobs.items():
            if setup is not None:
                setup()
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: {"min_s": round(min(wall[name]), 3), "median_s": round(statistics.median(wall[name]), 3),
                   "cpu_min_s": round(min(cpu[name]), 3), "runs_s": [round(x, 3) for x in wall[name]]}
            for name in jobs}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def plane_entropy_bound(directory: Path) -> float:
    """Sum over tensors and byte planes of the order-0 entropy (bytes), as a fraction of the raw
    bytes: what any coder of independent byte planes needs at least."""
    tensors, _ = read_checkpoint_dir(directory)
    total_bits = raw = 0.0
    for arr, _ in tensors.values():
        planes = arr.reshape(-1).view(np.uint8).reshape(-1, arr.dtype.itemsize)
        for i in range(planes.shape[1]):
            counts = np.bincount(planes[:, i], minlength=256).astype(np.float64)
            p = counts[counts > 0] / planes.shape[0]
            total_bits += float(-(p * np.log2(p)).sum()) * planes.shape[0]
        raw += arr.nbytes
    return total_bits / 8 / raw


def touch_all(tensors: dict[str, torch.Tensor]) -> int:
    """Copy every tensor into memory of its own (safetensors maps the file lazily; the code form
    decodes into new arrays, so this is the like-for-like cost)."""
    return sum(t.clone().numel() for t in tensors.values())


def train_model(run_dir: Path, steps: int) -> tuple[Path, dict[str, Any]]:
    from dynlm.train.run import train
    from dynlm.train.trainer import read_metrics

    overrides = ["model.preset=gpt2-small-like", "data.corpus=shakespeare", "data.tokenizer=bpe:16384",
                 "data.seq_len=128", "train.batch_size=4", f"train.max_steps={steps}", "train.warmup_steps=2",
                 "train.lr=1e-3", "train.min_lr=1e-4", "train.eval_every=0", "train.eval_bytes=8192",
                 "train.final_eval=[]", "train.sample_tokens=0", "train.plot=false", f"train.save_every={steps}",
                 "train.log_every=1", "train.device=cpu", "train.progress=false", f"out_dir={run_dir.parent}",
                 f"run_name={run_dir.name}"]
    start = time.perf_counter()
    run = train("scratch", overrides)
    seconds = time.perf_counter() - start
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    checkpoint = run / "last"
    return checkpoint, {"run_dir": str(run), "command": "dynlm train scratch " + " ".join(overrides),
                        "steps": steps, "first_loss": losses[0] if losses else None,
                        "last_loss": losses[-1] if losses else None, "seconds": round(seconds, 1)}


def training_record(checkpoint: Path) -> dict[str, Any]:
    from dynlm.train.trainer import read_metrics

    run = checkpoint.resolve().parent
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    info = json.loads((checkpoint / "training.json").read_text())
    return {"run_dir": str(run), "checkpoint": str(checkpoint), "steps": info["step"],
            "first_loss": losses[0], "last_loss": losses[-1]}


def convert(source: Path, out: Path, dtype: torch.dtype) -> Path:
    model = dynlm.load_pretrained(source).to(dtype)
    tokenizer = dynlm.load_tokenizer(source)
    model.save_pretrained(out, tokenizer=tokenizer)
    return out


def bench_dtype(name: str, checkpoint: Path, work: Path, repeats: int, dtype: torch.dtype) -> dict[str, Any]:
    st_bytes = (checkpoint / "model.safetensors").stat().st_size
    row: dict[str, Any] = {"dtype": name, "safetensors_bytes": st_bytes,
                           "entropy_bound_fraction": round(plane_entropy_bound(checkpoint), 4)}
    row["entropy_bound_ratio_with_base85"] = round(row["entropy_bound_fraction"] * 1.25, 4)
    model = dynlm.load_pretrained(checkpoint, dtype=dtype)  # the weights in the row's dtype
    tokenizer = dynlm.load_tokenizer(checkpoint)
    out = {mode: work / f"{mode}-{name}" for mode in ("inline", "hybrid")}

    def clear(path: Path) -> Callable[[], None]:
        return lambda: shutil.rmtree(path, ignore_errors=True)

    # exports from the model in memory (what a trainer does when it saves): a safetensors
    # checkpoint against the code form, both with the tokenizer
    exports = {"export_safetensors": (lambda: model.save_pretrained(work / f"st-{name}", tokenizer=tokenizer),
                                      clear(work / f"st-{name}"))}
    for mode, path in out.items():
        exports[f"export_{mode}"] = (lambda path=path, mode=mode: export_code_checkpoint(
            model, path, mode=mode, tokenizer=tokenizer), clear(path))
    row.update(round_robin(exports, repeats))
    for mode, path in out.items():
        row[f"{mode}_bytes"] = folder_bytes(path)
        row[f"{mode}_ratio"] = round(row[f"{mode}_bytes"] / st_bytes, 4)
        row[f"{mode}_weights_py_bytes"] = (path / "weights.py").stat().st_size
    names = CodeCheckpoint(out["inline"]).select(["layer_0"])
    loads = {"load_tensors_safetensors": (lambda: touch_all(read_safetensors(checkpoint)), None),
             "load_tensors_inline": (lambda: CodeCheckpoint(out["inline"]).arrays(), None),
             "load_tensors_hybrid": (lambda: CodeCheckpoint(out["hybrid"]).arrays(), None),
             "load_model_safetensors": (lambda: dynlm.load_pretrained(checkpoint), None),
             "load_model_inline": (lambda: load_code_checkpoint(out["inline"]), None),
             "load_model_hybrid": (lambda: load_code_checkpoint(out["hybrid"]), None),
             "partial_load_layer0": (lambda: CodeCheckpoint(out["inline"]).arrays(names), None)}
    row.update(round_robin(loads, repeats))
    row["partial_load_layer0"].update(cells=len(names), of_cells=len(CodeCheckpoint(out["inline"]).cells))
    for stat in ("min_s", "median_s", "cpu_min_s"):
        for mode in ("inline", "hybrid"):
            key = stat.removesuffix("_s")
            for what in ("tensors", "model"):
                row[f"load_{what}_{mode}_vs_safetensors_{key}"] = round(
                    row[f"load_{what}_{mode}"][stat] / row[f"load_{what}_safetensors"][stat], 2)
            row[f"export_{mode}_vs_safetensors_{key}"] = round(
                row[f"export_{mode}"][stat] / row["export_safetensors"][stat], 2)
    return row


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = ["# Weights as code: size and speed vs safetensors", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; Python {m['python']}, NumPy "
             f"{m['numpy']}, torch {m['torch']}. Load average before / after: {report['load_average_before']} / "
             f"{report['load_average_after']} (the machine was shared with other jobs, so each timing is given as "
             f"the best of {report['repeats']} runs, taken round-robin across the variants, and their median).", ""]
    t = report["training"]
    lines += [f"Model: gpt2-small-like with a 16,384-token BPE vocabulary, {report['parameters']:,} parameters, "
              f"trained {t['steps']} steps on Shakespeare with dynlm's trainer (loss {t['first_loss']:.3f} -> "
              f"{t['last_loss']:.3f}). bfloat16 and float16 rows are conversions of those float32 weights.", "",
              "## Size", "",
              "| dtype | safetensors MB | inline MB | inline / safetensors | hybrid / safetensors | "
              "byte-plane entropy bound | bound x 1.25 (base85) |",
              "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['dtype']} | {r['safetensors_bytes'] / 1e6:.1f} | {r['inline_bytes'] / 1e6:.1f} | "
                     f"{r['inline_ratio']:.3f} | {r['hybrid_ratio']:.3f} | {r['entropy_bound_fraction']:.3f} | "
                     f"{r['entropy_bound_ratio_with_base85']:.3f} |")
    lines += ["", "## Time (seconds: best of the runs / median)", "",
              "| dtype | export safetensors | export inline | export hybrid | load tensors safetensors | "
              "load tensors inline | load tensors hybrid | load model safetensors | load model inline | "
              "load model hybrid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [r["export_safetensors"], r["export_inline"], r["export_hybrid"], r["load_tensors_safetensors"],
                 r["load_tensors_inline"], r["load_tensors_hybrid"], r["load_model_safetensors"],
                 r["load_model_inline"], r["load_model_hybrid"]]
        lines.append(f"| {r['dtype']} | " + " | ".join(f"{c['min_s']:.2f} / {c['median_s']:.2f}" for c in cells) + " |")
    lines += ["", "## CPU time (seconds of this process, best run)", "",
              "| dtype | export safetensors | export inline | export hybrid | load tensors safetensors | "
              "load tensors inline | load tensors hybrid | load model safetensors | load model inline | "
              "load model hybrid |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [r["export_safetensors"], r["export_inline"], r["export_hybrid"], r["load_tensors_safetensors"],
                 r["load_tensors_inline"], r["load_tensors_hybrid"], r["load_model_safetensors"],
                 r["load_model_inline"], r["load_model_hybrid"]]
        lines.append(f"| {r['dtype']} | " + " | ".join(f"{c['cpu_min_s']:.2f}" for c in cells) + " |")
    lines += ["", "## Ratios to safetensors: wall time of the best runs (medians in brackets) / CPU time", "",
              "| dtype | export inline | export hybrid | load tensors inline | load tensors hybrid | "
              "load model inline | load model hybrid | one layer / all (inline) |", "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        partial = r["partial_load_layer0"]["min_s"] / r["load_tensors_inline"]["min_s"]

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            return f"{r[key + '_min']} ({r[key + '_median']}) / {r[key + '_cpu_min']}"

        lines.append(f"| {r['dtype']} | {ratio('export_inline_vs_safetensors')} | "
                     f"{ratio('export_hybrid_vs_safetensors')} | {ratio('load_tensors_inline_vs_safetensors')} | "
                     f"{ratio('load_tensors_hybrid_vs_safetensors')} | {ratio('load_model_inline_vs_safetensors')} | "
                     f"{ratio('load_model_hybrid_vs_safetensors')} | {partial:.3f} "
                     f"({r['partial_load_layer0']['cells']} of {r['partial_load_layer0']['of_cells']} cells) |")
    lines += ["", "Definitions: *load tensors* = every tensor decoded and checked against its sha256 (code form) "
              "or read with every byte touched (safetensors, which maps the file lazily); *load model* = "
              "`dynlm.load_pretrained`, model construction included; *byte-plane entropy bound* = sum of the "
              "order-0 entropies of each tensor's byte planes over the raw bytes.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/weights-bench"))
    parser.add_argument("--work", type=Path, default=Path("runs/weights-bench-work"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--checkpoint", type=Path, help="use this trained checkpoint instead of training")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"machine": machine(), "commit": source_commit(), "load_average_before": load_average(),
                              "repeats": args.repeats}
    if args.checkpoint is not None:  # a run made earlier by this script: its record is in the run folder
        checkpoint, report["training"] = args.checkpoint, training_record(args.checkpoint)
    else:
        checkpoint, report["training"] = train_model(args.run_dir, args.steps)
    print(f"trained checkpoint: {checkpoint} ({report['training']})", file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    report["parameters"] = dynlm.load_pretrained(checkpoint).num_parameters()
    sources = {"float32": (checkpoint, torch.float32),
               "bfloat16": (convert(checkpoint, args.work / "bf16", torch.bfloat16), torch.bfloat16),
               "float16": (convert(checkpoint, args.work / "fp16", torch.float16), torch.float16)}
    report["rows"] = []
    for name, (source, dtype) in sources.items():
        print(f"benchmarking {name} ...", file=sys.stderr)
        report["rows"].append(bench_dtype(name, source, args.work, args.repeats, dtype))
    report["load_average_after"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weights_size_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "weights_size_speed.md").write_text(markdown(report))
    print(markdown(report))
    return 0 if all(math.isfinite(r["inline_ratio"]) for r in report["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
