"""Shared building blocks. Every architecture is assembled from these; none re-implements them."""

from dynlm.nn.attention import Attention, attention_mask
from dynlm.nn.cache import KVCache, LayerKVCache
from dynlm.nn.mlp import SwiGLU
from dynlm.nn.norm import RMSNorm
from dynlm.nn.rope import RotaryEmbedding, apply_rotary, rotate_half

__all__ = ["Attention", "attention_mask", "KVCache", "LayerKVCache", "SwiGLU", "RMSNorm",
           "RotaryEmbedding", "apply_rotary", "rotate_half"]
