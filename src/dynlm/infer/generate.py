"""The generation engine: one for every architecture, through the model's `state`.

    ids = generate_ids(model, input_ids, max_new_tokens=20)             # token level, batched
    text = generate(model, tokenizer, "Once upon", max_new_tokens=50)   # text level
    for piece in stream_generate(model, tokenizer, "Once upon"): print(piece, end="")
    for step in stream_decode(model, tokenizer, prompt_ids): ...        # token by token, finish reason

Prompts are prefilled once, then each new token is fed alone with the state (KV cache,
recurrent state, routing caches), so decoding costs one position per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from dynlm.errors import ConfigError, ContextLengthError
from dynlm.infer.graphs import graph_decoder, graphs_by_default
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
    graphs: bool | None = None,
    compile: bool | str = False,
    **sampling: Any,
) -> Iterator[torch.Tensor]:
    """Yield the next token ids [B] at every step. Rows that produced an EOS keep yielding the
    first EOS id (callers drop what follows). Stops when every row is done or after
    `max_new_tokens` steps.

    `graphs`: decode on the static KV cache with the step captured in a CUDA graph
    (`dynlm.infer.graphs`; on a CPU the same static cache, eagerly). None (default): on CUDA for
    the transformer family; False: the eager reference path (growable cache).
    `compile`: run the static-cache step through `torch.compile` (True = mode "default", or a
    mode name; implies the static cache). On CUDA the compiled step is what the graph captures;
    on a CPU it runs as compiled code. The first call compiles, later calls reuse it."""
    cfg = _split_kwargs(sampling)
    if input_ids.dim() != 2 or input_ids.size(1) == 0:
        raise ConfigError(f"input_ids must be [batch, length>0], got {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and input_ids.size(1) + max_new_tokens > limit:
        raise ContextLengthError(f"{input_ids.size(1)} prompt tokens + {max_new_tokens} new tokens = "
                                 f"{input_ids.size(1) + max_new_tokens} positions, past the model's "
                                 f"max_position_embeddings {limit}", "shorten the prompt or lower max_new_tokens")
    was_training = model.training
    model.eval()
    session = None  # the graph decoder's session this generation holds
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
        if compile and graphs is False:
            raise ConfigError("compile=True compiles the static-cache step", "drop graphs=False (or compile)")
        static = bool(compile) or (graphs_by_default(model) if graphs is None else graphs)
        mode = "default" if compile is True else (compile or None)
        decoder = graph_decoder(model, compile=mode) if static else None
        if decoder is not None:
            # exclusive: another generation interleaved with this one (a server) gets its own cache
            logits = decoder.prefill(input_ids, max_new_tokens, exclusive=True)
            session = decoder.session
        else:
            state = model.init_state(b, device=device, max_length=t + max_new_tokens)
            out = model(input_ids, state=state)
            logits = out.logits[:, -1]
        context = input_ids
        for step in range(max_new_tokens):
            next_ids = select_next(logits, context, cfg, generator)
            if eos.numel():
                next_ids = torch.where(done, eos[0], next_ids)
                done = done | torch.isin(next_ids, eos)
            yield next_ids
            # no forward after the last token; no host sync per token unless EOS can stop it
            if step == max_new_tokens - 1 or (eos.numel() and bool(done.all())):
                return
            context = torch.cat([context, next_ids[:, None]], dim=1)
            if decoder is not None:
                logits = decoder.step(next_ids, session)
            else:
                out = model(next_ids[:, None], state=out.state)
                logits = out.logits[:, -1]
    finally:
        if session is not None:
            decoder.release(session)
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


@dataclass
class DecodeStep:
    """One step of `stream_decode`: the text released by this step ("" while a possible stop
    string is held back), the token decoded (None for the closing step) and, on the closing step
    only, why decoding ended: "stop" (an EOS token or a stop string) or "length"."""

    text: str
    token_id: int | None
    finish_reason: str | None = None


def stream_decode(model: torch.nn.Module, tokenizer: Any, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                  stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, seed: int | None = None,
                  **sampling: Any) -> Iterator[DecodeStep]:
    """Decode one prompt (token ids) step by step: one `DecodeStep` per new token, then a closing
    step with the finish reason. Text never contains an EOS token or a stop string, nor half a
    UTF-8 character. Closing the iterator early stops decoding (a server's client went away)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long)
    eos_ids = list(tokenizer.eos_ids) if eos_ids is None else list(eos_ids)
    hold = max((len(s) - 1 for s in stop), default=0)  # a tail that could start a stop string
    new: list[int] = []
    emitted = ""
    for step in iter_token_steps(model, ids, max_new_tokens, eos_ids, seed, **sampling):
        token = int(step[0])
        if token in eos_ids:
            yield DecodeStep(_trim(tokenizer.decode(new), stop)[0][len(emitted):], None, "stop")
            return
        new.append(token)
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next byte
            yield DecodeStep("", token)
            continue
        text, stopped = _trim(text, stop)
        safe = text if stopped else text[: max(len(emitted), len(text) - hold)]
        piece = safe[len(emitted):]
        emitted = max(safe, emitted, key=len)
        yield DecodeStep(piece, token)
        if stopped:
            yield DecodeStep("", None, "stop")
            return
    final, stopped = _trim(tokenizer.decode(new), stop)
    yield DecodeStep(final[len(emitted):], None, "stop" if stopped else "length")


def stream_generate(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 64,
                    stop: Sequence[str] = (), eos_ids: Sequence[int] | None = None, seed: int | None = None,
                    chat: bool | None = None, **sampling: Any) -> Iterator[str]:
    """Yield the continuation of one prompt piece by piece as it is decoded. Stops at an EOS
    token, at any of the `stop` strings (not included), or after `max_new_tokens`."""
    ids = encode_prompt(tokenizer, prompt, chat)
    for step in stream_decode(model, tokenizer, ids, max_new_tokens, stop, eos_ids, seed, **sampling):
        if step.text:
            yield step.text


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


@torch.no_grad()
def token_logprobs(model: torch.nn.Module, prompt_ids: Sequence[int], completion_ids: Sequence[int],
                   top: int = 0) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Log-probabilities (natural log, the model's own distribution before any sampling filter)
    of each completion token given everything before it, and the `top` most likely tokens at each
    of those positions: one forward over prompt + completion."""
    if not completion_ids:
        return [], []
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([list(prompt_ids) + list(completion_ids)], dtype=torch.long, device=_device_of(model))
        logits = model(ids).logits[0, len(prompt_ids) - 1: -1].float()  # [n, V]: predicts each completion token
    finally:
        model.train(was_training)
    logp = logits.log_softmax(-1)
    chosen = logp.gather(1, ids[0, len(prompt_ids):, None]).squeeze(1).tolist()
    if top <= 0:
        return chosen, [[] for _ in chosen]
    values, indices = logp.topk(min(top, logp.size(-1)), dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]


@dataclass
class BeamHypothesis:
    ids: list[int]  # generated ids (the prompt excluded; an ending EOS included)
    score: float  # sum of token log-probabilities / len(ids) ** length_penalty


@torch.no_grad()
def beam_search(model: torch.nn.Module, prompt_ids: Sequence[int], num_beams: int = 4, max_new_tokens: int = 32,
                length_penalty: float = 1.0, eos_ids: Sequence[int] = (),
                early_stopping: bool = False) -> list[BeamHypothesis]:
    """Beam search with a length penalty, as `transformers` does it (same candidates per step, same
    finishing rule, same stopping heuristic), best hypothesis first.

    Every step scores the 2 x num_beams (more with several EOS ids) best continuations of all beams;
    a continuation that ends in EOS, or reaches `max_new_tokens`, is finished with the score
    sum(log p) / length ** length_penalty (length counts generated tokens: > 0 favours longer
    answers), the best unfinished ones continue. Search stops when no running beam can beat the
    worst of `num_beams` finished ones (its current score at the current length), when all are
    finished and `early_stopping`, or at `max_new_tokens`.
    The beams are re-run on their whole sequence each step (no cache reordering), which is
    correct for every architecture's state; it costs O(n^2) in the answer length."""
    if num_beams < 1 or max_new_tokens < 1:
        raise ConfigError(f"num_beams and max_new_tokens must be >= 1, got {num_beams} and {max_new_tokens}")
    if not prompt_ids:
        raise ConfigError("beam search needs a non-empty prompt")
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        eos = set(eos_ids)
        keep = max(2, 1 + len(eos)) * num_beams
        running = torch.tensor([list(prompt_ids)] * num_beams, dtype=torch.long, device=device)  # [K, P + t]
        scores = torch.full((num_beams,), -1.0e9, device=device)
        scores[0] = 0.0  # all beams start as the same prompt: only the first one expands at step 1
        finished: list[BeamHypothesis] = []
        improvable = True
        for step in range(max_new_tokens):
            logp = model(running).logits[:, -1].float().log_softmax(-1)  # [K, V]
            vocab = logp.size(-1)
            top_scores, top_index = (logp + scores[:, None]).view(-1).topk(min(keep, logp.numel()))
            beams, tokens = top_index // vocab, top_index % vocab
            last_step = step + 1 == max_new_tokens
            ends = [last_step or int(t) in eos for t in tokens.tolist()]
            if improvable and not (early_stopping and len(finished) == num_beams):
                for rank in range(num_beams):  # only the top num_beams candidates may finish
                    if ends[rank]:
                        ids = running[beams[rank], len(prompt_ids):].tolist() + [int(tokens[rank])]
                        finished.append(BeamHypothesis(ids, float(top_scores[rank]) / (step + 1) ** length_penalty))
                finished = sorted(finished, key=lambda h: -h.score)[:num_beams]
            if all(ends):
                break
            alive = [i for i in range(len(ends)) if not ends[i]][:num_beams]
            running = torch.cat([running[beams[alive]], tokens[alive, None]], dim=1)
            scores = top_scores[alive]
            if len(alive) < num_beams:  # fewer live candidates than beams: pad with dead copies
                pad = num_beams - len(alive)
                running = torch.cat([running, running[:1].expand(pad, -1)])
                scores = torch.cat([scores, torch.full((pad,), -1.0e9, device=device)])
            best_possible = float(scores[0]) / (step + 1) ** length_penalty
            improvable = improvable and (len(finished) < num_beams or best_possible > finished[-1].score)
            if not improvable or (early_stopping and len(finished) == num_beams):
                break
        return finished
    finally:
        model.train(was_training)


def beam_generate(model: torch.nn.Module, tokenizer: Any, prompt: str, num_beams: int = 4, max_new_tokens: int = 32,
                  length_penalty: float = 1.0, stop: Sequence[str] = (), chat: bool | None = None,
                  early_stopping: bool = False) -> str:
    """The best `beam_search` continuation of one prompt as text: EOS dropped, cut at the first
    stop string."""
    hypotheses = beam_search(model, encode_prompt(tokenizer, prompt, chat), num_beams, max_new_tokens,
                             length_penalty, list(tokenizer.eos_ids), early_stopping)
    ids = hypotheses[0].ids
    eos = set(tokenizer.eos_ids)
    ids = ids[:-1] if ids and ids[-1] in eos else ids
    return _trim(tokenizer.decode(ids), stop)[0]

