"""LM head + cross-entropy without the full logits.

`F.cross_entropy(hidden @ W.T, targets)` materialises [N, V] logits, their fp32 copy, the softmax
and the gradient of the logits: for N = 16 x 1024 tokens and V = 50k that is several GB of memory
traffic per step. `linear_cross_entropy` walks over chunks of rows instead: each chunk's logits
are computed, reduced to the loss and turned into the gradients of the hidden states and the
weight right away (the softmax is the gradient of logsumexp), then dropped. Peak extra memory is
one chunk of fp32 logits; the backward pass only scales the stored gradients.

`linear_cross_entropy_reference` is the plain computation it must equal (values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_BYTES = 1 << 28  # fp32 logits held at once (256 MiB)


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                   ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of logits hidden [N, C] @ weight [V, C].T (in fp32) against targets [N]."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, ignore_index=ignore_index)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int,
                ignore_index: int, need_grads: bool) -> torch.Tensor:
        weight_c = weight.to(hidden.dtype)  # the matmul dtype is the hidden states' (bf16 under autocast)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1).float()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grads else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grads else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start:start + chunk_rows]  # [n, C]
            t, ok = targets[start:start + chunk_rows], valid[start:start + chunk_rows]
            logits = (h @ weight_c.T).float()  # [n, V]
            lse = logits.logsumexp(-1)  # [n]
            picked = logits.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(ok, lse - picked, 0.0).sum()
            if need_grads:
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
                grad.scatter_add_(1, t.clamp(min=0).unsqueeze(1), torch.full_like(picked, -1.0).unsqueeze(1))
                grad.mul_((ok.float() / count).unsqueeze(1))
                grad = grad.to(hidden.dtype)
                grad_hidden[start:start + chunk_rows] = grad @ weight_c
                grad_weight += (grad.T @ h).float()  # accumulated in fp32 over the chunks
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total / count

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_output.to(grad_hidden.dtype),
                (grad_weight * grad_output).to(ctx.weight_dtype), None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -100, chunk_rows: int | None = None) -> torch.Tensor:
    """`linear_cross_entropy_reference` without the [N, V] logits: hidden [N, C], weight [V, C],
    targets [N] -> mean over the targets != ignore_index (fp32). `chunk_rows` rows of logits are
    held at once (default: CHUNK_BYTES of fp32 logits)."""
    rows = chunk_rows or max(1, CHUNK_BYTES // (4 * weight.shape[0]))
    need_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _LinearCrossEntropy.apply(hidden, weight, targets, rows, ignore_index, need_grads)
