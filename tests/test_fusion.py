"""Fused q|k|v and gate|up projections (`nn.fusion`): the same outputs as the separate
projections, used by the compiled decode step, refreshed when the weights change, invisible to
`state_dict`."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.infer.generate import generate_ids
from dynlm.infer.graphs import GraphDecoder
from dynlm.nn import Attention, SwiGLU
from dynlm.nn.fusion import FusedProjections


@pytest.mark.parametrize("heads,kv_heads,bias", [(4, 2, True), (4, 2, False), (4, 4, True), (6, 1, False)])
def test_fused_attention_projection_equals_the_separate_projections(heads, kv_heads, bias):
    """q, k, v through the one concatenated matmul equal the three projections (GQA and MHA, with
    and without bias; T > 1 so the split views are strided)."""
    torch.manual_seed(0)
    attn = Attention(24, heads, kv_heads, 8, qkv_bias=bias)
    if bias:  # nn.Linear's biases start random, but make sure they differ per projection
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
            torch.nn.init.normal_(proj.bias)
    x = torch.randn(2, 5, 24)
    expected = attn.project(x)
    fused = FusedProjections(attn)
    with fused.applied():
        got = attn.project(x)
    assert attn.fused is None  # restored after the block
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)


def test_fused_swiglu_equals_the_separate_projections():
    torch.manual_seed(0)
    mlp = SwiGLU(16, 40)
    x = torch.randn(3, 4, 16)
    expected = mlp(x)
    with FusedProjections(mlp).applied():
        got = mlp(x)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def _decode_logits(decoder: GraphDecoder, prompts: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding through `decoder`: the logits [B, steps + 1, V] of every step."""
    logits = [decoder.prefill(prompts, steps)]
    for _ in range(steps):
        logits.append(decoder.step(logits[-1].argmax(-1)).clone())
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch,compiled", [
    ("standard", False), ("mod", False), ("dtf", False),
    pytest.param("standard", True, marks=pytest.mark.slow),  # dynamo's tracing: ~10 s on 2 loaded cores
])
def test_fused_decoder_keeps_the_logits_and_tokens(arch, compiled):
    """The decoder with fused projections (the default of the compiled one; the compiled case
    traces with dynamo, its eager backend keeps it fast on a CPU) reads the fused weights and gives
    the unfused decoder's logits at every one of 24 greedy steps, and the eager path's tokens; the
    model's state_dict keys stay the same and its modules are unfused after."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=97, attention_bias=True).eval()
    keys = list(model.state_dict())
    prompts = torch.randint(0, 97, (2, 12))
    reference = _decode_logits(GraphDecoder(model, fuse_projections=False), prompts, 24)
    if compiled:
        decoder = GraphDecoder(model, compile="default", compile_backend="eager")
    else:
        decoder = GraphDecoder(model, fuse_projections=True)
    assert decoder.fused is not None
    assert len(decoder.fused.groups) >= 2 * model.config.num_layers  # attention and MLP of every layer
    used = []
    linear = torch.nn.functional.linear

    def recording_linear(x, weight, bias=None):
        used.append(any(weight is w for _, _, (w, _) in decoder.fused.groups))
        return linear(x, weight, bias)

    torch.nn.functional.linear = recording_linear
    try:
        fused = _decode_logits(decoder, prompts, 24)
    finally:
        torch.nn.functional.linear = linear
    assert any(used)  # the fused weights were read
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)
    tokens = torch.cat([prompts, fused.argmax(-1)[:, :24]], 1)
    assert torch.equal(tokens, generate_ids(model, prompts, max_new_tokens=24, graphs=False))
    assert list(model.state_dict()) == keys
    assert all(getattr(m, "fused", None) is None for m in model.modules())  # eager path unfused after


def test_weight_change_after_decoding_reaches_the_next_generation():
    """A weight changed in place after a generation (an optimizer step, `load_state_dict`) is
    seen by the next one: the fused copies are refreshed at prefill, not left stale."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=97, attention_bias=True).eval()
    prompts = torch.randint(0, 97, (1, 8))
    decoder = GraphDecoder(model, compile="default", compile_backend="eager")
    before = _decode_logits(decoder, prompts, 4)
    layer = model.model.layers[0]
    for weight in (layer.self_attn.q_proj.weight, layer.self_attn.v_proj.bias, layer.mlp.up_proj.weight):
        weight.data.add_(0.5)
        after = _decode_logits(decoder, prompts, 4)
        assert not torch.allclose(after[:, 1:], before[:, 1:], atol=1e-3)
        reference = _decode_logits(GraphDecoder(model, fuse_projections=False), prompts, 4)
        torch.testing.assert_close(after, reference, atol=1e-4, rtol=1e-4)
        before = after
