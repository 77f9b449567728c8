"""One config system: typed dataclasses, YAML presets shipped in `dynlm/configs/`, and `a.b=c`
overrides, merged and validated by OmegaConf. Unknown keys and bad values become a one-line
`ConfigError` naming the key and the nearest valid one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from dynlm.errors import ConfigError, did_you_mean
from dynlm.registry import get_architecture

T = TypeVar("T")

CONFIG_ROOT = resources.files("dynlm") / "configs"


@dataclass
class ModelConfig:
    """Fields shared by every architecture; each architecture extends it with its own."""

    type: str = "standard"
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # hidden_size // num_heads when None
    intermediate_size: int | None = None  # 4 * hidden_size when None
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2 yes, Llama no)
    sliding_window: int | None = None  # attend to at most this many previous positions
    sliding_window_layers: list[int] | None = None  # layers that use the window (None: all)
    initializer_range: float = 0.02
    family: str = "llama"  # naming family for Hugging Face export: llama | qwen2
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // max(1, self.num_heads)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        self.validate()

    def validate(self) -> None:
        positive = ["vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                    "intermediate_size", "max_position_embeddings"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ConfigError("model.rope_theta and model.rms_norm_eps must be > 0")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"model.sliding_window must be > 0 or null, got {self.sliding_window}")
        if self.family not in ("llama", "qwen2"):
            raise ConfigError(f"model.family must be 'llama' or 'qwen2', got '{self.family}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def uses_sliding_window(self, layer: int) -> bool:
        if self.sliding_window is None:
            return False
        return self.sliding_window_layers is None or layer in self.sliding_window_layers


# ---------------------------------------------------------------------------------------------
# Validation: dict -> dataclass with readable errors


def _key_error(e: OmegaConfBaseException, prefix: str, valid: list[str]) -> ConfigError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None) or "?"
    full = f"{prefix}{key}" if prefix and not str(key).startswith(prefix) else str(key)
    if isinstance(e, ConfigKeyError):
        leaf = str(key).split(".")[-1]
        return ConfigError(f"unknown config key '{full}'", did_you_mean(leaf, valid))
    msg = str(e).splitlines()[0]
    return ConfigError(f"bad value for '{full}': {msg}")


def to_dataclass(cls: type[T], data: dict[str, Any] | DictConfig, prefix: str = "") -> T:
    """Validate `data` against dataclass `cls` (types, unknown keys) and build an instance."""
    schema = OmegaConf.structured(cls)
    try:
        merged = OmegaConf.merge(schema, data)
        obj = OmegaConf.to_object(merged)
    except (ConfigKeyError, ValidationError) as e:
        raise _key_error(e, prefix, [f.name for f in dataclasses.fields(cls)]) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config{f' in {prefix.rstrip(chr(46))}' if prefix else ''}: "
                          f"{str(e).splitlines()[0]}") from None
    return obj  # type: ignore[return-value]


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["model.num_layers=8", "train.lr=1e-3"]` -> nested dict (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"bad override '{item}'", "expected key=value, e.g. train.lr=1e-3")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:  # YAML syntax errors come from several libraries
        raise ConfigError(f"cannot parse '{path}': {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{path}' must hold a mapping at the top level")
    return data


def deep_merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = deep_merge(out[k], v)
            else:
                out[k] = v
    return out


# ---------------------------------------------------------------------------------------------
# Model presets


def list_model_presets() -> list[str]:
    return sorted(p.name[:-5] for p in (CONFIG_ROOT / "models").iterdir() if p.name.endswith(".yaml"))


def model_preset(name: str) -> dict[str, Any]:
    path = CONFIG_ROOT / "models" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset '{name}'", did_you_mean(name, list_model_presets()))
    return OmegaConf.to_container(OmegaConf.create(path.read_text()))  # type: ignore[return-value]


def model_config(spec: str | dict[str, Any] | ModelConfig, **overrides: Any) -> ModelConfig:
    """A validated model config from a preset name, a dict or a config, plus field overrides.
    The `type` field picks the architecture's config class."""
    if isinstance(spec, ModelConfig):
        data = spec.to_dict()
    elif isinstance(spec, str):
        data = model_preset(spec)
    elif isinstance(spec, dict):
        data = dict(spec)
    else:
        raise ConfigError(f"cannot build a model config from {type(spec).__name__}")
    data = deep_merge(data, overrides)
    seen: list[str] = []
    while (preset_name := data.pop("preset", None)) is not None:  # a preset may start from another
        if preset_name in seen:
            raise ConfigError(f"model presets refer to each other in a loop: {' -> '.join([*seen, preset_name])}")
        seen.append(preset_name)
        data = deep_merge(model_preset(preset_name), data)
    config_class, _ = get_architecture(str(data.get("type", "standard")))
    return to_dataclass(config_class, data, prefix="model.")

