"""Router accuracy on the held-out labelled prompts (benchmarks/data/router/heldout.jsonl: 120
prompts, 24 per domain over general, code, medicine, law, poetry), with the registry
benchmarks/data/router/experts.yaml, next to the majority baseline.

    python benchmarks/router_accuracy.py [--out benchmarks/results]

Routers: rules (keywords + regex), learned (MiniLM similarity to each expert's 8 examples, with
the registry's confidence threshold and fallback to `general`), hybrid (rules, else learned), and
the learned router with a hashed bag-of-words encoder instead of MiniLM (lexical baseline).
Writes router_accuracy.json and router_accuracy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from dynlm.memory.embeddings import HashingEncoder, MiniLMEncoder  # noqa: E402
from dynlm.serve.experts import EmbeddingRouter, Registry, Router, RuleRouter  # noqa: E402
from serve_common import environment, write_results  # noqa: E402

DATA = Path(__file__).parent / "data" / "router"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    registry = Registry.load(DATA / "experts.yaml")
    rows = [json.loads(line) for line in (DATA / "heldout.jsonl").read_text().splitlines() if line.strip()]
    labels = [r["domain"] for r in rows]
    domains = sorted(set(labels))
    majority_label, majority_count = Counter(labels).most_common(1)[0]
    minilm = MiniLMEncoder.load()
    routers = {
        "rules": RuleRouter(registry),
        "learned (MiniLM)": EmbeddingRouter(registry, minilm),
        "hybrid (rules, else MiniLM)": Router(registry, minilm, method="hybrid"),
        "learned (hashed bag of words)": EmbeddingRouter(registry, HashingEncoder()),
    }
    report = {**environment(), "prompts": len(rows), "domains": dict(Counter(labels)),
              "default": registry.default_name,
              "majority_baseline": {"label": majority_label, "accuracy": majority_count / len(rows)}, "routers": {}}
    for name, router in routers.items():
        t0 = time.perf_counter()
        decisions = [router.route(r["prompt"]) for r in rows]
        ms = (time.perf_counter() - t0) * 1000 / len(rows)
        correct = [d.expert == y for d, y in zip(decisions, labels)]
        per_domain = {d: sum(c for c, y in zip(correct, labels) if y == d) / labels.count(d) for d in domains}
        report["routers"][name] = {
            "accuracy": sum(correct) / len(rows), "per_domain": per_domain,
            "threshold": getattr(getattr(router, "learned", router), "threshold", None),
            "fallbacks": sum(d.method == "fallback" for d in decisions), "ms_per_route": ms,
            "errors": [{"prompt": r["prompt"], "label": y, "routed": d.expert, "reason": d.reason}
                       for r, y, d, c in zip(rows, labels, decisions, correct) if not c],
        }
    lines = ["# Router accuracy on the held-out prompts", "",
             "Produced by `benchmarks/router_accuracy.py`; device and commit in the JSON. "
             f"{len(rows)} prompts, {len(domains)} domains ({', '.join(f'{d} {labels.count(d)}' for d in domains)}). "
             f"Below its confidence threshold the learned router falls back to `{registry.default_name}`; the "
             "threshold is calibrated leave-one-out on the experts' examples (never on these prompts).", "",
             "| router | accuracy | " + " | ".join(domains) + " | threshold | fallbacks | ms/route |",
             "|---|---|" + "---|" * len(domains) + "---|---|---|",
             f"| majority baseline (always `{majority_label}`) | {majority_count / len(rows):.3f} | " +
             " | ".join("1.000" if d == majority_label else "0.000" for d in domains) + " | - | - | - |"]
    for name, r in report["routers"].items():
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:.3f}"
        lines.append(f"| {name} | {r['accuracy']:.3f} | " + " | ".join(f"{r['per_domain'][d]:.3f}" for d in domains)
                     + f" | {threshold} | {r['fallbacks']} | {r['ms_per_route']:.2f} |")
    lines += ["", f"Device: {report['device']}. Commit {report['commit']}. Times are per prompt, one at a time."]
    write_results(args.out, "router_accuracy", report, lines)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
