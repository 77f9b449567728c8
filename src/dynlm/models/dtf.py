"""DTF, the surprise-routed Dynamic Transformer (Wieser et al., "Subjective Depth & Timescale
Transformers", arXiv 2511.21408, after Zakharov et al.'s Variational Predictive Routing).

Layers come in pairs: a dense *decision* layer, then a routed *dynamic* layer.

Decision layer (every token), with U = Block(H) the decoder layer's residual update:
    H_post  = H + U
    H_prior = H + PriorFFN(RMSNorm(H))          a small SwiGLU predicting the update cheaply
    L_prior = MSE(H_prior, stopgrad(H_post))    added to the loss with weight lambda_prior
    D_st = |H_post - H|^2 / d                   static surprise: how much the block changed the token
    D_ch = |H_post - H_prior|^2 / d             change surprise: how wrong the cheap prior was

Gate (learnable scalars o_ce, m_cu, beta_ce, beta_cu per pair):
    CE   = D_st - (D_ch - log(o_ce + 1e-10))             "expected event"
    CU   = D_st - m_cu * MA(D_st)                         "unexpected event", MA causal (previous tokens)
    S_CE = sigmoid(softplus(beta_ce) * CE),  S_CU = sigmoid(softplus(beta_cu) * CU)
    G    = S_CE + S_CU - S_CE * S_CU                      probabilistic OR

Dynamic layer: the top-k tokens of G per sequence get H' = H_post + G * Block(H_post), attending
only among themselves; the others keep H' = H_post. A causal router (MLP on the stop-gradient
H_post and G) learns the top-k decision for generation, as in MoD.

Choices the spec leaves open, made here: the surprises D_st / D_ch enter the gate as measurements
(stop-gradient), so the blocks are trained by the LM loss alone and the gate's scalars by the
gradient through G; the prior reads a stop-gradient H, so L_prior trains the prior only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.routed import RoutedTransformerLM
from dynlm.models.standard import DecoderLayer
from dynlm.nn import KVCache, RMSNorm, SwiGLU
from dynlm.nn.routing import CausalRouter, binary_entropy, causal_moving_average
from dynlm.registry import register

# Initial values of the gate's learnable scalars: the seed repository's config and the paper's.
DTF_INIT_PRESETS: dict[str, dict[str, float]] = {
    "seed": {"beta_ce_init": -0.5, "beta_cu_init": -0.8, "m_cu_init": 1.2, "o_ce_init": 1.0},
    "paper": {"beta_ce_init": -0.3, "beta_cu_init": -0.6, "m_cu_init": 1.1, "o_ce_init": 1.025},
}


@dataclass
class DTFConfig(ModelConfig):
    type: str = "dtf"
    dtf_capacity: float = 0.125  # fraction of a sequence's tokens each dynamic layer processes
    dtf_init: str = "seed"  # preset for the four *_init values left unset: seed | paper
    beta_ce_init: float | None = None  # seed -0.5
    beta_cu_init: float | None = None  # seed -0.8
    m_cu_init: float | None = None  # seed 1.2
    o_ce_init: float | None = None  # seed 1.0
    prior_factor: float = 0.125  # PriorFFN width = max(2, ceil(prior_factor * hidden)), rounded up to even
    lambda_prior: float = 0.05  # weight of the prior loss (mean over decision layers)
    ma_window: int = 100  # tokens in the causal moving average of D_st
    causal_router_weight: float = 0.01  # weight of the causal router's BCE against the top-k mask

    def __post_init__(self) -> None:
        if self.dtf_init not in DTF_INIT_PRESETS:
            raise ConfigError(f"model.dtf_init must be one of {', '.join(DTF_INIT_PRESETS)}, got '{self.dtf_init}'")
        for key, value in DTF_INIT_PRESETS[self.dtf_init].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        super().__post_init__()

    @property
    def prior_size(self) -> int:
        width = max(2, math.ceil(self.prior_factor * self.hidden_size))
        return width + width % 2

    def validate(self) -> None:
        super().validate()
        if self.num_layers % 2:
            raise ConfigError(f"model.num_layers must be even for DTF (decision/dynamic pairs), got {self.num_layers}")
        if not 0.0 < self.dtf_capacity <= 1.0:
            raise ConfigError(f"model.dtf_capacity must be in (0, 1], got {self.dtf_capacity}")
        if not 0.0 < self.prior_factor <= 1.0:
            raise ConfigError(f"model.prior_factor must be in (0, 1], got {self.prior_factor}")
        if self.o_ce_init <= 0:
            raise ConfigError(f"model.o_ce_init must be > 0 (its log is taken), got {self.o_ce_init}")
        if self.ma_window < 1:
            raise ConfigError(f"model.ma_window must be >= 1, got {self.ma_window}")
        if self.lambda_prior < 0 or self.causal_router_weight < 0:
            raise ConfigError("model.lambda_prior and model.causal_router_weight must be >= 0")
        for i in range(1, self.num_layers, 2):
            if self.uses_sliding_window(i):
                raise ConfigError(f"model.sliding_window_layers: dynamic layer {i} is routed and cannot use a "
                                  "sliding window", "list only even (decision) layers")


@dataclass
class DTFState(KVCache):
    """KV cache plus, per decision layer, the last <= ma_window values of D_st [B, h] (the
    causal moving average continues across calls)."""

    surprise_history: dict[int, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        return super().nbytes() + sum(t.numel() * t.element_size() for t in self.surprise_history.values())


class SurpriseGate(nn.Module):
    """G from the surprises D_st, D_ch [B, T] and the moving average of D_st; fp32."""

    def __init__(self, config: DTFConfig):
        super().__init__()
        self.o_ce = nn.Parameter(torch.tensor(float(config.o_ce_init)))
        self.m_cu = nn.Parameter(torch.tensor(float(config.m_cu_init)))
        self.beta_ce = nn.Parameter(torch.tensor(float(config.beta_ce_init)))
        self.beta_cu = nn.Parameter(torch.tensor(float(config.beta_cu_init)))

    def forward(self, d_st: torch.Tensor, d_ch: torch.Tensor,
                d_st_average: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> S_CE, S_CU, G, each [B, T]."""
        o_ce, m_cu = self.o_ce.float(), self.m_cu.float()
        expected = d_st - (d_ch - torch.log(o_ce.clamp(min=0) + 1e-10))  # CE
        unexpected = d_st - m_cu * d_st_average  # CU
        s_ce = torch.sigmoid(F.softplus(self.beta_ce.float()) * expected)
        s_cu = torch.sigmoid(F.softplus(self.beta_cu.float()) * unexpected)
        return s_ce, s_cu, s_ce + s_cu - s_ce * s_cu


class DTFDecisionLayer(DecoderLayer):
    """A dense decoder layer with the prior that predicts its update (`prior_norm`, `prior`)."""

    def __init__(self, config: DTFConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.prior_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.prior = SwiGLU(config.hidden_size, config.prior_size)


class DTFDynamicLayer(DecoderLayer):
    """A routed decoder layer with its gate scalars and causal router."""

    def __init__(self, config: DTFConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.gate = SurpriseGate(config)
        self.causal_router = CausalRouter(config.hidden_size, num_features=1)


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 / d over the last dimension, fp32, no gradient: [B, T, C] -> [B, T]."""
    return torch.linalg.vector_norm(x.detach(), dim=-1, dtype=torch.float32).square() / x.shape[-1]


def dtf_layer(config: DTFConfig, layer_idx: int) -> DecoderLayer:
    """Even layers decide, odd layers are routed."""
    return (DTFDecisionLayer if layer_idx % 2 == 0 else DTFDynamicLayer)(config, layer_idx)


@register("dtf", DTFConfig)
class DTFModel(RoutedTransformerLM):
    """Surprise-routed Dynamic Transformer."""

    config: DTFConfig

    def __init__(self, config: DTFConfig):
        super().__init__(config, dtf_layer)

    def routed_capacities(self) -> dict[int, float]:
        return {i: self.config.dtf_capacity for i in range(1, self.config.num_layers, 2)}

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, max_length: int = 0) -> DTFState:
        cache = super().init_state(batch_size, device, dtype, max_length)
        return DTFState(cache.layers, cache.position)

    def pair_forward(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, state: DTFState | None,
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None]:
        """Decision layer i and dynamic layer i + 1 on x [B, T, C] -> (x, prior loss, routing
        statistics, surprise statistics [6] or None when decoding)."""
        c = self.config
        decision, dynamic = self.model.layers[i], self.model.layers[i + 1]
        update = decision(x, cos, sin, None if state is None else state.layers[i])  # U = Block(H)
        prior_update = decision.prior(decision.prior_norm(x.detach()))  # H_prior - H
        prior_loss = F.mse_loss(prior_update.float(), update.detach().float())
        d_st = mean_square(update)  # [B, T]
        d_ch = mean_square(update - prior_update)
        history = None if state is None else state.surprise_history.get(i)
        d_st_average, history = causal_moving_average(d_st, c.ma_window, history)
        if state is not None:
            state.surprise_history[i] = history
        s_ce, s_cu, gate = dynamic.gate(d_st, d_ch, d_st_average)
        x = x + update  # H_post
        causal_logits = dynamic.causal_router(x, gate.unsqueeze(-1))
        x, mask, stats = self.route(i + 1, dynamic, x, gate, gate, causal_logits, c.dtf_capacity, cos, sin,
                                    None if state is None else state.layers[i + 1])
        if not stats:
            return x, prior_loss, stats, None
        stats["entropy"] = binary_entropy(gate.detach()).mean()
        ce_driven = (s_ce >= s_cu) & mask
        surprise = torch.stack([d_st.mean(), d_ch.mean(), s_ce.detach().mean(), s_cu.detach().mean(),
                                gate.detach().mean(), ce_driven.sum() / mask.sum().clamp(min=1)])
        return x, prior_loss, stats, surprise

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   state: DTFState | None) -> tuple[torch.Tensor, dict[str, Any]]:
        c = self.config
        layer_stats: dict[int, dict[str, torch.Tensor]] = {}
        prior_losses, surprises = [], []
        for i in range(0, c.num_layers, 2):
            x, prior_loss, stats, surprise = self.pair_forward(i, x, cos, sin, state)
            prior_losses.append(prior_loss)
            if stats:
                layer_stats[i + 1] = stats
                surprises.append(surprise)
        prior_loss = torch.stack(prior_losses).mean()
        if not layer_stats:
            return x, {"aux_loss": c.lambda_prior * prior_loss}
        means = torch.stack(surprises).mean(0)
        metrics = dict(zip(("dtf/D_st", "dtf/D_ch", "dtf/S_CE", "dtf/S_CU", "dtf/G", "dtf/ce_share"), means))
        metrics["dtf/cu_share"] = 1 - means[5]
        metrics["dtf/prior_loss"] = prior_loss.detach()
        return x, self.routing_extras(layer_stats, c.causal_router_weight, c.lambda_prior * prior_loss, metrics)
