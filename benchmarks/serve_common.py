"""What every serving benchmark records next to its figures: the machine and the commit measured."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import provenance
from quickstart_cpu import cpu_model


def environment(given_commit: str | None = None) -> dict[str, Any]:
    return {"device": f"CPU: {cpu_model()}, {os.cpu_count()} cores, shared with other jobs while measured",
            "python": platform.python_version(), "commit": provenance.commit(given_commit)}


def write_results(out: Path, stem: str, report: dict[str, Any], markdown: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {out / stem}.json and .md")
