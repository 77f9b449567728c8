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
  MAX_SESSIONS of them per model.
- The prompt is prefilled eagerly in chunks of `prefill_chunk` tokens.
- Routed layers (MoD, DTF) run the causal router inside the graph: a token that skips a layer
  leaves the layer's output unchanged and its key is marked invalid, so shapes stay static.
- State tensors that a step replaces rather than updates in place (DTF's surprise history: the
  dict-of-tensor fields of the state) are copied back into fixed buffers inside the graph. While
  their shapes still change from step to step (a history shorter than its window) the step runs
  eagerly; the graph is captured at the first step that leaves every shape unchanged.
- The eager path (`model(ids, state=...)` with the growable cache) is the reference: greedy
  decoding gives the same tokens (`tests/test_gpu.py`).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from dynlm.errors import ConfigError
from dynlm.models.standard import TransformerLM
from dynlm.nn.cache import KVCache, StaticLayerKVCache

CAPACITY_MULTIPLE = 256  # cache lengths are rounded up to this, so nearby lengths share graphs
MAX_SESSIONS = 4  # static caches (and their graphs) kept per model; the oldest is dropped first


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


def _replaced_tensors(state: Any) -> dict[tuple[str, Any], torch.Tensor]:
    """Tensors a step replaces instead of updating in place: the values of dict fields."""
    found = {}
    for name, value in vars(state).items():
        if isinstance(value, dict):
            found.update({(name, key): t for key, t in value.items() if isinstance(t, torch.Tensor)})
    return found


def _signature(state: Any) -> tuple:
    return tuple(sorted((repr(key), tuple(t.shape), t.dtype) for key, t in _replaced_tensors(state).items()))


@dataclass
class _Session:
    """The static state of one (batch bucket, capacity) and its captured step."""

    state: KVCache
    ids: torch.Tensor  # [bucket, 1] the step's input
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [bucket, V] the graph's output
    signature: tuple = ()
    buffers: dict[tuple[str, Any], torch.Tensor] = field(default_factory=dict)  # replaced tensors, fixed


class GraphDecoder:
    """Prefill and decode a `TransformerLM` on the static cache, with captured decode steps on
    CUDA (see the module doc). Elsewhere (`capture` False) the steps run eagerly on the same
    preallocated buffers: no allocation per token."""

    def __init__(self, model: TransformerLM, prefill_chunk: int = 512, compile: bool = False):
        if not supports_static_cache(model):
            raise TypeError(f"{type(model).__name__} has no KV cache to make static")
        self._model = weakref.ref(model)  # the per-model cache below must not keep the model alive
        self.prefill_chunk = prefill_chunk
        self.capture = next(model.parameters()).device.type == "cuda"
        if compile and self.capture:
            raise ConfigError("compile=True compiles the eager static-cache step (CPU decoding)",
                              "on CUDA the step is captured in a graph already; drop compile")
        # The one-token step through inductor: fused elementwise ops, no per-op Python dispatch.
        # The state's host counters become symbolic after the first recompile, so a decode of n
        # tokens compiles twice, not n times (`tests/test_generate.py`).
        self.compiled_step = torch.compile(model) if compile else None
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.sessions: dict[tuple[int, int], _Session] = {}
        self.session: _Session | None = None
        self.batch_size = 0
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

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Start decoding rows `input_ids` [B, T] with room for `max_new_tokens`: returns the
        logits [B, V] at the last prompt position."""
        b, t = input_ids.shape
        bucket = batch_bucket(b)
        limit = self.model.config.max_position_embeddings
        capacity = -(-(t + max_new_tokens) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        capacity = max(t + max_new_tokens, min(capacity, limit))
        key = (bucket, capacity)
        if key not in self.sessions:
            while len(self.sessions) >= MAX_SESSIONS:
                self.sessions.pop(next(iter(self.sessions)))
            device = self.model.model.embed_tokens.weight.device
            self.sessions[key] = _Session(static_state(self.model, bucket, capacity),
                                          torch.zeros(bucket, 1, dtype=torch.long, device=device))
        session = self.sessions[key]
        state = session.state
        for layer in state.layers:
            layer.reset()
        state.position = 0
        for value in vars(state).values():
            if isinstance(value, dict):
                value.clear()
        ids = input_ids.to(session.ids.device)
        if bucket > b:
            ids = torch.cat([ids, ids.new_zeros(bucket - b, t)])
        self.session, self.batch_size = session, b
        for chunk in ids.split(self.prefill_chunk, dim=1):
            logits = self.model(chunk, state=state).logits[:, -1]
        return logits[:b]

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (`next_ids` [B]); returns the logits [B, V] (a view of the
        graph's output buffer: read it before the next step)."""
        session = self.session
        if session is None:
            raise RuntimeError("call prefill() before step()")
        b = self.batch_size
        session.ids[:b, 0].copy_(next_ids)
        signature = _signature(session.state)
        if session.graph is not None and signature == session.signature:
            self._load_buffers(session)
            session.graph.replay()
            self._advance(session.state)
            self.graph_steps += 1
            return session.logits[:b]
        step = self.compiled_step if self.compiled_step is not None else self.model
        logits = step(session.ids, state=session.state).logits[:, -1]
        self.eager_steps += 1
        if self.capture and session.graph is None and _signature(session.state) == signature:
            self._capture(session, signature)
        return logits[:b]

    # -- internals ------------------------------------------------------------------------------
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

    def _capture(self, session: _Session, signature: tuple) -> None:
        state = session.state
        session.buffers = {key: t.clone() for key, t in _replaced_tensors(state).items()}
        self._load_buffers(session)
        lengths = [layer.length for layer in state.layers]
        position = state.position
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model(session.ids, state=state).logits[:, -1]
            for (name, key), buffer in session.buffers.items():
                buffer.copy_(getattr(state, name)[key])
        # capture recorded the step without running it: undo its host-side effects
        for (name, key), buffer in session.buffers.items():
            getattr(state, name)[key] = buffer
        for layer, length in zip(state.layers, lengths):
            layer.length = length
        state.position = position
        session.graph, session.logits, session.signature = graph, logits, signature
        self.captures += 1


_DECODERS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, GraphDecoder]] = weakref.WeakKeyDictionary()


def _parameter_key(model: torch.nn.Module) -> tuple:
    # a graph reads parameters by address: a moved or re-typed model needs new graphs
    return tuple((t.data_ptr(), t.dtype) for t in list(model.parameters()) + list(model.buffers()))


def graph_decoder(model: TransformerLM, compile: bool = False) -> GraphDecoder:
    """The model's `GraphDecoder`, kept between calls while its parameters stay where they are
    (and `compile` is as before)."""
    key = (_parameter_key(model), compile)
    cached = _DECODERS.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    decoder = GraphDecoder(model, compile=compile)
    _DECODERS[model] = (key, decoder)
    return decoder
