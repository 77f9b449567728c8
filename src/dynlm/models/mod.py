"""Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258), and the base shared by the routed
transformers (MoD here, DTF in `dtf.py`).

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
causal router (`model.set_routing` overrides; see `dynlm.nn.routing.RoutingControl`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.base import ModelOutput
from dynlm.models.standard import DecoderLayer, TransformerLM
from dynlm.nn import KVCache, LayerKVCache
from dynlm.nn.routing import CausalRouter, RoutingControl, binary_entropy, capacity_k
from dynlm.registry import register

CAUSAL_ROUTERS = ("aux_bce", "predictor")
ROUTER_SCALES = ("sigmoid", "linear")


# ---------------------------------------------------------------------------------------------
# Shared by MoD and DTF


class RoutedTransformerLM(RoutingControl, TransformerLM):
    """A `TransformerLM` some of whose layers are routed. Subclasses give `routed_capacities()`
    and a `run_layers` that calls `self.route(...)` (from `RoutingControl`) for routed layers."""

    causal_in_training = False  # top-k over the whole sequence while training

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: KVCache | None = None) -> ModelOutput:
        self.last_routing_masks = {}  # a fresh dict: one held by a caller keeps its forward's masks
        return super().forward(input_ids, labels, state)

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
            sums: dict[str, float] = {}
            for batch in windows.split(batch_size):
                for key, value in self(batch).metrics.items():
                    sums[key] = sums.get(key, 0.0) + value * len(batch)
        finally:
            self.train(was_training)
        report: dict[str, Any] = {"routing": mode, "windows": len(windows), "seq_len": seq_len}
        return report | {key: value / len(windows) for key, value in sums.items()}

    @staticmethod
    def routing_extras(layer_stats: dict[int, dict[str, torch.Tensor]], router_loss_weight: float,
                       extra_aux: torch.Tensor | None = None,
                       extra_metrics: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Aux loss (weighted mean causal-router BCE + `extra_aux`) and metrics as floats, read
        from the device in one transfer. Empty when nothing was routed with statistics (decoding)."""
        if not layer_stats:
            return {}
        bce = torch.stack([s["router_bce"] for s in layer_stats.values()]).mean()
        aux = router_loss_weight * bce if extra_aux is None else router_loss_weight * bce + extra_aux
        metrics: dict[str, torch.Tensor] = {"route/router_bce": bce.detach()}
        for key in ("frac", "causal_acc", "causal_frac", "entropy"):
            metrics[f"route/{key}"] = torch.stack([s[key] for s in layer_stats.values()]).mean()
        for i, s in layer_stats.items():
            metrics[f"route/frac_L{i}"] = s["frac"]
        metrics.update(extra_metrics or {})
        values = torch.stack([v.float() for v in metrics.values()]).tolist()
        return {"aux_loss": aux, "metrics": dict(zip(metrics, values))}


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
            return layer(x, cos, sin, cache), {}
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
