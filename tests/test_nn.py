"""Shared blocks against naive references."""

from __future__ import annotations

import math

import pytest
import torch

from dynlm.nn import Attention, KVCache, RMSNorm, RotaryEmbedding, SwiGLU, apply_rotary
from dynlm.nn.attention import attention_mask


def naive_rmsnorm(x, weight, eps):
    x64 = x.double()
    return (weight.double() * x64 / torch.sqrt((x64**2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def test_rmsnorm_matches_reference_and_computes_in_fp32():
    norm = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(norm(x), naive_rmsnorm(x, norm.weight, 1e-6), atol=1e-6, rtol=1e-5)
    # bf16 input: computed in fp32 then cast, so no overflow on large activations
    big = (torch.randn(2, 16) * 1e4).bfloat16()
    out = norm(big)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), naive_rmsnorm(big.float(), norm.weight, 1e-6), atol=2e-2, rtol=2e-2)


def naive_rope(x, positions, theta):
    # x: [B, H, T, D] rotated pairwise (i, i + D/2), angle = pos * theta^(-2i/D)
    d = x.shape[-1]
    out = x.clone().double()
    for t, pos in enumerate(positions.tolist()):
        for i in range(d // 2):
            angle = pos * theta ** (-2 * i / d)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., t, i].double(), x[..., t, i + d // 2].double()
            out[..., t, i] = a * c - b * s
            out[..., t, i + d // 2] = a * s + b * c
    return out.to(x.dtype)


@pytest.mark.parametrize("theta", [10000.0, 1e6])
def test_rope_matches_reference(theta):
    rope = RotaryEmbedding(8, theta)
    x = torch.randn(2, 3, 5, 8)
    positions = torch.tensor([0, 1, 7, 100, 4095])
    cos, sin = rope(positions, torch.float32)
    torch.testing.assert_close(apply_rotary(x, cos, sin), naive_rope(x, positions, theta), atol=1e-4, rtol=1e-4)


def test_rope_per_row_positions():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 3, 4, 8)
    pos = torch.tensor([[0, 2, 5, 9], [1, 3, 4, 8]])
    cos, sin = rope(pos, torch.float32)  # [B, T, D]
    out = apply_rotary(x, cos, sin)
    for b in range(2):
        c, s = rope(pos[b], torch.float32)
        torch.testing.assert_close(out[b: b + 1], apply_rotary(x[b: b + 1], c, s))


def test_rope_table_prefix_equals_computed_positions():
    rope = RotaryEmbedding(16, 10000.0, max_positions=64)
    for length in (1, 37, 64, 100):  # 100: past the table, computed
        cos, sin = rope.prefix(length, torch.float32)
        ref_cos, ref_sin = rope(torch.arange(length), torch.float32)
        assert cos.shape == (length, 16)
        torch.testing.assert_close(cos, ref_cos, atol=1e-7, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=1e-7, rtol=0)
    cos, _ = rope.prefix(8, torch.bfloat16)
    assert cos.dtype == torch.bfloat16


def test_rope_tables_stay_fp32_through_a_dtype_cast():
    """model.to(bf16) would round inv_freq to 8 bits: at position 1000 the angle is then off by
    radians. The buffers are rebuilt in fp32, so a cast model rotates like the fp32 one."""
    rope = RotaryEmbedding(64, 10000.0, max_positions=2048)
    fp32_cos, fp32_sin = rope.prefix(2048, torch.float32)
    rope.to(torch.bfloat16)
    assert rope.inv_freq.dtype == rope.cos_table.dtype == torch.float32
    positions = torch.arange(2048)
    cos, sin = rope(positions, torch.float32)  # computed (the KV-cache path)
    torch.testing.assert_close(cos, fp32_cos, atol=1e-7, rtol=0)
    torch.testing.assert_close(sin, fp32_sin, atol=1e-7, rtol=0)
    torch.testing.assert_close(rope.prefix(2048, torch.float32)[0], fp32_cos, atol=0, rtol=0)


def test_model_logits_with_the_rope_table_equal_computed_positions():
    from dynlm.config import model_config
    from dynlm.registry import get_architecture

    torch.manual_seed(0)
    config = model_config("standard-tiny", max_position_embeddings=32)
    model = get_architecture(config.type)[1](config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 24))
    with torch.no_grad():
        table = model(ids).logits
        rope = model.rotary
        model.rotary.prefix = lambda t, dtype: rope(torch.arange(t), dtype)  # the forward before the table
        computed = model(ids).logits
    torch.testing.assert_close(table, computed, atol=0, rtol=0)  # the same fp32 arithmetic


def test_rope_table_is_a_graph_input_not_recomputed():
    """The compiled plain forward reads the table: no cos/sin in the traced graph (before, inductor
    inlined the arange -> cos/sin producer into every layer's rotary kernel, forward and backward)."""
    from dynlm.config import model_config
    from dynlm.registry import get_architecture

    config = model_config("standard-tiny", max_position_embeddings=32)
    model = get_architecture(config.type)[1](config)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    ids = torch.randint(0, config.vocab_size, (2, 16))
    compiled = torch.compile(model, backend=record, fullgraph=True)
    eager = model(ids).logits
    torch.testing.assert_close(compiled(ids).logits, eager)
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes}  # "cos" or "<built-in ... cos>"
    assert not [t for t in targets if t in ("cos", "sin") or t.endswith((" cos>", " sin>"))]
    torch._dynamo.reset()


def test_swiglu_matches_formula():
    mlp = SwiGLU(8, 12)
    x = torch.randn(2, 3, 8)
    ref = mlp.down_proj(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    torch.testing.assert_close(mlp(x), ref)


def naive_attention(attn: Attention, x, positions, window=None, key_valid=None):
    """Loop over rows, heads and positions; softmax over the allowed keys: earlier ones (within
    the window) that are valid keys, and always the query's own."""
    b, t, _ = x.shape
    h, hk, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    rope = RotaryEmbedding(d)
    cos, sin = rope(positions, x.dtype)
    q = apply_rotary(attn.q_proj(x).view(b, t, h, d).transpose(1, 2), cos, sin)
    k = apply_rotary(attn.k_proj(x).view(b, t, hk, d).transpose(1, 2), cos, sin)
    v = attn.v_proj(x).view(b, t, hk, d).transpose(1, 2)
    valid = torch.ones(b, t, dtype=torch.bool) if key_valid is None else key_valid
    rows = []
    for row in range(b):
        heads = []
        for head in range(h):
            kv = head // (h // hk)
            outs = []
            for i in range(t):
                allowed = [j for j in range(t) if j <= i and (window is None or j > i - window)
                           and (bool(valid[row, j]) or j == i)]
                scores = torch.stack([(q[row, head, i] * k[row, kv, j]).sum() / math.sqrt(d) for j in allowed])
                weights = scores.softmax(-1)
                outs.append(sum(weights[n] * v[row, kv, j] for n, j in enumerate(allowed)))
            heads.append(torch.stack(outs))
        rows.append(torch.stack(heads))
    out = torch.stack(rows)  # [B, H, T, D]
    return attn.o_proj(out.transpose(1, 2).reshape(b, t, h * d))


@pytest.mark.parametrize("heads,kv_heads,bias,window", [(4, 4, False, None), (4, 2, True, None), (4, 1, False, 3)])
def test_attention_matches_naive_reference(heads, kv_heads, bias, window):
    torch.manual_seed(0)
    attn = Attention(16, heads, kv_heads, 8, qkv_bias=bias, sliding_window=window)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 7, 16)
    pos = torch.arange(7)
    cos, sin = rope(pos, x.dtype)
    torch.testing.assert_close(attn(x, cos, sin), naive_attention(attn, x, pos, window), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_with_cache_equals_full(window):
    """Chunks of several tokens after the cache is non-empty (prefill, then a second multi-token
    chunk), then single tokens: the same as one call."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 8, sliding_window=window)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 11, 16)
    cos, sin = rope(torch.arange(11), x.dtype)
    full = attn(x, cos, sin)
    cache = KVCache.allocate(1, 2, 2, 8, capacity=4).layers[0]  # small: forces the cache to grow
    parts = [attn(x[:, s], cos[s], sin[s], cache) for s in (slice(0, 5), slice(5, 8), slice(8, 9))]
    torch.testing.assert_close(torch.cat(parts, 1), full[:, :9], atol=1e-5, rtol=1e-4)
    parts.append(attn(x[:, 9:], cos[9:], sin[9:], cache))  # multi-token chunk after a single token
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)
    assert cache.length == 11
    # a windowed layer keeps only the window - 1 positions the next query can see
    assert cache.capacity >= 11 if window is None else cache.capacity == window - 1


# key validity per row: row 0 has no valid key before position 2, row 1 none before the last
KEY_VALID = torch.tensor([[False, False, True, False, True, True, False],
                          [False, False, False, False, False, False, True]])


def test_attention_mask_gives_every_query_a_key():
    """Every query row of the mask has an allowed key (its own), whatever the key validity: an
    empty row is a softmax over nothing (NaN in the forward and, through dK/dV, the backward)."""
    pos = torch.arange(7)
    for window in (None, 2):
        mask = attention_mask(pos, pos, window, KEY_VALID)  # [B, 1, T, T]
        assert mask.any(-1).all()
        assert torch.equal(mask.diagonal(dim1=-2, dim2=-1), torch.ones(2, 1, 7, dtype=torch.bool))
        # earlier keys: exactly the valid ones (within the window)
        earlier = mask & ~torch.eye(7, dtype=torch.bool)
        causal = attention_mask(pos, pos, window) & ~torch.eye(7, dtype=torch.bool)
        assert torch.equal(earlier, causal & KEY_VALID[:, None, None, :])


@pytest.mark.parametrize("chunks", [None, (3, 2, 2), (1, 1, 5)])
def test_masked_attention_matches_naive_reference_forward_and_backward(chunks):
    """Key validity marks (routed layers) without a cache (training: outputs and gradients) and
    through a cache fed in chunks (inference: outputs) equal the naive reference, finite for
    queries with no valid earlier key."""
    torch.manual_seed(0)
    attn = Attention(16, 4, 2, 8, qkv_bias=True)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 7, 16, requires_grad=True)
    cos, sin = rope(torch.arange(7), x.dtype)
    if chunks is None:
        out = attn(x, cos, sin, key_valid=KEY_VALID)
    else:
        cache, parts, start = KVCache.allocate(1, 2, 2, 8, capacity=0).layers[0], [], 0
        for n in chunks:
            s = slice(start, start + n)
            parts.append(attn(x[:, s], cos[s], sin[s], cache, key_valid=KEY_VALID[:, s]))
            start += n
        out = torch.cat(parts, 1)
    x_ref = x.detach().clone().requires_grad_()
    ref = naive_attention(attn, x_ref, torch.arange(7), key_valid=KEY_VALID)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
    if chunks is not None:
        return  # the cache is written in place: an inference path, no backward through it
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x_ref, *attn.parameters()])
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_cache_key_valid_masks_skipped_tokens():
    """A token marked invalid in the cache is invisible to later queries."""
    torch.manual_seed(0)
    attn = Attention(16, 2, 2, 8)
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 4, 16)
    cos, sin = rope(torch.arange(4), x.dtype)
    cache = KVCache.allocate(1, 1, 2, 8, capacity=8).layers[0]
    attn(x[:, :3], cos[:3], sin[:3], cache, key_valid=torch.tensor([[True, False, True]]))
    last = attn(x[:, 3:], cos[3:], sin[3:], cache)
    # reference: the same query over positions 0, 2, 3 only
    ref_cache = KVCache.allocate(1, 1, 2, 8, capacity=8).layers[0]
    keep = [0, 2]
    attn(x[:, keep], cos[keep], sin[keep], ref_cache)
    ref = attn(x[:, 3:], cos[3:], sin[3:], ref_cache)
    torch.testing.assert_close(last, ref, atol=1e-5, rtol=1e-4)
