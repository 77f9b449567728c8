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
