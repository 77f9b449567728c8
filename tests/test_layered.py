"""The layered engine gives the normal forward's logits for every registered architecture, with
its weights streamed from host memory (on CPU here: no GPU needed), under a cap that forces it to
evict and reload units."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.config import model_config
from dynlm.errors import ConfigError, ContextLengthError
from dynlm.infer.generate import generate_ids
from dynlm.infer.layered import LayeredEngine, MemoryCapError, parse_bytes, state_capacity_bytes, streamable_units

VOCAB = 97
ARCHITECTURES = dynlm.list_architectures()


def tiny(arch: str):
    torch.manual_seed(0)
    return dynlm.build_model(f"{arch}-tiny", vocab_size=VOCAB).eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_streamed_logits_equal_the_normal_forward(arch):
    model = tiny(arch)
    x = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        expected_ids = generate_ids(model, x[:, :6], max_new_tokens=5)
    units = streamable_units(model)
    largest = max(sum(p.numel() * 4 for p in u.parameters()) for u in units)
    resident = sum(p.numel() * 4 for p in model.parameters()) - sum(
        p.numel() * 4 for p in {id(p): p for u in units for p in u.parameters()}.values())
    engine = LayeredEngine(model, device="cpu", max_gpu_memory=resident + 3 * largest // 2)  # one unit at a time
    state = engine.init_state(2)
    first = engine(x[:, :4], state=state)
    rest = engine(x[:, 4:], state=first.state)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)
    assert engine.bytes_copied > sum(engine.unit_bytes)  # units were evicted and streamed again
    assert len(engine.slots) >= 2  # the largest unit was cut so that two slots fit: copy overlaps compute
    assert torch.equal(engine.generate(x[:, :6], max_new_tokens=5), expected_ids)


def test_int8_weights_stay_close():
    model = tiny("standard")
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        full = model(x).logits
    engine = LayeredEngine(model, device="cpu", int8=True)
    quantized = engine(x).logits
    assert (quantized - full).abs().max() < 0.05 * full.abs().max()
    assert sum(engine.transfer_bytes) < 0.3 * sum(engine.unit_bytes)  # int8 + one scale per row vs fp32


def test_memory_cap_smaller_than_a_piece_is_an_error():
    with pytest.raises(MemoryCapError, match="cannot hold the largest weight piece"):
        LayeredEngine(tiny("standard"), device="cpu", max_gpu_memory=1000)


def test_cap_budget_counts_a_preallocated_kv_cache_in_full():
    """The 7B table's standard rows ran out of memory because an empty pre-allocated KV cache
    counted as 0 bytes (state_nbytes counts filled positions): the budget must subtract its capacity."""
    model = tiny("standard")
    c = model.config
    batch, length = 3, 40
    kv_bytes = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * length * 4  # k and v, fp32
    state = model.init_state(batch, device="meta", dtype=torch.float32, max_length=length)
    assert state_capacity_bytes(state) == kv_bytes
    engine = LayeredEngine(model, device="cpu")
    cap, headroom = 10 * 2**20, 2**20
    engine.fit_to_cap(cap, state, headroom)
    assert engine.budget == cap - engine.resident_bytes - kv_bytes - headroom
    needed = engine.resident_bytes + kv_bytes + engine.smallest_slot_bytes + headroom
    assert engine.bytes_needed(state, headroom) == needed
    with pytest.raises(MemoryCapError, match=f"does not fit: {needed / 2**20:,.1f} MiB needed") as error:
        engine.fit_to_cap(needed - 1, state, headroom)
    assert "\n" not in str(error.value)
    engine.fit_to_cap(needed, state, headroom)  # one slot: enough


def test_thl_state_capacity_is_its_fixed_tensors():
    model = tiny("thl")
    state = model.init_state(2, device="meta")
    assert state_capacity_bytes(state) == model.state_nbytes(state) > 0


@pytest.mark.parametrize("text,value", [("300MB", 300_000_000), ("4GiB", 4 * 2**30), ("1.5 GB", 1_500_000_000)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["300XB", "-1GB", "GB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError):
        parse_bytes(text)


def test_context_longer_than_the_positions_is_an_error():
    engine = LayeredEngine(tiny("standard"), device="cpu")
    limit = engine.model.config.max_position_embeddings
    with pytest.raises(ContextLengthError, match=str(limit)):
        engine.generate(torch.zeros(1, 8, dtype=torch.long), max_new_tokens=limit)


@pytest.mark.parametrize("arch", ["standard", "thl"])
def test_streaming_from_a_memory_mapped_checkpoint(arch, tmp_path):
    model = tiny(arch)
    model.save_pretrained(tmp_path / "ckpt")
    x = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x).logits
    engine = LayeredEngine.from_checkpoint(tmp_path / "ckpt", device="cpu")
    torch.testing.assert_close(engine(x).logits, full, atol=1e-5, rtol=1e-5)
    copied = engine.bytes_copied
    torch.testing.assert_close(engine(x).logits, full, atol=1e-5, rtol=1e-5)
    assert engine.bytes_copied == copied  # no cap: every piece keeps a slot of its own
    # the host weights live in the file's memory mapping, not in copies of it
    path = str((tmp_path / "ckpt" / "model.safetensors").resolve())
    mapped = [tuple(int(a, 16) for a in line.split()[0].split("-"))
              for line in Path("/proc/self/maps").read_text().splitlines() if line.endswith(path)]
    pointers = [h.tensors[0].data_ptr() for unit in engine.unit_params for h in unit if h.tensors[0].numel()]
    assert mapped and pointers
    assert all(any(start <= p < end for start, end in mapped) for p in pointers)


def cap_for(engine: LayeredEngine, weight_budget: int) -> int:
    return engine.resident_bytes + weight_budget


def slot_ranges(engine: LayeredEngine) -> list[tuple[int, int]]:
    return [(s.data_ptr(), s.data_ptr() + s.numel()) for s in engine.slots]


def test_slots_are_allocated_once_and_every_weight_is_a_view_of_one():
    """No fragmentation by construction: the streamed weights are copied into views of slots
    allocated when the budget is set, never into fresh allocations (fails if a load allocates)."""
    model = tiny("thl")
    x = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(3))
    engine = LayeredEngine(model, device="cpu")
    engine.fit_to_cap(cap_for(engine, 3 * max(engine.unit_bytes) // 2), None, 0)
    assert engine.slots == []  # fitting allocates nothing: the slots come with the first load
    state = engine.init_state(2)
    state = engine(x[:, :1], state=state).state
    ranges = slot_ranges(engine)
    allocations = engine.slot_allocations
    for step in range(1, 3):
        state = engine(x[:, step:step + 1], state=state).state
        assert slot_ranges(engine) == ranges and engine.slot_allocations == allocations
        views = [v for piece in engine.views.values() for v in piece]
        assert views and all(any(a <= v.data_ptr() and v.data_ptr() + v.numel() * v.element_size() <= b
                                 for a, b in ranges) for v in views)
    assert len(ranges) >= 2 and allocations == 1
    assert engine.bytes_copied > 3 * sum(engine.transfer_bytes) - max(engine.transfer_bytes)  # streamed each step


@pytest.mark.parametrize("arch", ["standard", "thl"])
def test_a_cap_for_one_slot_runs_without_overlap(arch):
    model = tiny(arch)
    x = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x).logits
    engine = LayeredEngine(model, device="cpu")
    smallest = engine.smallest_slot_bytes
    engine.fit_to_cap(cap_for(engine, smallest + smallest // 2), None, 0)  # cannot hold two slots
    torch.testing.assert_close(engine(x).logits, full, atol=1e-5, rtol=1e-5)
    assert len(engine.slots) == 1


@pytest.mark.parametrize("arch", ["standard", "thl"])
def test_head_and_embedding_cut_into_vocabulary_chunks(arch):
    """A budget far below the head's bytes: the head (and the embedding) run chunk by chunk of
    vocabulary rows, with the normal forward's logits."""
    torch.manual_seed(0)
    vocab = 4096  # the head and the embedding are the largest units (at 97 they stay resident)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=vocab).eval()
    x = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(x).logits
        expected_ids = generate_ids(model, x[:, :3], max_new_tokens=3)
    head = model.lm_head.weight.numel() * 4
    engine = LayeredEngine(model, device="cpu")
    engine.fit_to_cap(cap_for(engine, max(head // 3, 2 * engine.smallest_slot_bytes)), None, 0)
    assert len(engine.plan.splits[id(model.lm_head)]) >= 3
    embed = model.model.embed_tokens if arch == "standard" else model.embed_tokens
    assert len(engine.plan.splits[id(embed)]) >= 2
    assert max(p.nbytes for p in engine.plan.pieces) * 2 <= engine.budget
    torch.testing.assert_close(engine(x).logits, full, atol=1e-5, rtol=1e-5)
    assert torch.equal(engine.generate(x[:, :3], max_new_tokens=3), expected_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_slots_keep_their_addresses_and_the_allocator_still():
    model = tiny("thl")
    x = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = model(x).logits
    engine = LayeredEngine(model, device="cuda")
    engine.fit_to_cap(torch.cuda.memory_allocated() + cap_for(engine, 3 * max(engine.unit_bytes) // 2), None, 0)
    torch.testing.assert_close(engine(x).logits.cpu(), full, atol=1e-4, rtol=1e-4)
    ranges = slot_ranges(engine)
    state = engine.init_state(2)
    state = engine(x[:, :1], state=state).state
    torch.cuda.synchronize()
    reserved = torch.cuda.memory_reserved()
    for step in range(1, 4):
        state = engine(x[:, step:step + 1], state=state).state
    torch.cuda.synchronize()
    assert slot_ranges(engine) == ranges and torch.cuda.memory_reserved() == reserved


def test_a_decode_step_copies_every_piece_once():
    """Prefetch follows the previous step's reads: with two slots, THL's reader (read before the
    tiers and again inside the step) must not make the engine copy pieces it will evict unused.
    Fails with a predictor that only remembers which piece followed which (24% more bytes)."""
    torch.manual_seed(0)
    # THL-7B's proportions at 1/32 of its width: 4 tiers, a 2,000-token head, a quarter of the weights fit
    model = dynlm.build_model(model_config(dict(type="thl", vocab_size=2000, hidden_size=344, num_tiers=4,
                                                memory_slots=64, read_heads=4, local_query_dim=16))).eval()
    engine = LayeredEngine(model, device="cpu")
    weights = sum(p.transfer_bytes for p in engine.plan.pieces)
    engine.fit_to_cap(cap_for(engine, weights // 4), None, 0)
    assert len(engine.plan.slot_sizes) == 2
    out = engine(torch.randint(0, 2000, (1, 4)), state=engine.init_state(1))
    for step in range(3):
        copied = engine.bytes_copied
        out = engine(out.logits[:, -1].argmax(-1, keepdim=True), state=out.state)
        if step > 0:  # the first step after the prefill reads in another order than the prefill did
            assert engine.bytes_copied - copied == sum(p.transfer_bytes for p in engine.plan.pieces)
