"""Token routing shared by the routed transformers (MoD, DTF): pick k tokens per sequence, run a
block on them only, scatter the result back; plus the causal router that decides per token when
top-k over the whole sequence is not allowed (generation).

Three rules the reference implementation broke (specs/mod_dtf.md), each enforced here:
1. route per row: tokens are gathered to [B, k, C] and attend only within their own row;
2. selected indices are sorted by position before the block (a causal mask over score order
   would let tokens see the future), and the block gets the tokens' true positions for RoPE;
3. the highest score is selected (`topk_indices` keeps the largest, never a negated score).

Two ways to run a routed block, with the same result for the selected tokens:
- `gather_routed_update`: static shapes, k = max(1, floor(capacity * T)) tokens per row, compute
  proportional to k (training);
- `masked_routed_update`: any per-token mask (the causal router's), the block runs on every token
  with the unselected ones masked out as keys and their update dropped; it works with the KV
  cache, where skipped tokens add no valid K/V (evaluation and decoding).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.errors import ConfigError
from dynlm.nn.attention import Attention
from dynlm.nn.cache import LayerKVCache

ROUTING_MODES = ("auto", "topk", "causal")


class ResidualBlock(Protocol):
    """A block whose output is x + residual(x) (e.g. `DecoderLayer`)."""

    self_attn: Attention

    def residual(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
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


def gather_routed_update(block: ResidualBlock, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x_i + weight_i * f(X~)_i for the selected positions idx [B, k] (sorted by position), x_i for
    the others. f runs on the [B, k] subset only: causal attention among the selected tokens of
    each row, RoPE at their true positions (cos/sin [T, D] or [B, T, D]), no K/V cache."""
    x_sel = gather_tokens(x, idx)  # [B, k, C]
    cos_sel = cos[idx] if cos.dim() == 2 else gather_tokens(cos, idx)  # [B, k, D]
    sin_sel = sin[idx] if sin.dim() == 2 else gather_tokens(sin, idx)
    update = block.residual(x_sel, cos_sel, sin_sel)  # [B, k, C]
    w_sel = weight.gather(1, idx).unsqueeze(-1)  # [B, k, 1]
    return scatter_add_tokens(x, idx, w_sel * update)


def skip_block(cache: LayerKVCache, batch_size: int, seq_len: int, num_kv_heads: int, head_dim: int,
               like: torch.Tensor) -> None:
    """Advance a layer's cache by `seq_len` positions whose tokens all skipped the layer: they
    hold no valid key, so attention never reads them (all rows advance together)."""
    dtype = cache.k.dtype if cache.k is not None else like.dtype
    empty = torch.zeros(batch_size, num_kv_heads, seq_len, head_dim, dtype=dtype, device=like.device)
    cache.append(empty, empty, torch.zeros(batch_size, seq_len, dtype=torch.bool, device=like.device))


def masked_routed_update(block: ResidualBlock, x: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, cache: LayerKVCache | None) -> torch.Tensor:
    """Same result as `gather_routed_update` for any mask [B, T] (rows may select different
    numbers of tokens): the block runs on all tokens, unselected tokens are invalid keys (in the
    cache too, so later tokens never attend to them) and their update is dropped."""
    cache = cache if cache is not None else LayerKVCache()  # a throwaway one carries the key mask
    update = block.residual(x, cos, sin, cache, key_valid=mask)
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


# ---------------------------------------------------------------------------------------------
# Model-level control: top-k vs causal routing, fixed and recorded routing masks


class RoutingControl:
    """Mixin for routed models: which routing decides, and hooks for tests and analysis.

    - `set_routing("topk" | "causal" | "auto")`: "auto" (default) uses top-k in training mode and
      the causal router in eval mode, so generation and evaluation are causal by default.
    - `model.last_routing_masks`: {routed layer index: bool [B, T]}, the tokens each routed
      layer processed in the last forward.
    - `with model.fixed_routing(masks):` every routed layer processes exactly the given tokens
      (any mask; rows may differ); routing weights are still computed from the input. With fixed
      masks a training forward must be causal: that is how its causality is tested
      (`model(x); with model.fixed_routing(model.last_routing_masks): ...`).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing = "auto"
        self.last_routing_masks: dict[int, torch.Tensor] = {}
        self._fixed_masks: dict[int, torch.Tensor] | None = None

    def set_routing(self, mode: str):
        if mode not in ROUTING_MODES:
            raise ConfigError(f"unknown routing mode '{mode}'", "valid: " + ", ".join(ROUTING_MODES))
        self.routing = mode
        return self

    def routing_mode(self) -> str:
        """The routing that decides now: "topk" or "causal"."""
        if self.routing == "auto":
            return "topk" if self.training else "causal"
        return self.routing

    @contextlib.contextmanager
    def fixed_routing(self, masks: dict[int, torch.Tensor]) -> Iterator[None]:
        previous = self._fixed_masks
        self._fixed_masks = dict(masks)
        try:
            yield
        finally:
            self._fixed_masks = previous

    # -- what a subclass may replace (tests substitute leaky variants here) ---------------------
    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Positions [B, k] each routed layer processes, sorted by position."""
        return topk_indices(scores, k)

    def run_selected(self, block: ResidualBlock, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return gather_routed_update(block, x, idx, weight, cos, sin)

    # -- the routed step shared by MoD and DTF ----------------------------------------------------
    def route(self, layer_idx: int, block: ResidualBlock, x: torch.Tensor, scores: torch.Tensor,
              weight: torch.Tensor, causal_logits: torch.Tensor, capacity: float, cos: torch.Tensor,
              sin: torch.Tensor, cache: LayerKVCache | None,
              ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Run routed `block` on x [B, T, C]: the tokens chosen by top-k of `scores` [B, T] (top-k
        routing), by `causal_logits` [B, T] > 0 (causal routing) or by a fixed mask; each chosen
        token's update is scaled by `weight` [B, T]. Returns the new x, the mask of processed
        tokens [B, T], and statistics: detached means plus the causal router's BCE against the
        top-k mask ("router_bce", with gradient); none when decoding."""
        b, t = scores.shape
        mode = self.routing_mode()
        decoding = t == 1 and not self.training  # one new token per row: no statistics, no top-k needed
        fixed = None if self._fixed_masks is None else self._fixed_masks.get(layer_idx)
        causal_mask = causal_logits > 0
        if not decoding or mode == "topk":
            topk_idx = self.select(scores, capacity_k(capacity, t))
            topk_mask = indices_to_mask(topk_idx, t)
        if fixed is not None:
            if fixed.shape != (b, t):
                raise ConfigError(f"fixed routing mask of layer {layer_idx} has shape {tuple(fixed.shape)}, "
                                  f"the input needs {(b, t)}")
            mask = fixed.to(device=x.device, dtype=torch.bool)
            count = uniform_count(mask) if cache is None else None
            idx = None if count is None else self.select(torch.where(mask, scores, float("-inf")), count)
        elif mode == "topk":
            mask, idx = topk_mask, (topk_idx if cache is None else None)
        else:
            mask, idx = causal_mask, None

        if idx is not None:
            x = self.run_selected(block, x, idx, weight, cos, sin)
        elif t == 1 and cache is not None and not cache.fixed_shape and not bool(mask.any()):
            # decoding, no row routed: skip (a fixed-shape cache takes the masked path instead, so
            # a captured step has no data-dependent branch; skipped tokens are invalid keys there)
            attn = block.self_attn
            skip_block(cache, b, t, attn.num_kv_heads, attn.head_dim, x)
        else:
            x = masked_routed_update(block, x, mask, weight, cos, sin, cache)

        self.last_routing_masks[layer_idx] = mask.detach()
        if decoding:
            return x, mask, {}
        stats = {"router_bce": router_bce(causal_logits, topk_mask),
                 "frac": mask.float().mean().detach(),
                 "causal_acc": (causal_mask == topk_mask).float().mean().detach(),
                 "causal_frac": causal_mask.float().mean().detach()}
        return x, mask, stats
