"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258).

A routed block processes only k = max(1, floor(capacity * T)) tokens of each sequence, chosen by
a scalar router r_i = w^T x_i; the others pass through unchanged:

    selected:  x_i <- x_i + s(r_i) * f(X~)_i      f = attention + MLP over the selected tokens only
    skipped:   x_i <- x_i

with s = sigmoid (default; starts at 0.5 and keeps the router on the gradient path) or the
identity (the paper's r_i). Routed blocks alternate with dense ones by default (layers 1, 3, 5 ...).

Top-k over a sequence is not causal, so each routed block also learns a causal router that
decides from the token alone (routed iff logit > 0): either the router logit itself, pulled
towards the top-k decision by an auxiliary BCE ("aux_bce"), or a separate small MLP on the
stop-gradient hidden state ("predictor"). Training uses top-k; evaluation and generation use the
causal router (`model.set_routing` overrides; see `dynlm.models.routed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.routed import RoutedTransformerLM
from dynlm.models.standard import DecoderLayer
from dynlm.nn import KVCache, LayerKVCache
from dynlm.nn.routing import CausalRouter, binary_entropy
from dynlm.registry import register

CAUSAL_ROUTERS = ("aux_bce", "predictor")
ROUTER_SCALES = ("sigmoid", "linear")


# ---------------------------------------------------------------------------------------------
# MoD


@dataclass
class ModConfig(ModelConfig):
    type: str = "mod"
    mod_capacity: float = 0.125  # fraction of a sequence's tokens each routed block processes
    mod_aux_loss_weight: float = 0.01  # weight of the causal router's BCE against the top-k mask
    routed_layers: list[int] | None = None  # None: every other layer, 1, 3, 5, ... (the paper's best)
    causal_router: str = "aux_bce"  # aux_bce: the router logit itself | predictor: separate MLP
    router_scale: str = "sigmoid"  # update scale s(r): sigmoid | linear (r itself, as in the paper)

    def routed_layer_indices(self) -> list[int]:
        if self.routed_layers is None:
            return list(range(1, self.num_layers, 2))
        return sorted(set(self.routed_layers))

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.mod_capacity <= 1.0:
            raise ConfigError(f"model.mod_capacity must be in (0, 1], got {self.mod_capacity}")
        if self.mod_aux_loss_weight < 0:
            raise ConfigError(f"model.mod_aux_loss_weight must be >= 0, got {self.mod_aux_loss_weight}")
        if self.causal_router not in CAUSAL_ROUTERS:
            raise ConfigError(f"model.causal_router must be one of {', '.join(CAUSAL_ROUTERS)}, "
                              f"got '{self.causal_router}'")
        if self.router_scale not in ROUTER_SCALES:
            raise ConfigError(f"model.router_scale must be one of {', '.join(ROUTER_SCALES)}, "
                              f"got '{self.router_scale}'")
        for i in self.routed_layer_indices():
            if not 0 <= i < self.num_layers:
                raise ConfigError(f"model.routed_layers: layer {i} does not exist "
                                  f"(num_layers is {self.num_layers})")
            if self.uses_sliding_window(i):
                raise ConfigError(f"model.routed_layers: layer {i} uses a sliding window, which routed "
                                  "layers do not support", "set model.sliding_window_layers to dense layers")


class ModDecoderLayer(DecoderLayer):
    """A decoder layer; routed ones add `router` (d -> 1, no bias) and, with the "predictor"
    causal router, `causal_router`. Shared parameter names are the dense model's, so dense
    checkpoints load into it."""

    def __init__(self, config: ModConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.routed = layer_idx in config.routed_layer_indices()
        if self.routed:
            self.router = nn.Linear(config.hidden_size, 1, bias=False)
            self.causal_router = CausalRouter(config.hidden_size) if config.causal_router == "predictor" else None


@register("mod", ModConfig)
class ModModel(RoutedTransformerLM):
    """Mixture-of-Depths transformer."""

    config: ModConfig

    def __init__(self, config: ModConfig):
        super().__init__(config, ModDecoderLayer)

    def routed_capacities(self) -> dict[int, float]:
        return {i: self.config.mod_capacity for i in self.config.routed_layer_indices()}

    def layer_forward(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache: LayerKVCache | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Layer i on x [B, T, C]; for a routed layer also its routing statistics."""
        c, layer = self.config, self.model.layers[i]
        if not layer.routed:
            return x + layer(x, cos, sin, cache), {}
        logits = layer.router(x).squeeze(-1).float()  # [B, T]
        weight = torch.sigmoid(logits) if c.router_scale == "sigmoid" else logits
        causal_logits = logits if layer.causal_router is None else layer.causal_router(x)
        x, _, stats = self.route(i, layer, x, logits, weight, causal_logits, c.mod_capacity, cos, sin, cache)
        if stats:
            stats["entropy"] = binary_entropy(torch.sigmoid(logits.detach())).mean()
        return x, stats

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   state: KVCache | None) -> tuple[torch.Tensor, dict[str, Any]]:
        layer_stats: dict[int, dict[str, torch.Tensor]] = {}
        for i in range(self.config.num_layers):
            x, stats = self.layer_forward(i, x, cos, sin, None if state is None else state.layers[i])
            if stats:
                layer_stats[i] = stats
        return x, self.routing_extras(layer_stats, self.config.mod_aux_loss_weight)
