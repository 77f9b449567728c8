"""Data: tokenizers (bytes, byte-level BPE, Hugging Face), corpora (named, local, URL; fetched into
a cache and split by document) and token shards (numpy memmaps with a manifest).

    from dynlm.data import get_corpus, load_tokenizer, prepare_corpus
    splits = prepare_corpus(get_corpus("shakespeare"), load_tokenizer("bytes"))
    splits["train"].tokens, splits["val"].num_bytes, splits["val"].texts()

`prepare_corpus` and `TokenSplit` are imported on first use (they pull in numpy)."""

from __future__ import annotations

from typing import Any

from dynlm.data.corpora import (
    DEFAULT_CORPUS,
    DEFAULT_SPLITS,
    SPLIT_NAMES,
    Corpus,
    cache_dir,
    get_corpus,
    list_corpora,
    split_corpus,
    split_documents,
)
from dynlm.data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = ["Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_bpe",
           "Corpus", "get_corpus", "list_corpora", "split_corpus", "split_documents", "cache_dir",
           "DEFAULT_CORPUS", "DEFAULT_SPLITS", "SPLIT_NAMES", "prepare_corpus", "TokenSplit", "load_prepared"]


def __getattr__(name: str) -> Any:
    if name in ("prepare_corpus", "TokenSplit", "load_prepared"):
        from dynlm.data import shards

        return getattr(shards, name)
    raise AttributeError(f"module 'dynlm.data' has no attribute {name!r}")
