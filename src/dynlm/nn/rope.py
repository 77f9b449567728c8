"""Rotary position embedding, non-interleaved ("rotate_half"), tables in fp32.

`RotaryEmbedding(head_dim, theta, max_positions)` holds cos/sin of positions 0..max_positions-1
(capped at TABLE_POSITIONS) as buffers computed once. A plain causal forward slices them
(`prefix`): under torch.compile a table computed from `arange` inside the graph is a pointwise
producer that inductor inlines into every consumer, so each layer's rotary kernel recomputed fp32
cos and sin, forward and backward (measured on an H200: 24 such kernels per gpt2-small step, 5% of
its CUDA time); a buffer is read instead. Other positions (a KV cache, longer sequences) are
computed (`forward`), with the same arithmetic.

The buffers stay fp32 whatever the module is cast to: a bf16 `inv_freq` is off by up to 2^-9
relative, which at position 1000 shifts the angle by radians."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

# Positions with a precomputed table: 8 MiB of cos + sin at head_dim 128. Longer contexts compute
# the positions past it (their prefill is dominated by attention anyway).
TABLE_POSITIONS = 8192


def inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """[D/2] fp32 (the numpy runtime of `dynlm.weights` repeats this arithmetic)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: [T] or [B, T] integer, inv_freq [D/2] -> cos, sin: [T, D] or [B, T, D] in `dtype`."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.float()  # [..., T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [..., T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0, max_positions: int = 0):
        """max_positions: positions with a precomputed table (capped at TABLE_POSITIONS; 0: none)."""
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.table_positions = min(max_positions, TABLE_POSITIONS)
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.register_buffer("cos_table", torch.empty(0), persistent=False)
        self.register_buffer("sin_table", torch.empty(0), persistent=False)
        self._build()

    def _build(self, device: torch.device | None = None) -> None:
        """The buffers, in fp32, computed on the default device (`with torch.device(...)`), or on
        the CPU and moved to `device`."""
        inv_freq = inverse_frequencies(self.head_dim, self.theta)
        cos, sin = rotary_tables(torch.arange(self.table_positions), inv_freq, torch.float32)  # [P, D]
        if device is not None:
            inv_freq, cos, sin = inv_freq.to(device), cos.to(device), sin.to(device)
        self.inv_freq, self.cos_table, self.sin_table = inv_freq, cos, sin

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RotaryEmbedding:
        # `.to(device)` moves the tables; `.to(bf16)` would round them: rebuild them in fp32 instead
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            with torch.device("cpu"):
                self._build(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: [T] or [B, T] integer -> cos, sin: [T, D] or [B, T, D] in `dtype`."""
        return rotary_tables(positions, self.inv_freq, dtype)

    @torch.no_grad()
    def prefix(self, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of positions 0..length-1: [T, D] in `dtype`, sliced from the tables when they
        are long enough."""
        if length > self.table_positions:
            return self(torch.arange(length, device=self.inv_freq.device), dtype)
        return self.cos_table[:length].to(dtype), self.sin_table[:length].to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos/sin: [T, D] (shared positions) or [B, T, D] (per-row positions)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin
