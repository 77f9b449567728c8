"""`dynlm weights`: checkpoints as readable, diffable, patchable code.

    dynlm weights export runs/x/best code/ --mode inline      # or hybrid (manifest .py + safetensors)
    dynlm weights import code/ model/                          # back to a normal checkpoint, bit-exact
    dynlm weights show code/ [--cell NAME]
    dynlm weights annotate code/ NAME "note"
    dynlm weights rehash code/                                 # after editing a Literal by hand
    dynlm weights diff base/ tuned/ -o delta/ [--kind auto|dense|sparse|lowrank]
    dynlm weights apply base/ delta/ -o tuned2/
    dynlm weights load-only code/ --cells "model.embed_tokens.*,model.layers.0.*"
    dynlm weights analyze code/ --text sample.txt --out report/
    dynlm weights find-neurons code/ --examples cats.txt --background shakespeare --concept cat
    dynlm weights numpy-run code/ --prompt "..."               # NumPy only: torch is never imported
    dynlm weights clone code/ copy/ | lineage copy/ | share shared/x.py a/ b/ --cells ... | specialize ...

Module-level imports stay free of torch so that `numpy-run` runs without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from dynlm.errors import ConfigError, DataError
from dynlm.output_dir import check_output_dir, output_dir
from dynlm.weights.run_flags import add_numpy_run_arguments


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("weights", help="checkpoints as code: export, import, show, diff, apply, analyze, ...",
                       description=__doc__.split("\n\n")[0])
    cmds = p.add_subparsers(dest="weights_command", metavar="ACTION", parser_class=type(p))
    p.set_defaults(handler=lambda args: (p.print_help(), 2)[1])

    c = cmds.add_parser("export", help="write a checkpoint (or model) as code")
    c.add_argument("source", help="dynlm, code-form or Hugging Face checkpoint directory, or a .gguf file")
    c.add_argument("out", type=Path)
    c.add_argument("--mode", choices=["inline", "hybrid"], default="inline",
                   help="inline: self-contained .py files; hybrid: manifest .py + blobs.safetensors")
    c.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="store floating tensors in this dtype")
    c.add_argument("--literal-max", type=int, default=4096,
                   help="1-D tensors with at most this many values are written as decimal literals")
    c.add_argument("--event", help='history event as JSON, e.g. \'{"event": "trained", "steps": 2000}\'')
    _add_force(c)
    c.set_defaults(handler=_export)

    c = cmds.add_parser("import", help="write a code checkpoint back as a dynlm checkpoint (bit-exact)")
    c.add_argument("code")
    c.add_argument("out", type=Path)
    _add_force(c)
    c.set_defaults(handler=_import)

    c = cmds.add_parser("show", help="the cells of a code checkpoint, or one cell in full")
    c.add_argument("code")
    c.add_argument("--cell", help="cell name (prints its metadata, history and first values)")
    c.add_argument("--values", type=int, default=8, help="values to print with --cell")
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_show)

    c = cmds.add_parser("annotate", help="set a cell's note (recorded in its history)")
    c.add_argument("code")
    c.add_argument("cell")
    c.add_argument("note")
    c.set_defaults(handler=_annotate)

    c = cmds.add_parser("rehash", help="update the sha256 and statistics of cells edited by hand")
    c.add_argument("code")
    c.set_defaults(handler=_rehash)

    c = cmds.add_parser("diff", help="a delta from BASE to NEW (dense / sparse / low-rank per cell)")
    c.add_argument("base")
    c.add_argument("new")
    c.add_argument("-o", "--out", type=Path, required=True)
    c.add_argument("--kind", choices=["auto", "dense", "sparse", "lowrank"], default="auto",
                   help="auto: the smallest exact form per cell (and low rank with --max-rel-error)")
    c.add_argument("--rank", type=int, help="rank of low-rank cells")
    c.add_argument("--max-rel-error", type=float, help="allowed relative Frobenius error of low-rank cells")
    c.add_argument("--mode", choices=["inline", "hybrid"], default="inline")
    c.add_argument("--json", action="store_true")
    _add_force(c)
    c.set_defaults(handler=_diff)

    c = cmds.add_parser("apply", help="apply a delta to its base")
    c.add_argument("base")
    c.add_argument("delta")
    c.add_argument("-o", "--out", type=Path, required=True)
    c.add_argument("--mode", choices=["inline", "hybrid"], help="write the result in code form in this mode")
    c.add_argument("--exact-only", action="store_true", help="refuse deltas with low-rank (approximate) cells")
    _add_force(c)
    c.set_defaults(handler=_apply)

    c = cmds.add_parser("load-only", help="decode only some cells (and time it)")
    c.add_argument("code")
    c.add_argument("--cells", required=True,
                   help='comma-separated globs, names or aliases: "model.layers.0.*", "embedding", "layer_0"')
    c.add_argument("--json", action="store_true")
    c.set_defaults(handler=_load_only)

    c = cmds.add_parser("analyze", help="measured weight (and activation) statistics: JSON, Markdown, plots")
    c.add_argument("code", help="any checkpoint dynlm loads")
    c.add_argument("--text", type=Path, help="sample text file: adds activation sparsity and attention entropy")
    c.add_argument("--corpus", help="or sample the text from a corpus split (name, file, folder or glob)")
    c.add_argument("--split", default="val", choices=["train", "val", "test"], help="with --corpus (default: val)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--rank-cap", type=int, default=1024, help="effective rank of matrices with min side <= this")
    c.add_argument("--max-tokens", type=int, default=4096)
    c.add_argument("--seq-len", type=int, default=256)
    c.add_argument("--no-plots", action="store_true")
    _add_force(c)
    c.set_defaults(handler=_analyze)

    c = cmds.add_parser("find-neurons", help="MLP neurons that fire selectively on a concept's examples")
    c.add_argument("code", help="any checkpoint dynlm loads")
    c.add_argument("--examples", type=Path, help="text file, one example per line")
    c.add_argument("--example", action="append", default=[], help="an example text (repeatable)")
    c.add_argument("--background", help="text file or corpus name (e.g. shakespeare)")
    c.add_argument("--concept", help="the concept string; its occurrences in the examples are the concept tokens")
    c.add_argument("--top", type=int, default=20)
    c.add_argument("--contexts", type=int, default=5)
    c.add_argument("--background-tokens", type=int, default=8000)
    c.add_argument("--out", type=Path, help="write neurons.json and neurons.md here")
    _add_force(c)
    c.set_defaults(handler=_find_neurons)

    c = cmds.add_parser("numpy-run", help="generate with NumPy only (torch is never imported)")
    add_numpy_run_arguments(c)  # the same flags as `python -m dynlm.weights.numpy_runtime`
    c.set_defaults(handler=_numpy_run)

    c = cmds.add_parser("clone", help="copy a model in code form, recording its parent")
    c.add_argument("source")
    c.add_argument("out", type=Path)
    c.add_argument("--note", default="")
    c.add_argument("--mode", choices=["inline", "hybrid"])
    _add_force(c)
    c.set_defaults(handler=_clone)

    c = cmds.add_parser("lineage", help="a code checkpoint's parents, verified by hash")
    c.add_argument("code")
    c.set_defaults(handler=_lineage)

    c = cmds.add_parser("share", help="move identical cells of several code checkpoints into one shared file")
    c.add_argument("shared_file", type=Path)
    c.add_argument("checkpoints", nargs="+")
    c.add_argument("--cells", required=True, help="comma-separated globs or names")
    c.set_defaults(handler=_share)

    c = cmds.add_parser("specialize", help="fine-tune a clone on a corpus (dynlm's trainer) and store it as a delta")
    c.add_argument("parent")
    c.add_argument("--domain", required=True)
    c.add_argument("--corpus", required=True, help="corpus name, file, folder or glob")
    c.add_argument("-o", "--out", type=Path, required=True)
    c.add_argument("--steps", type=int, default=200)
    c.add_argument("--keep-run", type=Path, help="keep the training run folder here")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer override (repeatable), e.g. --set train.lr=1e-4 --set data.seq_len=128")
    _add_force(c)
    c.set_defaults(handler=_specialize)


# ---------------------------------------------------------------------------------------------


def _add_force(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace the contents of a non-empty output folder (hidden entries such as .git stay)")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _export(args: argparse.Namespace) -> int:
    from dynlm.weights.codeckpt import export_code_checkpoint
    from dynlm.weights.store import is_code_checkpoint

    event = None
    if args.event:
        try:
            event = json.loads(args.event)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--event is not valid JSON ({e.msg})") from None
    if args.literal_max < 0:
        raise ConfigError(f"--literal-max must be >= 0, got {args.literal_max}")
    start = time.perf_counter()
    # cell histories carry over from the code checkpoint being replaced
    inherit = args.out if is_code_checkpoint(args.out) else None
    with output_dir(args.out, args.force) as staged:
        export_code_checkpoint(args.source, staged, mode=args.mode, dtype=args.dtype, literal_max=args.literal_max,
                               history_event=event, inherit_from=inherit)
    out = args.out
    print(f"wrote {out} ({args.mode}, {_size(out) / 1e6:.2f} MB) in {time.perf_counter() - start:.2f}s")
    return 0


def _import(args: argparse.Namespace) -> int:
    from dynlm.weights.codeckpt import import_code_checkpoint

    start = time.perf_counter()
    with output_dir(args.out, args.force) as staged:
        import_code_checkpoint(args.code, staged)
    out = args.out
    print(f"wrote {out} ({_size(out) / 1e6:.2f} MB) in {time.perf_counter() - start:.2f}s")
    return 0


def _show(args: argparse.Namespace) -> int:
    from dynlm.weights.codeckpt import describe_cell
    from dynlm.weights.store import CodeCheckpoint

    ckpt = CodeCheckpoint(args.code)
    if args.cell:
        if args.cell not in ckpt.cells:
            from dynlm.errors import CheckpointError, did_you_mean

            raise CheckpointError(f"{args.code}: no cell '{args.cell}'", did_you_mean(args.cell, ckpt.cells))
        info = describe_cell(ckpt, args.cell, args.values)
        if args.json:
            _print_json(info)
            return 0
        for key in ("name", "line", "shape", "dtype", "sha256", "payload", "note"):
            print(f"{key:12s} {info[key]}")
        print(f"{'stats':12s} " + ", ".join(f"{k}={v}" for k, v in info["stats"].items()))
        print("history:")
        for event in info["history"]:
            print("  " + ", ".join(f"{k}={v}" for k, v in event.items()))
        print(f"{'values':12s} {info['first_values']}{' ...' if len(info['first_values']) < _numel(info) else ''}")
        return 0
    rows = [{"name": c.name, "shape": list(c.shape), "dtype": c.dtype, "payload": type(c.data).__name__,
             "note": c.note, "events": len(c.history)} for c in ckpt.cells.values()]
    if args.json:
        _print_json({"model": ckpt.model_info, "cells": rows})
        return 0
    info = ckpt.model_info
    print(f"{args.code}: {info.get('architecture')} ({info.get('mode')}), {len(rows)} cells, "
          f"{info.get('parameters', 0):,} parameters, weights sha256 {str(info.get('weights_sha256'))[:16]}...")
    for r in rows:
        note = f"  # {r['note']}" if r["note"] else ""
        print(f"  {r['name']:56s} {r['dtype']:9s} {str(r['shape']):16s} {r['payload']:8s}{note}")
    return 0


def _numel(info: dict[str, Any]) -> int:
    n = 1
    for d in info["shape"]:
        n *= d
    return n


def _annotate(args: argparse.Namespace) -> int:
    from dynlm.weights.codeckpt import annotate

    annotate(args.code, args.cell, args.note)
    print(f"{args.cell}: note set")
    return 0


def _rehash(args: argparse.Namespace) -> int:
    from dynlm.weights.codeckpt import rehash

    changed = rehash(args.code)
    print(f"{len(changed)} cell(s) rehashed" + (": " + ", ".join(changed) if changed else ""))
    return 0


def _diff(args: argparse.Namespace) -> int:
    from dynlm.weights.delta import Delta, diff

    with output_dir(args.out, args.force) as staged:
        diff(args.base, args.new, staged, kind=args.kind, mode=args.mode, rank=args.rank,
             max_rel_error=args.max_rel_error)
    delta = Delta(args.out)
    summary = delta.summary()
    if args.json:
        _print_json(summary)
        return 0
    kinds = ", ".join(f"{v} {k}" for k, v in delta.header["kinds"].items())
    print(f"wrote {args.out} ({_size(args.out) / 1e6:.3f} MB): {kinds}; exact: {summary['exact']}")
    for cell in summary["per_cell"]:
        error = f", rel error {cell['rel_error']:.3g}" if cell["kind"] == "lowrank" else ""
        print(f"  {cell['name']:56s} {cell['kind']:8s} {cell['changed']:>10,} changed  {cell['bytes']:>10,} B{error}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    from dynlm.weights.delta import apply_delta

    with output_dir(args.out, args.force) as staged:
        apply_delta(args.base, args.delta, staged, mode=args.mode, allow_approximate=not args.exact_only)
    print(f"wrote {args.out}")
    return 0


def _load_only(args: argparse.Namespace) -> int:
    from dynlm.weights.store import CodeCheckpoint

    start = time.perf_counter()
    ckpt = CodeCheckpoint(args.code)
    parsed = time.perf_counter()
    names = ckpt.select(args.cells)
    arrays = ckpt.arrays(names)
    done = time.perf_counter()
    result = {"cells_decoded": ckpt.decode_count, "cells_total": len(ckpt.cells),
              "parameters_decoded": int(sum(a.size for a in arrays.values())),
              "parse_seconds": round(parsed - start, 4), "decode_seconds": round(done - parsed, 4),
              "cells": {n: list(a.shape) for n, a in arrays.items()}}
    if args.json:
        _print_json(result)
        return 0
    print(f"decoded {result['cells_decoded']} of {result['cells_total']} cells ({result['parameters_decoded']:,} "
          f"parameters) in {result['decode_seconds']:.3f}s (parse {result['parse_seconds']:.3f}s)")
    for name, shape in result["cells"].items():
        print(f"  {name} {shape}")
    return 0


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise DataError(f"{what} '{path}' not found")
    return path.read_text(encoding="utf-8")


def _analyze(args: argparse.Namespace) -> int:
    from dynlm.weights.analysis import analyze, write_report

    if args.text and args.corpus:
        raise ConfigError("give --text or --corpus, not both")
    texts = [_read_text(args.text, "--text")] if args.text else None
    if args.corpus:
        from dynlm.data.corpora import split_corpus

        texts = [text for _, text in split_corpus(args.corpus)[args.split]]
    check_output_dir(args.out, args.force)
    report = analyze(args.code, texts=texts, rank_cap=args.rank_cap, seq_len=args.seq_len, max_tokens=args.max_tokens)
    with output_dir(args.out, args.force) as staged:
        files = write_report(report, staged, plots=not args.no_plots)
    for line in report["findings"]:
        print(line)
    print("wrote " + ", ".join(str(args.out / f.name) for f in files))
    return 0


def _background_texts(spec: str, max_chars: int) -> list[str]:
    path = Path(spec)
    if path.is_file():
        return [_read_text(path, "--background")]
    from dynlm.data.corpora import get_corpus

    texts, total = [], 0
    for _, text in get_corpus(spec).documents():
        texts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return texts


def _find_neurons(args: argparse.Namespace) -> int:
    import dynlm
    from dynlm.weights.neurons import find_neurons_for, to_markdown, write_result

    examples = list(args.example)
    if args.examples:
        examples += [line for line in _read_text(args.examples, "--examples").splitlines() if line.strip()]
    if not examples:
        raise ConfigError("no concept examples", "give --examples FILE (one per line) or --example TEXT")
    if args.out:
        check_output_dir(args.out, args.force)
    background = _background_texts(args.background, 8 * args.background_tokens) if args.background else None
    tokenizer = dynlm.load_tokenizer(args.code)
    result = find_neurons_for(args.code, tokenizer, examples, background, concept=args.concept, top=args.top,
                              contexts=args.contexts, max_background_tokens=args.background_tokens)
    if args.out:
        with output_dir(args.out, args.force) as staged:
            files = write_result(result, staged)
        print("wrote " + ", ".join(str(args.out / f.name) for f in files))
    else:
        sys.stdout.write(to_markdown(result))
    return 0


def _numpy_run(args: argparse.Namespace) -> int:
    from dynlm.weights.numpy_runtime import run

    return run(args)


def _clone(args: argparse.Namespace) -> int:
    from dynlm.weights.lineage import clone

    with output_dir(args.out, args.force) as staged:
        clone(args.source, staged, note=args.note, mode=args.mode)
    print(f"wrote {args.out}")
    return 0


def _lineage(args: argparse.Namespace) -> int:
    from dynlm.weights.lineage import lineage_of

    for depth, entry in enumerate(lineage_of(args.code)):
        status = "missing" if entry.get("missing") else ("verified" if entry["verified"] else "HASH DIFFERS")
        print(f"{'  ' * depth}{entry['path']}  weights {str(entry['weights_sha256'])[:16]}...  {status}")
    return 0


def _share(args: argparse.Namespace) -> int:
    from dynlm.weights.lineage import share_cells

    out = share_cells(args.checkpoints, args.cells, args.shared_file)
    print(f"wrote {out}; {len(args.checkpoints)} checkpoint(s) now reference it")
    return 0


def _specialize(args: argparse.Namespace) -> int:
    from dynlm.weights.delta import Delta
    from dynlm.weights.lineage import specialize

    with output_dir(args.out, args.force) as staged:
        specialize(args.parent, args.domain, args.corpus, staged, steps=args.steps, overrides=args.overrides,
                   work_dir=args.keep_run)
    delta = Delta(args.out)
    kinds = ", ".join(f"{v} {k}" for k, v in delta.header["kinds"].items())
    print(f"wrote {args.out}: delta against {delta.header['base_weights_sha256'][:16]}... ({kinds})")
    if args.keep_run is None:
        print("the training run above was temporary and is removed (keep it with --keep-run DIR)")
    return 0
