"""GPU figures of the standard model: gpt2-small-like (~124M parameters) at seq 1024, bf16.

    python benchmarks/gpu_standard.py --out benchmarks/results/gpu_standard      # on a CUDA GPU
    python benchmarks/gpu_standard.py --smoke --out /tmp/gpu_standard_smoke      # tiny, any device

Measures, in one process (so the ratios compare like with like):
  * training tokens/s and MFU with torch.compile off and on, at batch 16 and 32 (random tokens,
    the trainer's own step: bf16 autocast, fused AdamW, clipping, device-side NaN guard);
  * forward-only tokens/s (the evaluation path);
  * decode tokens/s and KV-cache bytes after contexts of 128 ... 8192 tokens (batch 1).
Writes gpu_standard.json and gpu_standard.md to --out. About 3-5 minutes on an H100, most of it
compiling. nanoGPT's published figures for the same shape are quoted for scale, not re-measured."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dynlm.train.bench import BenchConfig, run_suite, to_markdown

# nanoGPT's GPT-2 124M benchmark (compile, bf16, random tokens, seq 1024) on an H100, 989 TFLOP/s peak
NANOGPT_H100 = {16: 448_000, 32: 475_000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_standard.json and .md")
    parser.add_argument("--smoke", action="store_true", help="tiny model and shapes: check it runs anywhere")
    parser.add_argument("--batches", default="16,32", help="training batch sizes (default 16,32)")
    parser.add_argument("--contexts", default="128,512,1024,2048,4096,8192", help="decode context lengths")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per variant")
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per variant (compilation included)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled variants (e.g. max-autotune-no-cudagraphs)")
    args = parser.parse_args(argv)

    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(c) for c in args.contexts.split(",")]
    base = dict(model="gpt2-small-like", seq_len=1024, dtype="auto", device="auto", steps=args.steps,
                warmup=args.warmup)
    if args.smoke:
        base.update(model="standard-tiny", seq_len=64, steps=3, warmup=1)
        batches, contexts = [2, 4], [16, 64]
    elif not torch.cuda.is_available():
        print("gpu_standard: no CUDA device; run with --smoke to check the script on this machine", file=sys.stderr)
        return 2

    configs = []
    for batch in batches:
        for compile_ in ([False] if args.no_compile else [False, True]):
            configs.append(BenchConfig(**base, batch=batch, compile=compile_, compile_mode=args.compile_mode,
                                       train=True, forward=batch == batches[0] and not compile_,
                                       label=f"batch={batch} compile={'on' if compile_ else 'off'}"))
    configs.append(BenchConfig(**base, batch=1, train=False, forward=False, decode_contexts=contexts,
                               decode_tokens=8 if args.smoke else 64, label="decode"))

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    suite = run_suite(configs, title="Standard model (gpt2-small-like) on one GPU" if not args.smoke
                      else "gpu_standard smoke run (tiny model)", progress=say)
    suite["cuda"] = torch.version.cuda
    suite["summary"] = summarize(suite, smoke=args.smoke)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_standard.json").write_text(json.dumps(suite, indent=2) + "\n")
    markdown = to_markdown(suite) + "\n" + summary_markdown(suite["summary"]) + "\n"
    (args.out / "gpu_standard.md").write_text(markdown)
    print(markdown)
    say(f"wrote {args.out / 'gpu_standard.json'} and {args.out / 'gpu_standard.md'}")
    return 0


def summarize(suite: dict, smoke: bool) -> dict:
    """Compile on/off ratio per batch, and the ratio to nanoGPT's quoted H100 figure."""
    rows = {}
    for r in suite["results"]:
        if "train" not in r:
            continue
        c, t = r["config"], r["train"]
        rows.setdefault(c["batch"], {})["on" if c["compile"] else "off"] = t
    summary = {}
    for batch, by_compile in rows.items():
        entry = {k: {"tokens_per_s": v["tokens_per_s"], "mfu": v["mfu"]} for k, v in by_compile.items()}
        if "on" in by_compile and "off" in by_compile:
            entry["compile_speedup"] = by_compile["on"]["tokens_per_s"] / by_compile["off"]["tokens_per_s"]
        best = max(by_compile.values(), key=lambda v: v["tokens_per_s"])
        if not smoke and batch in NANOGPT_H100:
            entry["vs_nanogpt_h100"] = best["tokens_per_s"] / NANOGPT_H100[batch]
        summary[batch] = entry
    return summary


def summary_markdown(summary: dict) -> str:
    lines = ["## Summary", "",
             "| batch | tokens/s compile off | compile on | compile speed-up | best MFU | vs nanoGPT H100 (quoted) |",
             "|---|---|---|---|---|---|"]
    for batch, e in summary.items():
        off, on = e.get("off"), e.get("on")
        mfus = [v["mfu"] for v in (off, on) if v and v["mfu"] is not None]
        lines.append(
            f"| {batch} | {off['tokens_per_s']:,.0f} | " if off else f"| {batch} | - | ")
        lines[-1] += (f"{on['tokens_per_s']:,.0f} | " if on else "- | ")
        lines[-1] += (f"{e['compile_speedup']:.2f}x | " if "compile_speedup" in e else "- | ")
        lines[-1] += (f"{100 * max(mfus):.1f}% | " if mfus else "n/a | ")
        lines[-1] += (f"{e['vs_nanogpt_h100']:.2f}x |" if "vs_nanogpt_h100" in e else "- |")
    lines += ["", "nanoGPT's figures (GPT-2 124M, compile, bf16, random tokens, H100): 448K tokens/s at batch 16, "
              "475K at batch 32 (38.7% / 41.1% MFU of 989 TFLOP/s), quoted from its benchmark, not re-measured here."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
