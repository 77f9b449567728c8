"""The layered (offloaded) inference engine: runs any architecture whose weights do not fit in
GPU memory, by keeping them in host memory and streaming them to the GPU one unit at a time.

    engine = LayeredEngine(model, device="cuda", max_gpu_memory=300 * 2**20)
    ids = engine.generate(prompt_ids, max_new_tokens=50)          # [B, T] -> [B, T + 50]
    out = engine(input_ids, state=state)                          # the model's own forward

How it works. The model's modules are split into *units*: each element of a `ModuleList` (a
transformer layer, a THL tier) and each other child holding many parameters (embedding, head).
Everything else (norms, rotary tables, small routers) stays on the GPU. A forward pre-hook on
every module of a unit loads the unit before any of its code runs, so the model's own `forward`
runs unchanged: the logits are the normal forward's by construction (nothing is re-implemented,
nothing skipped). Units stay on the GPU up to the memory cap and are evicted least recently used
first. Copies run on a second CUDA stream from pinned host memory; when unit u starts, the unit
that followed u last time is copied while u computes (prefetch). A batch of prompts shares each
weight transfer (the batch amortises the transfer: FlexGen's lesson).

Optional int8 weight-only compression (`int8=True`): every 2-D weight of a unit is stored on the
host as int8 with one fp scale per output row, copied as int8 (half of bf16's bytes) and
dequantized on the GPU. Outputs then differ from the full-precision model by the rounding.

Weights from disk (`LayeredEngine.from_checkpoint(directory)`): the model is built with its
parameters on the meta device (no memory, no initialisation) and every streamed weight is a view
of the checkpoint's safetensors file mapped into memory, so the host holds no copy of its own:
the operating system pages the file in when a unit is copied (and may drop it again under memory
pressure). Copies from mapped pages are not pinned, so they run slower than from pinned memory.

Without a GPU (device="cpu") the same path runs with host-to-host copies: that is how the
equality with the normal forward is tested on CPU.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from dynlm.checkpoint import load_state_into, read_config, safetensors_files
from dynlm.config import model_config
from dynlm.errors import CheckpointError, ConfigError, ContextLengthError, DynlmError
from dynlm.infer.sampling import SamplingConfig, select_next
from dynlm.nn.quant import quantize_int8


class MemoryCapError(DynlmError):
    """A GPU memory cap that cannot hold what the engine needs."""


_UNITS = {"B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3}


def parse_bytes(text: str) -> int:
    """'300MB' -> 300_000_000, '4GiB' -> 4 * 2**30, '123' -> 123."""
    raw = text.strip().upper().replace(" ", "")
    number = raw.rstrip("KMGIB")
    unit = raw[len(number):] or "B"
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value <= 0:
        raise ConfigError(f"bad memory size '{text}'", "e.g. 300MB, 4GB or 4GiB")
    return int(value * _UNITS[unit])


def _nbytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def streamable_units(model: nn.Module) -> list[nn.Module]:
    """The modules streamed one at a time, in definition order: every element of a ModuleList,
    and every other child with parameters that holds no ModuleList (recursing into those that
    do). Units under 1/16 of the largest stay resident on the device instead."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                units.extend(child)
            elif any(isinstance(m, nn.ModuleList) for m in child.modules()):
                visit(child)
            elif any(True for _ in child.parameters()):
                units.append(child)

    visit(model)
    largest = max((_nbytes(u) for u in units), default=0)
    return [u for u in units if _nbytes(u) * 16 >= largest]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device: no memory and no
    initialisation cost (a 7B model is built in a second). Buffers are built as usual (rotary
    tables and the like are computed, not loaded)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file, memory-mapped by the safetensors library: nothing is
    read from disk before a tensor is used, and the file is never modified (safetensors 0.8 maps
    the file; an older release reads each tensor into memory instead)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from None


def state_capacity_bytes(state: Any) -> int:
    """Bytes of device memory a state holds, allocated capacity included: a KV cache allocated
    for `max_length` positions counts in full before any position is filled (`state_nbytes`
    counts filled positions only, which is what a state *stores*, not what it *occupies*)."""
    seen: set[int] = set()

    def visit(value: Any) -> int:
        if id(value) in seen:
            return 0
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(visit(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(visit(v) for v in value)
        if hasattr(value, "__dict__"):
            return sum(visit(v) for v in vars(value).values())
        return 0

    return visit(state)


class _HostParam:
    """A parameter's host copy (pinned when streaming to a GPU), or its int8 form."""

    def __init__(self, param: nn.Parameter, dtype: torch.dtype, pin: bool, int8: bool):
        self.param = param
        data = param.data.to("cpu", dtype)
        self.int8 = int8 and data.dim() == 2
        if self.int8:
            q, scale = quantize_int8(data)
            self.tensors = [q, scale]
        else:
            self.tensors = [data]
        if pin:
            self.tensors = [t.pin_memory() for t in self.tensors]
        self.dtype = dtype
        self.transfer_bytes = sum(t.numel() * t.element_size() for t in self.tensors)
        self.device_bytes = param.numel() * torch.empty((), dtype=dtype).element_size()
        # the module keeps an empty placeholder while the weight is on the host only
        param.data = torch.empty(0, dtype=dtype)

    def to_device(self, device: torch.device) -> torch.Tensor:
        moved = [t.to(device, non_blocking=True) for t in self.tensors]
        if self.int8:
            return (moved[0].to(self.dtype) * moved[1]).view(self.param_shape)
        return moved[0]

    @property
    def param_shape(self) -> torch.Size:
        return self.tensors[0].shape


class LayeredEngine:
    """Runs `model` (on the host, weights loaded) on `device` with at most `max_gpu_memory` bytes
    of weights there. The engine takes the model over: its streamed weights live in the engine's
    host copies from now on (the module holds placeholders while a unit is not loaded).
    `pin_memory=False` streams from the weights where they are (e.g. a mapped file) instead of
    pinned copies of them."""

    def __init__(self, model: nn.Module, device: str | torch.device = "cuda", max_gpu_memory: int | None = None,
                 int8: bool = False, dtype: torch.dtype | None = None, prefetch: bool = True,
                 pin_memory: bool = True):
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device 'cuda' asked for but no CUDA device is available", "use device='cpu'")
        self.model = model.eval()
        self.dtype = dtype or next(model.parameters()).dtype
        cuda = self.device.type == "cuda"
        self.units = streamable_units(model)
        unit_params = {id(p) for u in self.units for p in u.parameters()}
        # everything outside the units lives on the device for good
        for module in model.modules():
            for p in list(module.parameters(recurse=False)):
                if id(p) not in unit_params:
                    p.data = p.data.to(self.device, self.dtype)
            for name, b in list(module.named_buffers(recurse=False)):
                if b is not None:
                    module._buffers[name] = b.to(self.device)
        self.resident_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in unit_params)
        hosts: dict[int, _HostParam] = {}
        self.unit_params: list[list[_HostParam]] = []
        for unit in self.units:
            entries = []
            for p in unit.parameters():
                if id(p) not in hosts:  # tied weights are one parameter shared by two units
                    hosts[id(p)] = _HostParam(p, self.dtype, pin=cuda and pin_memory, int8=int8)
                entries.append(hosts[id(p)])
            self.unit_params.append(entries)
        self.unit_bytes = [sum(h.device_bytes for h in entries) for entries in self.unit_params]
        self.transfer_bytes = [sum(h.transfer_bytes for h in entries) for entries in self.unit_params]
        largest = max(self.unit_bytes, default=0)
        self.budget = None if max_gpu_memory is None else max_gpu_memory - self.resident_bytes
        if self.budget is not None and self.budget < largest:
            raise MemoryCapError(f"--max-gpu-memory {max_gpu_memory / 1e6:.3g} MB is smaller than one layer plus the "
                                 f"resident weights ({(largest + self.resident_bytes) / 1e6:.3g} MB)")
        self.prefetch = prefetch
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.loaded: OrderedDict[int, torch.cuda.Event | None] = OrderedDict()  # unit -> copy-done event, LRU order
        self.holders: dict[int, int] = {}  # id(param) -> loaded units holding it
        self.next_unit: dict[int, int] = {}  # unit -> the unit that ran after it last time
        self.previous: int | None = None
        self.bytes_copied = 0
        self.hooks = []
        for index, unit in enumerate(self.units):
            for module in unit.modules():
                self.hooks.append(module.register_forward_pre_hook(self._make_hook(index)))

    @classmethod
    def from_checkpoint(cls, directory: str | Path, device: str | torch.device = "cuda",
                        max_gpu_memory: int | None = None, int8: bool = False, dtype: torch.dtype | None = None,
                        prefetch: bool = True) -> LayeredEngine:
        """An engine streaming the weights of a dynlm checkpoint straight from its memory-mapped
        safetensors files (no copy of the weights in host memory; see the module docstring)."""
        from dynlm.registry import get_architecture

        directory = Path(directory)
        section = read_config(directory).get("dynlm")
        if not isinstance(section, dict) or "config" not in section:
            raise CheckpointError(f"{directory / 'config.json'}: no 'dynlm' section; the layered engine maps "
                                  "dynlm checkpoints (convert others with `dynlm convert`)")
        config = model_config(section["config"])
        _, model_class = get_architecture(config.type)
        with parameters_on_meta():
            model = model_class(config)
        tensors: dict[str, torch.Tensor] = {}
        for path in safetensors_files(directory):
            tensors.update(mmap_safetensors(path))
        load_state_into(model, tensors, str(directory), assign=True)
        if getattr(config, "tie_word_embeddings", False) and hasattr(model, "lm_head"):
            model.lm_head.weight = model.model.embed_tokens.weight
        return cls(model, device=device, max_gpu_memory=max_gpu_memory, int8=int8, dtype=dtype, prefetch=prefetch,
                   pin_memory=False)

    def fit_to_cap(self, cap: int, state: Any, headroom: int) -> None:
        """Set the weight budget for a cap on everything the process holds on the device: `cap`
        minus the resident weights, the state's allocated bytes (`state_capacity_bytes`) and
        `headroom` (activations, allocator slack). MemoryCapError if one unit does not fit."""
        state_bytes = state_capacity_bytes(state)
        budget = cap - self.resident_bytes - state_bytes - headroom
        largest = max(self.unit_bytes, default=0)
        if budget < largest:
            raise MemoryCapError(f"cap {cap / 2**30:.2f} GiB < state {state_bytes / 2**30:.2f} GiB + largest unit "
                                 f"{largest / 2**30:.2f} GiB + resident {self.resident_bytes / 2**30:.2f} GiB + "
                                 f"headroom {headroom / 2**30:.2f} GiB")
        self.budget = budget

    # -- residency ------------------------------------------------------------------------------
    def _make_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            self._use(index)
        return hook

    def _used_bytes(self) -> int:
        return sum(self.unit_bytes[u] for u in self.loaded)

    def _make_room(self, need: int, keep: set[int]) -> bool:
        if self.budget is None:
            return True
        while self._used_bytes() + need > self.budget:
            victim = next((u for u in self.loaded if u not in keep), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _load(self, index: int) -> None:
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # evicted memory is free to reuse
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for host in self.unit_params[index]:
                if self.holders.get(id(host.param), 0) == 0:
                    host.param.data = host.to_device(self.device)
                    self.bytes_copied += host.transfer_bytes
                self.holders[id(host.param)] = self.holders.get(id(host.param), 0) + 1
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.loaded[index] = event

    def _evict(self, index: int) -> None:
        self.loaded.pop(index)
        for host in self.unit_params[index]:
            self.holders[id(host.param)] -= 1
            if self.holders[id(host.param)] == 0:
                host.param.data = torch.empty(0, dtype=self.dtype)

    def _use(self, index: int) -> None:
        if index == self.previous:
            return
        if index not in self.loaded:
            if not self._make_room(self.unit_bytes[index], keep=set()):
                raise MemoryCapError("the memory cap cannot hold one unit")  # excluded by the check in __init__
            self._load(index)
        event = self.loaded.pop(index)
        self.loaded[index] = None  # most recently used; its copy is awaited now
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for host in self.unit_params[index]:
                host.param.data.record_stream(compute)  # not reused before the compute is done
        if self.previous is not None:
            self.next_unit[self.previous] = index
        self.previous = index
        upcoming = self.next_unit.get(index)
        if (self.prefetch and upcoming is not None and upcoming not in self.loaded
                and self._make_room(self.unit_bytes[upcoming], keep={index})):
            self._load(upcoming)

    # -- running ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, state: Any = None) -> Any:
        """The model's forward (inputs moved to the device)."""
        with torch.no_grad():
            return self.model(input_ids.to(self.device), state=state)

    def init_state(self, batch_size: int, max_length: int = 0) -> Any:
        return self.model.init_state(batch_size, device=self.device, dtype=self.dtype, max_length=max_length)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, seed: int | None = None,
                 **sampling: Any) -> torch.Tensor:
        """Prompts [B, T] (one length; each weight transfer serves the whole batch) -> [B, T + n]."""
        cfg = SamplingConfig(**sampling)
        b, t = input_ids.shape
        limit = getattr(self.model.config, "max_position_embeddings", None)
        if limit is not None and not getattr(self.model, "constant_state", False) and t + max_new_tokens > limit:
            raise ContextLengthError(f"prompt + new tokens = {t + max_new_tokens} exceeds the model's "
                                     f"{limit} positions")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        ids = input_ids.to(self.device)
        out = self(ids, state=self.init_state(b, max_length=t + max_new_tokens))
        for _ in range(max_new_tokens):
            next_ids = select_next(out.logits[:, -1].float(), ids, cfg, generator)
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            out = self(next_ids[:, None], state=out.state)
        return ids

    def stats(self) -> dict[str, Any]:
        return {"units": len(self.units), "unit_bytes_max": max(self.unit_bytes, default=0),
                "weight_bytes": sum(self.unit_bytes) + self.resident_bytes, "resident_bytes": self.resident_bytes,
                "bytes_copied": self.bytes_copied, "loaded_units": len(self.loaded)}



def generate_texts(engine: LayeredEngine, tokenizer: Any, prompts: list[str], max_new_tokens: int,
                   stop: Sequence[str] = (), seed: int | None = None, **sampling: Any) -> list[str]:
    """Continuations of `prompts`, decoded together in batches of equal prompt length (no padding
    enters the model; each weight transfer serves a whole batch). Cut at the first EOS token
    and at the first `stop` string."""
    # documents start with the separator token in training, so prompts do too (as in generate)
    prefix = [tokenizer.separator_id] if getattr(tokenizer, "prepend_separator", False) else []
    encoded = [prefix + tokenizer.encode(p) for p in prompts]
    if any(not ids for ids in encoded):
        raise ConfigError("empty prompt", "give at least one character")
    eos = set(getattr(tokenizer, "eos_ids", []) or [])
    answers: dict[int, str] = {}
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for length, rows in by_length.items():
        batch = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
        out = engine.generate(batch, max_new_tokens, seed=seed, **sampling)[:, length:].tolist()
        for i, new in zip(rows, out):
            cut = next((k for k, token in enumerate(new) if token in eos), len(new))
            text = tokenizer.decode(new[:cut])
            ends = [text.find(s) for s in stop if s and text.find(s) >= 0]
            answers[i] = text[:min(ends)] if ends else text
    return [answers[i] for i in range(len(prompts))]
