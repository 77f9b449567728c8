"""Live experiments on a model's weights: set a tensor, a slice or one element, observe a probe,
and roll everything back bit-exactly.

    exp = Experiment(model, probe=loss_probe(tokenizer, "To be, or not to be"))
    exp.set("model.norm.weight", 0.0, index=5)           # one element
    exp.scale("model.layers.1.mlp.down_proj.weight", 0.0, index=(slice(None), slice(0, 64)))
    exp.observe("norm[5]=0, 64 neurons off")             # probe value, logged
    exp.rollback()                                       # every touched tensor restored, bit for bit
    exp.log                                              # what was changed and what the probe said

Also a context manager: `with Experiment(model, probe) as exp: ...` rolls back on exit unless
`exp.keep()` was called.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from dynlm.errors import ConfigError, did_you_mean

Index = int | slice | tuple | str | None
Probe = Callable[[torch.nn.Module], float | dict[str, float]]


def parse_index(index: Index) -> Any:
    """An index as torch takes it. Strings use Python slice syntax: "5", "3, 7", ":, 0:64", "-1"."""
    if not isinstance(index, str):
        return index
    parts = []
    for piece in index.split(","):
        piece = piece.strip()
        if re.fullmatch(r"-?\d+", piece):
            parts.append(int(piece))
        elif re.fullmatch(r"(-?\d+)?:(-?\d+)?(:(-?\d+)?)?", piece):
            bounds = [int(b) if b else None for b in piece.split(":")]
            parts.append(slice(*bounds))
        elif piece == "...":
            parts.append(Ellipsis)
        else:
            raise ConfigError(f"bad index '{index}'", 'use integers and slices, e.g. "5", "3, 7" or ":, 0:64"')
    return parts[0] if len(parts) == 1 else tuple(parts)


def _summary(values: torch.Tensor) -> dict[str, float]:
    values = values.detach().float().reshape(-1)
    if values.numel() == 0:
        return {"elements": 0}
    return {"elements": values.numel(), "mean": float(values.mean()), "min": float(values.min()),
            "max": float(values.max())}


def loss_probe(tokenizer: Any, text: str, max_tokens: int = 512) -> Probe:
    """A probe: mean next-token loss (nats) of the model on `text`."""
    ids = tokenizer.encode(text)[:max_tokens]
    if getattr(tokenizer, "prepend_separator", False):
        ids = [tokenizer.separator_id, *ids][:max_tokens]
    if len(ids) < 2:
        raise ConfigError("the probe text must give at least 2 tokens")

    @torch.no_grad()
    def probe(model: torch.nn.Module) -> float:
        device = next(model.parameters()).device
        x = torch.tensor([ids], device=device)
        was_training = model.training
        model.eval()
        try:
            return float(model(x, labels=x).loss)
        finally:
            model.train(was_training)

    return probe


class Experiment:
    """Changes to a model's tensors with their originals kept, a log, and exact rollback."""

    def __init__(self, model: torch.nn.Module, probe: Probe | None = None):
        self.model = model
        self.probe = probe
        self.log: list[dict[str, Any]] = []
        self._tensors = dict(model.named_parameters(remove_duplicate=False))
        self._tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        self._originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # storage -> (tensor, copy)
        self._keep = False
        self.baseline = self._probe() if probe is not None else None

    def _probe(self) -> float | dict[str, float] | None:
        return None if self.probe is None else self.probe(self.model)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in self._tensors:
            raise ConfigError(f"the model has no tensor '{name}'", did_you_mean(name, self._tensors))
        return self._tensors[name]

    def _remember(self, tensor: torch.Tensor) -> None:
        key = tensor.untyped_storage().data_ptr()  # tied tensors share storage: one original
        if key not in self._originals:
            self._originals[key] = (tensor, tensor.detach().clone())

    @torch.no_grad()
    def _change(self, action: str, name: str, index: Index, update: Callable[[torch.Tensor], torch.Tensor],
                detail: dict[str, Any]) -> dict[str, Any]:
        tensor = self.tensor(name)
        key = parse_index(index)
        target = tensor if key is None else tensor[key]
        before = _summary(target)
        self._remember(tensor)
        new = update(target.detach())
        if key is None:
            tensor.copy_(new)
        else:
            tensor[key] = new
        entry = {"step": len(self.log) + 1, "action": action, "tensor": name,
                 "index": "all" if index is None else str(index), **detail, "before": before,
                 "after": _summary(tensor if key is None else tensor[key])}
        if self.probe is not None:
            entry["probe"] = self._probe()
        self.log.append(entry)
        return entry

    def set(self, name: str, value: float | torch.Tensor, index: Index = None) -> dict[str, Any]:
        """Set a whole tensor, a slice or an element (index: int, slice, tuple or "3, 0:8")."""
        value_t = torch.as_tensor(value)
        detail = {"value": float(value_t) if value_t.numel() == 1 else f"tensor{list(value_t.shape)}"}
        return self._change("set", name, index, lambda t: value_t.to(t.dtype).to(t.device).expand_as(t), detail)

    def scale(self, name: str, factor: float, index: Index = None) -> dict[str, Any]:
        """Multiply a tensor, slice or element by `factor` (0 turns it off)."""
        return self._change("scale", name, index, lambda t: t * factor, {"factor": factor})

    def add(self, name: str, amount: float | torch.Tensor, index: Index = None) -> dict[str, Any]:
        amount_t = torch.as_tensor(amount)
        return self._change("add", name, index, lambda t: t + amount_t.to(t.dtype).to(t.device),
                            {"amount": float(amount_t) if amount_t.numel() == 1 else "tensor"})

    def observe(self, label: str = "") -> float | dict[str, float] | None:
        """Run the probe now and log the value."""
        value = self._probe()
        self.log.append({"step": len(self.log) + 1, "action": "observe", "label": label, "probe": value})
        return value

    @torch.no_grad()
    def rollback(self) -> int:
        """Restore every tensor touched so far, bit-exactly. Returns how many were restored."""
        for tensor, original in self._originals.values():
            tensor.copy_(original)
        restored = len(self._originals)
        self._originals.clear()
        entry: dict[str, Any] = {"step": len(self.log) + 1, "action": "rollback", "tensors_restored": restored}
        if self.probe is not None:
            entry["probe"] = self._probe()
        self.log.append(entry)
        return restored

    def keep(self) -> None:
        """Keep the changes when leaving the `with` block (and forget the originals)."""
        self._keep = True
        self._originals.clear()

    @property
    def changed(self) -> list[str]:
        """Names of the tensors currently changed (and not yet rolled back)."""
        storages = set(self._originals)
        return [n for n, t in self._tensors.items() if t.untyped_storage().data_ptr() in storages]

    def __enter__(self) -> Experiment:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._keep:
            self.rollback()
