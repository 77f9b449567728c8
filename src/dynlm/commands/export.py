"""`dynlm export onnx CKPT OUT.onnx`: the decode step of a recurrent model (state in, state out)."""

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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.interop.onnx import export_onnx

    model = dynlm.load_pretrained(args.checkpoint)
    path = export_onnx(model, args.output, force=args.force, opset=args.opset)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
