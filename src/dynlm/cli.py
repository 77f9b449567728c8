"""The `dynlm` command. Each subcommand lives in `dynlm/commands/<name>.py` and exposes
`register(subparsers)`; the handler it sets returns an exit code.

User mistakes (`DynlmError`) print one line, `dynlm: error: ...`, and exit with code 2.
Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import importlib
import sys

from dynlm.errors import DynlmError

COMMANDS = ["info", "corpus", "tokenizer", "convert", "generate", "train", "eval", "bench", "weights", "export",
            "recall", "kasgarli", "arena", "experts", "serve", "chat"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage otherwise)
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynlm", description="Build, train, evaluate, compare and serve dynamic language models.")
    from dynlm import __version__

    parser.add_argument("--version", action="version", version=f"dynlm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dynlm.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not there yet
            if e.name != f"dynlm.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except DynlmError as e:
        sys.stderr.write(f"dynlm: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("dynlm: interrupted\n")
        return 130
    except BrokenPipeError:  # `dynlm ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
