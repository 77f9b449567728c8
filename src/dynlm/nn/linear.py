"""Several linear projections of the same input (q/k/v, gate/up) computed together."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Benchmarks flip this to compare; the result is the same either way.
FUSE_PROJECTIONS = True


def project(x: torch.Tensor, linears: list[nn.Linear]) -> tuple[torch.Tensor, ...]:
    """(l(x) for l in linears). While training, one matmul over the concatenated weights: larger
    matmuls run faster on a GPU and the input is read once. Without gradients (evaluation,
    decoding) the projections run separately: decoding is bound by reading weights, and a fused
    copy would add a weight-sized read and write per step. The parameters stay separate either
    way, so names and shapes match Hugging Face checkpoints."""
    if not (FUSE_PROJECTIONS and torch.is_grad_enabled()):
        return tuple(linear(x) for linear in linears)
    weight = torch.cat([linear.weight for linear in linears])
    bias = None
    if linears[0].bias is not None:
        bias = torch.cat([linear.bias for linear in linears])
    return F.linear(x, weight, bias).split([linear.out_features for linear in linears], dim=-1)
