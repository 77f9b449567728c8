"""Decode-step attention kernels ("math", "split") against the reference, SDPA through
`grouped_query_attention`, on the masks a static cache produces: partly filled slots, a ring
(sliding window), invalid keys of routed layers; batch rows with their own keys; G = 3 and 1."""

from __future__ import annotations

import pytest
import torch

import dynlm
import dynlm.nn.attention as attention
from dynlm.infer import graphs
from dynlm.infer.generate import generate_ids
from dynlm.nn import decode_attention as kernels
from dynlm.nn.attention import attention_mask, grouped_query_attention
from dynlm.nn.cache import EMPTY_SLOT

SLOTS = 23  # with chunks of 4: five whole chunks and a tail of 3
KERNELS = [k for k in kernels.DECODE_KERNELS if k != "sdpa"]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(kernels, "SPLIT_CHUNK", 4)


def _mask(case: str, batch: int) -> torch.Tensor | None:
    """The mask of the query at the latest position for the slots of a static cache."""
    generator = torch.Generator().manual_seed(1)
    if case == "full":  # every slot filled, no mask (a growable cache's one-token step)
        return None
    if case == "partial":  # positions 0..9 filled, slots 10.. empty: chunks 3-5 see no key
        query = 9
        slots = torch.where(torch.arange(SLOTS) <= query, torch.arange(SLOTS), torch.tensor(EMPTY_SLOT))
        return attention_mask(torch.tensor([query]), slots, None)
    if case == "ring":  # a ring of 23 slots after 40 positions, window 23
        query = 40
        slots = query - torch.remainder(query - torch.arange(SLOTS), SLOTS)
        return attention_mask(torch.tensor([query]), slots, window=SLOTS)
    if case == "valid":  # routed layer: a random half of the keys of each row invalid
        query = 17
        slots = torch.where(torch.arange(SLOTS) <= query, torch.arange(SLOTS), torch.tensor(EMPTY_SLOT))
        valid = torch.rand(batch, SLOTS, generator=generator) > 0.5
        mask = attention_mask(torch.tensor([query]), slots, None, valid)
        assert not torch.equal(mask[0], mask[1])  # rows differ
        return mask
    raise ValueError(case)


def _inputs(groups: int, dtype: torch.dtype, batch: int = 3):
    generator = torch.Generator().manual_seed(0)
    kv_heads, d = 2, 16
    q = torch.randn(batch, kv_heads * groups, 1, d, generator=generator).to(dtype)
    k = (2 * torch.randn(batch, kv_heads, SLOTS, d, generator=generator)).to(dtype)  # peaked softmax
    v = torch.randn(batch, kv_heads, SLOTS, d, generator=generator).to(dtype)
    return q, k, v


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["full", "partial", "ring", "valid"])
@pytest.mark.parametrize("groups", [3, 1])
def test_decode_kernel_equals_the_reference_fp32(kernel, case, groups):
    q, k, v = _inputs(groups, torch.float32)
    mask = _mask(case, q.shape[0])
    expected = grouped_query_attention(q, k, v, mask)
    torch.testing.assert_close(kernels.decode_attention(q, k, v, mask, kernel), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", ["partial", "valid"])
def test_decode_kernel_equals_the_reference_bf16_within_rounding(kernel, case):
    """bf16 inputs: within bf16 rounding of the float32 reference on the same inputs."""
    q, k, v = _inputs(3, torch.bfloat16)
    mask = _mask(case, q.shape[0])
    expected = grouped_query_attention(q.float(), k.float(), v.float(), mask)
    out = kernels.decode_attention(q, k, v, mask, kernel)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1.6e-2)


def test_split_kernel_splits_and_merges():
    """The split kernel really runs several chunks here (23 keys in chunks of 4) and one chunk
    when the keys fit in it; both equal the reference."""
    q, k, v = _inputs(3, torch.float32)
    mask = _mask("partial", 3)
    expected = grouped_query_attention(q, k, v, mask)
    for chunk in (4, 5, 23, 64):
        out = kernels.split_decode_attention(q, k, v, mask, chunk=chunk)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unknown_decode_kernel_is_refused():
    q, k, v = _inputs(1, torch.float32)
    with pytest.raises(ValueError, match="decode attention kernel 'fast' is not one of math, split"):
        kernels.decode_attention(q, k, v, None, "fast")
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    with pytest.raises(ValueError, match="decode attention 'fast' is not one of auto, sdpa, math, split"):
        graphs.GraphDecoder(model, decode_attention="fast")


# every kernel on a routed model (invalid keys); the split kernel on a ring and on DTF too
MODEL_CASES = [("mod", {}, k) for k in KERNELS] + [("standard", {"sliding_window": 5}, "split"), ("dtf", {}, "split")]


@pytest.mark.parametrize("arch,overrides,kernel", MODEL_CASES)
def test_static_decoder_with_each_kernel_generates_the_eager_tokens(monkeypatch, arch, overrides, kernel):
    """Greedy tokens of the static-cache decoder with the kernel for every one-token step (256
    slots in chunks of 4: most chunks empty) equal the eager path's; the kernel is really used."""
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[-1])
        return kernels.decode_attention(*args, **kwargs)

    monkeypatch.setattr(attention, "decode_attention", counted)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=97, **overrides).eval()
    prompts = torch.randint(0, 97, (3, 7), generator=torch.Generator().manual_seed(2))
    eager = generate_ids(model, prompts, max_new_tokens=8, graphs=False)
    decoder = graphs.GraphDecoder(model, decode_attention=kernel)
    tokens = [decoder.prefill(prompts, 8).argmax(-1)]
    for _ in range(7):
        tokens.append(decoder.step(tokens[-1]).argmax(-1))
    assert torch.equal(torch.cat([prompts, torch.stack(tokens, 1)], 1), eager)
    assert set(calls) == {kernel} and len(calls) == 7 * model.config.num_layers


@pytest.mark.slow  # dynamo's tracing of four decoders: ~20 s on a loaded 2-core machine
def test_compiled_step_traces_once_per_kernel_and_keeps_the_tokens():
    """The step under torch.compile (dynamo, eager backend on a CPU) with each kernel in turn, in
    one process as the benchmark runs them: the eager tokens, and one trace per kernel (a decoder
    with another kernel retraces instead of replaying the previous kernel's code)."""
    from torch._dynamo.testing import CompileCounter

    model = dynlm.build_model("mod-tiny", vocab_size=97).eval()
    prompts = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    eager = generate_ids(model, prompts, max_new_tokens=8, graphs=False)
    torch._dynamo.reset()
    counter = CompileCounter()
    for traced, kernel in enumerate(kernels.DECODE_KERNELS, start=1):
        decoder = graphs.GraphDecoder(model, compile="default", compile_backend=counter, decode_attention=kernel)
        tokens = [decoder.prefill(prompts, 8).argmax(-1)]
        for _ in range(7):
            tokens.append(decoder.step(tokens[-1]).argmax(-1))
        assert torch.equal(torch.cat([prompts, torch.stack(tokens, 1)], 1), eager), kernel
        assert counter.frame_count == traced, kernel
