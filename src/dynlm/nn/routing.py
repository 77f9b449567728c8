"""Token-routing blocks shared by the routed transformers (MoD, DTF): pick k tokens per sequence,
run a block on them only, scatter the result back; plus the causal router that decides per token
when top-k over the whole sequence is not allowed (generation). The routing policy (top-k vs
causal router, fixed masks, statistics) lives in `dynlm.models.routed`.

Rules the blocks keep (a reference implementation broke each):
1. route per row: tokens are gathered to [B, k, C] and attend only within their own row;
2. selected indices are sorted by position before the block (a causal mask over score order
   would let tokens see the future), and the block gets the tokens' true positions for RoPE;
3. the highest score is selected (`topk_indices` keeps the largest, never a negated score).

Two ways to run a routed block, with the same result for the selected tokens:
- `gather_routed_update`: static shapes, k tokens per row, compute proportional to k (training);
- `masked_routed_update`: any per-token mask (the causal router's), the block runs on every token
  with the unselected ones masked out as keys and their update dropped; it works with the KV
  cache, where skipped tokens add no valid K/V (evaluation and decoding).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.nn.cache import LayerKVCache


class RoutedBlock(Protocol):
    """A block that returns its residual update U (the block's output is x + U), e.g. a decoder
    layer. `key_valid` [B, T] marks the tokens that become attention keys."""

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: LayerKVCache | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------
# Selection


def capacity_k(capacity: float, seq_len: int) -> int:
    """Tokens a routed block processes per sequence: max(1, floor(capacity * T)), at most T."""
    return min(seq_len, max(1, math.floor(capacity * seq_len)))


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """scores [B, T] -> positions [B, k] of the k highest scores of each row, sorted by position."""
    idx = torch.topk(scores.detach(), k, dim=-1, sorted=False).indices
    return idx.sort(dim=-1).values


def indices_to_mask(idx: torch.Tensor, seq_len: int) -> torch.Tensor:
    """positions [B, k] -> boolean mask [B, T]."""
    mask = torch.zeros(idx.shape[0], seq_len, dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx, True)


def uniform_count(mask: torch.Tensor) -> int | None:
    """The number of tokens each row of mask [B, T] selects when all rows select the same
    number (> 0), else None. Synchronises with the device."""
    counts = mask.sum(-1)
    if counts.numel() == 0 or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None
    return int(counts[0])


# ---------------------------------------------------------------------------------------------
# Execution


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, T, ...] , idx [B, k] -> [B, k, ...]."""
    index = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, index)


def scatter_add_tokens(x: torch.Tensor, idx: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """x [B, T, C] with update [B, k, C] added at positions idx [B, k] (out of place)."""
    return x.scatter_add(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]), update.to(x.dtype))


def gather_routed_update(block: RoutedBlock, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x_i + weight_i * f(X~)_i for the selected positions idx [B, k] (sorted by position), x_i for
    the others. f runs on the [B, k] subset only: causal attention among the selected tokens of
    each row, RoPE at their true positions (cos/sin [T, D] or [B, T, D]), no K/V cache."""
    x_sel = gather_tokens(x, idx)  # [B, k, C]
    cos_sel = cos[idx] if cos.dim() == 2 else gather_tokens(cos, idx)  # [B, k, D]
    sin_sel = sin[idx] if sin.dim() == 2 else gather_tokens(sin, idx)
    update = block(x_sel, cos_sel, sin_sel)  # [B, k, C]
    w_sel = weight.gather(1, idx).unsqueeze(-1)  # [B, k, 1]
    return scatter_add_tokens(x, idx, w_sel * update)


def skip_block(cache: LayerKVCache, batch_size: int, seq_len: int, num_kv_heads: int, head_dim: int,
               like: torch.Tensor) -> None:
    """Advance a layer's cache by `seq_len` positions whose tokens all skipped the layer: they
    hold no valid key, so attention never reads them (all rows advance together)."""
    dtype = cache.k.dtype if cache.k is not None else like.dtype
    empty = torch.zeros(batch_size, num_kv_heads, seq_len, head_dim, dtype=dtype, device=like.device)
    cache.append(empty, empty, torch.zeros(batch_size, seq_len, dtype=torch.bool, device=like.device))


def masked_routed_update(block: RoutedBlock, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
    """Same result as `gather_routed_update` for any mask [B, T] (rows may select different
    numbers of tokens): the block runs on all tokens, unselected tokens are invalid keys (in the
    cache too, so later tokens never attend to them) and their update is dropped."""
    update = block(x, cos, sin, cache, key_valid=mask)  # [B, T, C]
    return x + torch.where(mask.unsqueeze(-1), weight.unsqueeze(-1) * update, 0.0).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Causal router and losses


class CausalRouter(nn.Module):
    """Predicts, from the stop-gradient hidden state of one token (plus optional per-token
    features), whether top-k would select it: RMS-normalised x -> d/2 -> SiLU -> 1 logit.
    Used where top-k over the whole sequence is not allowed (decoding): routed iff logit > 0."""

    def __init__(self, hidden_size: int, num_features: int = 0):
        super().__init__()
        width = max(1, hidden_size // 2)
        self.in_proj = nn.Linear(hidden_size, width)
        # features enter through their own projection: no [x ; features] copy with an odd width
        self.feature_proj = nn.Linear(num_features, width, bias=False) if num_features else None
        self.out_proj = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] (gradients stopped here), features [B, T, F] -> logits [B, T] (fp32)."""
        h = self.in_proj(F.rms_norm(x.detach().float(), (x.shape[-1],)).to(x.dtype))
        if self.feature_proj is not None:
            h = h + self.feature_proj(features.detach().to(x.dtype))
        return self.out_proj(F.silu(h)).squeeze(-1).float()


def router_bce(logits: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of router logits [B, T] against the top-k membership [B, T]."""
    return F.binary_cross_entropy_with_logits(logits.float(), target_mask.float())


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of Bernoulli(p), elementwise."""
    p = p.float().clamp(1e-6, 1 - 1e-6)
    return -(p * p.log2() + (1 - p) * (1 - p).log2())


def causal_moving_average(values: torch.Tensor, window: int,
                          history: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each position's previous `window` values (t-window .. t-1, never t or later).

    values [B, T] (fp32); history [B, h] holds the last h <= window values before this chunk (so
    a stream of chunks gives the same result as one call). A position with nothing before it
    averages to its own value. Returns (averages [B, T], new history [B, min(h + T, window)])."""
    h = 0 if history is None else history.shape[1]
    seq = values if history is None else torch.cat([history.to(values.dtype), values], dim=1)  # [B, h+T]
    prefix = F.pad(seq.cumsum(dim=1), (1, 0))  # prefix[:, j] = sum of seq[:, :j]
    end = torch.arange(h, h + values.shape[1], device=values.device)  # each token's index in seq
    start = (end - window).clamp(min=0)
    count = (end - start).to(values.dtype)  # [T]
    total = prefix[:, end] - prefix[:, start]
    average = torch.where(count > 0, total / count.clamp(min=1), values)
    return average, seq[:, -window:]
