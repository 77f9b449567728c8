"""Which code a benchmark measured, without trusting a hand-typed label.

`commit()` is `git rev-parse HEAD` (+ "-dirty") where the tree has git. A copy of the tree without
.git (the GPU machine's) gets the git tree id of `src/` computed from the files themselves:
compare it with `git rev-parse COMMIT:src` to find or check the commit. A `--commit` given by hand
is kept next to it, labelled as such."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache"}


def _git_object(kind: str, data: bytes) -> bytes:
    return hashlib.sha1(f"{kind} {len(data)}\0".encode() + data).digest()


def tree_id(directory: Path) -> str:
    """The git tree id of `directory` as git would store it (regular, executable and symlinked
    files; ignored caches and *.egg-info left out)."""

    def tree(path: Path) -> bytes:
        entries = []
        for child in path.iterdir():
            if child.name in IGNORED_DIRS or child.name.endswith((".egg-info", ".pyc")):
                continue
            if child.is_symlink():
                entries.append((child.name, b"120000", _git_object("blob", os.readlink(child).encode())))
            elif child.is_dir():
                sub = tree(child)
                if sub:
                    entries.append((child.name + "/", b"40000", _git_object("tree", sub)))
            else:
                mode = b"100755" if os.access(child, os.X_OK) else b"100644"
                entries.append((child.name, mode, _git_object("blob", child.read_bytes())))
        # git orders tree entries by name, a directory's name compared as if it ended with "/"
        return b"".join(mode + b" " + name.rstrip("/").encode() + b"\0" + digest
                        for name, mode, digest in sorted(entries, key=lambda e: e[0].encode()))

    return _git_object("tree", tree(directory)).hex()


def commit(given: str | None = None) -> str:
    """HEAD where git's HEAD holds exactly the `src/` being run; otherwise (no git, a stale .git as
    on a copied tree, or local edits) the tree id of `src/` computed from the files, with the
    hand-given commit beside it."""
    src = tree_id(ROOT / "src")
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()

        if git("rev-parse", "HEAD:src") == src:
            return git("rev-parse", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pass
    label = f"src tree {src} (= git rev-parse COMMIT:src)"
    return label + (f"; --commit {given} given by hand" if given else "")


def short(label: str) -> str:
    """`label` from `commit()` cut to fit a table cell: a commit's first 10 characters, or the src
    tree id's first 12 with the hand-given commit beside it."""
    match = re.match(r"src tree ([0-9a-f]{40}).*?(?:--commit (\S+) given by hand)?$", label)
    if match:
        tree, given = match.groups()
        return f"src tree {tree[:12]}" + (f" (given: {given})" if given else "")
    return label if label.startswith("no git") else label[:10]
