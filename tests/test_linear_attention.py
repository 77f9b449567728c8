"""Decayed linear attention and sliding-window attention against their naive references."""

from __future__ import annotations

import math

import pytest
import torch

from dynlm.errors import ConfigError
from dynlm.nn.linear_attention import (
    DecayedLinearMemory,
    check_plasticity,
    chunked_linear_attention,
    chunked_linear_attention_loop,
    linear_attention,
    recurrent_linear_attention,
)
from dynlm.nn.rope import RotaryEmbedding
from dynlm.nn.sliding_window import (
    SlidingWindowAttention,
    WindowHistory,
    blocked_sliding_window_attention,
    sliding_window_attention_reference,
)

CHUNKED = [chunked_linear_attention_loop, chunked_linear_attention]


def inputs(alpha: float, t: int = 77, b: int = 2, h: int = 3, d: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(b, h, t, d, generator=g)
    k = torch.rand(b, h, t, d, generator=g)
    v = torch.randn(b, h, t, d + 1, generator=g)
    # data-dependent decay in [0.9, 1) scaled by alpha, as the memory block makes it
    log_decay = (0.9 + 0.1 * torch.rand(b, h, t, generator=g)).log() + math.log(alpha)
    state = torch.randn(b, h, d, d + 1, generator=g)
    return q, k, v, log_decay, state


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.99])
@pytest.mark.parametrize("impl", CHUNKED)
def test_chunked_equals_recurrent_reference(impl, alpha):
    q, k, v, g, s0 = inputs(alpha)  # 77 steps: not a multiple of the chunk
    for state in (None, s0):
        ref_o, ref_s = recurrent_linear_attention(q, k, v, g, state)
        o, s = impl(q, k, v, g, state, chunk_size=16)
        assert o.dtype == s.dtype == torch.float32
        torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", CHUNKED)
def test_bf16_inputs_keep_an_fp32_state(impl):
    q, k, v, g, s0 = inputs(0.5)
    ref_o, ref_s = recurrent_linear_attention(q, k, v, g, s0)
    o, s = impl(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, s0, chunk_size=16)
    assert o.dtype == s.dtype == torch.float32
    scale = ref_o.abs().max()
    assert (o - ref_o).abs().max() / scale < 2e-2
    assert (s - ref_s).abs().max() / ref_s.abs().max() < 2e-2


@pytest.mark.parametrize("alpha", [1e-6, 0.1, 1.0])
def test_no_overflow_at_any_decay_forward_and_backward(alpha):
    # 600 steps at alpha = 0.1: the cumsum-then-exp parallel form overflows exp() after ~40 steps
    q, k, v, g, _ = inputs(alpha, t=600, b=1, h=2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    o, s = chunked_linear_attention(q, k, v, g, chunk_size=64)
    (o.sum() + s.sum()).backward()
    assert torch.isfinite(o).all() and torch.isfinite(s).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    ref_o, _ = recurrent_linear_attention(q.detach(), k.detach(), v, g)
    torch.testing.assert_close(o.detach(), ref_o, atol=1e-4, rtol=1e-5)


def test_streaming_in_pieces_equals_one_call():
    q, k, v, g, _ = inputs(0.9, t=50)
    full, full_state = chunked_linear_attention(q, k, v, g, chunk_size=8)
    state, pieces = None, []
    for a, b in [(0, 3), (3, 4), (4, 21), (21, 22), (22, 50)]:  # lengths 3, 1, 17, 1, 28
        o, state = linear_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], g[:, :, a:b], state, chunk_size=8)
        pieces.append(o)
    torch.testing.assert_close(torch.cat(pieces, dim=2), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, full_state, atol=1e-5, rtol=1e-5)


def test_memory_block_is_the_normalised_recurrence():
    torch.manual_seed(0)
    memory = DecayedLinearMemory(16, num_heads=2, head_dim=8, chunk_size=4)
    x = torch.randn(2, 11, 16)
    alpha = 0.7
    out, state = memory(x, alpha)
    # by hand: S_t = l_t S + k v^T, z_t = l_t z + k, o = q S / (q z + eps), per head
    q = torch.nn.functional.elu(memory.q_proj(x).view(2, 11, 2, 8)) + 1
    k = torch.nn.functional.elu(memory.k_proj(x).view(2, 11, 2, 8)) + 1
    v = memory.v_proj(x).view(2, 11, 2, 8)
    lam = alpha * (0.9 + 0.1 * torch.sigmoid(memory.decay_proj(x)))  # [2, 11, 2]
    s = torch.zeros(2, 2, 8, 8)
    z = torch.zeros(2, 2, 8)
    expected = []
    for t in range(11):
        s = lam[:, t, :, None, None] * s + k[:, t, :, :, None] * v[:, t, :, None, :]
        z = lam[:, t, :, None] * z + k[:, t]
        qt = q[:, t] / math.sqrt(8)
        expected.append(torch.einsum("bhk,bhkv->bhv", qt, s) / (torch.einsum("bhk,bhk->bh", qt, z)[..., None] + 1e-6))
    expected = torch.stack(expected, dim=1).reshape(2, 11, 16)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[..., :8], s, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state[..., 8], z, atol=1e-5, rtol=1e-5)
    # initial decay ~ init_decay at alpha = 1 (long memory from the start)
    initial = memory.log_decay(torch.zeros(1, 1, 16), 1.0).exp()  # [1, H, 1]
    torch.testing.assert_close(initial, torch.full_like(initial, 0.998), atol=1e-6, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, -0.5, 1.5, float("nan")])
def test_invalid_plasticity_is_a_config_error(alpha):
    with pytest.raises(ConfigError, match="plasticity"):
        check_plasticity(alpha)


@pytest.mark.slow
def test_vectorised_form_compiles():
    q, k, v, g, s0 = inputs(0.5, t=128)
    compiled = torch.compile(chunked_linear_attention, fullgraph=True)
    o, s = compiled(q, k, v, g, s0, 32)
    ref_o, ref_s = recurrent_linear_attention(q, k, v, g, s0)
    torch.testing.assert_close(o, ref_o, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(s, ref_s, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Sliding window


@pytest.mark.parametrize("tq,tk,window", [(37, 37, 5), (10, 10, 16), (3, 10, 8), (1, 8, 8), (50, 57, 8), (64, 64, 1)])
def test_blocked_sliding_window_equals_masked_reference(tq, tk, window):
    g = torch.Generator().manual_seed(tq + tk)
    q = torch.randn(2, 3, tq, 8, generator=g, requires_grad=True)
    k, v = torch.randn(2, 3, tk, 8, generator=g), torch.randn(2, 3, tk, 8, generator=g)
    valid = torch.ones(tk, dtype=torch.bool)
    valid[: max(0, tk - tq - 3)] = False  # a history that is not full yet
    out = blocked_sliding_window_attention(q, k, v, window, valid)
    torch.testing.assert_close(out, sliding_window_attention_reference(q, k, v, window, valid), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_sliding_window_block_streams_with_a_fixed_size_history():
    torch.manual_seed(0)
    block = SlidingWindowAttention(16, num_heads=2, head_dim=8, window=6)
    rotary = RotaryEmbedding(8)
    x = torch.randn(2, 23, 16)
    cos, sin = rotary(torch.arange(23), x.dtype)
    full, _ = block(x, cos, sin)
    history = WindowHistory.empty(2, 2, 6, 8, None, x.dtype)
    sizes, pieces = [], []
    for a, b in [(0, 5), (5, 6), (6, 17), (17, 23)]:
        out, history = block(x[:, a:b], cos[a:b], sin[a:b], history)
        pieces.append(out)
        sizes.append(history.nbytes())
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    assert len(set(sizes)) == 1


@pytest.mark.gpu
def test_gpu_paths_match_the_references():
    device = "cuda"
    q, k, v, g, s0 = (x.to(device) for x in inputs(0.5, t=1000, b=1, h=4, d=64))
    ref_o, ref_s = recurrent_linear_attention(q, k, v, g, s0)
    o, s = torch.compile(chunked_linear_attention)(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, s0, 64)
    assert (o - ref_o).abs().max() / ref_o.abs().max() < 2e-2
    assert (s - ref_s).abs().max() / ref_s.abs().max() < 2e-2
    from dynlm.nn.sliding_window import flex_sliding_window_attention

    q, k, v = (torch.randn(1, 4, 1000, 64, device=device) for _ in range(3))
    torch.testing.assert_close(flex_sliding_window_attention(q, k, v, 128),
                               blocked_sliding_window_attention(q, k, v, 128), atol=2e-3, rtol=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", [64, 128, 256])
@pytest.mark.parametrize("mode", ["default", "max-autotune-no-cudagraphs", "cuda-graph"])
def test_gpu_fast_variants_match_the_reference_forward_and_backward(chunk, mode):
    # the variants benchmarks/gpu_agiformer.py times: each compile mode and chunk length, and the
    # compiled forward + backward captured in one CUDA graph, on bf16 inputs, against the fp32
    # recurrence (output, final state, dq, d log-decay)
    device = "cuda"
    q, k, v, g, s0 = (x.to(device) for x in inputs(0.5, t=1000, b=1, h=4, d=64))
    weights = torch.randn(1, 4, 1000, 65, device=device)
    ref_q, ref_g = q.clone().requires_grad_(), g.clone().requires_grad_()
    ref_o, ref_s = recurrent_linear_attention(ref_q, k, v, ref_g, s0)
    (ref_o * weights).sum().backward()
    fn = torch.compile(chunked_linear_attention, dynamic=False,
                       mode=None if mode in ("default", "cuda-graph") else mode)
    fast_q, fast_g = q.bfloat16().requires_grad_(), g.clone().requires_grad_()
    kb, vb = k.bfloat16(), v.bfloat16()

    def step():
        o, s = fn(fast_q, kb, vb, fast_g, s0, chunk)
        (o * weights).sum().backward()
        return o, s

    if mode == "cuda-graph":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(side)
        fast_q.grad = fast_g.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            o, s = step()
        fast_q.grad.zero_()
        graph.replay()  # the captured step, on the captured tensors
    else:
        o, s = step()
    torch.cuda.synchronize()
    # bf16 inputs and intra-chunk matmuls: about 1e-2 relative; gradients sum more bf16 products
    for value, reference, tolerance in [(o, ref_o, 2e-2), (s, ref_s, 2e-2), (fast_q.grad, ref_q.grad, 5e-2),
                                        (fast_g.grad, ref_g.grad, 5e-2)]:
        assert torch.isfinite(value).all()
        assert (value.float() - reference).abs().max() / reference.abs().max() < tolerance
