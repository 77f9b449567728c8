"""The base of the routed transformers (MoD in `mod.py`, DTF in `dtf.py`): a `TransformerLM`
some of whose layers process only some tokens, and the routing policy they share.

Which routing decides (`set_routing`):
- "topk": each routed layer processes the k = max(1, floor(capacity * T)) highest-scoring tokens
  of each sequence (static shapes, compute proportional to k; not causal: a token's selection
  depends on later tokens);
- "causal": a causal router decides from the token alone (routed iff its logit > 0), so
  evaluation and generation are strictly causal;
- "auto" (default): top-k in training mode, the causal router in eval mode.

Hooks for tests and analysis: `model.last_routing_masks` ({routed layer: bool [B, T]}, the
tokens each routed layer processed in the last forward) and `with model.fixed_routing(masks):`
(every routed layer processes exactly the given tokens; rows may differ). With fixed masks a
training forward must be causal: that is how its causality is tested
(`model(x); with model.fixed_routing(model.last_routing_masks): ...`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.base import ModelOutput
from dynlm.models.standard import DecoderLayer, TransformerLM
from dynlm.nn import KVCache, LayerKVCache
from dynlm.nn.routing import (
    RoutedBlock,
    capacity_k,
    gather_routed_update,
    indices_to_mask,
    masked_routed_update,
    router_bce,
    skip_block,
    topk_indices,
    uniform_count,
)

ROUTING_MODES = ("auto", "topk", "causal")


class RoutedTransformerLM(TransformerLM):
    """A `TransformerLM` some of whose layers are routed. Subclasses give `routed_capacities()`
    and a `run_layers` that calls `self.route(...)` for routed layers."""

    causal_in_training = False  # top-k over the whole sequence while training

    def __init__(self, config: ModelConfig, layer_class: Callable[[ModelConfig, int], nn.Module] = DecoderLayer):
        super().__init__(config, layer_class)
        self.routing = "auto"
        self.last_routing_masks: dict[int, torch.Tensor] = {}
        self._fixed_masks: dict[int, torch.Tensor] | None = None

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: KVCache | None = None, use_cache: bool = False) -> ModelOutput:
        self.last_routing_masks = {}  # a fresh dict: one held by a caller keeps its forward's masks
        return super().forward(input_ids, labels, state, use_cache)

    # -- routing mode and fixed masks -------------------------------------------------------------
    def set_routing(self, mode: str) -> RoutedTransformerLM:
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

    # -- what a subclass may replace (tests substitute leaky variants here) -----------------------
    def select(self, scores: torch.Tensor, k: int) -> torch.Tensor:
        """Positions [B, k] each routed layer processes, sorted by position."""
        return topk_indices(scores, k)

    def run_selected(self, block: RoutedBlock, x: torch.Tensor, idx: torch.Tensor, weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return gather_routed_update(block, x, idx, weight, cos, sin)

    # -- the routed step shared by MoD and DTF ----------------------------------------------------
    def route(self, layer_idx: int, block: DecoderLayer, x: torch.Tensor, scores: torch.Tensor,
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

    # -- capacities, FLOPs, reports ---------------------------------------------------------------
    @property
    def routed_layers(self) -> list[int]:
        return sorted(self.routed_capacities())

    def routed_capacities(self) -> dict[int, float]:  # pragma: no cover - abstract
        """{layer index: capacity} of every routed layer."""
        raise NotImplementedError

    def processed_fractions(self, seq_len: int) -> list[float]:
        """Fraction of a sequence's tokens each layer processes when trained with top-k."""
        capacities = self.routed_capacities()
        return [capacity_k(capacities[i], seq_len) / seq_len if i in capacities else 1.0
                for i in range(self.config.num_layers)]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token with each routed layer credited only for the tokens it
        processes: its matmuls scale with the fraction f = k / T of tokens, its attention scores
        with f^2 (f of the queries see f of the keys). Routers, priors and causal routers run on
        every token and count in full."""
        c = self.config
        flops = super().flops_per_token(seq_len)
        for i, fraction in enumerate(self.processed_fractions(seq_len)):
            if fraction == 1.0:
                continue
            layer = self.model.layers[i]
            block = (layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm)
            block_params = sum(p.numel() for m in block for p in m.parameters())
            flops -= 6 * block_params * (1 - fraction)
            flops -= 12 * c.num_heads * c.head_dim * seq_len * (1 - fraction * fraction)
        return flops

    @torch.no_grad()
    def routing_report(self, tokens: Any, seq_len: int, max_windows: int = 32, batch_size: int = 8) -> dict[str, Any]:
        """Routing metrics of eval-mode forwards (current routing mode) over up to `max_windows`
        consecutive windows of `seq_len` tokens of the 1-D token array `tokens`, averaged: the
        causal router's agreement with top-k ("route/causal_acc"), the share of tokens each
        sends through a routed layer, the router BCE (and DTF's surprise statistics)."""
        tokens = torch.as_tensor(np.asarray(tokens[: max_windows * seq_len], dtype=np.int64))
        seq_len = min(seq_len, len(tokens))
        if seq_len < 2:
            return {}
        windows = tokens[: len(tokens) // seq_len * seq_len].view(-1, seq_len).to(self.lm_head.weight.device)
        was_training = self.training
        self.eval()
        mode = self.routing_mode()
        try:
            sums: dict[str, torch.Tensor] = {}
            for batch in windows.split(batch_size):
                for key, value in self(batch).metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * len(batch)
        finally:
            self.train(was_training)
        report: dict[str, Any] = {"routing": mode, "windows": len(windows), "seq_len": seq_len}
        return report | {key: float(value) / len(windows) for key, value in sums.items()}

    @staticmethod
    def routing_extras(layer_stats: dict[int, dict[str, torch.Tensor]], router_loss_weight: float,
                       extra_aux: torch.Tensor | None = None,
                       extra_metrics: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Aux loss (weighted mean causal-router BCE + `extra_aux`) and metrics as detached scalar
        tensors: nothing is read from the device here (the trainer reads them when it logs).
        Empty when nothing was routed with statistics (decoding)."""
        if not layer_stats:
            return {}
        bce = torch.stack([s["router_bce"] for s in layer_stats.values()]).mean()
        aux = router_loss_weight * bce if extra_aux is None else router_loss_weight * bce + extra_aux
        metrics: dict[str, torch.Tensor] = {"route/router_bce": bce}
        for key in ("frac", "causal_acc", "causal_frac", "entropy"):
            metrics[f"route/{key}"] = torch.stack([s[key] for s in layer_stats.values()]).mean()
        for i, s in layer_stats.items():
            metrics[f"route/frac_L{i}"] = s["frac"]
        metrics.update(extra_metrics or {})
        return {"aux_loss": aux, "metrics": {key: value.detach().float() for key, value in metrics.items()}}
