"""KV caches. Per layer, keys and values [B, H_kv, positions, D]; all rows advance together (one
position per token fed). Routed layers mark positions whose token skipped the layer as invalid
keys (`valid` [B, positions]).

Two kinds, with the same interface (`update`):
- `LayerKVCache` (in `KVCache`): grows as needed; a sliding-window layer keeps only the last
  window - 1 positions, so its memory stays bounded however long the sequence.
- `StaticLayerKVCache` (in place of the above in a `KVCache`): preallocated once, never reallocated, and its
  position counter lives on the device, so a decode step has the same shapes and addresses at
  every call and can be captured in a CUDA graph. A sliding-window layer is a ring buffer of
  `window` slots (position p in slot p mod window).

`update` stores the new keys and returns what attention needs: all keys and values to attend
over, the positions of the queries [T] and keys [Tk], and the key validity [B, Tk] (or None)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from dynlm.errors import ContextLengthError

# Slot position of a static cache slot not yet written: later than any query, so never attended.
EMPTY_SLOT = torch.iinfo(torch.int64).max // 2

CacheUpdate = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@dataclass
class LayerKVCache:
    k: torch.Tensor | None = None  # [B, Hkv, capacity, D]; windowed: the kept positions only
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, capacity] bool, None = every filled position is a key
    length: int = 0  # positions fed so far

    # True when shapes never change between calls (callers then avoid data-dependent branches)
    fixed_shape: ClassVar[bool] = False
    # attention of a one-token step (`decode_attention.DECODE_KERNELS`); "sdpa" = the reference
    decode_kernel: ClassVar[str] = "sdpa"

    @property
    def capacity(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        capacity = max(needed, 2 * self.capacity, 16)
        b, h, _, d = like.shape
        k = like.new_zeros(b, h, capacity, d)
        v = like.new_zeros(b, h, capacity, d)
        if self.k is not None:
            k[:, :, : self.length] = self.k[:, :, : self.length]
            v[:, :, : self.length] = self.v[:, :, : self.length]
        if self.valid is not None:
            valid = torch.zeros(b, capacity, dtype=torch.bool, device=like.device)
            valid[:, : self.length] = self.valid[:, : self.length]
            self.valid = valid
        self.k, self.v = k, v

    def append(
        self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Add T new positions (k, v: [B, Hkv, T, D]); return every key/value so far and the
        validity mask ([B, length] or None)."""
        t = k.shape[2]
        end = self.length + t
        if end > self.capacity or self.k.dtype != k.dtype:
            self._grow(k, end)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        if valid is not None and self.valid is None:
            self.valid = torch.ones(k.shape[0], self.capacity, dtype=torch.bool, device=k.device)
        if self.valid is not None:
            self.valid[:, self.length : end] = True if valid is None else valid
        self.length = end
        valid_all = None if self.valid is None else self.valid[:, :end]
        return self.k[:, :, :end], self.v[:, :, :end], valid_all

    def _append_windowed(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                         window: int) -> CacheUpdate:
        """Keys are the kept positions plus the new ones; afterwards only the last window - 1
        positions are kept (the next query, at position `length`, sees no earlier one)."""
        start, t = self.length, k.shape[2]
        # kept positions are [start - kept, start); a buffer preallocated by `allocate` holds
        # them as a filled prefix
        kept = 0 if self.k is None else min(self.k.shape[2], start)
        keys = k if kept == 0 else torch.cat([self.k[:, :, :kept].to(k.dtype), k], dim=2)
        values = v if kept == 0 else torch.cat([self.v[:, :, :kept].to(v.dtype), v], dim=2)
        valid_all = None
        if valid is not None or self.valid is not None:
            old = self.valid if self.valid is not None else torch.ones(k.shape[0], kept, dtype=torch.bool,
                                                                       device=k.device)
            new = valid if valid is not None else torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
            valid_all = torch.cat([old[:, :kept], new], dim=1)
        keep = min(window - 1, kept + t)
        self.k, self.v = keys[:, :, keys.shape[2] - keep:], values[:, :, values.shape[2] - keep:]
        self.valid = None if valid_all is None else valid_all[:, valid_all.shape[1] - keep:]
        self.length = start + t
        k_pos = torch.arange(start - kept, start + t, device=k.device)
        return keys, values, k_pos[kept:], k_pos, valid_all

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
               window: int | None = None) -> CacheUpdate:
        """Store T new positions (k, v [B, Hkv, T, D], `valid` [B, T] which of them are keys).
        Returns (keys, values [B, Hkv, Tk, D], query positions [T], key positions [Tk], key
        validity [B, Tk] or None)."""
        if window is not None:
            return self._append_windowed(k, v, valid, window)
        start = self.length
        keys, values, valid_all = self.append(k, v, valid)
        k_pos = torch.arange(self.length, device=k.device)
        return keys, values, k_pos[start:], k_pos, valid_all

    def nbytes(self) -> int:
        total = 0
        for t in (self.k, self.v):
            if t is not None:
                total += t[:, :, : self.length].numel() * t.element_size()
        return total


@dataclass
class KVCache:
    """The state of a transformer: one LayerKVCache per layer and the number of positions seen."""

    layers: list[LayerKVCache | StaticLayerKVCache] = field(default_factory=list)
    position: int = 0
    # A decoder that runs the step under torch.compile sets this and advances the host counters
    # (`position`, the static layers' `length`) itself after each step: inside compiled code their
    # Python values would specialise the compiled step, one recompilation per position.
    caller_advances_counters: bool = False

    @classmethod
    def allocate(
        cls,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> KVCache:
        layers = []
        for _ in range(num_layers):
            if capacity > 0:
                shape = (batch_size, num_kv_heads, capacity, head_dim)
                layers.append(LayerKVCache(torch.zeros(shape, device=device, dtype=dtype),
                                           torch.zeros(shape, device=device, dtype=dtype)))
            else:
                layers.append(LayerKVCache())
        return cls(layers)

    def next_positions(self, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Positions [T] of the next `length` tokens fed. With static layer caches they are read
        from the device counter, so a captured step replays at the right position."""
        if self.layers and self.layers[0].fixed_shape:
            return self.layers[0].cursor + torch.arange(length, device=device)
        return torch.arange(self.position, self.position + length, device=device)

    def nbytes(self) -> int:
        """Bytes of keys and values actually held (filled positions only)."""
        return sum(layer.nbytes() for layer in self.layers)


class StaticLayerKVCache:
    """A preallocated layer cache: `slots` positions (the whole context, or the window of a
    sliding-window layer, used as a ring), with the next position in a device tensor `cursor`
    that `update` advances, so a captured decode step replays correctly at any position."""

    fixed_shape: ClassVar[bool] = True

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, capacity: int,
                 window: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.ring = window is not None and window < capacity
        slots = window if self.ring else capacity
        self.max_length = capacity  # positions this cache may ever hold (ring or not)
        self.k = torch.zeros(batch_size, num_kv_heads, slots, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.valid = torch.ones(batch_size, slots, dtype=torch.bool, device=device)
        self.slot_positions = torch.full((slots,), EMPTY_SLOT, dtype=torch.long, device=device)
        self.cursor = torch.zeros((), dtype=torch.long, device=device)
        self.length = 0  # host copy of `cursor`; a graph replay leaves it to the caller
        self.masked = False  # True once some key was marked invalid (routed layers)
        # Slots a one-token step attends over: None = all; n = the first n (the caller keeps n
        # above every filled position, e.g. a length bucket), so attention skips empty slots.
        self.attend: int | None = None
        # Attention of a one-token step: one of `decode_attention.DECODE_KERNELS` (set by the
        # decoder that owns the cache; "sdpa" = the reference path).
        self.decode_kernel = "sdpa"

    @classmethod
    def from_tensors(cls, k: torch.Tensor, v: torch.Tensor, cursor: torch.Tensor, valid: torch.Tensor | None = None,
                     capacity: int | None = None) -> StaticLayerKVCache:
        """A cache over given buffers, updated in place: k, v [B, Hkv, slots, D], `cursor` (a 0-d
        int64 tensor, the next position), `valid` [B, slots] or None. Which position each slot
        holds is computed from `cursor` (slot s: the latest position p <= cursor - 1 with
        p = s mod slots, or empty), so a functional decode step (the ONNX export) carries only
        these tensors. A ring (sliding window) when `capacity` exceeds the slots."""
        cache = cls.__new__(cls)
        slots = k.shape[2]
        cache.ring = capacity is not None and capacity > slots
        cache.max_length = capacity if cache.ring else slots
        cache.k, cache.v, cache.cursor = k, v, cursor
        cache.masked = valid is not None
        cache.valid = valid if valid is not None else torch.ones(k.shape[0], slots, dtype=torch.bool, device=k.device)
        last = cursor - 1
        position = last - torch.remainder(last - torch.arange(slots, device=k.device), slots)  # [slots]
        cache.slot_positions = torch.where(position >= 0, position, torch.full_like(position, EMPTY_SLOT))
        cache.length = 0  # host counter unknown (a traced cursor): no host-side length check
        cache.attend = None  # every slot: the exported step has no host-side length buckets
        cache.decode_kernel = "sdpa"
        return cache

    @property
    def capacity(self) -> int:
        return self.max_length

    def reset(self) -> None:
        """Empty the cache in place (buffers keep their addresses)."""
        self.valid.fill_(True)
        self.slot_positions.fill_(EMPTY_SLOT)
        self.cursor.zero_()
        self.length = 0
        self.masked = False
        self.attend = None

    def update(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None = None,
               window: int | None = None) -> CacheUpdate:
        """As `LayerKVCache.update`; keys and values are the whole buffer (unwritten slots sit at
        position EMPTY_SLOT, after every query), or for a multi-token chunk into a ring the ring
        followed by the chunk. Key validity is kept only once a caller has passed some (a routed
        layer passes it at every call), so a dense layer's step does no validity work."""
        t = k.shape[2]
        # Host bookkeeping stays out of a compiled step (its value would specialise the compiled
        # code, one recompilation per position); the compiled step's caller advances `length`.
        host = not torch.compiler.is_compiling()
        if host and self.length + t > self.max_length:
            raise ContextLengthError(f"position {self.length + t} is past the allocated cache length "
                                     f"{self.max_length}")
        q_pos = self.cursor + torch.arange(t, device=k.device)  # [T]
        self.masked = self.masked or valid is not None
        if self.masked and valid is None:
            valid = torch.ones(k.shape[0], t, dtype=torch.bool, device=k.device)
        slots = self.slot_positions.shape[0]
        result = None
        if self.ring and t > 1:  # earlier queries of the chunk still need the keys it overwrites
            result = (torch.cat([self.k, k.to(self.k.dtype)], dim=2), torch.cat([self.v, v.to(self.v.dtype)], dim=2),
                      q_pos, torch.cat([self.slot_positions, q_pos]),
                      torch.cat([self.valid, valid], dim=1) if self.masked else None)
            k, v, written = k[:, :, -slots:], v[:, :, -slots:], q_pos[-slots:]
            valid = None if valid is None else valid[:, -slots:]
        else:
            written = q_pos
        index = written % slots if self.ring else written
        self.k.index_copy_(2, index, k.to(self.k.dtype))
        self.v.index_copy_(2, index, v.to(self.v.dtype))
        if self.masked:
            self.valid.index_copy_(1, index, valid)
        self.slot_positions.index_copy_(0, index, written)
        self.cursor.add_(t)
        if host:
            self.length += t
        if result is not None:
            return result
        n = self.attend if t == 1 and not self.ring and self.attend is not None else self.slot_positions.shape[0]
        return (self.k[:, :, :n], self.v[:, :, :n], q_pos, self.slot_positions[:n],
                self.valid[:, :n] if self.masked else None)

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

