"""The config system: presets, overrides, one-line errors naming the key."""

from __future__ import annotations

import pytest

import dynlm
from dynlm.config import model_config, parse_overrides
from dynlm.errors import ConfigError


def test_presets_build_with_overrides():
    m = dynlm.build_model("standard-tiny", vocab_size=123, num_layers=3)
    assert m.config.vocab_size == 123 and len(m.model.layers) == 3


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "smollm2-135m", "gpt2-small-like"])
def test_real_presets_have_the_published_shapes(preset):
    cfg = model_config(preset)
    expected = {"qwen2.5-0.5b": (896, 24, 14, 2, 4864, 151936, True),
                "smollm2-135m": (576, 30, 9, 3, 1536, 49152, False),
                "gpt2-small-like": (768, 12, 12, 12, 2048, 50304, False)}[preset]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.attention_bias) == expected


def test_gpt2_small_like_is_about_124m_params():
    with __import__("torch").device("meta"):
        m = dynlm.build_model("gpt2-small-like")
    assert 115e6 < m.num_parameters() < 135e6


def test_unknown_key_names_nearest():
    with pytest.raises(ConfigError, match="hidden_sise.*hidden_size"):
        model_config("standard-tiny", hidden_sise=64)


def test_bad_value_names_key():
    with pytest.raises(ConfigError, match="num_layers"):
        model_config("standard-tiny", num_layers="many")


def test_semantic_validation():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        model_config("standard-tiny", num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="hidden_size"):
        model_config("standard-tiny", hidden_size=0)


def test_unknown_preset_and_type():
    with pytest.raises(ConfigError, match="standard-tiny"):
        model_config("standard-tinny")
    with pytest.raises(ConfigError, match="unknown model type"):
        model_config({"type": "transformerxl"})


def test_overrides_parse_yaml_values():
    assert parse_overrides(["model.num_layers=8", "train.lr=1e-3", "x.flag=true"]) == {
        "model": {"num_layers": 8}, "train": {"lr": 1e-3}, "x": {"flag": True}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["model.num_layers"])


def test_run_name_names_the_architecture_chosen_by_an_override():
    """`dynlm train quick model.type=thl` writes runs/quick-thl (the docs' path), so runs of several
    architectures from one preset do not meet each other's folder; an explicit run_name wins."""
    from dynlm.train.config import load_run_config

    assert load_run_config("quick").run_name == "quick"
    assert load_run_config("quick", ["model.type=standard"]).run_name == "quick"
    assert load_run_config("quick", ["model.type=mod"]).run_name == "quick-mod"
    assert load_run_config("quick", ["model.type=thl"]).run_name == "quick-thl"
    assert load_run_config("quick", ["model.type=thl", "run_name=mine"]).run_name == "mine"
