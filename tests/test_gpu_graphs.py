"""CUDA-graph decoding equals the eager reference (run on the lent GPU; excluded by default)."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.infer.generate import generate_ids
from dynlm.infer.graphs import graph_decoder, supports_static_cache

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
