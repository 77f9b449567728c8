"""The checkpoint directory: round trips, sharding, and clear errors for broken directories."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.checkpoint import INDEX_NAME, WEIGHTS_NAME, save_checkpoint
from dynlm.errors import CheckpointError


@pytest.fixture
def model():
    return dynlm.build_model("standard-tiny", vocab_size=50).eval()


def test_config_json_has_hf_fields_and_dynlm_section(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == model.config.num_layers
    assert cfg["dynlm"]["architecture"] == "standard"
    assert cfg["dynlm"]["format_version"] == 1


def test_tied_head_saved_once_and_retied(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "c" / WEIGHTS_NAME), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    loaded = dynlm.load_pretrained(tmp_path / "c")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_sharded_round_trip(model, tmp_path):
    save_checkpoint(model, tmp_path / "c", max_shard_bytes=50_000)
    assert (tmp_path / "c" / INDEX_NAME).is_file()
    assert len(list((tmp_path / "c").glob("model-*-of-*.safetensors"))) > 1
    x = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        assert torch.equal(dynlm.load_pretrained(tmp_path / "c")(x).logits, model(x).logits)


def test_missing_weights_names_the_file(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=WEIGHTS_NAME):
        dynlm.load_pretrained(tmp_path / "c")


def test_truncated_weights_names_the_file(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        dynlm.load_pretrained(tmp_path / "c")


def test_missing_shard_names_the_file(model, tmp_path):
    save_checkpoint(model, tmp_path / "c", max_shard_bytes=50_000)
    shard = sorted((tmp_path / "c").glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=shard.name):
        dynlm.load_pretrained(tmp_path / "c")


def test_mismatched_config_names_the_tensor(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dynlm"]["config"]["intermediate_size"] = 64
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp"):
        dynlm.load_pretrained(tmp_path / "c")


def test_bad_config_json(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        dynlm.load_pretrained(tmp_path / "c")


def test_unknown_format_version(model, tmp_path):
    model.save_pretrained(tmp_path / "c")
    cfg_path = tmp_path / "c" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["dynlm"]["format_version"] = 99
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format version 99"):
        dynlm.load_pretrained(tmp_path / "c")


def test_failed_save_leaves_previous_checkpoint(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "c")
    before = (tmp_path / "c" / WEIGHTS_NAME).read_bytes()

    import dynlm.models.serialization as writer

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "save_file", disk_full)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / WEIGHTS_NAME).read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left behind
    dynlm.load_pretrained(tmp_path / "c")


def test_not_a_checkpoint(tmp_path: Path):
    with pytest.raises(CheckpointError, match="no such file"):
        dynlm.load_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint"):
        dynlm.load_pretrained(tmp_path / "empty")
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError):
        dynlm.load_pretrained(tmp_path / "f.bin")


# -- a save killed at any step ------------------------------------------------------------------

# the file-system steps of a save; the child process dies just before the k-th one
_STEPS = [("os", "replace"), ("os", "rename"), ("os", "mkdir"), ("shutil", "rmtree"), ("tempfile", "mkdtemp"),
          ("dynlm.fileio", "exchange_paths"), ("dynlm.models.serialization", "save_file"),
          ("pathlib", "Path.write_text"), ("pathlib", "Path.write_bytes")]


def _count_steps(kill_at: int | None) -> list[int]:
    """Patch every step to count itself (and `os._exit` when the count reaches `kill_at`)."""
    import importlib

    count = [0]
    for module_name, attr in _STEPS:
        owner = importlib.import_module(module_name)
        if "." in attr:
            owner, attr = getattr(owner, attr.split(".")[0]), attr.split(".")[1]
        original = getattr(owner, attr)

        def step(*args, __original=original, **kwargs):
            count[0] += 1
            if count[0] == kill_at:
                os._exit(17)  # no cleanup, no finally blocks: as a power cut or SIGKILL
            return __original(*args, **kwargs)

        setattr(owner, attr, step)
    return count


def _save_in_child(model, path: Path, kill_at: int | None, exchange: bool, report: Path | None = None) -> int:
    """Save `model` to `path` in a forked child killed before step `kill_at`; the exit code
    (17: killed). Without `kill_at` the child writes its number of steps to `report`."""
    pid = os.fork()
    if pid == 0:
        try:
            import dynlm.fileio as fileio

            if not exchange:
                fileio._renameat2 = None  # the two-rename fallback
            count = _count_steps(kill_at)
            save_checkpoint(model, path)
            if report is not None:  # os.open / os.write are not among the counted steps
                fd = os.open(report, os.O_WRONLY | os.O_CREAT)
                os.write(fd, str(count[0]).encode())
                os.close(fd)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames-fallback"])
def test_a_save_killed_at_any_step_leaves_a_loadable_checkpoint(tmp_path, exchange):
    """Kill a save (os._exit in a forked child) just before each of its file-system steps in
    turn: afterwards the checkpoint always loads, and holds exactly the old or the new weights."""
    old = dynlm.build_model("standard-tiny", vocab_size=50, num_layers=1).eval()
    new = dynlm.build_model("standard-tiny", vocab_size=50, num_layers=1).eval()
    path = tmp_path / "ckpt"
    save_checkpoint(old, tmp_path / "probe")  # how many steps a whole save over a checkpoint takes
    assert _save_in_child(new, tmp_path / "probe", None, exchange, tmp_path / "steps") == 0
    steps = int((tmp_path / "steps").read_text())
    assert steps >= 5
    outcomes = set()
    for kill_at in range(1, steps + 1):
        save_checkpoint(old, path)
        assert _save_in_child(new, path, kill_at, exchange) == 17
        loaded = dynlm.load_pretrained(path)  # recovers an interrupted fallback swap
        state = loaded.state_dict()
        if all(torch.equal(state[k], v) for k, v in old.state_dict().items()):
            outcomes.add("old")
        elif all(torch.equal(state[k], v) for k, v in new.state_dict().items()):
            outcomes.add("new")
        else:
            pytest.fail(f"killed before step {kill_at}: the checkpoint holds neither the old nor the new weights")
    assert outcomes == {"old", "new"}  # the kills landed both before and after the switch
    save_checkpoint(new, path)  # the next save cleans up what the kills left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "probe", "steps"]
