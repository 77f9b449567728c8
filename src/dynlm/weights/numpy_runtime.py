"""Inference of the standard architecture (Qwen2 / Llama decoder) from a code checkpoint with
NumPy only: this module and everything it imports never import torch.

    lm = NumpyLM("code/")
    logits = lm(np.array([[1, 2, 3]]))                   # [B, T, V] float32, same as the torch model
    ids = lm.generate([[1, 2, 3]], max_new_tokens=20)    # greedy unless temperature > 0

    python -m dynlm.weights.numpy_runtime code/ --prompt "ROMEO:" --max-new-tokens 40

The maths follows dynlm.nn exactly (fp32): RMSNorm, rotary embedding ("rotate half"), grouped-
query attention with an optional sliding window, SwiGLU MLP, tied or separate LM head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dynlm.errors import CheckpointError, DynlmError
from dynlm.weights.format import as_float
from dynlm.weights.run_flags import add_numpy_run_arguments
from dynlm.weights.store import CodeCheckpoint, load_vocab_tokenizer

SUPPORTED = ("standard",)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return weight * (x * (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps))))


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x: silu -> -0
        return x / (np.float32(1.0) + np.exp(-x))


def rotate_half(x: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


class NumpyLM:
    """A standard dynlm model read from a code checkpoint, evaluated in float32 NumPy."""

    def __init__(self, path: str | Path, shared_root: str | Path | None = None):
        ckpt = CodeCheckpoint(path, shared_root=shared_root)
        section = ckpt.config.get("dynlm", {})
        arch = section.get("architecture")
        if arch not in SUPPORTED:
            raise CheckpointError(f"{path}: the NumPy runtime runs {', '.join(SUPPORTED)} models, this one is '{arch}'",
                                  "load it with torch: dynlm.load_pretrained(path)")
        self.checkpoint = ckpt
        self.config: dict[str, Any] = section["config"]
        c = self.config
        self.hidden, self.num_layers = c["hidden_size"], c["num_layers"]
        self.num_heads, self.num_kv_heads = c["num_heads"], c["num_kv_heads"]
        self.head_dim = c["head_dim"] or self.hidden // self.num_heads
        self.eps = float(c["rms_norm_eps"])
        self.w = {name: as_float(arr, ckpt.cells[name].dtype).astype(np.float32, copy=False)
                  for name, arr in ckpt.arrays().items()}
        self.embed = self.w["model.embed_tokens.weight"]
        tied = c["tie_word_embeddings"] or "lm_head.weight" not in self.w
        self.head = self.embed if tied else self.w["lm_head.weight"]
        # exactly as dynlm.nn.RotaryEmbedding: int64 arange, float32 division and power
        exponents = np.arange(0, self.head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(self.head_dim)
        self.inv_freq = (np.float32(1.0) / (np.float32(c["rope_theta"]) ** exponents)).astype(np.float32)

    def _window(self, layer: int) -> int | None:
        window, layers = self.config.get("sliding_window"), self.config.get("sliding_window_layers")
        return window if window is not None and (layers is None or layer in layers) else None

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[f"{name}.weight"].T
        bias = self.w.get(f"{name}.bias")
        return y if bias is None else y + bias

    def _attention(self, x: np.ndarray, layer: int, positions: np.ndarray, cache: list | None) -> np.ndarray:
        b, t, _ = x.shape
        prefix = f"model.layers.{layer}.self_attn"
        q = self._linear(x, f"{prefix}.q_proj").reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self._linear(x, f"{prefix}.k_proj").reshape(b, t, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self._linear(x, f"{prefix}.v_proj").reshape(b, t, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]  # [T, D/2]
        emb = np.concatenate([freqs, freqs], axis=-1)
        cos, sin = np.cos(emb), np.sin(emb)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            if cache[layer] is not None:
                k = np.concatenate([cache[layer][0], k], axis=2)
                v = np.concatenate([cache[layer][1], v], axis=2)
            cache[layer] = (k, v)
        key_positions = np.arange(k.shape[2]) + (positions[0] - (k.shape[2] - t))
        group = self.num_heads // self.num_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = (q @ k.transpose(0, 1, 3, 2)) / np.float32(np.sqrt(self.head_dim))  # [B, H, T, S]
        allowed = key_positions[None, :] <= positions[:, None]
        window = self._window(layer)
        if window is not None:
            allowed &= key_positions[None, :] > positions[:, None] - window
        scores = np.where(allowed, scores, np.float32(-np.inf))
        y = softmax(scores) @ v  # [B, H, T, D]
        return self._linear(y.transpose(0, 2, 1, 3).reshape(b, t, self.num_heads * self.head_dim), f"{prefix}.o_proj")

    def _mlp(self, x: np.ndarray, layer: int) -> np.ndarray:
        prefix = f"model.layers.{layer}.mlp"
        return self._linear(silu(self._linear(x, f"{prefix}.gate_proj")) * self._linear(x, f"{prefix}.up_proj"),
                            f"{prefix}.down_proj")

    def forward(self, input_ids: np.ndarray, cache: list | None = None, start: int = 0) -> np.ndarray:
        """input_ids [B, T] -> logits [B, T, V] (float32). With `cache` (from `new_cache()`), the
        tokens continue the `start` positions already in it."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2:
            raise DynlmError(f"input_ids must be [batch, tokens], got shape {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.embed.shape[0]):
            raise DynlmError(f"token ids must be in [0, {self.embed.shape[0]}), got {ids.min()}..{ids.max()}")
        positions = np.arange(start, start + ids.shape[1])
        x = self.embed[ids]  # [B, T, C]
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            h = x + self._attention(rms_norm(x, self.w[f"{p}.input_layernorm.weight"], self.eps), i, positions, cache)
            x = h + self._mlp(rms_norm(h, self.w[f"{p}.post_attention_layernorm.weight"], self.eps), i)
        return rms_norm(x, self.w["model.norm.weight"], self.eps) @ self.head.T

    __call__ = forward

    def new_cache(self) -> list:
        return [None] * self.num_layers

    def generate(self, input_ids: list[list[int]] | np.ndarray, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int = 0, seed: int | None = None, stop_ids: list[int] | None = None) -> np.ndarray:
        """Continue each row; greedy when temperature is 0. Returns the new tokens [B, N]."""
        ids = np.asarray(input_ids, dtype=np.int64)
        rng = np.random.default_rng(seed)
        cache = self.new_cache()
        logits = self.forward(ids, cache, 0)[:, -1]
        position, out = ids.shape[1], []
        done = np.zeros(ids.shape[0], dtype=bool)
        for _ in range(max_new_tokens):
            if temperature <= 0:
                token = logits.argmax(-1)
            else:
                scaled = logits.astype(np.float64) / temperature
                if top_k > 0:
                    kth = np.sort(scaled, axis=-1)[:, -min(top_k, scaled.shape[-1])][:, None]
                    scaled = np.where(scaled < kth, -np.inf, scaled)
                probs = softmax(scaled)
                token = np.array([rng.choice(p.size, p=p) for p in probs])
            out.append(token)
            if stop_ids:
                done |= np.isin(token, stop_ids)
                if done.all():
                    break
            logits = self.forward(token[:, None], cache, position)[:, -1]
            position += 1
        return np.stack(out, axis=1) if out else np.zeros((ids.shape[0], 0), np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dynlm.weights.numpy_runtime",
                                     description="Generate text from a code checkpoint with NumPy only (no torch).")
    add_numpy_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DynlmError as e:
        sys.stderr.write(f"dynlm: error: {e}\n")
        return 2


def run(args: argparse.Namespace) -> int:
    lm = NumpyLM(args.path)
    tokenizer = None
    if args.ids is not None:
        try:
            ids = [int(t) for t in args.ids.split(",") if t.strip()]
        except ValueError:
            raise DynlmError(f"--ids must be comma-separated integers, got '{args.ids}'") from None
    else:
        tokenizer = load_vocab_tokenizer(lm.checkpoint.path)
        ids = tokenizer.encode(args.prompt)
        if getattr(tokenizer, "prepend_separator", False):
            ids = [tokenizer.separator_id, *ids]
    if not ids:
        raise DynlmError("the prompt is empty", "give --prompt TEXT or --ids 1,2,3")
    stop = list(getattr(tokenizer, "eos_ids", []) or []) if tokenizer is not None else None
    new = lm.generate([ids], args.max_new_tokens, args.temperature, args.top_k, args.seed, stop)[0].tolist()
    if tokenizer is None:
        print(",".join(str(i) for i in new))
    else:
        print(args.prompt + tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
