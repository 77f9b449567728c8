from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Qwen2/Llama MLP). With `fused` set (`nn.fusion`),
    gate and up are one matmul through their concatenated weight."""

    FUSABLE = ("gate_proj", "up_proj")

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # gate|up weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = F.linear(x, *self.fused).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
