"""`dynlm tokenizer train | encode | decode | info`: byte-level BPE training and quick checks."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from dynlm.commands.corpus import parse_splits
from dynlm.errors import DataError
from dynlm.output_dir import check_output_dir, output_dir


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer; encode and decode text")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    p.set_defaults(handler=lambda args: p.print_help() or 2)

    train = actions.add_parser("train", help="train byte-level BPE on a corpus' train split",
                               description="Trains on the train split only (val and test stay unseen), "
                                           "writes OUT/tokenizer.json and OUT/tokenizer_config.json, and "
                                           "reports bytes per token on the val split.")
    train.add_argument("--corpus", default="shakespeare", help="corpus name, file, folder, glob or URL#sha256=")
    train.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size, special tokens included")
    train.add_argument("-o", "--output", required=True, type=Path, help="output directory")
    train.add_argument("--splits", default="0.9,0.05,0.05", type=parse_splits, help="train,val,test fractions")
    train.add_argument("--min-frequency", type=int, default=2, help="least count for a merge (default 2)")
    train.add_argument("--force", action="store_true", help="replace the contents of a non-empty output folder")
    train.set_defaults(handler=run_train)

    encode = actions.add_parser("encode", help="print the token ids of a text")
    encode.add_argument("--tokenizer", default="bytes", help='"bytes", a tokenizer directory or tokenizer.json')
    encode.add_argument("text", help='the text ("-" reads standard input)')
    encode.add_argument("--pieces", action="store_true", help="print each token's text instead of ids")
    encode.set_defaults(handler=run_encode)

    decode = actions.add_parser("decode", help="print the text of token ids")
    decode.add_argument("--tokenizer", default="bytes", help='"bytes", a tokenizer directory or tokenizer.json')
    decode.add_argument("ids", nargs="+", type=int, help="token ids")
    decode.add_argument("--keep-special", action="store_true", help="keep special tokens in the text")
    decode.set_defaults(handler=run_decode)

    info = actions.add_parser("info", help="vocabulary size, special tokens, fingerprint")
    info.add_argument("tokenizer", help='"bytes", a tokenizer directory, tokenizer.json or .gguf file')
    info.set_defaults(handler=run_info)


def run_train(args: argparse.Namespace) -> int:
    from dynlm.data.corpora import get_corpus, split_corpus
    from dynlm.data.tokenizers import TOKENIZER_FILE, check_bpe_vocab_size, train_bpe

    check_bpe_vocab_size(args.vocab_size)  # before fetching anything
    if args.min_frequency < 1:
        raise DataError(f"--min-frequency {args.min_frequency}: must be at least 1")
    output: Path = check_output_dir(args.output, args.force)  # before the slow part
    started = time.perf_counter()
    corpus = get_corpus(args.corpus)
    parts = split_corpus(corpus, args.splits)
    train_texts = [text for _, text in parts["train"]]
    train_bytes = sum(len(t.encode("utf-8")) for t in train_texts)
    print(f"training byte-level BPE (vocab {args.vocab_size}) on {corpus.name} train: "
          f"{len(train_texts)} documents, {train_bytes:,} bytes", file=sys.stderr)
    tokenizer = train_bpe(train_texts, args.vocab_size, min_frequency=args.min_frequency)

    if tokenizer.vocab_size < args.vocab_size:
        print(f"note: the corpus gave only {tokenizer.vocab_size} tokens of the {args.vocab_size} asked for "
              f"(no pair of tokens occurs --min-frequency {args.min_frequency} times any more); a larger corpus "
              "gives more merges", file=sys.stderr)
    with output_dir(output, args.force) as staged:  # `output` never holds half a tokenizer
        tokenizer.save(staged)

    val_texts = [text for _, text in parts["val"]] or train_texts
    val_tokens = sum(len(ids) for ids in tokenizer.encode_batch(val_texts))
    val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
    print(f"wrote {output / TOKENIZER_FILE}")
    print(f"vocab size:  {tokenizer.vocab_size}")
    print(f"val:         {val_bytes / max(val_tokens, 1):.3f} bytes/token ({val_tokens:,} tokens for "
          f"{val_bytes:,} bytes{'' if parts['val'] else ', train split: the corpus has no val split'})")
    print(f"fingerprint: {tokenizer.fingerprint()[:16]}")
    print(f"took {time.perf_counter() - started:.1f} s")
    return 0


def _text_argument(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def run_encode(args: argparse.Namespace) -> int:
    from dynlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    text = _text_argument(args.text)
    ids = tokenizer.encode(text)
    if args.pieces:
        print(" ".join(repr(tokenizer.decode([i], skip_special_tokens=False)) for i in ids))
    else:
        print(" ".join(map(str, ids)))
    num_bytes = tokenizer.count_bytes(text)
    print(f"{len(ids)} tokens, {num_bytes} bytes ({num_bytes / max(len(ids), 1):.2f} bytes/token)", file=sys.stderr)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from dynlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    bad = [i for i in args.ids if not 0 <= i < tokenizer.vocab_size]
    if bad:
        raise DataError(f"token id {bad[0]} is outside the vocabulary (0 .. {tokenizer.vocab_size - 1})")
    print(tokenizer.decode(args.ids, skip_special_tokens=not args.keep_special))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from dynlm.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    print(f"kind:         {type(tokenizer).__name__}")
    print(f"vocab size:   {tokenizer.vocab_size}")
    for role, token in tokenizer.special_tokens_map().items():
        print(f"{role + ':':<13} {token!r} (id {tokenizer.token_to_id(token)})")
    separator = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    print(f"separator:    {'none (no BOS or EOS token)' if separator is None else f'id {separator}'}")
    print(f"eos ids:      {tokenizer.eos_ids}")
    print(f"chat:         {'yes' if tokenizer.chat_template else 'no template'}")
    print(f"fingerprint:  {tokenizer.fingerprint()}")
    return 0
