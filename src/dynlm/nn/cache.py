"""KV cache: per layer, pre-allocated [B, H_kv, capacity, D] buffers filled up to `length`.

All rows advance together (one position per token fed). Routed layers may mark positions whose
token skipped the layer as invalid keys with `valid` [B, capacity]."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LayerKVCache:
    k: torch.Tensor | None = None  # [B, Hkv, capacity, D]
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None  # [B, capacity] bool, None = every filled position is a key
    length: int = 0

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

    def nbytes(self) -> int:
        total = 0
        for t in (self.k, self.v):
            if t is not None:
                total += t[:, :, : self.length].numel() * t.element_size()
        return total


@dataclass
class KVCache:
    """The state of a transformer: one LayerKVCache per layer and the number of positions seen."""

    layers: list[LayerKVCache] = field(default_factory=list)
    position: int = 0

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

    def nbytes(self) -> int:
        """Bytes of keys and values actually held (filled positions only)."""
        return sum(layer.nbytes() for layer in self.layers)
