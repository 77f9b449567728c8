"""Grouped-query self-attention through `scaled_dot_product_attention` (flash on CUDA when the
mask allows), optional q/k/v bias, optional sliding window, KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from dynlm.nn.cache import LayerKVCache
from dynlm.nn.decode_attention import decode_attention
from dynlm.nn.rope import apply_rotary

# With a KV cache the key length changes at every step. cuDNN's attention builds a new execution
# plan for each new shape (measured: ~4.5 ms of host time per call on an H100, 70 ms per decoded
# token for a 12-layer model), so cached attention uses the flash / memory-efficient kernels.
CACHED_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_mask(
    q_positions: torch.Tensor,
    k_positions: torch.Tensor,
    window: int | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Boolean mask, True = may attend. q_positions: [Tq] or [B, Tq], k_positions: [Tk] or [B, Tk];
    valid: [B, Tk] key validity. Returns [Tq, Tk] or [B, 1, Tq, Tk].

    A query always sees its own key, valid or not: every row of the mask then has a True entry,
    so softmax never runs over an empty row (NaN in the forward and, through dK/dV, in the
    backward). A token that is not a key for later queries still gets a finite output of its own;
    routed layers drop that output."""
    mask = k_positions.unsqueeze(-2) <= q_positions.unsqueeze(-1)
    if window is not None:
        mask = mask & (k_positions.unsqueeze(-2) > q_positions.unsqueeze(-1) - window)
    if valid is not None:
        own = k_positions.unsqueeze(-2) == q_positions.unsqueeze(-1)
        mask = mask & (valid.unsqueeze(-2) | own)
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    return mask


def grouped_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of q [B, H, T, D] over k, v [B, Hkv, Tk, D] (H a multiple of Hkv) without
    expanding k and v to H heads: the G = H / Hkv query heads sharing a key head become G*T query
    rows of that head, so each cached key is read once per key head, not G times (decoding reads
    the whole cache at every step). mask: None, [T, Tk] or [B, 1, T, Tk] (True = may attend)."""
    b, h, t, d = q.shape
    groups = h // k.shape[1]
    if groups == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    q = q.reshape(b, k.shape[1], groups * t, d)  # rows ordered (head in group, position)
    if mask is not None:
        mask = mask.repeat(groups, 1) if mask.dim() == 2 else mask.repeat(1, 1, groups, 1)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, Hkv, G*T, D]
    return y.reshape(b, h, t, d)


class Attention(nn.Module):
    FUSABLE = ("q_proj", "k_proj", "v_proj")  # read one input: fused by `nn.fusion` for decoding

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.fused: tuple[torch.Tensor, torch.Tensor | None] | None = None  # q|k|v weight, bias (nn.fusion)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, C] -> q [B, H, T, D], k and v [B, Hkv, T, D], before the rotation. With
        `fused` set, one matmul through the concatenated weight instead of three."""
        b, t, _ = x.shape
        if self.fused is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            kv_size = self.num_kv_heads * self.head_dim
            q, k, v = F.linear(x, *self.fused).split([self.num_heads * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerKVCache | None = None,
        key_valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [B, T, C]; cos/sin: [T, D] or [B, T, D] for the tokens' true positions.
        Without a cache, x is a causal sequence (tokens in position order). With a cache, the T
        new tokens follow the cached ones (`cache.update` keeps their positions). `key_valid` [B, T]
        marks which new tokens become keys for later queries (routed layers; with a cache the marks
        are kept). Without a cache, window or key marks, attention is SDPA's `is_causal` path (flash
        on CUDA)."""
        b, t, _ = x.shape
        q, k, v = self.project(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if cache is None:
            mask = None
            if self.sliding_window is not None or key_valid is not None:
                pos = torch.arange(t, device=x.device)
                mask = attention_mask(pos, pos, self.sliding_window, key_valid)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            k, v, q_pos, k_pos, valid = cache.update(k, v, key_valid, self.sliding_window)
            mask = None  # one new query over a growable cache sees every cached key
            if t > 1 or self.sliding_window is not None or valid is not None or cache.fixed_shape:
                mask = attention_mask(q_pos, k_pos, self.sliding_window, valid)
            if t == 1 and cache.decode_kernel != "sdpa":  # a decode step, parallel over the keys
                y = decode_attention(q, k, v, mask, cache.decode_kernel)
            else:
                with sdpa_kernel(CACHED_ATTENTION_BACKENDS):
                    y = grouped_query_attention(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))
