"""What every CPU comparison script in this folder writes: `<name>.json` (the report, with the
git commit measured) and `<name>.md` (a title, one line of context, a table)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def git_commit(ref: str = "HEAD") -> str:
    """The full hash of `ref` in the checkout this script lives in."""
    return subprocess.run(["git", "rev-parse", ref], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).parent).stdout.strip()


def write_report(out: Path, name: str, report: dict[str, Any], title: str, context: str,
                 header: list[str], rows: list[list[str]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# {title}", "", context, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
