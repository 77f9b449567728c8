"""`dynlm kasgarli`: byte-level AGIFORMER vs a BPE transformer on the same verses in Turkish,
English and Arabic (the parallel Qur'an corpus), at equal parameters and equal training bytes.

    dynlm kasgarli --budget-bytes 20M
    dynlm kasgarli --budget-bytes 500K --byte-preset agiformer-tiny --languages tr,en --out kasgarli-small

Per language: a byte-level BPE tokenizer of `--vocab` ids is trained on that language's training
split (the same vocabulary size for every language); the standard model gets as many layers as
makes its parameter count closest to the byte model's. Both train through the one trainer for the
same number of steps with the same batch and the same bytes per sequence (the BPE model's
sequence is `seq-len / bytes-per-token` tokens long), so both see the same training bytes. Scored
on the held-out test verses by the one evaluator: bits per byte and per character; validation
every `--eval-every` steps gives the steps to reach `--threshold` bits per byte.

Writes kasgarli.json, kasgarli.md (table) and kasgarli.png (validation curves) into --out."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from dynlm.errors import ConfigError, OutputExistsError

LANGUAGES = ("tr", "en", "ar")


def parse_size(text: str) -> int:
    """'20M' -> 20_000_000, '500K' -> 500_000, '123' -> 123."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMmGg]?)\s*", text)
    if not match:
        raise ConfigError(f"bad size '{text}'", "e.g. 20M, 500K or 100000")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2).lower()]
    return int(float(match.group(1)) * scale)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kasgarli", help="byte-level AGIFORMER vs BPE transformer on parallel tr/en/ar text")
    p.add_argument("--budget-bytes", default="20M", help="training bytes per model (default 20M)")
    p.add_argument("--languages", default=",".join(LANGUAGES), help="parallel-quran languages (default tr,en,ar)")
    p.add_argument("--corpus-pattern", default="parallel-quran:{lang}",
                   help="corpus of each language, {lang} replaced (default parallel-quran:{lang}); any parallel "
                        "corpus whose documents match across languages")
    p.add_argument("--byte-preset", default="agiformer-quick", help="byte model preset (default agiformer-quick)")
    p.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size, every language (default 2048)")
    p.add_argument("--seq-len", type=int, default=256, help="bytes per training sequence (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=0, help="steps between validations (default: 10 per run)")
    p.add_argument("--threshold", type=float, default=3.0, help="bits per byte for 'steps to threshold' (3.0)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--out", type=Path, default=Path("kasgarli"), help="output folder (default kasgarli)")
    p.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    p.set_defaults(handler=run)


def matched_standard(byte_params: int, hidden: int, heads: int, vocab: int) -> tuple[dict[str, Any], int]:
    """The standard config (hidden and heads of the byte model, vocab of the BPE) whose layer
    count brings its parameters closest to `byte_params`."""
    import dynlm

    best: tuple[int, dict[str, Any], int] | None = None
    for layers in range(1, 49):
        config = {"preset": "standard-quick", "hidden_size": hidden, "num_heads": heads, "num_kv_heads": heads,
                  "intermediate_size": 4 * hidden, "num_layers": layers, "vocab_size": vocab}
        params = dynlm.build_model(dict(config)).num_parameters()
        if best is None or abs(params - byte_params) < best[0]:
            best = (abs(params - byte_params), config, params)
        if params > byte_params:
            break
    assert best is not None
    return best[1], best[2]


def steps_to(records: list[dict[str, Any]], threshold: float) -> int | None:
    for record in records:
        if record.get("event") == "eval" and record.get("val_bpb") is not None and record["val_bpb"] <= threshold:
            return int(record["step"])
    return None


def run(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.data.corpora import QURAN_LANGUAGES
    from dynlm.data.shards import prepare_corpus
    from dynlm.eval.evaluate import evaluate
    from dynlm.train.config import load_run_config
    from dynlm.train.data import load_run_tokenizer
    from dynlm.train.run import train
    from dynlm.train.trainer import read_metrics

    budget = parse_size(args.budget_bytes)
    languages = [x.strip() for x in args.languages.split(",") if x.strip()]
    if "{lang}" not in args.corpus_pattern:
        raise ConfigError(f"--corpus-pattern '{args.corpus_pattern}' must contain {{lang}}")
    for lang in languages:
        if args.corpus_pattern.startswith("parallel-quran:") and lang not in QURAN_LANGUAGES:
            raise ConfigError(f"unknown language '{lang}'", "valid: " + ", ".join(QURAN_LANGUAGES))
    byte_model = dynlm.build_model(args.byte_preset)
    if not getattr(byte_model.config_class, "byte_level", False):
        raise ConfigError(f"--byte-preset {args.byte_preset} is not a byte-level model", "e.g. agiformer-quick")
    patch = getattr(byte_model.config, "patch_size", 1)
    if args.seq_len % patch or args.seq_len < 2:
        raise ConfigError(f"--seq-len {args.seq_len} must be a multiple of the patch size {patch}")
    steps = budget // (args.batch_size * args.seq_len)
    if steps < 2:
        raise ConfigError(f"--budget-bytes {args.budget_bytes} gives {steps} steps of {args.batch_size} x "
                          f"{args.seq_len} bytes", "raise the budget")
    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        raise OutputExistsError(f"{args.out} is not empty", "pass --force to overwrite")
    eval_every = args.eval_every or max(1, steps // 10)
    runs = args.out / "runs"
    byte_params = byte_model.num_parameters()
    standard_config, standard_params = matched_standard(byte_params, byte_model.config.hidden_size,
                                                        byte_model.config.num_heads, args.vocab)
    common_train = {"max_steps": steps, "batch_size": args.batch_size, "lr": args.lr, "min_lr": args.lr / 10,
                    "warmup_steps": min(100, steps // 10), "eval_every": eval_every, "save_every": steps,
                    "eval_bytes": 32768, "keep_last": 1, "final_eval": [], "sample_prompt": None, "plot": False,
                    "seed": args.seed, "log_every": max(1, min(10, steps // 10))}
    report: dict[str, Any] = {"corpus_pattern": args.corpus_pattern, "budget_bytes": budget, "steps": steps,
                              "batch_size": args.batch_size,
                              "seq_len_bytes": args.seq_len, "vocab": args.vocab, "threshold_bpb": args.threshold,
                              "byte_preset": args.byte_preset, "byte_params": byte_params,
                              "standard_config": standard_config, "standard_params": standard_params,
                              "languages": {}}
    started = time.perf_counter()
    for lang in languages:
        corpus = args.corpus_pattern.replace("{lang}", lang)
        entry: dict[str, Any] = {}
        # the BPE first (trained on this language's train split, cached; the training run below
        # finds it): its bytes per token sets its sequence length, so both see the same bytes per step
        bpe_run = load_run_config({"model": dict(standard_config), "mode": "custom",
                                   "data": {"corpus": corpus, "tokenizer": f"bpe:{args.vocab}"}})
        tokenizer = load_run_tokenizer(bpe_run)
        bytes_per_token = prepare_corpus(corpus, tokenizer, show_progress=False)["train"].bytes_per_token
        bpe_seq = max(2, round(args.seq_len / bytes_per_token))
        for kind, model_section, data in (
                ("agiformer", {"preset": args.byte_preset},
                 {"corpus": corpus, "tokenizer": "bytes", "seq_len": args.seq_len}),
                ("standard-bpe", dict(standard_config),
                 {"corpus": corpus, "tokenizer": f"bpe:{args.vocab}", "seq_len": bpe_seq})):
            run_dir = train({"model": {**model_section, "max_position_embeddings": max(4096, args.seq_len)},
                             "mode": "custom", "data": data, "train": dict(common_train),
                             "out_dir": str(runs), "run_name": f"{lang}-{kind}"})
            model = dynlm.load_pretrained(run_dir / "last")
            tok = dynlm.load_tokenizer(run_dir / "last")
            result = evaluate(model, tok, corpus, split="test", seq_len=data["seq_len"])
            records = read_metrics(run_dir)
            entry[kind] = {
                "parameters": model.num_parameters(), "seq_len_tokens": data["seq_len"],
                "train_bytes": steps * args.batch_size * data["seq_len"] * (1 if kind == "agiformer"
                                                                             else bytes_per_token),
                "test_bpb": result["bpb"], "test_bpc": result.get("bpc"),
                "test_bytes_per_token": result["bytes_per_token"],
                "steps_to_threshold": steps_to(records, args.threshold),
                "val_curve": [(r["step"], r["val_bpb"]) for r in records if r.get("event") == "eval"],
            }
            print(f"{lang} {kind}: test {result['bpb']:.4f} bits/byte", file=sys.stderr, flush=True)
        entry["bpe_bytes_per_token"] = bytes_per_token
        report["languages"][lang] = entry
    report["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kasgarli.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "kasgarli.md").write_text(to_markdown(report))
    plot(report, args.out / "kasgarli.png")
    sys.stdout.write(to_markdown(report))
    return 0


def to_markdown(report: dict[str, Any]) -> str:
    lines = ["# Kaşgarlı test: byte-level AGIFORMER vs BPE transformer on parallel verses", "",
             f"Same verses in each language (parallel Qur'an corpus, test split held out). Per model: "
             f"{report['steps']} steps x {report['batch_size']} sequences of {report['seq_len_bytes']} bytes "
             f"({report['budget_bytes']:,} training bytes; the BPE model's sequence is that many bytes in tokens). "
             f"Parameters: {report['byte_preset']} {report['byte_params'] / 1e6:.3f}M vs standard "
             f"{report['standard_config']['num_layers']} x {report['standard_config']['hidden_size']} "
             f"{report['standard_params'] / 1e6:.3f}M; BPE vocabulary {report['vocab']} per language.", "",
             "| language | BPE bytes/token | AGIFORMER bits/byte | BPE bits/byte | AGIFORMER bits/char | "
             f"BPE bits/char | AGIFORMER steps to {report['threshold_bpb']} | BPE steps to {report['threshold_bpb']} |",
             "|---|---|---|---|---|---|---|---|"]
    for lang, e in report["languages"].items():
        a, b = e["agiformer"], e["standard-bpe"]

        def fmt(value: Any, digits: int = 4) -> str:
            return "never" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))

        lines.append(f"| {lang} | {e['bpe_bytes_per_token']:.3f} | {fmt(a['test_bpb'])} | {fmt(b['test_bpb'])} | "
                     f"{fmt(a['test_bpc'])} | {fmt(b['test_bpc'])} | {fmt(a['steps_to_threshold'])} | "
                     f"{fmt(b['steps_to_threshold'])} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = dict(zip(report["languages"], ["tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple"],
                      strict=False))
    for lang, e in report["languages"].items():
        for kind, style in (("agiformer", "-"), ("standard-bpe", "--")):
            curve = e[kind]["val_curve"]
            if curve:
                ax.plot([s for s, _ in curve], [v for _, v in curve], style, color=colors.get(lang),
                        label=f"{lang} {kind}")
    ax.axhline(report["threshold_bpb"], color="grey", lw=0.8)
    ax.set_xlabel("step (equal training bytes per step for both models)")
    ax.set_ylabel("validation bits per byte")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
