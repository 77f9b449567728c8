"""Every command shown in README.md and docs/ exists and parses; Python examples run.

The default run checks that each `dynlm ...` line parses with the real CLI parser and executes
fenced ```python blocks marked runnable; the `slow` test runs each documented command for real."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from dynlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def blocks(lang: set[str]) -> list[tuple[str, str]]:
    out = []
    for doc in DOCS:
        if doc.is_file():
            for m in FENCE.finditer(doc.read_text()):
                if m.group(1) in lang:
                    out.append((doc.name, m.group(2)))
    return out


def dynlm_commands() -> list[tuple[str, str]]:
    cmds = []
    for name, body in blocks({"bash", "console", "sh", "shell"}):
        for raw in body.splitlines():
            line = raw.strip().removeprefix("$ ").strip()
            if line.startswith("dynlm ") or line.startswith(".venv/bin/dynlm "):
                cmds.append((name, line))
    return cmds


COMMANDS = dynlm_commands()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_docs_show_every_command():
    """Every command the CLI registers, and every action of a command that has actions (`dynlm
    weights export`, ...), appears in at least one documented command line."""
    shown = set()
    for _, line in COMMANDS:
        argv = shlex.split(line, comments=True)[1:]
        shown.update({tuple(argv[:1]), tuple(argv[:2])})
    missing = []
    for name, parser in _subcommands(build_parser()).items():
        missing += [] if (name,) in shown else [name]
        missing += [f"{name} {action}" for action in _subcommands(parser) if (name, action) not in shown]
    assert not missing, f"commands no README/docs page shows: {missing}"


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, line):
    argv = shlex.split(line, comments=True)[1:]
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse refused it
        pytest.fail(f"{doc}: `{line}` does not parse (exit {e.code})")
    assert getattr(args, "handler", None), f"{doc}: `{line}` names no command"


PYTHON_BLOCKS = [(n, b) for n, b in blocks({"python"}) if not b.lstrip().startswith("# not run")]


@pytest.mark.parametrize("doc,code", PYTHON_BLOCKS, ids=[f"{n}:{i}" for i, (n, _) in enumerate(PYTHON_BLOCKS)])
def test_python_examples_run(doc, code, tmp_path):
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{doc} example failed:\n{result.stderr[-2000:]}"


# commands that run until stopped (a server, an interactive client): parsed above, not run here;
# tests/test_serve.py and tests/test_chat_cli.py run them on loopback
RUN_UNTIL_STOPPED = {"serve", "chat"}


@pytest.mark.slow
def test_documented_commands_run(tmp_path):
    """Runs every documented command in order, in one folder (later commands use what earlier
    ones made), as a user following the docs would."""
    for doc, line in COMMANDS:
        argv = shlex.split(line, comments=True)
        if argv[1] in RUN_UNTIL_STOPPED:
            continue
        argv[0] = str(Path(sys.executable).with_name("dynlm"))
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        # a page repeating a command another page ran (`dynlm train quick`) meets its own output
        # folder: refusing to write over it is the documented behaviour
        refused = result.returncode == 2 and ("is not empty" in result.stderr or "holds a" in result.stderr)
        assert result.returncode == 0 or refused, f"{doc}: `{line}` failed:\n{result.stderr[-2000:]}"
