"""Standard vs MoD vs DTF at equal size (the gpt2-small-like body), measured in one run.

    # once, on a machine that can fetch the corpus: the byte-tokenized Shakespeare shards
    python benchmarks/gpu_routed.py --export-data .gpu/routed/shakespeare-bytes
    # on the GPU (bf16 autocast); writes gpu_routed.json and gpu_routed.md into --out
    python benchmarks/gpu_routed.py --out OUT --data .gpu/routed/shakespeare-bytes
    # CPU check of the whole script in a minute, tiny shapes
    python benchmarks/gpu_routed.py --out /tmp/smoke --smoke

Parts (`--parts`, in this order; default all but decode):
- speed: at the preset's 50k vocabulary, seq 1024, the trainer's training step
  (`dynlm.train.trainer.TrainStep`: forward + backward + clipping + fused AdamW), the model
  compiled as the trainer compiles it (`--compile-mode`, `--no-compile` for eager; top-k routing
  has static k, so a routed model compiles to one graph), optionally with the chunked loss
  (`--fused-loss`): step time relative to dense, peak memory, FLOPs per token as credited;
- profile: one profiled compiled step per variant: the GPU's busy time (kernels, copies) and the
  number of kernels, against the step's wall time; busy time well under the wall time means the
  step waits on the host (kernel launches), not on the GPU;
- forward: forward-only time in both routing modes (eager);
- pieces: forward+backward time of one dense layer, one routed layer (or DTF pair) and the LM
  head with the loss, eager, on the GPU (CUDA events) and on the host (time to issue the work):
  where the two agree the piece is bound by the host, not the GPU;
- train: Shakespeare (bytes, so the body dominates) at EQUAL TRAINING FLOPs: the dense model
  trains `--steps` steps, every other arm as many steps as give the same FLOPs; the same batch
  windows for every arm, one or more seeds; each arm's steps, training FLOPs and wall time with
  its validation bits per byte under top-k routing and under the causal router (what generation
  runs), and the causal router's agreement with top-k (`--equal-steps` adds arms at the dense
  model's step count);
- decode: decoding (greedy, KV cache, causal router) with the trained models: tokens/s at batch
  1 and 8, and the share of decoded tokens each routed layer processed.

Variants (`--variants`): standard; mod (every other layer routed, capacity 0.125); dtf
(decision/dynamic pairs, capacity 0.125); mod-all (every layer but the first routed). Time limits
count from the start of their part: `--speed-time-limit` (a speed variant starts only when the
longest one so far would still end inside it) and `--train-time-limit` (training arms not started
by then are recorded as skipped). Results are written after every variant and arm; a variant or
arm that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

import dynlm
from dynlm.config import model_config
from dynlm.data.shards import load_prepared, prepare_corpus, shard_directory
from dynlm.data.tokenizers import load_tokenizer
from dynlm.eval.evaluate import evaluate
from dynlm.models.base import causal_lm_loss
from dynlm.train.config import COMPILE_MODES
from dynlm.train.optim import parameter_groups, set_learning_rate
from dynlm.train.trainer import TrainStep

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s by datasheet (H100 SXM)
PARTS = ("speed", "profile", "forward", "pieces", "train", "decode")


def variants(num_layers: int) -> dict[str, dict[str, Any]]:
    """Model-config overrides of each variant, on top of the body preset."""
    return {
        "standard": {"type": "standard"},
        "mod": {"type": "mod", "mod_capacity": 0.125},
        "dtf": {"type": "dtf", "dtf_capacity": 0.125},
        "mod-all": {"type": "mod", "mod_capacity": 0.125, "routed_layers": list(range(1, num_layers))},
    }


class Bench:
    def __init__(self, device: torch.device, smoke: bool):
        self.device = device
        self.smoke = smoke
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.warmup, self.iters = (1, 2) if smoke else (3, 10)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn: Callable[[], Any], warmup: int | None = None, iters: int | None = None) -> float:
        """Median wall time of fn in ms (CUDA events on the GPU)."""
        for _ in range(self.warmup if warmup is None else warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.iters if iters is None else iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def host_ms(self, fn: Callable[[], Any]) -> float:
        """Median time the host takes to issue fn's work, in ms, starting from an idle device: when
        it is about the device time, the device waited on the host."""
        times = []
        for _ in range(self.iters):
            self.sync()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        self.sync()
        return statistics.median(times)

    def device_busy(self, fn: Callable[[], Any], calls: int = 2) -> dict[str, Any]:
        """Profile `calls` calls of fn: per call, the time the device spent in kernels and copies,
        the number of kernels, and the kernels that took longest (their names cut short)."""
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        fn()
        self.sync()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
            self.sync()
        events = prof.events()
        device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
        graph_launches = sum(1 for e in events if e.name == "cudaGraphLaunch") / calls
        by_name: Counter[str] = Counter()
        for e in device_events:
            by_name[e.name[:90]] += e.time_range.elapsed_us() / 1e3 / calls
        if self.device.type != "cuda":  # the CPU run only checks that this code works
            return {"device_busy_ms": None, "kernels_per_call": None, "top_kernels_ms": {}}
        return {"device_busy_ms": sum(by_name.values()), "cuda_graph_launches_per_call": graph_launches,
                "kernels_per_call": sum(1 for e in device_events if not e.name.startswith(("Memcpy", "Memset")))
                / calls,
                "top_kernels_ms": {name: ms for name, ms in by_name.most_common(8)}}

    def build(self, body: dict[str, Any], variant: dict[str, Any], seed: int = 0) -> dynlm.models.base.DynModel:
        torch.manual_seed(seed)
        return dynlm.build_model({**body, **variant}).to(self.device)

    def optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
        return torch.optim.AdamW(parameter_groups(model, 0.1), lr=lr, betas=(0.9, 0.95),
                                 fused=self.device.type == "cuda" or None)

    def trainer_step(self, model, optimizer, compile_model: bool, mode: str = "default") -> TrainStep:
        """The trainer's own step (clipping at 1.0, device-side NaN guard, fused AdamW), the model
        compiled as the trainer compiles it (`train.compile_mode` = mode)."""
        runner = torch.compile(model, mode=mode) if compile_model else model
        return TrainStep(runner, model, optimizer, self.device, self.dtype, clip=1.0)

    def peak_memory(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def reset_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)


# ---------------------------------------------------------------------------------------------
# 1. speed


def layer_units(model, h: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Pieces of one training forward whose fwd+bwd is timed alone: {name: fn -> tensors to
    backpropagate}. Per decoder layer kind, plus the LM head with the loss."""
    t = h.shape[1]
    cos, sin = model.rotary(torch.arange(t, device=h.device), h.dtype)
    units: dict[str, Callable[[], list[torch.Tensor]]] = {}
    arch = model.architecture
    units["dense layer"] = lambda: [model.model.layers[0](h, cos, sin)]
    if arch == "mod":
        routed = model.routed_layers[0]

        def routed_layer() -> list[torch.Tensor]:
            y, stats = model.layer_forward(routed, h, cos, sin, None)
            return [y, model.routing_extras({routed: stats}, 1.0)["aux_loss"]]

        units["routed layer (router + top-k + block on k + scatter + statistics)"] = routed_layer
    elif arch == "dtf":
        units["dense layer"] = lambda: [model.model.layers[0](h, cos, sin)]

        def pair() -> list[torch.Tensor]:
            y, prior_loss, stats, _ = model.pair_forward(0, h, cos, sin, None)
            return [y, prior_loss, model.routing_extras({1: stats}, 1.0)["aux_loss"]]

        units["decision + dynamic pair (dense + prior + gate + routed + statistics)"] = pair
    units["final norm + LM head + loss"] = lambda: [causal_lm_loss(model.lm_head(model.model.norm(h)), labels)]
    return units


def time_units(bench: Bench, model, batch: int, seq: int) -> dict[str, dict[str, float]]:
    c = model.config
    h = torch.randn(batch, seq, c.hidden_size, device=bench.device, requires_grad=True)
    labels = torch.randint(0, c.vocab_size, (batch, seq), device=bench.device)
    model.train()
    out: dict[str, dict[str, float]] = {}
    for name, unit in layer_units(model, h, labels).items():
        def fwd_bwd(unit=unit) -> None:
            with bench.autocast():
                tensors = unit()
            grads = [torch.randn_like(t) if t.dim() else torch.ones_like(t) for t in tensors]
            torch.autograd.backward(tensors, grads)
            model.zero_grad(set_to_none=True)
            h.grad = None

        out[name] = {"device_ms": bench.time_ms(fwd_bwd), "host_ms": bench.host_ms(fwd_bwd)}
    return out


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def measure_step(bench: Bench, model, x: torch.Tensor, compile_model: bool, mode: str, fused_loss: bool,
                 profile: bool) -> dict[str, Any]:
    """The trainer's step on x, compiled in `mode`: first-step seconds (the compile), median step
    time, peak memory, throughput; with `profile`, the GPU's busy time in one step."""
    batch, seq = x.shape
    flops = model.flops_per_token(seq)
    model.fused_loss = fused_loss
    optimizer = bench.optimizer(model, 1e-4)
    model.train()
    try:
        step = bench.trainer_step(model, optimizer, compile_model, mode)
        t0 = time.perf_counter()
        step([x])  # compiles when compiled
        bench.sync()
        out: dict[str, Any] = {"first_step_seconds": time.perf_counter() - t0}
        bench.reset_memory()
        step_ms = bench.time_ms(lambda: step([x]))
        out.update(train_step_ms=step_ms, train_peak_memory_bytes=bench.peak_memory(),
                   train_tokens_per_s=batch * seq / step_ms * 1e3,
                   model_tflops_per_s=flops * batch * seq / step_ms / 1e9,
                   mfu_vs_h100_datasheet=flops * batch * seq / (step_ms / 1e3) / H100_BF16_PEAK)
        if profile:
            busy = bench.device_busy(lambda: step([x]))
            share = None if busy["device_busy_ms"] is None else busy["device_busy_ms"] / step_ms
            out["step_profile"] = busy | {"device_busy_share": share}
        return out
    finally:
        model.zero_grad(set_to_none=True)
        model.fused_loss = False
        torch._dynamo.reset()


def measure_speed(bench: Bench, model, x: torch.Tensor, compile_model: bool, mode: str, fused_loss: bool,
                  parts: list[str]) -> dict[str, Any]:
    """One variant's speed figures for the speed-section parts asked for; a part that fails is
    recorded under "errors" and the others still run."""
    batch, seq = x.shape
    fractions = model.processed_fractions(seq) if hasattr(model, "processed_fractions") else None
    result: dict[str, Any] = {"parameters": model.num_parameters(), "flops_per_token": model.flops_per_token(seq),
                              "processed_fractions": fractions or [1.0] * model.config.num_layers}
    errors: dict[str, str] = {}
    if "speed" in parts or "profile" in parts:
        try:
            result.update(measure_step(bench, model, x, compile_model, mode, fused_loss, "profile" in parts))
        except Exception as error:  # noqa: BLE001 - recorded, the other parts still run
            errors["speed"] = error_text(error)
    if "forward" in parts:
        try:
            with torch.no_grad(), bench.autocast():  # eager: switching a compiled model's mode would recompile it
                model.train()  # top-k routing, static shapes: the compute a routed model saves
                result["forward_topk_ms"] = bench.time_ms(lambda: model(x))
                model.eval()  # causal router over a whole sequence: every token computed, skipped ones masked
                result["forward_causal_ms"] = bench.time_ms(lambda: model(x))
        except Exception as error:  # noqa: BLE001
            errors["forward"] = error_text(error)
    if "pieces" in parts:
        try:
            result["layer_fwd_bwd_ms"] = time_units(bench, model, batch, seq)
        except Exception as error:  # noqa: BLE001
            errors["pieces"] = error_text(error)
    if errors:
        result["errors"] = errors
    return result


def speed_section(bench: Bench, body: dict[str, Any], names: list[str], batch: int, seq: int,
                  compile_model: bool, mode: str, fused_loss: bool, parts: list[str], time_limit: float,
                  save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Every variant's speed figures; a variant starts only if the longest variant so far would
    still end within `time_limit` seconds of the section's start."""
    x = torch.randint(0, body["vocab_size"], (batch, seq), device=bench.device)
    results: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    start, longest = time.perf_counter(), 0.0
    for name in names:
        if time.perf_counter() - start + longest > time_limit:
            skipped[name] = (f"skipped: would end past its time limit ({time_limit:.0f} s) "
                             f"(the longest variant so far took {longest:.0f} s)")
            continue
        print(f"  speed {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            model = bench.build(body, variants(body["num_layers"])[name])
            results[name] = measure_speed(bench, model, x, compile_model, mode, fused_loss, parts)
            results[name]["seconds"] = time.perf_counter() - t0
        except Exception as error:  # noqa: BLE001 - one variant's failure is recorded, the run goes on
            skipped[name] = error_text(error)
        longest = max(longest, time.perf_counter() - t0)
        model = None
        torch._dynamo.reset()
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        save(with_ratios(results, skipped))
    return with_ratios(results, skipped)


def with_ratios(results: dict[str, Any], skipped: dict[str, str]) -> dict[str, Any]:
    """Each variant's step time, FLOPs and top-k forward time relative to the dense model's."""
    dense = results.get("standard", {})
    for r in results.values():
        for key, value in (("step_time_ratio", "train_step_ms"), ("flops_ratio", "flops_per_token"),
                           ("forward_topk_ratio", "forward_topk_ms")):
            if value in r and value in dense:
                r[key] = r[value] / dense[value]

    return {**results, **({"skipped": skipped} if skipped else {})}


# ---------------------------------------------------------------------------------------------
# 2. training comparison


def cosine_lr(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_starts(num_tokens: int, seq: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """The same random windows for every model: [steps, batch] start offsets."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_tokens - seq, size=(steps, batch))


def train_model(bench: Bench, model, train_tokens: torch.Tensor, starts: np.ndarray, seq: int, lr: float,
                log_every: int, compile_model: bool) -> dict[str, Any]:
    """`len(starts)` steps of the trainer's step on the given windows, cosine schedule."""
    optimizer = bench.optimizer(model, lr)
    step_fn = bench.trainer_step(model, optimizer, compile_model)
    offsets = torch.arange(seq, device=bench.device)
    steps = len(starts)
    curve, metrics = [], {}
    model.train()
    bench.sync()
    t0 = time.perf_counter()
    for step in range(steps):
        set_learning_rate(optimizer, cosine_lr(step, steps, lr, max(1, steps // 10)))
        index = torch.as_tensor(starts[step], device=bench.device)[:, None] + offsets  # [B, T]
        out = step_fn([train_tokens[index]])
        if step % log_every == 0 or step == steps - 1:
            curve.append([step, out.loss.item()])
            metrics = out.metrics
    bench.sync()
    seconds = time.perf_counter() - t0
    return {"steps": steps, "seconds": seconds, "ms_per_step": seconds / steps * 1e3,
            "tokens_per_s": steps * starts.shape[1] * seq / seconds, "loss_curve": curve,
            "final_train_metrics": {key: float(value) for key, value in metrics.items()}}


def evaluate_modes(bench: Bench, model, tokenizer, splits, seq: int, max_bytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    modes = ["causal", "topk"] if hasattr(model, "set_routing") else ["dense"]
    for mode in modes:
        if mode != "dense":
            model.set_routing(mode)
        result = evaluate(model, tokenizer, splits, split="val", seq_len=seq, max_bytes=max_bytes,
                          dtype=bench.dtype, batch_size=8)
        out[f"val_bpb_{mode}"] = result["bpb"]
    if hasattr(model, "set_routing"):
        model.set_routing("auto")
        # causal-router agreement with top-k and the share it routes, on validation windows
        val = torch.as_tensor(np.asarray(splits["val"].tokens[: 8 * seq], dtype=np.int64), device=bench.device)
        model.eval()
        with torch.no_grad(), bench.autocast():
            metrics = model(val.view(8, seq)).metrics
        out["causal_router_agreement"] = float(metrics["route/causal_acc"])
        out["causal_router_fraction_routed"] = float(metrics["route/causal_frac"])
    out["val_bytes"] = result["num_bytes"]
    return out


# ---------------------------------------------------------------------------------------------
# 3. decoding


@torch.no_grad()
def decode_speed(bench: Bench, model, prompt: torch.Tensor, new_tokens: int) -> dict[str, Any]:
    """Greedy decoding with the KV cache (prefill, then one token per step), as the generation
    engine runs it; tokens/s counts generated tokens over the whole call."""
    model.eval()
    b = prompt.shape[0]
    last_state = {}

    def run() -> None:
        state = model.init_state(b, device=bench.device, max_length=prompt.shape[1] + new_tokens)
        with bench.autocast():
            logits = model(prompt, state=state).logits
            for _ in range(new_tokens):
                logits = model(logits[:, -1:].argmax(-1), state=state).logits
        last_state["state"] = state

    ms = bench.time_ms(run, warmup=1, iters=1 if bench.smoke else 3)
    out: dict[str, Any] = {"batch": b, "new_tokens": new_tokens, "ms": ms, "tokens_per_s": b * new_tokens / ms * 1e3}
    if hasattr(model, "routed_layers"):
        state, start = last_state["state"], prompt.shape[1]
        end = start + new_tokens
        out["decode_fraction_routed"] = statistics.mean(
            float(state.layers[i].valid[:, start:end].float().mean()) for i in model.routed_layers)
    return out


# ---------------------------------------------------------------------------------------------


def export_data(target: Path) -> None:
    tokenizer = load_tokenizer("bytes")
    prepare_corpus("shakespeare", tokenizer)
    from dynlm.data.corpora import get_corpus

    source = shard_directory(get_corpus("shakespeare"), tokenizer)
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    print(f"copied {source} -> {target}")


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["config"]
    lines = [f"# Standard vs MoD vs DTF: {env['device']}", "",
             f"torch {env['torch']}, commit `{env['commit']}`, {cfg['dtype']}, body `{cfg['body_preset']}`, "
             f"seq {cfg['seq']}, batch {cfg['batch']}, compile={cfg['compile']}, fused loss={cfg['fused_loss']}. "
             "Produced by `benchmarks/gpu_routed.py`; training steps are the trainer's `TrainStep`.", ""]
    speed = {k: v for k, v in report.get("speed", {}).items() if k != "skipped"}
    if speed:
        lines += [f"## Speed (vocab {cfg['speed_vocab']}, compile mode {cfg['compile_mode']})", "",
                  "| model | params | FLOPs/token | FLOPs ratio | train step ms | step time ratio | tokens/s | MFU | "
                  "peak memory | first step s | GPU busy ms | kernels | fwd top-k ms | fwd causal ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in speed.items():
            profile = r.get("step_profile", {})
            cells = [f"{r['parameters'] / 1e6:.1f}M", f"{r['flops_per_token'] / 1e9:.3f} G",
                     number(r.get("flops_ratio"), ".3f"), number(r.get("train_step_ms"), ".1f"),
                     number(r.get("step_time_ratio"), ".3f"), number(r.get("train_tokens_per_s"), ",.0f"),
                     number(r.get("mfu_vs_h100_datasheet"), ".1%"), gib(r.get("train_peak_memory_bytes")),
                     number(r.get("first_step_seconds"), ".0f"), number(profile.get("device_busy_ms"), ".1f"),
                     number(profile.get("kernels_per_call"), ".0f"), number(r.get("forward_topk_ms"), ".1f"),
                     number(r.get("forward_causal_ms"), ".1f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "MFU = tokens/s x FLOPs/token (each model credited only for the tokens its layers process) "
                  "/ 989 TFLOP/s. GPU busy = time the GPU spent in kernels and copies in one profiled step "
                  "(kernels: launched in that step); a step whose GPU busy time is well under its step time "
                  "waits on the host. Forward-only times are eager, with the dtype's autocast.", ""]
        pieces = {name: r["layer_fwd_bwd_ms"] for name, r in speed.items() if "layer_fwd_bwd_ms" in r}
        if pieces:
            lines += ["Per-piece forward+backward time, eager, the same batch: GPU ms (CUDA events) / host ms "
                      "(time to issue the work; about equal: the piece waits on the host):", ""]
            for name, units in pieces.items():
                text = ", ".join(f"{k}: {v['device_ms']:.2f} / {v['host_ms']:.2f}" for k, v in units.items())
                lines.append(f"- **{name}**: {text}")
        for name, r in speed.items():
            for part, why in r.get("errors", {}).items():
                lines.append(f"- {name}, {part}: {why}")
            top = r.get("step_profile", {}).get("top_kernels_ms")
            if top:
                lines.append(f"- {name}, longest kernels in a step (ms): "
                             + "; ".join(f"`{k}` {v:.2f}" for k, v in top.items()))
    for name, why in report.get("speed", {}).get("skipped", {}).items():
        lines.append(f"- speed {name}: {why}")
    graphs = {k: v for k, v in report.get("speed_cuda_graphs", {}).items() if k != "skipped"}
    if graphs:
        how = "compile mode `reduce-overhead`" if cfg["compile"] else "eager: a check of the code path only"
        lines += ["", f"## Speed with CUDA graphs (the same step, {how}; run after the training part)", "",
                  "| model | train step ms | step time ratio | first step s | GPU busy ms | kernels | "
                  "CUDA graph launches |", "|---|---|---|---|---|---|---|"]
        for name, r in graphs.items():
            profile = r.get("step_profile", {})
            cells = [number(r.get("train_step_ms"), ".1f"), number(r.get("step_time_ratio"), ".3f"),
                     number(r.get("first_step_seconds"), ".0f"), number(profile.get("device_busy_ms"), ".1f"),
                     number(profile.get("kernels_per_call"), ".0f"),
                     number(profile.get("cuda_graph_launches_per_call"), ".0f")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
            for part, why in r.get("errors", {}).items():
                lines.append(f"- {name}, {part}: {why}")
        lines += ["", "Kernels replayed inside a CUDA graph are counted only where the profiler sees them; "
                  "where it does not, the GPU busy time here is a lower bound."]
    for name, why in report.get("speed_cuda_graphs", {}).get("skipped", {}).items():
        lines.append(f"- CUDA graphs {name}: {why}")
    train = report.get("training")
    if train:
        lines += ["", f"## Training on Shakespeare (bytes, vocab {cfg['train_vocab']}): same batch windows, "
                  f"cosine schedule, lr {cfg['lr']}", "",
                  "| run | seed | steps | tokens | train FLOPs | FLOPs vs dense | wall s | ms/step | val bpb causal | "
                  "val bpb top-k | causal agreement | causal routes |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in train.items():
            if "error" in r:
                lines.append(f"| {name} | {r.get('seed', '')} | {r['error']} |  |  |  |  |  |  |  |  |  |")
                continue
            agree = r.get("causal_router_agreement")
            frac = r.get("causal_router_fraction_routed")
            causal = r.get("val_bpb_causal", r.get("val_bpb_dense"))
            topk = r.get("val_bpb_topk", r.get("val_bpb_dense"))
            lines.append(f"| {name} | {r['seed']} | {r['steps']} | {r['tokens']:,} | {r['train_flops']:.3g} | "
                         f"{r['train_flops_relative']:.2f} | {r['seconds']:.1f} | {r['ms_per_step']:.1f} | "
                         f"{causal:.4f} | {topk:.4f} | {'' if agree is None else f'{agree:.3f}'} | "
                         f"{'' if frac is None else f'{frac:.3f}'} |")
        lines += ["", f"Validation: the first {cfg['val_bytes']:,} bytes of the split."]
    decode = report.get("decode")
    if decode:
        lines += ["", "## Decoding (greedy, KV cache, causal router; the trained models)", "",
                  "| model | batch | tokens/s | share of decoded tokens a routed layer processed |",
                  "|---|---|---|---|"]
        for name, runs in decode.items():
            for r in runs:
                frac = r.get("decode_fraction_routed")
                lines.append(f"| {name} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                             f"{'' if frac is None else f'{frac:.3f}'} |")
    lines += ["", f"Total wall time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", type=Path, help="same as --out")
    parser.add_argument("--out", type=Path, help="folder for gpu_routed.json and gpu_routed.md")
    parser.add_argument("--commit", help="git commit of the tree measured (when the copy has no .git)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, runs on CPU in about a minute")
    parser.add_argument("--data", type=Path, help="byte-tokenized Shakespeare shard folder (--export-data)")
    parser.add_argument("--export-data", type=Path, help="write the shard folder here and exit")
    parser.add_argument("--variants", default="standard,mod,mod-all,dtf")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--parts", default="speed,profile,forward,pieces,train",
                        help=f"comma-separated parts to run, from {','.join(PARTS)}")
    parser.add_argument("--steps", type=int, default=60, help="training steps of the dense model")
    parser.add_argument("--seeds", default="1", help="comma-separated training seeds (model init and batches)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-compile", action="store_true", help="eager speed section")
    parser.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                        help="torch.compile mode of the speed part's step (the trainer's train.compile_mode)")
    parser.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=True,
                        help="after the training part, the step again with mode reduce-overhead (CUDA graphs) "
                             "for as many variants as fit in --total-time-limit (standard and mod-all first)")
    parser.add_argument("--total-time-limit", type=float, default=320.0,
                        help="seconds from the start; bounds the CUDA-graph pass only")
    parser.add_argument("--compile-training", action="store_true", help="compile the training arms too")
    parser.add_argument("--fused-loss", action="store_true", help="the chunked LM head + loss in the speed section")
    parser.add_argument("--equal-steps", action="store_true", help="also train every arm for the dense steps")
    parser.add_argument("--val-bytes", type=int, default=131072, help="validation bytes scored per model")
    parser.add_argument("--speed-time-limit", type=float, default=210.0,
                        help="seconds from the speed part's start; a variant that would end later (by the "
                             "longest one so far) is recorded as skipped")
    parser.add_argument("--train-time-limit", type=float, default=75.0,
                        help="seconds from the training part's start; an arm that would end later (by the "
                             "slowest ms/step so far) is recorded as skipped")
    args = parser.parse_args(argv)
    if args.export_data:
        export_data(args.export_data)
        return 0
    out_dir = args.out or args.out_dir
    if out_dir is None:
        parser.error("give --out")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        parser.error("no CUDA device: use --smoke for a CPU check")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    bench = Bench(device, args.smoke)
    parts = args.parts.split(",")
    if unknown := [p for p in parts if p not in PARTS]:
        parser.error(f"unknown part {unknown[0]!r}; valid: {', '.join(PARTS)}")
    names = args.variants.split(",")
    if "standard" not in names:
        parser.error("--variants must include standard (the baseline of every ratio)")
    unknown = [n for n in names if n not in variants(2)]
    if unknown:
        parser.error(f"unknown variant {unknown[0]!r}; valid: {', '.join(variants(2))}")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    body = model_config("gpt2-small-like").to_dict()
    batch, seq, steps, val_bytes = args.batch, args.seq, args.steps, args.val_bytes
    compile_model = not args.no_compile and not args.smoke
    if args.smoke:
        body.update(vocab_size=512, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                    head_dim=16, intermediate_size=128)
        batch, seq, steps, val_bytes = 2, 128, 6, 4096
    body["max_position_embeddings"] = max(body["max_position_embeddings"], seq)
    report: dict[str, Any] = {
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
                        "torch": torch.__version__, "python": sys.version.split()[0],
                        "commit": provenance.commit(args.commit)},
        "config": {"body_preset": "gpt2-small-like" + (" (smoke: shrunk)" if args.smoke else ""), "seq": seq,
                   "batch": batch, "dtype": str(bench.dtype).replace("torch.", ""), "compile": compile_model,
                   "compile_mode": args.compile_mode, "parts": parts,
                   "compile_training": args.compile_training and compile_model, "fused_loss": args.fused_loss,
                   "speed_vocab": body["vocab_size"], "dense_steps": steps, "lr": args.lr, "variants": names,
                   "seeds": seeds, "val_bytes": val_bytes, "speed_time_limit_s": args.speed_time_limit,
                   "train_time_limit_s": args.train_time_limit},
    }

    def save() -> None:  # after every part, so a later failure keeps what was measured
        report["seconds"] = time.perf_counter() - start
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "gpu_routed.json").write_text(json.dumps(report, indent=2))
        (out_dir / "gpu_routed.md").write_text(markdown(report))

    def save_speed(partial: dict[str, Any]) -> None:
        report["speed"] = partial
        save()

    if {"speed", "profile", "forward", "pieces"} & set(parts):
        print("speed ...", flush=True)
        report["speed"] = speed_section(bench, body, names, batch, seq, compile_model, args.compile_mode,
                                        args.fused_loss, parts,
                                        args.speed_time_limit, save_speed)
        save()

    if "train" in parts:
        tokenizer = load_tokenizer("bytes")
        splits = load_prepared(args.data) if args.data else prepare_corpus("shakespeare", tokenizer)
        train_tokens = torch.as_tensor(np.asarray(splits["train"].tokens, dtype=np.int64), device=device)
        train_body = {**body, "vocab_size": tokenizer.vocab_size}
        report["config"]["train_vocab"] = tokenizer.vocab_size
        flops = {name: bench.build(train_body, variants(body["num_layers"])[name]).flops_per_token(seq)
                 for name in names}
        runs = [(name, round(steps * flops["standard"] / flops[name]), "equal FLOPs") for name in names]
        if args.equal_steps:
            runs += [(name, steps, "equal steps") for name in names if name != "standard"]
        runs.sort(key=lambda run: run[1])  # shortest first: the time limit drops the longest arms
        training: dict[str, Any] = {}
        decode: dict[str, Any] = {}
        prompt_source = np.asarray(splits["val"].tokens[:64], dtype=np.int64)
        compile_training = args.compile_training and compile_model
        train_start, slowest_ms, longest_eval = time.perf_counter(), 0.0, 0.0
        for seed in seeds:
            for name, run_steps, budget in runs:
                run_name = name if name == "standard" else f"{name} ({budget})"
                key = run_name if len(seeds) == 1 else f"{run_name} seed {seed}"
                expected = run_steps * slowest_ms / 1e3 + longest_eval
                if time.perf_counter() - train_start + expected > args.train_time_limit:
                    training[key] = {"seed": seed, "error": f"skipped: would end past --train-time-limit "
                                     f"{args.train_time_limit:.0f} s (about {expected:.0f} s)"}
                    continue
                print(f"train {key}: {run_steps} steps ...", flush=True)
                try:
                    model = bench.build(train_body, variants(body["num_layers"])[name], seed=seed)
                    starts = batch_starts(len(train_tokens), seq, batch, run_steps, seed=1234 + seed)
                    result = train_model(bench, model, train_tokens, starts, seq, args.lr, max(1, run_steps // 20),
                                         compile_training)
                    result["seed"] = seed
                    result["tokens"] = run_steps * batch * seq
                    result["train_flops"] = run_steps * batch * seq * flops[name]
                    result["train_flops_relative"] = run_steps * flops[name] / (steps * flops["standard"])
                    eval_start = time.perf_counter()
                    result.update(evaluate_modes(bench, model, tokenizer, splits, seq, val_bytes))
                    slowest_ms = max(slowest_ms, result["ms_per_step"])
                    longest_eval = max(longest_eval, time.perf_counter() - eval_start)
                    training[key] = result
                    if "decode" in parts and budget == "equal FLOPs" and seed == seeds[0]:
                        decode[name] = [decode_speed(bench, model, torch.as_tensor(prompt_source, device=device)
                                                     .repeat(b, 1), 8 if args.smoke else 256) for b in (1, 8)]
                        report["decode"] = decode
                except Exception as error:  # noqa: BLE001 - one arm's failure is recorded, the run goes on
                    training[key] = {"seed": seed, "error": error_text(error)}
                report["training"] = training
                model = None
                torch._dynamo.reset()
                save()

    if args.graphs and (compile_model or args.smoke) and "speed" in parts and args.compile_mode != "reduce-overhead":
        # last: a failed capture can leave the CUDA context unusable for what follows (the smoke run
        # stays eager: it only checks this code path)
        order = sorted(names, key=lambda n: (n not in ("standard", "mod-all"), names.index(n)))
        print("speed, CUDA graphs ...", flush=True)

        def save_graphs(partial: dict[str, Any]) -> None:
            report["speed_cuda_graphs"] = partial
            save()

        left = args.total_time_limit - (time.perf_counter() - start)
        # about the dense model's first pass, whose compiled kernels the second compile reuses
        estimate = report.get("speed", {}).get("standard", {}).get("seconds", 0.0)
        if left < 2 * estimate:  # a pass without the dense model and one routed model compares nothing
            report["speed_cuda_graphs"] = {"skipped": {"all": f"{left:.0f} s left of --total-time-limit, the "
                                                              f"dense and one routed model need about "
                                                              f"{2 * estimate:.0f} s"}}
        else:
            report["speed_cuda_graphs"] = speed_section(
                bench, body, order, batch, seq, compile_model, "reduce-overhead", args.fused_loss,
                ["speed", "profile"], left, save_graphs)

    save()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
