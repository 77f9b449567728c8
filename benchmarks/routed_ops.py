"""How many operations a training step of the dense, MoD and DTF models dispatches, whole model
and per piece (one dense layer, one routed layer or DTF pair, the LM head with the loss: the pieces
`gpu_routed.py` times), forward and backward.

Eager PyTorch pays a fixed host cost for every operation it dispatches (and a GPU kernel launch
for each one that is not a view), whatever the tensor sizes. A routed layer's compute shrinks
with its capacity; its operation count does not: it is the dense layer's plus the router, top-k,
gather and scatter. Where the GPU finishes faster than the host can issue work, the count sets the
time. The counts do not depend on the shapes, so a tiny body is used; eager, fp32, CPU (bf16
autocast on the GPU adds a cast before each matmul, in every layer alike).

    python benchmarks/routed_ops.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import dynlm

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from gpu_routed import layer_units  # noqa: E402  (the pieces gpu_routed.py times)

# operations that only make a new view of a tensor: no kernel, only the host's dispatch
VIEW_OPS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "expand", "unsqueeze", "squeeze", "t", "transpose",
            "permute", "detach", "alias", "as_strided", "slice", "select", "split", "split_with_sizes", "unbind",
            "chunk"}
LAYERS = 12


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside it: all, and those that are not views."""

    def __init__(self) -> None:
        super().__init__()
        self.all = self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.all += 1
        self.kernels += func.overloadpacket.__name__ not in VIEW_OPS
        return func(*args, **(kwargs or {}))


def count(forward: Callable[[], list[torch.Tensor]]) -> dict[str, int]:
    with OpCounter() as fwd:
        tensors = forward()
    with OpCounter() as bwd:
        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
    return {"forward_ops": fwd.all, "forward_kernel_ops": fwd.kernels,
            "backward_ops": bwd.all, "backward_kernel_ops": bwd.kernels}


def build(variant: str) -> Any:
    torch.manual_seed(0)
    routed = {"routed_layers": list(range(1, LAYERS))} if variant == "mod-all" else {}
    return dynlm.build_model({"type": variant.split("-")[0], "vocab_size": 256, "hidden_size": 64,
                              "num_layers": LAYERS, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 128,
                              "max_position_embeddings": 128, **routed}).train()


def measure() -> dict[str, Any]:
    x = torch.randint(0, 256, (2, 128))
    results: dict[str, Any] = {}
    for variant in ("standard", "mod", "mod-all", "dtf"):
        model = build(variant)

        def step(model=model) -> list[torch.Tensor]:
            out = model(x, labels=x)
            return [out.loss if out.aux_loss is None else out.loss + out.aux_loss]

        results[variant] = {"model": count(step)}
        model.zero_grad(set_to_none=True)
        h = torch.randn(2, 128, 64, requires_grad=True)
        results[variant]["pieces"] = {name: count(unit) for name, unit in layer_units(model, h, x).items()}
    return results


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Operations dispatched by a training step (eager, CPU, fp32)", "",
             f"torch {report['torch']}, commit `{report['commit']}`, {LAYERS} layers; produced by "
             "`benchmarks/routed_ops.py`. Kernel ops: operations that are not views (each one a kernel "
             "launch on the GPU).", "",
             "| model / piece | forward ops | forward kernel ops | backward ops | backward kernel ops |",
             "|---|---|---|---|---|"]
    for variant, r in report["results"].items():
        rows = {f"{variant}: whole model": r["model"]} | {f"{variant}: {k}": v for k, v in r["pieces"].items()}
        for name, c in rows.items():
            lines.append(f"| {name} | {c['forward_ops']} | {c['forward_kernel_ops']} | {c['backward_ops']} | "
                         f"{c['backward_kernel_ops']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for routed_ops_cpu.json and .md")
    parser.add_argument("--commit", help="git commit of the tree measured (when the copy has no .git)")
    args = parser.parse_args(argv)
    report = {"torch": torch.__version__, "commit": provenance.commit(args.commit), "results": measure()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routed_ops_cpu.json").write_text(json.dumps(report, indent=2))
    (args.out / "routed_ops_cpu.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
