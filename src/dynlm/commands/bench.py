"""`dynlm bench`: training and forward tokens/s, MFU, peak memory, decode speed vs context length.

    dynlm bench --preset gpt2-small-like --seq-len 1024 --batch 16 --compile
    dynlm bench --preset gpt2-small-like --compare compile=on,off --compare batch=16,32 --out bench/
    dynlm bench --smoke                      # a tiny model on any device: checks that it all runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dynlm.errors import ConfigError, ContextLengthError
from dynlm.output_dir import check_output_dir, output_dir


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of integers") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="throughput, MFU, memory and decode speed of a model preset")
    p.add_argument("--preset", default="gpt2-small-like", help="model preset (default: gpt2-small-like)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="model config field override, e.g. --set num_layers=6 --set type=mod")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode: default, max-autotune-no-cudagraphs, max-autotune, reduce-overhead")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    p.add_argument("--no-forward", action="store_true", help="skip the forward-only measurement")
    p.add_argument("--decode-contexts", type=_ints, default=[], metavar="N,N,...",
                   help="measure decoding after these context lengths, e.g. 128,1024,8192")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=1)
    p.add_argument("--fused-loss", action="store_true",
                   help="training step with the chunked LM head + loss (never the full logits)")
    p.add_argument("--no-graphs", action="store_true",
                   help="decode eagerly (the reference path) instead of CUDA-graph steps on a static cache")
    p.add_argument("--compare", action="append", default=[], metavar="KEY=A,B",
                   help="variants measured in this run: compile=on,off | compile_mode=default,max-autotune | "
                        "graphs=on,off | fused_loss=on,off | batch=16,32 | seq_len=.. | dtype=.. | "
                        "model=PRESET,PRESET (repeatable; all combinations)")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU when it is not in the known table")
    p.add_argument("--out", type=Path, help="write bench.json and bench.md into this folder")
    p.add_argument("--force", action="store_true", help="replace the contents of a non-empty --out folder")
    p.add_argument("--smoke", action="store_true", help="tiny model, few steps: check that everything runs")
    p.set_defaults(handler=run)


def _check_decode_contexts(cfg: Any) -> None:
    """Decoding past the model's positions measures a model that cannot exist (and allocates a
    cache for it): refuse, and say how to measure longer contexts on purpose."""
    from dynlm.config import model_config

    if not cfg.decode_contexts:
        return
    positions = model_config(cfg.model, **cfg.overrides).max_position_embeddings
    longest = max(cfg.decode_contexts) + cfg.decode_tokens
    if longest > positions:
        raise ContextLengthError(
            f"--decode-contexts {max(cfg.decode_contexts)} + --decode-tokens {cfg.decode_tokens} = {longest} tokens "
            f"exceed the {positions} positions of '{cfg.model}'",
            f"use contexts up to {positions - cfg.decode_tokens}, or --set max_position_embeddings={longest}")


def run(args: argparse.Namespace) -> int:
    from dynlm.config import parse_overrides
    from dynlm.train.bench import BenchConfig, expand, parse_compare, run_suite, to_markdown, write_suite

    overrides = parse_overrides(args.set) if args.set else {}
    cfg = BenchConfig(model=args.preset, overrides=overrides, seq_len=args.seq_len, batch=args.batch,
                      compile=args.compile, compile_mode=args.compile_mode, dtype=args.dtype, device=args.device,
                      steps=args.steps,
                      warmup=args.warmup, train=not args.no_train, forward=not args.no_forward,
                      decode_contexts=args.decode_contexts, decode_tokens=args.decode_tokens,
                      decode_batch=args.decode_batch, graphs=not args.no_graphs, fused_loss=args.fused_loss,
                      peak_tflops=args.peak_tflops)
    if args.smoke:
        cfg = BenchConfig(model="standard-tiny", overrides=overrides, seq_len=64, batch=4, compile=args.compile,
                          dtype=args.dtype, device=args.device, steps=3, warmup=1, train=not args.no_train,
                          forward=not args.no_forward, decode_contexts=args.decode_contexts or [16, 64],
                          decode_tokens=8, graphs=not args.no_graphs, fused_loss=args.fused_loss,
                          peak_tflops=args.peak_tflops)
    if not (cfg.train or cfg.forward or cfg.decode_contexts):
        raise ConfigError("nothing to measure", "drop --no-train/--no-forward or give --decode-contexts")
    configs = expand(cfg, parse_compare(args.compare))
    for config in configs:
        _check_decode_contexts(config)
    if args.out:
        check_output_dir(args.out, args.force)

    def say(message: str) -> None:
        sys.stderr.write(message + "\n")

    suite = run_suite(configs, title=f"dynlm bench: {cfg.model}", progress=say)
    if args.out:
        with output_dir(args.out, args.force) as staged:
            json_path, md_path = write_suite(suite, staged)
        say(f"wrote {args.out / json_path.name} and {args.out / md_path.name}")
    print(to_markdown(suite))
    return 0
