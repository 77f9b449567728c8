"""Any checkpoint form in, a model (or tokenizer, or run facts) out: dynlm directories, Hugging Face
directories, `.gguf` files and weights-as-code folders. This is the top of the library's layers
(it reads through interop and the code form), and what `dynlm.load_pretrained` calls.

    model = load_pretrained("runs/x/best")         # or "code/", "Qwen2.5-0.5B/", "model.gguf"
    tokenizer = load_tokenizer("code/")
    read_training_info("code/")["seq_len"]         # the run's sequence length, whatever the form
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dynlm.checkpoint import is_dynlm_checkpoint, load_checkpoint, recover_directory
from dynlm.data.tokenizers import load_tokenizer as load_data_tokenizer
from dynlm.errors import CheckpointError
from dynlm.interop.gguf import load_gguf
from dynlm.interop.hf import load_hf_checkpoint
from dynlm.models.base import DynModel
from dynlm.weights.codeckpt import load_code_checkpoint
from dynlm.weights.format import VOCAB_FILE, WEIGHTS_FILE
from dynlm.weights.store import CodeCheckpoint, is_code_checkpoint, load_vocab_tokenizer

TRAINING_INFO_FILE = "training.json"  # written by the trainer next to config.json


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DynModel:
    """Load a model from a dynlm checkpoint directory, a Hugging Face `Qwen2ForCausalLM` /
    `LlamaForCausalLM` directory, a `.gguf` file, or a weights-as-code directory."""
    path = Path(path)
    recover_directory(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_file():
        if path.suffix == ".gguf":
            return load_gguf(path, device=device, dtype=dtype)
        raise CheckpointError(f"{path}: not a checkpoint", "give a checkpoint directory or a .gguf file")
    if is_code_checkpoint(path):
        return load_code_checkpoint(path, device=device, dtype=dtype)
    if is_dynlm_checkpoint(path):
        return load_checkpoint(path, device=device, dtype=dtype)
    if (path / "config.json").is_file():
        return load_hf_checkpoint(path, device=device, dtype=dtype)
    raise CheckpointError(f"{path}: no config.json, {WEIGHTS_FILE} or .gguf", "is this a checkpoint directory?")


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory (code form too), a `tokenizer.json`, a `.gguf`
    file, or "bytes"."""
    if str(path) != "bytes" and (Path(path) / VOCAB_FILE).is_file() and is_code_checkpoint(path):
        return load_vocab_tokenizer(path)
    return load_data_tokenizer(path)


def read_training_info(path: str | Path) -> dict[str, Any]:
    """What the trainer recorded about the run a checkpoint comes from (`training.json`: seq_len,
    corpus, splits, step, ...), from a dynlm directory or a code-form folder (which keeps the
    file in config.py); {} for checkpoints written outside a training run (Hugging Face, GGUF,
    a plain `save_pretrained`)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    if is_code_checkpoint(path):
        raw = CodeCheckpoint(path).json_files().get(TRAINING_INFO_FILE)
    else:
        file = path / TRAINING_INFO_FILE
        raw = file.read_bytes() if file.is_file() else None
    if raw is None:
        return {}
    try:
        info = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {TRAINING_INFO_FILE} is not valid JSON ({e})") from None
    return info if isinstance(info, dict) else {}
