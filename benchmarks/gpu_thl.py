"""THL and the layered engine on one GPU, in one run (every figure of docs/thl.md that needs a GPU):

1. training tokens/s, THL (thl-125m, truncated BPTT) vs the standard model (gpt2-small-like) at
   about equal parameters, same batch and sequence length, bf16 autocast, the one TrainStep;
2. decode after 1K / 8K / 64K / 256K tokens of context: state bytes, peak GPU memory, tokens/s,
   for both. The standard model prefills the whole context (KV cache). THL prefills 1K real
   tokens; for longer contexts its state is that state with the position advanced to N (a THL
   state is a fixed set of fixed-shape tensors, so N can change no byte of it; only the tier
   schedule reads the position). A sequential 256K-token THL prefill would not fit the budget;
3. the layered engine vs Hugging Face accelerate CPU offload (`device_map="auto"`, `max_memory`)
   on the same random standard checkpoint (qwen2.5-1.5b shape, bf16) under the same GPU cap, next
   to the host->device bandwidth floor (weight bytes / measured pinned-copy GB/s).

    python benchmarks/gpu_thl.py --out $OUT [--tiny]   # --tiny: small shapes, runs on CPU (a check)

Writes gpu_thl.json and gpu_thl.md into --out.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import dynlm
from dynlm.infer.layered import LayeredEngine
from dynlm.train.trainer import TrainStep

T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {message}", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


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
                **overrides: Any) -> dict[str, Any]:
    torch.manual_seed(0)
    model = dynlm.build_model(preset, vocab_size=vocab, **overrides).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    step = TrainStep(model, model, opt, device, dtype, clip=1.0)
    x = torch.randint(0, vocab, (batch, seq_len), device=device)
    peak_reset(device)
    step([x])  # warm-up (and compilation, when the model compiles its step)
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        out = step([x])
    sync(device)
    seconds = (time.perf_counter() - t) / steps
    result = {"preset": preset, "parameters": model.num_parameters(), "batch": batch, "seq_len": seq_len,
              "steps_timed": steps, "seconds_per_step": seconds, "tokens_per_s": batch * seq_len / seconds,
              "loss": float(out.loss), "peak_bytes": peak(device), **overrides}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="small shapes on CPU: checks the script runs")
    parser.add_argument("--budget-s", type=float, default=330.0, help="skip later sections past this")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    git = ["git", "rev-parse", "--short", "HEAD"]  # a copy without .git is told its commit in BENCH_COMMIT
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(git, capture_output=True, text=True,
                                                              cwd=Path(__file__).parent).stdout.strip()
    if args.tiny:
        cfg = dict(vocab=512, train=[("standard-tiny", {}), ("thl-tiny", {})], batch=2, seq=32, steps=1,
                   contexts=[64, 256], decode=4, real=64, layered="standard-tiny", cap=2 * 2**20, batches=[1, 2],
                   last=("thl-tiny", {"compile_step": True}))
    else:
        cfg = dict(vocab=50304, train=[("gpt2-small-like", {}), ("thl-125m", {})], batch=16, seq=256, steps=3,
                   contexts=[1024, 8192, 65536, 262144], decode=32, real=1024, layered="qwen2.5-1.5b",
                   cap=1 * 2**30, batches=[1, 8], last=("thl-125m", {"compile_step": True}))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report: dict[str, Any] = {"device": name, "torch": torch.__version__, "commit": commit, "tiny": args.tiny,
                              "train": [], "decode": [], "layered": None, "skipped": []}
    bandwidth = pinned_bandwidth(device, 1 << 30)
    report["pinned_gb_per_s"] = bandwidth
    log(f"device {name}, pinned host->device {bandwidth} GB/s")
    for preset, overrides in cfg["train"]:
        if time.perf_counter() - T0 > args.budget_s:
            report["skipped"].append(f"train {preset} {overrides}")
            continue
        report["train"].append(train_speed(preset, device, cfg["batch"], cfg["seq"], cfg["steps"], cfg["vocab"],
                                           **overrides))
        log(f"train: {report['train'][-1]}")
    for preset in (cfg["train"][0][0], cfg["train"][1][0]):
        if time.perf_counter() - T0 > args.budget_s:
            report["skipped"].append(f"decode {preset}")
            continue
        report["decode"] += decode_vs_context(preset, device, cfg["contexts"], cfg["vocab"], cfg["decode"], cfg["real"])
    if time.perf_counter() - T0 > args.budget_s:
        report["skipped"].append("layered vs accelerate")
    else:
        report["layered"] = layered_vs_accelerate(cfg["layered"], device, cfg["cap"], cfg["decode"] // 2, cfg["vocab"],
                                                  bandwidth, cfg["batches"])
    preset, overrides = cfg["last"]  # compiling the step takes a while: last, when time is left
    if time.perf_counter() - T0 > args.budget_s:
        report["skipped"].append(f"train {preset} {overrides}")
    else:
        report["train"].append(train_speed(preset, device, cfg["batch"], cfg["seq"], cfg["steps"], cfg["vocab"],
                                           **overrides))
        log(f"train: {report['train'][-1]}")
    report["seconds"] = time.perf_counter() - T0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_thl.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_thl.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    mb = lambda b: "" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    lines = [f"# THL and the layered engine on {r['device']}", "",
             f"torch {r['torch']}, commit {r['commit']}. Produced by `benchmarks/gpu_thl.py`"
             f"{' --tiny (a CPU check, not a measurement)' if r['tiny'] else ''}.", "",
             "## Training tokens/s (same batch and sequence length, bf16 autocast)", "",
             "| model | params | batch x seq | tokens/s | s/step | peak MiB |", "|---|---|---|---|---|---|"]
    for e in r["train"]:
        label = e["preset"] + (" compile_step" if e.get("compile_step") else "")
        lines.append(f"| {label} | {e['parameters'] / 1e6:.1f}M | {e['batch']}x{e['seq_len']} | "
                     f"{e['tokens_per_s']:,.0f} | {e['seconds_per_step']:.3f} | {mb(e['peak_bytes'])} |")
    if len(r["train"]) >= 2:
        base = r["train"][0]["tokens_per_s"]
        lines += ["", "THL / standard: " + ", ".join(
            f"{e['preset']}{' compile_step' if e.get('compile_step') else ''} {e['tokens_per_s'] / base:.3f}x"
            for e in r["train"][1:])]
    lines += ["", "## Decode after N tokens of context (batch 1)", "",
              "| model | context | tokens prefilled | state MiB | peak MiB | decode tokens/s |",
              "|---|---|---|---|---|---|"]
    for e in r["decode"]:
        lines.append(f"| {e['preset']} | {e['context']:,} | {e['prefilled_tokens']:,} | {mb(e['state_bytes'])} | "
                     f"{mb(e['peak_bytes'])} | {e['decode_tokens_per_s']:,.1f} |")
    lines += ["", "THL rows with fewer tokens prefilled than the context: the state after that prefill with its "
              "position advanced to the context (its tensors have fixed shapes; see the script's docstring)."]
    lay = r.get("layered")
    if lay:
        lines += ["", f"## Layered engine vs accelerate CPU offload ({lay['preset']}, bf16, random weights, "
                  f"{lay['weight_bytes'] / 1e9:.2f} GB of weights, GPU cap {lay['cap_bytes'] / 2**30:.2f} GiB)", "",
                  f"Pinned host->device copy: {lay['pinned_gb_per_s'] or 0:.1f} GB/s; batch-1 floor (weight bytes / "
                  f"bandwidth): {lay.get('floor_tokens_per_s_batch1', 0):.2f} tokens/s.", "",
                  "| engine | batch | tokens/s | share of the floor | peak MiB | GB/s copied |",
                  "|---|---|---|---|---|---|"]
        floor = lay.get("floor_tokens_per_s_batch1")
        for key, e in lay.items():
            if key.startswith("layered_batch"):
                batch = int(key[len("layered_batch"):])
                share = "" if not floor else f"{e['tokens_per_s'] / batch / floor:.2f}"
                lines.append(f"| dynlm layered | {batch} | {e['tokens_per_s']:.2f} | {share} | "
                             f"{mb(e['peak_bytes'])} | {e['gb_copied_per_s']:.1f} |")
        if "accelerate_batch1" in lay:
            e = lay["accelerate_batch1"]
            share = "" if not floor else f"{e['tokens_per_s'] / floor:.2f}"
            lines.append(f"| accelerate device_map=auto | 1 | {e['tokens_per_s']:.2f} | {share} | "
                         f"{mb(e['peak_bytes'])} | |")
        if "accelerate_error" in lay:
            lines.append(f"\naccelerate failed: {lay['accelerate_error']}")
    if r["skipped"]:
        lines += ["", "Skipped (time budget): " + "; ".join(r["skipped"])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
