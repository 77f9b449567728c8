"""`dynlm recall`: needle-in-a-haystack recall of any model over a length x depth grid.

    dynlm recall --model runs/quick-agiformer/best --lengths 512,2048,8192 --depths 0.1,0.5,0.9
    dynlm recall --model runs/quick/best --lengths 256,1024 --samples 16 --out recall-standard --force

Writes recall.json (accuracy per cell, the no-needle baseline, a few continuations) and
recall.png (heat map) into --out (default: recall-<model folder name>)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynlm.errors import ConfigError, OutputExistsError


def _numbers(text: str, kind: type, name: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--{name}: expected comma-separated numbers, got '{text}'") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recall", help="needle-in-a-haystack recall over context lengths and depths (JSON + heat map)")
    p.add_argument("--model", required=True, help="checkpoint directory (any architecture)")
    p.add_argument("--lengths", default="512,2048", help="context lengths in the model's tokens (default 512,2048)")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths, 0 = start (default 0.1,0.5,0.9)")
    p.add_argument("--samples", type=int, default=8, help="prompts per cell (default 8)")
    p.add_argument("--corpus", default="shakespeare", help="haystack corpus (default shakespeare)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="haystack split (default test)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-baseline", action="store_true", help="skip the no-needle baseline (halves the time)")
    p.add_argument("--out", type=Path, help="output folder (default recall-<model folder>)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.data.shards import prepare_corpus
    from dynlm.distributed import resolve_device
    from dynlm.eval.recall import plot_recall, recall_grid

    lengths = _numbers(args.lengths, int, "lengths")
    depths = _numbers(args.depths, float, "depths")
    if any(n < 2 for n in lengths):
        raise ConfigError(f"--lengths must be >= 2, got {lengths}")
    model_path = Path(args.model)
    out = args.out or Path(f"recall-{model_path.resolve().name}")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise OutputExistsError(f"{out} is not empty", "pass --force to overwrite recall.json and recall.png")
    model = dynlm.load_pretrained(model_path, device=resolve_device(args.device))
    tokenizer = dynlm.load_tokenizer(model_path)
    texts = prepare_corpus(args.corpus, tokenizer, show_progress=False)[args.split].texts()
    result = recall_grid(model, tokenizer, texts, lengths, depths, samples=args.samples, seed=args.seed,
                         baseline=not args.no_baseline, progress=True)
    result.update({"model": str(model_path), "architecture": model.config.type, "corpus": args.corpus,
                   "split": args.split})
    if hasattr(model, "plasticity"):
        result["plasticity"] = model.plasticity
    out.mkdir(parents=True, exist_ok=True)
    (out / "recall.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_recall(result, out / "recall.png", title=f"{model.config.type}: needle recall")
    for length, row in zip(result["lengths"], result["accuracy"], strict=True):
        cells = "  ".join("  -  " if v is None else f"{v:.2f}" for v in row)
        sys.stderr.write(f"length {length:>6}: {cells}\n")
    sys.stderr.write(f"wrote {out / 'recall.json'} and {out / 'recall.png'}\n")
    return 0
