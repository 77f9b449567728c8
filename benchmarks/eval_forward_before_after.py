"""Evaluation-forward throughput before and after explicit caching, in one process.

Before, an eval-mode forward without a state silently allocated a KV cache, so every evaluation
forward ran attention with explicit masks through the cache (and routed layers through the
masked cached path). Now a plain forward allocates nothing and dense attention takes SDPA's
causal kernel. This script loads the library as it was at `--before` (a git commit, copied from
`git archive` under the package name `dynlm_before`) next to the current one, builds each model
with the same weights in both, checks that they give the same logits, and times eval-mode
forwards (no gradients) of both, interleaved.

    python benchmarks/eval_forward_before_after.py --before 54f328b [--out benchmarks/results]

Writes eval_forward_before_after_cpu.json and .md into --out. Reported: tokens/s after / before,
the median (and range) over repeats of the ratio of two adjacent timings (absolute CPU times on a
shared machine are not results).
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import platform
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import dynlm
from report_files import git_commit, write_report

MODELS = ("standard-quick", "mod-quick", "dtf-quick")
BEFORE_PACKAGE = "dynlm_before"


def load_before(ref: str, root: Path) -> Any:
    """The `dynlm` package at git commit `ref`, importable as `dynlm_before`."""
    archive = subprocess.run(["git", "archive", ref, "src/dynlm"], capture_output=True, check=True,
                             cwd=Path(__file__).resolve().parent.parent).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    package = root / BEFORE_PACKAGE
    (root / "src" / "dynlm").rename(package)
    pattern = re.compile(r"(?<![\w/.-])dynlm(?=[.\s\"'])")
    for path in package.rglob("*.py"):
        path.write_text(pattern.sub(BEFORE_PACKAGE, path.read_text()))
    sys.path.insert(0, str(root))
    return importlib.import_module(BEFORE_PACKAGE)


def tokens_per_second(model: torch.nn.Module, x: torch.Tensor, iters: int) -> float:
    t0 = time.perf_counter()
    with torch.no_grad():
        for _ in range(iters):
            model(x)
    return iters * x.numel() / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git commit of the library before the change")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args(argv)
    before_commit = git_commit(args.before)
    report: dict[str, Any] = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "before_commit": before_commit, "after_commit": git_commit(),
        "batch": args.batch,
        "note": "eval-mode forward without a state, no gradients, float32; before and after interleaved "
                "in one process; the machine was shared with other jobs",
        "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        before_lib = load_before(before_commit, Path(tmp))
        for preset in MODELS:
            torch.manual_seed(0)
            after = dynlm.build_model(preset).eval()
            before = before_lib.build_model(preset).eval()
            before.load_state_dict(after.state_dict())
            for seq_len in args.seq_lens:
                x = torch.randint(0, after.config.vocab_size, (args.batch, seq_len),
                                  generator=torch.Generator().manual_seed(1))
                with torch.no_grad():
                    difference = (after(x).logits - before(x).logits).abs().max().item()
                if difference > 1e-4:
                    raise AssertionError(f"{preset}: logits differ by {difference} between before and after")
                for model in (before, after):
                    tokens_per_second(model, x, 1)  # warm-up
                ratios = []
                for _ in range(args.repeats):  # adjacent timings: a slow period hits both
                    slow = tokens_per_second(before, x, args.iters)
                    ratios.append(tokens_per_second(after, x, args.iters) / slow)
                row = {"model": preset, "seq_len": seq_len, "after_over_before_median": statistics.median(ratios),
                       "after_over_before_min": min(ratios), "after_over_before_max": max(ratios),
                       "max_abs_logit_difference": difference, "repeats": args.repeats,
                       "iters_per_repeat": args.iters}
                report["results"].append(row)
                print(json.dumps(row), flush=True)
    rows = [[r["model"], str(r["seq_len"]), f"{r['after_over_before_median']:.2f}",
             f"{r['after_over_before_min']:.2f}-{r['after_over_before_max']:.2f}",
             f"{r['max_abs_logit_difference']:.1e}"] for r in report["results"]]
    write_report(args.out, "eval_forward_before_after_cpu", report,
                 "Evaluation forward before and after explicit caching (CPU)",
                 f"{report['device']}, torch {report['torch']}; before `{before_commit[:12]}`, after "
                 f"`{report['after_commit'][:12]}`; batch {args.batch}. {report['note']}.",
                 ["model", "tokens", "tokens/s after / before (median)", "range over repeats",
                  "max abs logit difference"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
