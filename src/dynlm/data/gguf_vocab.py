"""Reading llama.cpp GGUF files for their vocabulary: the metadata reader shared with the model
importer (`dynlm.interop.gguf`), and the `tokenizers.Tokenizer` that equals a GGUF vocabulary.

The `gguf` package is an optional dependency (the `hf` extra), imported when a file is opened."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from dynlm.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp token types (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4


def open_gguf(path: str | Path) -> GGUFReader:
    """A `gguf.GGUFReader` for `path`; unreadable or truncated files are a CheckpointError."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise CheckpointError("reading .gguf files needs the 'gguf' package",
                              "pip install 'dynlm[hf]' or pip install gguf") from None
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return GGUFReader(path)
    except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None


class GGUFMetadata:
    """Typed access to GGUF key/value metadata (a reader's fields, read lazily, or a plain dict of
    values), with errors naming the file and key."""

    def __init__(self, values: Mapping[str, Any], source: str):
        self.values = values
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        value = self.values.get(key)
        if value is None:
            return default
        return value.contents() if hasattr(value, "contents") else value  # a gguf.ReaderField

    def require(self, key: str) -> Any:
        if key not in self.values:
            raise CheckpointError(f"{self.source}: metadata key '{key}' is missing")
        return self.get(key)


def gguf_eos_ids(metadata: Mapping[str, Any]) -> list[int]:
    """The ids that end generation: end-of-sequence, end-of-turn and end-of-message, when given.
    `metadata`: `GGUFReader.fields` or a dict of values."""
    meta = GGUFMetadata(metadata, "GGUF file")
    ids = [meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    return list(dict.fromkeys(int(i) for i in ids if i is not None))


# ---------------------------------------------------------------------------------------------
# Tokenizer

# regexes of the pre-tokenizers named by `tokenizer.ggml.pre` (llama.cpp's llama-vocab.cpp)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
           "llama3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT}


def _byte_level_pre_tokenizer(pre: str | None) -> Any:
    """The pre-tokenizer a byte-level vocabulary was trained with, from `tokenizer.ggml.pre`."""
    if pre in _SPLITS:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex
    if pre == "smollm":  # every digit on its own, then GPT-2's regex
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre not in (None, "default", "gpt-2", "gpt2"):
        warnings.warn(f"GGUF pre-tokenizer '{pre}' is not known to dynlm; using GPT-2's split "
                      "(tokenization may differ slightly from llama.cpp's)", stacklevel=3)
    return byte_level


def build_gguf_tokenizer(metadata: Mapping[str, Any], source: str = "GGUF file") -> Tokenizer:
    """A `tokenizers.Tokenizer` equal to the vocabulary stored in GGUF metadata (`GGUFReader.fields`,
    or a dict of their values): byte-level BPE (`tokenizer.ggml.model` = gpt2) or SentencePiece
    (llama)."""
    meta = GGUFMetadata(metadata, source)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise DataError(f"{source}: the GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if kind == "llama":
        return _sentencepiece_tokenizer(meta)
    if kind != "gpt2":
        raise DataError(f"{source}: GGUF tokenizer type '{kind}' is not supported",
                        "dynlm reads byte-level BPE (gpt2) and SentencePiece (llama) vocabularies")
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    merges: list[str] = meta.require("tokenizer.ggml.merges")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    to_unicode = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, token_types)):
        # control tokens (<|im_start|>) and user-defined ones (<think>) are matched whole in the
        # text before BPE, and stored as written
        if token_type == _CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == _USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
        elif not set(token) <= alphabet:  # a vocabulary entry written as raw text: respell its bytes
            token = "".join(to_unicode[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, index)
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    if meta.get("tokenizer.ggml.pre") in ("qwen2", "deepseek-r1-qwen"):
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _bos_processor(meta, tokens, default=False) or processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
    return tokenizer


def _bos_processor(meta: GGUFMetadata, tokens: list[str], default: bool) -> Any:
    """A post-processor adding BOS when the file asks for it (`tokenizer.ggml.add_bos_token`), else None."""
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if not meta.get("tokenizer.ggml.add_bos_token", default) or bos_id is None or not 0 <= bos_id < len(tokens):
        return None
    bos = tokens[bos_id]
    return processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                         special_tokens=[(bos, bos_id)])


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_tokenizer(meta: GGUFMetadata) -> Tokenizer:
    """A SentencePiece vocabulary (llama.cpp's "llama" type: pieces, scores, token types) as a
    `tokenizers` BPE that tokenizes as llama.cpp and sentencepiece do: spaces become "▁", one
    is prepended to the text (`tokenizer.ggml.add_space_prefix`, default true), then the adjacent
    pair whose joined piece has the highest score is merged, again and again; a character that is
    no piece falls back to its UTF-8 bytes ("<0x41>" pieces). BPE merges ordered by the joined
    piece's score (ties: by the pieces' ids) are that procedure."""
    tokens: list[str] = meta.require("tokenizer.ggml.tokens")
    scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if not len(tokens) == len(scores) == len(types):
        raise DataError(f"{meta.source}: {len(tokens)} tokens, {len(scores)} scores and {len(types)} token types")
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    # every way to join two normal pieces into a third one, highest joined score first
    normal = {token: index for index, token in enumerate(tokens) if types[index] == _NORMAL}
    candidates = []
    for piece, index in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                candidates.append((-scores[index], vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(candidates)]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="never", split=False)
    steps = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if prefix else steps)
    processor = _bos_processor(meta, tokens, default=True)
    if processor is not None:
        tokenizer.post_processor = processor
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                  for t, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False)
                          for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))
