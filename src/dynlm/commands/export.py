"""`dynlm export onnx CKPT OUT.onnx`: a model's decode step (token and state in, logits and state
out): THL's recurrent state, or a standard / MoD transformer's static KV cache of
`--max-context` positions."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model to another runtime's format")
    formats = p.add_subparsers(dest="format", required=True)
    onnx = formats.add_parser("onnx", help="the decode step (token and state in, logits and state out) as ONNX")
    onnx.add_argument("checkpoint", type=Path, help="checkpoint directory")
    onnx.add_argument("output", type=Path, help="output .onnx file")
    onnx.add_argument("--force", action="store_true", help="overwrite an existing output file")
    onnx.add_argument("--opset", type=int, default=17)
    onnx.add_argument("--max-context", type=int,
                      help="positions of a transformer's KV cache in the exported step (default: 256)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.interop.onnx import export_onnx

    model = dynlm.load_pretrained(args.checkpoint)
    context = {} if args.max_context is None else {"max_context": args.max_context}
    path = export_onnx(model, args.output, force=args.force, opset=args.opset, **context)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
