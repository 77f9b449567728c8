"""A small `dynlm kasgarli` run on CPU, recorded with the device and commit.

    python benchmarks/kasgarli_cpu.py --commit SHA [--out benchmarks/results] [-- kasgarli options...]

Runs `dynlm kasgarli` with the given options (default: a tiny budget that fits a shared CPU) into a
temporary folder and writes kasgarli_cpu.json / .md / .png into --out."""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from dynlm.cli import main as dynlm_main

DEFAULT = ["--budget-bytes", "8K", "--byte-preset", "agiformer-tiny", "--languages", "tr,en,ar", "--batch-size", "4",
           "--seq-len", "64", "--vocab", "512"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("options", nargs="*", help="dynlm kasgarli options (default: a tiny CPU budget)")
    args = parser.parse_args(argv)
    options = args.options or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "kasgarli"
        code = dynlm_main(["kasgarli", *options, "--out", str(folder)])
        if code:
            return code
        report = json.loads((folder / "kasgarli.json").read_text())
        device = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, shared)"
        report.update({"device": device, "commit": args.commit, "command": "dynlm kasgarli " + " ".join(options)})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kasgarli_cpu.json").write_text(json.dumps(report, indent=2) + "\n")
        table = (folder / "kasgarli.md").read_text()
        (args.out / "kasgarli_cpu.md").write_text(
            table + f"\n{device}, commit {args.commit}, `{report['command']}`; produced by "
            "`benchmarks/kasgarli_cpu.py`.\n")
        shutil.copy(folder / "kasgarli.png", args.out / "kasgarli_cpu.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
