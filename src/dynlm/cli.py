"""The `dynlm` command. Each subcommand lives in `dynlm/commands/<name>.py` and exposes
`register(subparsers)`; the handler it sets returns an exit code.

User mistakes (`DynlmError`) print one line, `dynlm: error: ...`, and exit with code 2.
Anything else is a bug and keeps its traceback.

`--threads N` (accepted before or after any command) sets the CPU threads torch and NumPy use;
without it, the CPUs this process may use minus the machine's current load (at least one), so
that a second busy process on the same cores does not make every matrix product wait for a
thread that is not running. An explicit OMP_NUM_THREADS is respected."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from dynlm.errors import DynlmError, Terminated, sigterm_as_interrupt

COMMANDS = ["info", "corpus", "tokenizer", "convert", "generate", "train", "eval", "bench", "weights", "export",
            "recall", "kasgarli", "arena", "experts", "serve", "chat"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage otherwise)
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive number of threads")
    return value


THREADS_HELP = "CPU threads (default: the free CPUs, i.e. usable CPUs minus the current load, at least 1)"


def _add_threads_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--threads` after the command too (`dynlm generate ... --threads 1`). SUPPRESS keeps a
    value given before the command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                child.add_argument("--threads", type=_threads, default=argparse.SUPPRESS, help=THREADS_HELP)
                _add_threads_everywhere(child)


def default_threads() -> int:
    """CPUs this process may use, minus the load of what else runs on them (at least 1)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(usable, usable - busy))


def configure_threads(requested: int | None) -> int | None:
    """Apply `--threads` (or the default unless OMP_NUM_THREADS is set); returns the count set."""
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return None
    threads = requested or default_threads()
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch and NumPy when first imported
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dynlm", description="Build, train, evaluate, compare and serve dynamic language models.")
    from dynlm import __version__

    parser.add_argument("--version", action="version", version=f"dynlm {__version__}")
    parser.add_argument("--threads", type=_threads, default=None, help=THREADS_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dynlm.commands.{name}")
        except ModuleNotFoundError as e:  # a command whose module is not there yet
            if e.name != f"dynlm.commands.{name}":
                raise
            continue
        module.register(sub)
    _add_threads_everywhere(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    configure_threads(args.threads)
    try:
        with sigterm_as_interrupt():
            return int(args.handler(args) or 0)
    except DynlmError as e:
        sys.stderr.write(f"dynlm: error: {e}\n")
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated)
        terminated = isinstance(e, Terminated)
        sys.stderr.write(f"dynlm: {'terminated' if terminated else 'interrupted'}\n")
        return 143 if terminated else 130
    except BrokenPipeError:  # `dynlm ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
