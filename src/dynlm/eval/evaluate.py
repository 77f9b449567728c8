"""The evaluator: nats per token, perplexity and bits per UTF-8 byte, for every architecture.

    result = evaluate(model, tokenizer, "shakespeare", split="test", seq_len=256)
    result = evaluate(model, tokenizer, ["some text", "another document"])
    result["bpb"], result["loss_nats"], result["ppl"]

Units (docs/evaluation.md, "Units"):
  loss_nats  total next-token loss over the scored tokens / number of scored tokens (nats/token)
  ppl        exp(loss_nats): per token, only comparable between models with the same tokenizer
  bpb        total loss in nats / (ln 2 * UTF-8 bytes of the scored text): the one unit that
             compares a byte model with a BPE model. For a byte model bpb == loss_nats / ln 2.
  bpc        bits per Unicode character (whenever the character count is known; a raw byte of a
             file that is not valid UTF-8 counts as one character; equals bpb on
             ASCII text, and exceeds it where characters take several UTF-8 bytes).

Every document is preceded by the tokenizer's separator token (as in training), which is input
only: every token of the text, the first one included, is a target, scored exactly once.
Documents longer than the context are scored with a sliding window: each window scores up to
`stride` new tokens with the tokens before them as context (at least seq_len - stride of them),
so a smaller stride gives more context per token at a higher cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynlm.data.corpora import SPLIT_NAMES, get_corpus
from dynlm.data.shards import prepare_corpus
from dynlm.distributed import all_reduce_sum, autocast
from dynlm.errors import ConfigError, DataError
from dynlm.fileio import num_utf8_bytes
from dynlm.models.base import causal_lm_loss


@dataclass
class Window:
    doc: int  # index of the document
    start: int  # first input position in the document
    end: int  # one past the last input position
    first_target: int  # positions [first_target, end) are scored

    @property
    def length(self) -> int:
        return self.end - self.start


def sliding_windows(doc_lengths: Sequence[int], seq_len: int, stride: int) -> list[Window]:
    """Windows of at most `seq_len` tokens that score every position 1..n-1 of each document
    exactly once (position 0, the separator, is input only). The first window scores up to
    seq_len - 1 tokens; each later one the next `stride` (at most seq_len - 1) tokens."""
    stride = min(stride, seq_len - 1)
    windows = []
    for doc, n in enumerate(doc_lengths):
        if n < 2:
            continue
        end = min(seq_len, n)
        windows.append(Window(doc, 0, end, 1))
        while end < n:
            new_end = min(end + stride, n)
            windows.append(Window(doc, new_end - seq_len, new_end, end))
            end = new_end
    return windows


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Windows grouped by length (longest first), so a batch pads little."""
    ordered = sorted(windows, key=lambda w: -w.length)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def _batch_tensors(batch: list[Window], documents: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, T] (right-padded with 0) and labels [B, T] (-100 where not scored)."""
    width = max(w.length for w in batch)
    input_ids = np.zeros((len(batch), width), dtype=np.int64)
    labels = np.full((len(batch), width), -100, dtype=np.int64)
    for row, w in enumerate(batch):
        tokens = np.asarray(documents[w.doc][w.start:w.end], dtype=np.int64)
        input_ids[row, :w.length] = tokens
        scored = w.first_target - w.start
        labels[row, scored:w.length] = tokens[scored:]
    return torch.from_numpy(input_ids), torch.from_numpy(labels)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def score_documents(model: torch.nn.Module, documents: Sequence[np.ndarray], seq_len: int, stride: int,
                    batch_size: int = 8, dtype: torch.dtype | None = None, dist_ctx: Any = None,
                    progress: bool = False) -> tuple[float, int]:
    """(total nats, number of scored tokens) of token documents (each starting with the separator).

    With a distributed context every rank scores its share of the batches and the totals are
    summed; ranks run the same number of forwards (sharded models need every rank in each)."""
    device = _model_device(model)
    windows = sliding_windows([len(d) for d in documents], seq_len, stride)
    batches = _batches(windows, batch_size)
    rank, world = (dist_ctx.rank, dist_ctx.world_size) if dist_ctx is not None else (0, 1)
    mine = batches[rank::world]
    rounds = -(-len(batches) // world) if batches else 0
    was_training = model.training
    model.eval()
    per_batch: list[torch.Tensor] = []
    iterator = range(rounds)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="eval", unit="batch", leave=False)
    try:
        for i in iterator:
            # ranks with fewer batches repeat one and discard it, so forwards stay in step
            batch, counts = (mine[i], True) if i < len(mine) else (batches[0], False)
            input_ids, labels = _batch_tensors(batch, documents)
            input_ids = input_ids.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, dtype or torch.float32):
                logits = model(input_ids).logits
            nats = causal_lm_loss(logits, labels, reduction="sum")  # fp32
            if counts:
                per_batch.append(nats)
    finally:
        model.train(was_training)
    total = torch.stack(per_batch).double().cpu().sum() if per_batch else torch.zeros((), dtype=torch.float64)
    num_targets = sum(w.end - w.first_target for b in mine for w in b)
    if world > 1:

        totals = torch.tensor([float(total), float(num_targets)], dtype=torch.float64, device=device)
        if device.type == "mps":  # no float64 there
            totals = totals.cpu()
        totals = all_reduce_sum(totals, dist_ctx)
        return float(totals[0]), int(totals[1])
    return float(total), num_targets


def summarize(total_nats: float, num_tokens: int, num_bytes: int, num_chars: int | None,
              num_docs: int, seq_len: int, stride: int) -> dict[str, Any]:
    """The evaluator's figures from the totals."""
    if num_tokens == 0 or num_bytes == 0:
        raise DataError("nothing to evaluate: the texts are empty")
    loss = total_nats / num_tokens
    result: dict[str, Any] = {
        "loss_nats": loss,
        "bpb": total_nats / (math.log(2) * num_bytes),
        "ppl": math.exp(min(loss, 700.0)),
        "bits_per_token": loss / math.log(2),
        "num_tokens": num_tokens,
        "num_bytes": num_bytes,
        "bytes_per_token": num_bytes / num_tokens,
        "num_docs": num_docs,
        "seq_len": seq_len,
        "stride": min(stride, seq_len - 1),
        "total_nats": total_nats,
    }
    if num_chars:  # per character too: equal to bpb on ASCII, larger where a character is several bytes
        result["num_chars"] = num_chars
        result["bpc"] = total_nats / (math.log(2) * num_chars)
    return result


def encode_documents(tokenizer: Any, texts: Sequence[str]) -> list[np.ndarray]:
    """Token documents: the separator, then the text's tokens."""
    separator = tokenizer.separator_id
    encoded = tokenizer.encode_batch(list(texts))
    return [np.asarray([separator, *ids], dtype=np.int64) for ids in encoded]


def split_documents_of(split: Any) -> list[np.ndarray]:
    """The documents of a TokenSplit, cut at its document offsets (each starts with the separator)."""
    offsets = list(np.asarray(split.doc_offsets, dtype=np.int64)) + [len(split.tokens)]
    return [split.tokens[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


def text_spans(texts: Sequence[str], max_bytes: int, num_spans: int = 16) -> list[str]:
    """`max_bytes` of text taken as `num_spans` evenly spaced pieces of the concatenated texts
    (each piece within one document, cut at character boundaries): a cheap, deterministic,
    representative validation set. The pieces hold exactly `max_bytes` bytes of one-byte (ASCII)
    text and about that many otherwise; the evaluator counts their bytes exactly either way."""
    total_chars = sum(len(t) for t in texts)
    if total_chars == 0:
        return []
    bytes_per_char = sum(num_utf8_bytes(t) for t in texts) / total_chars
    wanted_chars = max(1, round(max_bytes / bytes_per_char))
    if wanted_chars >= total_chars:
        return [t for t in texts if t]
    # the remainder is spread over the first pieces, so that the sizes add up to wanted_chars
    sizes = [wanted_chars // num_spans + (i < wanted_chars % num_spans) for i in range(num_spans)]
    sizes = [size for size in sizes if size]
    spans = []
    starts = np.linspace(0, total_chars - max(sizes), len(sizes)).astype(np.int64)
    doc_starts = np.cumsum([0] + [len(t) for t in texts])
    for start, size in zip(starts, sizes):
        doc = int(np.searchsorted(doc_starts, start, side="right") - 1)
        local = int(start - doc_starts[doc])
        text = texts[doc]
        local = min(local, max(0, len(text) - size))  # keep the span inside its document
        spans.append(text[local:local + size])
    return [s for s in spans if s]


def evaluate(model: torch.nn.Module, tokenizer: Any, source: Any, split: str = "val", seq_len: int | None = None,
             stride: int | None = None, batch_size: int = 8, max_bytes: int | None = None,
             dtype: torch.dtype | None = None, dist_ctx: Any = None, progress: bool = False) -> dict[str, Any]:
    """Score `source` with `model` and return the figures (see the module docstring).

    source: a corpus name or path (its `split` is tokenized with `tokenizer`, cached), a Corpus,
    a dict of TokenSplits, a TokenSplit, or a list of texts. `max_bytes` limits the text scored
    to evenly spaced pieces of about that many bytes. `seq_len` defaults to the model's
    max_position_embeddings (at most 1024); `stride` to seq_len // 2."""
    if seq_len is None:
        seq_len = min(int(getattr(model.config, "max_position_embeddings", 1024)), 1024)
    if seq_len < 2:
        raise ConfigError(f"seq_len must be >= 2, got {seq_len}")
    stride = stride if stride is not None else max(1, seq_len // 2)
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")

    if isinstance(source, (list, tuple)):
        texts: list[str] | None = [str(t) for t in source]
        token_split = None
    else:
        token_split = _token_split(source, tokenizer, split)
        texts = token_split.texts() if max_bytes is not None else None

    if texts is not None:
        if max_bytes is not None:
            texts = text_spans(texts, max_bytes)
        documents = encode_documents(tokenizer, texts)
        num_bytes = sum(tokenizer.count_bytes(t) for t in texts)
        num_chars: int | None = sum(len(t) for t in texts)
    else:
        documents = split_documents_of(token_split)
        num_bytes, num_chars = int(token_split.num_bytes), getattr(token_split, "num_chars", None)
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and any(len(d) and int(d.max()) >= vocab for d in documents):
        raise DataError(f"the texts contain token ids >= the model's vocab_size ({vocab})",
                        "evaluate with the tokenizer the model was trained with")
    total, count = score_documents(model, documents, seq_len, stride, batch_size, dtype, dist_ctx, progress)
    return summarize(total, count, num_bytes, num_chars, len(documents), seq_len, stride)


def _token_split(source: Any, tokenizer: Any, split: str) -> Any:
    """A TokenSplit from a TokenSplit, a dict of them, a Corpus or a corpus name/path."""
    if hasattr(source, "tokens") and hasattr(source, "doc_offsets"):
        return source
    if isinstance(source, dict):
        if split not in source:
            raise ConfigError(f"no split '{split}'", f"valid: {', '.join(sorted(source))}")
        return source[split]

    if split not in SPLIT_NAMES:
        raise ConfigError(f"unknown split '{split}'", f"valid: {', '.join(SPLIT_NAMES)}")
    return prepare_corpus(get_corpus(source), tokenizer)[split]
