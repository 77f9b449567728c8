"""Where the time goes: torch.profiler tables for one model's decode step and training step.

    python benchmarks/profile_step.py --preset gpt2-small-like --out DIR   (CUDA; --smoke on CPU)
    python benchmarks/profile_step.py --preset qwen2.5-0.5b --context 128 --parts graph-decode --out DIR

Parts (`--parts`): `decode`, the eager one-token step; `graph-decode`, the step as `dynlm generate
--compile` runs it on CUDA (`GraphDecoder`'s defaults: inductor-compiled step with q|k|v and
gate|up fused, captured in a CUDA graph, "auto" decode attention), with the kernels a replayed
step launches counted and their device time summed (the gap between that and the step's wall
time is what launches and idle cost); `train`, an eager
forward+backward. Writes profile_<preset>[_<context>].txt (top operators by device and host time)
into DIR, and for graph-decode a JSON line with the counts beside it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import dynlm
from dynlm.infer.graphs import GraphDecoder

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

PARTS = ("decode", "graph-decode", "train")


def sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def profile_decode(model: torch.nn.Module, context: int, cuda: bool, report: list[str]) -> None:
    """The eager one-token step on the growable KV cache."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    device = next(model.parameters()).device
    prompt = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    with torch.inference_mode():
        out = model(prompt, state=model.init_state(1, max_length=context + 64))
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(8):  # warm-up
            out = model(token, state=out.state)
            token = out.logits[:, -1:].argmax(-1)
        sync(cuda)
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(16):
                out = model(token, state=out.state)
                token = out.logits[:, -1:].argmax(-1)
            sync(cuda)
        seconds = time.perf_counter() - start
    report.append(f"## eager decode, context {context}: {1000 * seconds / 16:.2f} ms/token (profiled)\n")
    report.append(prof.key_averages().table(sort_by=sort, row_limit=25))
    report.append(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))


def profile_graph_decode(model: torch.nn.Module, batch: int, context: int, cuda: bool,
                         report: list[str]) -> dict[str, Any]:
    """The decode step as `dynlm generate --compile` runs it: one replay per token. Counts the
    device kernels (and copies) of the profiled steps, per step, with their summed device time."""
    steps, warmup = 32, 8
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(batch * context)
    prompts = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device)
    decoder = GraphDecoder(model, compile="default" if cuda else None, decode_attention="auto")
    with torch.no_grad():
        token = decoder.prefill(prompts, steps + 2 * warmup).argmax(-1)
        for _ in range(warmup):  # compilation and capture happen here
            token = decoder.step(token).argmax(-1)
        sync(cuda)
        start = time.perf_counter()
        for _ in range(warmup):
            token = decoder.step(token).argmax(-1)
        sync(cuda)
        unprofiled_ms = 1000 * (time.perf_counter() - start) / warmup
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(steps):
                token = decoder.step(token).argmax(-1)
            sync(cuda)
    device_events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    kernel_us = sum(e.device_time_total for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time_total)
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:25]
    counts = {"batch": batch, "context": context, "steps_profiled": steps, "ms_per_step": unprofiled_ms,
              "graph_steps": decoder.graph_steps, "eager_steps": decoder.eager_steps,
              "fused_projections": decoder.fused is not None,
              "kernels_per_step": len(kernels) / steps, "copies_per_step": (len(device_events) - len(kernels)) / steps,
              "kernel_ms_per_step": kernel_us / 1000 / steps,
              "mean_kernel_us": kernel_us / max(len(kernels), 1)}
    report.append(f"## graph decode (compiled step, CUDA graph, auto attention), batch {batch}, context {context}\n")
    report.append(json.dumps(counts) + "\n")
    lines = ["| kernel | calls per step | us per step | us per call |", "|---|---|---|---|"]
    lines += [f"| {name[:90]} | {len(times) / steps:.1f} | {sum(times) / steps:.1f} | {sum(times) / len(times):.2f} |"
              for name, times in top]
    report.append("\n".join(lines) + "\n")
    return counts


def profile_train(preset: str, cuda: bool, dtype: torch.dtype, report: list[str]) -> None:
    """An eager forward+backward under bf16 autocast."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    device = torch.device("cuda" if cuda else "cpu")
    model = dynlm.build_model(preset).to(device).train()
    vocab = model.config.vocab_size
    x = torch.randint(0, vocab, (8 if cuda else 2, 1024 if cuda else 64), device=device)
    for _ in range(3):
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            model(x, labels=x).loss.backward()
    with profile(activities=activities) as prof:
        with torch.autocast(device.type, dtype=dtype, enabled=cuda):
            model(x, labels=x).loss.backward()
        sync(cuda)
    report.append(f"## eager training forward+backward, batch {x.shape[0]} x {x.shape[1]}\n")
    report.append(prof.key_averages().table(sort_by=sort, row_limit=30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small-like")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded at once (graph-decode)")
    parser.add_argument("--parts", default="decode,train", help="comma-separated: decode, graph-decode, train")
    parser.add_argument("--commit", default=None, help="the git commit measured (a copy without .git)")
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    args = parser.parse_args()
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not parts or set(parts) - set(PARTS):
        parser.error(f"--parts must be a comma-separated subset of {','.join(PARTS)}, got '{args.parts}'")
    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    preset = "standard-tiny" if args.smoke else args.preset
    dtype = torch.bfloat16 if cuda else torch.float32
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    commit = provenance.commit(args.commit)
    report = [f"# {preset} on {name}, torch {torch.__version__}, commit {commit}\n",
              f"Produced by `benchmarks/profile_step.py --preset {preset} --context {args.context} "
              f"--batch {args.batch} --parts {args.parts}`.\n"]
    if "decode" in parts or "graph-decode" in parts:
        model = dynlm.build_model(preset).to(device=device, dtype=dtype).eval()
        if "decode" in parts:
            profile_decode(model, args.context, cuda, report)
        if "graph-decode" in parts:
            counts = profile_graph_decode(model, args.batch, args.context, cuda, report)
            print(json.dumps(counts))
        del model
    if "train" in parts:
        profile_train(preset, cuda, dtype, report)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.context == 512 and args.batch == 1 else f"_b{args.batch}_ctx{args.context}"
    path = args.out / f"profile_{preset}{suffix}.txt"
    path.write_text("\n".join(report))
    print("\n".join(report[:4]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
