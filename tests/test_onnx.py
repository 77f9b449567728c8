"""ONNX export of the decode step (THL's state; the standard and MoD transformers' static KV
cache): onnxruntime matches torch over 32 decoded tokens; the architectures without a static-shape
step, a context past the exported cache and bad output paths are one-line errors."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dynlm
from dynlm.cli import main
from dynlm.errors import ContextLengthError
from dynlm.interop.onnx import STATE_NAMES, ExportError, OnnxDecoder, export_onnx

ort = pytest.importorskip("onnxruntime")  # the optional `onnx` extra


def test_thl_decode_step_matches_torch_over_32_tokens(tmp_path: Path):
    torch.manual_seed(0)
    model = dynlm.build_model("thl-tiny", vocab_size=97).eval()
    path = export_onnx(model, tmp_path / "thl.onnx")
    session = ort.InferenceSession(str(path))
    batch = 2
    state = model.init_state(batch)
    feeds = [t.numpy() for t in state.tensors()]
    tokens = torch.randint(0, 97, (batch, 32), generator=torch.Generator().manual_seed(1))
    for i in range(32):
        token = tokens[:, i:i + 1]
        outs = session.run(None, {"token": token.numpy(), **{f"in_{n}": f for n, f in zip(STATE_NAMES, feeds)}})
        with torch.no_grad():
            out = model(token, state=state)
        state = out.state
        np.testing.assert_allclose(outs[0], out.logits[:, -1].numpy(), atol=1e-4, rtol=1e-4)
        feeds = outs[1:]
    np.testing.assert_allclose(feeds[1], state.memory.numpy(), atol=1e-4, rtol=1e-4)


def _transformer(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "standard":
        return dynlm.build_model("standard-tiny", vocab_size=97)
    if kind == "sliding":  # window 8 < 32 tokens: the ring of slots wraps around
        return dynlm.build_model("standard-tiny", vocab_size=97, num_layers=3, sliding_window=8,
                                 sliding_window_layers=[0, 2])
    model = dynlm.build_model("mod-tiny", vocab_size=97)
    for layer in model.model.layers:  # routers decisive enough that some tokens skip a layer
        if layer.routed:
            torch.nn.init.normal_(layer.router.weight, std=1.0)
    return model


@pytest.mark.parametrize("kind", ["standard", "sliding", "mod"])
def test_transformer_decode_step_matches_torch_over_32_tokens(tmp_path: Path, kind: str):
    model = _transformer(kind).eval()
    path = export_onnx(model, tmp_path / "model.onnx", max_context=40)
    batch = 2
    decoder = OnnxDecoder(path, batch_size=batch)
    state = model.init_state(batch)  # the eager, growable cache: the reference
    tokens = torch.randint(0, 97, (batch, 32), generator=torch.Generator().manual_seed(1))
    routed = []
    for i in range(32):
        token = tokens[:, i:i + 1]
        logits = decoder.step(token.numpy())
        with torch.no_grad():
            expected = model(token, state=state).logits[:, -1]
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
        routed += [m for m in getattr(model, "last_routing_masks", {}).values()]
    assert decoder.position == 32
    if kind == "mod":  # skipped tokens (invalid keys) and processed ones both occurred
        assert 0 < torch.cat(routed).float().mean() < 1


def test_context_past_the_exported_cache_is_a_clear_error(tmp_path: Path):
    model = dynlm.build_model("standard-tiny", vocab_size=97)
    decoder = OnnxDecoder(export_onnx(model, tmp_path / "s.onnx", max_context=2))
    decoder.step(np.array([[1]]))
    decoder.step(np.array([[2]]))
    with pytest.raises(ContextLengthError, match="position 2 is past the exported context 2"):
        decoder.step(np.array([[3]]))
    limit = model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=f"--max-context {limit + 1} is outside 1..{limit}"):
        export_onnx(model, tmp_path / "t.onnx", max_context=limit + 1)
    assert not (tmp_path / "t.onnx").exists()


@pytest.mark.parametrize("preset,reason", [("dtf-tiny", "surprise history grows"),
                                           ("agiformer-tiny", "depends on the byte position")])
def test_unexportable_architecture_is_a_clear_error(tmp_path: Path, preset: str, reason: str):
    model = dynlm.build_model(preset, vocab_size=256)
    with pytest.raises(ExportError, match=f"cannot export architecture '{model.architecture}'.*{reason}"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_failed_export_leaves_nothing_and_the_model_unchanged(tmp_path: Path, monkeypatch):
    model = dynlm.build_model("standard-tiny", vocab_size=97).to(torch.bfloat16).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def fail(*args, **kwargs):
        raise RuntimeError("exporter failed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="exporter failed"):
        export_onnx(model, tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())
    monkeypatch.undo()
    export_onnx(model, tmp_path / "x.onnx", max_context=8)  # exported in fp32 from a copy
    assert model.training and all(v.dtype == torch.bfloat16 for v in model.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_model_past_the_protobuf_limit_is_a_clear_error(tmp_path: Path, monkeypatch):
    import dynlm.interop.onnx as exporter

    monkeypatch.setattr(exporter, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(ExportError, match="fp32 weights to one ONNX file: the format's limit is 0.00 GB"):
        export_onnx(dynlm.build_model("standard-tiny", vocab_size=97), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_exports_a_standard_checkpoint_without_changing_it(tmp_path: Path, capsys):
    dynlm.build_model("standard-tiny", vocab_size=97).save_pretrained(tmp_path / "ckpt")
    before = _digest(tmp_path / "ckpt")
    assert main(["export", "onnx", str(tmp_path / "ckpt"), str(tmp_path / "s.onnx"), "--max-context", "16"]) == 0
    assert OnnxDecoder(tmp_path / "s.onnx").max_context == 16
    assert _digest(tmp_path / "ckpt") == before


def test_cli_unexportable_checkpoint_exits_2(tmp_path: Path, capsys):
    dynlm.build_model("dtf-tiny", vocab_size=97).save_pretrained(tmp_path / "ckpt")
    assert main(["export", "onnx", str(tmp_path / "ckpt"), str(tmp_path / "d.onnx")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "'dtf'" in err
    assert not (tmp_path / "d.onnx").exists()


def test_cli_bad_output_folder_exits_2(tmp_path: Path):
    dynlm.build_model("thl-tiny", vocab_size=97).save_pretrained(tmp_path / "ckpt")
    result = subprocess.run([sys.executable, "-m", "dynlm", "export", "onnx", str(tmp_path / "ckpt"),
                             str(tmp_path / "missing" / "thl.onnx")], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr
