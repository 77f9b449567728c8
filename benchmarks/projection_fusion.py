"""Does fusing the q/k/v (and gate/up) projections into one matmul pay? Training-step cost
(forward + backward) of three ways to compute several projections of the same input, measured
interleaved in one process, eager and under `torch.compile`:

- separate: one `F.linear` per projection (what `nn.Linear` modules do);
- cat_per_step: the weights concatenated at every step, one matmul, outputs split (what
  `nn/linear.py` did before this benchmark);
- stored_fused: one parameter holding the concatenated weights, one matmul, outputs split (what
  storing fused parameters would give).

    python benchmarks/projection_fusion.py [--out benchmarks/results] [--repeats 7]

Writes projection_fusion_cpu.json and projection_fusion_cpu.md into --out. Reported: time
relative to `separate`, the median (and range) over repeats of the ratio of adjacent timings
(the machine may be shared; absolute times are not reported as results).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from report_files import git_commit, write_report

# (name, hidden size, output widths of the fused group, tokens per step)
SHAPES = [
    ("quick attention q/k/v", 128, (128, 64, 64), 2048),
    ("quick MLP gate/up", 128, (512, 512), 2048),
    ("qwen2.5-0.5b attention q/k/v", 896, (896, 128, 128), 512),
    ("qwen2.5-0.5b MLP gate/up", 896, (4864, 4864), 512),
]
VARIANTS = ("separate", "cat_per_step", "stored_fused")


def separate(x: torch.Tensor, weights: list[torch.Tensor], fused: torch.Tensor) -> torch.Tensor:
    return sum(F.linear(x, w).sum() for w in weights)


def cat_per_step(x: torch.Tensor, weights: list[torch.Tensor], fused: torch.Tensor) -> torch.Tensor:
    outs = F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
    return sum(o.sum() for o in outs)


def stored_fused(x: torch.Tensor, weights: list[torch.Tensor], fused: torch.Tensor) -> torch.Tensor:
    outs = F.linear(x, fused).split([w.shape[0] for w in weights], dim=-1)
    return sum(o.sum() for o in outs)


FUNCTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "separate": separate, "cat_per_step": cat_per_step, "stored_fused": stored_fused}


def step_seconds(fn: Callable[..., torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                 fused: torch.Tensor, iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        loss = fn(x, weights, fused)
        loss.backward()
    return (time.perf_counter() - t0) / iters


def measure(hidden: int, widths: tuple[int, ...], tokens: int, compiled: bool, repeats: int,
            iters: int) -> dict[str, Any]:
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, requires_grad=True)
    weights = [(torch.randn(w, hidden) * hidden**-0.5).requires_grad_() for w in widths]
    fused = torch.cat([w.detach() for w in weights]).requires_grad_()
    fns = {name: torch.compile(fn, dynamic=False) if compiled else fn for name, fn in FUNCTIONS.items()}
    # same results: the comparison is between equal computations
    reference = separate(x, weights, fused).item()
    for name, fn in fns.items():
        value = fn(x, weights, fused).item()
        if abs(value - reference) > 1e-3 * max(1.0, abs(reference)):
            raise AssertionError(f"{name} computes {value}, separate {reference}")
        step_seconds(fn, x, weights, fused, 2)  # warm-up (and compilation)
    ratios: dict[str, list[float]] = {name: [] for name in VARIANTS[1:]}
    for _ in range(repeats):  # adjacent timings: a slow period of a shared machine hits every variant
        base = step_seconds(fns["separate"], x, weights, fused, iters)
        for name in VARIANTS[1:]:
            ratios[name].append(step_seconds(fns[name], x, weights, fused, iters) / base)
    return {"ratio_to_separate": {name: statistics.median(values) for name, values in ratios.items()},
            "ratio_range": {name: [min(values), max(values)] for name, values in ratios.items()},
            "repeats": repeats, "iters_per_repeat": iters}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {
        "device": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "commit": git_commit(),
        "note": "forward + backward of the projections only; variants interleaved in one process; "
                "the machine was shared with other jobs",
        "results": []}
    for compiled in (False, True):
        for name, hidden, widths, tokens in SHAPES:
            row = measure(hidden, widths, tokens, compiled, args.repeats, args.iters)
            report["results"].append({"shape": name, "hidden": hidden, "widths": list(widths), "tokens": tokens,
                                      "compiled": compiled, **row})
            print(json.dumps(report["results"][-1]), flush=True)
    rows = [[f"{r['shape']} ({r['tokens']} tokens)", "yes" if r["compiled"] else "no"]
            + [f"{r['ratio_to_separate'][name]:.2f} ({r['ratio_range'][name][0]:.2f}-{r['ratio_range'][name][1]:.2f})"
               for name in VARIANTS[1:]] for r in report["results"]]
    write_report(args.out, "projection_fusion_cpu", report,
                 "Fused projections on CPU: training-step cost relative to separate matmuls",
                 f"{report['device']}, torch {report['torch']}, commit `{report['commit']}`. {report['note']}.",
                 ["shape", "compiled", "cat per step / separate (median, range)",
                  "stored fused / separate (median, range)"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
