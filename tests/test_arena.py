"""The arena harness: a tiny tier with two architectures on a synthetic corpus (the real
trainer and evaluator), budgets -> step counts, resume, the partial report after Ctrl-C, the
report's schema, and the CLI's errors. The quick tier itself runs in the `slow` test."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from dynlm.cli import main
from dynlm.errors import ConfigError, OutputExistsError
from dynlm.train import arena
from dynlm.train.arena import ArchInfo, ArenaTier, Budget, Settings, parse_budget, plan_arms, run_arena

WORDS = ["the", "king", "queen", "lord", "shall", "not", "be", "or", "to", "love", "night", "day", "sweet", "death",
         "speak", "hear", "thou", "thee", "my", "good", "noble", "heart", "fair", "blood", "come", "go", "away"]

ARM_KEYS = {"id", "status", "budget", "budget_kind", "arch", "seed", "steps_of", "preset", "planned_steps", "steps",
            "tokens", "params", "flops_per_token", "train_flops", "train_seconds", "cpu_seconds", "wall_seconds",
            "train_tokens_per_s", "train_bytes_per_s", "mfu", "peak_memory_bytes", "config_sha256", "spec_sha256",
            "curve", "val", "test"}
REPORT_KEYS = {"schema", "tier", "tier_config", "tier_sha256", "status", "arms_planned", "arms_finished",
               "resume_command", "command", "machine", "torch", "commit", "started", "updated", "data", "budgets",
               "seeds", "dense", "param_tolerance", "decode", "architectures", "plan", "arms", "summary", "verdicts",
               "recall_note", "plots"}


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arena-corpus")
    rng = random.Random(0)
    for i in range(8):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(rng.randint(40, 70))]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_tier(corpus_dir: Path, **changes) -> dict:
    tier = {
        "name": "tiny", "preset_suffix": "tiny", "budgets": ["tokens=384"], "seeds": [0],
        "run": {"model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
                          "intermediate_size": 64},
                "data": {"corpus": str(corpus_dir), "tokenizer": "bytes", "seq_len": 32},
                "train": {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "log_every": 1,
                          "eval_every": 0, "eval_bytes": 512, "eval_batch_size": 4, "save_every": 100, "keep_last": 1,
                          "device": "cpu"}},
        "eval_bytes": 1024, "decode_contexts": [24, 4096], "decode_batch": 2, "decode_tokens": 4,
        "calibration_steps": 1, "recall": {"lengths": [96, 2048], "depths": [0.5], "samples": 1},
    }
    tier.update(changes)
    return tier


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus_dir):
    """One finished tiny arena (standard + mod, 3 steps each) to copy from."""
    out = tmp_path_factory.mktemp("arena") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DYNLM_CACHE", str(tmp_path_factory.getbasetemp() / "dynlm-cache"))
        report = run_arena(tiny_tier(corpus_dir), out, archs=["standard", "mod"], progress=False)
    return out, report


def copy_of(finished, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(finished[0], target, symlinks=True)
    return target


def test_tiny_arena_trains_scores_and_reports(finished):
    out, report = finished
    assert report["status"] == "complete"
    assert set(report) >= REPORT_KEYS and report["schema"] == arena.SCHEMA
    assert [a["id"] for a in report["arms"]] == ["tokens-standard-s0", "tokens-mod-s0"]
    for arm in report["arms"]:
        assert set(arm) >= ARM_KEYS
        assert arm["status"] == "finished" and arm["steps"] == 3 and arm["tokens"] == 384  # 384 / (4 x 32)
        assert math.isfinite(arm["val"]["bpb"]) and math.isfinite(arm["test"]["bpb"])
        assert arm["val"]["num_bytes"] == arm["val"]["num_bytes"] > 0
        assert [p[0] for p in arm["curve"]] == [128, 256, 384]
        assert (out / "arms" / f"{arm['id']}.json").is_file()
    standard, mod = report["arms"]
    assert "val_topk" not in standard and "routing" not in standard
    # the routed model: scored with the causal router and with top-k, its routing against the baseline
    assert math.isfinite(mod["val_topk"]["bpb"])
    routing = mod["routing"]
    assert routing["capacity"] == pytest.approx(4 / 32)  # k = floor(0.125 x 32) of 32 tokens
    assert routing["never_route_agreement"] == pytest.approx(1 - routing["capacity"])
    assert 0.0 <= routing["causal_share"] <= 1.0 and 0.0 <= routing["causal_agreement"] <= 1.0
    # decoding: measured where the positions allow, the reason where they do not
    for arm in report["arms"]:
        short, long = arm["decode"]
        assert short["context"] == 24 and short["batch"] == 2 and short["decode_tokens_per_s"] > 0
        assert long == {"context": 4096, "skipped": "beyond the model's 1024 positions"}
    architectures = report["architectures"]
    assert architectures["mod"]["within_tolerance"] and architectures["standard"]["param_delta"] == 0
    assert set(report["verdicts"]) == {"standard", "mod"} and "val" in report["verdicts"]["mod"]
    # the recall grid from the one recall evaluator: measured where the positions allow
    for arm in report["arms"]:
        grid = arm["recall"]
        assert grid["lengths"] == [96, 2048] and grid["depths"] == [0.5]
        assert grid["accuracy"][0][0] in (0.0, 1.0) and grid["accuracy"][1] == [None]
    md = (out / "report.md").read_text()
    assert "Partial report" not in md and "| mod |" in md and "not measured: beyond the model's 1024 positions" in md
    assert "| 96 | " in md and "| 2048 | not measured |" in md
    json.loads((out / "report.json").read_text())


def test_resume_skips_finished_arms(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    mod_result = json.loads((out / "arms" / "tokens-mod-s0.json").read_text())
    (out / "arms" / "tokens-mod-s0.json").unlink()  # as if the run stopped before mod finished
    ran = []

    def recorded(arm, *args, **kwargs):
        ran.append(arm.id)
        return mod_result

    monkeypatch.setattr(arena, "run_arm", recorded)
    report = run_arena(None, out, resume=True, progress=False)
    assert ran == ["tokens-mod-s0"]
    assert report["status"] == "complete" and report["arms_finished"] == 2
    ran.clear()
    run_arena(None, out, resume=True, progress=False)
    assert ran == []


def test_ctrl_c_leaves_a_readable_partial_report(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    (out / "arms" / "tokens-mod-s0.json").unlink()

    def interrupted(arm, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(arena, "run_arm", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_arena(None, out, resume=True, progress=False)
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "interrupted" and report["arms_finished"] == 1 and report["arms_planned"] == 2
    assert report["machine"]["interrupted_arm"] == "tokens-mod-s0"
    assert [a["id"] for a in report["arms"]] == ["tokens-standard-s0"]
    md = (out / "report.md").read_text()
    assert "**Partial report** (interrupted): 1 of 2 arms finished" in md
    assert f"dynlm arena tiny --resume {out}" in md
    assert (out / "loss_vs_tokens.png").is_file()


def test_an_arm_that_fails_is_recorded_and_the_others_go_on(finished, tmp_path, monkeypatch):
    out = copy_of(finished, tmp_path)
    (out / "arms" / "tokens-mod-s0.json").unlink()

    def broken(arm, *args, **kwargs):
        raise RuntimeError("shape mismatch in the new architecture\nsecond line")

    monkeypatch.setattr(arena, "run_arm", broken)
    report = run_arena(None, out, resume=True, progress=False)
    assert report["status"] == "complete with failed arms"
    failed = [a for a in report["arms"] if a["status"] == "failed"]
    assert [a["id"] for a in failed] == ["tokens-mod-s0"]
    assert failed[0]["error"] == "RuntimeError: shape mismatch in the new architecture"
    assert "## Failed arms" in (out / "report.md").read_text()


def test_output_folder_and_resume_mismatches_are_refused(finished, tmp_path, corpus_dir):
    out = copy_of(finished, tmp_path)
    with pytest.raises(OutputExistsError):
        run_arena(tiny_tier(corpus_dir), out, archs=["standard"], progress=False)
    with pytest.raises(ConfigError, match="ran tier 'tiny', not 'quick'"):
        run_arena("quick", out, resume=True, progress=False)
    # the same arm ids with another shared config: not silently mixed with the old results
    with pytest.raises(ConfigError, match="trained with other settings"):
        run_arena(None, out, resume=True, progress=False, run_overrides=["train.lr=1e-3"])


def test_missing_preset_is_a_stated_skip(finished, tmp_path, monkeypatch, corpus_dir):
    presets = [p for p in arena.list_model_presets() if p != "dtf-tiny"]
    monkeypatch.setattr(arena, "list_model_presets", lambda: presets)
    settings = Settings("tiny", {}, ["tokens=384"], [0], ["standard", "dtf"], [])
    tier = ArenaTier(**{k: v for k, v in tiny_tier(corpus_dir).items() if k != "name"})
    infos = arena.describe_architectures(settings, tier, {})
    assert infos["dtf"].skip == "no model preset 'dtf-tiny' for this tier"
    assert infos["standard"].skip is None and infos["standard"].params > 0
    verdict = arena.verdicts({}, infos, [], "standard")["dtf"]
    assert verdict == "Not in this arena: no model preset 'dtf-tiny' for this tier."


def test_budgets_become_step_counts():
    infos = {"standard": ArchInfo("standard", "standard-x", params=100, flops_per_token=1000.0),
             "mod": ArchInfo("mod", "mod-x", params=101, flops_per_token=500.0, routed=True, capacity=0.125)}
    tier = ArenaTier(seeds=[0, 1], dense_at_routed_steps=["flops", "seconds"])
    settings = Settings("x", {}, ["tokens=2500", "flops=1e7", "seconds=3"], [0, 1], None, [])
    times = {"standard": 0.2, "mod": 0.1}
    arms = plan_arms(settings, tier, infos, tokens_per_step=100, step_seconds=times.__getitem__)
    steps = {a.id: a.steps for a in arms}
    assert steps["tokens-standard-s0"] == steps["tokens-mod-s0"] == 25  # ceil(2500 / 100)
    assert steps["flops-standard-s1"] == 100 and steps["flops-mod-s1"] == 200  # 1e7 / (FLOPs/token x 100)
    assert steps["flops-standard-at-mod-steps-s1"] == 200
    assert steps["seconds-standard-s0"] == 15 and steps["seconds-mod-s0"] == 30
    assert steps["seconds-standard-at-mod-steps-s0"] == 30
    assert not any(a.id.startswith("tokens-standard-at") for a in arms)  # equal steps already
    assert len({a.spec_sha256 for a in arms}) == len(arms)
    with pytest.raises(ConfigError, match="less than one training step of 'standard'"):
        plan_arms(Settings("x", {}, ["flops=10"], [0], None, []), tier, infos, 100, times.__getitem__)


def test_the_wall_clock_budget_stops_the_trainer_at_its_last_step():
    clock = arena._BudgetClock(2.0)
    trainer = SimpleNamespace(elapsed=1.0, step=5, cfg=SimpleNamespace(max_steps=50))
    clock("step", trainer, {})
    assert trainer.cfg.max_steps == 50 and clock.stopped_at is None
    trainer.elapsed, trainer.step = 2.5, 7
    clock("step", trainer, {})
    assert trainer.cfg.max_steps == 7 and clock.stopped_at == 7


@pytest.mark.parametrize("text,problem", [("flops", "bad budget"), ("steps=10", "bad budget"),
                                          ("tokens=abc", "is not a number"), ("seconds=0", "must be > 0")])
def test_bad_budgets(text, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_budget(text)


def test_parse_budget():
    assert parse_budget("flops=2e17") == Budget("flops", 2e17) and parse_budget("flops=2e17").text == "flops=2e+17"


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["arena", "nope", "--out", str(tmp_path / "a")]) == 2
    assert "unknown arena tier 'nope'" in capsys.readouterr().err
    assert main(["arena", "quick", "--budget", "watts=3", "--out", str(tmp_path / "b")]) == 2
    assert "bad budget 'watts=3'" in capsys.readouterr().err
    assert main(["arena", "--resume", str(tmp_path / "c"), "--force"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["arena", "quick", "--archs", "standard,nonesuch", "--out", str(tmp_path / "d")]) == 2
    assert "unknown architecture 'nonesuch'" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_tier(tmp_path, monkeypatch):
    """The quickstart's arena on the real corpus (fetched once into the test cache)."""
    report = run_arena("quick", tmp_path / "quick", progress=False)
    assert report["status"] == "complete"
    active = [a for a, info in report["architectures"].items() if not info["skip"]]
    assert {"standard", "mod", "dtf"} <= set(active)
    for budget in report["budgets"]:
        for arch in active:
            assert report["summary"][parse_budget(budget).text][arch]["val_bpb"]["n"] == 3


def test_cli_resume_of_a_finished_arena_prints_the_table(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert main(["arena", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| architecture | val bpb, tokens=384 |" in printed
    assert f"report: {out / 'report.md'}" in printed
    mod = json.loads((out / "report.json").read_text())["summary"]["tokens=384"]["mod"]["val_bpb"]
    assert f"| mod | {mod['mean']:.4f} (n=1) |" in printed
