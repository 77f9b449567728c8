"""Live experiments: set a tensor, a slice or an element, observe a probe, roll back bit-exactly."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.data.tokenizers import load_tokenizer
from dynlm.errors import ConfigError
from dynlm.weights import Experiment
from dynlm.weights.experiment import loss_probe, parse_index


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=2,
                             intermediate_size=64).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_set_slice_element_and_exact_rollback(model):
    before = snapshot(model)
    probe = loss_probe(load_tokenizer("bytes"), "To be, or not to be, that is the question.")
    exp = Experiment(model, probe)
    assert isinstance(exp.baseline, float)
    exp.set("model.norm.weight", 0.0, index=5)  # one element
    exp.scale("model.layers.1.mlp.down_proj.weight", 0.0, index=":, 0:16")  # a slice: 16 neurons off
    exp.add("model.layers.0.self_attn.q_proj.weight", 0.1)  # a whole tensor
    exp.set("lm_head.weight", 0.5, index=(3, 7))  # tied to the embedding: one storage
    assert model.model.norm.weight[5].item() == 0.0
    assert model.model.layers[1].mlp.down_proj.weight[:, :16].abs().sum() == 0
    assert model.model.embed_tokens.weight[3, 7].item() == 0.5
    changed = exp.observe("all changes")
    assert changed != exp.baseline
    assert set(exp.changed) >= {"model.norm.weight", "lm_head.weight", "model.embed_tokens.weight"}
    assert exp.rollback() == 4
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-exact
    log = exp.log
    assert [e["action"] for e in log] == ["set", "scale", "add", "set", "observe", "rollback"]
    assert log[0]["before"]["elements"] == 1 and log[0]["after"]["max"] == 0.0
    assert log[1]["before"]["elements"] == 32 * 16
    assert log[-1]["probe"] == exp.baseline  # the probe is back where it started
    assert all("probe" in e for e in log)


def test_context_manager_rolls_back_unless_kept(model):
    before = snapshot(model)
    with Experiment(model) as exp:
        exp.set("model.layers.0.input_layernorm.weight", 2.0)
    assert torch.equal(model.model.layers[0].input_layernorm.weight, before["model.layers.0.input_layernorm.weight"])
    with Experiment(model) as exp:
        exp.set("model.layers.0.input_layernorm.weight", 2.0)
        exp.keep()
    assert bool((model.model.layers[0].input_layernorm.weight == 2.0).all())


def test_bad_names_and_indices(model):
    exp = Experiment(model)
    with pytest.raises(ConfigError, match="no tensor 'model.norm.weigth'.*did you mean"):
        exp.set("model.norm.weigth", 1.0)
    with pytest.raises(ConfigError, match="bad index"):
        parse_index("a:b")
    assert parse_index("3, 0:8") == (3, slice(0, 8))
    assert parse_index("-1") == -1
