"""Reading llama.cpp GGUF files for their vocabulary: the metadata reader shared with the model
importer (`dynlm.interop.gguf`), and the `tokenizers.Tokenizer` that equals a GGUF vocabulary.

The `gguf` package is an optional dependency (the `hf` extra), imported when a file is opened."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynlm.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from gguf import GGUFReader

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


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
    from tokenizers import Regex, pre_tokenizers

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


def build_gguf_tokenizer(metadata: Mapping[str, Any], source: str = "GGUF file") -> Any:
    """A `tokenizers.Tokenizer` (byte-level BPE) equal to the vocabulary stored in GGUF metadata
    (`GGUFReader.fields`, or a dict of their values)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    meta = GGUFMetadata(metadata, source)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise DataError(f"{source}: the GGUF file has no tokenizer (tokenizer.ggml.model missing)")
    if kind != "gpt2":
        raise DataError(f"{source}: GGUF tokenizer type '{kind}' is not supported",
                        "dynlm reads byte-level BPE vocabularies (tokenizer.ggml.model = gpt2)")
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
    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user_defined)
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
