"""analyze(): measured statistics checked on models built to have known answers; and the
neuron search finds a neuron planted to fire on a concept."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import dynlm
from dynlm.data.tokenizers import load_tokenizer
from dynlm.weights import analyze, find_neurons_for
from dynlm.weights.analysis import to_markdown, write_report
from dynlm.weights.neurons import to_markdown as neurons_markdown

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer. " * 4


@pytest.fixture
def model():
    torch.manual_seed(0)
    return dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=2, num_heads=4,
                             num_kv_heads=2, intermediate_size=64).eval()


def test_weight_statistics_match_constructed_values(model):
    with torch.no_grad():
        u, _ = torch.linalg.qr(torch.randn(64, 2))
        v, _ = torch.linalg.qr(torch.randn(32, 2))
        model.model.layers[0].mlp.up_proj.weight.copy_(3.0 * u @ v.T)  # two equal singular values (3, 3)
        model.model.layers[1].mlp.gate_proj.weight[:32].zero_()  # half exactly zero
        model.model.layers[1].self_attn.k_proj.weight.copy_(model.model.layers[0].self_attn.k_proj.weight)
    report = analyze(model, rank_cap=64)
    by_name = {t["name"]: t for t in report["tensors"]}
    up = by_name["model.layers.0.mlp.up_proj.weight"]
    assert up["effective_rank"] == pytest.approx(2.0, abs=1e-3) and up["spectral_norm"] == pytest.approx(3.0, 1e-4)
    assert by_name["model.layers.1.mlp.gate_proj.weight"]["near_zero"] >= 0.5
    sims = {(s["kind"], tuple(s["layers"])): s["cosine"] for s in report["weight_similarity"]}
    assert sims[("model.layers.{i}.self_attn.k_proj.weight", (0, 1))] == pytest.approx(1.0)
    assert abs(sims[("model.layers.{i}.mlp.down_proj.weight", (0, 1))]) < 0.2  # independent random matrices
    assert [layer["layer"] for layer in report["layers"]] == [0, 1]
    assert report["model"]["parameters"] == model.num_parameters()


def test_rank_cap_skips_large_matrices(model):
    report = analyze(model, rank_cap=16)
    assert all("effective_rank" not in t for t in report["tensors"] if min(t["shape"]) > 16)


def test_activation_statistics(model, tmp_path):
    with torch.no_grad():
        model.model.layers[1].self_attn.q_proj.weight.zero_()  # q = 0: uniform attention in layer 1
    report = analyze(model, texts=[TEXT], tokenizer=load_tokenizer("bytes"), seq_len=64, max_tokens=256)
    act = report["activations"]
    assert act["tokens"] == 256 and act["sequences"] == 4
    assert [m["module"] for m in act["mlp"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(0 <= m["sparsity"] <= 1 and 0 <= m["dead_neurons"] <= 1 for m in act["mlp"])
    layers = {a["module"]: a for a in act["attention"]}
    uniform = layers["model.layers.1.self_attn"]
    assert uniform["normalized_per_head"] == pytest.approx([1.0] * 4, abs=1e-4)
    other = layers["model.layers.0.self_attn"]
    assert len(other["entropy_per_head"]) == 4 and all(0 < e <= math.log(64) for e in other["entropy_per_head"])
    assert len(act["hidden_similarity"]) == 1
    # every sentence of the findings quotes a number
    assert report["findings"] and all(re.search(r"\d", sentence) for sentence in report["findings"])
    files = write_report(report, tmp_path / "report", plots=True)
    assert json.loads((tmp_path / "report" / "report.json").read_text())["activations"]["tokens"] == 256
    markdown = to_markdown(report)
    assert "| module | queries | mean_entropy" in markdown and "## Findings" in markdown
    assert {f.name for f in files} >= {"report.json", "report.md"}


def test_find_neurons_ranks_a_planted_neuron_first(model):
    tokenizer = load_tokenizer("bytes")
    c = ord("c")
    with torch.no_grad():
        direction = torch.zeros(32)
        direction[7] = 1.0
        model.model.embed_tokens.weight[:, 7] = 0.0
        model.model.embed_tokens.weight[c] = 0.0
        model.model.embed_tokens.weight[c, 7] = 1.0  # 'c' points along one axis that no other byte uses
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[11] = 4.0 * direction
        mlp.up_proj.weight[11] = 4.0 * direction  # neuron 11 of layer 0 fires on 'c'
    examples = ["the cat sat on the mat", "a cat is here", "my cat sleeps"]
    background = ["the dog runs fast and jumps over the big log in the sun"]
    result = find_neurons_for(model, tokenizer, examples, background, concept="cat", top=5)
    best = result["neurons"][0]
    assert (best["module"], best["neuron"]) == ("model.layers.0.mlp", 11)
    assert best["above_background_p99"] > 0.3 and best["score"] > 10
    assert "[c]" in best["top_contexts"][0]["context"] and best["top_contexts"][0]["source"] == "concept"
    assert result["concept_tokens"] == 9  # c, a, t in three examples
    assert "heuristic" in result["method"]
    assert "| 1 | model.layers.0.mlp | 11 |" in neurons_markdown(result)
    # without background text, the examples' other tokens are the background
    alone = find_neurons_for(model, tokenizer, examples, concept="cat", top=3)
    assert (alone["neurons"][0]["module"], alone["neurons"][0]["neuron"]) == ("model.layers.0.mlp", 11)
