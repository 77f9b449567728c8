"""Curriculum: stages switch corpus and plasticity at the planned steps, the checkpoint records the
alpha in force, resume is exact across a stage boundary, and mistakes are one-line errors."""

from __future__ import annotations

import json
import random

import pytest

import dynlm
from dynlm.errors import ConfigError, DataError
from dynlm.train import train
from dynlm.train.config import CurriculumStage, load_run_config
from dynlm.train.curriculum import plan_stages
from dynlm.train.trainer import read_metrics


def write_corpus(folder, words, seed):
    folder.mkdir()
    rng = random.Random(seed)
    for i in range(5):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 10))) for _ in range(80)]
        (folder / f"doc{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    short = write_corpus(root / "short", ["ev", "su", "göz", "el", "yol"], 0)
    long = write_corpus(root / "long", ["cumhuriyet", "milletimiz", "büyük", "istikbal", "çalışmak"], 1)
    return short, long


def curriculum_run(tmp_path, corpora, name="run"):
    short, long = corpora
    return {"model": {"preset": "agiformer-tiny"},
            "data": {"corpus": str(long), "tokenizer": "bytes", "seq_len": 32,
                     "curriculum": [{"corpus": str(short), "steps": 3, "plasticity": 0.1},
                                    {"corpus": str(long), "plasticity": 0.5}]},
            "train": {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "log_every": 1,
                      "eval_every": 0, "save_every": 2, "eval_bytes": 512, "eval_batch_size": 2, "progress": False,
                      "final_eval": [], "sample_prompt": None, "plot": False, "device": "cpu", "keep_last": 3},
            "out_dir": str(tmp_path / "runs"), "run_name": name}


def test_plan_stages_by_steps_and_fraction():
    stages = [CurriculumStage("a", fraction=0.2, plasticity=0.1), CurriculumStage("b", steps=30),
              CurriculumStage("c", steps=1)]
    assert [(p.start, p.end) for p in plan_stages(stages, 100)] == [(0, 20), (20, 50), (50, 100)]  # last runs on


@pytest.mark.slow
def test_stages_switch_plasticity_and_resume_exactly(tmp_path, corpora):
    reference = train(curriculum_run(tmp_path, corpora, "reference"))
    records = [r for r in read_metrics(reference) if r["event"] == "train"]
    assert [r["model/plasticity"] for r in records] == pytest.approx([0.1, 0.1, 0.1, 0.5, 0.5, 0.5])
    assert dynlm.load_pretrained(reference / "step-000002").plasticity == 0.1
    assert json.loads((reference / "last" / "config.json").read_text())["dynlm"]["config"]["plasticity"] == 0.5

    def interrupt(event, trainer, info):
        if event == "step" and info["step"] == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(curriculum_run(tmp_path, corpora, "interrupted"), callbacks=[interrupt])
    resumed = train(resume=tmp_path / "runs" / "interrupted")  # from step 4, inside the second stage
    losses = [r["loss"] for r in read_metrics(resumed) if r["event"] == "train"]
    assert losses == [r["loss"] for r in records]


def test_curriculum_mistakes_are_one_line_errors(tmp_path, corpora):
    config = curriculum_run(tmp_path, corpora)
    bad = [({"corpus": "no-such-corpus", "steps": 2}, DataError, "no-such-corpus"),
           ({"corpus": str(corpora[0]), "steps": 2, "fraction": 0.5}, ConfigError, "not both"),
           ({"corpus": str(corpora[0]), "plasticity": 0.0}, ConfigError, "plasticity")]
    for stage, error, message in bad:
        config["data"]["curriculum"] = [stage]
        with pytest.raises(error, match=message):
            load_run_config(config)
    assert not (tmp_path / "runs").exists()  # nothing written
    config["model"] = {"preset": "standard-tiny"}
    config["data"]["curriculum"] = [{"corpus": str(corpora[0]), "plasticity": 0.5}]
    with pytest.raises(ConfigError, match="has none"):
        train(config)
