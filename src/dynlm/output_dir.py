"""Output folders: the one policy every command that writes a folder follows.

    check_output_dir(path, force)               # refuse a non-empty folder unless force
    with output_dir(path, force) as staged:     # write into `staged` (created by the writer) ...
        save_something(staged)                  # ... it replaces `path` only when this succeeds

- A missing or empty destination is written; a non-empty one is refused with
  `OutputExistsError` unless `force`. Nothing is deleted or changed before the refusal.
- With `force`, the folder's previous contents are replaced, except hidden entries (`.git`,
  `.gitignore`, ...) that the new output does not name: a command never deletes a repository's
  metadata.
- The new contents are staged beside the destination and moved in when complete, so a failure
  leaves the destination as it was. The destination may be the current folder (`-o .`): its
  contents are replaced in place rather than the folder itself.
- Written files and folders get the usual umask-based modes (temporary folders are private,
  0700, and safetensors writes its files 0600).

Standard library only: every layer may use it."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dynlm.errors import OutputExistsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(root: str | Path) -> None:
    """Give `root` and everything under it the modes a plain `open()` / `mkdir()` would have
    given them (0666 / 0777 minus the umask), keeping the execute bits of files that had them."""
    mask = _umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        if path.is_dir():
            os.chmod(path, 0o777 & ~mask)
        else:
            executable = path.stat().st_mode & 0o111
            os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def _listing(path: Path, limit: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_output_dir(path: str | Path, force: bool = False, *, flag: str = "--force") -> Path:
    """Refuse a destination that is a file, cannot be created, or is a non-empty folder (unless
    `force`). Returns the path. Call it before any long work so that a mistake costs nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputExistsError(f"{path}: exists and is not a folder")
    if path.is_dir():
        if any(path.iterdir()) and not force:
            raise OutputExistsError(f"{path}: the folder is not empty ({_listing(path)})",
                                    f"choose another destination, or replace its contents with {flag}")
        if not os.access(path, os.W_OK):
            raise OutputExistsError(f"{path}: the folder is not writable")
        return path
    parent = path.resolve().parent
    while not parent.exists():
        parent = parent.parent
    try:  # a real probe: permission bits do not tell about /proc, read-only mounts or root
        os.rmdir(tempfile.mkdtemp(prefix=".dynlm-probe-", dir=parent))
    except OSError as e:
        raise OutputExistsError(f"{path}: cannot create a folder under {parent} ({e.strerror or e})") from None
    return path


def clear_output_dir(path: str | Path) -> None:
    """Empty a folder that `check_output_dir(path, force=True)` accepted, keeping hidden entries
    (for writers that write in place, such as a training run)."""
    path = Path(path)
    if not path.is_dir():
        return
    for old in path.iterdir():
        if old.name.startswith("."):
            continue
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        else:
            old.unlink()


def _install(staged: Path, destination: Path, work: Path) -> None:
    """Move the finished `staged` folder into `destination` (see the module docstring)."""
    if not destination.exists():
        os.replace(staged, destination)
        return
    new_names = {p.name for p in staged.iterdir()}
    clear_output_dir(destination)
    for old in destination.iterdir():  # hidden entries the new output replaces
        if old.name in new_names and old.name != work.name:
            shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    for new in staged.iterdir():
        os.replace(new, destination / new.name)


@contextlib.contextmanager
def output_dir(path: str | Path, force: bool = False, *, flag: str = "--force") -> Iterator[Path]:
    """Yield a path (not yet created) to write the output folder to; on success it becomes
    `path` (see the module docstring). On an error nothing at `path` changes."""
    destination = check_output_dir(path, force, flag=flag)
    # staged inside an existing destination (a hidden folder, skipped when installing: this works
    # for `-o .` too), else beside it; either way on the same file system, so moves are renames
    try:
        if destination.is_dir():
            work = Path(tempfile.mkdtemp(prefix=".dynlm-tmp-", dir=destination))
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    except OSError as e:
        raise OutputExistsError(f"{destination}: cannot write a folder there ({e.strerror or e})") from None
    staged = work / "out"
    try:
        yield staged
        if not staged.is_dir():
            staged.mkdir()
        follow_umask(staged)
        _install(staged, destination, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
