"""`dynlm experts`: the experts registry (YAML) and the router.

    dynlm experts add general smollm2/ --description "general chat" --default
    dynlm experts add shakespeare runs/quick/best --keywords "thou,thee,hath,verse" --examples ex.txt
    dynlm experts list
    dynlm experts route "Write a sonnet about the sea"
    dynlm experts remove shakespeare
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

from dynlm.errors import CheckpointError, ConfigError, did_you_mean

DEFAULT_REGISTRY = Path("experts.yaml")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("experts", help="manage the domain experts registry and try the router")
    p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY, help="registry file (default: experts.yaml)")
    actions = p.add_subparsers(dest="action", metavar="ACTION", parser_class=type(p))
    add = actions.add_parser("add", help="add (or replace, with --force) an expert")
    add.add_argument("name")
    add.add_argument("path", help="checkpoint directory, Hugging Face directory or .gguf file")
    add.add_argument("--domain", default="")
    add.add_argument("--description", default="")
    add.add_argument("--keywords", default="", help="comma-separated keywords (rule router)")
    add.add_argument("--regex", action="append", default=[], help="regular expression rule (repeatable)")
    add.add_argument("--examples", type=Path, help="example prompts, one per line (learned router)")
    add.add_argument("--default", action="store_true", help="the fallback expert")
    add.add_argument("--force", action="store_true", help="replace an expert of the same name")
    actions.add_parser("list", help="list the experts")
    remove = actions.add_parser("remove", help="remove an expert")
    remove.add_argument("name")
    route = actions.add_parser("route", help="which expert a prompt goes to, by which rule or score")
    route.add_argument("text")
    route.add_argument("--method", choices=["rules", "learned", "hybrid"], help="default: the registry's")
    route.add_argument("--json", action="store_true")
    p.set_defaults(handler=run, parser=p)


def _check_loadable(path: Path) -> None:
    """Cheap checks that the checkpoint will load (its tokenizer and config), without the weights."""
    import dynlm

    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory")
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "weights.py")):
        raise CheckpointError(f"{path}: not a checkpoint (no config.json)", "give a checkpoint directory or a .gguf")
    dynlm.load_tokenizer(path)


def run(args: argparse.Namespace) -> int:
    from dynlm.serve.experts import ExpertSpec, Registry, Router

    if args.action is None:
        args.parser.print_help()
        return 2
    if args.action == "add":
        registry = Registry.load(args.registry, missing_ok=True)
        if args.name in registry.experts and not args.force:
            raise ConfigError(f"expert '{args.name}' is already in {args.registry}", "use --force to replace it")
        path = Path(args.path)
        _check_loadable(path)
        examples: list[str] = []
        if args.examples is not None:
            if not args.examples.is_file():
                raise ConfigError(f"--examples '{args.examples}' not found")
            examples = [line.strip() for line in args.examples.read_text(encoding="utf-8").splitlines() if line.strip()]
        stored = path.absolute()
        with contextlib.suppress(ValueError):  # keep the path relative to the registry when it lies beside it
            stored = stored.relative_to(args.registry.absolute().parent)
        registry.experts[args.name] = ExpertSpec(args.name, str(stored), args.domain, args.description,
                                                 [k.strip() for k in args.keywords.split(",") if k.strip()],
                                                 list(args.regex), examples)
        if args.default:
            registry.default = args.name
        registry.validate()
        registry.save()
        print(f"added expert '{args.name}' ({stored}) to {args.registry}")
        return 0
    registry = Registry.load(args.registry)
    if args.action == "list":
        default = registry.default_name if registry.experts else None
        for spec in registry.experts.values():
            mark = " (default)" if spec.name == default else ""
            print(f"{spec.name}{mark}\t{spec.path}\t{spec.domain or '-'}\t{len(spec.keywords)} keywords, "
                  f"{len(spec.patterns)} regex, {len(spec.examples)} examples\t{spec.description}")
        return 0
    if args.action == "remove":
        if args.name not in registry.experts:
            raise ConfigError(f"no expert '{args.name}' in {args.registry}", did_you_mean(args.name, registry.experts))
        del registry.experts[args.name]
        if registry.default == args.name:
            registry.default = None
        registry.save()
        print(f"removed expert '{args.name}' from {args.registry}")
        return 0
    decision = Router(registry, method=args.method).route(args.text)
    if args.json:
        print(json.dumps(decision.__dict__))
    else:
        print(f"{decision.expert}\t{decision.method}\tconfidence {decision.confidence:.2f}\t{decision.reason}")
    return 0
