"""Atomic file and folder writes: the one place where dynlm writes to a temporary sibling and
renames it into place; and how dynlm turns file bytes into text and back. Standard library only
(every layer may import it).

Text. Files are read as UTF-8 with "surrogateescape": a byte that is not part of valid UTF-8
becomes one lone surrogate (U+DC80 + byte) and `utf8_bytes` turns it back into the same byte. So
any file round-trips exactly, a byte-level model sees the file's exact bytes, and bits per byte
divide by the file's byte count. Tokenizers that need valid Unicode (BPE, Hugging Face) get
`valid_unicode(text)`: each such byte becomes U+FFFD there.

    atomic_write_text(path, text)           # a reader sees the old file or the new one, never half
    with atomic_open(path) as f: ...        # stream bytes into it
    atomic_write_json(path, value)          # in the one JSON style dynlm writes (`json_text`)
    with atomic_directory(folder) as tmp:   # fill tmp; on success it becomes `folder`
        ...

Folders. A folder cannot be renamed over a non-empty folder, so replacing one takes care. On
Linux `atomic_directory` swaps the new folder and the old one in a single `renameat2(...,
RENAME_EXCHANGE)` call: at every instant `folder` holds either the complete old contents or
the complete new ones. Where that call is missing (other systems, some file systems) it falls back
to two renames, old -> `.<name>.old-<pid>` then new -> `folder`; a crash between the two leaves
the previous folder under the `.old` name, and `recover_directory(folder)` (which every loader of
dynlm checkpoints calls first) renames it back. Either way a crash during a save leaves a
loadable previous folder."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from dynlm.output_dir import follow_umask

TEXT_ERRORS = "surrogateescape"
_RAW_BYTE = re.compile("[\udc80-\udcff]")  # a byte of a file that was not valid UTF-8


def read_text_exact(path: str | Path) -> str:
    """The text of a file; bytes that are not valid UTF-8 are kept (see the module docstring)."""
    return Path(path).read_bytes().decode("utf-8", TEXT_ERRORS)


def utf8_bytes(text: str) -> bytes:
    """The bytes of `text` (the exact file bytes for text from `read_text_exact`)."""
    return text.encode("utf-8", TEXT_ERRORS)


def num_utf8_bytes(text: str) -> int:
    return len(utf8_bytes(text))


def valid_unicode(text: str) -> str:
    """`text` with each kept raw byte replaced by U+FFFD, for consumers that need valid Unicode."""
    return _RAW_BYTE.sub("\ufffd", text) if _RAW_BYTE.search(text) else text


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _load_renameat2() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux `renameat2` with `RENAME_EXCHANGE`). False when
    the system or the file system cannot; then nothing was changed."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    errno = ctypes.get_errno()
    if errno in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: not supported here
        return False
    raise OSError(errno, os.strerror(errno), str(a), None, str(b))


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file to write; when the block succeeds it replaces `path` in one rename (a failed
    block leaves `path` as it was and no temporary file behind)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
        follow_umask(tmp)  # mkstemp files are 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write `data` to `path` through a temporary sibling renamed into place."""
    with atomic_open(path) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_text(value: Any) -> str:
    """The one JSON style dynlm writes: 2-space indent, non-ASCII characters kept, a final
    newline. Deterministic, so a JSON file written by dynlm can be rebuilt from its value byte for
    byte (the code form relies on it)."""
    return json.dumps(value, indent=2, ensure_ascii=False) + "\n"


def atomic_write_json(path: str | Path, value: Any) -> Path:
    """`value` as JSON in dynlm's style (`json_text`), written atomically."""
    return atomic_write_text(path, json_text(value))


def _old_siblings(directory: Path) -> list[Path]:
    prefix = f".{directory.name}.old-"
    if not directory.parent.is_dir():
        return []
    return sorted((p for p in directory.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()),
                  key=lambda p: p.stat().st_mtime)


def recover_directory(directory: str | Path) -> bool:
    """Undo a replacement that stopped between its two renames (the fallback path of
    `atomic_directory`): when `directory` is missing and a `.<name>.old-*` sibling exists, the
    newest one is renamed back. True when something was recovered."""
    directory = Path(directory)
    if directory.exists():
        return False
    old = _old_siblings(directory)
    if not old:
        return False
    os.replace(old[-1], directory)
    return True


def _remove_stale(directory: Path) -> None:
    """Leftovers of interrupted writes: temporary folders, and `.old` folders whose content is
    superseded by an existing `directory`."""
    if not directory.parent.is_dir():
        return
    for prefix in (f".{directory.name}.tmp-", f".{directory.name}.old-"):
        for path in directory.parent.iterdir():
            if path.name.startswith(prefix) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(directory: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder next to `directory`; when the block succeeds it replaces
    `directory` (see the module docstring for how a crash at any point leaves a loadable folder).
    When the block raises, `directory` is untouched and the temporary folder removed."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(directory)
    _remove_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp folders are 0700 and safetensors files 0600
        if not directory.exists():
            os.replace(tmp, directory)
            return
        if exchange_paths(tmp, directory):  # tmp now holds the previous contents
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = directory.parent / f".{directory.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
