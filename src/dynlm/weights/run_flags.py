"""The flags of `dynlm weights numpy-run` and `python -m dynlm.weights.numpy_runtime`, defined once.
Standard library only: the CLI builds its parser without importing NumPy."""

from __future__ import annotations

import argparse


def add_numpy_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", help="code checkpoint folder")
    parser.add_argument("--prompt", default="", help="prompt text")
    parser.add_argument("--ids", help="prompt as comma-separated token ids instead of text")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int)
