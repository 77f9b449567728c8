"""The chunked LM head + cross-entropy equals the plain one, values and gradients."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.nn.loss import linear_cross_entropy, linear_cross_entropy_reference


def _inputs(dtype: torch.dtype):
    hidden = torch.randn(37, 16, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(101, 16)).to(dtype).requires_grad_()
    targets = torch.randint(0, 101, (37,))
    targets[[0, 5, 6, 30]] = -100  # ignored positions
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_rows", [1, 8, 37, 1000])
def test_chunked_loss_and_gradients_equal_the_plain_loss_fp32(chunk_rows):
    hidden, weight, targets = _inputs(torch.float32)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(2.5 * loss, (hidden, weight))  # a scaled loss: backward scales too
    ref = linear_cross_entropy_reference(hidden, weight, targets)
    ref_grads = torch.autograd.grad(2.5 * ref, (hidden, weight))
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert grads[0][[0, 5, 6, 30]].abs().max() == 0  # ignored rows get no gradient


def test_chunked_loss_bf16_within_rounding():
    hidden, weight, targets = _inputs(torch.bfloat16)
    loss = linear_cross_entropy(hidden, weight, targets, chunk_rows=8)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = linear_cross_entropy_reference(h32, w32, targets)
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 2e-2
    for got, expected in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).norm() / expected.norm() < 2e-2


def test_chunked_loss_without_gradients_and_all_ignored():
    hidden, weight, targets = _inputs(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_rows=5),
                                   linear_cross_entropy_reference(hidden, weight, targets))
    assert linear_cross_entropy(hidden, weight, torch.full_like(targets, -100)).item() == 0.0


@pytest.mark.parametrize("arch", ["standard", "mod"])
def test_model_fused_loss_matches_logits_loss(arch):
    """The model's training loss through the chunked head equals the loss of its logits, and so
    do the gradients of every parameter (the LM head is tied to the embedding)."""
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=97).train()
    x = torch.randint(0, 97, (2, 24))
    plain = model(x, labels=x)
    plain_grads = torch.autograd.grad(plain.loss, list(model.parameters()), allow_unused=True)
    model.fused_loss = True
    fused = model(x, labels=x)
    fused_grads = torch.autograd.grad(fused.loss, list(model.parameters()), allow_unused=True)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, plain.loss, atol=1e-5, rtol=1e-5)
    for got, expected in zip(fused_grads, plain_grads):
        if expected is None:
            assert got is None
        else:
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_model_fused_loss_kernel_receives_the_shifted_targets():
    """A fused-loss kernel (e.g. Liger's) gets hidden [B*T, C], the head weight and the targets
    shifted by one with the last position ignored; its value is the model's loss."""
    model = dynlm.build_model("standard-tiny", vocab_size=97).train()
    x = torch.randint(0, 97, (2, 24))
    seen = {}

    def kernel(hidden, weight, targets):
        seen.update(hidden=hidden, weight=weight, targets=targets)
        return linear_cross_entropy_reference(hidden, weight, targets)

    model.fused_loss, model.fused_loss_kernel = True, kernel
    out = model(x, labels=x)
    assert seen["hidden"].shape == (48, model.config.hidden_size)
    assert seen["weight"] is model.lm_head.weight
    expected_targets = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1).reshape(-1)
    assert torch.equal(seen["targets"], expected_targets)
    model.fused_loss_kernel = None
    torch.testing.assert_close(out.loss, model(x, labels=x).loss, atol=1e-5, rtol=1e-5)
