"""The experts registry (one YAML file) and the router that picks an expert for each request.

    default: general
    router: {method: hybrid, threshold: 0.35}
    experts:
      general: {path: smollm2/, domain: general, description: general chat}
      code:    {path: runs/code/best, domain: code, keywords: [python, traceback], patterns: ['\\bdef \\w+\\('],
                examples: ["Why does my list comprehension raise IndexError?"]}

Paths are relative to the registry file. Routers:

- `rules`: keywords (whole words, case-insensitive) and regular expressions per expert; the expert
  with the most matches wins and the decision names the rules that fired.
- `learned`: MiniLM embedding similarity of the request to each expert's example prompts (the mean
  of its 3 closest examples); below the confidence threshold the default expert answers.
- `hybrid` (default): rules when one fires, else the learned router.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from dynlm.errors import ConfigError, did_you_mean
from dynlm.fileio import atomic_write_text
from dynlm.memory.embeddings import Encoder, MiniLMEncoder

ROUTER_METHODS = ("rules", "learned", "hybrid")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class ExpertSpec:
    """One registry entry: where the checkpoint is and what the router knows about it."""

    name: str
    path: str
    domain: str = ""
    description: str = ""
    keywords: list[str] = field(default_factory=list)
    patterns: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)


@dataclass
class Registry:
    experts: dict[str, ExpertSpec]
    default: str | None = None
    method: str = "hybrid"
    threshold: float | None = None  # None: calibrated on the examples (leave-one-out)
    file: Path | None = None

    @classmethod
    def load(cls, file: str | Path, missing_ok: bool = False) -> Registry:
        file = Path(file)
        if not file.is_file():
            if missing_ok:
                return cls({}, file=file)
            raise ConfigError(f"{file}: no such experts registry", "create one with 'dynlm experts add'")
        try:
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{file}: not a valid YAML registry ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict) or not isinstance(data.get("experts", {}), dict):
            raise ConfigError(f"{file}: expected a mapping with an 'experts' mapping")
        experts = {}
        for name, entry in (data.get("experts") or {}).items():
            if not isinstance(entry, dict) or "path" not in entry:
                raise ConfigError(f"{file}: expert '{name}' needs at least a 'path'")
            unknown = set(entry) - {f for f in ExpertSpec.__dataclass_fields__ if f != "name"}
            if unknown:
                raise ConfigError(f"{file}: expert '{name}' has an unknown field '{sorted(unknown)[0]}'",
                                  did_you_mean(sorted(unknown)[0], ExpertSpec.__dataclass_fields__))
            experts[str(name)] = ExpertSpec(name=str(name), **{k: v for k, v in entry.items()})
        router = data.get("router") or {}
        threshold = router.get("threshold", "auto")
        if threshold != "auto" and not isinstance(threshold, (int, float)):
            raise ConfigError(f"{file}: router.threshold must be a number or 'auto', got {threshold!r}")
        registry = cls(experts, data.get("default"), router.get("method", "hybrid"),
                       None if threshold == "auto" else float(threshold), file)
        registry.validate()
        return registry

    def validate(self) -> None:
        if self.method not in ROUTER_METHODS:
            raise ConfigError(f"router method '{self.method}' is unknown", did_you_mean(self.method, ROUTER_METHODS))
        if self.default is not None and self.default not in self.experts:
            raise ConfigError(f"the default expert '{self.default}' is not in the registry",
                              did_you_mean(self.default, self.experts))
        for spec in self.experts.values():
            if not NAME_PATTERN.match(spec.name):
                raise ConfigError(f"expert name '{spec.name}' must be letters, digits, '_', '.', '-'")
            for pattern in spec.patterns:
                try:
                    re.compile(pattern)
                except re.error as e:
                    raise ConfigError(f"expert '{spec.name}': bad regular expression {pattern!r} ({e})") from None

    @property
    def default_name(self) -> str:
        """The fallback expert: the declared default, else the first one."""
        if self.default:
            return self.default
        if not self.experts:
            raise ConfigError("the experts registry is empty", "add one with 'dynlm experts add'")
        return next(iter(self.experts))

    def resolve(self, spec: ExpertSpec) -> Path:
        path = Path(spec.path).expanduser()
        return path if path.is_absolute() or self.file is None else self.file.parent / path

    def save(self, file: str | Path | None = None) -> Path:
        """Write atomically (temporary file + rename): a crash never leaves half a registry."""
        file = Path(file or self.file)
        threshold = "auto" if self.threshold is None else self.threshold
        data: dict[str, Any] = {"default": self.default, "router": {"method": self.method, "threshold": threshold},
                                "experts": {}}
        for spec in self.experts.values():
            entry = {k: v for k, v in asdict(spec).items() if k != "name" and v not in ("", [])}
            data["experts"][spec.name] = entry
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
        return file


@dataclass
class RouteDecision:
    expert: str
    method: str  # "rule", "learned" or "fallback"
    confidence: float
    reason: str  # says which rule fired, or the similarity


class RuleRouter:
    """Keyword and regex rules: the expert with the most matching rules wins (ties: registry order)."""

    def __init__(self, registry: Registry):
        self.default = registry.default_name
        self.rules: list[tuple[str, str, re.Pattern[str]]] = []  # (expert, rule text, compiled)
        for spec in registry.experts.values():
            for word in spec.keywords:
                self.rules.append((spec.name, f"keyword '{word}'",
                                   re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)))
            for pattern in spec.patterns:
                self.rules.append((spec.name, f"regex /{pattern}/", re.compile(pattern, re.IGNORECASE)))

    def route(self, text: str) -> RouteDecision:
        fired: dict[str, list[str]] = {}
        for expert, rule, regex in self.rules:
            if regex.search(text):
                fired.setdefault(expert, []).append(rule)
        if not fired:
            return RouteDecision(self.default, "fallback", 0.0, "no rule fired")
        best = max(fired, key=lambda e: len(fired[e]))  # dicts keep insertion order: ties go to the first
        total = sum(len(r) for r in fired.values())
        return RouteDecision(best, "rule", len(fired[best]) / total, ", ".join(fired[best]))


class EmbeddingRouter:
    """Cosine similarity of the request to each expert's example prompts (mean of the top 3).
    Without an explicit threshold, the threshold is calibrated on the examples themselves: each
    example is routed against all the others (leave-one-out) and the threshold that routes most of
    them right is kept, so no held-out prompt is ever used to tune it."""

    def __init__(self, registry: Registry, encoder: Encoder, threshold: float | None = None, top: int = 3):
        self.default = registry.default_name
        self.top = top
        self.names = [s.name for s in registry.experts.values() if s.examples]
        if not self.names:
            raise ConfigError("no expert has example prompts, so the learned router has nothing to compare with",
                              "add examples with 'dynlm experts add ... --examples FILE'")
        self.encoder = encoder
        self.examples = [encoder.encode(registry.experts[n].examples) for n in self.names]  # each [n_i, D]
        threshold = registry.threshold if threshold is None else threshold
        self.threshold = self.calibrate() if threshold is None else threshold

    def _scores(self, query: np.ndarray, skip: tuple[int, int] | None = None) -> dict[str, float]:
        out = {}
        for e, (name, vectors) in enumerate(zip(self.names, self.examples)):
            sims = vectors @ query
            if skip is not None and skip[0] == e:
                sims = np.delete(sims, skip[1])
            if sims.size:
                out[name] = float(np.sort(sims)[::-1][: self.top].mean())
        return out

    def scores(self, text: str) -> dict[str, float]:
        return self._scores(self.encoder.encode([text])[0])

    def calibrate(self) -> float:
        """The leave-one-out threshold over the examples (the lowest among equally good ones)."""
        outcomes = []  # (best score, routed right?, the default expert is right?)
        for e, vectors in enumerate(self.examples):
            for i in range(len(vectors)):
                scores = self._scores(vectors[i], skip=(e, i))
                best = max(scores, key=scores.__getitem__)
                outcomes.append((scores[best], best == self.names[e], self.names[e] == self.default))
        best_threshold, best_right = 0.0, -1
        for candidate in sorted({0.0, *(score + 1e-6 for score, _, _ in outcomes)}):
            right = sum(ok if score >= candidate else is_default for score, ok, is_default in outcomes)
            if right > best_right:
                best_threshold, best_right = candidate, right
        return best_threshold

    def route(self, text: str) -> RouteDecision:
        scores = self.scores(text)
        best = max(scores, key=scores.__getitem__)
        if scores[best] < self.threshold:
            return RouteDecision(self.default, "fallback", scores[best],
                                 f"best similarity {scores[best]:.2f} ({best}) below threshold {self.threshold:.2f}")
        return RouteDecision(best, "learned", scores[best], f"similarity {scores[best]:.2f} to {best}'s examples")


class Router:
    """The registry's routing method: rules, learned, or hybrid (rules first, then learned)."""

    def __init__(self, registry: Registry, encoder: Encoder | None = None, method: str | None = None):
        self.method = method or registry.method
        if self.method not in ROUTER_METHODS:
            raise ConfigError(f"router method '{self.method}' is unknown", did_you_mean(self.method, ROUTER_METHODS))
        self.rules = RuleRouter(registry)
        needs_learned = self.method != "rules" and any(s.examples for s in registry.experts.values())
        if self.method == "learned" and not needs_learned:
            raise ConfigError("the learned router needs example prompts for at least one expert")
        if needs_learned and encoder is None:
            encoder = MiniLMEncoder.load()
        self.learned = EmbeddingRouter(registry, encoder) if needs_learned else None

    def route(self, text: str) -> RouteDecision:
        if self.method in ("rules", "hybrid"):
            decision = self.rules.route(text)
            if decision.method == "rule" or self.learned is None:
                return decision
        assert self.learned is not None
        return self.learned.route(text)
