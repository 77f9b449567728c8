"""CUDA-graph decoding: a static, preallocated KV cache and the one-token step replayed as a graph.

An eager decode step of a small model costs far more in Python and kernel launches than in GPU
work (a few hundred kernels of microseconds each). With every buffer preallocated and the position
counter on the device (`StaticLayerKVCache`), the step has the same shapes and addresses at every
call, so it is captured once with `torch.cuda.CUDAGraph` and replayed: one launch per token.

    decoder = graph_decoder(model)                    # one per model; graphs are kept between calls
    logits = decoder.prefill(input_ids, max_new_tokens=64)   # [B, V], last prompt position
    logits = decoder.step(next_ids)                   # [B, V], valid until the next step

- Graphs are kept per batch-size bucket (the next power of two: rows are padded with token 0,
  every row is independent, padded rows are dropped) and per cache length (rounded up), at most
  MAX_SESSIONS idle ones per model (`max_idle_sessions`). A session in use (between `prefill`
  and `release`) is never shared: concurrent generations (a server interleaving requests token by
  token) each get their own static cache, passing the session that `prefill` returned to `step`.
- The prompt is prefilled eagerly in chunks of `prefill_chunk` tokens.
- Routed layers (MoD, DTF) run the causal router inside the graph: a token that skips a layer
  leaves the layer's output unchanged and its key is marked invalid, so shapes stay static.
- State tensors that a step replaces rather than updates in place (DTF's surprise history: the
  dict-of-tensor fields of the state) are copied back into fixed buffers inside the graph. While
  their shapes still change from step to step (a history shorter than its window) the step runs
  eagerly; the graph is captured at the first step that leaves every shape unchanged.
- Length buckets (`length_buckets`, on by default): a step attends only over the first n slots
  of the cache, n the next power of two above the filled positions (at least MIN_ATTEND, at most
  the capacity), instead of the whole buffer; one graph per (batch bucket, capacity, n). At a
  context of 4K in a 16K cache a step reads a quarter of the keys.
- `compile` (a `torch.compile` mode, "default" or "max-autotune-no-cudagraphs"): the step is
  compiled with inductor first and the compiled step is what the graph captures, so a replay
  runs fused kernels (RMSNorm, RoPE, residuals, the mask and softmax) instead of ~55 small ones a
  layer. Each graph shape compiles once (tens of seconds for a 24-layer model). A state whose
  step replaces tensors of growing shape (DTF's surprise history) is stepped uncompiled (its
  graphs capture the eager step): it would compile once per history length, and once more
  inside the capture, which CUDA refuses.
- `fuse_projections` (default: on when `compile` is set): inside the decode step q, k, v are one
  matmul through their concatenated weight and gate, up another (`nn/fusion.py`; a small step is
  bound by matmul launches, not by reading the weights). The concatenations are copies held by
  the decoder, refreshed at every `prefill`: weights changed between generations are seen by the
  next one; parameters and `state_dict` are untouched. Prefill runs the separate projections.
- `decode_attention` ("auto" or one of `DECODE_KERNELS`): the attention of a one-token step over
  the static cache. "sdpa" is the reference (`grouped_query_attention`: B x Hkv thread blocks walk
  the keys); "math" and "split" spread the keys over the GPU (`nn/decode_attention.py`), which
  matters at long contexts; they are fused kernels only under `compile`. "auto" takes what was
  measured fastest on an H200 (`default_decode_kernel`): without `compile` "sdpa"; with it
  "split" at batch 1 and "math" above.
- The eager path (`model(ids, state=...)` with the growable cache) is the reference: greedy
  decoding gives the same tokens (`tests/test_gpu_graphs.py`).
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch._dynamo  # its config: recompile limits for the compiled step

from dynlm.models.standard import TransformerLM
from dynlm.nn.cache import KVCache, StaticLayerKVCache
from dynlm.nn.decode_attention import DECODE_KERNELS
from dynlm.nn.fusion import FusedProjections

CAPACITY_MULTIPLE = 256  # cache lengths are rounded up to this, so nearby lengths share graphs
MAX_SESSIONS = 4  # idle static caches (and their graphs) kept per model; the oldest is dropped first
MIN_ATTEND = 256  # the smallest length bucket a step attends over
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # modes that leave graph capture to us
DECODE_ATTENTION = "auto"  # the decode-step attention kernel by default (see `default_decode_kernel`)


def default_decode_kernel(compiled: bool, batch_bucket: int) -> str:
    """The decode attention "auto" picks, from one H200 run (benchmarks/results/
    gpu_decode_kernels_h200.md, Qwen2.5-0.5B shape, compiled step in our graph): at 4K keys, batch
    1, "split" 723.6 tokens/s against "sdpa" 134.7; at batch 8, "math" 4,473.5 against 1,116.7 (its
    split row did not fit the run's time; alone, per layer, math took 18.9 us and split 26.3). Not
    compiled, math and split are a dozen small kernels each, not measured against SDPA's one."""
    if not compiled:
        return "sdpa"
    return "split" if batch_bucket == 1 else "math"


def supports_static_cache(model: torch.nn.Module) -> bool:
    """True for the transformer family (standard, MoD, DTF), whose state is a KV cache."""
    return isinstance(model, TransformerLM)


def graphs_by_default(model: torch.nn.Module) -> bool:
    """True where captured decoding is the default: a transformer-family model on CUDA."""
    return supports_static_cache(model) and next(model.parameters()).device.type == "cuda"


def batch_bucket(batch_size: int) -> int:
    """The next power of two >= batch_size."""
    return 1 << max(0, batch_size - 1).bit_length()


def static_state(model: TransformerLM, batch_size: int, capacity: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> KVCache:
    """The model's state with preallocated static layer caches of `capacity` positions (a ring of
    `sliding_window` slots for windowed layers)."""
    c = model.config
    embedding = model.model.embed_tokens.weight  # the activations' device and dtype
    device = device if device is not None else embedding.device
    dtype = dtype or embedding.dtype
    state = model.init_state(batch_size, device=device, dtype=dtype)
    state.layers = [StaticLayerKVCache(batch_size, c.num_kv_heads, c.head_dim, capacity,
                                       c.sliding_window if c.uses_sliding_window(i) else None, device, dtype)
                    for i in range(c.num_layers)]
    return state


def attend_bucket(next_position: int, slots: int) -> int:
    """Slots a step at `next_position` attends over: the next power of two above it (so it
    covers positions 0..next_position), at least MIN_ATTEND, at most `slots`."""
    return min(slots, max(MIN_ATTEND, 1 << next_position.bit_length()))


def _decode_logits(model: TransformerLM, ids: torch.Tensor, state: KVCache) -> torch.Tensor:
    """The one-token step: logits [B, V] (the function `compile` compiles)."""
    return model(ids, state=state).logits[:, -1]


def _replaced_tensors(state: Any) -> dict[tuple[str, Any], torch.Tensor]:
    """Tensors a step replaces instead of updating in place: the values of dict fields."""
    found = {}
    for name, value in vars(state).items():
        if isinstance(value, dict):
            found.update({(name, key): t for key, t in value.items() if isinstance(t, torch.Tensor)})
    return found


def _has_replaced_fields(state: Any) -> bool:
    """True if the state has dict fields, whose tensors a step replaces (see `_replaced_tensors`)."""
    return any(isinstance(value, dict) for value in vars(state).values())


def _signature(state: Any) -> tuple:
    return tuple(sorted((repr(key), tuple(t.shape), t.dtype) for key, t in _replaced_tensors(state).items()))


@dataclass
class _Session:
    """The static state of one (batch bucket, capacity) and its captured step."""

    state: KVCache
    ids: torch.Tensor  # [bucket, 1] the step's input
    graphs: dict[int | None, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = field(default_factory=dict)
    # ^ per attended length (None: the whole buffer): the graph and its output logits [bucket, V]
    signature: tuple | None = None  # the replaced tensors' shapes every graph was captured with
    key: tuple[int, int] = (0, 0)  # (batch bucket, capacity)
    batch_size: int = 0  # rows in use
    busy: bool = False  # a generation is using it (between prefill and release)
    buffers: dict[tuple[str, Any], torch.Tensor] = field(default_factory=dict)  # replaced tensors, fixed
    compiled: bool = False  # its step runs the decoder's compiled function (see `prefill`)


class GraphDecoder:
    """Prefill and decode a `TransformerLM` on the static cache, with captured decode steps on
    CUDA (see the module doc). Elsewhere (`capture` False) the steps run eagerly on the same
    preallocated buffers: no allocation per token."""

    def __init__(self, model: TransformerLM, prefill_chunk: int = 512, compile: str | None = None,
                 length_buckets: bool = True, compile_backend: str = "inductor",
                 decode_attention: str = DECODE_ATTENTION, fuse_projections: bool | None = None):
        if not supports_static_cache(model):
            raise TypeError(f"{type(model).__name__} has no KV cache to make static")
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(f"compile mode {compile!r} is not one of {', '.join(COMPILE_MODES)} (the modes that "
                             "leave CUDA graphs to this decoder)")
        if decode_attention != "auto" and decode_attention not in DECODE_KERNELS:
            raise ValueError(f"decode attention {decode_attention!r} is not one of auto, {', '.join(DECODE_KERNELS)}")
        self.decode_attention = decode_attention
        self._model = weakref.ref(model)  # the per-model cache below must not keep the model alive
        self.prefill_chunk = prefill_chunk
        self.length_buckets = length_buckets
        self.compile = compile
        self._step_fn = _decode_logits
        if compile is not None:
            # one compilation per graph shape (batch bucket, capacity, attended length)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            torch._dynamo.config.accumulated_recompile_limit = max(
                torch._dynamo.config.accumulated_recompile_limit, 256)
            self._step_fn = torch.compile(_decode_logits, mode=None if compile == "default" else compile,
                                          dynamic=False, backend=compile_backend)
        if fuse_projections is None:
            fuse_projections = compile is not None
        # the decode step's q|k|v and gate|up matmuls through concatenated copies of the weights,
        # refreshed at every prefill (see the module doc)
        self.fused = FusedProjections(model) if fuse_projections else None
        self.capture = next(model.parameters()).device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.sessions: list[_Session] = []  # oldest first
        self.session: _Session | None = None  # the latest prefilled: `step`'s default
        self.max_idle_sessions = MAX_SESSIONS
        self.eager_steps = 0  # decode steps run eagerly (before a graph could be captured)
        self.graph_steps = 0  # decode steps replayed from a graph
        self.captures = 0

    @property
    def model(self) -> TransformerLM:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this GraphDecoder was deleted")
        return model

    def clear(self) -> None:
        """Free every static cache and graph."""
        self.sessions.clear()
        self.session = None

    def release(self, session: _Session) -> None:
        """The generation that prefilled `session` with `exclusive=True` is over: the session may
        be reused (or dropped when too many are idle)."""
        session.busy = False
        self._trim(self.max_idle_sessions)

    def _trim(self, keep: int) -> None:
        idle = [s for s in self.sessions if not s.busy]
        for old in idle[: max(0, len(idle) - keep)]:
            self.sessions.remove(old)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int, exclusive: bool = False) -> torch.Tensor:
        """Start decoding rows `input_ids` [B, T] with room for `max_new_tokens`: returns the
        logits [B, V] at the last prompt position; the session used is `self.session`.
        `exclusive`: no other prefill may take this session until `release(session)` (for
        generations that run interleaved)."""
        b, t = input_ids.shape
        bucket = batch_bucket(b)
        limit = self.model.config.max_position_embeddings
        capacity = -(-(t + max_new_tokens) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        capacity = max(t + max_new_tokens, min(capacity, limit))
        key = (bucket, capacity)
        session = next((s for s in self.sessions if s.key == key and not s.busy), None)
        if session is None:
            self._trim(self.max_idle_sessions - 1)  # room for the new one
            device = self.model.model.embed_tokens.weight.device  # an int8 head has no .weight
            state = static_state(self.model, bucket, capacity)
            # a state with replaced tensors (DTF's surprise history) is stepped uncompiled: their
            # shapes grow step by step (a compile each), and at capture dynamo compiled once more
            # inside the capture, which CUDA refuses (found on an H200)
            compiled = self.compile is not None and not _has_replaced_fields(state)
            state.caller_advances_counters = compiled  # see `step`
            kernel = self.decode_attention
            if kernel == "auto":
                kernel = default_decode_kernel(compiled, bucket)
            for layer in state.layers:
                layer.decode_kernel = kernel
            session = _Session(state, torch.zeros(bucket, 1, dtype=torch.long, device=device), key=key,
                               compiled=compiled)
            self.sessions.append(session)
        else:  # most recently used last
            self.sessions.remove(session)
            self.sessions.append(session)
        session.busy = exclusive
        state = session.state
        for layer in state.layers:
            layer.reset()
        state.position = 0
        for value in vars(state).values():
            if isinstance(value, dict):
                value.clear()
        if self.fused is not None:
            self.fused.refresh()  # weights changed since the last generation are seen by this one
        ids = input_ids.to(session.ids.device)
        if bucket > b:
            ids = torch.cat([ids, ids.new_zeros(bucket - b, t)])
        self.session, session.batch_size = session, b
        for chunk in ids.split(self.prefill_chunk, dim=1):
            logits = self.model(chunk, state=state).logits[:, -1]
        return logits[:b]

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor, session: _Session | None = None) -> torch.Tensor:
        """Feed one token per row (`next_ids` [B]) to `session` (default: the latest prefilled);
        returns the logits [B, V] (a view of the graph's output buffer: read it before the next
        step of this session)."""
        session = session or self.session
        if session is None:
            raise RuntimeError("call prefill() before step()")
        b = session.batch_size
        session.ids[:b, 0].copy_(next_ids)
        state = session.state
        attend = None
        if self.length_buckets:
            attend = attend_bucket(state.layers[0].length, state.layers[0].max_length)
        for layer in state.layers:
            layer.attend = attend
        signature = _signature(state)
        captured = session.graphs.get(attend)
        if captured is not None and signature == session.signature:
            self._load_buffers(session)
            captured[0].replay()
            self._advance(state)
            self.graph_steps += 1
            return captured[1][:b]
        with self._fused():
            logits = self._step_function(session)(self.model, session.ids, state)
        if session.compiled:  # the compiled step leaves the host counters to us
            self._advance(state)
        self.eager_steps += 1
        if (self.capture and _signature(state) == signature
                and (session.signature is None or session.signature == signature)):
            self._capture(session, signature, attend)
        return logits[:b]

    # -- internals ------------------------------------------------------------------------------
    def _step_function(self, session: _Session) -> Any:
        """The compiled step for a compiled session, the plain one otherwise (see `prefill`)."""
        return self._step_fn if session.compiled else _decode_logits

    def _fused(self) -> AbstractContextManager:
        """The decode step's projections through the fused weights, when this decoder fuses."""
        return nullcontext() if self.fused is None else self.fused.applied()

    def _load_buffers(self, session: _Session) -> None:
        """Point the state's replaced tensors at the graph's fixed buffers (copying the values)."""
        for (name, key), buffer in session.buffers.items():
            holder = getattr(session.state, name)
            if holder[key] is not buffer:
                buffer.copy_(holder[key])
                holder[key] = buffer

    @staticmethod
    def _advance(state: KVCache) -> None:
        """Host-side counters a replay does not run: one position more."""
        state.position += 1
        for layer in state.layers:
            layer.length += 1

    def _capture(self, session: _Session, signature: tuple, attend: int | None) -> None:
        state = session.state
        session.buffers = {key: t.clone() for key, t in _replaced_tensors(state).items()}
        self._load_buffers(session)
        lengths = [layer.length for layer in state.layers]
        position = state.position
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), self._fused():
            logits = self._step_function(session)(self.model, session.ids, state)
            for (name, key), buffer in session.buffers.items():
                buffer.copy_(getattr(state, name)[key])
        # capture recorded the step without running it: undo its host-side effects
        for (name, key), buffer in session.buffers.items():
            getattr(state, name)[key] = buffer
        for layer, length in zip(state.layers, lengths):
            layer.length = length
        state.position = position
        session.graphs[attend], session.signature = (graph, logits), signature
        self.captures += 1


_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str | None, tuple[tuple, GraphDecoder]]] = \
    weakref.WeakKeyDictionary()


def _parameter_key(model: torch.nn.Module) -> tuple:
    # a graph reads parameters by address: a moved or re-typed model needs new graphs
    return tuple((t.data_ptr(), t.dtype) for t in list(model.parameters()) + list(model.buffers()))


def graph_decoder(model: TransformerLM, compile: str | None = None) -> GraphDecoder:
    """The model's `GraphDecoder` (one per compile mode), kept between calls while its parameters
    stay where they are."""
    key = _parameter_key(model)
    decoders = _DECODERS.setdefault(model, {})
    cached = decoders.get(compile)
    if cached is not None and cached[0] == key:
        return cached[1]
    decoder = GraphDecoder(model, compile=compile)
    decoders[compile] = (key, decoder)
    return decoder
