"""Attention of one new token per row over a static KV cache (a decode step), parallel over keys.

The reference is `grouped_query_attention` (SDPA with a boolean mask: the memory-efficient kernel,
since flash takes no mask). With the G query heads of a key head folded into G query rows, it
runs B x Hkv thread blocks, each walking every cached key in turn: at batch 1 and 4K keys, two
blocks do all the work. The variants below give the same result and let the work spread over the
keys (what "flash-decoding" does):

- "math": scores = q k^T, masked softmax over all keys, p v, as plain ops (under torch.compile,
  matmuls and a fused, split reduction for the softmax).
- "split": keys cut into chunks of `SPLIT_CHUNK`; per chunk c and query row, the partial
  m_c = max scores, l_c = sum exp(s - m_c), o_c = sum exp(s - m_c) v; then merged by
  log-sum-exp: m = max_c m_c, out = sum_c e^(m_c - m) o_c / sum_c e^(m_c - m) l_c.

PyTorch's FlexAttention was measured as a third variant on an H200 (torch 2.11) and taken out: alone
it ran no faster than SDPA (211 vs 214 us per layer at 4K keys, batch 1), and compiled inside the
whole decode step inductor failed to build its kernel.

Every variant takes the mask the reference takes (`attention_mask` of the slot positions: empty
slots, ring windows and invalid keys of routed layers are False), reads no host value, and keeps
static shapes: it can be captured in a CUDA graph. Scores and softmax are in float32; the two
products run in the input dtype (as the fused kernels do)."""

from __future__ import annotations

import math

import torch

DECODE_KERNELS = ("sdpa", "math", "split")  # "sdpa": the reference (`grouped_query_attention`)
SPLIT_CHUNK = 256  # keys per chunk of the "split" kernel


def _rows(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """q [B, H, 1, D] -> [B, Hkv, G, D]: the G query heads of each key head as rows."""
    b, h, _, d = q.shape
    return q.reshape(b, kv_heads, h // kv_heads, d)


def _allowed(mask: torch.Tensor | None, batch: int, keys: int, device: torch.device) -> torch.Tensor:
    """The mask of one query ([1, Tk] or [B, 1, 1, Tk], None = all) as [B, Tk]."""
    if mask is None:
        return torch.ones(batch, keys, dtype=torch.bool, device=device)
    return mask.reshape(-1, keys).expand(batch, keys)


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scaled scores in float32 [B, Hkv, G, Tk] of q [B, H, 1, D] over k [B, Hkv, Tk, D]: one
    matmul in the input dtype over all keys (parallel over them)."""
    return (_rows(q, k.shape[1]) @ k.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])


def math_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, 1, D], k and v [B, Hkv, Tk, D], mask as the reference's; returns [B, H, 1, D]."""
    b, h, _, d = q.shape
    allowed = _allowed(mask, b, k.shape[2], q.device)[:, None, None, :]  # [B, 1, 1, Tk]
    p = _scores(q, k).masked_fill(~allowed, float("-inf")).softmax(-1)  # [B, Hkv, G, Tk]
    return (p.to(v.dtype) @ v).reshape(b, h, 1, d)


def _partials(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """scores [B, Hkv, G, S, C] (S chunks of C keys, masked), v [B, Hkv, S, C, D]. Per chunk and
    row: max m, sum l [B, Hkv, S, G, 1] and unnormalised output o [B, Hkv, S, G, D]."""
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - m).transpose(2, 3)  # [B, Hkv, S, G, C]
    return m.transpose(2, 3), p.sum(-1, keepdim=True), (p.to(v.dtype) @ v).float()


def split_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                           chunk: int | None = None) -> torch.Tensor:
    """As `math_decode_attention`, the softmax and the product with v in chunks of `chunk` keys
    (default SPLIT_CHUNK), merged by log-sum-exp; keys past the last whole chunk form one shorter
    chunk."""
    b, h, _, d = q.shape
    keys = k.shape[2]
    chunk = chunk or SPLIT_CHUNK
    splits = keys // chunk
    if splits <= 1:
        return math_decode_attention(q, k, v, mask)
    allowed = _allowed(mask, b, keys, q.device)[:, None, None, :]  # [B, 1, 1, Tk]
    # a finite fill: a chunk with no allowed key gets m = the fill and weight e^(fill - m) = 0 in
    # the merge, with no inf - inf on the way
    scores = _scores(q, k).masked_fill(~allowed, torch.finfo(torch.float32).min)  # [B, Hkv, G, Tk]
    whole = splits * chunk
    chunked = (splits, chunk)
    parts = [_partials(scores[..., :whole].unflatten(-1, chunked), v[:, :, :whole].unflatten(2, chunked))]
    if whole < keys:
        parts.append(_partials(scores[..., None, whole:], v[:, :, None, whole:]))
    peak, total, partial = (torch.cat(p, dim=2) for p in zip(*parts))  # m, l, o: [B, Hkv, S, G, 1 / 1 / D]
    weight = torch.exp(peak - peak.amax(2, keepdim=True))
    out = (partial * weight).sum(2) / (total * weight).sum(2)  # [B, Hkv, G, D]
    return out.to(q.dtype).reshape(b, h, 1, d)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     kernel: str) -> torch.Tensor:
    """One query per row (q [B, H, 1, D]) over k, v [B, Hkv, Tk, D] with `kernel` "math" or
    "split" ("sdpa" is the caller's reference path)."""
    if kernel == "math":
        return math_decode_attention(q, k, v, mask)
    if kernel == "split":
        return split_decode_attention(q, k, v, mask)
    raise ValueError(f"decode attention kernel {kernel!r} is not one of {', '.join(DECODE_KERNELS[1:])}")
