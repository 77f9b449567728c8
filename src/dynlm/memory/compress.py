"""Extractive compression and long-term fact extraction: the text operations of the memory.

- `extractive_summary(text, ratio)`: the sentences most central to the text (TF-IDF cosine
  centrality, as in LexRank's degree centrality), kept in their original order, until the
  kept words reach `ratio` of the original (at least one sentence).
- `extract_facts(text)`: facts worth keeping for the whole conversation, each with a key that
  later facts about the same thing replace (mem0's ADD / UPDATE / NOOP): an explicit "remember
  that ...", the user's name, "my X is Y" statements, preferences, and sentences with numbers.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


_ROLE = re.compile(r"^(?:user|assistant|system):\s*", re.IGNORECASE)


def extractive_summary(text: str, ratio: float = 0.35) -> str:
    sentences = split_sentences(text)
    if len(sentences) <= 1:
        return text.strip()
    # a sentence said twice carries its information once (and would otherwise look most central)
    unique: dict[tuple[str, ...], str] = {}
    for sentence in sentences:
        key = tuple(words(_ROLE.sub("", sentence)))
        if key and key not in unique:
            unique[key] = sentence
    if not unique:
        return sentences[0]
    keys, kept_sentences = list(unique), list(unique.values())
    bags = [Counter(k) for k in keys]
    vocab = {w: i for i, w in enumerate(sorted({w for bag in bags for w in bag}))}
    df = Counter(w for bag in bags for w in bag)
    tfidf = np.zeros((len(bags), len(vocab)), dtype=np.float32)
    for row, bag in enumerate(bags):
        for w, count in bag.items():
            tfidf[row, vocab[w]] = (1 + math.log(count)) * math.log((1 + len(bags)) / (1 + df[w]) + 1)
    tfidf /= np.maximum(np.linalg.norm(tfidf, axis=1, keepdims=True), 1e-9)
    similarity = tfidf @ tfidf.T  # [S, S]
    centrality = similarity.sum(1) / max(float(similarity.sum(1).max()), 1e-9)  # [S] in (0, 1]
    # maximal marginal relevance: central, but not what is already kept
    target = ratio * len(words(text))
    chosen: list[int] = []
    total = 0
    while len(chosen) < len(bags) and (not chosen or total < target):
        redundancy = similarity[:, chosen].max(1) if chosen else np.zeros(len(bags), dtype=np.float32)
        score = centrality - redundancy
        score[chosen] = -np.inf
        row = int(np.argmax(score))
        chosen.append(row)
        total += sum(bags[row].values())
    return " ".join(kept_sentences[i] for i in sorted(chosen))


@dataclass
class Fact:
    key: str  # facts with the same key replace each other
    text: str
    importance: float  # 0..1


_REMEMBER = re.compile(r"\b(?:please\s+)?remember(?:\s+that)?[:,]?\s+(.+)", re.IGNORECASE)
_NAME = re.compile(r"\b(?:my name is|i am called|call me)\s+([A-Z][\w'-]*(?:\s+[A-Z][\w'-]*)?)", re.IGNORECASE)
_MY_X_IS = re.compile(r"\bmy\s+((?:[\w']+\s+){0,3}?[\w']+)\s+(?:is|are|was)\s+(.+)", re.IGNORECASE)
_PREFERENCE = re.compile(r"\bi\s+(?:really\s+)?(like|love|prefer|hate|dislike|enjoy|can't stand)\s+(.+)",
                         re.IGNORECASE)


def _normal(text: str) -> str:
    return " ".join(words(text))


def extract_facts(text: str) -> list[Fact]:
    """Facts in one user message (one per sentence at most, the most specific kind wins)."""
    facts: list[Fact] = []
    for sentence in split_sentences(text):
        clean = sentence.rstrip(".!?").strip()
        if match := _REMEMBER.search(clean):
            body = match.group(1).strip()
            inner = _MY_X_IS.search(body)
            key = f"my {_normal(inner.group(1))}" if inner else f"remember {_normal(body)}"
            facts.append(Fact(key, body, 1.0))
        elif match := _NAME.search(clean):
            facts.append(Fact("name", f"The user's name is {match.group(1)}", 0.9))
        elif match := _MY_X_IS.search(clean):
            facts.append(Fact(f"my {_normal(match.group(1))}", clean, 0.8))
        elif match := _PREFERENCE.search(clean):
            facts.append(Fact(f"preference {_normal(match.group(2))}", clean, 0.7))
        elif re.search(r"\d", clean) and len(words(clean)) >= 3:
            facts.append(Fact(f"number {_normal(clean)}", clean, 0.5))
    return facts
