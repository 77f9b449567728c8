"""KV caches: windowed eviction, the static (preallocated, graph-ready) cache, context limits."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import dynlm
from dynlm.errors import ConfigError, ContextLengthError
from dynlm.infer import graphs
from dynlm.infer.generate import generate_ids, iter_token_steps
from dynlm.infer.graphs import batch_bucket, graph_decoder
from dynlm.nn import Attention, KVCache, RotaryEmbedding
from dynlm.nn.attention import grouped_query_attention
from dynlm.nn.cache import LayerKVCache, StaticLayerKVCache

# chunk sizes fed one after another: a prompt, single tokens, then a second multi-token chunk
# (longer than the window, so a ring wraps inside it), then single tokens again
CHUNKS = [5, 1, 1, 6, 2, 1, 1]


def _chunked(attn: Attention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache) -> torch.Tensor:
    parts, start = [], 0
    for n in CHUNKS:
        parts.append(attn(x[:, start:start + n], cos[start:start + n], sin[start:start + n], cache))
        start += n
    return torch.cat(parts, 1)


def _attention_and_input(window: int | None):
    attn = Attention(16, 4, 2, 8, sliding_window=window)
    x = torch.randn(2, sum(CHUNKS), 16)
    cos, sin = RotaryEmbedding(8)(torch.arange(x.shape[1]), x.dtype)
    return attn, x, cos, sin


@pytest.mark.parametrize("window", [1, 3, 4])
def test_windowed_cache_evicts_and_equals_full_attention(window):
    """Feeding chunks through a windowed cache gives full-sequence windowed attention, while the
    cache holds no more than the window - 1 positions a next query can see."""
    attn, x, cos, sin = _attention_and_input(window)
    cache = LayerKVCache()
    out = _chunked(attn, x, cos, sin, cache)
    torch.testing.assert_close(out, attn(x, cos, sin), atol=1e-5, rtol=1e-4)
    assert cache.length == x.shape[1]
    assert cache.k.shape[2] == window - 1


@pytest.mark.parametrize("window", [None, 3, 4, 64])
def test_static_cache_equals_full_attention(window):
    """The preallocated cache (a ring of `window` slots for a windowed layer, the whole context
    otherwise) gives the same attention as one full pass, for a second multi-token chunk too."""
    attn, x, cos, sin = _attention_and_input(window)
    cache = StaticLayerKVCache(2, 2, 8, capacity=x.shape[1], window=window)
    assert cache.k.shape[2] == (window if window is not None and window < x.shape[1] else x.shape[1])
    out = _chunked(attn, x, cos, sin, cache)
    torch.testing.assert_close(out, attn(x, cos, sin), atol=1e-5, rtol=1e-4)
    assert int(cache.cursor) == cache.length == x.shape[1]


def test_static_cache_key_valid_and_reset():
    """Invalid keys stay invisible in the static cache; `reset` empties it in place."""
    attn, x, cos, sin = _attention_and_input(None)
    cache = StaticLayerKVCache(2, 2, 8, capacity=8)
    dyn = LayerKVCache()
    valid = torch.tensor([[True, False, True], [False, True, True]])
    for c in (cache, dyn):
        attn(x[:, :3], cos[:3], sin[:3], c, key_valid=valid)
    torch.testing.assert_close(attn(x[:, 3:5], cos[3:5], sin[3:5], cache),
                               attn(x[:, 3:5], cos[3:5], sin[3:5], dyn), atol=1e-5, rtol=1e-4)
    address = cache.k.data_ptr()
    cache.reset()
    fresh = LayerKVCache()
    torch.testing.assert_close(attn(x[:, :4], cos[:4], sin[:4], cache), attn(x[:, :4], cos[:4], sin[:4], fresh),
                               atol=1e-5, rtol=1e-4)
    assert cache.k.data_ptr() == address


@pytest.mark.parametrize("window", [None, 3])
def test_static_cache_from_tensors_equals_the_static_cache(window):
    """A cache rebuilt at every step from its tensors and cursor (the functional decode step that
    the ONNX export traces) knows which position each slot holds, ring included."""
    attn, x, cos, sin = _attention_and_input(window)
    length = x.shape[1]
    reference = StaticLayerKVCache(2, 2, 8, capacity=length, window=window)
    k, v, cursor = torch.zeros_like(reference.k), torch.zeros_like(reference.v), torch.zeros((), dtype=torch.long)
    for i in range(length):
        step = StaticLayerKVCache.from_tensors(k, v, cursor, capacity=length)
        torch.testing.assert_close(step.slot_positions, reference.slot_positions)
        out = attn(x[:, i:i + 1], cos[i:i + 1], sin[i:i + 1], step)
        torch.testing.assert_close(out, attn(x[:, i:i + 1], cos[i:i + 1], sin[i:i + 1], reference), atol=1e-5,
                                   rtol=1e-4)
    assert int(cursor) == length


def test_static_cache_refuses_positions_past_its_length():
    attn, x, cos, sin = _attention_and_input(None)
    cache = StaticLayerKVCache(2, 2, 8, capacity=4)
    attn(x[:, :3], cos[:3], sin[:3], cache)
    with pytest.raises(ContextLengthError, match="position 5 is past the allocated cache length 4"):
        attn(x[:, 3:5], cos[3:5], sin[3:5], cache)


def _static_state(model, batch: int, capacity: int) -> KVCache:
    c = model.config
    state = model.init_state(batch)
    state.layers = [StaticLayerKVCache(batch, c.num_kv_heads, c.head_dim, capacity,
                                       c.sliding_window if c.uses_sliding_window(i) else None)
                    for i in range(c.num_layers)]
    return state


@pytest.mark.parametrize("arch,overrides", [("standard", {"sliding_window": 3}), ("mod", {}), ("dtf", {})])
def test_model_static_cache_equals_dynamic(arch, overrides):
    """A model run chunk by chunk on static layer caches gives the logits of the growable cache
    (routed models: causal routing, the skipped tokens' keys masked in place)."""
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=97, **overrides).eval()
    ids = torch.randint(0, 97, (2, sum(CHUNKS)))
    dynamic, static = model.init_state(2), _static_state(model, 2, ids.shape[1])
    start = 0
    with torch.no_grad():
        for n in CHUNKS:
            a = model(ids[:, start:start + n], state=dynamic).logits
            b = model(ids[:, start:start + n], state=static).logits
            torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
            start += n
    assert static.position == dynamic.position == ids.shape[1]


def test_generation_refuses_contexts_past_max_positions():
    model = dynlm.build_model("standard-tiny", vocab_size=97, max_position_embeddings=32).eval()
    prompt = torch.randint(0, 97, (1, 20))
    assert generate_ids(model, prompt, max_new_tokens=12).shape == (1, 32)
    with pytest.raises(ContextLengthError, match="20 prompt tokens \\+ 13 new tokens = 33 positions, past the "
                                                 "model's max_position_embeddings 32"):
        generate_ids(model, prompt, max_new_tokens=13)


@pytest.mark.parametrize("arch,overrides", [("standard", {"sliding_window": 5}), ("mod", {}), ("dtf", {})])
def test_static_decoder_generates_the_eager_tokens(arch, overrides):
    """The generation engine on the static cache (what CUDA captures; eager on a CPU) gives the
    eager path's greedy tokens, with 3 distinct prompts padded to a batch bucket of 4."""
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=97, **overrides).eval()
    prompts = torch.randint(0, 97, (3, 7))
    eager = generate_ids(model, prompts, max_new_tokens=12, graphs=False)
    static = generate_ids(model, prompts, max_new_tokens=12, graphs=True)
    assert torch.equal(static, eager)
    decoder = graph_decoder(model)
    assert decoder.session.state.layers[0].k.shape[0] == batch_bucket(3) == 4
    assert decoder.eager_steps == 11 and decoder.graph_steps == 0  # nothing is captured on a CPU


@pytest.mark.parametrize("mask_kind", ["none", "2d", "4d"])
def test_grouped_query_attention_equals_expanded_heads(mask_kind):
    """Folding the query heads of a key head into query rows gives `enable_gqa` attention."""
    q, k, v = torch.randn(2, 6, 3, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = {"none": None, "2d": torch.rand(3, 5) > 0.3, "4d": torch.rand(2, 1, 3, 5) > 0.3}[mask_kind]
    if mask is not None:
        mask[..., 0] = True  # every query sees a key
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(grouped_query_attention(q, k, v, mask), expected, atol=1e-5, rtol=1e-4)


def test_kept_decoder_does_not_keep_the_model_alive():
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    generate_ids(model, torch.randint(0, 97, (2, 5)), max_new_tokens=3, graphs=True)
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_attend_bucket_covers_every_filled_position():
    assert [graphs.attend_bucket(p, 1024) for p in (0, 255, 256, 511, 512, 1000)] == [256, 256, 512, 512, 1024, 1024]
    assert graphs.attend_bucket(300, 320) == 320  # never past the buffer


def _decode_with(decoder: graphs.GraphDecoder, prompts: torch.Tensor, new_tokens: int, room: int) -> torch.Tensor:
    """Greedy tokens from a GraphDecoder, the cache allocated with `room` positions to spare."""
    tokens = [decoder.prefill(prompts, room).argmax(-1)]
    for _ in range(new_tokens - 1):
        tokens.append(decoder.step(tokens[-1]).argmax(-1))
    return torch.cat([prompts, torch.stack(tokens, 1)], dim=1)


def test_length_buckets_attend_over_the_filled_prefix_and_keep_the_tokens(monkeypatch):
    """With small buckets the steps cross three of them (8, 16, 32 slots of a 64-slot cache) and
    still give the eager path's greedy tokens; each step reads only its bucket."""
    monkeypatch.setattr(graphs, "MIN_ATTEND", 8)
    monkeypatch.setattr(graphs, "CAPACITY_MULTIPLE", 64)
    model = dynlm.build_model("mod-tiny", vocab_size=97).eval()  # routed: the validity marks are sliced too
    prompts = torch.randint(0, 97, (3, 5))
    eager = generate_ids(model, prompts, max_new_tokens=20, graphs=False)
    decoder = graphs.GraphDecoder(model)
    seen = []
    update = StaticLayerKVCache.update

    def recording_update(self, k, v, valid=None, window=None):
        keys = update(self, k, v, valid, window)
        if k.shape[2] == 1:
            seen.append(keys[0].shape[2])
        return keys

    monkeypatch.setattr(StaticLayerKVCache, "update", recording_update)
    assert torch.equal(_decode_with(decoder, prompts, 20, 40), eager)
    assert decoder.session.state.layers[0].k.shape[2] == 64
    assert sorted(set(seen)) == [8, 16, 32]


def _compiled_decoder_keeps_the_eager_tokens(model: torch.nn.Module, new_tokens: int) -> tuple:
    """Greedy decoding through a compiling GraphDecoder (dynamo with a counting backend) equals
    the eager path; returns the decoder and the counter of traced frames."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    prompts = torch.randint(0, 97, (2, 6))
    eager = generate_ids(model, prompts, max_new_tokens=new_tokens, graphs=False)
    decoder = graphs.GraphDecoder(model, compile="default", compile_backend=counter)
    assert torch.equal(_decode_with(decoder, prompts, new_tokens, new_tokens), eager)
    return decoder, counter


@pytest.mark.slow  # dynamo's tracing takes ~15 s on a loaded 2-core machine
def test_compiled_step_traces_once_per_bucket_and_keeps_the_tokens():
    """The step under `torch.compile` (dynamo's tracing; the eager backend keeps the test fast on
    a CPU) gives the eager tokens, and the host counters do not make it recompile per position."""
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    decoder, counter = _compiled_decoder_keeps_the_eager_tokens(model, new_tokens=10)
    assert counter.frame_count == 1  # one bucket, one trace (not one per position)
    assert decoder.session.state.layers[0].length == decoder.session.state.position == 15


def test_a_compiling_decoder_steps_dtf_uncompiled_and_keeps_its_tokens():
    """DTF's surprise history grows a step at a time: compiled, its step would trace once per
    length (and on CUDA once more inside the graph capture, which fails). A compiling decoder
    steps it uncompiled, with the eager tokens; a standard model's session is still compiled."""
    model = dynlm.build_model("dtf-tiny", vocab_size=97).eval()
    decoder, counter = _compiled_decoder_keeps_the_eager_tokens(model, new_tokens=12)
    assert counter.frame_count == 0 and not decoder.session.compiled
    assert decoder.session.state.position == 6 + 11
    standard_model = dynlm.build_model("standard-tiny", vocab_size=97).eval()  # the decoder holds a weak reference
    standard = graphs.GraphDecoder(standard_model, compile="default", compile_backend=counter)
    standard.prefill(torch.randint(0, 97, (2, 6)), 4)
    assert standard.session.compiled


def test_interleaved_generations_keep_their_own_static_caches():
    """Two generations advanced token by token in turn (what the server does with concurrent
    requests) on the static cache: each gives its own eager tokens; the sessions are reused after."""
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 6))
    steps_a = iter_token_steps(model, a, 10, graphs=True)
    steps_b = iter_token_steps(model, b, 10, graphs=True)
    tokens_a, tokens_b = [], []
    for _ in range(10):
        tokens_a.append(next(steps_a))
        tokens_b.append(next(steps_b))
    for steps in (steps_a, steps_b):
        assert next(steps, None) is None  # finished: the session is released
    assert torch.equal(torch.cat([a, torch.stack(tokens_a, 1)], 1), generate_ids(model, a, 10, graphs=False))
    assert torch.equal(torch.cat([b, torch.stack(tokens_b, 1)], 1), generate_ids(model, b, 10, graphs=False))
    decoder = graph_decoder(model)
    assert len(decoder.sessions) == 2 and not any(s.busy for s in decoder.sessions)
    generate_ids(model, a, 10, graphs=True)
    assert len(decoder.sessions) == 2  # reused, not a third


def test_exclusive_sessions_are_not_reset_by_another_prefill():
    """Logits of a session stepped after another prompt was prefilled equal the eager logits of
    its own prompt (a shared session would continue the other prompt)."""
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    a, b = torch.randint(0, 97, (1, 6)), torch.randint(0, 97, (1, 9))
    decoder = graphs.GraphDecoder(model)
    decoder.prefill(a, 4, exclusive=True)
    session_a = decoder.session
    decoder.prefill(b, 4, exclusive=True)
    assert decoder.session is not session_a
    token = torch.tensor([5])
    with torch.no_grad():
        expected = model(torch.cat([a, token[:, None]], 1)).logits[:, -1]
        torch.testing.assert_close(decoder.step(token, session_a), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_compiled_static_decoder_generates_the_eager_tokens_without_a_compile_per_position():
    """`compile=True` (the static-cache step through torch.compile, here on a CPU) gives the eager
    greedy tokens without a compile per position (compiling the whole model with `dynamic=False`
    made 8 graphs for this decode and then fell back to eager)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    prompts = torch.randint(0, 97, (2, 7))
    eager = generate_ids(model, prompts, max_new_tokens=12, graphs=False)
    assert torch.equal(generate_ids(model, prompts, max_new_tokens=12, compile=True), eager)
    assert counters["stats"]["unique_graphs"] <= 2
    with pytest.raises(ConfigError, match="compile=True compiles the static-cache step"):
        generate_ids(model, prompts, max_new_tokens=2, compile=True, graphs=False)


def test_a_compiled_forward_with_a_cache_refuses_instead_of_losing_its_position():
    """Inside compiled code the model does not advance the cache's host position (its value would
    specialise the compiled code); only a caller that advances it (the GraphDecoder's compiled
    step) may run it so: anyone else gets an error, not wrong rotary positions."""
    torch._dynamo.reset()
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad(), pytest.raises(ConfigError, match="cannot advance its position"):
        compiled(torch.randint(0, 97, (1, 4)), state=model.init_state(1))
