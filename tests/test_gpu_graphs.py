"""CUDA-graph decoding equals the eager reference (run on the lent GPU; excluded by default)."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.infer.generate import generate_ids
from dynlm.infer.graphs import GraphDecoder, graph_decoder, supports_static_cache

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - only on machines without CUDA
    pytest.skip("needs CUDA", allow_module_level=True)

CASES = [(arch, {}) for arch in dynlm.list_architectures()] + [("standard", {"sliding_window": 16})]


@pytest.mark.parametrize("arch,overrides", CASES)
def test_graph_decode_equals_eager_decode(arch, overrides):
    """Greedy, 64 new tokens, 3 distinct prompts (a batch bucket of 4): the captured step gives
    the eager path's tokens. The prompt is longer than DTF's moving-average window, so DTF's
    state has its final shapes and its steps are captured too."""
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=211, **overrides).cuda().eval()
    if not supports_static_cache(model):
        pytest.skip(f"{arch} has no KV cache")
    prompts = torch.randint(0, 211, (3, 120), device="cuda")
    eager = generate_ids(model, prompts, max_new_tokens=64, graphs=False)
    graphed = generate_ids(model, prompts, max_new_tokens=64, graphs=True)
    decoder = graph_decoder(model)
    assert decoder.captures == 1 and decoder.graph_steps >= 62
    assert torch.equal(graphed, eager)
    # a second call reuses the captured graph on the reset cache
    again = generate_ids(model, prompts.flip(0), max_new_tokens=64, graphs=True)
    assert decoder.captures == 1
    assert torch.equal(again, generate_ids(model, prompts.flip(0), max_new_tokens=64, graphs=False))


@pytest.mark.parametrize("arch,overrides", [("standard", {}), ("mod", {}), ("dtf", {}),
                                            ("standard", {"sliding_window": 16, "attention_bias": True})])
def test_compiled_graph_decode_equals_eager_decode(arch, overrides):
    """The step compiled with inductor (q|k|v and gate|up fused, the compiled default), then
    captured in a graph: the eager path's greedy tokens (fp32), within one length bucket (120 + 64)
    and across two (500 + 64 crosses 512 slots)."""
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=211, max_position_embeddings=2048, **overrides)
    model = model.cuda().eval()
    for length in (120, 500):  # 500 + 64 crosses the 512 bucket
        prompts = torch.randint(0, 211, (3, length), device="cuda")
        eager = generate_ids(model, prompts, max_new_tokens=64, graphs=False)
        decoder = GraphDecoder(model, compile="default")
        assert decoder.fused is not None and decoder.fused.groups
        tokens = [decoder.prefill(prompts, 64).argmax(-1)]
        for _ in range(63):
            tokens.append(decoder.step(tokens[-1]).argmax(-1))
        assert torch.equal(torch.cat([prompts, torch.stack(tokens, 1)], 1), eager)
        assert decoder.graph_steps >= 60


def test_weight_change_reaches_the_replayed_fused_step():
    """A weight changed in place after a generation: the next generation's replayed graph (which
    reads the fused copies) gives the eager path's tokens under the new weights."""
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=211, attention_bias=True).cuda().eval()
    prompts = torch.randint(0, 211, (2, 40), device="cuda")
    decoder = GraphDecoder(model, compile="default")

    def decode() -> torch.Tensor:
        tokens = [decoder.prefill(prompts, 32).argmax(-1)]
        for _ in range(31):
            tokens.append(decoder.step(tokens[-1]).argmax(-1))
        return torch.cat([prompts, torch.stack(tokens, 1)], 1)

    assert torch.equal(decode(), generate_ids(model, prompts, max_new_tokens=32, graphs=False))
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(-3)
        model.model.layers[1].mlp.up_proj.weight.mul_(-3)
    assert torch.equal(decode(), generate_ids(model, prompts, max_new_tokens=32, graphs=False))
    assert decoder.captures == 1 and decoder.graph_steps >= 60


def test_interleaved_sessions_replay_their_own_graphs():
    """Two generations stepped in turn (the server's concurrent requests): each session captures
    and replays its own graph on its own cache; the logits equal a plain forward of its sequence."""
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=211).cuda().eval()
    decoder = GraphDecoder(model)
    rows = [torch.randint(0, 211, (1, n), device="cuda") for n in (30, 41)]
    sessions, logits = [], []
    for prompt in rows:
        logits.append(decoder.prefill(prompt, 16, exclusive=True))
        sessions.append(decoder.session)
    for _ in range(12):
        for i, session in enumerate(sessions):
            token = logits[i].argmax(-1)
            rows[i] = torch.cat([rows[i], token[:, None]], 1)
            logits[i] = decoder.step(token, session).clone()
    assert decoder.captures == 2 and decoder.graph_steps >= 20
    with torch.no_grad():
        for sequence, last in zip(rows, logits):
            torch.testing.assert_close(last, model(sequence).logits[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["split", "math"])
@pytest.mark.parametrize("arch", ["standard", "mod"])
def test_compiled_graph_decode_with_each_decode_kernel_equals_eager_decode(monkeypatch, arch, kernel):
    """Each decode attention kernel, compiled with inductor and captured: the eager path's greedy
    tokens (fp32), 500 + 64 positions crossing the 512-slot bucket, the split kernel in chunks of
    64 keys (so chunks past the filled positions see no key)."""
    import dynlm.nn.decode_attention as kernels

    monkeypatch.setattr(kernels, "SPLIT_CHUNK", 64)
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=211, max_position_embeddings=2048).cuda().eval()
    prompts = torch.randint(0, 211, (3, 500), device="cuda")
    eager = generate_ids(model, prompts, max_new_tokens=64, graphs=False)
    decoder = GraphDecoder(model, compile="default", decode_attention=kernel)
    tokens = [decoder.prefill(prompts, 64).argmax(-1)]
    for _ in range(63):
        tokens.append(decoder.step(tokens[-1]).argmax(-1))
    assert torch.equal(torch.cat([prompts, torch.stack(tokens, 1)], 1), eager)
    assert decoder.graph_steps >= 60
