"""Hugging Face checkpoints: import `Qwen2ForCausalLM` / `LlamaForCausalLM` directories into a
`StandardModel`, and export a `StandardModel` to a directory `transformers` loads.

Our parameter names are already Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...),
so the weights are a plain copy; the work is in mapping the config faithfully and refusing what we
do not implement (rope scaling, biased o_proj, other activations) rather than giving wrong logits.

    model = load_hf_checkpoint("Qwen2.5-0.5B/")
    export_hf_checkpoint(model, "exported/", tokenizer=tok)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dynlm.checkpoint import finish_loading, model_state_dict, read_config, read_safetensors, write_safetensors
from dynlm.config import model_config
from dynlm.errors import CheckpointError
from dynlm.fileio import atomic_directory, json_text
from dynlm.models.standard import StandardModel

if TYPE_CHECKING:
    from dynlm.models.base import DynModel

# Hugging Face class name -> our naming family (ModelConfig.family)
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
FAMILY_CLASS = {family: name for name, family in ARCHITECTURES.items()}

# transformers' config-class defaults for fields a config.json may leave out
_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "qwen2": {"max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "max_window_layers": 28, "sliding_window": 4096},
}


def _first_id(value: Any) -> int | None:
    """`eos_token_id` may be an int or a list of ints (Llama 3); our config keeps the first."""
    if isinstance(value, list):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def eos_token_ids(*values: Any) -> list[int]:
    """Every end-of-sequence id named by config / generation_config values (ints, lists, None),
    in order and without repeats."""
    ids: list[int] = []
    for value in values:
        for v in value if isinstance(value, list) else [value]:
            if v is not None and int(v) not in ids:
                ids.append(int(v))
    return ids


def _rope_theta(hf: dict[str, Any], family: str, source: str) -> float:
    """rope theta from `rope_parameters` (transformers >= 5) or `rope_theta` + `rope_scaling`
    (older configs); any rope scaling we do not implement is refused."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # per-layer-type parameters ({"full_attention": {...}, "sliding_attention": {...}})
        distinct = {json.dumps(v, sort_keys=True) for v in params.values()}
        if len(distinct) > 1:
            raise CheckpointError(f"{source}: different rope parameters per layer type are not supported")
        params = next(iter(params.values()))
    scaling = hf.get("rope_scaling") or {}
    for spec in (params or {}, scaling):
        rope_type = spec.get("rope_type", spec.get("type", "default"))
        if rope_type not in ("default", None):
            raise CheckpointError(f"{source}: rope scaling type '{rope_type}' is not implemented by dynlm",
                                  "only plain RoPE (rope_type 'default') loads; logits would be wrong otherwise")
        if spec.get("partial_rotary_factor", 1.0) != 1.0:
            raise CheckpointError(f"{source}: partial_rotary_factor {spec['partial_rotary_factor']} is not supported")
    theta = (params or {}).get("rope_theta", hf.get("rope_theta", _DEFAULTS[family]["rope_theta"]))
    return float(theta)


def _sliding_window(hf: dict[str, Any], num_layers: int, source: str) -> tuple[int | None, list[int] | None]:
    """Qwen2's window: `use_sliding_window` switches it on, then either `layer_types` (transformers
    >= 5) or `max_window_layers` (layers at or above it slide) says where."""
    if not hf.get("use_sliding_window", False):
        return None, None
    window = hf.get("sliding_window", _DEFAULTS["qwen2"]["sliding_window"])
    if window is None:
        return None, None
    layer_types = hf.get("layer_types")
    if layer_types is not None:
        unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
        if unknown or len(layer_types) != num_layers:
            raise CheckpointError(f"{source}: layer_types {layer_types} not understood",
                                  f"expected {num_layers} of 'full_attention' / 'sliding_attention'")
        layers = [i for i, kind in enumerate(layer_types) if kind == "sliding_attention"]
    else:
        first = hf.get("max_window_layers", _DEFAULTS["qwen2"]["max_window_layers"])
        layers = list(range(first, num_layers))
    if not layers:
        return None, None
    return int(window), (None if len(layers) == num_layers else layers)


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """Our StandardModel config (as a dict) from a Hugging Face Llama / Qwen2 `config.json`."""
    names = hf.get("architectures") or []
    known = [n for n in names if n in ARCHITECTURES]
    if not known:
        model_type = hf.get("model_type")
        if model_type in FAMILY_CLASS and not names:
            known = [FAMILY_CLASS[model_type]]
        else:
            shown = ", ".join(names) or f"model_type '{model_type}'"
            raise CheckpointError(f"{source}: architecture {shown} is not supported",
                                  "dynlm imports " + " and ".join(ARCHITECTURES))
    family = ARCHITECTURES[known[0]]
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act '{hf['hidden_act']}' is not supported (SwiGLU needs 'silu')")
    if hf.get("mlp_bias", False):
        raise CheckpointError(f"{source}: mlp_bias=true is not supported (the MLP has no biases)")
    if family == "llama" and hf.get("attention_bias", False):
        # Llama's attention_bias also puts a bias on o_proj, which our attention never has
        raise CheckpointError(f"{source}: Llama attention_bias=true (biased o_proj) is not supported")
    try:
        hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        num_layers = int(hf["num_hidden_layers"])
        config = {
            "type": "standard",
            "family": family,
            "vocab_size": int(hf["vocab_size"]),
            "hidden_size": hidden,
            "num_layers": num_layers,
            "num_heads": heads,
            "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
            "head_dim": int(hf.get("head_dim") or hidden // heads),
            "intermediate_size": int(hf["intermediate_size"]),
        }
    except KeyError as e:
        raise CheckpointError(f"{source}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: bad value ({e})") from None
    window, window_layers = _sliding_window(hf, num_layers, source) if family == "qwen2" else (None, None)
    config.update(
        max_position_embeddings=int(hf.get("max_position_embeddings") or _DEFAULTS[family]["max_position_embeddings"]),
        rope_theta=_rope_theta(hf, family, source),
        rms_norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS[family]["rms_norm_eps"])),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2",  # Qwen2 always has q/k/v biases, Llama (here) never
        sliding_window=window,
        sliding_window_layers=window_layers,
        initializer_range=float(hf.get("initializer_range", 0.02)),
        bos_token_id=_first_id(hf.get("bos_token_id")),
        eos_token_id=_first_id(hf.get("eos_token_id")),
        pad_token_id=_first_id(hf.get("pad_token_id")),
    )
    return config


def build_standard_model(config: dict[str, Any]) -> StandardModel:
    """A StandardModel from a config dict, with one-line errors for inconsistent values."""
    return StandardModel(model_config(config))


def load_hf_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                       dtype: torch.dtype | None = None) -> StandardModel:
    """A `StandardModel` from a Hugging Face `Qwen2ForCausalLM` / `LlamaForCausalLM` directory
    (`config.json` + `model.safetensors`, or shards + `model.safetensors.index.json`).
    Weights are kept in fp32 unless `dtype` is given."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory", "give a Hugging Face checkpoint directory")
    config = config_from_hf(read_config(directory), str(directory / "config.json"))
    tensors = read_safetensors(directory)
    # older checkpoints carry the rotary table as a buffer; ours is computed
    tensors = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints store the head anyway
    return finish_loading(build_standard_model(config), tensors, str(directory), device, dtype)


def read_generation_eos_ids(directory: str | Path) -> list[int]:
    """End-of-sequence ids of a Hugging Face directory: `generation_config.json` first (chat
    models list their end-of-turn token there), then `config.json`."""
    directory = Path(directory)
    values: list[Any] = []
    gen = directory / "generation_config.json"
    if gen.is_file():
        try:
            values.append(json.loads(gen.read_text()).get("eos_token_id"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen}: not valid JSON ({e.msg})") from None
    values.append(read_config(directory).get("eos_token_id"))
    return eos_token_ids(*values)


# ---------------------------------------------------------------------------------------------
# Export


def hf_config(model: DynModel) -> dict[str, Any]:
    """The `config.json` of a Hugging Face Llama / Qwen2 checkpoint equal to `model`; a model
    transformers cannot represent exactly is an error."""
    c = model.config
    if getattr(model, "architecture", None) != "standard":
        raise CheckpointError(f"cannot export a '{getattr(model, 'architecture', type(model).__name__)}' model "
                              "to Hugging Face", "only the standard (dense Llama / Qwen2) architecture has an "
                              "equivalent in transformers")
    family = c.family
    if family == "qwen2" and not c.attention_bias:
        raise CheckpointError("cannot export as Qwen2: Qwen2 has q/k/v biases but this model has none",
                              "set model.family=llama for a bias-free model")
    if family == "llama" and c.attention_bias:
        raise CheckpointError("cannot export as Llama: the model has q/k/v biases, which Llama only has "
                              "together with an o_proj bias", "set model.family=qwen2")
    if family == "llama" and c.sliding_window is not None:
        raise CheckpointError("cannot export as Llama: Llama has no sliding-window attention",
                              "set model.family=qwen2")
    dtype = next(model.parameters()).dtype
    cfg: dict[str, Any] = {
        "architectures": [FAMILY_CLASS[family]],
        "model_type": family,
        "hidden_act": "silu",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        # both spellings: `rope_theta` for transformers 4, `rope_parameters` for transformers 5
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": c.tie_word_embeddings,
        "initializer_range": c.initializer_range,
        "attention_dropout": 0.0,
        "use_cache": True,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if family == "llama":
        cfg.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        layers = list(range(c.num_layers)) if c.sliding_window_layers is None else sorted(c.sliding_window_layers)
        sliding = c.sliding_window is not None and bool(layers)
        cfg.update(
            use_sliding_window=sliding,
            sliding_window=c.sliding_window if sliding else None,
            max_window_layers=layers[0] if sliding else c.num_layers,
            layer_types=["sliding_attention" if sliding and i in layers else "full_attention"
                         for i in range(c.num_layers)],
        )
    return cfg


def export_hf_checkpoint(model: DynModel, directory: str | Path, tokenizer: Any = None,
                         eos_ids: list[int] | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (`config.json`, `model.safetensors`,
    `generation_config.json`, and the tokenizer's files when given) that
    `transformers.AutoModelForCausalLM.from_pretrained` loads. Atomic: nothing is left half-written."""
    directory = Path(directory)
    cfg = hf_config(model)
    eos = eos_ids or eos_token_ids(model.config.eos_token_id, getattr(tokenizer, "eos_ids", None))
    generation = {"bos_token_id": model.config.bos_token_id,
                  "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                  "pad_token_id": model.config.pad_token_id}
    with atomic_directory(directory) as tmp:
        # lm_head is left out when tied, as transformers does: it re-ties from the config
        write_safetensors(model_state_dict(model), tmp)  # sharded with an index when large
        (tmp / "config.json").write_text(json_text(cfg))
        (tmp / "generation_config.json").write_text(json_text(generation))
        if tokenizer is not None:
            tokenizer.save(tmp)
    return directory
