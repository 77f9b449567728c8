"""The shared routing blocks (`dynlm.nn.routing`): selection, gather/scatter execution, the
masked form used with the KV cache (NaN-free in both directions), the causal moving average and
the causal router."""

from __future__ import annotations

import pytest
import torch

from dynlm.config import ModelConfig
from dynlm.models.standard import DecoderLayer
from dynlm.nn import LayerKVCache, RotaryEmbedding
from dynlm.nn.routing import (
    CausalRouter,
    binary_entropy,
    capacity_k,
    causal_moving_average,
    gather_routed_update,
    gather_tokens,
    indices_to_mask,
    masked_routed_update,
    router_bce,
    scatter_add_tokens,
    skip_block,
    topk_indices,
    uniform_count,
)


@pytest.fixture
def layer() -> DecoderLayer:
    torch.manual_seed(0)
    config = ModelConfig(hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64, num_layers=2)
    layer = DecoderLayer(config, 0)
    for p in layer.parameters():  # non-trivial weights (norm weights are ones otherwise)
        torch.nn.init.normal_(p, std=0.2)
    return layer


def rope(seq_len: int, head_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return RotaryEmbedding(head_dim)(torch.arange(seq_len), torch.float32)


@pytest.mark.parametrize(("capacity", "seq_len", "k"), [(0.125, 16, 2), (0.125, 7, 1), (0.01, 50, 1),
                                                        (0.5, 9, 4), (1.0, 13, 13), (0.3, 10, 3)])
def test_capacity_k(capacity: float, seq_len: int, k: int) -> None:
    assert capacity_k(capacity, seq_len) == k


def test_topk_indices_pick_highest_scores_sorted_by_position() -> None:
    scores = torch.tensor([[0.1, 5.0, -1.0, 3.0, 4.0], [9.0, 0.0, 0.2, 0.1, 8.0]])
    idx = topk_indices(scores, 3)
    assert idx.tolist() == [[1, 3, 4], [0, 2, 4]]  # position order, not score order
    # routing direction: raising a token's score gets it selected, lowering it drops it
    raised = scores.clone()
    raised[0, 2] = 10.0
    assert 2 in topk_indices(raised, 3)[0].tolist()
    lowered = scores.clone()
    lowered[0, 1] = -10.0
    assert 1 not in topk_indices(lowered, 3)[0].tolist()


def test_mask_conversions() -> None:
    idx = torch.tensor([[0, 3], [1, 2]])
    mask = indices_to_mask(idx, 5)
    assert mask.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]
    assert uniform_count(mask) == 2
    mask[1, 4] = True
    assert uniform_count(mask) is None
    assert uniform_count(torch.zeros(2, 4, dtype=torch.bool)) is None


def test_gather_and_scatter_are_per_row() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    idx = torch.tensor([[1, 4], [0, 2]])
    sel = gather_tokens(x, idx)
    assert torch.equal(sel[0], x[0, [1, 4]]) and torch.equal(sel[1], x[1, [0, 2]])
    out = scatter_add_tokens(x, idx, torch.ones(2, 2, 3))
    expected = x.clone()
    expected[0, [1, 4]] += 1
    expected[1, [0, 2]] += 1
    assert torch.equal(out, expected)


def test_gather_update_equals_block_on_the_subset(layer: DecoderLayer) -> None:
    """Selected tokens see only selected tokens at or before their position, with RoPE at their
    true positions; skipped tokens are unchanged."""
    torch.manual_seed(1)
    b, t = 2, 10
    x = torch.randn(b, t, 32)
    cos, sin = rope(t)
    idx = torch.tensor([[0, 3, 4, 8], [2, 5, 6, 9]])
    weight = torch.rand(b, t)
    out = gather_routed_update(layer, x, idx, weight, cos, sin)
    for row in range(b):
        pos = idx[row]
        f = layer(x[row : row + 1, pos], cos[pos], sin[pos])[0]  # the row's subset alone
        expected = x[row].clone()
        expected[pos] += weight[row, pos, None] * f
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=1e-5)


def test_masked_update_equals_gather_update(layer: DecoderLayer) -> None:
    torch.manual_seed(2)
    b, t = 3, 12
    x = torch.randn(b, t, 32)
    cos, sin = rope(t)
    idx = topk_indices(torch.randn(b, t), 5)
    weight = torch.rand(b, t)
    gathered = gather_routed_update(layer, x, idx, weight, cos, sin)
    masked = masked_routed_update(layer, x, indices_to_mask(idx, t), weight, cos, sin, cache=None)
    torch.testing.assert_close(masked, gathered, atol=1e-5, rtol=1e-5)


def test_masked_update_is_nan_free_forward_and_backward(layer: DecoderLayer) -> None:
    """Unequal masks in training (no cache): tokens with no selected token at or before them have
    no valid key but their own. The forward is finite, equals the update on each row's selected
    tokens alone, and the backward is finite too."""
    torch.manual_seed(7)
    b, t = 3, 10
    x = torch.randn(b, t, 32, requires_grad=True)
    cos, sin = rope(t)
    mask = torch.zeros(b, t, dtype=torch.bool)
    mask[0, [6, 8]] = True  # positions 0-5 of row 0 precede every key
    mask[1, 9] = True  # only the last token of row 1
    mask[2, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]] = True
    weight = torch.rand(b, t)
    out = masked_routed_update(layer, x, mask, weight, cos, sin, cache=None)
    assert torch.isfinite(out).all()
    for row in range(b):
        pos = mask[row].nonzero().squeeze(-1)
        expected = x[row].detach().clone()
        expected[pos] += weight[row, pos, None] * layer(x[row : row + 1, pos], cos[pos], sin[pos])[0].detach()
        torch.testing.assert_close(out[row].detach(), expected, atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_masked_update_with_cache_streams(layer: DecoderLayer) -> None:
    """Chunked calls with a cache equal one call: skipped tokens leave no key behind."""
    torch.manual_seed(3)
    b, t = 2, 9
    x = torch.randn(b, t, 32)
    cos, sin = rope(t)
    mask = torch.rand(b, t) > 0.5
    mask[:, 0] = True
    weight = torch.rand(b, t)
    full = masked_routed_update(layer, x, mask, weight, cos, sin, cache=None)
    cache = LayerKVCache()
    parts = [masked_routed_update(layer, x[:, :4], mask[:, :4], weight[:, :4], cos[:4], sin[:4], cache)]
    for i in range(4, t):
        s = slice(i, i + 1)
        parts.append(masked_routed_update(layer, x[:, s], mask[:, s], weight[:, s], cos[s], sin[s], cache))
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    assert torch.equal(cache.valid[:, :t], mask)


def test_skip_block_adds_invalid_positions(layer: DecoderLayer) -> None:
    torch.manual_seed(4)
    x = torch.randn(2, 3, 32)
    cos, sin = rope(5)
    cache = LayerKVCache()
    mask = torch.ones(2, 3, dtype=torch.bool)
    masked_routed_update(layer, x, mask, torch.ones(2, 3), cos[:3], sin[:3], cache)
    skip_block(cache, 2, 1, layer.self_attn.num_kv_heads, layer.self_attn.head_dim, x)
    assert cache.length == 4 and cache.valid[:, 3].eq(False).all() and cache.valid[:, :3].all()
    # the next token attends to the three earlier keys only: same as if position 3 never existed
    nxt = torch.randn(2, 1, 32)
    with_skip = layer(nxt, cos[4:5], sin[4:5], cache, key_valid=torch.ones(2, 1, dtype=torch.bool))
    reference = LayerKVCache()
    masked_routed_update(layer, x, mask, torch.ones(2, 3), cos[:3], sin[:3], reference)
    keys_only = layer(nxt, cos[4:5], sin[4:5], reference, key_valid=torch.ones(2, 1, dtype=torch.bool))
    torch.testing.assert_close(with_skip, keys_only, atol=1e-5, rtol=1e-5)


def test_causal_moving_average() -> None:
    torch.manual_seed(5)
    values = torch.rand(2, 30)
    window = 4
    avg, history = causal_moving_average(values, window)
    for t in range(30):
        prev = values[:, max(0, t - window) : t]
        expected = prev.mean(-1) if t > 0 else values[:, 0]
        torch.testing.assert_close(avg[:, t], expected)
    assert torch.equal(history, values[:, -window:])
    # causal: changing later values changes no earlier average
    changed = values.clone()
    changed[:, 20:] = 100.0
    assert torch.equal(causal_moving_average(changed, window)[0][:, :21], avg[:, :21])
    # streaming: chunks with the carried history give the same result
    chunks, hist = [], None
    for s in (slice(0, 2), slice(2, 3), slice(3, 17), slice(17, 30)):
        a, hist = causal_moving_average(values[:, s], window, hist)
        chunks.append(a)
    torch.testing.assert_close(torch.cat(chunks, 1), avg)


def test_causal_router_and_losses() -> None:
    torch.manual_seed(6)
    router = CausalRouter(16, num_features=1)
    x = torch.randn(2, 5, 16, requires_grad=True)
    logits = router(x, torch.rand(2, 5, 1))
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    target = torch.rand(2, 5) > 0.5
    loss = router_bce(logits, target)
    loss.backward()
    assert x.grad is None or x.grad.abs().sum() == 0  # stop-gradient on the hidden state
    assert router.in_proj.weight.grad.abs().sum() > 0
    ent = binary_entropy(torch.tensor([0.5, 0.0, 1.0]))
    torch.testing.assert_close(ent, torch.tensor([1.0, 0.0, 0.0]), atol=1e-4, rtol=0)


def test_layer_update_keeps_its_own_precision_in_bf16(layer: DecoderLayer) -> None:
    """Routed layers scale the layer's update U, so U must be computed directly, not as
    output - x: with bf16 activations far larger than U, `output - x` loses U to the rounding
    of x (here it comes out as exactly 0) while U itself keeps bf16's relative precision."""
    torch.manual_seed(8)
    x = (torch.randn(2, 6, 32) * 200 + 1000).bfloat16()
    cos, sin = rope(6)
    reference = layer(x.float(), cos, sin)  # fp32 layer on the same inputs
    update = layer.bfloat16()(x, cos.bfloat16(), sin.bfloat16(), None).float()
    scale = reference.abs().max()
    assert 0.1 < scale < 50  # an update far smaller than x (~1000)
    assert (update - reference).abs().max() < 0.05 * scale
