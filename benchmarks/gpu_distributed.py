"""Two GPUs with torchrun: DDP and FSDP2 against one GPU, at the same global batch.

    python benchmarks/gpu_distributed.py --out $OUT                        # a machine with 2 CUDA GPUs
    python benchmarks/gpu_distributed.py --smoke --out /tmp/dist_smoke     # CPU, gloo, 2 processes, tiny

Every run is the `dynlm train` pipeline (`dynlm.train.train`: the sampler, the trainer's step, its
logging, the end-of-run validation and checkpoint), launched by this script with `torchrun` as a
subprocess, NCCL on CUDA with NVLink multicast off (NCCL_NVLS_ENABLE=0), gloo on CPU. Runs:

  gpt2-small-like   1 GPU | DDP on 2 GPUs | FSDP2 on 2 GPUs
  0.5B (Qwen2.5-0.5B shape)   1 GPU | FSDP2 on 2 GPUs

All runs of a model share the global batch, seed, initial weights and data order (the sampler
derives every global batch from the seed and the step; each rank takes its share), so their loss
curves should agree within numerical noise. Reported per run: tokens/s over the steps after the
warm-up, peak memory per GPU, the per-step loss; per model: scaling efficiency = 2-GPU tokens/s /
(2 x 1-GPU tokens/s) and max |loss difference| to the 1-GPU run, next to the batch-to-batch noise
of the 1-GPU curve. Data: the running interpreter's standard library as bytes (the
`python-stdlib` corpus: on every machine), with the model's own vocabulary size, so the LM head
has its real shape. Random initial weights, bf16 autocast, torch.compile off unless --compile
(compiling costs about a minute per process). Writes gpu_distributed.json, .md and
gpu_distributed_loss.png to --out; a failed run is recorded and the others go on."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# (model key, strategy, processes); strategy "single" is one process
RUNS = [("gpt2-small-like", "single", 1), ("gpt2-small-like", "ddp", 2), ("gpt2-small-like", "fsdp", 2),
        ("0.5b", "single", 1), ("0.5b", "fsdp", 2)]
OPTIONAL_RUNS = [("0.5b", "ddp", 2)]  # with --runs

MODELS = {  # model section of the run config; vocab_size is the preset's (bytes are a subset)
    "gpt2-small-like": {"preset": "gpt2-small-like", "vocab_size": 50304},
    "0.5b": {"preset": "qwen2.5-0.5b", "vocab_size": 151936},
}
SMOKE_MODELS = {  # the same families, tiny
    "gpt2-small-like": {"preset": "standard-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                        "num_kv_heads": 2, "intermediate_size": 64, "vocab_size": 320},
    "0.5b": {"preset": "qwen2.5-0.5b", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
             "intermediate_size": 64, "vocab_size": 320},
}
COLORS = {"single": "tab:blue", "ddp": "tab:orange", "fsdp": "tab:green"}
LEARNING_RATES = {"gpt2-small-like": 6e-4, "0.5b": 3e-4}


def say(message: str) -> None:
    print(f"[gpu_distributed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The worker: one process of one run, started by torchrun


class Recorder:
    """A trainer callback: the loss and tokens/s of every step (log_every=1), and each rank's peak
    memory over the training steps (read before the end-of-run validation and checkpoint)."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []
        self.peak_bytes: list[Any] = []
        self.world_size = 1

    def __call__(self, event: str, trainer: Any, info: dict[str, Any]) -> None:
        import torch

        from dynlm import distributed

        device = trainer.device
        if event == "start" and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        elif event == "log":
            self.steps.append({"step": info["step"], "loss": info["loss"], "tokens_per_s": info["tokens_per_s"],
                               "seconds": trainer.tokens_per_step * trainer.cfg.log_every / info["tokens_per_s"]})
            if info["step"] == trainer.cfg.max_steps:  # every rank logs the last step: a safe collective
                peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
                self.peak_bytes = distributed.all_gather_objects(peak, trainer.ctx)
                self.world_size = trainer.ctx.world_size


def worker(spec_path: Path) -> int:
    from dynlm.train import train

    spec = json.loads(spec_path.read_text())
    recorder = Recorder()
    train(spec["run"], callbacks=[recorder], force=True)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(spec["result"]).write_text(json.dumps({"steps": recorder.steps, "peak_bytes": recorder.peak_bytes,
                                                    "world_size": recorder.world_size}) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# The launcher


def run_config(model: str, strategy: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    models = SMOKE_MODELS if args.smoke else MODELS
    steps = args.steps[model]
    return {
        "model": dict(models[model]),
        "data": {"corpus": args.corpus, "tokenizer": "bytes", "seq_len": args.seq_len,
                 "cache_dir": str(work / "cache")},
        "train": {"max_steps": steps, "batch_size": args.batch[model], "lr": LEARNING_RATES[model],
                  "min_lr": LEARNING_RATES[model] / 10, "warmup_steps": max(1, steps // 6), "log_every": 1,
                  "eval_every": 0, "eval_bytes": 16384 if not args.smoke else 2048, "eval_batch_size": 8,
                  "save_every": steps, "keep_last": 1, "final_eval": [], "sample_prompt": None, "plot": False,
                  "progress": False, "device": "cpu" if args.smoke else "cuda", "compile": args.compile,
                  "fsdp": strategy == "fsdp", "seed": args.seed},
        "out_dir": str(work / "runs"), "run_name": f"{model}-{strategy}",
    }


def launch(model: str, strategy: str, nproc: int, args: argparse.Namespace, work: Path,
           timeout: float) -> dict[str, Any]:
    """One torchrun run; its measurements, or the error that stopped it."""
    name = f"{model}-{strategy}"
    run = run_config(model, strategy, args, work)
    spec = work / f"{name}.spec.json"
    result_path = work / f"{name}.result.json"
    spec.write_text(json.dumps({"run": run, "result": str(result_path)}))
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if args.smoke:
        env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), "--worker", str(spec)]
    entry: dict[str, Any] = {"model": model, "strategy": strategy, "processes": nproc, "config": run}
    say(f"{name}: torchrun --nproc_per_node {nproc} ({run['train']['max_steps']} steps, global batch "
        f"{run['train']['batch_size']} x {run['data']['seq_len']})")
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=work)
        entry["wall_s"] = time.perf_counter() - start
        if proc.returncode != 0 or not result_path.is_file():
            entry["error"] = f"exit status {proc.returncode}"
            entry["stderr_tail"] = proc.stderr[-4000:]
            say(f"{name}: failed ({entry['error']}):\n{proc.stderr[-2000:]}")
            return entry
    except subprocess.TimeoutExpired as e:
        entry["wall_s"] = time.perf_counter() - start
        entry["error"] = f"timed out after {timeout:.0f} s"
        tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        entry["stderr_tail"] = tail[-4000:]
        say(f"{name}: {entry['error']}")
        return entry
    finally:
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # checkpoints are not results
    entry.update(measure(json.loads(result_path.read_text()), args.warmup, run["train"]["batch_size"] *
                         run["data"]["seq_len"]))
    say(f"{name}: {entry['tokens_per_s']:,.0f} tokens/s, peak memory per process "
        f"{[_gib(b) for b in entry['peak_memory_bytes']]} GiB, final loss {entry['losses'][-1]:.4f}, "
        f"{entry['wall_s']:.0f} s wall")
    return entry


def measure(result: dict[str, Any], warmup: int, tokens_per_step: int) -> dict[str, Any]:
    steps = result["steps"]
    timed = [s for s in steps if s["step"] > warmup] or steps
    seconds = sum(s["seconds"] for s in timed)
    return {"losses": [s["loss"] for s in steps], "timed_steps": len(timed),
            "tokens_per_s": tokens_per_step * len(timed) / seconds, "step_ms": 1000 * seconds / len(timed),
            "peak_memory_bytes": result["peak_bytes"]}


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.1f}"


def batch_noise(losses: list[float]) -> float | None:
    """Batch-to-batch noise of a loss curve: the standard deviation of each loss's difference from
    the mean of its 5-step neighbourhood, over the second half (past the steep start)."""
    half = losses[len(losses) // 2:]
    if len(half) < 5:
        return None
    residuals = [half[i] - sum(half[i - 2:i + 3]) / 5 for i in range(2, len(half) - 2)]
    mean = sum(residuals) / len(residuals)
    return math.sqrt(sum((r - mean) ** 2 for r in residuals) / len(residuals))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(r["model"] for r in runs):
        by = {r["strategy"]: r for r in runs if r["model"] == model and "error" not in r}
        single = by.get("single")
        entry: dict[str, Any] = {}
        if single:
            entry["single_tokens_per_s"] = single["tokens_per_s"]
            entry["single_batch_noise"] = batch_noise(single["losses"])
        for strategy in ("ddp", "fsdp"):
            if strategy not in by:
                continue
            multi = by[strategy]
            item: dict[str, Any] = {"tokens_per_s": multi["tokens_per_s"]}
            if single:
                item["scaling_efficiency"] = multi["tokens_per_s"] / (multi["processes"] * single["tokens_per_s"])
                deltas = [abs(a - b) for a, b in zip(multi["losses"], single["losses"])]
                item["max_abs_loss_delta"] = max(deltas)
                item["mean_abs_loss_delta"] = sum(deltas) / len(deltas)
            entry[strategy] = item
        summary[model] = entry
    return summary


def plot(runs: list[dict[str, Any]], path: Path) -> str | None:
    """Loss curves (top) and their difference to the 1-GPU run (bottom), one column per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    models = list(dict.fromkeys(r["model"] for r in runs if "error" not in r))
    if not models:
        return "no run finished"
    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), dpi=110, squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [2, 1]})
    for column, model in enumerate(models):
        by = {r["strategy"]: r for r in runs if r["model"] == model and "error" not in r}
        top, bottom = axes[0][column], axes[1][column]
        for strategy, r in by.items():
            label = "1 GPU" if strategy == "single" else f"{strategy.upper()}, {r['processes']} GPUs"
            steps = range(1, len(r["losses"]) + 1)
            top.plot(steps, r["losses"], label=label, linewidth=1, color=COLORS[strategy])
            if strategy != "single" and "single" in by:
                delta = [a - b for a, b in zip(r["losses"], by["single"]["losses"])]
                bottom.plot(steps[:len(delta)], delta, label=f"{label} - 1 GPU", linewidth=1, color=COLORS[strategy])
        top.set_title(model)
        top.set_ylabel("training loss (nats/token)")
        top.legend()
        top.grid(alpha=0.3)
        bottom.axhline(0, color="grey", linewidth=0.5)
        bottom.set_xlabel("step")
        bottom.set_ylabel("loss difference")
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend()
        bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def to_markdown(report: dict[str, Any]) -> str:
    machine = f"{report['device']} x {report['gpus']}" if report["gpus"] else f"{report['device']}, 2 processes"
    lines = [f"# {report['title']}", "",
             f"{machine}, torch {report['torch']}, NCCL {report['nccl']}, "
             f"backend {report['backend']}, NCCL_NVLS_ENABLE=0, commit {report['commit']}, {report['time']}. "
             f"Each run is `dynlm.train.train` under torchrun; torch.compile {'on' if report['compile'] else 'off'}; "
             f"dtype {report['dtype']}; seq {report['seq_len']}; random initial weights (seed {report['seed']}); "
             f"data: {report['corpus']} as bytes, the same global batches in every run of a model. tokens/s over the "
             f"steps after the first {report['warmup']} (each step's loss is read back, as with log_every=1).", "",
             "| model | run | processes | global batch | steps | tokens/s | step ms | peak memory per process (GiB) "
             "| final loss | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        head = f"| {r['model']} | {r['strategy']} | {r['processes']} | {r['config']['train']['batch_size']} | " \
               f"{r['config']['train']['max_steps']} |"
        if "error" in r:
            lines.append(f"{head} failed: {r['error']} | | | | |")
            continue
        peaks = ", ".join(_gib(b) for b in r["peak_memory_bytes"])
        lines.append(f"{head} {r['tokens_per_s']:,.0f} | {r['step_ms']:.1f} | {peaks} | {r['losses'][-1]:.4f} | "
                     f"{r['wall_s']:.0f} |")
    lines += ["", "## Scaling and agreement with one GPU", "",
              "| model | run | tokens/s | scaling efficiency | max abs loss delta | mean abs loss delta "
              "| 1-GPU batch noise |", "|---|---|---|---|---|---|---|"]
    for model, entry in report["summary"].items():
        noise = entry.get("single_batch_noise")
        for strategy in ("ddp", "fsdp"):
            if strategy not in entry:
                continue
            e = entry[strategy]
            eff = f"{100 * e['scaling_efficiency']:.1f}%" if "scaling_efficiency" in e else "-"
            lines.append(f"| {model} | {strategy} | {e['tokens_per_s']:,.0f} | {eff} | "
                         f"{e.get('max_abs_loss_delta', float('nan')):.2e} | "
                         f"{e.get('mean_abs_loss_delta', float('nan')):.2e} | "
                         f"{'-' if noise is None else f'{noise:.2e}'} |")
    lines += ["", "Scaling efficiency = 2-process tokens/s / (2 x 1-process tokens/s) at the same global batch "
              "(goal for DDP: at least 90%). Loss delta: per step, against the 1-GPU run; the batch noise is the "
              "standard deviation of the 1-GPU loss around its 5-step mean over the second half of the run, the "
              "scale of a difference that would matter."]
    if report.get("plot_note"):
        lines += ["", f"Loss plot not written: {report['plot_note']}."]
    else:
        lines += ["", "Loss curves: gpu_distributed_loss.png."]
    return "\n".join(lines) + "\n"


def nccl_version() -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def parse_per_model(text: str, what: str) -> dict[str, int]:
    """"60" (every model) or "gpt2-small-like=60,0.5b=40"."""
    if "=" not in text:
        return {model: int(text) for model in MODELS}
    values = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(values) - set(MODELS)
    if unknown:
        raise SystemExit(f"{what}: unknown model {sorted(unknown)}; valid: {', '.join(MODELS)}")
    return {**{model: None for model in MODELS}, **{k: int(v) for k, v in values.items()}}  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_distributed.json, .md and _loss.png")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes, tiny models, a few steps")
    parser.add_argument("--runs", default=",".join(f"{m}:{s}" for m, s, _ in RUNS),
                        help="MODEL:STRATEGY list (default: all five)")
    parser.add_argument("--steps", default="gpt2-small-like=60,0.5b=40", help="optimizer steps per run, per model")
    parser.add_argument("--batch", default="gpt2-small-like=32,0.5b=16",
                        help="global batch (sequences) per model; one GPU must hold it (no fused loss)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (~1 min more per process)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--corpus", default="python-stdlib",
                        help="training data (a corpus name, file or folder), read as bytes")
    parser.add_argument("--run-timeout", type=float, default=150.0, help="seconds one torchrun run may take")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for all runs; later runs are skipped")
    parser.add_argument("--commit", default=None, help="git commit of the source (when the copy has no .git)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for run folders (default: a temp dir)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)
    if args.out is None:
        parser.error("--out is required")

    import torch

    if args.smoke:
        args.steps, args.batch, args.seq_len, args.warmup = "6", "8", 32, 2
    elif not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        print("gpu_distributed: needs 2 CUDA GPUs; run with --smoke to check the script on this machine",
              file=sys.stderr)
        return 2
    args.steps = parse_per_model(args.steps, "--steps")
    args.batch = parse_per_model(args.batch, "--batch")
    wanted = []
    for item in args.runs.split(","):
        model, _, strategy = item.partition(":")
        match = [r for r in RUNS + OPTIONAL_RUNS if r[0] == model and r[1] == strategy]
        if not match:
            parser.error(f"--runs: unknown run '{item}'; valid: "
                         + ", ".join(f"{m}:{s}" for m, s, _ in RUNS + OPTIONAL_RUNS))
        wanted += match
    for model, _, nproc in wanted:
        if args.steps[model] is None or args.batch[model] is None:
            parser.error(f"--steps and --batch need a value for {model}")
        if args.batch[model] % nproc:
            parser.error(f"--batch {args.batch[model]} for {model} does not split over {nproc} processes")

    from dynlm.train.bench import source_commit

    commit = args.commit or source_commit() or "unknown"
    device_name = torch.cuda.get_device_name(0) if not args.smoke else "CPU"
    report: dict[str, Any] = {
        "title": "Two GPUs: DDP and FSDP2 against one GPU" if not args.smoke else "gpu_distributed smoke run (CPU)",
        "device": device_name, "gpus": 2 if not args.smoke else 0, "torch": torch.__version__,
        "nccl": nccl_version(),
        "backend": "nccl" if not args.smoke else "gloo", "commit": commit,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "compile": args.compile,
        "dtype": "bfloat16 autocast" if not args.smoke else "float32", "seq_len": args.seq_len,
        "warmup": args.warmup, "seed": args.seed, "corpus": args.corpus, "runs": [], "summary": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_distributed_"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    def write() -> None:  # after every run, so an interrupted session keeps what it measured
        report["summary"] = summarize(report["runs"])
        report["plot_note"] = plot(report["runs"], args.out / "gpu_distributed_loss.png")
        (args.out / "gpu_distributed.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_distributed.md").write_text(to_markdown(report))

    try:
        for model, strategy, nproc in wanted:
            left = args.budget - (time.perf_counter() - started)
            if left < 20:
                report["runs"].append({"model": model, "strategy": strategy, "processes": nproc,
                                       "config": run_config(model, strategy, args, work),
                                       "error": f"skipped: the {args.budget:.0f} s budget was spent"})
                continue
            report["runs"].append(launch(model, strategy, nproc, args, work, min(args.run_timeout, left)))
            write()
    finally:
        write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(to_markdown(report))
    say(f"wrote {args.out / 'gpu_distributed.json'} and .md in {time.perf_counter() - started:.0f} s")
    return 0 if all("error" not in r for r in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
