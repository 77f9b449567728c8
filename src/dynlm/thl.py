"""The THL design document's Python API, as a thin layer over the model contract.

    config = THLConfig(num_tiers=3, memory_slots=1024, dim=768, vocab_size=50257)
    model = THLModel(config)
    logits, state = model(input_ids)                       # [B, T, V] and the state after T tokens
    engine = LayeredInferenceEngine(model, device="cuda")  # weights streamed from host memory
    state = InferenceState.init(batch_size=1, config=config, tiers=model.tiers, memory_bank=model.memory_bank)
    logits, state = engine.step(token, state)              # token [B, 1] -> logits [B, V]
    text = generate_text(model=model, tokenizer=tokenizer, prompt="...", max_length=200, temperature=0.8, top_k=50)

`THLModel.model` is the registered `thl` architecture (`dynlm.models.thl.THLModel`): save it,
train it, evaluate it like any other. `max_length` counts the prompt's tokens too (Hugging Face's
meaning)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynlm.errors import ConfigError
from dynlm.infer.generate import generate
from dynlm.infer.layered import LayeredEngine
from dynlm.models import thl as _thl

__all__ = ["THLConfig", "THLModel", "LayeredInferenceEngine", "InferenceState", "generate_text"]


def THLConfig(num_tiers: int = 3, memory_slots: int = 1024, dim: int = 768, vocab_size: int = 50257,  # noqa: N802
              **fields: Any) -> _thl.THLConfig:
    """The `thl` config with the design document's argument names (`dim` is `hidden_size`); any
    other field of `dynlm.models.thl.THLConfig` may be given by its name."""
    return _thl.THLConfig(num_tiers=num_tiers, memory_slots=memory_slots, hidden_size=dim, vocab_size=vocab_size,
                          **fields)


class THLModel(nn.Module):
    """`logits, state = model(input_ids)`: the registered model, returning a tuple."""

    def __init__(self, config: _thl.THLConfig):
        super().__init__()
        self.config = config
        self.model = _thl.THLModel(config)

    @property
    def tiers(self) -> nn.ModuleList:
        return self.model.tiers

    @property
    def memory_bank(self) -> nn.Module:
        return self.model.memory_bank

    def forward(self, input_ids: torch.Tensor, state: _thl.THLState | None = None,
                ) -> tuple[torch.Tensor, _thl.THLState]:
        out = self.model(input_ids, state=state, use_cache=True)
        return out.logits, out.state


class InferenceState(_thl.THLState):
    """The THL state (tiers, memory bank and its metadata, local FIFO, position)."""

    @classmethod
    def init(cls, batch_size: int, config: _thl.THLConfig, tiers: nn.Module | None = None,
             memory_bank: nn.Module | None = None, device: str | torch.device | None = None) -> _thl.THLState:
        """Zeros for `batch_size` sequences, on `device` or else where `memory_bank` (or `tiers`)
        lives."""
        if device is None:
            module = memory_bank if memory_bank is not None else tiers
            device = next(module.parameters()).device if module is not None else "cpu"
        return _thl.THLState.zeros(config, batch_size, device)


class LayeredInferenceEngine:
    """Token-by-token decoding with the weights streamed to `device` (see `dynlm.infer.layered`)."""

    def __init__(self, model: THLModel | _thl.THLModel, device: str | torch.device = "cuda",
                 max_gpu_memory: int | None = None, int8: bool = False):
        inner = model.model if isinstance(model, THLModel) else model
        self.engine = LayeredEngine(inner, device=device, max_gpu_memory=max_gpu_memory, int8=int8)

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def step(self, token: torch.Tensor, state: _thl.THLState) -> tuple[torch.Tensor, _thl.THLState]:
        """token [B, 1] (or [B]) -> (logits [B, V] of the next token, the new state)."""
        if token.dim() == 1:
            token = token[:, None]
        if token.dim() != 2 or token.shape[1] != 1:
            raise ConfigError(f"engine.step takes one token per row, shape [batch, 1]; got {tuple(token.shape)}")
        moved = _thl.THLState.from_tensors([t.to(self.device) for t in state.tensors()])
        out = self.engine(token, state=moved)
        return out.logits[:, -1], out.state


def generate_text(model: THLModel | nn.Module, tokenizer: Any, prompt: str, max_length: int = 200,
                  temperature: float = 0.8, top_k: int = 50, seed: int | None = None) -> str:
    """The prompt followed by its continuation, `max_length` tokens at most in all."""
    inner = model.model if isinstance(model, THLModel) else model
    prompt_tokens = len(tokenizer.encode(prompt))
    if max_length <= prompt_tokens:
        raise ConfigError(f"max_length ({max_length}) leaves no room after the prompt's {prompt_tokens} tokens")
    return prompt + generate(inner, tokenizer, prompt, max_new_tokens=max_length - prompt_tokens, seed=seed,
                    temperature=temperature, top_k=top_k)
