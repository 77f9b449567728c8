"""ONNX export of a model's decode step, its state as inputs and outputs:

    (token [B, 1], state tensors...) -> (logits [B, V], new state tensors...)

so that a runtime decodes token by token by feeding each step's `out_*` outputs back as the next
step's `in_*` inputs (onnxruntime on CPU matches torch within 1e-4 over 32 tokens, tested).

- THL: its recurrent state (`STATE_NAMES`).
- Standard and MoD transformers: a static KV cache of `max_context` positions per layer
  (`in_k_{i}`, `in_v_{i}` [B, Hkv, slots, D], zeros at the start; a sliding-window layer holds a
  ring of `window` slots), the next position `in_position` (a 0-d int64, 0 at the start) and, for
  each routed MoD layer, which cached positions are keys (`in_valid_{i}` [B, slots] bool, all
  True at the start). The step is the model's own forward over `StaticLayerKVCache.from_tensors`
  caches: no second attention code. Feeding position `max_context` is past the cache;
  `OnnxDecoder` checks it.
- DTF (its surprise history grows with the first `ma_window` tokens: no fixed shapes) and
  AGIFORMER (whether a step runs the patch backbone depends on the byte position: Python control
  flow, no single graph) are one-line errors.

The file records `dynlm.architecture` and `dynlm.max_context` in its metadata."""

from __future__ import annotations

import copy
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dynlm.errors import ContextLengthError, DynlmError, OutputExistsError
from dynlm.fileio import atomic_write_bytes
from dynlm.models.base import DynModel
from dynlm.models.routed import RoutedTransformerLM
from dynlm.models.standard import TransformerLM
from dynlm.models.thl import THLModel, THLState
from dynlm.nn import KVCache
from dynlm.nn.cache import StaticLayerKVCache

STATE_NAMES = ["tiers", "memory", "read_ema", "write_ema", "last_read", "last_write", "fifo", "position"]
DEFAULT_MAX_CONTEXT = 256
PROTOBUF_LIMIT = 2**31  # bytes: one ONNX file (a protobuf) holds at most 2 GB, weights included

# Architectures whose decode step has no static-shape graph, and why (one line each).
UNEXPORTABLE = {
    "dtf": "its surprise history grows with the first ma_window tokens (no fixed state shapes)",
    "agiformer": "whether a step runs the patch backbone depends on the byte position (Python control flow)",
}


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


class KVDecodeStep(nn.Module):
    """One decode step of a transformer over a static KV cache given as tensors:
    (token, position, k_0, v_0, [valid_0], k_1, ...) -> (logits, position + 1, the same caches
    updated). Inputs are copied before the model writes into them."""

    def __init__(self, model: TransformerLM, max_context: int):
        super().__init__()
        self.model = model
        self.max_context = max_context
        c = model.config
        self.windows = [c.sliding_window if c.uses_sliding_window(i) else None for i in range(c.num_layers)]
        self.routed = set(model.routed_layers) if isinstance(model, RoutedTransformerLM) else set()

    def state_names(self) -> list[str]:
        names = ["position"]
        for i in range(len(self.windows)):
            names += [f"k_{i}", f"v_{i}"] + ([f"valid_{i}"] if i in self.routed else [])
        return names

    def initial_state(self, batch_size: int) -> list[torch.Tensor]:
        """The state of an empty context: position 0, zero keys and values, every slot valid."""
        c = self.model.config
        state: list[torch.Tensor] = [torch.zeros((), dtype=torch.long)]
        for i, window in enumerate(self.windows):
            cache = StaticLayerKVCache(batch_size, c.num_kv_heads, c.head_dim, self.max_context, window)
            state += [cache.k, cache.v] + ([cache.valid] if i in self.routed else [])
        return state

    def forward(self, token: torch.Tensor, position: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers, rest = [], list(tensors)
        for i in range(len(self.windows)):
            k, v = rest.pop(0).clone(), rest.pop(0).clone()
            valid = rest.pop(0).clone() if i in self.routed else None
            layers.append(StaticLayerKVCache.from_tensors(k, v, position.clone(), valid, self.max_context))
        out = self.model(token, state=KVCache(layers))
        caches = []
        for i, layer in enumerate(layers):
            caches += [layer.k, layer.v] + ([layer.valid] if i in self.routed else [])
        return (out.logits[:, -1], position + 1, *caches)


def _check_exportable(model: DynModel, max_context: int) -> None:
    arch = model.architecture
    weight_bytes = 4 * sum(p.numel() for p in model.parameters())  # traced in fp32
    if weight_bytes >= PROTOBUF_LIMIT:
        raise ExportError(f"cannot export {weight_bytes / 1e9:.2f} GB of fp32 weights to one ONNX file: "
                          f"the format's limit is {PROTOBUF_LIMIT / 1e9:.2f} GB")
    if arch in UNEXPORTABLE:
        raise ExportError(f"cannot export architecture '{arch}' to ONNX: {UNEXPORTABLE[arch]}",
                          "exportable: standard, mod, thl")
    if isinstance(model, THLModel):
        return
    if not isinstance(model, TransformerLM) or type(model.init_state(1, device="cpu")) is not KVCache:
        raise ExportError(f"cannot export architecture '{arch}' to ONNX: its decode state has no fixed tensor form",
                          "exportable: standard, mod, thl")
    limit = model.config.max_position_embeddings
    if not 1 <= max_context <= limit:
        raise ContextLengthError(f"--max-context {max_context} is outside 1..{limit} (the model's "
                                 "max_position_embeddings)")


def _check_output(path: Path, force: bool) -> None:
    if path.suffix != ".onnx":
        raise ExportError(f"output '{path}' must end in .onnx")
    if path.exists() and not force:
        raise OutputExistsError(f"'{path}' exists", "use --force to overwrite it")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write '{path}': folder '{path.parent}' does not exist or is not writable")


def _export_step(step: nn.Module, args: tuple[torch.Tensor, ...], inputs: list[str], outputs: list[str],
                 dynamic: dict[str, dict[int, str]], opset: int, metadata: dict[str, str]) -> bytes:
    import onnx

    buffer = io.BytesIO()
    # the tracer warns about every Python branch it freezes: they are the ones meant to be frozen
    # (decode step, fixed cache shapes), and the step's parity with eager decoding is tested
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(step, args, buffer, dynamo=False, opset_version=opset, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic)
    proto = onnx.load_from_string(buffer.getvalue())
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


def export_onnx(model: DynModel, path: str | Path, force: bool = False, opset: int = 17,
                max_context: int = DEFAULT_MAX_CONTEXT) -> Path:
    """Write the decode step of `model` to `path` (atomically: a failed export leaves nothing).
    `max_context`: positions of a transformer's static KV cache (unused for THL). The step is
    traced in fp32 on the CPU (a copy when `model` is elsewhere); `model` is left as it was."""
    path = Path(path)
    _check_exportable(model, max_context)
    _check_output(path, force)
    was_training = model.training
    as_is = all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    exported = model if as_is else copy.deepcopy(model).float().cpu()  # traced in fp32 on the CPU
    exported.eval()
    batch = {0: "batch"}
    metadata = {"dynlm.architecture": model.architecture}
    try:
        if isinstance(model, THLModel):
            step: nn.Module = THLDecodeStep(exported)
            state = exported.init_state(1, device="cpu").tensors()
            names = STATE_NAMES
            dynamic = {"token": batch, "logits": batch}
            for name in STATE_NAMES[:-1]:
                dynamic[f"in_{name}"] = dynamic[f"out_{name}"] = {1: "batch"} if name == "tiers" else batch
        else:
            step = KVDecodeStep(exported, max_context)
            state = step.initial_state(1)
            names = step.state_names()
            dynamic = {"token": batch, "logits": batch}
            for name in names[1:]:
                dynamic[f"in_{name}"] = dynamic[f"out_{name}"] = batch
            metadata["dynlm.max_context"] = str(max_context)
        token = torch.zeros(1, 1, dtype=torch.long)
        data = _export_step(step, (token, *state), ["token", *[f"in_{n}" for n in names]],
                            ["logits", *[f"out_{n}" for n in names]], dynamic, opset, metadata)
    finally:
        model.train(was_training)
    return atomic_write_bytes(path, data)


class OnnxDecoder:
    """Decode with an exported transformer step in onnxruntime: holds the state between steps.

        decoder = OnnxDecoder("model.onnx", batch_size=1)
        logits = decoder.step(np.array([[token]]))    # [B, V] after each token fed

    A step past the exported context is a `ContextLengthError`."""

    def __init__(self, path: str | Path, batch_size: int = 1, session: Any = None):
        import onnxruntime

        self.session = session or onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "dynlm.max_context" not in meta:
            raise ExportError(f"'{path}' is not a transformer decode step exported by dynlm (no dynlm.max_context)")
        self.max_context = int(meta["dynlm.max_context"])
        self.names = [i.name for i in self.session.get_inputs()]
        self.state: dict[str, np.ndarray] = {}
        for info in self.session.get_inputs()[1:]:
            shape = [batch_size if isinstance(d, str) else d for d in info.shape]
            if info.type == "tensor(bool)":
                self.state[info.name] = np.ones(shape, dtype=bool)
            elif info.type == "tensor(int64)":
                self.state[info.name] = np.zeros(shape, dtype=np.int64)
            else:
                self.state[info.name] = np.zeros(shape, dtype=np.float32)

    @property
    def position(self) -> int:
        return int(self.state["in_position"])

    def step(self, token: np.ndarray) -> np.ndarray:
        """Feed token [B, 1] (int64) at the next position; returns the logits [B, V]."""
        if self.position >= self.max_context:
            raise ContextLengthError(f"position {self.position} is past the exported context {self.max_context} "
                                     "(export with a larger --max-context)")
        outputs = self.session.run(None, {"token": np.asarray(token, dtype=np.int64), **self.state})
        self.state = {f"in_{o.name[4:]}": value for o, value in zip(self.session.get_outputs()[1:], outputs[1:])}
        return outputs[0]
