"""The layered (offloaded) inference engine: runs any architecture whose weights do not fit in
GPU memory, by keeping them in host memory and streaming them to the GPU one unit at a time.

    engine = LayeredEngine(model, device="cuda", max_gpu_memory=300 * 2**20)
    ids = engine.generate(prompt_ids, max_new_tokens=50)          # [B, T] -> [B, T + 50]
    out = engine(input_ids, state=state)                          # the model's own forward

How it works. The model's modules are split into *units*: each element of a `ModuleList` (a
transformer layer, a THL tier) and each other child holding many parameters (embedding, head).
Everything else (norms, rotary tables, small routers) stays on the GPU. For a weight budget the
units are cut into *pieces*: a unit's leaf modules packed in definition order up to a target size
(half the budget, so that two pieces fit: one computes while the next is copied), and a unit that
is one linear or one embedding larger than that (a 32K-vocabulary head) cut into chunks of output
(vocabulary) rows, run chunk by chunk. The pieces are copied into *slots*: buffers of the largest
piece's size, allocated once when the budget is set; a piece's weights are views of its slot, so
no load allocates and the caching allocator cannot fragment. Every streamed parameter is a
property of its module: reading `module.weight` copies its piece into a slot if it is not in one
(evicting the least recently used piece) and returns the view, so the model's own `forward` runs
unchanged, whatever code reads the weight: the logits are the normal forward's (only a cut head or
embedding computes its rows in chunks, each output element as in the whole forward). Copies run on
a second CUDA stream from pinned host memory; when piece p is read, the pieces the previous
forward read after it are copied into the other slots while p computes (prefetch). A batch of prompts shares
each weight transfer (the batch amortises the transfer: FlexGen's lesson).

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
from torch.nn import functional as F

from dynlm.checkpoint import load_state_into, read_config, safetensors_files
from dynlm.config import model_config
from dynlm.errors import CheckpointError, ConfigError, ContextLengthError, DynlmError
from dynlm.infer.sampling import SamplingConfig, select_next
from dynlm.nn.quant import quantize_int8

_ALIGN = 256  # bytes: every view in a slot starts on this boundary


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

    def __init__(self, param: nn.Parameter, dtype: torch.dtype, pin: bool, int8: bool, device: torch.device):
        self.param = param
        # a model on the meta device (with device="meta": the plan's arithmetic, no memory) stays there
        data = param.data.to(dtype) if param.device.type == "meta" else param.data.to("cpu", dtype)
        self.int8 = int8 and data.dim() == 2
        if self.int8:
            q, scale = quantize_int8(data)
            self.tensors = [q, scale]
        else:
            self.tensors = [data]
        if pin:
            self.tensors = [t.pin_memory() for t in self.tensors]
        self.dtype = dtype
        self.shape = data.shape
        # the module keeps an empty placeholder (right dtype and device) while the weight is streamed
        param.data = torch.empty(0, dtype=dtype, device=device)

    def rows(self, start: int, stop: int) -> tuple[torch.Size, list[torch.Tensor]]:
        """Rows [start, stop) of the weight: their device shape and the host tensors to copy."""
        if not self.shape:
            return self.shape, self.tensors
        return torch.Size((stop - start, *self.shape[1:])), [t[start:stop] for t in self.tensors]


def _base_class(module: nn.Module) -> type:
    """The module's own class (the engine gives streamed modules a subclass)."""
    return getattr(type(module), "_layered_base", type(module))


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class _Entry:
    """Rows [start, stop) of one streamed parameter inside a piece: where its device view starts in
    the slot, and (int8) where its int8 rows and scales are staged before they are dequantized."""

    def __init__(self, host: _HostParam, start: int, stop: int):
        self.host = host
        self.shape, self.sources = host.rows(start, stop)
        element = torch.empty((), dtype=host.dtype).element_size()
        self.device_bytes = self.shape.numel() * element
        self.transfer_bytes = sum(t.numel() * t.element_size() for t in self.sources)
        self.slot_bytes = _aligned(self.device_bytes)
        if host.int8:
            self.slot_bytes += sum(_aligned(t.numel() * t.element_size()) for t in self.sources)

    def view(self, slot: torch.Tensor, offset: int) -> torch.Tensor:
        """Copies the rows into `slot` at `offset` (on the current stream) and returns their view."""
        target = slot[offset:offset + self.device_bytes].view(self.host.dtype).view(self.shape)
        if not self.host.int8:
            target.copy_(self.sources[0], non_blocking=True)
            return target
        at = offset + _aligned(self.device_bytes)
        staged = []
        for source in self.sources:
            nbytes = source.numel() * source.element_size()
            staged.append(slot[at:at + nbytes].view(source.dtype).view(source.shape))
            staged[-1].copy_(source, non_blocking=True)
            at += _aligned(nbytes)
        target.copy_(staged[0])
        return target.mul_(staged[1])


class _Piece:
    """What is copied into one slot at a time: the parameters of one or more leaf modules of a
    unit, or a chunk of rows of one large linear or embedding (`rows`)."""

    def __init__(self, unit: int, entries: list[tuple[nn.Module, str, _Entry]], rows: tuple[int, int] | None = None):
        self.unit, self.entries, self.rows = unit, entries, rows
        self.nbytes = sum(e.slot_bytes for _, _, e in entries)
        self.transfer_bytes = sum(e.transfer_bytes for _, _, e in entries)


def _splittable(unit: nn.Module, module: nn.Module) -> bool:
    """A unit that is one linear or one embedding (a head, an embedding) can run on chunks of its
    output (vocabulary) rows. Linears inside a larger unit are not cut: code may read their
    weight whole (a reader's `k_proj.weight.view(...)`)."""
    base = _base_class(module)
    if module is not unit:
        return False
    if base is nn.Embedding:
        return module.max_norm is None
    return base is nn.Linear


class _Plan:
    """How the streamed weights are cut into pieces for a weight budget, and the fixed slots the
    pieces are copied into. Target piece size: half the budget (two slots: one computes while the
    next is copied), never more than the largest unit (a unit is not cut when two of it fit), never
    less than the largest leaf module that cannot be cut. Leaves of a unit are packed in
    definition order up to the target; a linear or embedding larger than the target is cut into
    chunks of output rows when it is a unit of its own. No budget: one piece per unit, each in a
    slot of its own size."""

    def __init__(self, units_: list[nn.Module], leaves: list[list[tuple[nn.Module, list[tuple[str, _HostParam]]]]],
                 budget: int | None):
        units = [[(m, named, sum(_Entry(h, 0, h.shape[0] if h.shape else 0).slot_bytes for _, h in named),
                   _splittable(unit, m)) for m, named in unit_leaves] for unit, unit_leaves in zip(units_, leaves)]
        unit_bytes = [sum(b for _, _, b, _ in unit) for unit in units]
        largest_unit = max(unit_bytes, default=0)
        self.smallest_slot = max((self._row_bytes(named) if cut else b for unit in units
                                  for _, named, b, cut in unit), default=0)
        if budget is None:
            target = largest_unit
        else:
            target = min(largest_unit, max(self.smallest_slot, budget // 2))
        self.target = target
        self.pieces: list[_Piece] = []
        self.splits: dict[int, list[int]] = {}  # id(module) -> its chunk pieces, in row order
        for index, unit in enumerate(units):
            packed: list[tuple[nn.Module, str, _Entry]] = []
            for module, named, nbytes, cut in unit:
                if budget is not None and nbytes > target and cut:
                    if packed:
                        self.pieces.append(_Piece(index, packed))
                        packed = []
                    self._split(index, module, named, target)
                    continue
                if packed and sum(e.slot_bytes for _, _, e in packed) + nbytes > target:
                    self.pieces.append(_Piece(index, packed))
                    packed = []
                packed += [(module, name, _Entry(h, 0, h.shape[0] if h.shape else 0)) for name, h in named]
            if packed:
                self.pieces.append(_Piece(index, packed))
        sizes = [p.nbytes for p in self.pieces]
        self.slot_bytes = max(sizes, default=0)
        if budget is None:
            self.slot_sizes = sizes
        else:
            self.slot_sizes = [self.slot_bytes] * min(len(sizes), budget // max(self.slot_bytes, 1))

    @staticmethod
    def _row_bytes(named: list[tuple[str, _HostParam]]) -> int:
        return sum(_Entry(h, 0, 1).slot_bytes for _, h in named)

    def _split(self, unit: int, module: nn.Module, named: list[tuple[str, _HostParam]], target: int) -> None:
        rows = named[0][1].shape[0]
        per_row = sum(_Entry(h, 0, 1).device_bytes + (_Entry(h, 0, 1).transfer_bytes if h.int8 else 0)
                      for _, h in named)
        chunk = max(1, (target - 4 * _ALIGN * len(named)) // per_row)
        chunks = self.splits.setdefault(id(module), [])
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            chunks.append(len(self.pieces))
            self.pieces.append(_Piece(unit, [(module, name, _Entry(h, start, stop)) for name, h in named],
                                      rows=(start, stop)))


_STREAMED_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _streamed_class(base: type, names: tuple[str, ...]) -> type:
    """A subclass of `base` whose streamed parameters are properties: reading `module.weight` asks
    the engine for the piece holding it (copied to its slot if it is not there) and returns its
    view in the slot. Whatever code reads the weight (the module's forward, or another module
    reading it directly) gets it loaded first. A linear or embedding cut into row chunks runs its
    forward chunk by chunk."""
    key = (base, names)
    if key in _STREAMED_CLASSES:
        return _STREAMED_CLASSES[key]

    def streamed(name: str) -> property:
        return property(lambda module: module.__dict__["_layered_engine"]._param(module, name))

    namespace: dict[str, Any] = {name: streamed(name) for name in names}
    namespace["_layered_base"] = base
    if base in (nn.Linear, nn.Embedding):
        def forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            engine = module.__dict__["_layered_engine"]
            if id(module) in engine.plan.splits:
                return engine._chunked_forward(module, x)
            return base.forward(module, x)
        namespace["forward"] = forward
    cls = type(base.__name__, (base,), namespace)
    _STREAMED_CLASSES[key] = cls
    return cls


class LayeredEngine:
    """Runs `model` (on the host, weights loaded) on `device` with at most `max_gpu_memory` bytes
    of weights there. The engine takes the model over: its streamed weights live in the engine's
    host copies from now on (the module holds empty placeholders; reading a streamed weight gives
    its view in a device slot). `pin_memory=False` streams from the weights where they are (e.g. a
    mapped file) instead of pinned copies of them."""

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
        self.leaves: list[list[tuple[nn.Module, list[tuple[str, _HostParam]]]]] = []
        for unit in self.units:
            entries: list[_HostParam] = []
            leaves = []
            for module in unit.modules():
                named = []
                for name, p in module._parameters.items():
                    if p is None:
                        continue
                    if id(p) not in hosts:  # tied weights are one parameter shared by two units
                        hosts[id(p)] = _HostParam(p, self.dtype, pin=cuda and pin_memory, int8=int8,
                                                  device=self.device)
                    named.append((name, hosts[id(p)]))
                    if hosts[id(p)] not in entries:
                        entries.append(hosts[id(p)])
                if named:
                    leaves.append((module, named))
            self.unit_params.append(entries)
            self.leaves.append(leaves)
        for unit_leaves in self.leaves:
            for module, named in unit_leaves:
                if "_layered_engine" not in module.__dict__:
                    module.__class__ = _streamed_class(_base_class(module), tuple(n for n, _ in named))
                object.__setattr__(module, "_layered_engine", self)
        self.unit_bytes = [sum(h.shape.numel() * torch.empty((), dtype=self.dtype).element_size() for h in entries)
                           for entries in self.unit_params]
        self.transfer_bytes = [sum(t.numel() * t.element_size() for h in entries for t in h.tensors)
                               for entries in self.unit_params]
        self.prefetch = prefetch
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.bytes_copied = 0
        self.slot_allocations = 0
        self.slots: list[torch.Tensor] = []
        self.budget = None if max_gpu_memory is None else max_gpu_memory - self.resident_bytes
        self.plan = _Plan(self.units, self.leaves, None)  # only for its smallest slot, before the real plan
        if self.budget is not None and self.budget < self.plan.smallest_slot:
            raise MemoryCapError(f"--max-gpu-memory {max_gpu_memory / 1e6:.3g} MB cannot hold the largest weight "
                                 f"piece plus the resident weights "
                                 f"({(self.plan.smallest_slot + self.resident_bytes) / 1e6:.3g} MB)")
        self._replan(self.budget)

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

    @property
    def smallest_slot_bytes(self) -> int:
        """The largest piece that cannot be cut: one slot of it is the least the weights need."""
        return self.plan.smallest_slot

    def bytes_needed(self, state: Any, headroom: int) -> int:
        """The least device memory a run with `state` needs: resident weights, the state's allocated
        bytes (`state_capacity_bytes`), one slot of the smallest size possible, and `headroom`."""
        return self.resident_bytes + state_capacity_bytes(state) + self.plan.smallest_slot + headroom

    def fit_to_cap(self, cap: int, state: Any, headroom: int) -> None:
        """Set the weight budget for a cap on everything the process holds on the device: `cap`
        minus the resident weights, the state's allocated bytes and `headroom` (activations,
        allocator slack); the pieces and slots are planned for it (the old slots are freed first).
        MemoryCapError, before anything is allocated, if not even one slot fits."""
        needed = self.bytes_needed(state, headroom)
        if cap < needed:
            mib = 2**20
            raise MemoryCapError(f"does not fit: {needed / mib:,.1f} MiB needed (state "
                                 f"{state_capacity_bytes(state) / mib:,.1f} + smallest slot "
                                 f"{self.plan.smallest_slot / mib:,.1f} + resident {self.resident_bytes / mib:,.1f} + "
                                 f"headroom {headroom / mib:,.1f}) > cap {cap / mib:,.1f} MiB")
        self._replan(cap - self.resident_bytes - state_capacity_bytes(state) - headroom)

    # -- residency ------------------------------------------------------------------------------
    def _replan(self, budget: int | None) -> None:
        """Cut the weights into pieces for `budget`; the slots come at the first load, once: from
        there on every copy goes into a view of a slot (no allocation per load, so nothing
        fragments). Nothing is allocated here: an engine built under a cap and then fitted to it
        never holds two plans' slots."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy or kernel still reads the old slots
        self.slots, self.views = [], {}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the old slots' blocks go back before slots of another size are cut
        self.budget = budget
        self.plan = _Plan(self.units, self.leaves, budget)
        self.where: dict[tuple[int, str], tuple[int, int]] = {}  # (id(module), name) -> (piece, entry)
        for index, piece in enumerate(self.plan.pieces):
            for k, (module, name, _) in enumerate(piece.entries):
                if piece.rows is None:
                    self.where[(id(module), name)] = (index, k)
        self.free_slots: list[int] = []  # the slots are allocated at the first load (_allocate_slots)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # piece -> its slot, least recently used first
        self.views: dict[int, list[torch.Tensor]] = {}  # piece -> its tensors' views in its slot
        self.ready: dict[int, torch.cuda.Event | None] = {}  # piece -> its copy-done event until first waited on
        self.next_piece: dict[int, int] = {}  # piece -> the piece read after it last time
        self.current: int | None = None
        self.trace: list[int] = []  # the pieces read by this forward, in order
        self.last_trace: list[int] = []  # and by the forward before it

    def _param(self, module: nn.Module, name: str) -> torch.Tensor:
        where = self.where.get((id(module), name))
        if where is None:  # cut into row chunks: only its own forward reads it, chunk by chunk
            return module._parameters[name]
        self._use(where[0])
        return self.views[where[0]][where[1]]

    def _chunked_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A linear (output rows) or an embedding (vocabulary rows) computed one chunk of rows at a
        time: each output element is computed as in the whole forward."""
        out = None
        for index in self.plan.splits[id(module)]:
            self._use(index)
            start, stop = self.plan.pieces[index].rows
            tensors = self.views[index]
            if _base_class(module) is nn.Linear:
                part = F.linear(x, tensors[0], tensors[1] if len(tensors) > 1 else None)
                if out is None:
                    out = part.new_empty((*part.shape[:-1], module.out_features))
                out[..., start:stop] = part
            else:
                inside = (x >= start) & (x < stop)
                part = F.embedding((x - start).clamp(0, stop - start - 1), tensors[0])
                out = torch.where(inside[..., None], part, 0 if out is None else out)
        return out

    def _allocate_slots(self) -> None:
        self.slots = [torch.empty(size, dtype=torch.uint8, device=self.device) for size in self.plan.slot_sizes]
        self.free_slots = list(range(len(self.slots)))
        self.slot_allocations += 1

    def _acquire(self, need: int, keep: set[int]) -> int | None:
        """A slot of at least `need` bytes: a free one, or the least recently used piece's (not in `keep`)."""
        if not self.slots:
            self._allocate_slots()
        fitting = [slot for slot in self.free_slots if self.slots[slot].numel() >= need]
        if fitting:  # the smallest that fits: without a budget each piece then gets the slot cut for it
            slot = min(fitting, key=lambda s: self.slots[s].numel())
            self.free_slots.remove(slot)
            return slot
        for piece, slot in self.slot_of.items():
            if piece not in keep and self.slots[slot].numel() >= need:
                del self.slot_of[piece], self.views[piece]
                self.ready.pop(piece, None)
                return slot
        return None

    def _load(self, index: int, slot: int) -> None:
        piece = self.plan.pieces[index]
        stream = self.copy_stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))  # the slot's last reader has run
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            views, offset = [], 0
            for _, _, entry in piece.entries:
                views.append(entry.view(self.slots[slot], offset))
                offset += entry.slot_bytes
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.bytes_copied += piece.transfer_bytes
        self.slot_of[index], self.views[index], self.ready[index] = slot, views, event

    def _use(self, index: int) -> None:
        if index == self.current:
            return
        if index not in self.slot_of:
            slot = self._acquire(self.plan.pieces[index].nbytes, keep=set())
            if slot is None:
                raise MemoryCapError("no slot holds this piece")  # excluded by the plan
            self._load(index, slot)
        self.slot_of.move_to_end(index)
        event = self.ready.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if self.current is not None:
            self.next_piece[self.current] = index
        self.current = index
        self.trace.append(index)
        if self.prefetch:
            self._prefetch(index)

    def _upcoming(self, index: int) -> list[int]:
        """The pieces expected after `index`: the rest of the previous forward's reads when this
        forward has read the same so far (a decode step reads what the one before it read: a piece
        read twice in a step, like THL's reader, is no ambiguity), then the piece that followed
        each last time."""
        depth = len(self.plan.slot_sizes) - 1
        position = len(self.trace) - 1
        ahead = []
        if position < len(self.last_trace) and self.last_trace[position] == index:
            ahead = self.last_trace[position + 1:position + 1 + 4 * depth]
        last = ahead[-1] if ahead else index
        while len(set(ahead) - {index}) < depth:
            last = self.next_piece.get(last)
            if last is None or last == index or last in ahead:
                break
            ahead.append(last)
        return ahead

    def _prefetch(self, index: int) -> None:
        """Copy the pieces expected next into the other slots while `index` computes."""
        depth = len(self.plan.slot_sizes) - 1
        keep = {index}
        for upcoming in self._upcoming(index) if depth > 0 else []:
            if len(keep) > depth:
                return
            if upcoming in keep:
                continue
            keep.add(upcoming)
            if upcoming in self.slot_of:
                continue
            slot = self._acquire(self.plan.pieces[upcoming].nbytes, keep)
            if slot is None:
                return
            self._load(upcoming, slot)

    # -- running ----------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, state: Any = None) -> Any:
        """The model's forward (inputs moved to the device)."""
        if self.trace:
            self.last_trace, self.trace = self.trace, []
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
                "bytes_copied": self.bytes_copied, "pieces": len(self.plan.pieces), "slots": len(self.plan.slot_sizes),
                "slot_bytes": self.plan.slot_bytes, "loaded_pieces": len(self.slot_of)}



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
