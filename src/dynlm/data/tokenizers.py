"""Tokenizers: raw UTF-8 bytes, or any Hugging Face `tokenizers` tokenizer (byte-level BPE trained
here, or the `tokenizer.json` of a pretrained checkpoint).

Both kinds share one interface (`Tokenizer`): `encode` gives the ids of the text alone (no BOS/EOS
added; chat templates and token streams add them explicitly), `decode` inverts it, `count_bytes`
gives the UTF-8 bytes a text covers (the denominator of bits per byte), and `separator_id` is the
token placed before every document in a token stream (BOS if the tokenizer has one, else EOS).

    tok = load_tokenizer("bytes")                 # 256 byte ids + <|endoftext|> (256) + <|pad|> (257)
    tok = train_bpe(texts, vocab_size=4096)       # byte-level BPE, decode(encode(x)) == x
    tok.save("tok/"); tok = load_tokenizer("tok/")
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from dynlm.data.gguf_vocab import GGUFMetadata, build_gguf_tokenizer, open_gguf
from dynlm.errors import CheckpointError, ConfigError, DataError
from dynlm.fileio import TEXT_ERRORS, atomic_write_json, num_utf8_bytes, utf8_bytes, valid_unicode

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
DEFAULT_SPECIAL_TOKENS = (ENDOFTEXT, PAD)


class Tokenizer(ABC):
    """What the trainer, evaluator and generator need from a tokenizer."""

    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None
    # True when models for this tokenizer were trained on dynlm token streams (a separator before
    # every document), so a plain-text prompt should start with `separator_id` too.
    prepend_separator: bool

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end generation."""
        return [] if self.eos_id is None else [self.eos_id]

    @property
    def separator_id(self) -> int:
        """The token placed before every document in a token stream: BOS if any, else EOS."""
        sep = self.bos_id if self.bos_id is not None else self.eos_id
        if sep is None:
            raise DataError("this tokenizer has neither a BOS nor an EOS token, so documents cannot be separated",
                            "give it a bos_token or eos_token")
        return sep

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone (no BOS/EOS added). Special-token strings in the text become their ids."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; ids outside the vocabulary are ignored (as Hugging Face does)."""

    @abstractmethod
    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None."""

    def count_bytes(self, text: str) -> int:
        """UTF-8 bytes of `text` (a file's raw non-UTF-8 bytes count as one byte each, see
        `dynlm.fileio`): what bits per byte divide by, whatever the tokenizer."""
        return num_utf8_bytes(text)

    @abstractmethod
    def serialize(self) -> dict[str, dict[str, Any]]:
        """{file name: JSON content} that `save` writes and `load_tokenizer` reads back."""

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` (and `tokenizer_config.json` when there is one) into `directory`.
        Each file is written to a temporary name and renamed, so a reader never sees half a file."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in self.serialize().items():
            atomic_write_json(directory / name, content)
        return directory

    def fingerprint(self) -> str:
        """sha256 of the canonical serialization: equal fingerprints give equal token ids."""
        canonical = json.dumps(self.serialize(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": ..., "eos_token": ..., "pad_token": ...} for the roles that are set."""
        out = {}
        for role in ("bos", "eos", "pad"):
            token_id = getattr(self, f"{role}_id")
            if token_id is not None:
                out[f"{role}_token"] = self.decode([token_id], skip_special_tokens=False)
        return out

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role": "user", "content": "..."}, ...]) with the tokenizer's chat
        template (jinja2, as `transformers` does). Returns text; `encode` it to get ids."""
        if not self.chat_template:
            raise DataError("this tokenizer has no chat template",
                            "use plain-text prompts, or a chat model's tokenizer")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise ConfigError(f"message {i} must be a dict with a string 'role' (and 'content'), got {message!r}")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.special_tokens_map())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """Ids 0-255 are the UTF-8 bytes; 256 is `<|endoftext|>` (BOS, EOS and document separator) and
    257 is `<|pad|>`. A file's bytes that are not valid UTF-8 (kept in the text as lone surrogates,
    see `dynlm.fileio`) are encoded as themselves, so the model sees the file's exact bytes.
    `decode` is for display: invalid byte sequences become U+FFFD unless errors="surrogateescape",
    with which every text (and every byte sequence) round-trips exactly."""

    NUM_BYTES = 256

    def __init__(self, chat_template: str | None = None):
        self.special_tokens = {ENDOFTEXT: 256, PAD: 257}
        self._special_by_id = {i: t for t, i in self.special_tokens.items()}
        self._special_pattern = re.compile("(" + "|".join(re.escape(t) for t in self.special_tokens) + ")")
        self.bos_id = self.eos_id = self.special_tokens[ENDOFTEXT]
        self.pad_id = self.special_tokens[PAD]
        self.chat_template = chat_template
        self.prepend_separator = True

    @property
    def vocab_size(self) -> int:
        return self.NUM_BYTES + len(self.special_tokens)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        # re.split with a capturing group alternates text, special, text, ...
        for i, piece in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(self.special_tokens[piece])
            else:
                ids.extend(utf8_bytes(piece))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, errors: str = "replace") -> str:
        out: list[str] = []
        pending = bytearray()  # bytes are decoded together so multi-byte characters survive
        for i in ids:
            i = int(i)
            if 0 <= i < self.NUM_BYTES:
                pending.append(i)
            elif i in self._special_by_id:
                out.append(pending.decode("utf-8", errors=errors))
                pending.clear()
                if not skip_special_tokens:
                    out.append(self._special_by_id[i])
        out.append(pending.decode("utf-8", errors=errors))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special_tokens:
            return self.special_tokens[token]
        data = token.encode("utf-8", TEXT_ERRORS)
        return data[0] if len(data) == 1 else None

    def serialize(self) -> dict[str, dict[str, Any]]:
        return {TOKENIZER_FILE: {
            "dynlm_tokenizer": "bytes",
            "version": 1,
            "special_tokens": self.special_tokens,
            "bos_token": ENDOFTEXT,
            "eos_token": ENDOFTEXT,
            "pad_token": PAD,
            "chat_template": self.chat_template,
        }}


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` plus the special-token roles and chat template that
    `transformers` keeps in `tokenizer_config.json`.

    `extra_eos_tokens` are further tokens that end generation (e.g. `<|endoftext|>` next to
    `<|im_end|>` for Qwen2.5's generation_config)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None, chat_template: str | None = None,
                 extra_eos_tokens: Sequence[str] = (), prepend_separator: bool = False, prefix_space: bool = False):
        self.backend = tokenizer
        # SentencePiece's "dummy prefix": one space before every non-empty text, always (the
        # backend's Metaspace would skip it when the text already starts with a space)
        self.prefix_space = prefix_space
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.bos_id = self._special_id(bos_token, "bos_token")
        self.eos_id = self._special_id(eos_token, "eos_token")
        self.pad_id = self._special_id(pad_token, "pad_token")
        self.extra_eos_tokens = [t for t in dict.fromkeys(extra_eos_tokens) if t != eos_token]
        self._extra_eos_ids = [self._special_id(t, "extra_eos_tokens") for t in self.extra_eos_tokens]
        self.chat_template = chat_template
        self.prepend_separator = prepend_separator

    def _special_id(self, token: str | None, role: str) -> int | None:
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise DataError(f"{role} {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> list[int]:
        return super().eos_ids + [i for i in self._extra_eos_ids if i != self.eos_id]

    def _prefixed(self, text: str) -> str:
        # the Rust backend takes valid Unicode only: a file's raw non-UTF-8 bytes become U+FFFD
        text = valid_unicode(text)
        return " " + text if self.prefix_space and text else text

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(self._prefixed(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # the Rust side encodes the batch on all cores; `_fast` skips the offsets we don't use
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode([self._prefixed(t) for t in texts], add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def special_tokens_map(self) -> dict[str, str]:
        roles = {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token}
        return {role: token for role, token in roles.items() if token is not None}

    def serialize(self) -> dict[str, dict[str, Any]]:
        config: dict[str, Any] = {
            # loadable by transformers' AutoTokenizer / PreTrainedTokenizerFast as well as by dynlm
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "add_bos_token": self.prepend_separator,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        if self.extra_eos_tokens:
            config["dynlm_extra_eos_tokens"] = self.extra_eos_tokens
        if self.prefix_space:
            config["dynlm_prefix_space"] = True
        return {TOKENIZER_FILE: json.loads(self.backend.to_str()), TOKENIZER_CONFIG_FILE: config}

    @classmethod
    def from_directory(cls, directory: str | Path) -> HFTokenizer:
        """`tokenizer.json` of a checkpoint directory, with the special tokens and chat template of
        `tokenizer_config.json` (or `special_tokens_map.json`, `chat_template.jinja`,
        `chat_template.json`) and the extra EOS ids of `generation_config.json` when present."""
        directory = Path(directory)
        backend = _read_hf_tokenizer(directory / TOKENIZER_FILE)
        config = _read_json(directory / TOKENIZER_CONFIG_FILE) if (directory / TOKENIZER_CONFIG_FILE).is_file() else {}
        special_map = _read_json(directory / "special_tokens_map.json") \
            if (directory / "special_tokens_map.json").is_file() else {}
        roles = {role: _token_content(config.get(role, special_map.get(role)))
                 for role in ("bos_token", "eos_token", "pad_token")}
        extra_eos = list(config.get("dynlm_extra_eos_tokens", []))
        generation = directory / "generation_config.json"
        if generation.is_file():
            eos = _read_json(generation).get("eos_token_id")
            for token_id in eos if isinstance(eos, list) else [] if eos is None else [eos]:
                token = backend.id_to_token(int(token_id))
                if token is not None:
                    extra_eos.append(token)
        try:
            return cls(backend, **roles, chat_template=_read_chat_template(directory, config),
                       extra_eos_tokens=extra_eos, prepend_separator=bool(config.get("add_bos_token", False)),
                       prefix_space=bool(config.get("dynlm_prefix_space", False)))
        except DataError as e:
            raise DataError(f"{directory}: {e.message}", e.hint) from None


def check_bpe_vocab_size(vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> None:
    """Byte-level BPE needs room for the 256 byte symbols and the special tokens."""
    minimum = 256 + len(set(special_tokens))
    if vocab_size < minimum:
        raise ConfigError(f"vocab_size {vocab_size} is too small for byte-level BPE",
                          f"it needs at least {minimum}: 256 bytes + {len(set(special_tokens))} special tokens")


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
              bos_token: str | None = ENDOFTEXT, eos_token: str | None = ENDOFTEXT, pad_token: str | None = PAD,
              min_frequency: int = 2, show_progress: bool | None = None) -> HFTokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenizer, no normalizer) with Hugging Face
    `tokenizers`. Special tokens get the first ids, then the 256 byte symbols, then the merges, so
    every UTF-8 text is encodable and `decode(encode(x)) == x`. bos/eos/pad are added to the
    special tokens if missing; the result prepends the separator (BOS) to prompts, as the models
    trained on dynlm token streams expect. `show_progress` (default: when on a terminal) shows the
    trainer's own progress bars."""
    if show_progress is None:  # the Rust bars print bare newlines when not on a terminal
        show_progress = sys.stdout.isatty() and sys.stderr.isatty()
    specials = list(dict.fromkeys([*special_tokens, *(t for t in (bos_token, eos_token, pad_token) if t)]))
    check_bpe_vocab_size(vocab_size, specials)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    backend.train_from_iterator((valid_unicode(t) for t in texts), trainer)
    return HFTokenizer(backend, bos_token=bos_token, eos_token=eos_token, pad_token=pad_token, prepend_separator=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """"bytes", a directory holding `tokenizer.json`, a `tokenizer.json` file, or a `.gguf` file."""
    if str(path) == "bytes":
        return ByteTokenizer()
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory", 'give "bytes", a tokenizer directory or a tokenizer.json')
    if path.is_file() and path.suffix == ".gguf":
        return tokenizer_from_gguf(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"{path}: no {TOKENIZER_FILE} in this directory", "is it a checkpoint or tokenizer directory?")
    content = _read_json(file)
    if "dynlm_tokenizer" in content:
        kind = content["dynlm_tokenizer"]
        if kind != "bytes":
            raise DataError(f"{file}: unknown dynlm tokenizer kind {kind!r}", "this dynlm knows: bytes")
        if content.get("special_tokens", {ENDOFTEXT: 256, PAD: 257}) != {ENDOFTEXT: 256, PAD: 257}:
            raise DataError(f"{file}: byte tokenizer with unexpected special tokens {content['special_tokens']}")
        return ByteTokenizer(chat_template=content.get("chat_template"))
    return HFTokenizer.from_directory(file.parent) if file.name == TOKENIZER_FILE \
        else HFTokenizer(_read_hf_tokenizer(file))


# --- chat templates ------------------------------------------------------------------------------

def render_chat_template(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                         special_tokens: dict[str, str]) -> str:
    """Render a Hugging Face chat template the way `transformers` does (sandboxed jinja2,
    trim_blocks, lstrip_blocks, `raise_exception`, `tojson`). Without jinja2, only ChatML
    templates are rendered (by hand)."""
    try:
        import jinja2  # noqa: F401
    except ImportError:
        if "<|im_start|>" in template:
            return _render_chatml(messages, add_generation_prompt)
        raise DataError("rendering this chat template needs jinja2", "pip install jinja2") from None
    import jinja2

    try:
        compiled = _compile_template(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise DataError(f"chat template: {e}") from None


_TEMPLATE_CACHE: dict[str, Any] = {}


def _compile_template(template: str) -> Any:
    if template not in _TEMPLATE_CACHE:
        from datetime import datetime

        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.TemplateError(message)

        def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
                   sort_keys: bool = False) -> str:
            return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _TEMPLATE_CACHE[template] = env.from_string(template)
    return _TEMPLATE_CACHE[template]


def _render_chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# --- file helpers --------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(content, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def _read_hf_tokenizer(file: Path) -> tokenizers.Tokenizer:
    if not file.is_file():
        raise DataError(f"{file}: no such file")
    try:
        return tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise DataError(f"{file}: not a Hugging Face tokenizer.json ({e})") from None


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    if template:
        return template
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        return _read_json(directory / "chat_template.json").get("chat_template")
    return None


# --- GGUF vocabularies (built by dynlm.data.gguf_vocab) ---------------------------------------

def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF file") -> HFTokenizer:
    """The tokenizer described by GGUF metadata (vocabulary, merges, token types, bos/eos/pad,
    end-of-turn tokens, chat template) as a dynlm `HFTokenizer`."""
    try:
        backend = build_gguf_tokenizer(metadata, source)
        meta = GGUFMetadata(metadata, source)
        tokens = meta.require("tokenizer.ggml.tokens")
    except CheckpointError as e:
        raise DataError(e.message, e.hint) from None

    sentencepiece = meta.get("tokenizer.ggml.model") == "llama"

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None or not 0 <= index < len(tokens) else tokens[index]

    return HFTokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
                       chat_template=meta.get("tokenizer.chat_template"),
                       extra_eos_tokens=[t for t in (token("eot"), token("eom")) if t is not None],
                       prepend_separator=bool(meta.get("tokenizer.ggml.add_bos_token", sentencepiece)),
                       prefix_space=sentencepiece and bool(meta.get("tokenizer.ggml.add_space_prefix", True)))


def tokenizer_from_gguf(path: str | Path) -> HFTokenizer:
    """The tokenizer stored in a GGUF file, as a dynlm `HFTokenizer` (see
    `tokenizer_from_gguf_metadata`). `dynlm.load_tokenizer("x.gguf")` gives the same."""
    path = Path(path)
    try:
        reader = open_gguf(path)
    except CheckpointError as e:
        raise DataError(e.message, e.hint) from None
    return tokenizer_from_gguf_metadata(reader.fields, str(path))
