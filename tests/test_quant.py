"""Int8 weight-only linears: the CPU kernel against the dequantize-then-matmul reference, and a
quantized model's logits and greedy decoding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynlm
from dynlm.infer.generate import generate_ids
from dynlm.nn.quant import Int8Linear, int8_linear_reference, quantize_int8, quantize_linears_int8


def test_quantize_int8_error_is_half_a_step_per_row():
    weight = torch.randn(48, 64) * torch.logspace(-2, 1, 48)[:, None]  # rows of very different scales
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    error = (q.float() * scale - weight).abs()
    assert bool((error <= scale / 2 + 1e-7).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_reference(dtype, bias):
    linear = nn.Linear(64, 40, bias=bias)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 64).to(dtype)  # [B, T, I]: rows are flattened for the kernel
    y = layer(x)
    expected = int8_linear_reference(x, layer.q, layer.scale, layer.bias)
    assert y.shape == (2, 3, 40) and y.dtype == dtype
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(y, expected, **tol)


def test_int8_model_logits_within_rounding_and_decoding_paths_agree():
    """Every linear (the tied LM head included) becomes int8; the logits stay within a bound of
    the fp32 model's set by the rounding, and the eager and static-cache paths decode alike."""
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=97).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        reference = model(ids).logits
        linears = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert quantize_linears_int8(model) == linears
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        quantized = model(ids).logits
    error = (quantized - reference).abs().max() / reference.abs().max()
    assert 0 < error < 0.02, f"int8 logits off by {error:.4f} of the largest logit"
    eager = generate_ids(model, ids, max_new_tokens=8, graphs=False)
    static = generate_ids(model, ids, max_new_tokens=8, graphs=True)
    assert torch.equal(static, eager)
