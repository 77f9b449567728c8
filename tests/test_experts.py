"""Experts registry, rule and learned routers, and `dynlm experts`."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from dynlm.cli import main
from dynlm.errors import ConfigError
from dynlm.memory.embeddings import HashingEncoder
from dynlm.serve.app import create_app
from dynlm.serve.deployment import Deployment
from dynlm.serve.experts import EmbeddingRouter, ExpertSpec, Registry, Router, RuleRouter
from test_serve import LiveServer, tiny_checkpoint

BENCH = Path(__file__).parent.parent / "benchmarks" / "data" / "router"


def registry() -> Registry:
    return Registry({
        "general": ExpertSpec("general", "g/", examples=["what should I cook tonight", "tell me a fun fact"]),
        "code": ExpertSpec("code", "c/", keywords=["python", "bug"], patterns=[r"\w+\(\)"],
                           examples=["fix this python bug", "my function raises an exception"]),
        "poetry": ExpertSpec("poetry", "p/", keywords=["sonnet", "thou"],
                             examples=["write a sonnet about the sea", "compose a poem about love"]),
    }, default="general")


def test_rule_router_names_the_rules_that_fired():
    router = RuleRouter(registry())
    d = router.route("Why does foo() crash my Python script?")
    assert (d.expert, d.method) == ("code", "rule")
    assert "keyword 'python'" in d.reason and "regex" in d.reason
    assert router.route("A SONNET for thou").expert == "poetry"
    assert router.route("pythonic ideas").method == "fallback"  # whole words only
    fallback = router.route("hello there")
    assert (fallback.expert, fallback.method, fallback.reason) == ("general", "fallback", "no rule fired")


def test_learned_router_threshold_and_fallback():
    router = EmbeddingRouter(registry(), HashingEncoder(), threshold=0.3)
    assert router.route("write a sonnet about the moon").expert == "poetry"
    low = router.route("zebra quantum xylophone")
    assert (low.expert, low.method) == ("general", "fallback")
    assert "below threshold" in low.reason


def test_calibrated_threshold_uses_only_the_examples():
    router = EmbeddingRouter(registry(), HashingEncoder())
    assert 0.0 <= router.threshold <= 1.0


def test_hybrid_prefers_rules_then_learned():
    router = Router(registry(), HashingEncoder(), method="hybrid")
    assert router.route("thou art a python").method == "rule"
    assert router.route("compose a poem about the sea").method in ("learned", "fallback")


def test_registry_round_trip_and_errors(tmp_path):
    reg = registry()
    reg.save(tmp_path / "experts.yaml")
    back = Registry.load(tmp_path / "experts.yaml")
    assert back.experts == reg.experts and back.default == "general" and back.threshold is None
    (tmp_path / "bad.yaml").write_text("experts:\n  x: {path: a/, keywordz: [a]}\n")
    with pytest.raises(ConfigError, match="keywordz"):
        Registry.load(tmp_path / "bad.yaml")
    (tmp_path / "regex.yaml").write_text("experts:\n  x: {path: a/, patterns: ['(']}\n")
    with pytest.raises(ConfigError, match="regular expression"):
        Registry.load(tmp_path / "regex.yaml")
    (tmp_path / "notyaml.yaml").write_text("experts: [\n")
    with pytest.raises(ConfigError, match="YAML"):
        Registry.load(tmp_path / "notyaml.yaml")


def test_heldout_set_is_large_balanced_and_disjoint_from_examples():
    rows = [json.loads(line) for line in (BENCH / "heldout.jsonl").read_text().splitlines()]
    domains = {r["domain"] for r in rows}
    assert len(rows) >= 100 and len(domains) >= 4
    reg = Registry.load(BENCH / "experts.yaml")
    examples = {e.lower() for spec in reg.experts.values() for e in spec.examples}
    assert not examples & {r["prompt"].lower() for r in rows}
    assert domains == set(reg.experts)


def test_experts_cli(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    reg = tmp_path / "experts.yaml"
    examples = tmp_path / "ex.txt"
    examples.write_text("write a sonnet\ncompose a poem\n")
    assert main(["experts", "--registry", str(reg), "add", "general", str(ckpt), "--default"]) == 0
    assert main(["experts", "--registry", str(reg), "add", "poetry", str(ckpt), "--keywords", "thou,sonnet",
                 "--examples", str(examples)]) == 0
    capsys.readouterr()
    assert main(["experts", "--registry", str(reg), "route", "a sonnet for thee", "--method", "rules"]) == 0
    assert capsys.readouterr().out.startswith("poetry\trule")
    assert main(["experts", "--registry", str(reg), "list"]) == 0
    assert "general (default)" in capsys.readouterr().out
    # user mistakes: one line, exit 2, the registry untouched
    before = reg.read_text()
    assert main(["experts", "--registry", str(reg), "add", "poetry", str(ckpt)]) == 2
    assert main(["experts", "--registry", str(reg), "add", "x", str(tmp_path / "missing")]) == 2
    assert main(["experts", "--registry", str(reg), "remove", "nobody"]) == 2
    assert main(["experts", "--registry", str(tmp_path / "none.yaml"), "list"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("dynlm: error:") for line in err)
    assert reg.read_text() == before
    assert main(["experts", "--registry", str(reg), "remove", "poetry"]) == 0
    assert list(Registry.load(reg).experts) == ["general"]


def test_served_router_picks_and_names_the_expert(tmp_path):
    tiny_checkpoint(tmp_path / "general", seed=1)
    tiny_checkpoint(tmp_path / "poetry", seed=2)
    reg = registry()
    reg.experts = {"general": ExpertSpec("general", "general", examples=["what should I cook tonight"]),
                   "poetry": ExpertSpec("poetry", "poetry", keywords=["sonnet"], examples=["write a poem"])}
    reg.save(tmp_path / "experts.yaml")
    deployment = Deployment.from_registry(tmp_path / "experts.yaml", encoder=HashingEncoder())
    with LiveServer(create_app(deployment)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        assert {m.id for m in client.models.list()} == {"auto", "general", "poetry"}
        routed = client.chat.completions.create(model="auto", max_tokens=3,
                                                messages=[{"role": "user", "content": "A sonnet, please"}])
        assert routed.model == "poetry" and routed.model_extra["route"] == "keyword 'sonnet'"
        fallback = client.chat.completions.create(model="auto", max_tokens=3,
                                                  messages=[{"role": "user", "content": "zzz qqq"}])
        assert fallback.model == "general"
        chosen = client.chat.completions.create(model="general", max_tokens=3,
                                                messages=[{"role": "user", "content": "A sonnet, please"}])
        assert chosen.model == "general" and chosen.model_extra["route"] == "requested"


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "experts.yaml").write_text("experts:\n  a: {path: missing/}\n")
    assert main(["serve", "--experts", str(tmp_path / "experts.yaml")]) == 2
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    ckpt = tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "bad.sqlite").write_bytes(b"garbage" * 50)
    assert main(["serve", "--model", str(ckpt), "--db", str(tmp_path / "bad.sqlite"), "--embeddings", "hashing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("dynlm: error:") for line in err), err
