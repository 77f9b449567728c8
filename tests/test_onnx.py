"""ONNX export of THL's decode step: onnxruntime matches torch over 32 decoded tokens; the
architectures without a tensor-only state and bad output paths are one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dynlm
from dynlm.interop.onnx import STATE_NAMES, ExportError, export_onnx

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


def test_unexportable_architecture_is_a_clear_error(tmp_path: Path):
    with pytest.raises(ExportError, match="cannot export architecture 'standard'"):
        export_onnx(dynlm.build_model("standard-tiny", vocab_size=97), tmp_path / "x.onnx")
    assert not list(tmp_path.iterdir())


def test_cli_bad_output_folder_exits_2(tmp_path: Path):
    dynlm.build_model("thl-tiny", vocab_size=97).save_pretrained(tmp_path / "ckpt")
    result = subprocess.run([sys.executable, "-m", "dynlm", "export", "onnx", str(tmp_path / "ckpt"),
                             str(tmp_path / "missing" / "thl.onnx")], capture_output=True, text=True)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "missing" in result.stderr
