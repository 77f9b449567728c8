"""Token shards: a corpus split and tokenized once, stored as flat numpy memmaps.

    splits = prepare_corpus("shakespeare", load_tokenizer("bytes"))
    train = splits["train"]
    train.tokens          # 1-D np.memmap (uint16 when the vocabulary fits, else uint32)
    train.doc_offsets     # index in `tokens` of each document's separator
    train.num_bytes       # UTF-8 bytes of the split's text (separators count 0)
    train.texts()         # the split's documents, for byte and character accounting

Every document is preceded by `tokenizer.separator_id`, so every text token, the first included,
is predicted from something. Layout, under `$DYNLM_CACHE/shards/<corpus>/<key>/` where the key
hashes the tokenizer fingerprint and the split fractions:

    manifest.json                  fingerprints, fractions, dtype, per-split counts
    train.bin  val.bin  test.bin   the token streams
    train.offsets.npy ...          int64 document offsets
    train.jsonl ...                the documents ({"id", "text"} per line)

A shard folder is reused while its manifest's tokenizer and corpus fingerprints match, and rebuilt
(in a temporary folder renamed into place) when the corpus changed. Another tokenizer or other
fractions get their own folder, so switching back and forth costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dynlm.data.corpora import (
    DEFAULT_SPLITS,
    SPLIT_NAMES,
    Corpus,
    Document,
    check_splits,
    default_permissions,
    fingerprint_documents,
    get_corpus,
    split_documents,
)
from dynlm.data.corpora import cache_dir as default_cache_dir
from dynlm.data.tokenizers import Tokenizer
from dynlm.errors import DataError
from dynlm.fileio import TEXT_ERRORS, atomic_directory, num_utf8_bytes

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
_BATCH_BYTES = 1 << 20  # texts handed to encode_batch at once


@dataclass
class TokenSplit:
    """One split of a tokenized corpus."""

    name: str
    tokens: np.ndarray  # [num_tokens], memmap
    doc_offsets: np.ndarray  # [num_docs] int64: position of each document's separator in `tokens`
    num_bytes: int  # UTF-8 bytes of the documents' text
    num_chars: int  # Unicode characters of the documents' text (bits per character)
    texts_file: Path = field(repr=False)
    # what the tokens were made from (corpus, tokenizer, split fractions, split name): a resumed
    # run's data position is only valid on the same fingerprint
    fingerprint: str | None = None

    @property
    def num_docs(self) -> int:
        return len(self.doc_offsets)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def bytes_per_token(self) -> float:
        """Text bytes per token, separators included in the token count."""
        return self.num_bytes / max(self.num_tokens, 1)

    @property
    def doc_ids(self) -> list[str]:
        return [doc_id for doc_id, _ in self.documents()]

    def documents(self) -> Iterator[Document]:
        """(doc_id, text) of each document, in the order of `doc_offsets`."""
        with open(self.texts_file, encoding="utf-8", errors=TEXT_ERRORS) as f:  # raw bytes kept (fileio)
            for line in f:
                record = json.loads(line)
                yield record["id"], record["text"]

    def texts(self) -> list[str]:
        """The split's documents, in the order of `doc_offsets`."""
        return [text for _, text in self.documents()]


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    # ids run from 0 to vocab_size - 1, so 65,536 ids still fit in uint16
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def shard_directory(corpus: Corpus, tokenizer: Tokenizer, splits: Sequence[float] = DEFAULT_SPLITS,
                    cache_dir: str | Path | None = None) -> Path:
    """Where `prepare_corpus` keeps this corpus tokenized with this tokenizer and these fractions."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "shards"
    key = hashlib.sha256(json.dumps([tokenizer.fingerprint(), list(check_splits(splits))]).encode()).hexdigest()
    return root / corpus.cache_key / key[:16]


def prepare_corpus(corpus: Corpus | str, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                   splits: Sequence[float] = DEFAULT_SPLITS, show_progress: bool = True) -> dict[str, TokenSplit]:
    """{"train", "val", "test"} -> TokenSplit, tokenizing the corpus unless fresh shards exist.

    `cache_dir` is the folder that holds the shards of every corpus (default
    `$DYNLM_CACHE/shards`)."""
    corpus = get_corpus(corpus)
    fractions = check_splits(splits)
    directory = shard_directory(corpus, tokenizer, fractions, cache_dir)
    documents = list(corpus.documents())
    corpus_fingerprint = fingerprint_documents(documents)
    expected = {"format_version": FORMAT_VERSION, "tokenizer_fingerprint": tokenizer.fingerprint(),
                "corpus_fingerprint": corpus_fingerprint, "splits": list(fractions)}
    with _lock(directory):
        manifest = _read_manifest(directory)
        if manifest is None or any(manifest.get(k) != v for k, v in expected.items()):
            _build(directory, corpus, documents, tokenizer, fractions, expected, show_progress)
            manifest = _read_manifest(directory)
            assert manifest is not None
    return _load_splits(directory, manifest)


def load_prepared(directory: str | Path) -> dict[str, TokenSplit]:
    """The splits of a shard folder written by `prepare_corpus` (no freshness check)."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest is None:
        raise DataError(f"{directory}: no readable {MANIFEST}", "run prepare_corpus (or 'dynlm corpus fetch') first")
    return _load_splits(directory, manifest)


def _read_manifest(directory: Path) -> dict | None:
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    files_present = all((directory / info[key]).is_file() for info in manifest.get("split_info", {}).values()
                        for key in ("tokens_file", "doc_offsets_file", "texts_file"))
    return manifest if files_present and set(manifest.get("split_info", {})) == set(SPLIT_NAMES) else None


def _load_splits(directory: Path, manifest: dict) -> dict[str, TokenSplit]:
    dtype = np.dtype(manifest["dtype"])
    out = {}
    for name in SPLIT_NAMES:
        info = manifest["split_info"][name]
        # np.memmap refuses empty files; an empty split gets an empty array
        tokens = np.memmap(directory / info["tokens_file"], dtype=dtype, mode="r") if info["num_tokens"] \
            else np.zeros(0, dtype=dtype)
        if len(tokens) != info["num_tokens"]:
            raise DataError(f"{directory / info['tokens_file']}: {len(tokens)} tokens, manifest says "
                            f"{info['num_tokens']}", f"delete {directory} to rebuild it")
        out[name] = TokenSplit(name=name, tokens=tokens, doc_offsets=np.load(directory / info["doc_offsets_file"]),
                               num_bytes=info["num_bytes"],
                               num_chars=info["num_chars"], texts_file=directory / info["texts_file"],
                               fingerprint=hashlib.sha256(json.dumps(
                                   [manifest.get("corpus_fingerprint"), manifest.get("tokenizer_fingerprint"),
                                    manifest.get("splits"), name]).encode()).hexdigest())
    return out


def _build(directory: Path, corpus: Corpus, documents: list[Document], tokenizer: Tokenizer,
           fractions: tuple[float, float, float], expected: dict, show_progress: bool) -> None:
    from tqdm import tqdm

    parts = split_documents(documents, fractions, corpus.split_weight)
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    separator = tokenizer.separator_id
    total_bytes = sum(num_utf8_bytes(text) for _, text in documents)
    started = time.perf_counter()
    with atomic_directory(directory) as tmp:
        default_permissions(tmp)
        split_info = {}
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc=f"tokenizing {corpus.name}",
                  disable=not show_progress) as bar:
            for name in SPLIT_NAMES:
                split_info[name] = _write_split(tmp, name, parts[name], tokenizer, separator, dtype, bar)
        manifest = {**expected, "corpus": corpus.name, "tokenizer_vocab_size": tokenizer.vocab_size,
                    "separator_id": separator, "dtype": dtype.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "build_seconds": round(time.perf_counter() - started, 2), "split_info": split_info}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _write_split(directory: Path, name: str, documents: list[Document], tokenizer: Tokenizer, separator: int,
                 dtype: np.dtype, bar) -> dict:
    limit = np.iinfo(dtype).max
    offsets: list[int] = []
    position = 0
    with open(directory / f"{name}.bin", "wb") as tokens_file, \
            open(directory / f"{name}.jsonl", "w", encoding="utf-8", errors=TEXT_ERRORS) as texts_file:
        for batch in _batches(documents):
            for (doc_id, text), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
                array = np.asarray([separator, *ids], dtype=np.int64)
                if array.max() > limit or array.min() < 0:
                    raise DataError(f"tokenizer produced id {int(array.max())}, outside {dtype.name}",
                                    f"its vocab_size ({tokenizer.vocab_size}) is wrong")
                tokens_file.write(array.astype(dtype).tobytes())
                offsets.append(position)
                position += len(array)
                texts_file.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
            bar.update(sum(num_utf8_bytes(text) for _, text in batch))
    np.save(directory / f"{name}.offsets.npy", np.asarray(offsets, dtype=np.int64))
    return {"tokens_file": f"{name}.bin", "doc_offsets_file": f"{name}.offsets.npy", "texts_file": f"{name}.jsonl",
            "num_tokens": position, "num_docs": len(documents),
            "num_bytes": sum(num_utf8_bytes(text) for _, text in documents),
            "num_chars": sum(len(text) for _, text in documents)}


def _batches(documents: list[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc[1])
        if size >= _BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


@contextlib.contextmanager
def _lock(directory: Path) -> Iterator[None]:
    """One builder at a time per shard folder (e.g. several training ranks on one machine)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; builds still land atomically
        yield
        return
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
