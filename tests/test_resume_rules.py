"""What a resume may and may not assume: the data position belongs to one corpus, `best/` can be
newer than the checkpoint resumed from, and RNG states belong to one number of processes."""

from __future__ import annotations

import json
import shutil

import pytest

from dynlm.errors import CheckpointError
from dynlm.train import train
from dynlm.train.data import SequenceSampler, token_fingerprint
from test_train import tiny_run

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.\n" * 60


def run_config(tmp_path, corpus):
    """test_train's tiny run, with its own token cache (copied along with the run folder)."""
    config = tiny_run(tmp_path, corpus)
    config["data"]["cache_dir"] = str(tmp_path / "cache")
    return config


# each test below trains (or resumes) a tiny run: ~5 s apiece on one core
SLOW = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of 8 steps with checkpoints at steps 4 and 8, and its corpus folder."""
    root = tmp_path_factory.mktemp("resume")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(TEXT.replace("question", f"question {i}"))
    return root, corpus, train(run_config(root, corpus))


def copy_run(finished_run, tmp_path):
    root, corpus, run_dir = finished_run
    shutil.copytree(run_dir, tmp_path / "run")
    shutil.copytree(corpus, tmp_path / "corpus")
    shutil.copytree(root / "cache", tmp_path / "cache")
    return tmp_path / "run", tmp_path / "corpus"


def rewrite_config(run_dir, tmp_path, corpus):
    """The copied run folder's config.yaml points at the copied corpus and cache."""
    text = (run_dir / "config.yaml").read_text()
    lines = []
    for line in text.splitlines():
        key = line.strip().split(":", 1)[0]
        if key == "corpus":
            line = line.split(":", 1)[0] + f": {corpus}"
        elif key == "cache_dir":
            line = line.split(":", 1)[0] + f": {tmp_path / 'cache'}"
        elif key == "out_dir":
            line = line.split(":", 1)[0] + f": {tmp_path}"
        lines.append(line)
    (run_dir / "config.yaml").write_text("\n".join(lines) + "\n")


@SLOW
def test_resume_refuses_a_changed_corpus(finished_run, tmp_path):
    run_dir, corpus = copy_run(finished_run, tmp_path)
    rewrite_config(run_dir, tmp_path, corpus)
    text = (corpus / "doc1.txt").read_text()
    (corpus / "doc1.txt").write_text(text.replace("nobler", "better", 1))
    assert len((corpus / "doc1.txt").read_text()) == len(text)  # the same number of tokens: only the content differs
    with pytest.raises(CheckpointError, match="training tokens changed"):
        train(overrides=["train.max_steps=12"], resume=run_dir)


def test_sampler_state_is_tied_to_its_token_stream():
    import numpy as np

    tokens = np.arange(1000, dtype=np.uint16)
    first = SequenceSampler(1000, 11, 3, seed=5, corpus_fingerprint=token_fingerprint(tokens))
    first.next_batch()
    changed = tokens.copy()
    changed[500] += 1
    assert token_fingerprint(changed) != token_fingerprint(tokens)
    other = SequenceSampler(1000, 11, 3, seed=5, corpus_fingerprint=token_fingerprint(changed))
    with pytest.raises(CheckpointError, match="training tokens changed"):
        other.load_state_dict(first.state_dict())
    same = SequenceSampler(1000, 11, 3, seed=5, corpus_fingerprint=token_fingerprint(tokens.copy()))
    same.load_state_dict(first.state_dict())
    assert same.batches_drawn == 1


@SLOW
def test_a_newer_best_survives_a_resume_from_an_older_checkpoint(finished_run, tmp_path):
    """best/ was written after the checkpoint the run resumes from (and is better than anything
    the resumed steps reach): the resumed run must not replace it with a worse model."""
    run_dir, corpus = copy_run(finished_run, tmp_path)
    rewrite_config(run_dir, tmp_path, corpus)
    shutil.rmtree(run_dir / "last")
    shutil.rmtree(run_dir / "step-000008")  # resume from step 4
    info_file = run_dir / "best" / "training.json"
    info = json.loads(info_file.read_text())
    assert info["step"] == 8  # the run improved at step 8: a resumed step 8 improves on step 4 again
    info["val"]["bpb"] = 0.001  # a best/ from after step 4 that nothing will beat
    info_file.write_text(json.dumps(info))
    weights_before = (run_dir / "best" / "model.safetensors").read_bytes()
    train(resume=run_dir)
    assert json.loads(info_file.read_text())["val"]["bpb"] == 0.001
    assert (run_dir / "best" / "model.safetensors").read_bytes() == weights_before


@SLOW
def test_resume_with_another_world_size_reseeds_by_a_stated_rule(finished_run, tmp_path, capsys):
    run_dir, corpus = copy_run(finished_run, tmp_path)
    rewrite_config(run_dir, tmp_path, corpus)
    for checkpoint in ("last", "step-000008"):
        state_file = run_dir / checkpoint / "trainer" / "state.json"
        state = json.loads(state_file.read_text())
        state["rng"] = state["rng"] * 2  # as if written by two processes
        state["world_size"] = 2
        state_file.write_text(json.dumps(state))
    train(overrides=["train.max_steps=12"], resume=run_dir)
    err = capsys.readouterr().err
    assert "written by 2 process(es), this run has 1: RNG states reseeded from (train.seed + step, rank)" in err
