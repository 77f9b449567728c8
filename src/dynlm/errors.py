"""Errors a user can cause. The CLI prints them as one line and exits with code 2;
anything else is a bug and keeps its traceback."""

from __future__ import annotations

import contextlib
import difflib
import signal
import threading
from collections.abc import Iterable, Iterator


class DynlmError(Exception):
    """A mistake in the user's input (path, preset, config key, value, file contents)."""

    def __init__(self, message: str, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class ConfigError(DynlmError):
    """An unknown config key or a bad value."""


class CheckpointError(DynlmError):
    """A checkpoint directory or file that is missing, truncated or inconsistent."""


class DataError(DynlmError):
    """A corpus or tokenizer that cannot be fetched, found or read."""


class ContextLengthError(DynlmError):
    """A context longer than the model's positions or the allocated cache."""


class OutputExistsError(DynlmError):
    """An output folder that already holds files the command did not write (use --force)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the same clean-up runs (a training run saves first)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within this block SIGTERM raises `Terminated` (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """'did you mean X?' for the closest choice, or a short list of valid ones."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    if close:
        return f"did you mean '{close[0]}'?"
    if choices and len(choices) <= 12:
        return "valid: " + ", ".join(choices)
    return None
