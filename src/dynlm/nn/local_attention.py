"""Single-head attention of each token over the W tokens before it (not itself), streamed with a
fixed-size FIFO of the previous inputs: the state never grows with the tokens consumed.

    out, fifo = attention(x [B, T, C], fifo [B, W, C], position)

`fifo` holds the inputs of the W positions before `position` (oldest first; entries before
position 0 are zeros and masked). A whole sequence is computed in parallel; feeding it in pieces
with the returned FIFO gives the same result. A token with nothing before it reads zeros."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FifoAttention(nn.Module):
    """q = W_q x (query_dim), k = W_k x (query_dim), v = W_v x (value_dim); no output projection."""

    def __init__(self, dim: int, query_dim: int, value_dim: int, window: int):
        super().__init__()
        self.window = window
        self.q_proj = nn.Linear(dim, query_dim, bias=False)
        self.k_proj = nn.Linear(dim, query_dim, bias=False)
        self.v_proj = nn.Linear(dim, value_dim, bias=False)

    def forward(self, x: torch.Tensor, fifo: torch.Tensor,
                position: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, C]; fifo [B, W, C]; position: 0-dim int64 tensor, the position of x[:, 0].
        Returns (out [B, T, value_dim], the new fifo [B, W, C])."""
        t, w = x.shape[1], self.window
        keys_in = torch.cat([fifo.to(x.dtype), x], dim=1)  # [B, W+T, C]: positions position-W .. position+T-1
        q = self.q_proj(x)  # [B, T, Dq]
        k = self.k_proj(keys_in)  # [B, W+T, Dq]
        v = self.v_proj(keys_in)  # [B, W+T, Dv]
        if t > w:
            return self._blocked(q, k, v, position), keys_in[:, t:]
        query = torch.arange(t, device=x.device).unsqueeze(1)  # [T, 1]
        key = torch.arange(w + t, device=x.device).unsqueeze(0)  # [1, W+T]
        # key i holds position (position - W + i): before the query, within W of it, and >= 0
        mask = (key >= query) & (key < query + w) & (key >= w - position)  # [T, W+T]
        return self._attend(q, k, v, mask), keys_in[:, t:]

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [..., Tq, Dq] over k [..., Tk, Dq], v [..., Tk, Dv] where mask [..., Tq, Tk] allows."""
        scores = torch.einsum("...td,...sd->...ts", q, k).float() / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key reads zeros
        return torch.einsum("...ts,...sd->...td", weights.to(v.dtype), v)

    def _blocked(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The same attention with queries in blocks of W: block m (queries m*W .. m*W+W-1) sees
        keys m*W .. m*W+2W-1 of the W + T keys, the only ones within reach."""
        b, t, _ = q.shape
        w = self.window
        n = -(-t // w)
        pad = n * w - t  # padded queries (dropped) and keys (reached by padded queries only)
        q_blocks = F.pad(q, (0, 0, 0, pad)).view(b, n, w, q.shape[-1])  # [B, N, W, Dq]
        k_blocks = F.pad(k, (0, 0, 0, pad)).unfold(1, 2 * w, w).transpose(-1, -2)  # [B, N, 2W, Dq]
        v_blocks = F.pad(v, (0, 0, 0, pad)).unfold(1, 2 * w, w).transpose(-1, -2)  # [B, N, 2W, Dv]
        i = torch.arange(w, device=q.device)[:, None]  # query in its block
        j = torch.arange(2 * w, device=q.device)[None, :]  # key in the block's reach
        key = torch.arange(n, device=q.device)[:, None, None] * w + j  # [N, 1, 2W]: index into the W + T keys
        mask = (j >= i) & (j < i + w) & (key >= w - position)  # [N, W, 2W], as the unblocked mask
        out = self._attend(q_blocks, k_blocks, v_blocks, mask)  # [B, N, W, Dv]
        return out.reshape(b, n * w, -1)[:, :t]


def fifo_attention_reference(module: FifoAttention, x: torch.Tensor) -> torch.Tensor:
    """Naive loop over positions (the spec of `FifoAttention` from position 0): token t attends
    to the inputs of positions max(0, t-W) .. t-1."""
    b, t, _ = x.shape
    out = torch.zeros(b, t, module.v_proj.out_features, dtype=x.dtype)
    for i in range(t):
        start = max(0, i - module.window)
        if i == start:
            continue
        q = module.q_proj(x[:, i])  # [B, Dq]
        k = module.k_proj(x[:, start:i])  # [B, n, Dq]
        v = module.v_proj(x[:, start:i])
        w = torch.softmax(torch.einsum("bd,bnd->bn", q, k) / math.sqrt(q.shape[-1]), dim=-1)
        out[:, i] = torch.einsum("bn,bnd->bd", w, v)
    return out
