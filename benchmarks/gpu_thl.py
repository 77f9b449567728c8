"""THL and the layered engine on one GPU, in one run. Parts (`--parts`, comma-separated; the default
7b,speed,bpb,recall runs the 7B table first, on a device nothing has been compiled on yet):

speed   training tokens/s, THL (thl-125m, truncated BPTT) vs the standard model (gpt2-small-like) at about
        equal parameters, bf16 autocast, the one TrainStep, at each batch of --speed-batches (default
        16,64,256; sequences of 256 tokens): the standard model, then THL in each of --speed-modes (eager,
        default = the step compiled, reduce-overhead = compiled in CUDA graphs; default reduce-overhead).
        Peak memory and warm-up time (compilation, graph capture) per row; a variant out of memory is not
        tried at larger batches; after --speed-seconds (default 160) no new row starts. Each compiled row is
        profiled for one more step: kernels launched per token and the share of the wall time the GPU was
        busy (where the time goes). The table gives THL / standard at equal batch and, separately, each
        model at its own fastest batch that fit (a throughput comparison at equal parameters).
7b      the design document's 7B table: a random THL of ~7B parameters and a random standard model of ~7B
        (Mistral-7B shape: Llama-2-7B's 32 x 4096 with 8 KV heads) decoded through the layered engine under
        a 4 GiB GPU cap (torch.cuda.set_per_process_memory_fraction enforces it), batch 1 and 8, context 8K
        (and the standard model at 8 x 1K): peak GPU memory (allocated and reserved), tokens/s, the pinned
        host->device floor, the engine's slots. Weights are built in bf16 straight into pinned host memory,
        one tensor at a time (parameters on the meta device first; no fp32 copy ever exists). Then each model
        again, streamed from its memory-mapped safetensors checkpoint on disk (`LayeredEngine.from_checkpoint`).
        A row whose state and smallest weight slot cannot fit the cap is reported with the MiB it needs,
        computed before anything runs. Rows are started for at most `seconds7b` (the mapped rows of a model
        for `mmap_seconds7b`); later ones are recorded as skipped. Host memory: one model pinned at a time
        (14.2 GB) plus its checkpoint being written; disk: one checkpoint at a time (14.2 GB, --workdir).
bpb     bits per byte at equal parameters and equal training tokens: THL vs standard trained through
        `dynlm.train` on the python-stdlib corpus (ships with the interpreter: nothing to carry), bytes.
recall  a synthetic key-value recall task (4 key/value pairs, then N filler tokens, then the 4 keys again:
        the value must be recalled), both models trained for the same steps through the one TrainStep
        (loss on the recalled values only), evaluated at 64 .. 8K filler tokens.
decode  (the earlier run's part) decode after 1K .. 256K tokens of context: state bytes, peak, tokens/s.
layered (the earlier run's part) layered engine vs accelerate CPU offload on a 1.5B model.
budget  the 7B table's memory arithmetic from the shapes alone (meta device, no GPU, seconds): every
        streamed unit's bytes, each row's state as allocated and as the first 7B run counted it (filled
        positions: 0 for a pre-allocated KV cache), the weight budget the cap leaves, the largest units.

    python benchmarks/gpu_thl.py --out $OUT [--parts 7b,speed,bpb,recall] [--commit SHA]
    python benchmarks/gpu_thl.py --out $OUT --parts speed --speed-batches 16,64,256 --speed-modes reduce-overhead
    python benchmarks/gpu_thl.py --out $OUT --parts bpb,recall --thl-mode reduce-overhead --bpb-batch 64
    python benchmarks/gpu_thl.py --out /tmp/x --smoke     # tiny shapes, runs on CPU (a check)

Writes gpu_thl_items.json and gpu_thl_items.md (`--name` changes the stem) into --out, after every part:
an interrupted run keeps what it measured. A part that fails is recorded with its error; the others still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import dynlm
from dynlm.infer.layered import LayeredEngine, MemoryCapError
from dynlm.train.trainer import TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import provenance  # noqa: E402

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device, empty: bool = True) -> None:
    if device.type == "cuda":
        if empty:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def peak_reserved(device: torch.device) -> int | None:
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None


def pinned_bandwidth(device: torch.device, nbytes: int) -> float | None:
    """Host (pinned) -> device copy speed in GB/s."""
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev.copy_(host, non_blocking=True)
    sync(device)
    t = time.perf_counter()
    for _ in range(5):
        dev.copy_(host, non_blocking=True)
    sync(device)
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def train_speed(preset: str, device: torch.device, batch: int, seq_len: int, steps: int, vocab: int,
                warmup: int = 1, profile: bool = False, timed: Any = None, **overrides: Any) -> dict[str, Any]:
    """Training tokens/s; `profile`: then one more step profiled. `timed(result)` is called before
    the profile (it fills `result` in place), so that a profiler crash cannot lose the timing."""
    torch.manual_seed(0)
    model = dynlm.build_model(preset, vocab_size=vocab, **overrides).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = TrainStep(model, model, opt, device, dtype, clip=1.0)
    x = torch.randint(0, vocab, (batch, seq_len), device=device)
    peak_reset(device)
    t = time.perf_counter()
    for _ in range(warmup):  # compilation, and CUDA-graph capture (which needs a few calls)
        step([x])
    sync(device)
    warmup_seconds = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        out = step([x])
    sync(device)
    seconds = (time.perf_counter() - t) / steps
    result = {"preset": preset, "parameters": model.num_parameters(), "batch": batch, "seq_len": seq_len,
              "steps_timed": steps, "seconds_per_step": seconds, "tokens_per_s": batch * seq_len / seconds,
              "warmup_steps": warmup, "warmup_seconds": warmup_seconds,
              "loss": float(out.loss), "peak_bytes": peak(device), "peak_reserved_bytes": peak_reserved(device),
              **overrides}
    if timed is not None:
        timed(result)
    if profile:
        try:
            result["profile"] = profile_step(step, x, device)
        except Exception as e:  # the speed stands without its profile
            result["profile"] = {"error": error_text(e)}
    del model, opt, step
    gc.collect()
    return result


@torch.no_grad()
def decode_speed(model, state, device: torch.device, tokens: int) -> tuple[float, Any]:
    x = torch.randint(0, model.config.vocab_size, (1, 1), device=device)
    out = model(x, state=state)  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(tokens):
        out = model(x, state=out.state)
    sync(device)
    return tokens / (time.perf_counter() - t), out.state


@torch.no_grad()
def decode_vs_context(preset: str, device: torch.device, contexts: list[int], vocab: int, decode_tokens: int,
                      thl_real_prefill: int) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dynlm.build_model(preset, vocab_size=vocab).to(device, dtype).eval()
    rows = []
    thl_state = None
    for n in contexts:
        peak_reset(device)
        t = time.perf_counter()
        if model.constant_state:
            if thl_state is None:
                state = model.init_state(1, device=device)
                ids = torch.randint(0, vocab, (1, min(n, thl_real_prefill)), device=device)
                thl_state = model(ids, state=state).state
            state = type(thl_state).from_tensors([t.clone() for t in thl_state.tensors()])
            state.position.fill_(n)
            prefilled = min(n, thl_real_prefill)
        else:
            state = model.init_state(1, device=device, dtype=dtype, max_length=n + decode_tokens + 1)
            chunk = 4096
            for start in range(0, n, chunk):
                ids = torch.randint(0, vocab, (1, min(chunk, n - start)), device=device)
                state = model(ids, state=state).state
            prefilled = n
        sync(device)
        prefill_s = time.perf_counter() - t
        tokens_per_s, state = decode_speed(model, state, device, decode_tokens)
        rows.append({"preset": preset, "context": n, "prefilled_tokens": prefilled, "prefill_seconds": prefill_s,
                     "state_bytes": model.state_nbytes(state), "peak_bytes": peak(device),
                     "decode_tokens_per_s": tokens_per_s})
        log(f"decode {preset} @ {n}: {rows[-1]}")
        del state
    del model, thl_state
    gc.collect()
    return rows


@torch.no_grad()
def layered_vs_accelerate(preset: str, device: torch.device, cap: int, new_tokens: int, vocab: int,
                          bandwidth: float | None, batches: list[int]) -> dict[str, Any]:
    from dynlm.interop.hf import export_hf_checkpoint

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = dynlm.build_model(preset, vocab_size=vocab).to(dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    result: dict[str, Any] = {"preset": preset, "weight_bytes": weight_bytes, "cap_bytes": cap,
                              "new_tokens": new_tokens, "pinned_gb_per_s": bandwidth}
    if bandwidth:
        result["floor_tokens_per_s_batch1"] = bandwidth * 1e9 / weight_bytes
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        export_hf_checkpoint(model, hf_dir)
        engine = LayeredEngine(model, device=device, max_gpu_memory=cap)
        for batch in batches:
            prompt = torch.randint(0, vocab, (batch, 16))  # distinct prompts per row
            engine.generate(prompt, 2)  # warm-up: learn the unit order, allocate
            peak_reset(device)
            copied = engine.bytes_copied
            t = time.perf_counter()
            engine.generate(prompt, new_tokens)
            sync(device)
            seconds = time.perf_counter() - t
            result[f"layered_batch{batch}"] = {
                "tokens_per_s": batch * new_tokens / seconds, "seconds_per_step": seconds / (new_tokens + 1),
                "peak_bytes": peak(device), "gb_copied_per_s": (engine.bytes_copied - copied) / seconds / 1e9}
            log(f"layered batch {batch}: {result[f'layered_batch{batch}']}")
        del engine, model
        gc.collect()
        peak_reset(device)
        try:
            from transformers import AutoModelForCausalLM

            gib = cap / 2**30
            hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, device_map="auto",
                                                      max_memory={0: f"{gib:.2f}GiB", "cpu": "200GiB"})
            prompt = torch.randint(0, vocab, (1, 16), device=device)
            hf.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
            sync(device)
            t = time.perf_counter()
            hf.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            sync(device)
            seconds = time.perf_counter() - t
            result["accelerate_batch1"] = {"tokens_per_s": new_tokens / seconds, "peak_bytes": peak(device)}
            log(f"accelerate: {result['accelerate_batch1']}")
        except Exception as e:  # the peer is measured where it runs; its failure is reported, not hidden
            result["accelerate_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            log(result["accelerate_error"])
    return result




# ---------------------------------------------------------------------------------------------
# speed: training tokens/s and where the time goes


def profile_step(step: TrainStep, x: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """One more training step under torch.profiler: kernels launched per token, GPU busy time vs
    wall time, and the CPU ops that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t = time.perf_counter()
        step([x])
        sync(device)
        wall = time.perf_counter() - t
    events = prof.key_averages()
    device_events = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    busy_us = sum(getattr(e, "self_device_time_total", 0.0) for e in device_events)
    launches = sum(e.count for e in device_events)
    cpu_ops = sorted((e for e in events if e.device_type == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    tokens = x.numel()
    cuda = device.type == "cuda"
    return {"wall_seconds": wall, "device_busy_seconds": busy_us / 1e6,
            "device_busy_share": busy_us / 1e6 / wall if cuda else None,
            "kernels_per_token": launches / tokens if cuda else None,
            "kernels_per_recurrence_step": launches / x.shape[1] if cuda else None,
            "top_cpu_ops": [{"op": e.key, "calls_per_token": e.count / tokens,
                             "share_of_wall": e.self_cpu_time_total / 1e6 / wall} for e in cpu_ops]}


THL_STEP_MODES = {"eager": {}, "default": {"compile_step": True},
                  "reduce-overhead": {"compile_step": True, "compile_mode": "reduce-overhead"}}


def variant_label(row: dict[str, Any]) -> str:
    return row["preset"] + "".join(f" {k}={row[k]}" for k in ("compile_step", "compile_mode") if k in row)


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def part_speed(cfg: dict[str, Any], device: torch.device, report: dict[str, Any], keep_mode: bool = False) -> None:
    """Every variant at every batch of `speed_batches`, smallest batch first (so that a time budget
    cut keeps the equal-batch pairs): the standard model and THL in each of `speed_modes`. A
    variant that runs out of memory is not tried at larger batches; once `speed_seconds` are spent
    the remaining rows are recorded as skipped."""
    rows = report.setdefault("speed", [])
    report["speed_setup"] = {"batches": sorted(cfg["speed_batches"]), "thl_modes": cfg["speed_modes"],
                             "seq_len": cfg["seq"], "steps_timed": cfg["steps"], "budget_seconds": cfg["speed_seconds"]}
    variants = [(cfg["std"], {})] + [(cfg["thl"], THL_STEP_MODES[m]) for m in cfg["speed_modes"]]
    start = time.perf_counter()
    stopped: dict[str, str] = {}  # variant -> why its sweep stopped

    def keep(result: dict[str, Any]) -> None:
        rows.append(result)
        report["speed_summary"] = speed_summary(rows, cfg["std"], cfg["thl"])  # kept if the run is cut
        write_report(report)

    for batch in sorted(cfg["speed_batches"]):
        for preset, overrides in variants:
            planned = {"preset": preset, "batch": batch, "seq_len": cfg["seq"], **overrides}
            label = variant_label(planned)
            spent = time.perf_counter() - start
            if label in stopped or spent > cfg["speed_seconds"]:
                why = stopped.get(label) or f"time budget spent ({spent:.0f} s of {cfg['speed_seconds']:.0f} s)"
                rows.append({**planned, "skipped": why})
                log(f"speed: {label} batch {batch} skipped: {why}")
                continue
            try:
                warm = 3 if overrides.get("compile_mode") == "reduce-overhead" else 1
                train_speed(preset, device, batch, cfg["seq"], cfg["steps"], cfg["vocab"], warmup=warm,
                            profile=preset == cfg["std"] or bool(overrides), timed=keep, **overrides)
            except Exception as e:  # one failing variant is reported; the others still run
                oom = is_out_of_memory(e)
                rows.append({**planned, "error": "out of memory" if oom else error_text(e), "out_of_memory": oom})
                if oom:
                    stopped[label] = f"out of memory at batch {batch}"
            # compiled steps and their CUDA-graph pools go with the variant that built them
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"speed: {({k: v for k, v in rows[-1].items() if k != 'profile'})}")
            write_report(report)
    report["speed_summary"] = speed_summary(rows, cfg["std"], cfg["thl"])
    best = report["speed_summary"]["best"].get(cfg["thl"])
    if not keep_mode:
        report["thl_fastest"] = None if best is None else {
            k: best[k] for k in ("compile_step", "compile_mode") if k in best}


def speed_summary(rows: list[dict[str, Any]], std: str, thl: str) -> dict[str, Any]:
    """Each model's fastest row (its best batch among those that ran), THL / standard at each
    batch both ran (THL's fastest variant there), and best / best."""
    measured = [r for r in rows if "tokens_per_s" in r]
    best = {p: max((r for r in measured if r["preset"] == p), key=lambda r: r["tokens_per_s"], default=None)
            for p in (std, thl)}
    summary: dict[str, Any] = {"best": {p: None if r is None else {k: v for k, v in r.items() if k != "profile"}
                                        for p, r in best.items()},
                               "equal_batch": {}}
    for batch in sorted({r["batch"] for r in measured}):
        at = {p: max((r["tokens_per_s"] for r in measured if r["preset"] == p and r["batch"] == batch), default=None)
              for p in (std, thl)}
        if at[std] and at[thl]:
            summary["equal_batch"][str(batch)] = at[thl] / at[std]
    if best[std] and best[thl]:
        summary["best_over_best"] = best[thl]["tokens_per_s"] / best[std]["tokens_per_s"]
    return summary


# ---------------------------------------------------------------------------------------------
# 7b: the design document's table through the layered engine under a 4 GiB cap


def materialise_pinned(model: nn.Module, build_device: torch.device, dtype: torch.dtype, pin: bool,
                       std: float = 0.02) -> None:
    """Random weights for a model whose parameters are on the meta device, one tensor at a time:
    drawn on `build_device` (fast), copied into (pinned) host memory in `dtype`. Matrices
    N(0, std), vectors: norm gains 1, biases 0. Tied parameters stay tied."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in done:
                value = torch.empty(param.shape, dtype=dtype, device=build_device)
                if param.dim() >= 2:
                    value.normal_(0.0, std)
                else:
                    value.fill_(1.0 if name == "weight" else 0.0)
                host = torch.empty(param.shape, dtype=dtype, pin_memory=pin)
                host.copy_(value)
                done[id(param)] = nn.Parameter(host, requires_grad=False)
                del value
            module._parameters[name] = done[id(param)]


def enforce_cap(device: torch.device, cap: int | None) -> None:
    """Cap everything the process allocates on the GPU (not only the weights) at `cap` bytes; None
    lifts the cap. The weights are built before: drawing them on the GPU is not part of decoding."""
    if device.type != "cuda":
        return
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(1.0 if cap is None else cap / total, index)


def empty_host_cache() -> None:
    """Give the pinned blocks cached by torch's host allocator back (two 7B models in a row)."""
    release = getattr(torch._C, "_host_emptyCache", None)
    if release is not None and torch.cuda.is_available():
        release()


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


@torch.no_grad()
def layered_decode(engine: LayeredEngine, model: Any, batch: int, context: int, new_tokens: int,
                   vocab: int, cap: int, device: torch.device, prefill_chunk: int) -> dict[str, Any]:
    """Prefill `context` tokens (THL: a few real tokens, then the position advanced: its state has a
    fixed shape), then time `new_tokens` greedy decode steps. Peaks are the whole process's."""
    row: dict[str, Any] = {"batch": batch, "context": context}
    peak_reset(device)
    t = time.perf_counter()
    if model.constant_state:
        state = engine.init_state(batch)
        out = engine(torch.randint(0, vocab, (batch, 4)), state=state)
        out.state.position.fill_(context)
        row["prefilled_tokens"] = 4
    else:
        state = engine.init_state(batch, max_length=context + new_tokens + 2)
        chunk = max(1, prefill_chunk // batch)  # prefill_chunk tokens per forward: activations stay in the headroom
        for start in range(0, context, chunk):
            out = engine(torch.randint(0, vocab, (batch, min(chunk, context - start))), state=state)
            state = out.state
        row["prefilled_tokens"] = context
    sync(device)
    row["prefill_seconds"] = time.perf_counter() - t
    row["state_bytes"] = model.state_nbytes(out.state)
    row["prefill_peak_allocated"], row["prefill_peak_reserved"] = peak(device), peak_reserved(device)
    peak_reset(device, empty=False)
    out = engine(out.logits[:, -1].argmax(-1, keepdim=True), state=out.state)  # warm-up step
    sync(device)
    copied = engine.bytes_copied
    t = time.perf_counter()
    for _ in range(new_tokens):
        out = engine(out.logits[:, -1].argmax(-1, keepdim=True), state=out.state)
    sync(device)
    seconds = time.perf_counter() - t
    row.update({"new_tokens": new_tokens, "tokens_per_s": batch * new_tokens / seconds,
                "seconds_per_step": seconds / new_tokens, "peak_allocated": peak(device),
                "peak_reserved": peak_reserved(device), "cap_bytes": cap,
                "gb_copied_per_step": (engine.bytes_copied - copied) / new_tokens / 1e9,
                "gb_copied_per_s": (engine.bytes_copied - copied) / seconds / 1e9})
    return row


def kv_bytes(config: Any, batch: int, context: int, element_size: int = 2) -> int:
    """K and V of every layer for `context` tokens (bf16)."""
    head_dim = config.hidden_size // config.num_heads
    return 2 * config.num_layers * config.num_kv_heads * head_dim * context * batch * element_size


def part_7b(cfg: dict[str, Any], device: torch.device, report: dict[str, Any], workdir: Path) -> None:
    from dynlm.config import model_config
    from dynlm.infer.layered import parameters_on_meta

    cuda = device.type == "cuda"
    dtype = torch.bfloat16
    cap = cfg["cap7b"]
    headroom = cfg["headroom7b"]
    section = report.setdefault("7b", {"cap_bytes": cap, "headroom_bytes": headroom,
                                       "headroom_bytes_per_row": cfg["headroom7b_per_row"], "rows": [],
                                       "pinned_gb_per_s": report.get("pinned_gb_per_s")})
    llama = model_config(dict(type="standard", **cfg["llama7b"]))
    section["llama2_7b_kv_bytes_8k_batch1"] = kv_bytes(llama, 1, 8192)
    deadline = time.perf_counter() + cfg["seconds7b"]
    try:
        for name, arch_cfg, runs, mmap_runs in (("thl-7b", cfg["thl7b"], cfg["thl7b_runs"], cfg["thl7b_mmap_runs"]),
                                                ("standard-7b", cfg["std7b"], cfg["std7b_runs"],
                                                 cfg["std7b_mmap_runs"])):
            if name not in cfg["models7b"]:
                continue
            t0 = time.perf_counter()
            with parameters_on_meta():
                model = dynlm.build_model(model_config(dict(arch_cfg)))
            materialise_pinned(model, device, dtype, pin=cuda)
            info = {"model": name, "config": arch_cfg, "parameters": model.num_parameters(),
                    "weight_bytes": weight_bytes(model), "build_seconds": time.perf_counter() - t0}
            bw = report.get("pinned_gb_per_s")
            if bw:
                info["floor_tokens_per_s_batch1"] = bw * 1e9 / info["weight_bytes"]
            log(f"7b: built {info}")
            ckpt = None
            if cfg["mmap7b"]:
                t0 = time.perf_counter()
                ckpt = workdir / name
                model.save_pretrained(ckpt)
                info["save_seconds"] = time.perf_counter() - t0
                log(f"7b: saved {name} in {info['save_seconds']:.0f} s")
            section.setdefault("models", []).append(info)
            enforce_cap(device, cap)
            engine = LayeredEngine(model, device=device, max_gpu_memory=cap, dtype=dtype)
            rows_7b(engine, name, "pinned host memory", runs, cfg, cap, device, section, report, deadline)
            del engine, model
            gc.collect()
            empty_host_cache()
            enforce_cap(device, None)
            if ckpt is not None:
                try:
                    enforce_cap(device, cap)
                    engine = LayeredEngine.from_checkpoint(ckpt, device=device, max_gpu_memory=cap, dtype=dtype)
                    # mapped pages copy slower: these rows get their own share of the time
                    mmap_deadline = min(deadline, time.perf_counter() + cfg["mmap_seconds7b"])
                    rows_7b(engine, name, "memory-mapped safetensors on disk", mmap_runs, cfg, cap, device, section,
                            report, mmap_deadline, new_tokens=cfg["mmap_new"])
                    del engine
                except Exception as e:
                    section["rows"].append({"model": name, "source": "memory-mapped safetensors on disk",
                                            "batch": 0, "context": 0, "error": error_text(e)})
                shutil.rmtree(ckpt, ignore_errors=True)
                gc.collect()
                enforce_cap(device, None)
    finally:
        enforce_cap(device, None)


def rows_7b(engine: LayeredEngine, name: str, source: str, runs: list[tuple[int, int]], cfg: dict[str, Any],
            cap: int, device: torch.device, section: dict[str, Any], report: dict[str, Any], deadline: float,
            new_tokens: int | None = None) -> None:
    """One row per (batch, context): a row whose state and smallest weight slot cannot fit the cap
    says how many MiB it needs (computed before anything is allocated) instead of running; a row
    reached after `deadline` (perf_counter seconds) is recorded as skipped."""
    model, dtype = engine.model, engine.dtype
    new_tokens = new_tokens or cfg["new7b"]
    for batch, context in runs:
        row: dict[str, Any] = {"model": name, "source": source, "batch": batch, "context": context}
        log(f"7b: {name} from {source}, batch {batch}, context {context:,} ...")
        try:
            if time.perf_counter() > deadline:
                raise TimeoutError("skipped: the time given to these rows is spent")
            # the state's allocated bytes (a pre-allocated KV cache in full); weights get the rest
            state = model.init_state(batch, device="meta", dtype=dtype, max_length=context + new_tokens + 2)
            row["headroom_bytes"] = headroom_7b(cfg, batch, state)
            engine.fit_to_cap(cap, state, row["headroom_bytes"])
            stats = engine.stats()
            row.update({"pieces": stats["pieces"], "slots": stats["slots"], "slot_bytes": stats["slot_bytes"]})
            row.update(layered_decode(engine, model, batch, context, new_tokens, model.config.vocab_size,
                                      cap, device, cfg["prefill_chunk"]))
        except (MemoryCapError, TimeoutError) as e:
            row["error"] = str(e)
        except Exception as e:
            row["error"] = error_text(e)
        section["rows"].append(row)
        log(f"7b: {row}")
        write_report(report)


def headroom_7b(cfg: dict[str, Any], batch: int, state: Any) -> int:
    """Bytes kept free for activations: a fixed part, a part per row, and for a recurrent state
    (not a KV cache, which is written in place) two more copies of it: a step builds the new
    state (THL's bank: decayed, then written) while the old one is alive. At batch 8 THL-7B
    asked for 344 MiB past a flat 512 MiB and past 960 MiB without the copies."""
    from dynlm.infer.layered import state_capacity_bytes
    from dynlm.nn.cache import KVCache

    copies = 0 if isinstance(state, KVCache) else 2 * state_capacity_bytes(state)
    return cfg["headroom7b"] + batch * cfg["headroom7b_per_row"] + copies


def part_budget(cfg: dict[str, Any], report: dict[str, Any]) -> None:
    from dynlm.config import model_config
    from dynlm.infer.layered import parameters_on_meta, state_capacity_bytes, streamable_units

    cap, headroom, element = cfg["cap7b"], cfg["headroom7b"], 2  # bf16, as in the 7b part
    section = report["budget"] = {"cap_bytes": cap, "headroom_bytes": headroom, "models": []}
    for name, arch_cfg, runs in (("thl-7b", cfg["thl7b"], cfg["thl7b_runs"]),
                                 ("standard-7b", cfg["std7b"], cfg["std7b_runs"])):
        with parameters_on_meta():
            model = dynlm.build_model(model_config(dict(arch_cfg)))
        names = {id(m): n for n, m in model.named_modules()}
        units = streamable_units(model)
        unit_bytes: dict[str, list[int]] = {}  # "model.layers.N" -> [bytes, count]
        for unit in units:
            key = re.sub(r"\.\d+(?=\.|$)", ".N", names[id(unit)])
            entry = unit_bytes.setdefault(key, [sum(p.numel() for p in unit.parameters()) * element, 0])
            entry[1] += 1
        in_units = {id(p) for u in units for p in u.parameters()}
        resident = sum(p.numel() for p in model.parameters() if id(p) not in in_units) * element
        sizes = sorted((b for b, n in unit_bytes.values() for _ in range(n)), reverse=True)
        unique = {id(p): p for p in model.parameters()}.values()  # a tied embedding and head count once
        weights = sum(p.numel() for p in unique) * element
        # the engine's own plan on the meta device: the pieces and slots each row gets, no memory
        engine = LayeredEngine(model.to(torch.bfloat16), device="meta", max_gpu_memory=cap, dtype=torch.bfloat16)
        rows = []
        for batch, context in runs:
            state = model.init_state(batch, device="meta", dtype=torch.bfloat16,
                                     max_length=context + cfg["new7b"] + 2)
            allocated, counted = state_capacity_bytes(state), model.state_nbytes(state)
            headroom = headroom_7b(cfg, batch, state)
            row = {"batch": batch, "context": context, "state_allocated_bytes": allocated,
                   "state_counted_by_first_run_bytes": counted,
                   "weight_budget_first_run": cap - resident - counted - headroom,
                   "weight_budget": cap - resident - allocated - headroom,
                   "needed_bytes": engine.bytes_needed(state, headroom)}
            if row["needed_bytes"] <= cap:
                engine.fit_to_cap(cap, state, headroom)
                row.update({"pieces": len(engine.plan.pieces), "slots": len(engine.plan.slot_sizes),
                            "slot_bytes": engine.plan.slot_bytes})
            rows.append(row)
        section["models"].append({"model": name, "weight_bytes": weights,
                                  "resident_bytes": resident,
                                  "units": {k: {"bytes": b, "count": n} for k, (b, n) in unit_bytes.items()},
                                  "largest_unit_bytes": sizes[0], "two_largest_units_bytes": sum(sizes[:2]),
                                  "rows": rows})


# ---------------------------------------------------------------------------------------------
# bpb: equal parameters, equal training tokens, through the trainer


def thl_step_mode(report: dict[str, Any]) -> dict[str, Any]:
    """THL's step flags for the bpb and recall parts: the fastest of the speed part, or the one
    --thl-mode asked for; the compiled step when neither is known."""
    if "thl_fastest" in report:
        return report["thl_fastest"] or {}
    return {"compile_step": True}


def count_parameters(arch_cfg: dict[str, Any]) -> int:
    from dynlm.config import model_config
    from dynlm.infer.layered import parameters_on_meta

    with parameters_on_meta():
        return dynlm.build_model(model_config(dict(arch_cfg))).num_parameters()


def thl_matching(std_cfg: dict[str, Any], thl_base: dict[str, Any]) -> dict[str, Any]:
    """The THL config (hidden size a multiple of 64) with the parameter count closest to `std_cfg`'s."""
    target = count_parameters(std_cfg)
    best = min((dict(thl_base, hidden_size=h) for h in range(64, 4097, 64)),
               key=lambda c: abs(count_parameters(c) - target))
    return best


def part_bpb(cfg: dict[str, Any], device: torch.device, report: dict[str, Any], workdir: Path) -> None:
    from dynlm.train import train
    from dynlm.train.trainer import read_metrics

    std = dict(cfg["bpb_std"], vocab_size=cfg["bpb_vocab"])
    thl = thl_matching(std, dict(cfg["bpb_thl"], vocab_size=cfg["bpb_vocab"], **thl_step_mode(report)))
    steps = cfg["bpb_min_steps"]  # THL's speed unknown: the fewest steps
    mode = {k: thl_step_mode(report).get(k) for k in ("compile_step", "compile_mode")}
    measured = [r for r in report.get("speed", []) if r.get("preset") == cfg["thl"] and "tokens_per_s" in r
                and {k: r.get(k) for k in ("compile_step", "compile_mode")} == mode]
    nearest = min(measured, key=lambda r: (abs(r["batch"] - cfg["bpb_batch"]), r["batch"]), default=None)
    speed = None if nearest is None else nearest["tokens_per_s"]  # at 125M, the batch nearest bpb's
    if speed:  # THL's measured speed sets the steps: about bpb_seconds of THL training
        affordable = cfg["bpb_seconds"] * speed / (cfg["bpb_batch"] * cfg["bpb_seq"])
        steps = int(max(cfg["bpb_min_steps"], min(cfg["bpb_steps"], affordable)))
    section = report.setdefault("bpb", {"corpus": cfg["bpb_corpus"], "tokenizer": "bytes", "steps": steps,
                                        "thl_step": thl_step_mode(report),
                                        "batch": cfg["bpb_batch"], "seq_len": cfg["bpb_seq"], "rows": []})
    for name, arch in (("standard", std), ("thl", thl)):
        overrides = {"model": {k: v for k, v in arch.items() if k != "vocab_size"},
                     "data": {"corpus": cfg["bpb_corpus"], "tokenizer": "bytes", "seq_len": cfg["bpb_seq"],
                              "cache_dir": str(workdir / "data")},
                     "train": {"max_steps": steps, "batch_size": cfg["bpb_batch"], "lr": 2e-3, "min_lr": 2e-4,
                               "warmup_steps": max(1, steps // 10), "eval_every": steps,
                               "eval_bytes": cfg["bpb_eval_bytes"],
                               "save_every": steps, "final_eval": [], "sample_tokens": 0, "plot": False, "seed": 0,
                               "log_every": max(1, steps // 4)},
                     "out_dir": str(workdir / "runs"), "run_name": f"bpb-{name}"}
        row: dict[str, Any] = {"model": name, "config": arch}
        try:
            t = time.perf_counter()
            run_dir = train("quick", overrides_as_list(overrides), force=True)
            row["wall_seconds"] = time.perf_counter() - t
            summary = json.loads((run_dir / "eval.json").read_text())
            evals = [r for r in read_metrics(run_dir) if r.get("event") == "eval"]
            row.update({"parameters": count_parameters(arch), "steps": summary["step"], "tokens": summary["tokens"],
                        "train_seconds": summary["train_seconds"], "val_bpb": evals[-1]["val_bpb"] if evals else None,
                        "val_tokens": evals[-1]["val_tokens"] if evals else None})
        except Exception as e:
            row["error"] = error_text(e)
        section["rows"].append(row)
        log(f"bpb: {row}")
        write_report(report)


def overrides_as_list(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """{'train': {'lr': 1e-3}} -> ['train.lr=0.001'] (values as JSON, which the config reads)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += overrides_as_list(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}={json.dumps(value)}")
    return out


# ---------------------------------------------------------------------------------------------
# recall: synthetic key-value recall at increasing distance

KEYS, VALUES, FILLER = (0, 32), (32, 64), (64, 128)  # token ranges; vocabulary 128


def recall_batch(batch: int, pairs: int, filler: int, length: int | None, generator: torch.Generator,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[k1 v1 .. kP vP] [filler x N] [the P keys again, shuffled, each followed by its value]
    [filler up to `length`]. Returns ids [B, T] and the mask of the recalled value positions."""
    rows, masks = [], []
    for _ in range(batch):
        keys = torch.randperm(KEYS[1] - KEYS[0], generator=generator)[:pairs] + KEYS[0]
        values = torch.randint(*VALUES, (pairs,), generator=generator)
        writes = torch.stack([keys, values], 1).reshape(-1)
        order = torch.randperm(pairs, generator=generator)
        queries = torch.stack([keys[order], values[order]], 1).reshape(-1)
        fill = torch.randint(*FILLER, (filler,), generator=generator)
        tail = max(0, (length or 0) - 4 * pairs - filler)
        ids = torch.cat([writes, fill, queries, torch.randint(*FILLER, (tail,), generator=generator)])
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[2 * pairs + filler + 1:4 * pairs + filler:2] = True
        rows.append(ids)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


class AnswerLoss(nn.Module):
    """Calls the model and scores only the recalled values (`mask`, set before each step)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.mask: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, state: Any = None) -> Any:
        from dynlm.models.base import causal_lm_loss

        out = self.model(input_ids, state=state)
        if labels is not None:
            out = dataclasses.replace(out, loss=causal_lm_loss(out.logits, labels.masked_fill(~self.mask, -100)))
        return out


@torch.no_grad()
@torch.no_grad()  # without it a recurrent model keeps every step's state for backward: 24 GB at 4K on CPU
def recall_accuracy(model: nn.Module, device: torch.device, batch: int, pairs: int, filler: int,
                    seed: int) -> float:
    model.eval()
    ids, mask = recall_batch(batch, pairs, filler, None, torch.Generator().manual_seed(seed))
    ids, mask = ids.to(device), mask.to(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
        logits = model(ids).logits
    predicted = logits[:, :-1].argmax(-1)
    hits = (predicted == ids[:, 1:])[mask[:, 1:]]
    model.train()
    return float(hits.float().mean())


def part_recall(cfg: dict[str, Any], device: torch.device, report: dict[str, Any]) -> None:
    vocab = FILLER[1]
    std = dict(cfg["recall_std"], vocab_size=vocab)
    thl = thl_matching(std, dict(cfg["recall_thl"], vocab_size=vocab, **thl_step_mode(report)))
    pairs, length = cfg["recall_pairs"], cfg["recall_seq"]
    section = report.setdefault("recall", {"pairs": pairs, "train_seq_len": length, "batch": cfg["recall_batch"],
                                           "distances": cfg["recall_distances"], "rows": [],
                                           "thl_step": thl_step_mode(report),
                                           "chance": 1 / (VALUES[1] - VALUES[0])})
    steps_done = None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    from dynlm.config import model_config

    # THL first: its time budget sets the steps of the standard model's equal-steps row; the
    # reference row trains the standard model for a fixed, larger number of steps (what the task
    # takes to be learnt), so a model at chance can be told from a task that was never learnable
    arms = [("thl", thl, None), ("standard", std, None)]
    if cfg.get("recall_reference_steps"):
        arms.append((f"standard, {cfg['recall_reference_steps']:,} steps", std, cfg["recall_reference_steps"]))
    curve_every, curve_distance = cfg.get("recall_curve_every") or 0, min(cfg["recall_distances"])
    section["curve_distance"] = curve_distance
    for name, arch, fixed_steps in arms:
        row: dict[str, Any] = {"model": name, "config": arch, "curve": []}
        try:
            torch.manual_seed(0)
            model = dynlm.build_model(model_config(dict(arch))).to(device).train()
            wrapper = AnswerLoss(model)
            opt = torch.optim.AdamW(model.parameters(), lr=cfg["recall_lr"], fused=device.type == "cuda")
            step = TrainStep(wrapper, model, opt, device, dtype, clip=1.0)
            generator = torch.Generator().manual_seed(1)
            t = time.perf_counter()
            limit = fixed_steps or steps_done or cfg["recall_max_steps"]
            done, loss, curve_seconds = 0, None, 0.0
            while done < limit:
                filler = int(torch.randint(cfg["recall_min_filler"], length - 4 * pairs + 1, (1,), generator=generator))
                ids, mask = recall_batch(cfg["recall_batch"], pairs, filler, length, generator)
                wrapper.mask = mask.to(device)
                loss = step([ids.to(device)]).loss
                done += 1
                if done % 10 == 0:
                    sync(device)  # the time check below measures work done, not work queued
                if curve_every and done % curve_every == 0:  # scoring time is left out of train_seconds
                    started = time.perf_counter()
                    accuracy = recall_accuracy(model, device, cfg["recall_eval_batch"], pairs, curve_distance, seed=7)
                    row["curve"].append([done, accuracy, float(loss)])
                    curve_seconds += time.perf_counter() - started
                    log(f"recall {name} step {done}: loss {float(loss):.3f}, "
                        f"accuracy @ {curve_distance} {accuracy:.3f}")
                if (fixed_steps is None and steps_done is None
                        and time.perf_counter() - t - curve_seconds > cfg["recall_seconds"]):
                    break
            sync(device)
            steps_done = steps_done or done
            row.update({"parameters": model.num_parameters(), "steps": done,
                        "train_seconds": time.perf_counter() - t - curve_seconds,
                        "final_loss": float(loss) if loss is not None else None, "accuracy": {}})
            for distance in cfg["recall_distances"]:
                t = time.perf_counter()
                row["accuracy"][str(distance)] = recall_accuracy(model, device, cfg["recall_eval_batch"], pairs,
                                                                 distance, seed=100 + distance)
                log(f"recall {name} @ {distance}: {row['accuracy'][str(distance)]:.3f} "
                    f"({time.perf_counter() - t:.1f}s)")
            del model, wrapper, opt, step
            gc.collect()
        except Exception as e:
            row["error"] = error_text(e)
        section["rows"].append(row)
        log(f"recall: {row}")
        write_report(report)


# ---------------------------------------------------------------------------------------------
# the run


class CudagraphReasons(logging.Handler):
    """Keeps the first few reasons CUDA-graph trees give for capturing a node again or for running a
    function uncaptured. Those are debug records of an artifact logger that is off by default; it is
    switched on here without passing them on, so the run's log does not get a line per capture."""

    NAMES = ("torch._inductor.cudagraph_trees.__cudagraphs", "torch._inductor.cudagraph_utils.__cudagraphs")
    KEEP = 5

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.reasons: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.reasons) < self.KEEP and any(w in str(record.msg) for w in ("Re-recording", "skipping cudagraph")):
            self.reasons.append(record.getMessage()[:400])

    def install(self) -> CudagraphReasons:
        for name in self.NAMES:
            logger = logging.getLogger(name)
            logger.setLevel(logging.DEBUG)
            logger.propagate = False
            logger.addHandler(self)
        return self


CUDAGRAPH_REASONS: CudagraphReasons | None = None


def compile_stats(device: torch.device) -> dict[str, Any]:
    """What torch.compile did during a part (its counters are cleared when the part starts): graphs
    compiled, and on CUDA the graph-tree nodes captured and the captures redone because a node's
    recorded inputs or liveness no longer matched (each one a synchronising capture instead of a
    replay), and the calls that fell back to running uncaptured."""
    from torch._dynamo.utils import counters

    stats: dict[str, Any] = {"frames_compiled": counters["frames"]["ok"],
                             "graphs_compiled": counters["stats"]["unique_graphs"],
                             "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}
    if device.type != "cuda":
        return stats
    from torch._inductor import cudagraph_trees

    manager = cudagraph_trees.get_manager(device.index or 0, create_if_none_exists=False)
    if manager is not None:
        nodes, pending = 0, [n for roots in manager.roots.values() for n in roots]
        while pending:
            node = pending.pop()
            nodes += 1
            pending += [c for children in node.children.values() for c in children]
        stats["cudagraph_nodes"] = nodes
        stats["cudagraph_rerecords"] = sum(sum(by_function.values()) for by_function in manager.num_rerecord.values())
        # recordings that no existing node could serve, and allocator checkpoints (a recording mid-path)
        stats["cudagraph_new_recordings"] = getattr(manager, "debug_fail_counter", None)
        stats["allocator_checkpoints"] = getattr(manager, "debug_checkpointing_counter", None)
    if CUDAGRAPH_REASONS is not None:
        stats["cudagraph_reasons"] = list(CUDAGRAPH_REASONS.reasons)
        CUDAGRAPH_REASONS.reasons.clear()
    return stats


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


REPORT_TARGET: dict[str, Any] = {}


def write_report(report: dict[str, Any]) -> None:
    out = REPORT_TARGET.get("out")
    if out is None:
        return
    report["seconds"] = time.perf_counter() - T0
    out.mkdir(parents=True, exist_ok=True)
    name = REPORT_TARGET["name"]
    (out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report) + "\n")


def configs(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(
            vocab=512, std="standard-tiny", thl="thl-tiny", seq=32, steps=1, speed_batches=[2, 4],
            speed_modes=["eager", "reduce-overhead"], speed_seconds=600,
            contexts=[64, 256], decode=4, real=64, layered="standard-tiny", cap=2 * 2**20, batches=[1, 2],
            cap7b=320 * 2**10, headroom7b=32 * 2**10, headroom7b_per_row=0, new7b=2, prefill_chunk=64, mmap7b=True,
            mmap_new=2,
            llama7b=dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                         intermediate_size=11008),
            thl7b=dict(type="thl", vocab_size=256, hidden_size=64, num_tiers=4, memory_slots=32, read_heads=4,
                       local_query_dim=16),
            std7b=dict(type="standard", vocab_size=256, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                       intermediate_size=128, max_position_embeddings=1024),
            thl7b_runs=[(1, 128), (2, 128)], std7b_runs=[(1, 128), (2, 64), (64, 1024)],
            thl7b_mmap_runs=[(1, 128), (2, 128)], std7b_mmap_runs=[(1, 128), (64, 1024)], seconds7b=120,
            mmap_seconds7b=60,
            bpb_corpus=str(Path(__file__).resolve().parent / "gpu_thl.py"), bpb_vocab=320, bpb_steps=2,
            bpb_min_steps=2, bpb_seconds=5, bpb_batch=2, bpb_seq=32, bpb_eval_bytes=512,
            bpb_std=dict(type="standard", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                         intermediate_size=64, max_position_embeddings=256),
            bpb_thl=dict(type="thl", num_tiers=3, memory_slots=16, read_heads=4, local_query_dim=16, bptt_chunk=16),
            recall_pairs=2, recall_seq=32, recall_batch=4, recall_max_steps=2, recall_seconds=5, recall_lr=3e-3,
            recall_min_filler=4, recall_distances=[8, 64], recall_eval_batch=2,
            recall_std=dict(type="standard", hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                            intermediate_size=64, max_position_embeddings=512),
            recall_thl=dict(type="thl", num_tiers=3, memory_slots=16, read_heads=4, local_query_dim=16, bptt_chunk=0))
    return dict(
        vocab=50304, std="gpt2-small-like", thl="thl-125m", seq=256, steps=3, speed_batches=[16, 64, 256],
        speed_modes=["reduce-overhead"], speed_seconds=160,
        contexts=[1024, 8192, 65536, 262144], decode=32, real=1024, layered="qwen2.5-1.5b", cap=2**30, batches=[1, 8],
        cap7b=4 * 2**30, headroom7b=448 * 2**20, headroom7b_per_row=64 * 2**20, new7b=6, prefill_chunk=1024,
        mmap7b=True, mmap_new=3,
        # Llama-2-7B: its KV cache at 8K is computed, to say why the standard model run has 8 KV heads
        llama7b=dict(vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                     intermediate_size=11008),
        # THL at ~7B: 4 tiers of 11008 (each GRU tier ~9 d^2), the reader ~5 d^2, the head 4 d x V
        thl7b=dict(type="thl", vocab_size=32000, hidden_size=11008, num_tiers=4, memory_slots=1024, read_heads=4,
                   local_query_dim=64),
        # Mistral-7B's shape: Llama-2-7B's 32 x 4096 layers with 8 KV heads (grouped-query attention)
        std7b=dict(type="standard", vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   intermediate_size=14336, max_position_embeddings=32768, rope_theta=1e6),
        thl7b_runs=[(1, 8192), (8, 8192)], std7b_runs=[(1, 8192), (8, 8192), (8, 1024)],
        thl7b_mmap_runs=[(1, 8192), (8, 8192)], std7b_mmap_runs=[(1, 8192), (8, 8192)],
        # the whole part stops starting rows after seconds7b; each model's mapped rows after mmap_seconds7b
        seconds7b=180, mmap_seconds7b=45,
        bpb_corpus="python-stdlib", bpb_vocab=320, bpb_steps=300, bpb_min_steps=30, bpb_seconds=35, bpb_batch=16,
        bpb_seq=256, bpb_eval_bytes=32768,
        bpb_std=dict(type="standard", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=8,
                     intermediate_size=1536, max_position_embeddings=1024),
        bpb_thl=dict(type="thl", num_tiers=3, memory_slots=1024, read_heads=4, local_query_dim=64, bptt_chunk=64),
        recall_pairs=4, recall_seq=128, recall_batch=64, recall_max_steps=600, recall_seconds=35, recall_lr=2e-3,
        recall_min_filler=8, recall_distances=[64, 256, 1024, 4096, 8192], recall_eval_batch=16,
        recall_std=dict(type="standard", hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
                        intermediate_size=768, max_position_embeddings=16384),
        recall_thl=dict(type="thl", num_tiers=3, memory_slots=1024, read_heads=4, local_query_dim=64, bptt_chunk=0))


PARTS = ("speed", "7b", "bpb", "recall", "decode", "layered", "budget")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", default="7b,speed,bpb,recall", help=f"comma-separated, from {','.join(PARTS)}")
    parser.add_argument("--smoke", "--tiny", action="store_true", help="tiny shapes on CPU: checks the script runs")
    parser.add_argument("--commit", default=None, help="the git commit measured (a copy without .git)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch space for checkpoints and runs")
    parser.add_argument("--thl-mode", choices=["auto", "eager", "default", "reduce-overhead"], default="auto",
                        help="THL's step in the bpb and recall parts; auto: the fastest of the speed part "
                             "(the compiled step when that part did not run)")
    parser.add_argument("--name", default="gpu_thl_items", help="stem of the results files (.json, .md)")
    parser.add_argument("--models-7b", default="thl-7b,standard-7b", help="the models of the 7b part")
    parser.add_argument("--bpb-seconds", type=float, default=None, help="about how long THL trains in bpb")
    parser.add_argument("--recall-seconds", type=float, default=None, help="how long THL trains in recall")
    parser.add_argument("--bpb-batch", type=int, default=None, help="sequences per step in bpb (both models)")
    parser.add_argument("--bpb-steps", type=int, default=None,
                        help="training steps in bpb (both models); default: about --bpb-seconds of THL at the "
                             "speed part's measured speed, 30 when it did not run")
    parser.add_argument("--recall-batch", type=int, default=None, help="sequences per step in recall (both models)")
    parser.add_argument("--recall-reference-steps", type=int, default=None,
                        help="also train the standard model this many steps (a reference row) in recall")
    parser.add_argument("--recall-curve-every", type=int, default=None,
                        help="score recall at the shortest distance every this many steps (a learning curve)")
    parser.add_argument("--recall-max-steps", type=int, default=None,
                        help="at most this many training steps in recall (default 600; THL may stop earlier "
                             "at --recall-seconds, and the standard model trains THL's steps)")
    parser.add_argument("--speed-batches", default=None,
                        help="comma-separated batch sizes of the speed part (default 16,64,256)")
    parser.add_argument("--speed-modes", default=None,
                        help=f"THL's steps in the speed part, comma-separated from {','.join(THL_STEP_MODES)} "
                             "(default reduce-overhead)")
    parser.add_argument("--speed-seconds", type=float, default=None,
                        help="the speed part starts no new row after this many seconds (default 160)")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        parser.error(f"unknown part(s) {unknown}; valid: {','.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # every THL model built here compiles the same step function (one cache entry per model, mode
    # and grad mode): past dynamo's default limit of 8 it would fall back to eager without a word
    dynamo_config = importlib.import_module("torch._dynamo").config
    for limit in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, limit):
            setattr(dynamo_config, limit, 64)
    if device.type == "cuda":  # why graphs were captured again or skipped, into compile_stats
        global CUDAGRAPH_REASONS
        CUDAGRAPH_REASONS = CudagraphReasons().install()
    commit = provenance.commit(args.commit or os.environ.get("BENCH_COMMIT"))
    cfg = configs(args.smoke)
    cfg["models7b"] = [m.strip() for m in args.models_7b.split(",")]
    if args.bpb_seconds is not None:
        cfg["bpb_seconds"] = args.bpb_seconds
    if args.recall_seconds is not None:
        cfg["recall_seconds"] = args.recall_seconds
    for key, value in (("bpb_batch", args.bpb_batch), ("recall_batch", args.recall_batch),
                       ("recall_max_steps", args.recall_max_steps),
                       ("recall_reference_steps", args.recall_reference_steps),
                       ("recall_curve_every", args.recall_curve_every)):
        if value is not None:
            if value < 1:
                parser.error(f"--{key.replace('_', '-')} must be >= 1, got {value}")
            cfg[key] = value
    if args.bpb_steps is not None:
        if args.bpb_steps < 1:
            parser.error(f"--bpb-steps must be >= 1, got {args.bpb_steps}")
        cfg["bpb_min_steps"] = cfg["bpb_steps"] = args.bpb_steps
    if args.speed_seconds is not None:
        cfg["speed_seconds"] = args.speed_seconds
    if args.speed_batches is not None:
        try:
            cfg["speed_batches"] = [int(b) for b in args.speed_batches.split(",") if b.strip()]
        except ValueError:
            parser.error(f"--speed-batches must be comma-separated integers, got '{args.speed_batches}'")
        if not cfg["speed_batches"] or min(cfg["speed_batches"]) < 1:
            parser.error(f"--speed-batches must be integers >= 1, got '{args.speed_batches}'")
    if args.speed_modes is not None:
        cfg["speed_modes"] = [m.strip() for m in args.speed_modes.split(",") if m.strip()]
        bad = [m for m in cfg["speed_modes"] if m not in THL_STEP_MODES]
        if bad or not cfg["speed_modes"]:
            parser.error(f"--speed-modes: unknown {bad or 'empty'}; valid: {','.join(THL_STEP_MODES)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "commit": commit, "smoke": args.smoke,
                              "parts": parts, "part_seconds": {}, "part_errors": {}}
    REPORT_TARGET["out"], REPORT_TARGET["name"] = args.out, args.name
    if args.thl_mode != "auto":  # otherwise the speed part sets it (the fastest variant)
        report["thl_fastest"] = ({} if args.thl_mode == "eager"
                                 else {"compile_step": True, "compile_mode": args.thl_mode})
    report["pinned_gb_per_s"] = pinned_bandwidth(device, 1 << 30)
    log(f"device {name}, pinned host->device {report['pinned_gb_per_s']} GB/s, parts {parts}")
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        workdir = Path(tmp)
        for part in parts:
            t = time.perf_counter()
            importlib.import_module("torch._dynamo.utils").counters.clear()
            try:
                if part == "speed":
                    part_speed(cfg, device, report, keep_mode=args.thl_mode != "auto")
                elif part == "7b":
                    part_7b(cfg, device, report, workdir)
                elif part == "budget":
                    part_budget(cfg, report)
                elif part == "bpb":
                    part_bpb(cfg, device, report, workdir)
                elif part == "recall":
                    part_recall(cfg, device, report)
                elif part == "decode":
                    report["decode"] = []
                    for preset in (cfg["std"], cfg["thl"]):
                        report["decode"] += decode_vs_context(preset, device, cfg["contexts"], cfg["vocab"],
                                                              cfg["decode"], cfg["real"])
                elif part == "layered":
                    report["layered"] = layered_vs_accelerate(cfg["layered"], device, cfg["cap"], cfg["decode"] // 2,
                                                              cfg["vocab"], report["pinned_gb_per_s"], cfg["batches"])
            except Exception as e:  # a failing part is recorded; the next one still runs
                report["part_errors"][part] = error_text(e)
                log(f"part {part} failed: {report['part_errors'][part]}")
            report["part_seconds"][part] = time.perf_counter() - t
            try:  # read before the reset below drops the graph trees
                report.setdefault("compile_stats", {})[part] = compile_stats(device)
            except Exception as e:  # private torch internals: the part's results stand without them
                report.setdefault("compile_stats", {})[part] = {"error": error_text(e)}
            log(f"part {part}: {report['part_seconds'][part]:.1f}s, compile {report['compile_stats'][part]}")
            # compiled steps and their CUDA-graph memory pools go with the part that built them: the next
            # part (the 7B table's cap above all) starts from an empty device
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            write_report(report)
    print(markdown(report))
    return 0


# ---------------------------------------------------------------------------------------------
# the results page


def speed_markdown(r: dict[str, Any]) -> list[str]:
    mib = lambda b: "" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    setup = r.get("speed_setup", {})
    rows = r["speed"]
    lines = ["## Training tokens/s at about equal parameters (bf16 autocast, one TrainStep)", "",
             f"Batches {setup.get('batches')} x {setup.get('seq_len')} tokens, each variant timed over "
             f"{setup.get('steps_timed')} steps after its warm-up (warm-up s: compilation and CUDA-graph capture "
             "included). 'vs standard, same batch': THL / the standard model at the row's batch; 'vs standard's "
             "best': against the standard model at its fastest batch.", "",
             "| model | params | batch x seq | tokens/s | vs standard, same batch | vs standard's best | s/step "
             "| warm-up s | peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    measured = [e for e in rows if "tokens_per_s" in e]
    std = rows[0]["preset"]  # the standard model is each batch's first variant
    base = {e["batch"]: e["tokens_per_s"] for e in measured if e["preset"] == std}
    best_std = max(base.values(), default=None)
    for e in rows:
        label = variant_label(e)
        shape = f"{e['batch']}x{e['seq_len']}"
        if "tokens_per_s" not in e:
            why = e.get("skipped") and f"skipped: {e['skipped']}" or f"failed: {e.get('error')}"
            lines.append(f"| {label} | | {shape} | {why} | | | | | |")
            continue
        same = f"{e['tokens_per_s'] / base[e['batch']]:.3f}x" if base.get(e["batch"]) else ""
        vs_best = f"{e['tokens_per_s'] / best_std:.3f}x" if best_std else ""
        lines.append(f"| {label} | {e['parameters'] / 1e6:.1f}M | {shape} | {e['tokens_per_s']:,.0f} | {same} | "
                     f"{vs_best} | {e['seconds_per_step']:.3f} | {e.get('warmup_seconds', 0):.1f} | "
                     f"{mib(e['peak_bytes'])} |")
    summary = r.get("speed_summary")
    if summary and summary.get("best_over_best") is not None:
        best = summary["best"]
        thl = next(b for p, b in best.items() if p != std)
        lines += ["", f"Throughput at about equal parameters, each model at its own fastest batch of those tried "
                  f"that fit (not an equal-batch comparison): {variant_label(thl)} at batch {thl['batch']} "
                  f"{thl['tokens_per_s']:,.0f} tokens/s, {std} at batch {best[std]['batch']} "
                  f"{best[std]['tokens_per_s']:,.0f} tokens/s: **{summary['best_over_best']:.3f}x**. At equal batch "
                  "(THL's fastest variant): " + ", ".join(f"batch {b} {x:.3f}x"
                                                         for b, x in summary["equal_batch"].items()) + "."]
    profiled = [e for e in rows if "profile" in e]
    if profiled:
        lines += ["", "### Where the time goes (one profiled training step)", "",
                  "| model | batch | wall s | GPU busy s | GPU busy share | kernels per trained token | kernels per "
                  "position (all rows) | top CPU ops (share of wall) |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in profiled:
            e = row["profile"]
            if "error" in e:
                lines.append(f"| {variant_label(row)} | {row['batch']} | profile failed: {e['error']} | | | | | |")
                continue
            share = "" if e["device_busy_share"] is None else f"{e['device_busy_share']:.2f}"
            kernels = "" if e["kernels_per_token"] is None else f"{e['kernels_per_token']:.1f}"
            per_position = e.get("kernels_per_recurrence_step")
            kernels += " | " + ("" if per_position is None else f"{per_position:.0f}")
            ops = ", ".join(f"{o['op'].strip('# ')[:40]} {o['share_of_wall']:.2f}" for o in e["top_cpu_ops"][:4])
            lines.append(f"| {variant_label(row)} | {row['batch']} | {e['wall_seconds']:.3f} | "
                         f"{e['device_busy_seconds']:.3f} | {share} | {kernels} | {ops} |")
        lines += ["", "GPU busy share: kernel time / wall time of the step; far below 1 means the GPU waits for "
                  "the host to launch work (per-token overhead), not for arithmetic."]
    return lines


def markdown(r: dict[str, Any]) -> str:
    mib = lambda b: "" if b is None else f"{b / 2**20:,.0f}"  # noqa: E731
    lines = [f"# THL: 7B table, bits per byte, recall, training speed ({r['device']})", "",
             f"torch {r['torch']}, commit {provenance.short(r['commit'])}. Produced by `benchmarks/gpu_thl.py --parts "
             f"{','.join(r['parts'])}`{' --smoke (a CPU check, not a measurement)' if r['smoke'] else ''}. "
             f"Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in r["part_seconds"].items())
             + f"; total {r.get('seconds', 0):.0f}.", ""]
    for part, err in r["part_errors"].items():
        lines += [f"Part {part} failed: {err}", ""]
    if r.get("budget"):
        b = r["budget"]
        mib1 = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
        lines += [f"## The 7B table's memory arithmetic under a {b['cap_bytes'] / 2**30:.1f} GiB cap "
                  "(shapes only, bf16)", "",
                  f"Weight budget = cap - resident weights - state - {mib1(b['headroom_bytes'])} MiB of headroom. "
                  "'State as the first run counted': the state's filled positions (0 for a pre-allocated KV "
                  "cache), which is what the 7B run of commit 5651739 subtracted.", ""]
        for m in b["models"]:
            units = ", ".join(f"{k}{' x ' + str(u['count']) if u['count'] > 1 else ''} {mib1(u['bytes'])} MiB"
                              for k, u in m["units"].items())
            lines += [f"- {m['model']}: {m['weight_bytes'] / 1e9:.2f} GB of weights; resident "
                      f"{m['resident_bytes']:,} bytes; streamed units: {units}; largest unit "
                      f"{mib1(m['largest_unit_bytes'])} MiB, the two largest {mib1(m['two_largest_units_bytes'])} MiB",
                      "", "| model | batch | context | state allocated MiB | state as the first run counted MiB | "
                      "weight budget then MiB | weight budget now MiB | largest unit fits | two largest fit | "
                      "MiB needed (one smallest slot) | pieces, slots x MiB |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for row in m["rows"]:
                budget = row["weight_budget"]
                plan = (f"{row['pieces']}, {row['slots']} x {mib1(row['slot_bytes'])}" if "slots" in row
                        else "does not fit")
                cells = [m["model"], str(row["batch"]), f"{row['context']:,}", mib1(row["state_allocated_bytes"]),
                         mib1(row["state_counted_by_first_run_bytes"]), mib1(row["weight_budget_first_run"]),
                         mib1(budget), "yes" if budget >= m["largest_unit_bytes"] else "no",
                         "yes" if budget >= m["two_largest_units_bytes"] else "no",
                         mib1(row.get("needed_bytes", 0)), plan]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if r.get("speed"):
        lines += speed_markdown(r)
    s7 = r.get("7b")
    if s7:
        lines += ["", f"## The 7B table: layered engine under a {s7['cap_bytes'] / 2**30:.1f} GiB GPU cap (random "
                  "weights, bf16)", "",
                  f"Pinned host->device copy: {s7.get('pinned_gb_per_s') or 0:.1f} GB/s. The cap is enforced on the "
                  f"whole process (`torch.cuda.set_per_process_memory_fraction`); the engine's weight budget is the "
                  f"cap minus the resident weights, the state (KV cache or THL state) and "
                  f"{s7['headroom_bytes'] / 2**20:.0f} MiB of headroom for activations"
                  + (f" plus {s7['headroom_bytes_per_row'] / 2**20:.0f} MiB per batch row and, for a recurrent "
                     "state (THL), two copies of the state (a step builds the new one beside the old)"
                     if s7.get("headroom_bytes_per_row") else "") + ".", ""]
        for m in s7.get("models", []):
            floor = m.get("floor_tokens_per_s_batch1")
            lines.append(f"- {m['model']}: {m['parameters'] / 1e9:.2f}B parameters, "
                         f"{m['weight_bytes'] / 1e9:.1f} GB of "
                         f"weights, built in {m['build_seconds']:.0f} s"
                         + (f"; batch-1 floor (bytes / bandwidth) {floor:.2f} tokens/s" if floor else ""))
        lines += ["", "| model | weights from | batch | context | state MiB | slots x MiB | tokens/s | s/step | "
                  "share of floor (per row) | peak allocated MiB | peak reserved MiB | GB copied/step | GB/s copied |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        floors = {m["model"]: m.get("floor_tokens_per_s_batch1") for m in s7.get("models", [])}
        for e in s7["rows"]:
            if "error" in e:
                lines.append(f"| {e['model']} | {e['source']} | {e['batch']} | {e['context']:,} | | | {e['error']} "
                             "| | | | | | |")
                continue
            floor = floors.get(e["model"])
            share = f"{e['tokens_per_s'] / e['batch'] / floor:.2f}" if floor else ""
            slots = f"{e['slots']} x {mib(e['slot_bytes'])}" if "slots" in e else ""
            lines.append(f"| {e['model']} | {e['source']} | {e['batch']} | {e['context']:,} | "
                         f"{mib(e['state_bytes'])} | {slots} | {e['tokens_per_s']:.2f} | {e['seconds_per_step']:.2f} | "
                         f"{share} | {mib(e['peak_allocated'])} | {mib(e['peak_reserved'])} | "
                         f"{e['gb_copied_per_step']:.1f} | {e['gb_copied_per_s']:.1f} |")
        lines += ["", f"Llama-2-7B's own shape (32 KV heads) would need a KV cache of "
                  f"{s7.get('llama2_7b_kv_bytes_8k_batch1', 0) / 2**30:.2f} GiB at 8K tokens, batch 1 (bf16), against "
                  f"a cap of {s7['cap_bytes'] / 2**30:.2f} GiB for everything: with a layer of weights beside it, it "
                  "cannot fit, so the standard 7B here has 8 KV heads (Mistral-7B's shape) and its KV cache stays on "
                  "the GPU (rows whose state does not fit say so). "
                  "THL rows: 4 real tokens prefilled, then the position set to the context (its state has a fixed "
                  "shape, so its bytes and its step cost cannot depend on the context).",
                  "", "Perplexity: these are random weights; their perplexity is that of noise and says nothing about "
                  "a trained THL-7B or Transformer-7B. The design document's 12.4 vs 11.8 can only be checked with "
                  "trained 7B models, which do not exist for THL; the bits-per-byte section below compares small "
                  "trained models instead."]
    bpb = r.get("bpb")
    if bpb:
        lines += ["", f"## Bits per byte at equal parameters and equal training tokens ({bpb['corpus']}, bytes)", "",
                  f"Both trained through `dynlm.train` for {bpb['steps']} steps of {bpb['batch']} x {bpb['seq_len']} "
                  f"tokens, same schedule and seed; val bpb on the validation bytes scored at the end. THL's step: "
                  f"{bpb.get('thl_step') or 'eager'}.", "",
                  "| model | params | steps | tokens | train s | val bpb |", "|---|---|---|---|---|---|"]
        for e in bpb["rows"]:
            if "error" in e:
                lines.append(f"| {e['model']} | failed: {e['error']} | | | | |")
                continue
            val = "" if e["val_bpb"] is None else f"{e['val_bpb']:.3f}"
            lines.append(f"| {e['model']} | {e['parameters'] / 1e6:.1f}M | {e['steps']} | {e['tokens']:,} | "
                         f"{e['train_seconds']:.0f} | {val} |")
    rec = r.get("recall")
    if rec:
        dist = rec["distances"]
        lines += ["", f"## Key-value recall at increasing distance ({rec['pairs']} pairs; chance {rec['chance']:.3f})",
                  "", f"Trained on sequences of {rec['train_seq_len']} tokens (filler up to "
                  f"{rec['train_seq_len'] - 4 * rec['pairs']}), batch {rec['batch']}, the same steps for both "
                  "(THL's time budget set them); loss on the recalled values only. Accuracy = recalled values "
                  "predicted exactly, after N filler tokens between the pairs and the queries (a row named with its "
                  "steps trained the standard model that many steps, as a reference). THL's step: "
                  f"{rec.get('thl_step') or 'eager'}.", "",
                  "| model | params | steps | train s | " + " | ".join(f"N={d:,}" for d in dist) + " |",
                  "|---|---|---|---|" + "---|" * len(dist)]
        for e in rec["rows"]:
            if "error" in e:
                lines.append(f"| {e['model']} | failed: {e['error']} |")
                continue
            acc = " | ".join(f"{e['accuracy'].get(str(d), float('nan')):.3f}" for d in dist)
            lines.append(f"| {e['model']} | {e['parameters'] / 1e6:.2f}M | {e['steps']} | {e['train_seconds']:.0f} | "
                         f"{acc} |")
        curves = [e for e in rec["rows"] if e.get("curve")]
        if curves:
            lines += ["", f"Learning curves (accuracy at N={rec.get('curve_distance', min(dist)):,} during training; "
                      "step: accuracy):", ""]
            lines += [f"- {e['model']}: " + ", ".join(f"{step}: {acc:.3f}" for step, acc, _ in e["curve"])
                      for e in curves]
        lines += ["", "Distances beyond the training length test extrapolation for both; the standard model's "
                  "positions reach further than it was trained on."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
