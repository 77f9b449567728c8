"""Int8 weight-only linear layers: symmetric int8 weights with one scale per output row,
activations kept in their own dtype.

    y = x @ (q * scale).T          q int8 [O, I], scale [O]

On a CPU, `Int8Linear` calls ATen's `_weight_int8pack_mm`, which reads the int8 weights directly
(a quarter of fp32's bytes, half of bf16's: batch-1 decoding reads every weight once per token).
Elsewhere it dequantizes the weight and runs `F.linear`. `int8_linear_reference` is that
dequantize-then-matmul computation, the spec both paths are tested against (`tests/test_quant.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: weight [O, I] -> (q int8 [O, I], scale [O, 1]) with weight ≈ q·scale."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    q = torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8)
    return q, scale.to(weight.dtype)


def int8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., I] @ (q [O, I] * scale [O]).T (+ bias), computed in x's dtype."""
    weight = (q.float() * scale.float()[:, None]).to(x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (per-row scales) and activations in their own dtype."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q)  # [O, I] int8
        self.register_buffer("scale", scale.float().reshape(-1))  # [O]
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_int8(linear.weight.detach())
        return cls(q, scale, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return int8_linear_reference(x, self.q, self.scale, self.bias)
        rows = x.reshape(-1, self.in_features)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale.to(x.dtype))  # [N, O]
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def quantize_linears_int8(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` (in place) with an `Int8Linear`; returns how many.
    A tied LM head gets its own int8 copy; the embedding it was tied to keeps full precision
    (a lookup reads one row per token)."""
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear.from_linear(child))
    return len(targets)
