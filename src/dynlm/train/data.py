"""Training data: the tokenizer and token splits of a run, and the batch sampler.

The sampler cuts the training token stream into `seq_len`-token windows and visits them in a
fresh random order every epoch. Which windows form batch `i` is a pure function of (seed, i), so
resuming needs only the number of batches drawn, and every rank of a data-parallel run computes
the same global batch and takes its own share of it (a distributed sampler with exact resume)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynlm.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from dynlm.data.tokenizers import Tokenizer
    from dynlm.train.config import RunConfig


def token_fingerprint(tokens: np.ndarray) -> str:
    """sha256 of a token stream (its dtype, length and every token), read in chunks. Splits made by
    `dynlm.data.shards` carry a fingerprint of their source instead (`TokenSplit.fingerprint`),
    which costs nothing; this is for token arrays from elsewhere."""
    h = hashlib.sha256(f"{tokens.dtype.str}:{len(tokens)}".encode())
    for start in range(0, len(tokens), 1 << 24):
        h.update(np.ascontiguousarray(tokens[start: start + (1 << 24)]).tobytes())
    return h.hexdigest()


class SequenceSampler:
    """Global batches of window start offsets into a token stream of `num_tokens` tokens.

    Consecutive windows overlap by one token, so each token is a next-token target exactly once
    per epoch (labels == input_ids, shifted inside the model). Each epoch shifts the window grid by
    a random offset and shuffles the windows."""

    def __init__(self, num_tokens: int, seq_len: int, batch_size: int, seed: int,
                 corpus_fingerprint: str | None = None):
        self.corpus_fingerprint = corpus_fingerprint  # of the token stream (`token_fingerprint`)
        if num_tokens < seq_len:
            raise DataError(f"the training split has {num_tokens} tokens, fewer than data.seq_len={seq_len}",
                            "use a larger corpus or a smaller seq_len")
        self.num_tokens, self.seq_len, self.batch_size, self.seed = num_tokens, seq_len, batch_size, seed
        self.stride = seq_len - 1
        self.max_offset = min(self.stride - 1, num_tokens - seq_len)
        self.windows_per_epoch = (num_tokens - seq_len - self.max_offset) // self.stride + 1
        self.batches_drawn = 0
        self._epoch_cache: tuple[int, int, np.ndarray] | None = None

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(grid offset, window order) of an epoch: deterministic in (seed, epoch)."""
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.max_offset + 1))
            self._epoch_cache = (epoch, offset, rng.permutation(self.windows_per_epoch))
        return self._epoch_cache[1], self._epoch_cache[2]

    def batch_starts(self, batch_index: int) -> np.ndarray:
        """Start offsets [batch_size] of global batch `batch_index`."""
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            epoch, index = divmod(batch_index * self.batch_size + i, self.windows_per_epoch)
            offset, order = self._epoch(epoch)
            starts[i] = offset + order[index] * self.stride
        return starts

    def next_batch(self) -> np.ndarray:
        starts = self.batch_starts(self.batches_drawn)
        self.batches_drawn += 1
        return starts

    @property
    def epoch(self) -> float:
        return self.batches_drawn * self.batch_size / self.windows_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"batches_drawn": self.batches_drawn, "num_tokens": self.num_tokens, "seq_len": self.seq_len,
                "batch_size": self.batch_size, "seed": self.seed, "corpus_fingerprint": self.corpus_fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A data position is only meaningful on the token stream it was taken on: a checkpoint
        whose corpus fingerprint differs from this run's is refused (checkpoints written before
        fingerprints were recorded carry none and are accepted)."""
        saved = state.get("corpus_fingerprint")
        if saved is not None and self.corpus_fingerprint is not None and saved != self.corpus_fingerprint:
            raise CheckpointError(
                f"cannot resume: the training tokens changed since this checkpoint (corpus fingerprint "
                f"{saved[:12]}..., now {self.corpus_fingerprint[:12]}...)",
                "resume needs the same corpus, tokenizer and splits; to train further on other data start a new "
                "run from the checkpoint: init_from=CHECKPOINT")
        for key in ("num_tokens", "seq_len", "batch_size", "seed"):
            if state.get(key) != getattr(self, key):
                raise CheckpointError(f"cannot resume exactly: the checkpoint's data position was taken with "
                                      f"{key}={state.get(key)}, this run has {key}={getattr(self, key)}")
        self.batches_drawn = int(state["batches_drawn"])


def micro_batches(tokens: np.ndarray, starts: np.ndarray, seq_len: int, rank: int, world_size: int,
                  grad_accum: int) -> list[torch.Tensor]:
    """This rank's `grad_accum` micro-batches of a global batch: LongTensors [micro, seq_len] on CPU
    (pinned when CUDA is available, so the copy to the GPU can overlap compute)."""
    per_micro = len(starts) // (world_size * grad_accum)
    mine = starts.reshape(grad_accum, world_size, per_micro)[:, rank]  # [accum, micro]
    out = []
    for micro_starts in mine:
        index = micro_starts[:, None] + np.arange(seq_len)[None, :]  # [micro, seq_len]
        batch = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
        out.append(batch.pin_memory() if torch.cuda.is_available() else batch)
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer and splits of a run


def cache_root(run: RunConfig) -> Path:
    """`data.cache_dir`, else $DYNLM_CACHE, else ~/.cache/dynlm."""
    from dynlm.data.corpora import cache_dir

    return Path(run.data.cache_dir) if run.data.cache_dir else cache_dir()


def _bpe_tokenizer(run: RunConfig, corpus: Any, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on the corpus's training split, cached by (corpus
    fingerprint, split fractions, vocab size) so the next run loads it instead of training again."""
    from dynlm.data.corpora import split_corpus
    from dynlm.data.tokenizers import load_tokenizer, train_bpe

    key = json.dumps({"corpus": corpus.fingerprint(), "splits": list(run.data.splits), "vocab": vocab_size})
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_root(run) / "tokenizers" / f"{corpus.cache_key}-bpe{vocab_size}-{digest}"
    if (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    train_texts = [text for _, text in split_corpus(corpus, run.data.splits)["train"]]
    tokenizer = train_bpe(train_texts, vocab_size=vocab_size)
    tokenizer.save(folder)  # file by file, each written atomically
    return tokenizer


def load_run_tokenizer(run: RunConfig, corpus: Any = None) -> Tokenizer:
    """The tokenizer named by `data.tokenizer`: "bytes", "bpe:<vocab>", a path, or "init" (the
    tokenizer of `init_from`)."""
    from dynlm.data.corpora import get_corpus
    from dynlm.data.tokenizers import load_tokenizer

    spec = run.data.tokenizer
    if spec == "init":
        return load_tokenizer(run.init_from)
    vocab_size = run.data.bpe_vocab_size
    if vocab_size is not None:
        return _bpe_tokenizer(run, corpus if corpus is not None else get_corpus(run.data.corpus), vocab_size)
    return load_tokenizer(spec)


def prepare_run_data(run: RunConfig, show_progress: bool = True,
                     tokenizer: Tokenizer | None = None) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, {"train", "val", "test": TokenSplit}) of a run, tokenized once and cached.
    A resumed run passes the tokenizer saved in its checkpoint."""
    from dynlm.data.corpora import get_corpus
    from dynlm.data.shards import prepare_corpus

    corpus = get_corpus(run.data.corpus)
    if tokenizer is None:
        tokenizer = load_run_tokenizer(run, corpus)
    shards = cache_root(run) / "shards" if run.data.cache_dir else None
    splits = prepare_corpus(corpus, tokenizer, cache_dir=shards, splits=tuple(run.data.splits),
                            show_progress=show_progress)
    return tokenizer, splits
