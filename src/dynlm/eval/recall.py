"""Needle in a haystack: can a model bring back a fact it read long ago? Any architecture.

    result = recall_grid(model, tokenizer, haystack_texts, lengths=[512, 2048], depths=[0.1, 0.5, 0.9])
    result["accuracy"][i][j]      # exact-match rate at lengths[i], depths[j]
    plot_recall(result, "recall.png")

Each sample is one prompt of exactly `length` tokens of the model's tokenizer:

    <separator> haystack ... \\nThe secret code is 4817.\\n ... haystack \\nThe secret code is

The needle ("The secret code is NNNN.", a random 4-digit number per sample) sits at `depth` of the
haystack (0 = the start, 1 = just before the question); the haystack is real text from a corpus,
from a different offset for every sample (distinct prompts in each batch). The model's greedy
continuation scores 1 when it starts with the number. The baseline asks the same question
without the needle: what guessing from the haystack alone gives (about 1/9000 for a random code).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dynlm.errors import ConfigError, DataError
from dynlm.infer.generate import generate_ids

NEEDLE = "\nThe secret code is {code}.\n"
QUESTION = "\nThe secret code is "


def _check_grid(lengths: Sequence[int], depths: Sequence[float], samples: int) -> None:
    if not lengths or not depths:
        raise ConfigError("give at least one length and one depth")
    if any(d < 0 or d > 1 for d in depths):
        raise ConfigError(f"depths must be fractions in [0, 1], got {list(depths)}")
    if samples < 1:
        raise ConfigError(f"samples must be >= 1, got {samples}")


def build_prompt(haystack: Sequence[int], start: int, length: int, depth: float, needle: list[int],
                 question: list[int], separator: int) -> list[int]:
    """Exactly `length` ids: separator, haystack from `start` with `needle` at `depth`, question."""
    room = length - 1 - len(needle) - len(question)
    if room < 1:
        raise ConfigError(f"length {length} leaves no room for a haystack (needle and question take "
                          f"{len(needle) + len(question) + 1} tokens)")
    hay = list(haystack[start:start + room])
    at = round(depth * room)
    return [separator, *hay[:at], *needle, *hay[at:], *question]


@torch.no_grad()
def recall_grid(model: torch.nn.Module, tokenizer: Any, haystack_texts: Sequence[str], lengths: Sequence[int],
                depths: Sequence[float], samples: int = 8, seed: int = 0, baseline: bool = True,
                progress: bool = False) -> dict[str, Any]:
    """Exact-match recall over a length x depth grid (see the module docstring). Lengths are in
    the model's tokens; a length beyond the model's positions is skipped (recorded as None)."""
    _check_grid(lengths, depths, samples)
    haystack = [t for text in haystack_texts for t in tokenizer.encode(text)]
    question = tokenizer.encode(QUESTION)
    longest = max(lengths)
    if len(haystack) < longest:
        raise DataError(f"the haystack text has {len(haystack)} tokens, fewer than the longest length {longest}",
                        "use a larger corpus split or shorter lengths")
    limit = int(getattr(model.config, "max_position_embeddings", longest))
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    accuracy: list[list[float | None]] = []
    base: list[list[float | None]] = []
    examples: list[dict[str, Any]] = []
    cells = [(i, j) for i in range(len(lengths)) for j in range(len(depths))]
    iterator: Any = cells
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(cells, desc="recall", unit="cell")
    grid = {cell: None for cell in cells}
    base_grid = {cell: None for cell in cells}
    try:
        for i, j in iterator:
            length, depth = int(lengths[i]), float(depths[j])
            if length + 8 > limit:
                continue  # longer than the model's positions: not measured
            codes = [str(rng.randint(1000, 9999)) for _ in range(samples)]
            starts = [rng.randint(0, len(haystack) - length) for _ in range(samples)]
            prompts = [build_prompt(haystack, s, length, depth, tokenizer.encode(NEEDLE.format(code=c)), question,
                                    tokenizer.separator_id) for s, c in zip(starts, codes, strict=True)]
            grid[(i, j)] = _score(model, tokenizer, prompts, codes, device, examples, length, depth)
            if baseline:  # the same haystacks and question, no needle
                plain = [build_prompt(haystack, s, length, depth, [], question, tokenizer.separator_id)
                         for s in starts]
                base_grid[(i, j)] = _score(model, tokenizer, plain, codes, device, None, length, depth)
    finally:
        model.train(was_training)
    for i in range(len(lengths)):
        accuracy.append([grid[(i, j)] for j in range(len(depths))])
        base.append([base_grid[(i, j)] for j in range(len(depths))])
    return {"lengths": [int(x) for x in lengths], "depths": [float(d) for d in depths], "samples": samples,
            "seed": seed, "accuracy": accuracy, "baseline_no_needle": base if baseline else None,
            "chance": 1 / 9000, "needle": NEEDLE.strip(), "question": QUESTION.strip(), "examples": examples[:12]}


def _score(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], codes: list[str], device: torch.device,
           examples: list[dict[str, Any]] | None, length: int, depth: float) -> float:
    ids = torch.tensor(prompts, dtype=torch.long, device=device)
    digits = max(len(tokenizer.encode(c + ".")) for c in codes)
    out = generate_ids(model, ids, max_new_tokens=digits + 1, eos_ids=[])  # greedy
    hits = 0
    for row, code in enumerate(codes):
        continuation = tokenizer.decode(out[row, ids.shape[1]:].tolist())
        hit = continuation.strip().startswith(code)
        hits += hit
        if examples is not None and row == 0:
            examples.append({"length": length, "depth": depth, "code": code, "continuation": continuation,
                             "hit": hit})
    return hits / len(codes)


def plot_recall(result: dict[str, Any], path: str | Path, title: str = "needle recall (exact match)") -> Path:
    """Heat map of result["accuracy"]: lengths down, depths across; unmeasured cells grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.array([[np.nan if v is None else v for v in row] for row in result["accuracy"]], dtype=float)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(result["depths"]), 1.0 + 0.6 * len(result["lengths"])))
    cmap = matplotlib.colormaps["viridis"].copy()
    cmap.set_bad("lightgrey")
    image = ax.imshow(data, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_xlabel("needle depth (0 = start of the context)")
    ax.set_ylabel("context length (tokens)")
    for (r, c), value in np.ndenumerate(data):
        ax.text(c, r, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center",
                color="white" if not np.isnan(value) and value < 0.5 else "black")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
