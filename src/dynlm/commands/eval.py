"""`dynlm eval`: nats per token, perplexity and bits per byte of a model on a corpus split or files.

    dynlm eval --model runs/my_run/best --corpus shakespeare --split test
    dynlm eval --model smollm2.gguf --text essay.txt --seq-len 512 --stride 256

The JSON result goes to stdout (and to --output FILE); a one-line summary to stderr."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dynlm.errors import ConfigError, ContextLengthError
from dynlm.fileio import read_text_exact


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a model on a corpus split or texts")
    p.add_argument("--model", required=True, help="checkpoint directory, Hugging Face directory or .gguf file")
    p.add_argument("--corpus", help="corpus name, folder or glob (default: the one the model was trained on, else "
                                    "shakespeare); a single file is scored whole, like --text")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default: test")
    p.add_argument("--text", action="append", type=Path, default=[],
                   help="evaluate these UTF-8 files instead of a corpus split (repeatable; one document each)")
    p.add_argument("--seq-len", type=int,
                   help="context window (default: the training seq_len, else up to 1024); at most the model's "
                        "positions: longer texts are scored by sliding this window (see --stride)")
    p.add_argument("--stride", type=int, help="new tokens scored per window (default: seq_len // 2)")
    p.add_argument("--max-bytes", type=int, help="score about this many bytes, in evenly spaced pieces")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype (auto: bfloat16 on CUDA)")
    p.add_argument("--routing", choices=["causal", "topk"],
                   help="routed models (mod, dtf): decide with the causal router, as generation does (default), "
                        "or with top-k over each window; the result also reports the causal router's agreement "
                        "with top-k")
    p.add_argument("--output", "-o", type=Path, help="also write the JSON result to this file")
    p.add_argument("--progress", action="store_true", help="show a progress bar")
    p.set_defaults(handler=run)


def read_text_file(path: Path, flag: str) -> str:
    if not path.is_file():
        raise ConfigError(f"{flag} '{path}' not found")
    return read_text_exact(path)  # bytes that are not UTF-8 are kept (dynlm.fileio)


def check_seq_len(model: object, seq_len: int | None) -> None:
    """A window longer than the model's positions is refused: the evaluator slides a window of
    at most that many tokens over a longer text instead."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if seq_len is not None and positions and seq_len > positions:
        raise ContextLengthError(f"--seq-len {seq_len} exceeds the model's {positions} positions",
                                 f"use --seq-len {positions} or less; longer texts are scored by sliding the window")


def routing_line(model: object, report: dict) -> str:
    """The causal router's agreement with top-k, beside what a router that never routes would
    score (1 - capacity), and a warning when it routes far below the trained capacity."""
    capacities = list(model.routed_capacities().values()) if hasattr(model, "routed_capacities") else []
    capacity = sum(capacities) / len(capacities) if capacities else None
    line = (f"routing: {report['routing']}; the causal router agrees with top-k on {report['route/causal_acc']:.1%} "
            f"of tokens and routes {report['route/causal_frac']:.1%} of them")
    if capacity is None:
        return line + " (top-k: the capacity)\n"
    line += f" (top-k routes the capacity, {capacity:.1%}; a router that never routes agrees on {1 - capacity:.1%})\n"
    if report["route/causal_frac"] < capacity / 2:
        line += (f"warning: the causal router routes {report['route/causal_frac']:.1%} of tokens, far below the "
                 f"trained capacity {capacity:.1%}: its agreement is mostly the never-route baseline (train longer, "
                 "or evaluate with --routing topk)\n")
    return line


def run(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.distributed import resolve_device, resolve_dtype
    from dynlm.eval import evaluate
    from dynlm.interop import resolve_named_source
    from dynlm.weights.loading import read_training_info

    for name in ("seq_len", "stride", "max_bytes", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    model_path = resolve_named_source(args.model, lambda message: sys.stderr.write(message + "\n"))
    info = read_training_info(model_path)  # every checkpoint form: the run's seq_len, corpus, splits
    device = resolve_device(args.device, what="--device")
    dtype = resolve_dtype(args.dtype, device)
    model = dynlm.load_pretrained(model_path, device=device)
    tokenizer = dynlm.load_tokenizer(model_path)
    check_seq_len(model, args.seq_len)
    seq_len = args.seq_len or info.get("seq_len")
    if args.routing and not hasattr(model, "set_routing"):
        raise ConfigError(f"--routing applies to routed models (mod, dtf), not '{model.architecture}'")
    if hasattr(model, "set_routing"):
        model.set_routing(args.routing or "causal")

    if args.text and args.corpus:
        raise ConfigError("give --text or --corpus, not both")
    if args.corpus and Path(args.corpus).is_file():  # one file: the user means that whole text
        sys.stderr.write(f"--corpus {args.corpus} is a single file: scoring all of it as one document "
                         "(--split applies to corpora of several documents)\n")
        source, what = [read_text_file(Path(args.corpus), "--corpus")], f"{args.corpus} (whole file)"
    elif args.text:
        source, what = [read_text_file(path, "--text") for path in args.text], ", ".join(str(p) for p in args.text)
    else:
        from dynlm.data.corpora import DEFAULT_CORPUS, DEFAULT_SPLITS
        from dynlm.data.shards import prepare_corpus

        corpus = args.corpus or info.get("corpus") or DEFAULT_CORPUS
        splits = tuple(info.get("splits") or DEFAULT_SPLITS) if not args.corpus or args.corpus == info.get(
            "corpus") else DEFAULT_SPLITS
        source = prepare_corpus(corpus, tokenizer, splits=splits, show_progress=args.progress)
        what = f"{corpus} ({args.split})"
    result = evaluate(model, tokenizer, source, split=args.split, seq_len=seq_len, stride=args.stride,
                      batch_size=args.batch_size, max_bytes=args.max_bytes, dtype=dtype, progress=args.progress)
    result = {"model": str(model_path), "data": what, "architecture": model.architecture,
              "parameters": model.num_parameters(), **result}
    if hasattr(model, "routing_report"):
        from dynlm.eval.evaluate import encode_documents

        tokens = source[args.split].tokens if isinstance(source, dict) else encode_documents(tokenizer, source)[0]
        report = result["routing_report"] = model.routing_report(tokens, result["seq_len"])
        if report:
            sys.stderr.write(routing_line(model, report))
    text = json.dumps(result, indent=2)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    bpc = f", {result['bpc']:.4f} bits/char" if "bpc" in result else ""
    sys.stderr.write(f"{what}: {result['bpb']:.4f} bits per byte{bpc}, {result['loss_nats']:.4f} nats/token, "
                     f"ppl {result['ppl']:.2f} ({result['num_tokens']:,} tokens, {result['num_bytes']:,} bytes, "
                     f"seq_len {result['seq_len']}, stride {result['stride']})\n")
    print(text)
    return 0
