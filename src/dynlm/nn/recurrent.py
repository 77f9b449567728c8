"""Recurrent cells. The input projection is left to the caller, so that the parts of a
concatenated input can be projected by separate linears (and the parts that do not depend on the
recurrence precomputed for a whole sequence at once): W_ih [a; b] = W_a a + W_b b."""

from __future__ import annotations

import torch
from torch import nn


class GRUCell(nn.Module):
    """h' = GRU(x, h) with the gate order and equations of `torch.nn.GRUCell`:

        r = σ(gx_r + W_hr h + b_hr)      z = σ(gx_z + W_hz h + b_hz)
        n = tanh(gx_n + r ⊙ (W_hn h + b_hn))
        h' = (1 − z) ⊙ n + z ⊙ h

    where gx = W_ih x + b_ih [..., 3·hidden] is given by the caller."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.hidden_proj = nn.Linear(hidden_size, 3 * hidden_size)

    def forward(self, input_gates: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """input_gates [..., 3H], h [..., H] -> h' [..., H] (in h's dtype)."""
        gh = self.hidden_proj(h.to(input_gates.dtype))  # [..., 3H]
        x_r, x_z, x_n = input_gates.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return ((1 - z) * n + z * h).to(h.dtype)
