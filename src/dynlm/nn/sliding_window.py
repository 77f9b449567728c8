"""Causal sliding-window attention in O(T * w): each query attends to itself and the w - 1 keys
before it, and nothing is ever computed for the T x T pairs outside that band.

- `sliding_window_attention_reference`: masked SDPA over the full T x T matrix (the naive
  reference the tests compare against; O(T^2), never used by a model).
- `blocked_sliding_window_attention`: queries in blocks of w; each block attends to the w + w - 1
  keys that can reach it (one SDPA call over all blocks with a [block, 2w-1] band mask). Any
  device; the key sequence may start with a history of earlier keys (streaming).
- `flex_sliding_window_attention`: FlexAttention with a sliding-window block mask (CUDA, no
  history): its kernel skips the blocks outside the band.

`SlidingWindowAttention` is the block: q/k/v projections, RoPE, the window, and a fixed-size
history of the last w - 1 keys and values for streaming (constant memory whatever the context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.nn.attention import attention_mask
from dynlm.nn.rope import apply_rotary

try:  # FlexAttention (torch >= 2.5); only used on CUDA
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch
    flex_attention = None


def sliding_window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                                       key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, Tq, D]; k, v [B, H, Tk, D] with Tk >= Tq, the queries being the last Tq keys'
    positions; key_valid [Tk] bool. Full masked attention (reference only)."""
    tq, tk = q.shape[2], k.shape[2]
    k_pos = torch.arange(tk, device=q.device)
    mask = attention_mask(k_pos[tk - tq:], k_pos, window)
    if key_valid is not None:
        mask = mask & key_valid
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def blocked_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                                     key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as the reference, in O(Tq * w) time and memory."""
    b, h, tq, d = q.shape
    tk = k.shape[2]
    history = tk - tq  # keys before the first query
    block = max(1, min(window, tq))
    n = -(-tq // block)
    reach = block + window - 1  # keys one block of queries can see
    valid = torch.ones(tk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    # key index of query i is history + i; its keys are history + i - window + 1 .. history + i.
    # Left-pad the keys so every block's keys start at a non-negative index: block m's keys are
    # padded[history + m * block : history + m * block + reach] with `window - 1` pad slots in front.
    left = window - 1
    right = n * block - tq
    k_pad = F.pad(k, (0, 0, left, right))
    v_pad = F.pad(v, (0, 0, left, right))
    # the right pad only serves padding queries (sliced off below); it is marked valid so that
    # no row of the softmax is empty (an all-masked row is NaN, and NaN poisons the backward)
    valid_pad = F.pad(F.pad(valid, (left, 0), value=False), (0, right), value=True)
    k_pad, v_pad, valid_pad = (x[..., history:, :] if x.dim() == 4 else x[history:] for x in (k_pad, v_pad, valid_pad))
    k_blocks = k_pad.unfold(2, reach, block).transpose(-1, -2)  # [B, H, N, reach, D]
    v_blocks = v_pad.unfold(2, reach, block).transpose(-1, -2)
    valid_blocks = valid_pad.unfold(0, reach, block)  # [N, reach]
    i = torch.arange(block, device=q.device)[:, None]
    j = torch.arange(reach, device=q.device)[None, :]
    band = (j >= i) & (j <= i + window - 1)  # [block, reach]: query i's own key sits at j = i + window - 1
    mask = band & valid_blocks[:, None, :]  # [N, block, reach]
    q_blocks = F.pad(q, (0, 0, 0, right)).view(b, h, n, block, d)
    out = F.scaled_dot_product_attention(q_blocks, k_blocks, v_blocks, attn_mask=mask)  # [B, H, N, block, D]
    return out.reshape(b, h, n * block, d)[:, :, :tq]


_FLEX_MASKS: dict[tuple[int, int, str], object] = {}
_compiled_flex = None


def flex_sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int) -> torch.Tensor:
    """q, k, v [B, H, T, D] of one causal sequence (no history); compiled FlexAttention."""
    global _compiled_flex
    t = q.shape[2]
    key = (t, window, str(q.device))
    if key not in _FLEX_MASKS:
        def in_window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

        _FLEX_MASKS[key] = create_block_mask(in_window, None, None, t, t, device=q.device)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=_FLEX_MASKS[key])


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """FlexAttention on CUDA for a sequence without history, the blocked form otherwise."""
    if (flex_attention is not None and q.is_cuda and k.shape[2] == q.shape[2] and key_valid is None
            and q.shape[2] >= 128):
        return flex_sliding_window_attention(q, k, v, window)
    return blocked_sliding_window_attention(q, k, v, window, key_valid)


@dataclass
class WindowHistory:
    """The last `window - 1` keys and values of one layer ([B, H, w-1, D], oldest first) and
    which slots hold a real key yet ([w-1] bool): fixed size, whatever the context."""

    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def empty(cls, batch_size: int, num_heads: int, window: int, head_dim: int,
              device: torch.device | str | None, dtype: torch.dtype) -> WindowHistory:
        shape = (batch_size, num_heads, window - 1, head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype),
                   torch.zeros(window - 1, dtype=torch.bool, device=device))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.valid))


class SlidingWindowAttention(nn.Module):
    """Multi-head causal attention over the last `window` positions with RoPE.

    forward(x [B, T, C], cos, sin [T, D], history) -> (y [B, T, H*D] before any output
    projection, new history or None). With a history, the T positions follow the ones it holds."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, window: int):
        super().__init__()
        self.num_heads, self.head_dim, self.window = num_heads, head_dim, window
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                history: WindowHistory | None = None) -> tuple[torch.Tensor, WindowHistory | None]:
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = (y.view(b, t, self.num_heads, self.head_dim).transpose(1, 2) for y in (q, k, v))  # [B, H, T, D]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if history is None:
            y = sliding_window_attention(q, k, v, self.window)
        else:
            keys = torch.cat([history.k.to(k.dtype), k], dim=2)
            values = torch.cat([history.v.to(v.dtype), v], dim=2)
            valid = torch.cat([history.valid, torch.ones(t, dtype=torch.bool, device=x.device)])
            y = sliding_window_attention(q, keys, values, self.window, valid)
            keep = self.window - 1
            history = WindowHistory(keys[:, :, keys.shape[2] - keep:], values[:, :, values.shape[2] - keep:],
                                    valid[valid.shape[0] - keep:])
        return y.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim), history
