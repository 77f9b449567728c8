"""dynlm: build, train, evaluate, compare and serve dynamic language models.

    import dynlm
    model = dynlm.build_model("standard-tiny", vocab_size=260)
    model = dynlm.load_pretrained("smollm2/")            # ours, Hugging Face, .gguf, or code form
    tok = dynlm.load_tokenizer("smollm2/")
    text = dynlm.generate(model, tok, "Hello", max_new_tokens=20)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynlm.errors import CheckpointError, ConfigError, DataError, DynlmError
from dynlm.registry import list_architectures

if TYPE_CHECKING:
    import torch

    from dynlm.config import ModelConfig
    from dynlm.models.base import DynModel

__version__ = "0.2.0"

__all__ = ["build_model", "load_pretrained", "load_tokenizer", "generate", "list_architectures",
           "list_presets", "DynlmError", "ConfigError", "CheckpointError", "DataError", "__version__"]


def list_presets() -> list[str]:
    """Model preset names usable with `build_model`."""
    from dynlm.config import list_model_presets

    return list_model_presets()


def build_model(preset_or_config: str | dict[str, Any] | ModelConfig, **overrides: Any) -> DynModel:
    """A freshly initialised model from a preset name (e.g. "standard-tiny"), a config dict or a
    config object, with config fields overridden, e.g. `vocab_size=260, num_layers=2`."""
    from dynlm.config import model_config
    from dynlm.registry import get_architecture

    config = model_config(preset_or_config, **overrides)
    _, model_class = get_architecture(config.type)
    return model_class(config)


def load_pretrained(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> DynModel:
    """Load a model from a dynlm checkpoint directory, a Hugging Face `Qwen2ForCausalLM` /
    `LlamaForCausalLM` directory, a `.gguf` file, or a weights-as-code directory."""
    from dynlm.weights.loading import load_pretrained as _load

    return _load(path, device=device, dtype=dtype)


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a checkpoint directory (code form too), a `tokenizer.json`, a `.gguf` file, or "bytes"."""
    from dynlm.weights.loading import load_tokenizer as _load

    return _load(path)


def generate(model: DynModel, tokenizer: Any, prompt: str | list[str], **kwargs: Any) -> Any:
    """Generate text; see `dynlm.infer.generate.generate` for the sampling options. Like
    `dynlm generate`, a prompt goes through the tokenizer's chat template when it has one
    (`chat=False` feeds it as is)."""
    from dynlm.infer.generate import generate as _generate

    return _generate(model, tokenizer, prompt, **kwargs)
