"""The generation engine: one for every architecture, through the model's `state`.

    ids = generate_ids(model, input_ids, max_new_tokens=20)             # token level, batched
    text = generate(model, tokenizer, "Once upon", max_new_tokens=50)   # text level
    for piece in stream_generate(model, tokenizer, "Once upon"): print(piece, end="")

Prompts are prefilled once, then each new token is fed alone with the state (KV cache,
recurrent state, routing caches), so decoding costs one position per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any

import torch

from dynlm.errors import ConfigError
from dynlm.infer.sampling import SamplingConfig, select_next

_SAMPLING_KEYS = {f.name for f in fields(SamplingConfig)}


def _split_kwargs(kwargs: dict[str, Any]) -> SamplingConfig:
    unknown = set(kwargs) - _SAMPLING_KEYS
    if unknown:
        from dynlm.errors import did_you_mean

        name = sorted(unknown)[0]
        raise ConfigError(f"unknown generation option '{name}'", did_you_mean(name, _SAMPLING_KEYS))
    return SamplingConfig(**kwargs)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def iter_token_steps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_ids: Sequence[int] | None = None,
    seed: int | None = None,
    **sampling: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] at every step. Rows that produced an EOS keep yielding the
    first EOS id (callers drop what follows). Stops when every row is done or after
    `max_new_tokens` steps."""
    cfg = _split_kwargs(sampling)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ConfigError(f"input_ids must be [batch, length>0], got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        input_ids = input_ids.to(device)
        b, t = input_ids.shape
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        eos = torch.tensor(list(eos_ids or []), dtype=torch.long, device=device)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        state = model.init_state(b, device=device, max_length=t + max_new_tokens)
        out = model(input_ids, state=state)
        context = input_ids
        for _ in range(max_new_tokens):
            next_ids = select_next(out.logits[:, -1], context, cfg, generator)
            if eos.numel():
                next_ids = torch.where(done, eos[0], next_ids)
                done = done | torch.isin(next_ids, eos)
            yield next_ids
            if bool(done.all()):
                return
            context = torch.cat([context, next_ids[:, None]], dim=1)
            out = model(next_ids[:, None], state=out.state)
    finally:
        model.train(was_training)


def generate_ids(model: torch.nn.Module, input_ids: torch.Tensor, max_new_tokens: int = 32,
                 eos_ids: Sequence[int] | None = None, seed: int | None = None, **sampling: Any) -> torch.Tensor:
    """Prompt ids [B, T] -> prompt + generated ids [B, T + n] (n <= max_new_tokens; rows that
    finished early are padded with their EOS id)."""
    steps = list(iter_token_steps(model, input_ids, max_new_tokens, eos_ids, seed, **sampling))
    if not steps:
        return input_ids
    return torch.cat([input_ids.to(steps[0].device), torch.stack(steps, dim=1)], dim=1)


def encode_prompt(tokenizer: Any, prompt: str, chat: bool | None = None) -> list[int]:
    """The ids fed to the model. `chat`: wrap the prompt in the tokenizer's chat template (True),
    feed it as is (False), or use the template when the tokenizer has one (None, the default of
    `generate` and of `dynlm generate`)."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("chat=True but this tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        return tokenizer.encode(text)
    prefix = [tokenizer.separator_id] if getattr(tokenizer, "prepend_separator", False) else []
    ids = prefix + tokenizer.encode(prompt)
    if not ids:
        raise ConfigError("empty prompt", "give at least one character, or use a tokenizer with a separator token")
    return ids


def _trim(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = min((i for s in stop if (i := text.find(s)) >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def stream_generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
                    stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, seed: int | None = None,
                    chat: bool | None = None, **sampling: Any) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece as it is decoded. Stops at an EOS
    token, at any of the `stop` strings (not included), or after `max_new_tokens`."""
    ids = torch.tensor([encode_prompt(tokenizer, prompt, chat)], dtype=torch.long)
    eos_ids = list(tokenizer.eos_ids) if eos_ids is None else list(eos_ids)
    new: list[int] = []
    emitted = ""
    for step in iter_token_steps(model, ids, max_new_tokens, eos_ids, seed, **sampling):
        token = int(step[0])
        if token in eos_ids:
            break
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            continue
        text, stopped = _trim(text, stop)
        # hold back a tail that could be the start of a stop string
        hold = max((len(s) - 1 for s in stop), default=0)
        safe = text if stopped else text[: max(len(emitted), len(text) - hold)]
        if len(safe) > len(emitted):
            yield safe[len(emitted):]
            emitted = safe
        if stopped:
            return
    final, _ = _trim(tokenizer.decode(new), stop)
    if len(final) > len(emitted):
        yield final[len(emitted):]


def generate(model: torch.nn.Module, tokenizer: Any, prompt: str | list[str], max_new_tokens: int = 64,
             stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, seed: int | None = None,
             chat: bool | None = None, **sampling: Any) -> str | list[str]:
    """Continuation(s) of one prompt or a batch of prompts. A batch is decoded together, grouped
    by prompt length so that no padding ever enters the model (outputs are exact)."""
    if isinstance(prompt, str):
        return "".join(stream_generate(model, tokenizer, prompt, max_new_tokens, stop, eos_ids, seed, chat,
                                       **sampling))
    eos_ids = list(tokenizer.eos_ids) if eos_ids is None else list(eos_ids)
    encoded = [encode_prompt(tokenizer, p, chat) for p in prompt]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    results: list[str] = [""] * len(prompt)
    for rows in groups.values():
        batch = torch.tensor([encoded[i] for i in rows], dtype=torch.long)
        out = generate_ids(model, batch, max_new_tokens, eos_ids, seed, **sampling)[:, batch.size(1):]
        for row, i in enumerate(rows):
            ids = out[row].tolist()
            cut = next((j for j, tok in enumerate(ids) if tok in eos_ids), len(ids))
            results[i] = _trim(tokenizer.decode(ids[:cut]), stop)[0]
    return results
