"""The run config: one YAML file (or a shipped mode preset) + `a.b=c` overrides, validated into
typed dataclasses. Unknown keys and bad values are one-line `ConfigError`s naming the key.

    run = load_run_config("quick", ["model.num_layers=8", "train.lr=1e-3"])

Sections:
  model     the architecture's config (chosen by `model.type`); may start from a model preset
            (`model.preset: standard-quick`) and override fields. `vocab_size` is taken from the
            tokenizer unless the run sets it explicitly.
  data      corpus, tokenizer ("bytes" | "bpe:<vocab_size>" | path | "init"), seq_len, splits
  train     optimizer, schedule, batch, precision, evaluation and checkpoint cadence
  top level mode, out_dir, run_name, init_from (transfer: a checkpoint directory or .gguf)

Mode presets live in `dynlm/configs/train/<mode>.yaml` (quick, scratch, transfer). A user file
("custom" mode) may start from one with `preset: <mode>`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from dynlm.config import (
    CONFIG_ROOT,
    ModelConfig,
    deep_merge,
    list_model_presets,
    load_yaml,
    model_config,
    model_preset,
    parse_overrides,
    to_dataclass,
)
from dynlm.data.corpora import get_corpus
from dynlm.errors import ConfigError, did_you_mean
from dynlm.nn.linear_attention import check_plasticity
from dynlm.registry import get_architecture

# ---------------------------------------------------------------------------------------------
# Top-level aliases (hook for the architecture configs).
#
# The design documents use short top-level keys for some model fields (`mod_capacity=0.125`,
# `dtf_capacity`, `beta_ce_init`, `model.size=0.5B`). Each entry maps such a key (top-level or
# dotted) either to the dotted path it stands for, e.g. {"mod_capacity": "model.capacity"}, or to
# a function of its value returning {dotted path: value}, e.g.
# {"model.size": lambda size: {"model.preset": SIZE_PRESETS[size]}}.
# Aliases are applied before validation, after preset + file + overrides are merged; an alias and
# its target both given is an error. Architecture modules register theirs with `register_alias`.
# The seed's model sizes: the Qwen2.5 body of that size, whatever model.type says.
MODEL_SIZES = {"0.5B": "qwen2.5-0.5b", "1.5B": "qwen2.5-1.5b", "3B": "qwen2.5-3b"}


def _model_size(size: Any) -> dict[str, Any]:
    sizes = {name.lower(): preset for name, preset in MODEL_SIZES.items()}
    if str(size).lower() not in sizes:
        raise ConfigError(f"unknown model.size '{size}'", "valid: " + ", ".join(MODEL_SIZES))
    return {"model.preset": sizes[str(size).lower()]}


CONFIG_ALIASES: dict[str, str | Callable[[Any], dict[str, Any]]] = {
    "mod_capacity": "model.mod_capacity",
    "mod_aux_loss_weight": "model.mod_aux_loss_weight",
    "dtf_capacity": "model.dtf_capacity",
    "beta_ce_init": "model.beta_ce_init",
    "beta_cu_init": "model.beta_cu_init",
    "model.size": _model_size,
}


def register_alias(key: str, target: str | Callable[[Any], dict[str, Any]]) -> None:
    """Let `key` (e.g. "mod_capacity") stand for `target` (e.g. "model.capacity") in run configs."""
    CONFIG_ALIASES[key] = target


# ---------------------------------------------------------------------------------------------
# Sections

DTYPES = ("auto", "float32", "bfloat16")
SCHEDULES = ("cosine", "wsd", "constant")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
FSDP_DTYPES = ("float32", "bfloat16")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_TOKENIZER_PATTERN = re.compile(r"^bpe:(\d+)$")


@dataclass
class CurriculumStage:
    """One stage of `data.curriculum` (see dynlm.train.curriculum): a corpus, a length in steps
    or as a fraction of train.max_steps (the last stage runs to the end), and a plasticity alpha."""

    corpus: str = "shakespeare"
    steps: int | None = None
    fraction: float | None = None
    plasticity: float | None = None  # null: leave the model's alpha as it is

    def __post_init__(self) -> None:
        if self.steps is not None and self.fraction is not None:
            raise ConfigError(f"curriculum stage '{self.corpus}': give steps or fraction, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"curriculum stage '{self.corpus}': steps must be >= 1, got {self.steps}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ConfigError(f"curriculum stage '{self.corpus}': fraction must be in (0, 1], got {self.fraction}")
        if self.plasticity is not None:
            try:
                check_plasticity(self.plasticity)
            except ConfigError as e:
                raise ConfigError(f"curriculum stage '{self.corpus}': {e.message}") from None


@dataclass
class DataConfig:
    corpus: str = "shakespeare"  # a registered corpus name, a file, folder or glob
    tokenizer: str = "bytes"  # "bytes" | "bpe:<vocab_size>" (trained on the train split, cached) | path | "init"
    seq_len: int = 256  # tokens per training sequence
    splits: list[float] = field(default_factory=lambda: [0.9, 0.05, 0.05])  # train / val / test, by document
    vocab_multiple: int = 64  # model vocab = tokenizer vocab rounded up to this (GPU-friendly matmuls)
    cache_dir: str | None = None  # $DYNLM_CACHE or ~/.cache/dynlm when null
    curriculum: list[CurriculumStage] = field(default_factory=list)  # training stages; empty: train on `corpus`

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if len(self.splits) != 3 or any(s < 0 for s in self.splits) or not math.isclose(sum(self.splits), 1.0):
            raise ConfigError(f"data.splits must be three fractions (train, val, test) summing to 1, got {self.splits}")
        if self.vocab_multiple < 1:
            raise ConfigError(f"data.vocab_multiple must be >= 1, got {self.vocab_multiple}")
        match = _TOKENIZER_PATTERN.match(self.tokenizer)
        if self.tokenizer.startswith("bpe") and (match is None or int(match.group(1)) < 260):
            raise ConfigError(f"bad value for 'data.tokenizer': '{self.tokenizer}'",
                              "write bpe:<vocab_size> with vocab_size >= 260, e.g. bpe:2048")

    @property
    def bpe_vocab_size(self) -> int | None:
        match = _TOKENIZER_PATTERN.match(self.tokenizer)
        return int(match.group(1)) if match else None


@dataclass
class TrainConfig:
    # optimizer: AdamW, no weight decay on norms, biases and embeddings
    lr: float = 1e-3
    min_lr: float = 1e-4  # the schedule decays to this
    schedule: str = "cosine"  # cosine | wsd (warm-up, stable, decay) | constant (after warm-up)
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of max_steps decays linearly to min_lr
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 32  # sequences per optimizer step, all devices and accumulation steps together
    grad_accum: int = 1  # micro-batches per optimizer step (on each device)
    clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    # hardware
    device: str = "auto"  # auto (cuda > mps > cpu) | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto (bfloat16 autocast on CUDA, float32 elsewhere) | float32 | bfloat16
    compile: bool = False  # torch.compile the training forward
    compile_mode: str = "default"  # torch.compile mode: default | max-autotune-no-cudagraphs | max-autotune | ...
    fused_loss: bool = False  # transformer family: LM head + loss in chunks, never the [B, T, V] logits
    fsdp: bool = False  # shard parameters, gradients and optimizer state (FSDP2) instead of DDP
    # data parallel tuning (under torchrun); see docs/training.md
    ddp_bucket_cap_mb: float = 25.0  # DDP: gradients are all-reduced in buckets of this size during backward
    fsdp_reshard_after_forward: bool = True  # FSDP2: free gathered layers after forward; false keeps them
    fsdp_param_dtype: str = "float32"  # FSDP2: dtype parameters are gathered in (sharded masters stay float32)
    fsdp_reduce_dtype: str = "float32"  # FSDP2: dtype gradients are reduce-scattered in
    seed: int = 1337
    # logging, evaluation, checkpoints
    log_every: int = 10  # steps between metric lines (each one reads the loss back from the device)
    eval_every: int = 200  # steps between validations (and at the end); 0: only at the end
    eval_bytes: int = 131072  # UTF-8 bytes of validation text scored at each validation
    eval_stride: int | None = None  # sliding-window stride in tokens; null: seq_len // 2
    eval_batch_size: int = 16
    final_eval: list[str] = field(default_factory=lambda: ["val", "test"])  # full splits scored at the end
    save_every: int = 500  # steps between checkpoints (and at the end)
    keep_last: int = 2  # step-XXXXXX checkpoints kept (plus best/ and last/)
    max_nan_steps: int = 10  # stop after this many non-finite steps in a row (each one is skipped)
    progress: bool = True  # tqdm progress bar (rank 0)
    sample_prompt: str | None = ""  # text sample generated at the end ("" = from the separator); null: none
    sample_tokens: int = 200
    plot: bool = True  # loss-curve PNG at the end (needs matplotlib)
    code_form: str | None = None  # inline | hybrid: also keep the weights as code in <run>/code (history per save)

    def __post_init__(self) -> None:
        if self.code_form not in (None, "inline", "hybrid"):
            raise ConfigError(f"bad value for 'train.code_form': '{self.code_form}'", "inline, hybrid or null")
        for name in ("max_steps", "batch_size", "grad_accum", "log_every", "save_every", "keep_last",
                     "max_nan_steps", "eval_bytes", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "sample_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"train.lr must be > 0 and train.min_lr in [0, lr], got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"bad value for 'train.schedule': '{self.schedule}'",
                              did_you_mean(self.schedule, SCHEDULES))
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"bad value for 'train.compile_mode': '{self.compile_mode}'",
                              did_you_mean(self.compile_mode, COMPILE_MODES))
        self._check_data_parallel()
        if self.dtype not in DTYPES:
            raise ConfigError(f"bad value for 'train.dtype': '{self.dtype}'", did_you_mean(self.dtype, DTYPES))
        if not _DEVICE_PATTERN.match(self.device):
            raise ConfigError(f"bad value for 'train.device': '{self.device}'", "valid: auto, cpu, cuda, cuda:N, mps")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip < 0 or self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("train.clip and train.weight_decay must be >= 0 and train.eps > 0")
        if self.eval_stride is not None and self.eval_stride < 1:
            raise ConfigError(f"train.eval_stride must be >= 1 or null, got {self.eval_stride}")
        for split in self.final_eval:
            if split not in ("train", "val", "test"):
                raise ConfigError(f"bad value in 'train.final_eval': '{split}'", "valid: train, val, test")

    def _check_data_parallel(self) -> None:
        """DDP options need DDP (fsdp=false) and FSDP2 options need fsdp=true: a tuning value the
        run would ignore is an error, not a silent no-op."""
        if not self.ddp_bucket_cap_mb > 0:
            raise ConfigError(f"train.ddp_bucket_cap_mb must be > 0, got {self.ddp_bucket_cap_mb}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            if getattr(self, name) not in FSDP_DTYPES:
                raise ConfigError(f"bad value for 'train.{name}': '{getattr(self, name)}'", "valid: float32, bfloat16")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        owner = {"ddp_": ("fsdp=false", not self.fsdp), "fsdp_": ("fsdp=true", self.fsdp)}
        for name, default in defaults.items():
            for prefix, (needs, active) in owner.items():
                if name.startswith(prefix) and getattr(self, name) != default and not active:
                    raise ConfigError(f"train.{name}={getattr(self, name)} needs train.{needs}",
                                      f"remove it or set train.{needs}")


@dataclass
class RunConfig:
    model: dict[str, Any]  # the model section as given (may name a preset); resolved by `resolve_model_config`
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mode: str = "custom"  # quick | scratch | transfer | custom (informational)
    out_dir: str = "runs"
    run_name: str | None = None  # default: the preset or file name, plus '-<type>' for a model.type override
    init_from: str | None = None  # transfer: a checkpoint directory (dynlm or Hugging Face) or a .gguf file

    def to_dict(self, model: ModelConfig | None = None) -> dict[str, Any]:
        """Plain dict for `config.yaml`; pass the resolved model config to record every field."""
        return {"mode": self.mode, "out_dir": self.out_dir, "run_name": self.run_name, "init_from": self.init_from,
                "model": model.to_dict() if model is not None else dict(self.model),
                "data": dataclasses.asdict(self.data), "train": dataclasses.asdict(self.train)}

    def save(self, path: Path, model: ModelConfig | None = None) -> None:
        path.write_text(OmegaConf.to_yaml(OmegaConf.create(self.to_dict(model))))


TOP_LEVEL_KEYS = ("model", "data", "train", "mode", "out_dir", "run_name", "init_from", "preset")

# ---------------------------------------------------------------------------------------------
# Loading


def list_modes() -> list[str]:
    """Names of the shipped mode presets."""
    return sorted(p.name[:-5] for p in (CONFIG_ROOT / "train").iterdir() if p.name.endswith(".yaml"))


def mode_preset(name: str) -> dict[str, Any]:
    path = CONFIG_ROOT / "train" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown training preset '{name}'", did_you_mean(name, list_modes()))
    data = OmegaConf.to_container(OmegaConf.create(path.read_text()))
    return {"mode": name, **data}  # type: ignore[dict-item]


def _looks_like_path(source: str) -> bool:
    return source.endswith((".yaml", ".yml")) or "/" in source or Path(source).is_file()


def _source_dict(source: str | Path | dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
    """(raw config dict, default run name) of a preset name, a YAML path or a dict."""
    if source is None:
        return {}, None
    if isinstance(source, dict):
        data = dict(source)
        name = data.get("mode") if isinstance(data.get("mode"), str) else None
    elif isinstance(source, Path) or _looks_like_path(source):
        data = load_yaml(source)
        name = Path(source).stem
        data.setdefault("mode", "custom")
    else:
        return mode_preset(source), source
    base = data.pop("preset", None)
    if base is not None:  # a user file starting from a mode preset
        data = deep_merge(mode_preset(str(base)), {"mode": "custom"} if data.get("mode") == "custom" else {}, data)
    return data, name


def _apply_aliases(data: dict[str, Any]) -> dict[str, Any]:
    """Replace alias keys (see CONFIG_ALIASES) by the paths they stand for."""
    for alias, target in CONFIG_ALIASES.items():
        parts = alias.split(".")
        parent = data
        for part in parts[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or parts[-1] not in parent:
            continue
        value = parent.pop(parts[-1])
        updates = {target: value} if isinstance(target, str) else target(value)
        for path, new_value in updates.items():
            node = data
            *heads, leaf = path.split(".")
            for head in heads:
                node = node.setdefault(head, {})
            if leaf in node and node[leaf] != new_value and leaf != "preset":
                raise ConfigError(f"'{alias}' and '{path}' both given", f"'{alias}' is a short name for '{path}'")
            node[leaf] = new_value
    return data


def _byte_level_defaults(data: dict[str, Any], overrides: dict[str, Any], from_mode_preset: bool) -> None:
    """A byte-level architecture (its config class says `byte_level = True`) reads raw bytes: the
    mode preset's BPE tokenizer becomes `bytes` and its `<other>-<size>` model preset becomes
    `<type>-<size>` when that preset exists (`dynlm train quick model.type=agiformer` trains
    agiformer-quick on bytes). Asking for another tokenizer explicitly is an error."""
    model, data_section = data.get("model"), data.get("data")
    if not isinstance(model, dict) or not isinstance(data_section, dict) or "type" not in model:
        return
    config_class, _ = get_architecture(str(model["type"]))
    if not getattr(config_class, "byte_level", False):
        return
    tokenizer = data_section.get("tokenizer", "bytes")
    if tokenizer != "bytes":
        if "tokenizer" in (overrides.get("data") or {}) or not from_mode_preset:
            raise ConfigError(f"model.type={model['type']} reads raw bytes; data.tokenizer must be 'bytes', "
                              f"got '{tokenizer}'")
        data_section["tokenizer"] = "bytes"
    preset = model.get("preset")
    if isinstance(preset, str) and "-" in preset and "preset" not in (overrides.get("model") or {}):
        candidate = f"{model['type']}-{preset.split('-', 1)[1]}"
        if model_preset(preset).get("type", "standard") != model["type"] and candidate in list_model_presets():
            model["preset"] = candidate


def load_run_config(source: str | Path | dict[str, Any] | RunConfig | None = None,
                    overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """Preset name ("quick"), YAML path or dict, merged with overrides (["train.lr=1e-3"] or a
    nested dict) and validated. Raises ConfigError naming the key on any mistake."""
    if isinstance(source, RunConfig):
        source = source.to_dict()
    data, default_name = _source_dict(source)
    if isinstance(overrides, dict):
        override_dict = overrides
    else:
        override_dict = parse_overrides(list(overrides or []))
    data = _apply_aliases(deep_merge(data, override_dict))

    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"unknown config key '{key}'", did_you_mean(key, TOP_LEVEL_KEYS))
    for key in ("model", "data", "train"):
        if data.get(key) is None:
            data[key] = {}
        if not isinstance(data[key], dict):
            raise ConfigError(f"config section '{key}' must be a mapping, got {data[key]!r}")
    _byte_level_defaults(data, override_dict, from_mode_preset=isinstance(source, str) and not _looks_like_path(source))
    model_section = dict(data["model"])
    checked = model_config(model_section)  # validate the architecture's keys and values now, not after data prep
    if hasattr(checked, "check_sequence_length"):  # e.g. patches must tile the training sequence
        checked.check_sequence_length(int(data["data"].get("seq_len", DataConfig.seq_len)))
    run = RunConfig(model=model_section,
                    data=to_dataclass(DataConfig, data["data"], prefix="data."),
                    train=to_dataclass(TrainConfig, data["train"], prefix="train."))
    for key in ("mode", "out_dir", "run_name", "init_from"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"bad value for '{key}': expected a string, got {value!r}")
        if value is not None:
            setattr(run, key, value)
    if run.run_name is None:
        run.run_name = default_name or run.mode
        chosen_type = (override_dict.get("model") or {}).get("type")
        if chosen_type and chosen_type != "standard":  # `dynlm train quick model.type=thl` -> runs/quick-thl
            run.run_name = f"{run.run_name}-{chosen_type}"
    if run.run_name in ("", ".", "..") or "/" in run.run_name:
        raise ConfigError(f"bad value for 'run_name': '{run.run_name}'", "a plain folder name")
    for stage in run.data.curriculum:  # a misspelt stage corpus fails now, before any folder is made
        get_corpus(stage.corpus)
    if run.data.tokenizer == "init" and not run.init_from:
        raise ConfigError("data.tokenizer is 'init' but init_from is not set", "set init_from=PATH")
    if run.mode == "transfer" and not run.init_from:
        raise ConfigError("transfer mode needs 'init_from'", "e.g. init_from=path/to/checkpoint or model.gguf")
    return run


def resolve_model_config(run: RunConfig, tokenizer_vocab_size: int,
                         source_config: ModelConfig | None = None) -> ModelConfig:
    """The model config a run trains: the model section (on top of the transfer source's config,
    if any), with `vocab_size` taken from the tokenizer unless the run sets it."""
    section = dict(run.model)
    explicit_vocab = "vocab_size" in section
    if source_config is not None and "preset" not in section:
        base = source_config.to_dict()
        if section.get("type", base["type"]) != base["type"]:
            # another architecture: keep the shared transformer fields, let the new type add its own
            shared = {f.name for f in dataclasses.fields(ModelConfig)}
            base = {k: v for k, v in base.items() if k in shared}
        section = deep_merge(base, section)
        explicit_vocab = True  # the source's embedding matrix fixes it
    if not explicit_vocab:
        multiple = run.data.vocab_multiple
        section["vocab_size"] = -(-tokenizer_vocab_size // multiple) * multiple
    config = model_config(section)
    if config.vocab_size < tokenizer_vocab_size:
        raise ConfigError(f"model.vocab_size ({config.vocab_size}) is smaller than the tokenizer's vocabulary "
                          f"({tokenizer_vocab_size})", "remove model.vocab_size to take it from the tokenizer")
    if config.max_position_embeddings < run.data.seq_len:
        raise ConfigError(f"data.seq_len ({run.data.seq_len}) exceeds model.max_position_embeddings "
                          f"({config.max_position_embeddings})")
    return config
