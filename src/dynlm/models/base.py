"""The model contract every architecture implements (docs/architecture.md, "The model contract")."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dynlm.config import ModelConfig
from dynlm.models.serialization import save_checkpoint
from dynlm.nn.loss import linear_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V]; None from a training forward with a fused loss
    loss: torch.Tensor | None = None  # mean next-token cross-entropy in nats (labels given)
    aux_loss: torch.Tensor | None = None  # weighted auxiliary losses; NOT included in `loss`
    state: Any = None  # state after the last position; pass back to continue
    # scalar tensors (no host sync in the forward); read them (`float(v)`) only when logging
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Hugging Face convention: labels == input_ids, shifted here; -100 is ignored. fp32."""
    # shift the labels rather than the logits: no copy of the [B, T, V] logits
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]; the last position predicts nothing
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                           ignore_index=-100, reduction=reduction)


def fused_causal_lm_loss(hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor,
                         kernel: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """`causal_lm_loss(hidden @ head_weight.T, labels)` without materialising the [B, T, V]
    logits: hidden [B, T, C], head_weight [V, C]. `kernel(hidden [N, C], weight [V, C], targets [N])`
    -> mean loss over targets != -100; default the chunked one of `dynlm.nn.loss` (another is
    Liger's fused linear cross-entropy, `benchmarks/gpu_train.py`)."""
    targets = F.pad(labels[:, 1:], (0, 1), value=-100)  # [B, T]
    return (kernel or linear_cross_entropy)(hidden.reshape(-1, hidden.size(-1)), head_weight, targets.reshape(-1))


class DynModel(nn.Module):
    """Base class of every architecture.

    out = model(input_ids [B, T], labels=None, state=None, use_cache=False) -> ModelOutput
    state = model.init_state(batch_size, device=..., dtype=...)

    Caching is explicit. A plain forward (no state, use_cache=False) allocates no state, whatever
    the train/eval mode, and returns `out.state = None`. Passing a state continues it (updated
    in place and returned as `out.state`); `use_cache=True` without a state starts a fresh one
    and returns it. Recurrent architectures follow the same rule.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    architecture: ClassVar[str] = "base"
    # True when the training forward is causal by design (routed models choose top-k over a
    # whole sequence while training, which is not)
    causal_in_training: ClassVar[bool] = True
    # True for recurrent architectures whose state must not grow with the tokens consumed
    constant_state: ClassVar[bool] = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config

    # -- contract -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                state: Any = None, use_cache: bool = False) -> ModelOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, max_length: int = 0) -> Any:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def state_nbytes(state: Any) -> int:
        """Bytes held by a state (KV cache, recurrent state, memory)."""
        if state is None:
            return 0
        if hasattr(state, "nbytes") and callable(state.nbytes):
            return int(state.nbytes())
        if isinstance(state, torch.Tensor):
            return state.numel() * state.element_size()
        if isinstance(state, dict):
            return sum(DynModel.state_nbytes(v) for v in state.values())
        if isinstance(state, (list, tuple)):
            return sum(DynModel.state_nbytes(v) for v in state)
        return 0

    # -- shared helpers -------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Normal(0, initializer_range) for linear and embedding weights, zeros for biases, ones
        for norms; residual output projections scaled by 1/sqrt(2 * num_layers) (GPT-2)."""
        std = self.config.initializer_range
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                scale = 1.0 / math.sqrt(2 * self.config.num_layers) if name.endswith(
                    ("o_proj", "down_proj")) else 1.0
                nn.init.normal_(module.weight, mean=0.0, std=std * scale)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}
        n = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    n -= module.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (nanoGPT's formula): 6·N + 12·L·H·Q·T, where N counts every
        parameter that takes part in a matmul (the LM head yes, an untied input embedding no)."""
        c = self.config
        n = self.num_parameters(exclude_embeddings=False)
        if not c.tie_word_embeddings:
            n -= c.vocab_size * c.hidden_size  # input embedding is a lookup, not a matmul
        return 6 * n + 12 * c.num_layers * c.num_heads * c.head_dim * seq_len

    # -- checkpoints ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path, tokenizer: Any = None,
                        generation_config: dict[str, Any] | None = None) -> Path:
        """Write this model as a dynlm checkpoint directory (load it with `dynlm.load_pretrained`)."""
        return save_checkpoint(self, directory, tokenizer=tokenizer, generation_config=generation_config)
