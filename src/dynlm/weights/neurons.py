"""Searchable weights: which MLP neurons fire selectively on a concept.

    result = find_neurons_for(model, tokenizer, ["the cat sat", "a cat purrs"], background=texts,
                              concept="cat", top=20)

The model reads the concept's examples and the background text; for every MLP neuron (an input
of a SwiGLU down_proj) the score is

    score = (mean activation on concept tokens - mean on background tokens) / std on background tokens

Concept tokens are the tokens that overlap an occurrence of `concept` in the examples (all
tokens of the examples when no `concept` string is given). Each neuron also reports the fraction
of concept tokens above the background's 99th percentile, and the contexts where it fires most.
This is a heuristic, the kind of search that suggests where to look; it does not prove what a
neuron means.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynlm.errors import DataError
from dynlm.weights.analysis import ActivationRecorder, _layer_of
from dynlm.weights.loading import load_pretrained, load_tokenizer

METHOD = ("score = (mean activation on concept tokens - mean on background tokens) / (std on background tokens "
          "+ 1e-6), per MLP neuron (input of down_proj); above_background_p99 = fraction of concept tokens whose "
          "activation exceeds the background's 99th percentile. A heuristic ranking, not a proof of meaning.")


def _token_spans(tokenizer: Any, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token in the decoded text (by decoding growing prefixes)."""
    spans, previous = [], 0
    for i in range(len(ids)):
        length = len(tokenizer.decode(ids[: i + 1]))
        spans.append((min(previous, length), length))
        previous = max(previous, length)
    return spans


def _concept_mask(tokenizer: Any, text: str, ids: list[int], concept: str | None, offset: int) -> np.ndarray:
    """True for tokens (of ids, the first `offset` being a separator) inside an occurrence of the concept."""
    mask = np.zeros(len(ids), dtype=bool)
    if concept is None:
        mask[offset:] = True
        return mask
    lower, needle = text.lower(), concept.lower()
    hits, start = [], lower.find(needle)
    while start >= 0:
        hits.append((start, start + len(needle)))
        start = lower.find(needle, start + 1)
    for i, (a, b) in enumerate(_token_spans(tokenizer, ids[offset:])):
        if b > a and any(a < end and b > begin for begin, end in hits):
            mask[offset + i] = True
    return mask


def _context(tokenizer: Any, ids: list[int], position: int, before: int = 10, after: int = 4) -> str:
    left = tokenizer.decode(ids[max(0, position - before): position])
    token = tokenizer.decode(ids[position: position + 1])
    right = tokenizer.decode(ids[position + 1: position + 1 + after])
    return f"{left}[{token}]{right}".replace("\n", " ")


def _activations(model: torch.nn.Module, sequences: list[list[int]]) -> dict[str, np.ndarray]:
    """{mlp module: [tokens, neurons]} over all sequences, in order."""
    recorder = ActivationRecorder(model, attention=False, hidden=False)
    try:
        recorder.run(model, sequences)
    finally:
        recorder.close()
    return {name: torch.cat(chunks).numpy() for name, chunks in recorder.mlp.items()}


def find_neurons_for(model: Any, tokenizer: Any, concept_examples: list[str], background: list[str] | None = None,
                     concept: str | None = None, top: int = 20, contexts: int = 5, max_tokens: int = 512,
                     max_background_tokens: int = 8000) -> dict[str, Any]:
    """Rank MLP neurons by how selectively they fire on the concept's tokens (see the module doc).
    `model` may be a path (any checkpoint `dynlm.load_pretrained` reads; its tokenizer is used
    when `tokenizer` is None). Without `background`, the examples' tokens outside the concept
    are the background (this needs `concept`)."""
    if isinstance(model, (str, Path)):
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model)
        model = load_pretrained(model)
    examples = [t for t in concept_examples if t.strip()]
    if not examples:
        raise DataError("no concept examples given")
    if background is None and concept is None:
        raise DataError("without background text, give the concept string to separate its tokens from the rest")
    prefix = [tokenizer.separator_id] if getattr(tokenizer, "prepend_separator", False) else []
    sequences, masks, origins = [], [], []
    for text in examples:
        ids = (prefix + tokenizer.encode(text))[:max_tokens]
        if len(ids) < 1:
            continue
        sequences.append(ids)
        masks.append(_concept_mask(tokenizer, text, ids, concept, len(prefix)))
        origins.append("concept")
    budget = max_background_tokens
    for text in background or []:  # long texts are cut into windows of max_tokens
        ids = tokenizer.encode(text)
        for start in range(0, len(ids), max_tokens - len(prefix)):
            window = (prefix + ids[start: start + max_tokens - len(prefix)])[:budget]
            if budget <= 0 or len(window) < 2:
                break
            sequences.append(window)
            masks.append(np.zeros(len(window), dtype=bool))
            origins.append("background")
            budget -= len(window)
    is_concept = np.concatenate(masks)
    from_examples = np.concatenate([np.full(len(s), o == "concept") for s, o in zip(sequences, origins)])
    is_background = ~is_concept & (~from_examples if background else from_examples)
    if len(prefix):  # the separator opens every sequence: it belongs to no text
        starts = np.cumsum([0] + [len(s) for s in sequences[:-1]])
        is_background[starts] = False
    if not is_concept.any():
        raise DataError(f"the concept '{concept}' does not occur in the examples" if concept else "no concept tokens")
    if is_background.sum() < 2:
        raise DataError("too little background text (need at least 2 tokens)")

    acts = _activations(model, sequences)
    rows = []
    for module, a in acts.items():
        c, b = a[is_concept], a[is_background]
        c_mean, b_mean, b_std = c.mean(0), b.mean(0), b.std(0)
        score = (c_mean - b_mean) / (b_std + 1e-6)
        p99 = np.percentile(b, 99, axis=0)
        above = (c > p99).mean(0)
        for neuron in np.argsort(-score)[:top]:
            rows.append({"module": module, "layer": _layer_of(module + "."), "neuron": int(neuron),
                         "score": float(f"{score[neuron]:.4g}"), "concept_mean": float(f"{c_mean[neuron]:.4g}"),
                         "background_mean": float(f"{b_mean[neuron]:.4g}"),
                         "background_std": float(f"{b_std[neuron]:.4g}"),
                         "above_background_p99": float(f"{above[neuron]:.4g}"), "_a": a})
    rows.sort(key=lambda r: -r["score"])
    rows = rows[:top]
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    for r in rows:
        a = r.pop("_a")[:, r["neuron"]]
        best = []
        for flat in np.argsort(-a)[: contexts]:
            seq = int(np.searchsorted(offsets, flat, side="right") - 1)
            pos = int(flat - offsets[seq])
            best.append({"activation": float(f"{a[flat]:.4g}"), "source": origins[seq],
                         "context": _context(tokenizer, sequences[seq], pos)})
        r["top_contexts"] = best
    return {"concept": concept, "examples": len(examples), "concept_tokens": int(is_concept.sum()),
            "background_tokens": int(is_background.sum()), "mlp_modules": len(acts),
            "neurons_per_module": {m: int(a.shape[1]) for m, a in acts.items()}, "method": METHOD, "neurons": rows}


def to_markdown(result: dict[str, Any]) -> str:
    title = f"'{result['concept']}'" if result["concept"] else "the examples"
    lines = [f"# Neurons selective for {title}", "",
             f"Measured on {result['concept_tokens']:,} concept tokens from {result['examples']} examples and "
             f"{result['background_tokens']:,} background tokens, over {result['mlp_modules']} MLP modules.", "",
             f"Method: {result['method']}", "",
             "| rank | module | neuron | score | concept mean | background mean | background std | above p99 |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(result["neurons"], 1):
        lines.append(f"| {i} | {r['module']} | {r['neuron']} | {r['score']} | {r['concept_mean']} | "
                     f"{r['background_mean']} | {r['background_std']} | {r['above_background_p99']} |")
    lines += ["", "## Top-activating contexts", ""]
    for i, r in enumerate(result["neurons"], 1):
        lines.append(f"**{i}. {r['module']} neuron {r['neuron']}** (score {r['score']})")
        lines += [f"- {c['activation']} ({c['source']}): `{c['context']}`" for c in r["top_contexts"]]
        lines.append("")
    return "\n".join(lines)


def write_result(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "neurons.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "neurons.md").write_text(to_markdown(result))
    return [out_dir / "neurons.json", out_dir / "neurons.md"]
