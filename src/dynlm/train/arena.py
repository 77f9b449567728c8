"""The arena: every registered architecture trained on the same data, split and seeds under one
budget, scored by the one evaluator, and compared in one report.

    result = run_arena("quick", "arena/quick")                      # a tier preset, its budgets
    result = run_arena("gpu-small", "arena/gpu", budgets=["flops=2e17"], resume=True)

A **tier** (`dynlm/configs/arena/<tier>.yaml`, or any YAML file of the same shape) fixes what
every arm shares: the run config (corpus, tokenizer, seq_len, batch, schedule), the model presets
(`<arch>-<preset_suffix>`, so the parameter counts match), the budgets, the seeds, and the
evaluation and decoding settings. An **arm** is one training run: (budget, architecture, seed),
trained by the one trainer (`dynlm.train.train`) and scored by the one evaluator
(`dynlm.eval.evaluate`) in bits per UTF-8 byte. Budgets:

  tokens=N    every architecture sees N training tokens (the same step count for all)
  flops=F     steps = F / (model.flops_per_token(seq_len) x tokens per step): a model that
              spends fewer FLOPs per token (a routed one) takes more steps
  seconds=S   steps = S / (the step time measured on the machine, `calibration_steps` timed
              steps), so the learning-rate schedule ends with the budget; a run still going at
              S seconds of training is stopped there (and says so)

Under the budget kinds in `dense_at_routed_steps` (default: flops) the dense architecture
(`dense`, normally `standard`) also trains at each routed architecture's step count, so "more
steps" and "better architecture" separate.
Routed models are scored with the causal router (what generation runs) and with top-k; the causal
router's routed share is reported next to the trained capacity, and its agreement with top-k next
to the trivial never-route baseline (1 - capacity).

Crash safety: each arm's result is written (`arms/<arm>.json`) the moment it finishes, together
with report.json and report.md; `resume=True` skips finished arms (an interrupted arm continues
from its newest checkpoint); Ctrl-C writes a partial report before it propagates."""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynlm.checkpoint import load_checkpoint
from dynlm.config import CONFIG_ROOT, deep_merge, list_model_presets, load_yaml, parse_overrides, to_dataclass
from dynlm.distributed import resolve_device, resolve_dtype
from dynlm.errors import CheckpointError, ConfigError, DynlmError, OutputExistsError, did_you_mean
from dynlm.eval.evaluate import evaluate
from dynlm.eval.flops import device_name, mfu, peak_flops
from dynlm.eval.recall import recall_grid
from dynlm.fileio import atomic_write_text
from dynlm.registry import get_architecture, list_architectures
from dynlm.train.bench import BenchConfig, bench_train, decode_speed, source_commit
from dynlm.train.config import RunConfig, load_run_config, resolve_model_config
from dynlm.train.data import prepare_run_data
from dynlm.train.run import train
from dynlm.train.trainer import Trainer, read_metrics

SCHEMA = "dynlm.arena/1"
BUDGET_KINDS = ("tokens", "flops", "seconds")


# ---------------------------------------------------------------------------------------------
# Budgets and tiers


@dataclass(frozen=True)
class Budget:
    kind: str  # tokens | flops | seconds
    value: float

    @property
    def text(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_budget(text: str) -> Budget:
    """"flops=2e17" -> Budget("flops", 2e17)."""
    kind, sep, value = str(text).partition("=")
    kind = kind.strip()
    if not sep or kind not in BUDGET_KINDS:
        raise ConfigError(f"bad budget '{text}'", "write tokens=N, flops=F or seconds=S, e.g. flops=2e17")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"bad budget '{text}': '{value}' is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"bad budget '{text}': the amount must be > 0")
    return Budget(kind, number)


@dataclass
class ArenaTier:
    description: str = ""
    preset_suffix: str = "quick"  # an architecture's model preset is <arch>-<preset_suffix>
    presets: dict[str, str] = field(default_factory=dict)  # arch -> preset, where the name differs
    run: dict[str, Any] = field(default_factory=dict)  # the run config every arm starts from
    arch_overrides: dict[str, Any] = field(default_factory=dict)  # arch -> run-config changes (e.g. a tokenizer)
    budgets: list[str] = field(default_factory=lambda: ["tokens=1e6"])
    seeds: list[int] = field(default_factory=lambda: [0])
    dense: str = "standard"  # the baseline every other architecture is compared with
    dense_at_routed_steps: list[str] = field(default_factory=lambda: ["flops"])  # budget kinds where the dense
    # model also trains at each routed architecture's step count
    param_tolerance: float = 0.05  # parameter counts must be within this fraction of the dense model's
    eval_bytes: int | None = 65536  # UTF-8 bytes scored per split (evenly spaced pieces); null: whole split
    eval_splits: list[str] = field(default_factory=lambda: ["val", "test"])
    decode_contexts: list[int] = field(default_factory=lambda: [1024, 8192, 65536])
    decode_batch: int = 2  # rows decoded together, each from a different prompt
    decode_tokens: int = 16  # the context is the tokens held in the state after decoding
    calibration_steps: int = 5  # seconds budgets: timed training steps (after 2 untimed) per architecture
    # keyword arguments of `dynlm.eval.recall.recall_grid` (lengths, depths, samples); empty: no recall grid
    recall: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for budget in self.budgets:
            parse_budget(budget)
        if not self.seeds:
            raise ConfigError("arena.seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"arena.seeds repeats a seed: {self.seeds}")
        if not 0 <= self.param_tolerance < 1:
            raise ConfigError(f"arena.param_tolerance must be in [0, 1), got {self.param_tolerance}")
        if self.decode_batch < 2:
            raise ConfigError("arena.decode_batch must be >= 2 (batch-1 decoding hides what batching costs)")
        if self.decode_tokens < 1 or any(c <= self.decode_tokens for c in self.decode_contexts):
            raise ConfigError("arena.decode_contexts must each exceed arena.decode_tokens (>= 1)")
        for kind in self.dense_at_routed_steps:
            if kind not in BUDGET_KINDS:
                raise ConfigError(f"bad budget kind '{kind}' in arena.dense_at_routed_steps", "valid: flops, seconds")
        for split in self.eval_splits:
            if split not in ("val", "test"):
                raise ConfigError(f"bad split '{split}' in arena.eval_splits", "valid: val, test")


def list_tiers() -> list[str]:
    return sorted(p.name[:-5] for p in (CONFIG_ROOT / "arena").iterdir() if p.name.endswith(".yaml"))


def load_tier(tier: str | Path | dict[str, Any]) -> tuple[str, ArenaTier, dict[str, Any]]:
    """(name, validated tier, raw dict) of a tier preset name, a YAML file or a dict."""
    if isinstance(tier, dict):
        name, raw = str(tier.get("name", "custom")), {k: v for k, v in tier.items() if k != "name"}
    elif str(tier).endswith((".yaml", ".yml")) or "/" in str(tier):
        name, raw = Path(tier).stem, load_yaml(tier)
    else:
        path = CONFIG_ROOT / "arena" / f"{tier}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown arena tier '{tier}'", did_you_mean(str(tier), list_tiers()))
        name, raw = str(tier), load_yaml(Path(str(path)))
    return name, to_dataclass(ArenaTier, raw, prefix="arena."), raw


# ---------------------------------------------------------------------------------------------
# What one run of the arena does (settings -> architectures -> arms)


@dataclass
class Settings:
    """What the user asked for; saved as settings.json so `resume` repeats it."""

    tier: str
    tier_config: dict[str, Any]
    budgets: list[str]
    seeds: list[int]
    archs: list[str] | None  # None: every registered architecture
    run_overrides: list[str]  # a.b=c changes of the shared run config (e.g. data.corpus=...)


@dataclass
class ArchInfo:
    name: str
    preset: str
    params: int = 0
    flops_per_token: float = 0.0
    routed: bool = False
    capacity: float | None = None  # mean fraction of tokens a routed layer processes under top-k
    max_positions: int | None = None
    config_sha256: str = ""
    skip: str | None = None  # why this architecture is not in the arena


@dataclass
class Arm:
    id: str
    budget: Budget
    arch: str
    seed: int
    steps: int
    steps_of: str | None = None  # the dense model at this routed architecture's step count
    spec_sha256: str = ""


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def preset_of(tier: ArenaTier, arch: str) -> str:
    """The model preset an architecture trains in this tier."""
    return tier.presets.get(arch, f"{arch}-{tier.preset_suffix}")


def _arm_run_config(settings: Settings, tier: ArenaTier, arch: str) -> dict[str, Any]:
    """The run config of an architecture: the tier's run, its preset, its overrides, the user's."""
    base = deep_merge(tier.run, {"model": {"preset": preset_of(tier, arch)}},
                      tier.arch_overrides.get(arch) or {}, parse_overrides(settings.run_overrides))
    return base


def describe_architectures(settings: Settings, tier: ArenaTier, data: dict[str, Any]) -> dict[str, ArchInfo]:
    """Every requested architecture: its preset, parameters and FLOPs per token, or why it is skipped."""
    registered = list_architectures()
    wanted = settings.archs if settings.archs is not None else registered
    for arch in wanted:
        if arch not in registered:
            raise ConfigError(f"unknown architecture '{arch}'", did_you_mean(arch, registered))
    presets = set(list_model_presets())
    infos: dict[str, ArchInfo] = {}
    for arch in wanted:
        preset = preset_of(tier, arch)
        info = ArchInfo(arch, preset)
        infos[arch] = info
        if preset not in presets:
            info.skip = f"no model preset '{preset}' for this tier"
            continue
        run = load_run_config(_arm_run_config(settings, tier, arch))
        tokenizer = _tokenizer_and_splits(run, data)[0]
        config = resolve_model_config(run, tokenizer.vocab_size)
        torch.manual_seed(0)
        model = get_architecture(config.type)[1](config)
        info.params = model.num_parameters()
        info.flops_per_token = float(model.flops_per_token(run.data.seq_len))
        info.routed = hasattr(model, "set_routing") and hasattr(model, "processed_fractions")
        if info.routed:
            fractions = [f for f in model.processed_fractions(run.data.seq_len) if f < 1.0]
            info.capacity = float(np.mean(fractions)) if fractions else None
        info.max_positions = getattr(config, "max_position_embeddings", None)
        info.config_sha256 = _sha({"run": run.to_dict(config)})
    return infos


def _tokenizer_and_splits(run: RunConfig, data: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Tokenize the corpus once per (corpus, tokenizer, splits); the trainer reads the same cache."""
    key = json.dumps([run.data.corpus, run.data.tokenizer, list(run.data.splits), run.data.cache_dir])
    if key not in data:
        data[key] = prepare_run_data(run, show_progress=False)
    return data[key]


def plan_arms(settings: Settings, tier: ArenaTier, infos: dict[str, ArchInfo], tokens_per_step: int,
              step_seconds: Callable[[str], float]) -> list[Arm]:
    """Every arm, in order: per budget, per seed, each architecture; then the dense model at each
    routed architecture's step count. `step_seconds(arch)` is only called for seconds budgets."""
    arms: list[Arm] = []
    active = [a for a, info in infos.items() if info.skip is None]
    measured: dict[str, float] = {}
    for budget in map(parse_budget, settings.budgets):
        steps: dict[str, int] = {}
        for arch in active:
            if budget.kind == "tokens":
                steps[arch] = math.ceil(budget.value / tokens_per_step)
            elif budget.kind == "flops":
                steps[arch] = math.floor(budget.value / (infos[arch].flops_per_token * tokens_per_step) + 1e-9)
            else:
                if arch not in measured:
                    measured[arch] = step_seconds(arch)
                steps[arch] = math.floor(budget.value / measured[arch] + 1e-9)
            if steps[arch] < 1:
                raise ConfigError(f"budget {budget.text} is less than one training step of '{arch}'",
                                  "raise the budget")
        for seed in settings.seeds:
            for arch in active:
                arms.append(Arm(f"{budget.kind}-{arch}-s{seed}", budget, arch, seed, steps[arch]))
            dense = tier.dense
            if budget.kind in tier.dense_at_routed_steps and dense in steps:
                for arch in active:
                    if infos[arch].routed and steps[arch] != steps[dense]:
                        arms.append(Arm(f"{budget.kind}-{dense}-at-{arch}-steps-s{seed}", budget, dense, seed,
                                        steps[arch], steps_of=arch))
    for arm in arms:
        arm.spec_sha256 = _sha({"run": _arm_run_config(settings, tier, arm.arch), "budget": arm.budget.text,
                                "seed": arm.seed, "steps_of": arm.steps_of, "arch": infos[arm.arch].config_sha256})
    return arms


# ---------------------------------------------------------------------------------------------
# One arm


class _BudgetClock:
    """Trainer callback: ends training at the first step past `seconds` of training time (the
    trainer's own clock, which a resumed run continues). Setting max_steps to the current step
    makes that step the last: the trainer validates, saves and returns as at a normal end."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.stopped_at: int | None = None

    def __call__(self, event: str, trainer: Trainer, info: dict[str, Any]) -> None:
        if event == "step" and self.seconds is not None and trainer.elapsed >= self.seconds \
                and trainer.step < trainer.cfg.max_steps:
            self.stopped_at = trainer.step
            trainer.cfg.max_steps = trainer.step


def _training_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over the logged intervals (validation and saving excluded) and the loss curve."""
    train = [r for r in records if r.get("event") == "train"]
    seconds, previous = 0.0, 0
    for r in train:
        if r.get("tokens_per_s"):
            seconds += (r["tokens"] - previous) / r["tokens_per_s"]
        previous = r["tokens"]
    curve = [[r["tokens"], r["elapsed_s"], r.get("train_bpb")] for r in train]
    return {"pure_train_seconds": seconds, "curve": curve,
            "tokens_per_s": train[-1]["tokens"] / seconds if train and seconds > 0 else None}


def _distinct_prompts(tokens: np.ndarray, rows: int, length: int, seed: int) -> torch.Tensor:
    """`rows` prompts of `length` tokens from different places of `tokens` (tiled when short)."""
    need = rows * length + 1
    if len(tokens) < need:
        tokens = np.tile(tokens, need // max(1, len(tokens)) + 1)
    starts = np.random.default_rng(seed).choice(len(tokens) - length, size=rows, replace=False)
    prompt = torch.as_tensor(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))
    if rows > 1 and all(torch.equal(prompt[0], prompt[i]) for i in range(1, rows)):
        raise ConfigError("the decode prompts are identical: the corpus is too repetitive")
    return prompt


def measure_decode(model: torch.nn.Module, tokens: np.ndarray, tier: ArenaTier, device: torch.device,
                   dtype: torch.dtype) -> list[dict[str, Any]]:
    """Decode speed and state bytes at each tier context (the state holds `context` tokens at the
    end), batch `decode_batch`, distinct prompts per row. A context beyond the model's positions
    or memory is reported with the reason instead of a figure."""
    limit = getattr(model.config, "max_position_embeddings", None)
    model = model.to(dtype=dtype).eval()
    rows = []
    for context in tier.decode_contexts:
        if limit is not None and context > limit:
            rows.append({"context": context, "skipped": f"beyond the model's {limit} positions"})
            continue
        prompt = _distinct_prompts(tokens, tier.decode_batch, context - tier.decode_tokens, context).to(device)
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            row = decode_speed(model, prompt, tier.decode_tokens, dtype)
            row.update(context=context, batch=tier.decode_batch)
            rows.append(row)
        except RuntimeError as e:  # out of memory (a subclass) or a kernel that refuses the length
            reason = "out of memory" if isinstance(e, torch.OutOfMemoryError) else str(e).splitlines()[0][:200]
            rows.append({"context": context, "skipped": reason})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _score(model: torch.nn.Module, tokenizer: Any, splits: dict[str, Any], tier: ArenaTier, seq_len: int,
           dtype: torch.dtype) -> dict[str, Any]:
    """Bits per byte on each split; routed models with the causal router, and on the first split
    also with top-k (the gap between the two is the point; one split shows it)."""
    out: dict[str, Any] = {}
    modes = ("causal", "topk") if hasattr(model, "set_routing") else (None,)
    for mode in modes:
        if mode is not None:
            model.set_routing(mode)
        for split in tier.eval_splits if mode != "topk" else tier.eval_splits[:1]:
            result = evaluate(model, tokenizer, splits, split=split, seq_len=seq_len, max_bytes=tier.eval_bytes,
                              dtype=dtype)
            out[split if mode in (None, "causal") else f"{split}_topk"] = result
    if modes[0] is not None:
        model.set_routing("auto")
    return out


def _routing(model: torch.nn.Module, splits: dict[str, Any], seq_len: int, capacity: float | None) -> dict[str, Any]:
    """The causal router (eval forwards) against top-k, on validation windows."""
    model.set_routing("causal")
    try:
        report = model.routing_report(splits["val"].tokens, seq_len)
    finally:
        model.set_routing("auto")
    agreement, share = report.get("route/causal_acc"), report.get("route/causal_frac")
    return {"capacity": capacity, "causal_share": share, "causal_agreement": agreement,
            "never_route_agreement": None if capacity is None else 1.0 - capacity,
            "windows": report.get("windows")}


def run_arm(arm: Arm, settings: Settings, tier: ArenaTier, info: ArchInfo, out_dir: Path, data: dict[str, Any],
            measure_extras: bool) -> dict[str, Any]:
    """Train one arm through the trainer, score it, and return its result (not yet written)."""
    runs = out_dir / "runs"
    run_dir = runs / arm.id
    budget_seconds = arm.budget.value if arm.budget.kind == "seconds" and arm.steps_of is None else None
    clock = _BudgetClock(budget_seconds)
    config = deep_merge(_arm_run_config(settings, tier, arm.arch), {
        "out_dir": str(runs), "run_name": arm.id,
        "train": {"seed": arm.seed, "max_steps": arm.steps, "sample_prompt": None, "plot": False,
                  "progress": False, "final_eval": []}})
    run = load_run_config(config)
    device = resolve_device(run.train.device)
    held = 0
    if device.type == "cuda":  # what the previous arm left (freed lazily) must not count as this arm's
        gc.collect()
        torch.cuda.empty_cache()
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    log_path = runs / f"{arm.id}.log"
    runs.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    resumable = (run_dir / "last").exists() and (run_dir / "config.yaml").is_file()
    if not resumable and run_dir.exists():
        shutil.rmtree(run_dir)  # an arm interrupted before its first checkpoint starts over
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if resumable:
            run_dir = train(resume=run_dir, callbacks=[clock])
        else:
            run_dir = train(config, callbacks=[clock])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak_memory = int(torch.cuda.max_memory_allocated(device)) - held if device.type == "cuda" else None

    summary = json.loads((run_dir / "eval.json").read_text())
    figures = _training_figures(read_metrics(run_dir))
    tokenizer, splits = _tokenizer_and_splits(run, data)
    model = load_checkpoint(run_dir / "last", device=device)
    dtype = resolve_dtype(run.train.dtype, device)
    seq_len = run.data.seq_len
    tokens_per_s = figures["tokens_per_s"]
    bytes_per_token = splits["train"].num_bytes / max(1, len(splits["train"].tokens))
    peak, _ = peak_flops(device, dtype)
    result: dict[str, Any] = {
        "id": arm.id, "status": "finished", "budget": arm.budget.text, "budget_kind": arm.budget.kind,
        "arch": arm.arch, "seed": arm.seed, "steps_of": arm.steps_of, "preset": info.preset,
        "planned_steps": arm.steps, "steps": summary["step"], "tokens": summary["tokens"],
        "stopped_by_clock_at": clock.stopped_at, "params": info.params, "flops_per_token": info.flops_per_token,
        "train_flops": info.flops_per_token * summary["tokens"], "train_seconds": summary["train_seconds"],
        "pure_train_seconds": figures["pure_train_seconds"], "cpu_seconds": cpu, "wall_seconds": wall,
        "train_tokens_per_s": tokens_per_s,
        "train_bytes_per_s": None if tokens_per_s is None else tokens_per_s * bytes_per_token,
        "mfu": None if tokens_per_s is None else mfu(tokens_per_s, info.flops_per_token, peak),
        "peak_memory_bytes": peak_memory, "config_sha256": info.config_sha256, "spec_sha256": arm.spec_sha256,
        "run_dir": str(run_dir), "curve": figures["curve"], "skipped_steps": summary.get("skipped_steps", 0),
    }
    result.update(_score(model, tokenizer, splits, tier, seq_len, dtype))
    if info.routed:
        result["routing"] = _routing(model, splits, seq_len, info.capacity)
    if measure_extras:  # speed and recall do not depend on the seed: measured once per architecture
        result["decode"] = measure_decode(model, splits["train"].tokens, tier, device, dtype)
        if tier.recall:  # needles planted in the validation split's text
            result["recall"] = recall_grid(model, tokenizer, splits["val"].texts(), **tier.recall)
    result["eval_seconds"] = time.perf_counter() - t0 - wall
    result["eval_cpu_seconds"] = time.process_time() - c0 - cpu
    return result


# ---------------------------------------------------------------------------------------------
# Aggregation and verdicts


def _spread(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values), "values": values}


def summarize_arms(arms: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{budget: {group: figures over seeds}}; group is the arch, or "<dense>@<arch> steps"."""
    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for a in arms:
        if a.get("status") != "finished":
            continue
        group = a["arch"] if a["steps_of"] is None else f"{a['arch']}@{a['steps_of']} steps"
        groups.setdefault(a["budget"], {}).setdefault(group, []).append(a)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for budget, by_group in groups.items():
        out[budget] = {}
        for group, members in by_group.items():
            entry: dict[str, Any] = {"arch": members[0]["arch"], "steps_of": members[0]["steps_of"],
                                     "seeds": [m["seed"] for m in members],
                                     "steps": _spread([float(m["steps"]) for m in members]),
                                     "tokens": _spread([float(m["tokens"]) for m in members]),
                                     "train_flops": _spread([float(m["train_flops"]) for m in members]),
                                     "train_seconds": _spread([m["train_seconds"] for m in members]),
                                     "cpu_seconds": _spread([m["cpu_seconds"] for m in members])}
            for key in ("train_tokens_per_s", "train_bytes_per_s", "mfu", "peak_memory_bytes"):
                values = [m[key] for m in members if m.get(key) is not None]
                entry[key] = _spread(values) if values else None
            for split in ("val", "test", "val_topk", "test_topk"):
                values = [m[split]["bpb"] for m in members if split in m]
                if values:
                    entry[f"{split}_bpb"] = _spread(values)
            routing = [m["routing"] for m in members if m.get("routing")]
            if routing:
                entry["routing"] = {key: statistics.fmean(r[key] for r in routing)
                                    for key in ("capacity", "causal_share", "causal_agreement",
                                                "never_route_agreement") if all(r.get(key) is not None
                                                                                for r in routing)}
            out[budget][group] = entry
    return out


def _pct(a: float, b: float) -> str:
    return f"{100 * (a - b) / b:+.2f}%"


def _separated(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Seed ranges that do not overlap: the only difference this report calls a difference."""
    return a["n"] > 1 and b["n"] > 1 and (a["max"] < b["min"] or b["max"] < a["min"])


def _compare_text(name: str, entry: dict[str, Any], dense_name: str, dense: dict[str, Any] | None) -> str:
    val = entry.get("val_bpb")
    if val is None:
        return ""
    text = f"val {val['mean']:.4f} bpb " + (f"(± {val['std']:.4f}, {val['n']} seeds)" if val["n"] > 1 else "(1 seed)")
    if dense is None or "val_bpb" not in dense or name == dense_name:
        return text
    d = dense["val_bpb"]
    if _separated(val, d):
        judged = "the seed ranges do not overlap"
    elif val["n"] > 1 and d["n"] > 1:
        judged = "within the seed spread: not a difference"
    else:
        judged = "one seed: no spread, not a difference"
    return f"{text} vs {dense_name} {d['mean']:.4f} ({_pct(val['mean'], d['mean'])}; {judged})"


def verdicts(summary: dict[str, dict[str, dict[str, Any]]], infos: dict[str, ArchInfo], arms: list[dict[str, Any]],
             dense_name: str) -> dict[str, str]:
    """One paragraph per architecture, every statement carrying its figure."""
    out: dict[str, str] = {}
    for arch, info in infos.items():
        if info.skip is not None:
            out[arch] = f"Not in this arena: {info.skip}."
            continue
        parts: list[str] = []
        dense_info = infos.get(dense_name)
        if arch != dense_name and dense_info is not None and dense_info.params:
            parts.append(f"{info.params / 1e6:.3f}M parameters ({_pct(info.params, dense_info.params)} vs "
                         f"{dense_name}), {info.flops_per_token / dense_info.flops_per_token:.3f}x its training "
                         f"FLOPs per token.")
        else:
            parts.append(f"{info.params / 1e6:.3f}M parameters, {info.flops_per_token / 1e6:.2f}M training FLOPs "
                         "per token.")
        for budget, groups in summary.items():
            entry = groups.get(arch)
            if entry is None:
                continue
            dense = groups.get(dense_name)
            sentence = f"At {budget} ({entry['steps']['mean']:.0f} steps, {entry['tokens']['mean']:,.0f} tokens): " \
                       f"{_compare_text(arch, entry, dense_name, dense)}"
            speed, dense_speed = entry.get("train_tokens_per_s"), (dense or {}).get("train_tokens_per_s")
            if speed and dense_speed and arch != dense_name:
                sentence += f"; training {speed['mean'] / dense_speed['mean']:.2f}x {dense_name}'s tokens/s"
            at_steps = groups.get(f"{dense_name}@{arch} steps")
            if at_steps is not None and "val_bpb" in at_steps and "val_bpb" in entry:
                same = at_steps["val_bpb"]["mean"]
                sentence += (f"; {dense_name} trained for the same {at_steps['steps']['mean']:.0f} steps reached "
                             f"{same:.4f} ({_pct(entry['val_bpb']['mean'], same)} for {arch})")
            if "val_topk_bpb" in entry and "val_bpb" in entry:
                sentence += (f"; top-k routing scores {entry['val_topk_bpb']['mean']:.4f} "
                             f"({_pct(entry['val_bpb']['mean'], entry['val_topk_bpb']['mean'])} for the causal router)")
            parts.append(sentence + ".")
        routing = next((g[arch]["routing"] for g in summary.values() if arch in g and g[arch].get("routing")), None)
        if routing and routing.get("causal_agreement") is not None and routing.get("capacity") is not None:
            parts.append(f"Its causal router routes {routing['causal_share']:.3f} of tokens (trained capacity "
                         f"{routing['capacity']:.3f}) and agrees with top-k on {routing['causal_agreement']:.3f} of "
                         f"them, against {routing['never_route_agreement']:.3f} for never routing.")
        decode = _decode_of(arms, arch)
        dense_decode = {d["context"]: d for d in _decode_of(arms, dense_name) if "decode_tokens_per_s" in d}
        measured = [d for d in decode if "decode_tokens_per_s" in d]
        if measured:
            d = measured[-1]
            text = (f"Decoding at {d['context']:,} tokens of context (batch {d.get('batch', '?')}): "
                    f"{d['decode_tokens_per_s']:,.1f} tokens/s with a {d['state_bytes'] / 2**20:.2f} MiB state")
            base = dense_decode.get(d["context"])
            if base is not None and arch != dense_name:
                text += (f", {d['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x {dense_name}'s speed and "
                         f"{d['state_bytes'] / max(1, base['state_bytes']):.2f}x its state")
            parts.append(text + ".")
        out[arch] = " ".join(parts)
    return out


def _decode_of(arms: list[dict[str, Any]], arch: str) -> list[dict[str, Any]]:
    for a in arms:
        if a.get("arch") == arch and a.get("steps_of") is None and a.get("decode"):
            return a["decode"]
    return []


# ---------------------------------------------------------------------------------------------
# The report


def machine_info(device: torch.device) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"device": device_name(device), "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "load_average": None if load is None else [round(v, 2) for v in load]}


def _fmt(entry: dict[str, Any] | None, key: str = "mean", fmt: str = "{:,.0f}") -> str:
    return "n/a" if not entry else fmt.format(entry[key])


def _bpb_cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{entry['mean']:.4f} ± {entry['std']:.4f}" if entry["n"] > 1 else f"{entry['mean']:.4f}"


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Arena: {report['tier']}", ""]
    if report["status"] != "complete":
        lines += [f"**Partial report** ({report['status']}): {report['arms_finished']} of {report['arms_planned']} "
                  f"arms finished. Resume with `{report['resume_command']}`.", ""]
    m = report["machine"]
    lines += [f"Machine: {m['device']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads, {m['platform']}; "
              f"torch {m['torch']}, Python {m['python']}; load average at start {m['load_average']}. "
              f"dynlm commit {report['commit']}. Started {report['started']}, updated {report['updated']}.", "",
              f"Data: corpus `{report['data']['corpus']}`, tokenizer `{report['data']['tokenizer']}`, "
              f"splits {report['data']['splits']} (by document), seq_len {report['data']['seq_len']}, "
              f"{report['data']['tokens_per_step']:,} tokens per step; every arm scored by the one evaluator in bits "
              f"per UTF-8 byte on {report['data']['eval_bytes_text']} of each split (sliding window, stride "
              f"seq_len/2). Seeds {report['seeds']}. Tier config sha256 {report['tier_sha256']}.", ""]
    lines += ["## Architectures", "",
              f"Parameter counts must be within {100 * report['param_tolerance']:.0f}% of `{report['dense']}`'s.", "",
              "| architecture | preset | params | vs dense | in tolerance | training FLOPs/token | routed capacity | "
              "config sha256 |", "|---|---|---|---|---|---|---|---|"]
    for arch, a in report["architectures"].items():
        if a["skip"]:
            lines.append(f"| {arch} | {a['preset']} | skipped: {a['skip']} | | | | | |")
            continue
        cap = "" if a["capacity"] is None else f"{a['capacity']:.3f}"
        delta = "" if a["param_delta"] is None else f"{100 * a['param_delta']:+.2f}%"
        lines.append(f"| {arch} | {a['preset']} | {a['params'] / 1e6:.3f}M | {delta} | "
                     f"{'yes' if a['within_tolerance'] else '**no**'} | {a['flops_per_token'] / 1e6:.2f}M | {cap} | "
                     f"{a['config_sha256']} |")
    lines.append("")
    summary = report["summary"]
    if summary:
        budgets = list(summary)
        lines += ["## Equal budgets side by side", "",
                  "Validation bits per byte (causal router for routed models), mean ± standard deviation over seeds; "
                  "a difference is called one only where the seed ranges do not overlap.", "",
                  "| architecture | " + " | ".join(budgets) + " |", "|---|" + "---|" * len(budgets)]
        groups = list(dict.fromkeys(g for b in budgets for g in summary[b]))
        for group in groups:
            cells = []
            for b in budgets:
                e = summary[b].get(group)
                cells.append("" if e is None else f"{_bpb_cell(e.get('val_bpb'))} ({e['steps']['mean']:.0f} steps)")
            lines.append(f"| {group} | " + " | ".join(cells) + " |")
        lines.append("")
        for budget, groups_of in summary.items():
            lines += [f"## Budget {budget}", "",
                      "| arm | seeds | steps | tokens | train FLOPs | train s | CPU s | tokens/s | bytes/s | MFU | "
                      "peak memory | val bpb | test bpb | val bpb top-k | routed share / capacity | "
                      "agreement / never-route |", "|---" * 16 + "|"]
            for group, e in groups_of.items():
                r = e.get("routing") or {}
                share = f"{r['causal_share']:.3f} / {r['capacity']:.3f}" if "causal_share" in r and "capacity" in r \
                    else ""
                agree = f"{r['causal_agreement']:.3f} / {r['never_route_agreement']:.3f}" \
                    if "causal_agreement" in r and "never_route_agreement" in r else ""
                memory = e.get("peak_memory_bytes")
                mem = "n/a (CPU)" if not memory else f"{memory['mean'] / 2**30:.2f} GiB"
                mfu_text = "n/a" if not e.get("mfu") else f"{100 * e['mfu']['mean']:.1f}%"
                lines.append(f"| {group} | {len(e['seeds'])} | {e['steps']['mean']:.0f} | {e['tokens']['mean']:,.0f} | "
                             f"{e['train_flops']['mean']:.3g} | {e['train_seconds']['mean']:.1f} | "
                             f"{e['cpu_seconds']['mean']:.1f} | {_fmt(e.get('train_tokens_per_s'))} | "
                             f"{_fmt(e.get('train_bytes_per_s'))} | {mfu_text} | {mem} | "
                             f"{_bpb_cell(e.get('val_bpb'))} | {_bpb_cell(e.get('test_bpb'))} | "
                             f"{_bpb_cell(e.get('val_topk_bpb'))} | {share} | {agree} |")
            lines.append("")
    decode_rows = [(a["arch"], d) for a in report["arms"] if a.get("decode") for d in a["decode"]]
    if decode_rows:
        lines += ["## Decoding", "",
                  f"Batch {report['decode']['batch']} with a different prompt per row (taken from the training "
                  f"split), {report['decode']['tokens']} greedy tokens; the context is the tokens in the state at the "
                  "end. Weights in the training dtype; routed models decode with the causal router.", "",
                  "| architecture | context | decode tokens/s | prefill tokens/s | state bytes |",
                  "|---|---|---|---|---|"]
        for arch, d in decode_rows:
            if "skipped" in d:
                lines.append(f"| {arch} | {d['context']:,} | not measured: {d['skipped']} | | |")
            else:
                lines.append(f"| {arch} | {d['context']:,} | {d['decode_tokens_per_s']:,.1f} | "
                             f"{d['prefill_tokens_per_s']:,.0f} | {d['state_bytes']:,} |")
        lines.append("")
    lines += ["## Recall", "", report["recall_note"], ""]
    recall = [(a["arch"], a["recall"]) for a in report["arms"] if a.get("recall")]
    for arch, grid in recall:
        depths = grid["depths"]
        lines += [f"{arch} (exact match of the greedy continuation, {grid['samples']} needles per cell; "
                  "without the needle in brackets):", "",
                  "| length | " + " | ".join(f"depth {d:g}" for d in depths) + " |",
                  "|---|" + "---|" * len(depths)]
        for length, row, base in zip(grid["lengths"], grid["accuracy"], grid["baseline_no_needle"] or
                                     [[None] * len(depths)] * len(grid["lengths"])):
            cells = ["not measured" if a is None else f"{a:.2f}" + ("" if b is None else f" ({b:.2f})")
                     for a, b in zip(row, base)]
            lines.append(f"| {length} | " + " | ".join(cells) + " |")
        lines.append("")
    if report["verdicts"]:
        lines += ["## Verdicts", ""]
        for arch, text in report["verdicts"].items():
            lines += [f"**{arch}.** {text}", ""]
    failed = [a for a in report["arms"] if a.get("status") == "failed"]
    if failed:
        lines += ["## Failed arms", ""] + [f"- `{a['id']}`: {a['error']}" for a in failed] + [""]
    if report["plots"]:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in report["plots"]] + [""]
    lines += ["Produced by `" + report["command"] + "`; per-arm results in `arms/`, training runs in `runs/`."]
    return "\n".join(lines) + "\n"


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """loss_vs_tokens.png, loss_vs_time.png, decode.png (needs matplotlib; none without it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    arms = [a for a in report["arms"] if a.get("status") == "finished" and a.get("curve")]
    budgets = list(dict.fromkeys(a["budget"] for a in arms))
    groups = list(dict.fromkeys(a["arch"] if a["steps_of"] is None else f"{a['arch']}@{a['steps_of']}" for a in arms))
    colors = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    written = []
    for name, column, label in (("loss_vs_tokens", 0, "training tokens"), ("loss_vs_time", 1, "training seconds")):
        if not budgets:
            break
        fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4), dpi=100, squeeze=False)
        for ax, budget in zip(axes[0], budgets):
            seen = set()
            for a in arms:
                if a["budget"] != budget:
                    continue
                group = a["arch"] if a["steps_of"] is None else f"{a['arch']}@{a['steps_of']}"
                points = [(p[column], p[2]) for p in a["curve"] if p[2] is not None]
                if points:
                    ax.plot(*zip(*points), color=colors[group], linewidth=1, alpha=0.8,
                            label=None if group in seen else group)
                    seen.add(group)
            ax.set_title(budget)
            ax.set_xlabel(label)
            ax.set_ylabel("training loss (bits per byte)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        written.append(f"{name}.png")
    decode = [(a["arch"], [d for d in a["decode"] if "decode_tokens_per_s" in d]) for a in report["arms"]
              if a.get("decode")]
    decode = [(arch, rows) for arch, rows in decode if rows]
    if decode:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
        for arch, rows in decode:
            contexts = [d["context"] for d in rows]
            left.plot(contexts, [d["decode_tokens_per_s"] for d in rows], "o-", label=arch)
            right.plot(contexts, [d["state_bytes"] / 2**20 for d in rows], "o-", label=arch)
        for ax, ylabel in ((left, "decode tokens/s"), (right, "state MiB")):
            ax.set_xscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "decode.png")
        plt.close(fig)
        written.append("decode.png")
    return written


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ---------------------------------------------------------------------------------------------
# The whole arena


@dataclass
class ArenaState:
    """Everything the report is built from; rebuilt and written after each arm."""

    name: str
    settings: Settings
    tier: ArenaTier
    infos: dict[str, ArchInfo]
    arms: list[Arm]
    results: dict[str, dict[str, Any]]
    out_dir: Path
    run: RunConfig
    device: torch.device
    started: str
    command: str
    machine: dict[str, Any]
    commit: str | None


def build_report(state: ArenaState, status: str, plots: list[str] | None = None) -> dict[str, Any]:
    tier, infos = state.tier, state.infos
    dense = infos.get(tier.dense)
    architectures: dict[str, Any] = {}
    for arch, info in infos.items():
        delta = (info.params - dense.params) / dense.params if dense is not None and dense.params and \
            info.skip is None else None
        architectures[arch] = {**dataclasses.asdict(info), "param_delta": delta,
                               "within_tolerance": delta is None or abs(delta) <= tier.param_tolerance}
    arms = [state.results[a.id] for a in state.arms if a.id in state.results]
    summary = summarize_arms(arms)
    recall_note = ("Needle recall from `dynlm.eval.recall` on the validation split's text (one arm per "
                   "architecture; lengths in each model's tokens)." if tier.recall else
                   "This tier asks for no recall grid (`recall:` in the tier YAML).")
    data = state.run.data
    return {
        "schema": SCHEMA, "tier": state.name, "tier_config": dataclasses.asdict(tier),
        "tier_sha256": _sha(dataclasses.asdict(tier)), "status": status,
        "arms_planned": len(state.arms), "arms_finished": sum(r.get("status") == "finished" for r in arms),
        "resume_command": f"dynlm arena {state.name} --resume {state.out_dir}",
        "command": state.command, "machine": state.machine, "torch": torch.__version__, "commit": state.commit,
        "started": state.started, "updated": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": {"corpus": data.corpus, "tokenizer": data.tokenizer, "splits": list(data.splits),
                 "seq_len": data.seq_len, "tokens_per_step": data.seq_len * state.run.train.batch_size,
                 "eval_bytes": tier.eval_bytes,
                 "eval_bytes_text": "all" if tier.eval_bytes is None else f"{tier.eval_bytes:,} bytes"},
        "budgets": state.settings.budgets, "seeds": state.settings.seeds, "dense": tier.dense,
        "param_tolerance": tier.param_tolerance, "decode": {"batch": tier.decode_batch, "tokens": tier.decode_tokens,
                                                            "contexts": tier.decode_contexts},
        "architectures": architectures,
        "plan": [{"id": a.id, "budget": a.budget.text, "arch": a.arch, "seed": a.seed, "steps": a.steps,
                  "steps_of": a.steps_of, "spec_sha256": a.spec_sha256} for a in state.arms],
        "arms": arms, "summary": summary, "verdicts": verdicts(summary, infos, arms, tier.dense),
        "recall_note": recall_note, "plots": plots or [],
    }


def write_report(state: ArenaState, status: str, plots: bool) -> dict[str, Any]:
    report = build_report(state, status)
    if plots:
        report["plots"] = write_plots(report, state.out_dir)
    _write_json(state.out_dir / "report.json", report)
    (state.out_dir / "report.md").write_text(to_markdown(report))
    return report


def _prepare_out_dir(out_dir: Path, resume: bool, force: bool) -> None:
    if resume:
        if not (out_dir / "settings.json").is_file():
            raise CheckpointError(f"{out_dir}: not an arena folder (no settings.json) to resume")
        return
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise OutputExistsError(f"{out_dir} is not empty", "use --resume to continue it or --force to start over")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def _settings_for(out_dir: Path, resume: bool, tier: str | Path | dict[str, Any] | None,
                  budgets: Sequence[str] | None, seeds: Sequence[int] | None, archs: Sequence[str] | None,
                  run_overrides: Sequence[str]) -> tuple[str, ArenaTier, Settings]:
    saved = json.loads((out_dir / "settings.json").read_text()) if resume else None
    if saved is not None:
        if tier is not None and str(tier) != saved["tier"]:
            raise ConfigError(f"{out_dir} ran tier '{saved['tier']}', not '{tier}'")
        name, tier_obj, raw = load_tier({"name": saved["tier"], **saved["tier_config"]})
    else:
        if tier is None:
            raise ConfigError("give a tier (e.g. quick) or --resume DIR")
        name, tier_obj, raw = load_tier(tier)
    settings = Settings(
        tier=name, tier_config=raw,
        budgets=list(budgets) if budgets else (saved["budgets"] if saved else list(tier_obj.budgets)),
        seeds=[int(s) for s in seeds] if seeds else (saved["seeds"] if saved else list(tier_obj.seeds)),
        archs=list(archs) if archs else (saved["archs"] if saved else None),
        run_overrides=list(run_overrides) if run_overrides else (saved["run_overrides"] if saved else []))
    for budget in settings.budgets:
        parse_budget(budget)
    if len(set(settings.seeds)) != len(settings.seeds) or not settings.seeds:
        raise ConfigError(f"seeds must be distinct and at least one, got {settings.seeds}")
    return name, tier_obj, settings


def run_arena(tier: str | Path | dict[str, Any] | None, out_dir: str | Path, *, budgets: Sequence[str] | None = None,
              seeds: Sequence[int] | None = None, archs: Sequence[str] | None = None,
              run_overrides: Sequence[str] = (), resume: bool = False, force: bool = False,
              progress: bool = True, command: str = "") -> dict[str, Any]:
    """Run (or resume) an arena into `out_dir` and return the report (also in report.json/.md).

    `run_overrides` change the shared run config of every arm (e.g. ["data.corpus=./texts/"]).
    On Ctrl-C the finished arms' report is written (status "interrupted") before the
    KeyboardInterrupt propagates; an arm that raises is recorded as failed and the others go on."""
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, resume, force)
    name, tier_obj, settings = _settings_for(out_dir, resume, tier, budgets, seeds, archs, run_overrides)
    _write_json(out_dir / "settings.json", dataclasses.asdict(settings))
    (out_dir / "arms").mkdir(exist_ok=True)

    data: dict[str, Any] = {}
    shared = load_run_config(_arm_run_config(settings, tier_obj, tier_obj.dense if tier_obj.dense in
                                             list_architectures() else "standard"))
    device = resolve_device(shared.train.device)
    infos = describe_architectures(settings, tier_obj, data)
    if not any(info.skip is None for info in infos.values()):
        raise ConfigError(f"no architecture has a '{tier_obj.preset_suffix}' preset for this tier",
                          "; ".join(f"{a}: {i.skip}" for a, i in infos.items()))
    tokens_per_step = shared.data.seq_len * shared.train.batch_size
    saved_plan = json.loads((out_dir / "plan.json").read_text()) if resume and (out_dir / "plan.json").is_file() else {}

    def step_seconds(arch: str) -> float:
        planned = [p for p in saved_plan.values() if p["arch"] == arch and p["budget"].startswith("seconds=")]
        if planned and "step_seconds" in planned[0]:
            return planned[0]["step_seconds"]  # a resumed arena keeps its calibrated step counts
        return calibrate_step_seconds(settings, tier_obj, arch, data)

    calibrated: dict[str, float] = {}

    def remembered(arch: str) -> float:
        calibrated[arch] = step_seconds(arch)
        return calibrated[arch]

    arms = plan_arms(settings, tier_obj, infos, tokens_per_step, remembered)
    _write_json(out_dir / "plan.json", {a.id: {"arch": a.arch, "budget": a.budget.text, "seed": a.seed,
                                               "steps": a.steps, "spec_sha256": a.spec_sha256,
                                               **({"step_seconds": calibrated[a.arch]} if a.arch in calibrated
                                                  and a.budget.kind == "seconds" else {})} for a in arms})
    results: dict[str, dict[str, Any]] = {}
    for arm in arms:
        path = out_dir / "arms" / f"{arm.id}.json"
        if resume and path.is_file():
            previous = json.loads(path.read_text())
            if previous.get("status") == "finished" and previous.get("spec_sha256") == arm.spec_sha256:
                results[arm.id] = previous
            elif previous.get("status") == "finished":
                raise ConfigError(f"arm {arm.id} in {out_dir} was trained with other settings",
                                  "start a new arena folder or use --force")
    state = ArenaState(name, settings, tier_obj, infos, arms, results, out_dir, shared, device,
                       time.strftime("%Y-%m-%d %H:%M:%S"), command or f"dynlm arena {name}",
                       machine_info(device), source_commit())
    extras_done = {results[a.id]["arch"] for a in arms if a.id in results and results[a.id].get("decode")}
    write_report(state, "running", plots=False)
    bar = tqdm(total=len(arms), initial=len(results), unit="arm", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    current: str | None = None
    try:
        for arm in arms:
            if arm.id in results:
                continue
            current = arm.id
            bar.set_description(arm.id)
            extras = arm.arch not in extras_done and arm.steps_of is None
            try:
                result = run_arm(arm, settings, tier_obj, infos[arm.arch], out_dir, data, extras)
            except (DynlmError, RuntimeError, ValueError) as e:
                result = {"id": arm.id, "status": "failed", "budget": arm.budget.text, "arch": arm.arch,
                          "seed": arm.seed, "steps_of": arm.steps_of, "spec_sha256": arm.spec_sha256,
                          "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                          "log": str(out_dir / "runs" / f"{arm.id}.log")}
            if result.get("decode"):
                extras_done.add(arm.arch)
            results[arm.id] = result
            _write_json(out_dir / "arms" / f"{arm.id}.json", result)
            write_report(state, "running", plots=False)
            bar.update(1)
            current = None
    except KeyboardInterrupt:
        bar.close()
        state.machine["interrupted_arm"] = current
        write_report(state, "interrupted", plots=True)
        print(f"interrupted during {current}; partial report: {out_dir / 'report.md'}; resume with "
              f"`dynlm arena {name} --resume {out_dir}`", file=sys.stderr)
        raise
    bar.close()
    failed = any(r.get("status") == "failed" for r in results.values())
    return write_report(state, "complete" if not failed else "complete with failed arms", plots=True)


def calibrate_step_seconds(settings: Settings, tier: ArenaTier, arch: str, data: dict[str, Any]) -> float:
    """Seconds per training step of an architecture on this machine: the trainer's own step
    (TrainStep) timed by the benchmark over `calibration_steps` steps after 2 untimed ones."""
    run = load_run_config(_arm_run_config(settings, tier, arch))
    tokenizer = _tokenizer_and_splits(run, data)[0]
    config = resolve_model_config(run, tokenizer.vocab_size)
    fields = {k: v for k, v in config.to_dict().items() if k != "type"}
    bench = BenchConfig(model=preset_of(tier, arch), overrides=fields, seq_len=run.data.seq_len,
                        batch=run.train.batch_size, steps=tier.calibration_steps, warmup=2, forward=False,
                        device=run.train.device, dtype=run.train.dtype, compile=run.train.compile)
    device = resolve_device(bench.device)
    result = bench_train(bench, device, resolve_dtype(bench.dtype, device))
    return result["step_ms"] / 1000.0
