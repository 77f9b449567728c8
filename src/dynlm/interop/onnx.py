"""ONNX export of a recurrent model's decode step, its state as inputs and outputs:

    (token [B, 1], state tensors...) -> (logits [B, V], new state tensors...)

so that a runtime decodes token by token by feeding each step's state outputs back as the next
step's inputs (onnxruntime on CPU matches torch within 1e-4, tested). Exportable: architectures
whose state is a fixed set of tensors (THL). The transformers' KV cache is a growing buffer
managed in Python (its length is not a tensor), so it has no ONNX form here yet: exporting one
is a one-line error."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from dynlm.errors import DynlmError, OutputExistsError
from dynlm.models.base import DynModel
from dynlm.models.thl import THLModel, THLState

STATE_NAMES = ["tiers", "memory", "read_ema", "write_ema", "last_read", "last_write", "fifo", "position"]


class ExportError(DynlmError):
    """A model or an output path that cannot be exported to."""


class THLDecodeStep(nn.Module):
    """One decode step of a THL model with its state flattened to tensors."""

    def __init__(self, model: THLModel):
        super().__init__()
        self.model = model

    def forward(self, token: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(token, state=THLState.from_tensors(state))
        return (out.logits[:, -1], *out.state.tensors())


def export_onnx(model: DynModel, path: str | Path, force: bool = False, opset: int = 17) -> Path:
    """Write the decode step of `model` to `path` (atomically: a failed export leaves nothing)."""
    path = Path(path)
    if not isinstance(model, THLModel):
        raise ExportError(f"cannot export architecture '{model.architecture}' to ONNX: its state (a KV cache "
                          "grown in Python) has no fixed tensor form", "exportable: thl")
    if path.suffix != ".onnx":
        raise ExportError(f"output '{path}' must end in .onnx")
    if path.exists() and not force:
        raise OutputExistsError(f"'{path}' exists", "use --force to overwrite it")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write '{path}': folder '{path.parent}' does not exist or is not writable")
    model = model.eval().float()
    state = model.init_state(1, device="cpu")
    token = torch.zeros(1, 1, dtype=torch.long)
    names = [f"in_{n}" for n in STATE_NAMES]
    batch = {0: "batch"}
    dynamic = {"token": batch, "logits": batch}
    for name in STATE_NAMES[:-1]:
        axis = {1: "batch"} if name == "tiers" else batch
        dynamic[f"in_{name}"] = dynamic[f"out_{name}"] = axis
    fd, tmp = tempfile.mkstemp(suffix=".onnx.tmp", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch.onnx.export(THLDecodeStep(model), (token, *state.tensors()), tmp, dynamo=False,
                              opset_version=opset, input_names=["token", *names],
                              output_names=["logits", *[f"out_{n}" for n in STATE_NAMES]], dynamic_axes=dynamic)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
