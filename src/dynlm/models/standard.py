"""The dense baseline: a Qwen2 / Llama decoder-only transformer.

Parameter names follow the Hugging Face layout (`model.layers.{i}.self_attn.q_proj.weight`, ...)
so that importing and exporting real checkpoints is a rename-free copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dynlm.config import ModelConfig
from dynlm.errors import ConfigError
from dynlm.models.base import DynModel, ModelOutput, causal_lm_loss, fused_causal_lm_loss
from dynlm.nn import Attention, KVCache, LayerKVCache, RMSNorm, RotaryEmbedding, SwiGLU
from dynlm.registry import register


@dataclass
class StandardConfig(ModelConfig):
    type: str = "standard"


class DecoderLayer(nn.Module):
    """x += Attn(RMSNorm(x)); x += MLP(RMSNorm(x)), returned as one update (see `forward`)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        window = config.sliding_window if config.uses_sliding_window(layer_idx) else None
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config.hidden_size, config.num_heads, config.num_kv_heads,
                                   config.head_dim, config.attention_bias, window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerKVCache | None = None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C] -> the layer's residual update U [B, T, C]: its output is x + U. Returning U
        lets routed layers scale it (x + w * U) with no `output - x` rounding."""
        attn = self.self_attn(self.input_layernorm(x), cos, sin, cache, key_valid)  # [B, T, C]
        return attn + self.mlp(self.post_attention_layernorm(x + attn))


class DecoderBody(nn.Module):
    """Embedding, layers and final norm: `model.*` in Hugging Face names."""

    def __init__(self, config: ModelConfig, layer_class: type[nn.Module] = DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer_class(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class TransformerLM(DynModel):
    """Shared skeleton of the transformer family (standard, MoD, DTF): embedding, rotary table,
    LM head, KV-cache state and loss. Subclasses say how the layers are run in `run_layers`."""

    # Set by the trainer (`train.fused_loss`): a forward with labels and gradients computes the
    # loss from the hidden states in chunks and returns no logits (they are never materialised).
    fused_loss: bool = False
    # The fused loss's kernel (hidden [N, C], weight [V, C], targets [N]) -> mean loss; None: the
    # chunked PyTorch one (`dynlm.nn.loss.linear_cross_entropy`).
    fused_loss_kernel: Callable[..., torch.Tensor] | None = None

    def __init__(self, config: ModelConfig, layer_class: type[nn.Module] = DecoderLayer):
        super().__init__(config)
        self.model = DecoderBody(config, layer_class)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, max_length: int = 0) -> KVCache:
        c = self.config
        # the activations' device and dtype are the embedding's (an int8 LM head has no weight)
        device = device if device is not None else self.model.embed_tokens.weight.device
        dtype = dtype or self.model.embed_tokens.weight.dtype
        return KVCache.allocate(c.num_layers, batch_size, c.num_kv_heads, c.head_dim, max_length, device, dtype)

    def run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """x: [B, T, C] -> [B, T, C], plus extras (aux losses, metrics)."""
        for i, layer in enumerate(self.model.layers):
            x = x + layer(x, cos, sin, None if state is None else state.layers[i])
        return x, {}

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: KVCache | None = None, use_cache: bool = False) -> ModelOutput:
        """Without `state` and `use_cache`, a plain causal forward over positions 0..T-1 (no cache
        allocated, SDPA's causal kernel). With `state` the T tokens continue it (it is updated in
        place and returned); `use_cache=True` starts a fresh one and returns it."""
        b, t = input_ids.shape
        if state is None and use_cache:
            state = self.init_state(b, device=input_ids.device)
        positions = (torch.arange(t, device=input_ids.device) if state is None
                     else state.next_positions(t, input_ids.device))  # [T]
        x = self.model.embed_tokens(input_ids)  # [B, T, C]
        # [T, D], once for all layers; a plain forward reads the precomputed table
        cos, sin = self.rotary.prefix(t, x.dtype) if state is None else self.rotary(positions, x.dtype)
        x, extras = self.run_layers(x, cos, sin, positions, state)
        h = self.model.norm(x)
        if state is not None:
            if not torch.compiler.is_compiling():
                state.position += t
            elif not state.caller_advances_counters:
                raise ConfigError("a compiled forward with a cache cannot advance its position",
                                  "decode through dynlm.infer.graphs.GraphDecoder(model, compile=...)")
        if labels is not None and self.fused_loss and torch.is_grad_enabled():
            logits = None
            loss = fused_causal_lm_loss(h, self.lm_head.weight, labels, self.fused_loss_kernel)
        else:
            logits = self.lm_head(h)  # [B, T, V]
            loss = causal_lm_loss(logits, labels) if labels is not None else None
        return ModelOutput(logits=logits, loss=loss, aux_loss=extras.get("aux_loss"), state=state,
                           metrics=extras.get("metrics", {}))


@register("standard", StandardConfig)
class StandardModel(TransformerLM):
    """Qwen2 / Llama dense transformer."""
