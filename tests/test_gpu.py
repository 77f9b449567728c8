"""GPU code paths (run on the lent GPU; excluded from the default run)."""

from __future__ import annotations

import pytest
import torch

import dynlm
from dynlm.infer.generate import generate_ids

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - only on machines without CUDA
    pytest.skip("needs CUDA", allow_module_level=True)

ARCHS = dynlm.list_architectures()


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_matches_cpu(arch):
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=211).eval()
    x = torch.randint(0, 211, (3, 40))
    with torch.no_grad():
        cpu = model(x).logits
        gpu = model.cuda()(x.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_training_step_and_cached_decode(arch):
    torch.manual_seed(0)
    model = dynlm.build_model(f"{arch}-tiny", vocab_size=211).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)
    x = torch.randint(0, 211, (4, 64), device="cuda")
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, labels=x)
            loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    prompt = x[:2, :9]
    ids = generate_ids(model, prompt, max_new_tokens=10)
    ref = prompt
    with torch.no_grad():
        for _ in range(10):
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(ids, ref)


def test_flash_attention_path_is_used_for_training():
    """The training forward must reach SDPA with is_causal and no mask (flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = dynlm.build_model("standard-tiny", vocab_size=211, num_heads=4, num_kv_heads=4).cuda()
    x = torch.randint(0, 211, (2, 128), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        model(x, labels=x).loss.backward()  # raises if flash cannot serve the call


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_loss_on_cuda_bf16_equals_the_fp32_reference(compiled):
    """The chunked LM head + cross-entropy on CUDA in bf16 (eager, and compiled as the trainer
    compiles the model) against the plain fp32 loss on the same values: loss and gradients within
    bf16 rounding, at a vocabulary where the full logits would be large."""
    from dynlm.nn.loss import linear_cross_entropy, linear_cross_entropy_reference

    torch.manual_seed(0)
    hidden = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (0.05 * torch.randn(50304, 256, device="cuda")).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 50304, (1024,), device="cuda")
    targets[::7] = -100  # ignored positions
    loss_fn = torch.compile(linear_cross_entropy) if compiled else linear_cross_entropy
    loss = loss_fn(hidden, weight, targets)
    grads = torch.autograd.grad(loss, (hidden, weight))
    h32, w32 = hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    ref = linear_cross_entropy_reference(h32, w32, targets)
    ref_grads = torch.autograd.grad(ref, (h32, w32))
    assert abs(loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    for got, expected in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        assert (got.float() - expected).norm() / expected.norm() < 2e-2
    assert grads[0][::7].abs().max() == 0  # ignored rows get no gradient
