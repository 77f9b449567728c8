"""A fixed bank of memory slots M [B, J, Dm]: sparse top-k multi-head reads and cosine novelty.

Read (per head h, query q_h already mapped into memory space, see `sparse_topk_read`):

    score_{h,j} = q_h · m_j − λ · load_j
    S_h = top-k_j (score_{h,j} + noise_{h,j})        noise: only to explore the choice (training)
    α_h = softmax over S_h of the clean score_{h,j}
    read_h = Σ_{j ∈ S_h} α_{h,j} m_j

Only k slots per head are read; the cost of choosing them is one pass over the bank."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sparse_topk_read(queries: torch.Tensor, memory: torch.Tensor, load: torch.Tensor, load_penalty: float,
                     k: int, noise: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """queries [B, H, Dm], memory [B, J, Dm], load [B, J], noise [B, H, J] or None.
    Returns (read [B, H, Dm], slots [B, H, k], alpha [B, H, k])."""
    scores = torch.einsum("bhm,bjm->bhj", queries, memory.to(queries.dtype)).float()
    scores = scores - load_penalty * load.unsqueeze(1)  # [B, H, J]
    choice = scores if noise is None else scores + noise
    slots = torch.topk(choice.detach(), k, dim=-1).indices  # [B, H, k]
    alpha = torch.softmax(scores.gather(-1, slots), dim=-1)  # clean scores decide the weights
    b, h, _ = slots.shape
    chosen = memory.gather(1, slots.reshape(b, h * k, 1).expand(-1, -1, memory.shape[-1]))  # [B, H*k, Dm]
    read = torch.einsum("bhk,bhkm->bhm", alpha.to(memory.dtype), chosen.view(b, h, k, -1))
    return read, slots, alpha


def sparse_topk_read_reference(queries: torch.Tensor, memory: torch.Tensor, load: torch.Tensor,
                               load_penalty: float, k: int, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Naive loops: for each row and head, sort the slots by (noisy) score, softmax the clean
    scores of the best k, and sum those slots."""
    b, h, _ = queries.shape
    out = torch.zeros_like(queries)
    for i in range(b):
        for j in range(h):
            scores = [float(queries[i, j] @ memory[i, s]) - load_penalty * float(load[i, s])
                      for s in range(memory.shape[1])]
            choice = [sc + (0.0 if noise is None else float(noise[i, j, s])) for s, sc in enumerate(scores)]
            best = sorted(range(len(scores)), key=lambda s: -choice[s])[:k]
            weights = torch.softmax(torch.tensor([scores[s] for s in best], dtype=torch.float64), dim=0)
            out[i, j] = sum(float(w) * memory[i, s] for w, s in zip(weights, best))
    return out


def slot_usage(slots: torch.Tensor, alpha: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Read mass per slot [B, J] (each head's α sums to 1; divided by the number of heads)."""
    b, h, k = slots.shape
    usage = torch.zeros(b, num_slots, dtype=alpha.dtype, device=alpha.device)
    return usage.scatter_add(1, slots.reshape(b, h * k), alpha.reshape(b, h * k)) / h


def gumbel_noise(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None = None,
                 ) -> torch.Tensor:
    """Standard Gumbel samples −log(−log U)."""
    u = torch.rand(shape, device=device, generator=generator).clamp(1e-9, 1 - 1e-9)
    return -torch.log(-torch.log(u))


def clip_norm(x: torch.Tensor, max_norm: float, eps: float = 1e-8) -> torch.Tensor:
    """x scaled down to L2 norm max_norm where it is longer (last dimension)."""
    return x * (max_norm / (x.norm(dim=-1, keepdim=True) + eps)).clamp(max=1.0)


def cosine_novelty(candidate: torch.Tensor, memory: torch.Tensor, eps: float = 1e-8,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """candidate [B, Dm], memory [B, J, Dm] -> (novelty 1 − max_j cos(candidate, m_j) [B],
    cosines [B, J]). An empty slot (zero vector) has cosine 0."""
    cos = F.cosine_similarity(memory, candidate.unsqueeze(1).to(memory.dtype), dim=-1, eps=eps)  # [B, J]
    return 1.0 - cos.max(dim=-1).values, cos
