"""Inference-time fusion of linear projections that read the same input: q, k, v of `Attention`
(one matmul instead of three) and gate, up of `SwiGLU` (one instead of two).

A small decode step is bound by kernel launches and per-matmul latency, not by reading the
weights: a fused matmul reads the same bytes in fewer, larger kernels. The fused weights are
copies (concatenated along the output dimension) kept outside the module's parameters, so
training, `state_dict`, checkpoints and interop see the separate projections unchanged; they cost
the memory of the fused projections once more (for Qwen2.5-0.5B, q/k/v and gate/up of 24
layers: about two thirds of the weights outside the embedding).

    fused = FusedProjections(model)   # builds the copies
    with fused.applied():             # modules project through the copies inside this block
        logits = model(ids, state=state)
    fused.refresh()                   # after the weights changed: copy them again (in place)

A module fuses through its class attribute `FUSABLE` (the names of its nn.Linear children that
read one input, in output order) and its `fused` attribute (None, or the weight [sum of outputs,
in] and bias of the concatenation), which its forward uses when set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def fusable_linears(module: nn.Module) -> list[nn.Linear] | None:
    """The module's projections to fuse, in output order; None if it has none or any of them is
    not a plain `nn.Linear` (a quantized one has no float weight to concatenate)."""
    names = getattr(type(module), "FUSABLE", ())
    linears = [getattr(module, name) for name in names]
    if not linears or not all(type(linear) is nn.Linear for linear in linears):
        return None
    if len({linear.bias is None for linear in linears}) > 1:
        return None  # some with bias, some without: left unfused
    return linears


def concatenated(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight [sum of outputs, in] and bias of `linears` as one projection (differentiable:
    under grad, gradients reach the separate parameters)."""
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    return torch.cat([linear.weight for linear in linears]), bias


class FusedProjections:
    """The fused copies of every fusable module of `model` (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.groups: list[tuple[nn.Module, list[nn.Linear], tuple[torch.Tensor, torch.Tensor | None]]] = []
        with torch.no_grad():
            for module in model.modules():
                linears = fusable_linears(module)
                if linears is None:
                    continue
                self.groups.append((module, linears, concatenated(linears)))

    def refresh(self) -> None:
        """Copy the projections' current weights into the fused tensors (in place: their
        addresses, which a captured graph reads, stay the same)."""
        with torch.no_grad():
            for _, linears, (weight, bias) in self.groups:
                torch.cat([linear.weight for linear in linears], out=weight)
                if bias is not None:
                    torch.cat([linear.bias for linear in linears], out=bias)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The modules project through the fused tensors inside the block, through their own
        parameters again after it."""
        for module, _, fused in self.groups:
            module.fused = fused
        try:
            yield
        finally:
            for module, _, _ in self.groups:
                module.fused = None
