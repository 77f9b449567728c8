"""The checkpoint directory: round trips, sharding, and clear errors for broken directories."""

from __future__ import annotations

import json
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
