"""The trainer: configs, schedules, sampler, exact resume, NaN guard, interrupted and failing
saves, broken run folders, transfer. Tiny models on a small synthetic corpus."""

from __future__ import annotations

import json
import math
import random
import shutil

import numpy as np
import pytest
import torch

import dynlm
from dynlm.errors import CheckpointError, ConfigError
from dynlm.train import TrainingError, load_run_config, train
from dynlm.train.config import CONFIG_ALIASES, TrainConfig, list_modes
from dynlm.train.data import SequenceSampler, micro_batches
from dynlm.train.optim import learning_rate, parameter_groups
from dynlm.train.trainer import TrainStep, read_metrics

WORDS = ["the", "king", "queen", "lord", "shall", "not", "be", "or", "to", "love", "night", "day", "sweet", "death",
         "speak", "hear", "thou", "thee", "my", "good", "noble", "heart", "fair", "blood", "come", "go", "away"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """Five documents of pseudo-English, 4-8 KB each (with a few non-ASCII characters)."""
    folder = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(5):
        lines = []
        for _ in range(rng.randint(60, 110)):
            line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
            lines.append(line.capitalize() + rng.choice([".", ",", "!", "? café"]))
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def tiny_run(tmp_path, corpus_dir, name="run", **train_overrides):
    train_cfg = {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "log_every": 1,
                 "eval_every": 4, "save_every": 4, "eval_bytes": 1024, "eval_batch_size": 4, "progress": False,
                 "final_eval": [], "sample_prompt": None, "plot": False, "device": "cpu", "keep_last": 2}
    train_cfg.update(train_overrides)
    return {"model": {"preset": "standard-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                      "num_kv_heads": 1, "intermediate_size": 64},
            "data": {"corpus": str(corpus_dir), "tokenizer": "bytes", "seq_len": 32},
            "train": train_cfg, "out_dir": str(tmp_path / "runs"), "run_name": name}


def train_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"]


def weights(path):
    return dynlm.load_pretrained(path).state_dict()


# ---------------------------------------------------------------------------------------------
# Config


def test_presets_and_overrides():
    assert {"quick", "scratch", "transfer"} <= set(list_modes())
    run = load_run_config("quick", ["model.num_layers=8", "train.lr=1e-3", "train.max_steps=2000"])
    assert run.mode == "quick" and run.model["num_layers"] == 8 and run.model["preset"] == "standard-quick"
    assert run.train.lr == 1e-3 and run.train.max_steps == 2000 and run.run_name == "quick"


def test_user_file_starts_from_a_preset(tmp_path):
    path = tmp_path / "my_run.yaml"
    path.write_text("preset: quick\ntrain:\n  max_steps: 7\nmodel:\n  num_layers: 3\n")
    run = load_run_config(path, ["train.batch_size=8"])
    assert run.mode == "custom" and run.run_name == "my_run"
    assert (run.train.max_steps, run.train.batch_size, run.model["num_layers"]) == (7, 8, 3)
    assert run.data.tokenizer == load_run_config("quick").data.tokenizer  # inherited


@pytest.mark.parametrize("overrides, message", [
    (["trian.lr=1"], "unknown config key 'trian'.*did you mean 'train'"),
    (["train.learning_rate=1"], "train.learning_rate"),
    (["train.schedule=cosin"], "train.schedule.*did you mean 'cosine'"),
    (["train.lr=fast"], "train.lr"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["data.tokenizer=bpe:lots"], "data.tokenizer"),
    (["model.hidden_sise=64"], "hidden_sise.*hidden_size"),
    (["train.dtype=fp8"], "train.dtype"),
    (["data.seq_len=4096"], None),  # fine until the model is known (checked against max_position_embeddings)
])
def test_config_errors_name_the_key(overrides, message):
    if message is None:
        load_run_config("quick", overrides)
        return
    with pytest.raises(ConfigError, match=message) as info:
        load_run_config("quick", overrides)
    assert "\n" not in str(info.value)


def test_transfer_needs_init_from():
    with pytest.raises(ConfigError, match="init_from"):
        load_run_config("transfer")


def test_alias_hook(monkeypatch):
    monkeypatch.setitem(CONFIG_ALIASES, "depth", "model.num_layers")
    monkeypatch.setitem(CONFIG_ALIASES, "model.size", lambda size: {"model.hidden_size": {"S": 64, "M": 128}[size]})
    run = load_run_config("quick", ["depth=3", "model.size=M"])
    assert run.model["num_layers"] == 3 and run.model["hidden_size"] == 128 and "size" not in run.model
    with pytest.raises(ConfigError, match="'depth' and 'model.num_layers' both given"):
        load_run_config("quick", ["depth=3", "model.num_layers=5"])


# ---------------------------------------------------------------------------------------------
# Optimizer and schedules


def test_schedules():
    cos = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert learning_rate(0, cos) == pytest.approx(0.1) and learning_rate(9, cos) == pytest.approx(1.0)
    assert learning_rate(10, cos) == pytest.approx(1.0) and learning_rate(60, cos) == pytest.approx(0.55)
    assert learning_rate(110, cos) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=110, schedule="wsd", decay_fraction=0.2)
    assert learning_rate(50, wsd) == 1.0 and learning_rate(87, wsd) == 1.0  # stable until step 88
    assert learning_rate(98, wsd) == pytest.approx(0.5) and learning_rate(109, wsd) == pytest.approx(0.0)
    rates = [learning_rate(s, wsd) for s in range(110)]
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = dynlm.build_model("standard-tiny", vocab_size=64, num_layers=1, attention_bias=True)
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" not in decayed  # also the tied LM head
    assert not any("norm" in n or n.endswith(".bias") for n in decayed)
    assert "model.layers.0.self_attn.q_proj.weight" in decayed and "model.layers.0.mlp.down_proj.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------
# Sampler


def _trained_parameters(fused: bool, clip: float) -> list[torch.Tensor]:
    from dynlm.config import model_config
    from dynlm.registry import get_architecture

    torch.manual_seed(0)
    config = model_config("standard-tiny", vocab_size=64, hidden_size=32, num_heads=2, num_kv_heads=2,
                          intermediate_size=64)
    model = get_architecture(config.type)[1](config)
    # a large eps makes Adam's update depend on the gradients' scale, so the clipping shows
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=0.1, fused=fused, foreach=None if fused else False)
    step = TrainStep(model, model, optimizer, torch.device("cpu"), torch.float32, clip=clip)
    assert step.skip_on_device == fused
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        out = step([torch.randint(0, config.vocab_size, (2, 12), generator=generator)])
        assert not bool(out.nonfinite)
    return [p.detach().clone() for p in model.parameters()]


def test_clipping_inside_the_fused_update_equals_clip_grad_norm():
    """The fused AdamW path clips through the optimizer's grad_scale (no extra pass over the
    gradients); the plain path calls clip_grad_norm_. Both give the same parameters."""
    for clip in (0.05, 0.0):  # 0.05 binds (the norms are ~1); 0 turns clipping off
        fused, plain = _trained_parameters(True, clip), _trained_parameters(False, clip)
        for a, b in zip(fused, plain, strict=True):
            torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    clipped = _trained_parameters(True, 0.05)
    assert any((a - b).abs().max() > 1e-4 for a, b in zip(clipped, plain, strict=True))  # the clipping mattered


def test_sampler_covers_every_token_once_per_epoch_and_resumes():
    sampler = SequenceSampler(num_tokens=1000, seq_len=11, batch_size=3, seed=5)
    epoch_starts = [sampler.batch_starts(i) for i in range(-(-sampler.windows_per_epoch // 3))]
    starts = np.concatenate(epoch_starts)[:sampler.windows_per_epoch]
    targets = np.concatenate([np.arange(s + 1, s + 11) for s in starts])
    assert len(np.unique(targets)) == len(targets)  # no target twice
    assert len(targets) >= 1000 - 2 * 10  # every target but the grid's edges
    assert all(s + 11 <= 1000 for s in starts)
    # a pure function of (seed, batch index): a fresh sampler resumed at batch 7 agrees
    first = SequenceSampler(1000, 11, 3, seed=5)
    for _ in range(7):
        first.next_batch()
    resumed = SequenceSampler(1000, 11, 3, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert np.array_equal(first.next_batch(), resumed.next_batch())
    with pytest.raises(CheckpointError, match="seq_len"):
        SequenceSampler(1000, 12, 3, seed=5).load_state_dict(first.state_dict())


def test_micro_batches_split_the_global_batch_across_ranks_and_steps():
    tokens = np.arange(500)
    starts = np.arange(0, 8 * 20, 20)
    one = micro_batches(tokens, starts, 10, rank=0, world_size=1, grad_accum=2)
    two = [micro_batches(tokens, starts, 10, rank=r, world_size=2, grad_accum=2) for r in range(2)]
    rows = lambda batches: sorted(tuple(row.tolist()) for b in batches for row in b)  # noqa: E731
    assert rows(one) == rows(two[0] + two[1])
    assert one[0].shape == (4, 10) and two[1][0].shape == (2, 10) and one[0].dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Runs


def test_run_folder_contents(tmp_path, corpus_dir):
    cfg = tiny_run(tmp_path, corpus_dir, final_eval=["val", "test"], sample_prompt="The", sample_tokens=8, plot=True)
    run_dir = train(cfg)
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "eval.json", "best", "last", "step-000004", "step-000008"} <= names
    assert "loss.png" in names  # matplotlib is a dev dependency
    saved = load_run_config(run_dir / "config.yaml")
    assert saved.model["vocab_size"] == 320  # 258 byte ids rounded up to a multiple of 64
    report = json.loads((run_dir / "eval.json").read_text())
    for split in ("val", "test"):
        result = report["evaluation"][split]
        assert result["bpb"] == pytest.approx(result["loss_nats"] / math.log(2))  # a byte model
        assert result["num_bytes"] > 0 and result["bpb"] < 8
    assert report["sample"].startswith("The")
    last = json.loads((run_dir / "last" / "training.json").read_text())
    assert last["step"] == 8 and last["seq_len"] == 32
    losses = train_losses(run_dir)
    assert len(losses) == 8 and losses[-1] < losses[0]
    model = dynlm.load_pretrained(run_dir / "best")
    assert model.config.hidden_size == 32


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_exact_resume_after_ctrl_c(tmp_path, corpus_dir, capsys, grad_accum):
    reference = train(tiny_run(tmp_path, corpus_dir, "reference", grad_accum=grad_accum))

    def interrupt(event, trainer, info):
        if event == "step" and info["step"] == 6:
            raise KeyboardInterrupt

    interrupted_cfg = tiny_run(tmp_path, corpus_dir, "interrupted", grad_accum=grad_accum)
    with pytest.raises(KeyboardInterrupt):
        train(interrupted_cfg, callbacks=[interrupt])
    run_dir = tmp_path / "runs" / "interrupted"
    message = capsys.readouterr().err
    assert "interrupted at step 6" in message and "step-000004" in message and "--resume" in message
    # the last good checkpoint is intact and loadable
    assert json.loads((run_dir / "last" / "training.json").read_text())["step"] == 4
    dynlm.load_pretrained(run_dir / "last")

    train(resume=run_dir)
    assert train_losses(run_dir) == train_losses(reference)  # bit for bit
    evals = lambda d: [r["val_bpb"] for r in read_metrics(d) if r["event"] == "eval"]  # noqa: E731
    assert evals(run_dir) == evals(reference)
    a, b = weights(reference / "last"), weights(run_dir / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_can_extend_the_run(tmp_path, corpus_dir):
    run_dir = train(tiny_run(tmp_path, corpus_dir, max_steps=4))
    train(overrides=["train.max_steps=6"], resume=run_dir)
    assert [r["step"] for r in read_metrics(run_dir) if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert load_run_config(run_dir / "config.yaml").train.max_steps == 6


def test_failing_checkpoint_write_keeps_the_previous_one(tmp_path, corpus_dir, monkeypatch):
    from dynlm.train import checkpointing

    real_save_file = checkpointing.save_file
    calls = {"n": 0}

    def flaky_save_file(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # the second trainer save: disk full halfway through
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpointing, "save_file", flaky_save_file)
    with pytest.raises(TrainingError, match="No space left on device.*step-000004.*intact"):
        train(tiny_run(tmp_path, corpus_dir))
    run_dir = tmp_path / "runs" / "run"
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith((".", "step"))) == ["step-000004"]
    assert json.loads((run_dir / "last" / "training.json").read_text())["step"] == 4
    dynlm.load_pretrained(run_dir / "last")
    monkeypatch.setattr(checkpointing, "save_file", real_save_file)
    train(resume=run_dir)
    assert json.loads((run_dir / "last" / "training.json").read_text())["step"] == 8


def test_broken_and_missing_run_folders(tmp_path, corpus_dir):
    with pytest.raises(CheckpointError, match="not a run folder"):
        train(resume=tmp_path / "nowhere")
    run_dir = train(tiny_run(tmp_path, corpus_dir))
    # truncate the newest weights (last/ shares its files with step-000008): resume falls back to step 4
    weights_file = run_dir / "step-000008" / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:100])
    train(overrides=["train.max_steps=8"], resume=run_dir)
    steps = [r["step"] for r in read_metrics(run_dir) if r["event"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    dynlm.load_pretrained(run_dir / "last")
    # nothing resumable at all: one clear error
    for path in list(run_dir.iterdir()):
        if path.name.startswith("step-") or path.name == "last":
            shutil.rmtree(path)
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(resume=run_dir)


def test_nan_steps_are_skipped_and_counted(tmp_path, corpus_dir):
    def poison(steps):
        def callback(event, trainer, info):
            if event != "start":
                return
            forward = trainer.model.forward

            def nan_forward(*args, **kwargs):
                out = forward(*args, **kwargs)
                if trainer.step + 1 in steps and out.loss is not None:
                    out.loss = out.loss * float("nan")
                return out

            trainer.model.forward = nan_forward
        return callback

    run_dir = train(tiny_run(tmp_path, corpus_dir, "some_nan"), callbacks=[poison({3, 4})])
    records = [r for r in read_metrics(run_dir) if r["event"] == "train"]
    assert records[-1]["skipped_steps"] == 2
    assert records[2]["loss"] is None and records[4]["loss"] is not None
    model = dynlm.load_pretrained(run_dir / "last")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    with pytest.raises(TrainingError, match="3 steps in a row had a non-finite"):
        train(tiny_run(tmp_path, corpus_dir, "all_nan", max_nan_steps=3), callbacks=[poison(set(range(1, 9)))])
    assert not (tmp_path / "runs" / "all_nan" / "last").exists()  # never a NaN checkpoint


def test_transfer_copies_matching_tensors(tmp_path, corpus_dir):
    source = train(tiny_run(tmp_path, corpus_dir, "source", max_steps=2))
    cfg = tiny_run(tmp_path, corpus_dir, "target", max_steps=2)
    cfg.update({"mode": "transfer", "init_from": str(source / "last"), "model": {"num_layers": 3}})
    cfg["data"]["tokenizer"] = "init"
    target = train(cfg)
    report = json.loads((target / "transfer.json").read_text())
    assert "model.layers.1.mlp.up_proj.weight" in report["copied"] and "model.embed_tokens.weight" in report["copied"]
    assert all(name.startswith("model.layers.2.") for name in report["fresh"]) and report["fresh"]
    assert report["skipped"] == []
    assert load_run_config(target / "config.yaml").model["num_layers"] == 3


def test_every_config_field_is_documented():
    import dataclasses
    from pathlib import Path

    from dynlm.train.config import DataConfig

    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    for cls in (DataConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in doc, f"docs/training.md does not describe {cls.__name__}.{f.name}"


def test_code_form_saves_weights_as_code_with_history(tmp_path, corpus_dir):
    from dynlm.weights.lineage import CodeFormSaver
    from dynlm.weights.store import CodeCheckpoint

    with pytest.raises(ConfigError, match="code-form callback"):  # training does not import the weights layer
        train(tiny_run(tmp_path / "refused", corpus_dir, code_form="hybrid"))
    run_dir = train(tiny_run(tmp_path, corpus_dir, code_form="hybrid"), callbacks=[CodeFormSaver()])
    code = run_dir / "code"
    assert (code / "weights.py").is_file()
    cells = CodeCheckpoint(code).cells.values()
    events = [e for cell in cells for e in cell.history if e.get("event") == "trained"]
    assert events and max(e["step"] for e in events) == 8
    torch.testing.assert_close(dynlm.load_pretrained(code).state_dict()["model.norm.weight"],
                               dynlm.load_pretrained(run_dir / "last").state_dict()["model.norm.weight"])


def test_train_command_errors_are_one_line(capsys):
    from dynlm.cli import main

    assert main(["train", "quick", "trian.lr=1"]) == 2
    assert main(["train", "quick", "other.yaml"]) == 2
    assert main(["train", "--resume", "runs/x", "quick"]) == 2
    assert main(["train", "no_such_preset"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("dynlm: error:") for line in err)
    assert "did you mean 'train'" in err[0] and "more than one config" in err[1] and "quick" in err[3]
