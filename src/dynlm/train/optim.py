"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules.

The schedule is a pure function of the step, so resuming needs nothing but the step."""

from __future__ import annotations

import math

import torch
from torch import nn

from dynlm.train.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on matrices, none on norms, biases (anything 1-D) and
    embeddings (a tied LM head shares the embedding's tensor, so it is not decayed either)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():  # shared (tied) parameters appear once
        if not param.requires_grad:
            continue
        if param.dim() < 2 or id(param) in embedding_ids:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_adamw_supported(device: torch.device) -> bool:
    """Fused AdamW runs as one kernel per step and skips the update on device-side `found_inf`."""
    return device.type in ("cuda", "cpu", "mps")


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas),
                             eps=cfg.eps, fused=fused_adamw_supported(device) or None)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based).

    All schedules warm up linearly over `warmup_steps`. Then:
      cosine:   cosine decay from lr to min_lr at max_steps;
      wsd:      constant lr, then a linear decay to min_lr over the last `decay_fraction` of the steps;
      constant: lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_steps = max(1, round(cfg.decay_fraction * cfg.max_steps))
        decay_start = max(cfg.warmup_steps, cfg.max_steps - decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / max(1, cfg.max_steps - decay_start))
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    # cosine
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
