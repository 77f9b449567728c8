"""What every serving benchmark records next to its figures: the machine and the commit measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import provenance
from quickstart_cpu import cpu_model


def environment() -> dict[str, Any]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):  # a copy without .git: the src tree id says what ran
        commit, dirty = provenance.commit(), False
    return {"device": f"CPU: {cpu_model()}, {os.cpu_count()} cores, shared with other jobs while measured",
            "python": platform.python_version(), "commit": commit + ("+dirty" if dirty else "")}


def write_results(out: Path, stem: str, report: dict[str, Any], markdown: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {out / stem}.json and .md")
