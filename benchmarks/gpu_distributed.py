"""Two GPUs with torchrun: DDP and FSDP2 variants against one GPU, all in one run.

    python benchmarks/gpu_distributed.py --out $OUT --commit SHA           # 2 CUDA GPUs, about 4 minutes
    python benchmarks/gpu_distributed.py --smoke --out /tmp/dist_smoke      # CPU, gloo, 2 processes, tiny

Every run is the `dynlm train` pipeline (`dynlm.train.train`: data, model, the trainer's step),
NCCL on CUDA with NVLink multicast off (NCCL_NVLS_ENABLE=0), gloo on CPU. The script launches
`torchrun` once for the 1-process runs and once for the 2-process runs; inside a launch the runs
follow one another in one process group. A run stops right after its last training
step (a callback raises): the end-of-run validation and checkpoint are not what is compared, and
writing them for every variant would cost more than the steps.

Measured the same way in every run: tokens/s between a device synchronisation after the warm-up
steps and one after the last step, with no host sync in between (the trainer logs only after the
last step; each step's loss stays on the device and is read back once at the end, averaged over
the ranks as the trainer's log does). Scaling efficiency = 2-process tokens/s / (2 x 1-process
tokens/s) at the same per-GPU batch (and micro-batches per step), the 1-process run in the same
session. Loss agreement: each 2-process run against the 1-process run of the same global batch
(`single-accum2`: the per-GPU batch twice, as two accumulated micro-batches, so the same
sequences as the two ranks), next to that curve's batch-to-batch noise. All runs of a model share
the seed, the initial weights and the data order. Data: the interpreter's standard library as
bytes (`python-stdlib`: on every machine), the model's own vocabulary size (the LM head has its
real shape); random initial weights, bf16 autocast on CUDA.

Variants (VARIANTS below) are trainer options (`train.ddp_*`, `train.fsdp_*`, `train.compile`,
`train.grad_accum`) except `ddp-grad-copy`, an experiment: DDP's `gradient_as_bucket_view`
turned off around the trainer's DDP constructor. `--runs` picks model:variant pairs.

Writes gpu_distributed.json, .md and gpu_distributed_loss.png to --out, rewritten as each run
finishes; a failed or skipped run is recorded and the others go on."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Variant:
    processes: int
    note: str
    train: dict[str, Any] = field(default_factory=dict)  # train-section options of the run
    grad_accum: int = 1  # micro-batches per step on each process, each of the per-GPU batch
    ddp_kwargs: dict[str, Any] = field(default_factory=dict)  # experiment: DDP arguments the trainer does not expose


VARIANTS = {
    "single": Variant(1, "1 GPU at the per-GPU batch: the throughput baseline"),
    "single-accum2": Variant(1, "1 GPU, 2 accumulated micro-batches: the 2-GPU global batch (loss reference)",
                             grad_accum=2),
    "single-compiled": Variant(1, "1 GPU, torch.compile", {"compile": True}),
    "ddp": Variant(2, "DDP as the trainer sets it up: 25 MB buckets, gradients as bucket views"),
    "ddp-grad-copy": Variant(2, "DDP with gradient_as_bucket_view off (experiment)",
                             ddp_kwargs={"gradient_as_bucket_view": False}),
    "ddp-bucket-100mb": Variant(2, "train.ddp_bucket_cap_mb=100", {"ddp_bucket_cap_mb": 100}),
    "ddp-accum2": Variant(2, "2 micro-batches per GPU, no all-reduce on the first (no_sync)", grad_accum=2),
    "ddp-compiled": Variant(2, "DDP, torch.compile", {"compile": True}),
    "fsdp": Variant(2, "FSDP2 as the trainer sets it up: per-layer units, float32 gathers", {"fsdp": True}),
    "fsdp-keep-gathered": Variant(2, "train.fsdp_reshard_after_forward=false",
                                  {"fsdp": True, "fsdp_reshard_after_forward": False}),
    "fsdp-bf16": Variant(2, "train.fsdp_param_dtype=bfloat16", {"fsdp": True, "fsdp_param_dtype": "bfloat16"}),
    "fsdp-keep-gathered-bf16": Variant(2, "no reshard after forward, bfloat16 gathers",
                                       {"fsdp": True, "fsdp_reshard_after_forward": False,
                                        "fsdp_param_dtype": "bfloat16"}),
    "fsdp-keep-gathered-bf16-reduce": Variant(2, "no reshard, bfloat16 gathers and reduce-scatters",
                                              {"fsdp": True, "fsdp_reshard_after_forward": False,
                                               "fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "bfloat16"}),
}
DEFAULT_RUNS = [  # (model, variant); 2-process runs most telling first, should the budget run out
    ("gpt2-small-like", "single"), ("gpt2-small-like", "single-accum2"), ("0.5b", "single"), ("0.5b", "single-accum2"),
    ("gpt2-small-like", "ddp"), ("0.5b", "ddp"), ("gpt2-small-like", "fsdp"), ("0.5b", "fsdp"),
    ("gpt2-small-like", "fsdp-keep-gathered-bf16"), ("0.5b", "fsdp-keep-gathered-bf16"),
    ("gpt2-small-like", "fsdp-keep-gathered"), ("0.5b", "fsdp-keep-gathered"), ("gpt2-small-like", "fsdp-bf16"),
    ("gpt2-small-like", "ddp-bucket-100mb"), ("0.5b", "ddp-bucket-100mb"), ("gpt2-small-like", "ddp-grad-copy"),
    ("gpt2-small-like", "ddp-accum2"),
]

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
LEARNING_RATES = {"gpt2-small-like": 6e-4, "0.5b": 3e-4}


def say(message: str) -> None:
    print(f"[gpu_distributed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The worker: one process of one torchrun launch, running its runs one after the other


class TimedStepsDone(Exception):
    """Raised by the Recorder after the last step: the run ends before validation and saving."""


class Recorder:
    """A trainer callback. Keeps each step's loss on the device; synchronises the device after
    the warm-up and after the last step (the timed interval); then reads the losses back once
    (averaged over the ranks), gathers each rank's peak memory and stops the run."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.losses: list[Any] = []
        self.nonfinite: list[Any] = []
        self.started = 0.0
        self.result: dict[str, Any] | None = None

    def __call__(self, event: str, trainer: Any, info: dict[str, Any]) -> None:
        import torch

        from dynlm import distributed

        device = trainer.device
        if event == "start" and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if event != "step":
            return
        self.losses.append(info["output"].loss.detach().float())
        self.nonfinite.append(info["output"].nonfinite)
        step, last = info["step"], trainer.cfg.max_steps
        if step in (self.warmup, last) and device.type == "cuda":
            torch.cuda.synchronize(device)
        if step == self.warmup:
            self.started = time.perf_counter()
        if step < last:
            return
        seconds = time.perf_counter() - self.started
        ctx = trainer.ctx
        losses = distributed.all_reduce_sum(torch.stack(self.losses).double(), ctx) / ctx.world_size
        skipped = int(torch.stack(self.nonfinite).sum())
        peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
        self.result = {"losses": losses.tolist(), "seconds": seconds, "timed_steps": last - self.warmup,
                       "tokens_per_step": trainer.tokens_per_step, "skipped_steps": skipped,
                       "peak_memory_bytes": distributed.all_gather_objects(peak, ctx),
                       "world_size": ctx.world_size}
        raise TimedStepsDone


@contextlib.contextmanager
def ddp_arguments(overrides: dict[str, Any]) -> Iterator[None]:
    """Experiment only: DDP keyword arguments the trainer does not expose, forced onto the
    DistributedDataParallel the trainer builds (dynlm.distributed.wrap_model looks it up in
    torch.nn.parallel when it wraps the model)."""
    if not overrides:
        yield
        return
    import torch.nn.parallel as parallel

    original = parallel.DistributedDataParallel

    def build(*args: Any, **kwargs: Any) -> Any:
        return original(*args, **{**kwargs, **overrides})

    parallel.DistributedDataParallel = build  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        parallel.DistributedDataParallel = original  # type: ignore[misc]


def run_one(item: dict[str, Any]) -> dict[str, Any]:

    from dynlm.train import train

    recorder = Recorder(item["warmup"])
    record: dict[str, Any] = {"name": item["name"]}
    start = time.perf_counter()
    try:
        with ddp_arguments(item["ddp_kwargs"]):
            train(item["run"], callbacks=[recorder], force=True)
        record["error"] = "the run ended without its last step being recorded"
    except TimedStepsDone:
        record.update(recorder.result or {})
    except Exception as e:  # recorded; the launch goes on with its next run
        lines = str(e).strip().splitlines()
        record["error"] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:500]
    record["wall_s"] = time.perf_counter() - start
    return record


def clean_up(item: dict[str, Any]) -> None:
    """After a run's record is written: its folder, model, optimizer, cached allocations and
    compiled graphs."""
    import torch

    shutil.rmtree(Path(item["run"]["out_dir"]) / item["run"]["run_name"], ignore_errors=True)
    gc.collect()  # the finished run's model, optimizer and process-group hooks
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # a compiled run's graphs


def worker(spec_path: Path) -> int:
    from dynlm import distributed

    spec = json.loads(spec_path.read_text())
    ctx = distributed.setup(spec["device"])  # one process group for all runs of the launch
    try:
        for item in spec["runs"]:
            # every rank must make the same choice, so rank 0's clock decides
            late = distributed.all_gather_objects(time.time() > spec["deadline"], ctx)[0]
            record = {"name": item["name"], "error": "skipped: the time budget was spent"} if late else run_one(item)
            if ctx.is_main:
                with open(spec["results"], "a") as f:
                    f.write(json.dumps(record) + "\n")
            distributed.barrier(ctx)
            if not late:
                clean_up(item)
    finally:
        distributed.teardown(ctx)
    return 0


# ---------------------------------------------------------------------------------------------
# The launcher


def run_name(model: str, variant: str) -> str:
    return f"{model}:{variant}"


def run_config(model: str, variant: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    v = VARIANTS[variant]
    models = SMOKE_MODELS if args.smoke else MODELS
    steps, per_gpu = args.steps[model], args.batch_per_gpu[model]
    lr = LEARNING_RATES[model]
    return {
        "model": dict(models[model]),
        "data": {"corpus": args.corpus, "tokenizer": "bytes", "seq_len": args.seq_len,
                 "cache_dir": str(work / "cache")},
        "train": {"max_steps": steps, "batch_size": per_gpu * v.processes * v.grad_accum, "grad_accum": v.grad_accum,
                  "lr": lr, "min_lr": lr / 10, "warmup_steps": max(1, steps // 6), "log_every": steps,
                  "eval_every": 0, "save_every": steps, "final_eval": [], "sample_prompt": None, "plot": False,
                  "progress": False, "device": "cpu" if args.smoke else "cuda", "seed": args.seed, **v.train},
        "out_dir": str(work / "runs"), "run_name": f"{model}-{variant}",
    }


def launch_groups(wanted: list[tuple[str, str]]) -> list[tuple[int, list[tuple[str, str]]]]:
    """(processes, runs) per torchrun launch: every 1-process run (the baselines), then the
    2-process DDP runs, then the 2-process FSDP2 runs, each in the order asked for. DDP and FSDP2
    get launches of their own, so that a CUDA fault in one engine's runs (which poisons the
    process) cannot take the other's with it: an FSDP2 fault once did (gpu_fsdp_probe.py)."""
    def engine(run: tuple[str, str]) -> str:
        return "fsdp" if VARIANTS[run[1]].train.get("fsdp") else "ddp"

    groups = [(1, [r for r in wanted if VARIANTS[r[1]].processes == 1])]
    groups += [(2, [r for r in wanted if VARIANTS[r[1]].processes == 2 and engine(r) == e]) for e in ("ddp", "fsdp")]
    return [(n, runs) for n, runs in groups if runs]


def launch(index: int, nproc: int, runs: list[tuple[str, str]], args: argparse.Namespace, work: Path,
           timeout: float, entries: dict[str, dict[str, Any]], on_update: Any) -> None:
    """One torchrun launch; each run's record lands in `entries` as soon as it is written."""
    results = work / f"launch{index}.results.jsonl"
    log_path = work / f"launch{index}.log"
    spec = work / f"launch{index}.spec.json"
    items = [{"name": run_name(m, v), "run": entries[run_name(m, v)]["config"], "warmup": args.warmup,
              "ddp_kwargs": VARIANTS[v].ddp_kwargs} for m, v in runs]
    margin = 25.0  # a run started this late in the launch could not finish before the timeout
    spec.write_text(json.dumps({"runs": items, "results": str(results), "device": "cpu" if args.smoke else "cuda",
                                "deadline": time.time() + timeout - margin}))
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    # torchrun's default of 1 thread per process makes building a 0.5B model on the CPU slow
    env["OMP_NUM_THREADS"] = "1" if args.smoke else str(max(1, min(16, (os.cpu_count() or 2) // (2 * nproc))))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), "--worker", str(spec)]
    say(f"launch {index}: torchrun --nproc_per_node {nproc}: {', '.join(run_name(m, v) for m, v in runs)} "
        f"({timeout:.0f} s at most)")
    seen = 0
    ended = time.perf_counter() + timeout
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                start_new_session=True)
        try:
            while True:
                try:
                    proc.wait(timeout=3)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                lines = results.read_text().splitlines() if results.is_file() else []
                for line in lines[seen:]:
                    record = json.loads(line)
                    entry = entries[record.pop("name")]
                    entry.update(record)
                    if "error" not in entry:
                        entry.update(measure(entry))
                    say(describe(entry))
                    on_update()
                seen = len(lines)
                if finished or time.perf_counter() > ended:
                    break
        finally:
            if proc.poll() is None:  # timed out, or this script stops: end the session we started
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    text = log_path.read_text(errors="replace")
    # the workers' own error lines: torchrun's summary at the end of the log does not carry them
    worker_errors = [line for line in text.splitlines() if line.startswith("[rank") and "Error" in line]
    tail = "\n".join(worker_errors[:6] + [text[-3000:]])
    if proc.returncode != 0 and args.out is not None:  # the whole log, for the next person to read
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log_path, args.out / f"launch{index}.log")
    for m, v in runs:
        entry = entries[run_name(m, v)]
        if "losses" not in entry and "error" not in entry:
            entry["error"] = f"launch {index} timed out after {timeout:.0f} s" if proc.returncode in (None, -15, -9) \
                else f"launch {index} ended (exit status {proc.returncode}) before this run"
            entry["log_tail"] = tail
            say(describe(entry))
    if proc.returncode != 0:
        say(f"launch {index}: exit status {proc.returncode}; log tail:\n{tail[-2000:]}")
    on_update()


def measure(entry: dict[str, Any]) -> dict[str, Any]:
    """tokens/s and ms per step over the timed steps (after the warm-up)."""
    seconds, steps = entry["seconds"], entry["timed_steps"]
    return {"tokens_per_s": entry["tokens_per_step"] * steps / seconds, "step_ms": 1000 * seconds / steps}


def describe(entry: dict[str, Any]) -> str:
    name = run_name(entry["model"], entry["variant"])
    if "error" in entry:
        return f"{name}: {entry['error']}"
    peaks = ", ".join(_gib(b) for b in entry["peak_memory_bytes"])
    return (f"{name}: {entry['tokens_per_s']:,.0f} tokens/s ({entry['step_ms']:.1f} ms/step), peak memory "
            f"[{peaks}] GiB, final loss {entry['losses'][-1]:.4f}, {entry['wall_s']:.0f} s")


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


def _global_batch(entry: dict[str, Any]) -> int:
    return entry["config"]["train"]["batch_size"]


def baseline_of(entry: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The 1-process run measured the same way: same model, per-GPU batch, micro-batches per step
    and compile setting."""
    train = entry["config"]["train"]
    for other in done:
        t = other["config"]["train"]
        if other["model"] == entry["model"] and other["processes"] == 1 and t["grad_accum"] == train["grad_accum"] \
                and bool(t.get("compile")) == bool(train.get("compile")):
            return other
    return None


def reference_of(entry: dict[str, Any], done: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The 1-process run of the same model and global batch (uncompiled first)."""
    same = [o for o in done if o["model"] == entry["model"] and o["processes"] == 1
            and _global_batch(o) == _global_batch(entry)]
    same.sort(key=lambda o: bool(o["config"]["train"].get("compile")))
    return same[0] if same else None


def summarize(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per 2-process run: scaling efficiency against its baseline, loss agreement with its reference."""
    done = [e for e in entries if "losses" in e]
    rows = []
    for entry in done:
        if entry["processes"] == 1:
            continue
        row: dict[str, Any] = {"model": entry["model"], "variant": entry["variant"],
                               "tokens_per_s": entry["tokens_per_s"]}
        base = baseline_of(entry, done)
        if base is not None:
            row["baseline"] = base["variant"]
            row["scaling_efficiency"] = entry["tokens_per_s"] / (entry["processes"] * base["tokens_per_s"])
        ref = reference_of(entry, done)
        if ref is not None:
            deltas = [abs(a - b) for a, b in zip(entry["losses"], ref["losses"])]
            row.update(reference=ref["variant"], max_abs_loss_delta=max(deltas),
                       mean_abs_loss_delta=sum(deltas) / len(deltas), reference_batch_noise=batch_noise(ref["losses"]))
        rows.append(row)
    return rows


def plot(entries: list[dict[str, Any]], path: Path) -> str | None:
    """Per model: the loss curves of the 2-process runs and of their 1-process reference (top),
    and each one's difference to the reference (bottom)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    done = [e for e in entries if "losses" in e]
    models = list(dict.fromkeys(e["model"] for e in done))
    if not models:
        return "no run finished"
    fig, axes = plt.subplots(2, len(models), figsize=(7 * len(models), 8), dpi=110, squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [2, 1]})
    for column, model in enumerate(models):
        top, bottom = axes[0][column], axes[1][column]
        compared = [(e, reference_of(e, done)) for e in done if e["model"] == model and e["processes"] > 1]
        compared = [(e, ref) for e, ref in compared if ref is not None]  # runs at a 1-GPU run's global batch
        references = list({id(ref): ref for _, ref in compared}.values())
        for entry, ref in [(r, None) for r in references] + compared:
            steps = range(1, len(entry["losses"]) + 1)
            width = 2.0 if entry["processes"] == 1 else 0.8
            top.plot(steps, entry["losses"], label=entry["variant"], linewidth=width)
            if ref is not None:
                delta = [a - b for a, b in zip(entry["losses"], ref["losses"])]
                bottom.plot(steps[:len(delta)], delta, label=f"{entry['variant']} - {ref['variant']}", linewidth=0.8)
        top.set_title(f"{model}: runs at the 2-GPU global batch")
        top.set_ylabel("training loss (nats/token)")
        top.legend(fontsize=7)
        top.grid(alpha=0.3)
        bottom.axhline(0, color="grey", linewidth=0.5)
        bottom.set_xlabel("step")
        bottom.set_ylabel("loss difference")
        if bottom.get_legend_handles_labels()[0]:
            bottom.legend(fontsize=6)
        bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def to_markdown(report: dict[str, Any]) -> str:
    machine = f"{report['device']} x {report['gpus']}" if report["gpus"] else f"{report['device']}, 2 processes"
    lines = [f"# {report['title']}", "",
             f"{machine}, torch {report['torch']}, NCCL {report['nccl']}, backend {report['backend']}, "
             f"NCCL_NVLS_ENABLE=0, commit {provenance.short(report['commit'])}, {report['time']}. Each run is "
             f"`dynlm.train.train` under torchrun, stopped after its last step; dtype {report['dtype']}; seq "
             f"{report['seq_len']}; random initial weights (seed {report['seed']}); data: {report['corpus']} as "
             f"bytes, the same global batches in every run of a model. tokens/s between device synchronisations "
             f"after step {report['warmup']} and after the last step, no host sync in between.", "",
             "| model | run | processes | per-GPU batch x micro-batches | global batch | steps | tokens/s | step ms "
             "| peak memory per process (GiB) | final loss | wall s | setting |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["runs"]:
        t = e["config"]["train"]
        per_gpu = t["batch_size"] // (e["processes"] * t["grad_accum"])
        head = (f"| {e['model']} | {e['variant']} | {e['processes']} | {per_gpu} x {t['grad_accum']} | "
                f"{t['batch_size']} | {t['max_steps']} |")
        if "losses" not in e:
            status = e["error"] if e.get("error", "").startswith("skipped") else f"failed: {e['error']}" \
                if "error" in e else "not run yet"
            lines.append(f"{head} {status} | | | | | "
                         f"{e['note']} |")
            continue
        peaks = ", ".join(_gib(b) for b in e["peak_memory_bytes"])
        lines.append(f"{head} {e['tokens_per_s']:,.0f} | {e['step_ms']:.1f} | {peaks} | {e['losses'][-1]:.4f} | "
                     f"{e['wall_s']:.0f} | {e['note']} |")
    lines += ["", "## Scaling and agreement with one GPU", "",
              "| model | run | tokens/s | baseline | scaling efficiency | loss reference | max abs loss delta "
              "| mean abs loss delta | reference batch noise |", "|---|---|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        eff = f"{100 * row['scaling_efficiency']:.1f}%" if "scaling_efficiency" in row else "-"
        noise = row.get("reference_batch_noise")
        loss = (f"{row['reference']} | {row['max_abs_loss_delta']:.2e} | {row['mean_abs_loss_delta']:.2e} | "
                f"{'-' if noise is None else f'{noise:.2e}'}") if "reference" in row else "- | - | - | -"
        lines.append(f"| {row['model']} | {row['variant']} | {row['tokens_per_s']:,.0f} | {row.get('baseline', '-')} "
                     f"| {eff} | {loss} |")
    lines += ["", "Scaling efficiency = 2-process tokens/s / (2 x tokens/s of the 1-process baseline with the same "
              "per-GPU batch, micro-batches and compile setting), same steps, warm-up excluded (goal for DDP: at "
              "least 90%). Loss delta: per step, against the 1-process run of the same global batch; the batch "
              "noise is the standard deviation of that run's loss around its 5-step mean over the second half, "
              "the scale of a difference that would matter."]
    if report.get("budget_note"):
        lines += ["", report["budget_note"]]
    lines += ["", f"Loss plot not written: {report['plot_note']}." if report.get("plot_note")
              else "Loss curves: gpu_distributed_loss.png."]
    return "\n".join(lines) + "\n"


def nccl_version() -> str:
    import torch

    if not torch.cuda.is_available():
        return "n/a"
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def parse_per_model(text: str, what: str) -> dict[str, int]:
    """"40" (every model) or "gpt2-small-like=40,0.5b=30"."""
    if "=" not in text:
        return {model: int(text) for model in MODELS}
    values = dict(item.split("=", 1) for item in text.split(","))
    unknown = set(values) - set(MODELS)
    if unknown:
        raise SystemExit(f"{what}: unknown model {sorted(unknown)}; valid: {', '.join(MODELS)}")
    return {**{model: None for model in MODELS}, **{k: int(v) for k, v in values.items()}}  # type: ignore[dict-item]


def parse_runs(text: str | None) -> list[tuple[str, str]]:
    """"MODEL:VARIANT,..." (or "MODEL:default" for that model's default list); None: all defaults."""
    if text is None:
        return list(DEFAULT_RUNS)
    wanted: list[tuple[str, str]] = []
    for item in text.split(","):
        model, _, variant = item.partition(":")
        if model not in MODELS:
            raise SystemExit(f"--runs: unknown model '{model}' in '{item}'; valid: {', '.join(MODELS)}")
        if variant == "default":
            wanted += [(m, v) for m, v in DEFAULT_RUNS if m == model]
        elif variant in VARIANTS:
            wanted.append((model, variant))
        else:
            raise SystemExit(f"--runs: unknown variant '{variant}' in '{item}'; valid: default, {', '.join(VARIANTS)}")
    return list(dict.fromkeys(wanted))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="folder for gpu_distributed.json, .md and _loss.png")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, 2 processes, tiny models, a few steps")
    parser.add_argument("--runs", default=None, help="MODEL:VARIANT list, run in that order (MODEL:default for a "
                        "model's default runs); default: " + ", ".join(f"{m}:{v}" for m, v in DEFAULT_RUNS))
    parser.add_argument("--steps", default="gpt2-small-like=40,0.5b=30", help="optimizer steps per run, per model")
    parser.add_argument("--batch-per-gpu", default="gpt2-small-like=16,0.5b=8",
                        help="sequences per GPU per micro-batch, per model")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--corpus", default="python-stdlib",
                        help="training data (a corpus name, file or folder), read as bytes")
    parser.add_argument("--budget", type=float, default=285.0,
                        help="seconds for all launches; runs that cannot start in time are recorded as skipped")
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
        args.steps, args.batch_per_gpu, args.seq_len, args.warmup = "6", "2", 32, 2
    elif not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        print("gpu_distributed: needs 2 CUDA GPUs; run with --smoke to check the script on this machine",
              file=sys.stderr)
        return 2
    args.steps = parse_per_model(args.steps, "--steps")
    args.batch_per_gpu = parse_per_model(args.batch_per_gpu, "--batch-per-gpu")
    wanted = parse_runs(args.runs)
    for model, _ in wanted:
        if args.steps[model] is None or args.batch_per_gpu[model] is None:
            parser.error(f"--steps and --batch-per-gpu need a value for {model}")
        if not 0 < args.warmup < args.steps[model]:
            parser.error(f"--warmup {args.warmup} must be >= 1 and below --steps {args.steps[model]} ({model})")

    report: dict[str, Any] = {
        "title": "Two GPUs: DDP and FSDP2 variants against one GPU" if not args.smoke
        else "gpu_distributed smoke run (CPU)",
        "device": torch.cuda.get_device_name(0) if not args.smoke else "CPU", "gpus": 0 if args.smoke else 2,
        "torch": torch.__version__, "nccl": nccl_version(), "backend": "gloo" if args.smoke else "nccl",
        "commit": provenance.commit(args.commit), "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dtype": "float32" if args.smoke else "bfloat16 autocast", "seq_len": args.seq_len, "warmup": args.warmup,
        "seed": args.seed, "corpus": args.corpus, "steps": args.steps, "batch_per_gpu": args.batch_per_gpu,
        "budget_s": args.budget, "runs": [], "summary": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_distributed_"))
    work.mkdir(parents=True, exist_ok=True)
    entries = {run_name(m, v): {"model": m, "variant": v, "processes": VARIANTS[v].processes,
                                "note": VARIANTS[v].note, "config": run_config(m, v, args, work)} for m, v in wanted}
    report["runs"] = sorted(entries.values(), key=lambda e: list(MODELS).index(e["model"]))  # tables by model
    started = time.perf_counter()

    def write() -> None:  # after every run, so an interrupted session keeps what it measured
        report["summary"] = summarize(report["runs"])
        report["plot_note"] = plot(report["runs"], args.out / "gpu_distributed_loss.png")
        report["total_wall_s"] = time.perf_counter() - started
        (args.out / "gpu_distributed.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_distributed.md").write_text(to_markdown(report))

    try:
        for index, (nproc, runs) in enumerate(launch_groups(wanted)):
            left = args.budget - (time.perf_counter() - started)
            if left < 40:
                for m, v in runs:
                    entries[run_name(m, v)]["error"] = f"skipped: the {args.budget:.0f} s budget was spent"
                report["budget_note"] = f"Runs were skipped: the {args.budget:.0f} s budget was spent."
                continue
            launch(index, nproc, runs, args, work, left, entries, write)
    finally:
        write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(to_markdown(report))
    say(f"wrote {args.out / 'gpu_distributed.json'} and .md in {time.perf_counter() - started:.0f} s")
    return 0 if all("losses" in e for e in report["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
