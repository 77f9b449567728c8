"""The safe loader: reads the .py files of a code checkpoint with `ast` and accepts only the
format's grammar. Nothing in a file is imported, executed or evaluated: the loader walks the
syntax tree and builds values itself, so a checkpoint from a stranger can only ever be data.

Grammar (anything else is refused with an error that names the file and the line):

    file       := docstring? import? assignment*
    import     := "from dynlm.weights.format import" some of Cell, DeltaCell, Inline, Literal, Ref, Shared
    assignment := NAME "=" value          NAME: one of the file kind's variables, each at most once
    literal    := str | int | float | True | False | None | -number
                | [literal, ...] | (literal, ...) | {str: literal, ...}
    weights.py := FORMAT, VERSION, MODEL (literals) and CELLS = [Cell(...), ...]
    delta.py   := FORMAT, VERSION, DELTA (literals) and CELLS = [DeltaCell(...), ...]
    config.py, vocab.py := UPPER_CASE names bound to literals

and the constructors take keyword arguments of fixed types (payloads also positional ones):

    Cell(name=str, shape=(int, ...), dtype=str, sha256=str|None, data=payload,
         stats={...}, note=str, history=[{...}, ...])
    DeltaCell(name=str, kind=str, shape=(...), dtype=str, base_sha256=str, result_sha256=str,
              parts=[Cell(...), ...], rel_error=float, stats={...})
    payload := Literal([number, ...]) | Inline(planes=((method, int), ...), b85=str)
             | Ref(file, key) | Shared(path, name)

No names, attribute access, operators (other than a minus sign on a number), calls to anything
else, comprehensions, lambdas, f-strings, bytes, sets, decorators or statements other than the
above.

Budgets, checked before anything is parsed or allocated (`LoadLimits`; raise them per call, or
for every load with the environment variable `DYNLM_LOAD_LIMITS="tokens=8000000,depth=40"`):
CPython's parser needs a few hundred bytes per token, so a small file of many tokens could
otherwise take gigabytes before the grammar is even looked at. A lexical pre-scan (one regular
expression, early exit) counts the tokens, the bracket depth and the top-level statements of the
text the parser would see, and refuses a file over any budget with an error naming the limit and
how to raise it; the parser then never sees more than `tokens` tokens. Declared tensor sizes are
checked against their payloads, and their total against `tensor_bytes`, before any tensor is
allocated (`dynlm.weights.store`).

Speed: base85 payloads can be hundreds of megabytes, and CPython's tokenizer reads strings at
~150 MB/s. The loader therefore parses a *skeleton* in which every `b85="..."` string whose text
is plain ASCII without quotes, backslashes or line breaks is replaced by a unique placeholder,
then checks that each placeholder came back as exactly the `b85` string of an `Inline`. Such a
string cannot change how the rest of the file tokenizes, so the skeleton's syntax tree is the
file's syntax tree with the payload text swapped out; the payload itself is decoded later straight
from the file's bytes. If any placeholder turns up anywhere else, the whole file is parsed as is.
"""

from __future__ import annotations

import ast
import mmap
import os
import re
import secrets
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np

from dynlm.errors import CheckpointError
from dynlm.weights.format import (
    DTYPES,
    MAX_LITERAL_VALUES,
    MAX_NDIM,
    MAX_NUMEL,
    Cell,
    DeltaCell,
    Inline,
    Literal,
    Ref,
    Shared,
)

_ELIDE_MIN = 256  # b85 strings at least this long are kept out of the parser
_B85_MARKER = b'b85="'

IMPORT_MODULE = "dynlm.weights.format"
CONSTRUCTOR_NAMES = ("Cell", "DeltaCell", "Inline", "Literal", "Ref", "Shared")
PAYLOADS = ("Literal", "Inline", "Ref", "Shared")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
_UPPER = re.compile(r"^[A-Z][A-Z0-9_]*$")


class UnsafeCheckpointError(CheckpointError):
    """A code checkpoint file outside the grammar: refused, nothing of it was run."""


LIMITS_ENV = "DYNLM_LOAD_LIMITS"


@dataclass(frozen=True)
class LoadLimits:
    """What the loader accepts from one code checkpoint. The defaults admit every checkpoint dynlm
    writes for models up to a few billion parameters (a 150k-token vocabulary is ~2M tokens) and
    bound the parser's memory at roughly 1 GB."""

    source_bytes: int = 512 << 20  # text handed to the parser (base85 payloads are kept out of it)
    tokens: int = 4_000_000  # Python tokens of that text
    depth: int = 32  # containers inside containers, calls included
    statements: int = 10_000  # top-level statements (a file holds a handful of assignments)
    tensor_bytes: int = 64 << 30  # the cells' declared sizes, together

    def replace(self, **changes: int) -> LoadLimits:
        return LoadLimits(**{**{f.name: getattr(self, f.name) for f in dataclass_fields(self)}, **changes})


def default_limits() -> LoadLimits:
    """`LoadLimits()` with the overrides of `$DYNLM_LOAD_LIMITS` ("tokens=8000000,depth=40")."""
    text = os.environ.get(LIMITS_ENV, "").strip()
    if not text:
        return LoadLimits()
    names = {f.name for f in dataclass_fields(LoadLimits)}
    changes = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in names or not value.strip().isdigit():
            raise CheckpointError(f"${LIMITS_ENV}: bad item '{item.strip()}'",
                                  "use NAME=INTEGER items separated by commas; names: " + ", ".join(sorted(names)))
        changes[key] = int(value)
    return LoadLimits().replace(**changes)


def over_budget(path: Path, what: str, amount: int, limit_name: str, limit: int,
                line: int | None = None) -> UnsafeCheckpointError:
    """The one-line refusal of a file over a budget, saying how to raise the limit."""
    where = f"line {line}: " if line is not None else ""
    return UnsafeCheckpointError(
        f"{path}: {where}{what} ({amount:,}) exceeds the loader's limit {limit_name}={limit:,}; refused before "
        "parsing or allocating",
        f'if you trust the file, raise it: LoadLimits({limit_name}=...) or {LIMITS_ENV}="{limit_name}=..."')


# Strings and comments: each replaced by one word ("0") before counting, so that brackets, quotes
# and words inside them do not count. A string prefix (b, r, f) stays as a word of its own.
_STRING_OR_COMMENT = re.compile(
    rb'''"""(?:[^"\\]|\\.|"(?!""))*"""'''  # triple-quoted, then single-quoted (no line break), then a comment
    rb"""|'''(?:[^'\\]|\\.|'(?!''))*'''"""
    rb'''|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|\#[^\n]*''', re.S)
_WORD = np.zeros(256, bool)
_WORD[np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_", np.uint8)] = True
_WORD[0x80:] = True  # UTF-8 letters
_BLANK = np.zeros(256, bool)
_BLANK[np.frombuffer(b"\x00 \t\f\r\n\\", np.uint8)] = True  # NUL: blanked strings (a real NUL is refused before)
_BRACKET = np.zeros(256, np.int8)
_BRACKET[np.frombuffer(b"([{", np.uint8)] = 1
_BRACKET[np.frombuffer(b")]}", np.uint8)] = -1
_END = np.zeros(256, bool)
_END[np.frombuffer(b"\n;", np.uint8)] = True
_SCAN_CHUNK = 1 << 18  # bytes per step: the temporaries stay around a megabyte


def prescan(path: Path, source: bytes | mmap.mmap, limits: LoadLimits) -> int:
    """Refuse `source` over the budgets of `limits` without parsing it: its size, its Python
    tokens (an upper bound: a number such as 1.5e-3 counts as several), its bracket depth and its
    top-level statements. One copy of the text (strings and comments blanked out, each left as
    one word), then vectorised passes over small chunks: memory stays near the text's size.
    Returns the token count."""
    if len(source) > limits.source_bytes:
        raise over_budget(path, "text to parse, in bytes", len(source), "source_bytes", limits.source_bytes)
    text = bytearray(source)
    for match in _STRING_OR_COMMENT.finditer(source):
        start, end = match.span()
        text[start:end] = bytes(end - start)  # blank (NUL counts as blank here) ...
        text[start] = 0x30  # ... but for one "0": the string is one token
    bare = np.frombuffer(text, np.uint8)
    tokens = statements = 0
    depth, previous_word, line_has_token = 0, False, False

    def line(offset: int) -> int:  # only when refusing
        return _line_of(source, start + offset)

    for start in range(0, bare.size, _SCAN_CHUNK):
        chunk = bare[start: start + _SCAN_CHUNK]
        word = _WORD[chunk]
        token_start = ~word & ~_BLANK[chunk]  # punctuation: one token per character
        token_start[1:] |= word[1:] & ~word[:-1]
        token_start[0] |= word[0] and not previous_word
        previous_word = bool(word[-1])
        seen = np.cumsum(token_start, dtype=np.int32)
        if tokens + int(seen[-1]) > limits.tokens:
            at = int(np.searchsorted(seen, limits.tokens - tokens + 1))
            raise over_budget(path, "Python tokens, at least", tokens + int(seen[-1]), "tokens", limits.tokens,
                              line(at))
        tokens += int(seen[-1])
        levels = np.cumsum(_BRACKET[chunk], dtype=np.int32) + depth
        if int(levels.max()) > limits.depth + 1:  # the value of an assignment opens the first bracket
            at = int(np.argmax(levels > limits.depth + 1))
            raise over_budget(path, "bracket depth", int(levels.max()), "depth", limits.depth, line(at))
        depth = int(levels[-1])
        # a statement ends at a newline or ';' outside brackets after at least one token
        ends = np.flatnonzero(_END[chunk] & (levels == 0))
        counts = seen[ends]
        if counts.size:
            nonempty = counts > np.concatenate([[0], counts[:-1]])
            nonempty[0] = counts[0] > 0 or line_has_token
            if statements + int(np.count_nonzero(nonempty)) > limits.statements:
                at = int(ends[np.flatnonzero(nonempty)[limits.statements - statements]])
                raise over_budget(path, "top-level statements, at least", limits.statements + 1, "statements",
                                  limits.statements, line(at))
            statements += int(np.count_nonzero(nonempty))
            line_has_token = bool(seen[-1] > counts[-1])
        else:
            line_has_token = line_has_token or bool(seen[-1] > 0)
    return tokens


@dataclass
class ParsedFile:
    path: Path
    variables: dict[str, Any] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)  # variable -> line
    # file contents kept alive while payload views into it exist
    buffer: Any = None


# File kinds: which top-level names may appear, and what each holds.
_WEIGHTS_VARIABLES = {"FORMAT": "str", "VERSION": "int", "MODEL": "dict", "CELLS": "cells"}
_DELTA_VARIABLES = {"FORMAT": "str", "VERSION": "int", "DELTA": "dict", "CELLS": "delta_cells"}
FILE_KINDS = {"weights": _WEIGHTS_VARIABLES, "delta": _DELTA_VARIABLES, "literals": None}

# Constructor schemas: field -> type, required fields, positional order (payloads only).
_SCHEMAS: dict[str, tuple[dict[str, str], set[str], tuple[str, ...]]] = {
    "Cell": ({"name": "str", "shape": "shape", "dtype": "dtype", "sha256": "sha256?", "data": "payload",
              "stats": "dict", "note": "str", "history": "history"},
             {"name", "shape", "dtype", "data"}, ()),
    "DeltaCell": ({"name": "str", "kind": "kind", "shape": "shape", "dtype": "dtype", "base_sha256": "sha256",
                   "result_sha256": "sha256", "parts": "cells", "rel_error": "number", "stats": "dict"},
                  {"name", "kind", "shape", "dtype", "base_sha256", "result_sha256", "parts"}, ()),
    "Literal": ({"values": "values"}, {"values"}, ("values",)),
    "Inline": ({"planes": "planes", "b85": "b85"}, {"planes", "b85"}, ("planes", "b85")),
    "Ref": ({"file": "str", "key": "str"}, {"file", "key"}, ("file", "key")),
    "Shared": ({"path": "str", "name": "str"}, {"path", "name"}, ("path", "name")),
}
_CLASSES = {"Cell": Cell, "DeltaCell": DeltaCell, "Literal": Literal, "Inline": Inline, "Ref": Ref, "Shared": Shared}
DELTA_KINDS = ("dense", "sparse", "lowrank")


def describe(node: ast.AST) -> str:
    """What a refused node is, in words."""
    if isinstance(node, ast.Call):
        func = node.func
        while isinstance(func, ast.Call):  # f()() -> f
            func = func.func
        if isinstance(func, ast.Name):
            return f"a call to '{func.id}'"
        if isinstance(func, ast.Attribute):
            return f"a call to '.{func.attr}'"
        return "a call"
    if isinstance(node, ast.Attribute):
        return f"an attribute access ('.{node.attr}')"
    if isinstance(node, ast.Name):
        return f"the name '{node.id}'"
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        module = node.module if isinstance(node, ast.ImportFrom) else ", ".join(a.name for a in node.names)
        return f"an import of '{module}'"
    if isinstance(node, ast.Constant):
        return {bytes: "a bytes literal", complex: "a complex number"}.get(type(node.value), "'...' (Ellipsis)")
    words = {
        ast.Lambda: "a lambda", ast.ListComp: "a comprehension", ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension", ast.GeneratorExp: "a generator expression", ast.JoinedStr: "an f-string",
        ast.FormattedValue: "an f-string", ast.BinOp: "an arithmetic expression", ast.BoolOp: "a boolean expression",
        ast.Compare: "a comparison", ast.UnaryOp: "an operator", ast.Subscript: "a subscript",
        ast.Starred: "a starred expression", ast.NamedExpr: "an assignment expression (:=)", ast.Set: "a set",
        ast.IfExp: "a conditional expression", ast.Await: "an await", ast.Yield: "a yield",
        ast.YieldFrom: "a yield", ast.FunctionDef: "a function definition",
        ast.AsyncFunctionDef: "a function definition", ast.ClassDef: "a class definition",
        ast.Expr: "an expression statement", ast.AugAssign: "an augmented assignment",
        ast.AnnAssign: "an annotated assignment", ast.Delete: "a 'del' statement",
        ast.Global: "a 'global' statement", ast.Nonlocal: "a 'nonlocal' statement",
    }
    if type(node) in words:
        return words[type(node)]
    if isinstance(node, ast.stmt):
        return f"a '{type(node).__name__.lower()}' statement"
    return f"'{type(node).__name__}'"


class _Walker:
    """Builds values from an already-parsed tree, refusing anything outside the grammar."""

    def __init__(self, path: Path, placeholders: dict[str, memoryview], limits: LoadLimits):
        self.path = path
        self.placeholders = placeholders
        self.limits = limits
        self.found: set[str] = set()

    def fail(self, node: ast.AST, message: str) -> UnsafeCheckpointError:
        line = getattr(node, "lineno", None)
        where = f"line {line}: " if line is not None else ""
        return UnsafeCheckpointError(f"{self.path}: {where}{message}")

    def refuse(self, node: ast.AST, context: str = "") -> UnsafeCheckpointError:
        return self.fail(node, f"{describe(node)} is not allowed{context}; a code checkpoint holds only "
                               "literals and Cell/Inline/Literal/Ref/Shared (it is read, never run)")

    # -- literals -------------------------------------------------------------------------------
    def literal(self, node: ast.AST, depth: int) -> Any:
        if depth > self.limits.depth:
            raise self.fail(node, f"nesting deeper than {self.limits.depth} levels")
        if isinstance(node, ast.Constant):
            value = node.value
            if isinstance(value, str):
                if value in self.placeholders:
                    raise _Misplaced()
                return value
            if value is None or isinstance(value, (bool, int, float)):
                return value
            raise self.refuse(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) \
                and isinstance(node.operand, ast.Constant) and type(node.operand.value) in (int, float):
            return -node.operand.value if isinstance(node.op, ast.USub) else node.operand.value
        if isinstance(node, (ast.List, ast.Tuple)):
            values = [self.literal(e, depth + 1) for e in node.elts]
            return values if isinstance(node, ast.List) else tuple(values)
        if isinstance(node, ast.Dict):
            out = {}
            for key, value in zip(node.keys, node.values):
                if key is None:  # {**x}
                    raise self.fail(value, "'**' unpacking is not allowed")
                if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                    raise self.fail(key, "dict keys must be strings")
                if key.value in out:
                    raise self.fail(key, f"duplicate key '{key.value}'")
                out[key.value] = self.literal(value, depth + 1)
            return out
        raise self.refuse(node)

    # -- typed fields ---------------------------------------------------------------------------
    def typed(self, node: ast.AST, kind: str, field_name: str, depth: int) -> Any:
        if kind == "payload":
            return self.call(node, PAYLOADS, depth)
        if kind == "cells":
            if not isinstance(node, ast.List):
                raise self.fail(node, f"'{field_name}' must be a list of Cell(...)")
            return [self.call(e, ("Cell",), depth + 1) for e in node.elts]
        if kind == "delta_cells":
            if not isinstance(node, ast.List):
                raise self.fail(node, f"'{field_name}' must be a list of DeltaCell(...)")
            return [self.call(e, ("DeltaCell",), depth + 1) for e in node.elts]
        if kind == "b85":
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if node.value in self.placeholders:
                    self.found.add(node.value)
                    return self.placeholders[node.value]
                return node.value
            raise self.fail(node, f"'b85' must be a plain string, not {describe(node)}")
        if kind == "values":
            if not isinstance(node, ast.List):
                raise self.fail(node, "Literal(...) takes one list of numbers")
            if len(node.elts) > MAX_LITERAL_VALUES:
                raise self.fail(node, f"a Literal of {len(node.elts):,} values (the limit is "
                                      f"{MAX_LITERAL_VALUES:,}; large tensors are Inline or Ref)")
            values = [self.literal(e, depth + 1) for e in node.elts]
            if not all(isinstance(v, (bool, int, float)) for v in values):
                raise self.fail(node, "a Literal holds numbers (or True/False) only")
            return values
        value = self.literal(node, depth)
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "dict": isinstance(value, dict),
            "sha256?": value is None or (isinstance(value, str) and bool(SHA256.match(value))),
            "sha256": isinstance(value, str) and bool(SHA256.match(value)),
            "dtype": isinstance(value, str) and value in DTYPES,
            "kind": isinstance(value, str) and value in DELTA_KINDS,
            "history": isinstance(value, list) and all(isinstance(v, dict) for v in value),
        }
        if kind == "shape":
            if not isinstance(value, (tuple, list)) or len(value) > MAX_NDIM or not all(
                    isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_NUMEL for d in value):
                raise self.fail(node, f"'shape' must be a tuple of at most {MAX_NDIM} non-negative integers")
            numel = 1
            for d in value:
                numel *= d
            if numel > MAX_NUMEL:
                raise self.fail(node, f"shape {tuple(value)} has more than {MAX_NUMEL:,} elements")
            return tuple(value)
        if kind == "planes":
            if not isinstance(value, (tuple, list)) or not all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and p[0] in ("raw", "zlib")
                    and isinstance(p[1], int) and not isinstance(p[1], bool) and p[1] >= 0 for p in value):
                raise self.fail(node, "'planes' must be a tuple of (\"raw\" or \"zlib\", length) pairs")
            return tuple(tuple(p) for p in value)
        if not ok[kind]:
            expected = {"str": "a string", "int": "an integer", "number": "a number", "dict": "a dict",
                        "sha256?": "64 hex digits or None",
                        "sha256": "64 lowercase hex digits", "dtype": "one of " + ", ".join(DTYPES),
                        "kind": "one of " + ", ".join(DELTA_KINDS), "history": "a list of dicts"}[kind]
            raise self.fail(node, f"{field_name} must be {expected}, got {value!r:.60}")
        return value

    def call(self, node: ast.AST, allowed: tuple[str, ...], depth: int) -> Any:
        if depth > self.limits.depth:
            raise self.fail(node, f"nesting deeper than {self.limits.depth} levels")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in allowed):
            expected = " or ".join(f"{a}(...)" for a in allowed)
            if isinstance(node, ast.Call) or not isinstance(node, (ast.Constant, ast.List, ast.Tuple, ast.Dict)):
                raise self.refuse(node, f" (expected {expected})")
            raise self.fail(node, f"expected {expected}, found {type(node).__name__.lower()}")
        name = node.func.id
        fields, required, positional = _SCHEMAS[name]
        if len(node.args) > len(positional):
            raise self.fail(node, f"{name}(...) takes at most {len(positional)} positional arguments")
        given: dict[str, ast.AST] = {}
        for arg_name, arg in zip(positional, node.args):
            if isinstance(arg, ast.Starred):
                raise self.refuse(arg)
            given[arg_name] = arg
        for kw in node.keywords:
            if kw.arg is None:
                raise self.fail(kw.value, "'**' unpacking is not allowed")
            if kw.arg not in fields:
                raise self.fail(kw.value, f"{name}(...) has no argument '{kw.arg}' "
                                          f"(it takes {', '.join(fields)})")
            if kw.arg in given:
                raise self.fail(kw.value, f"{name}(...) got '{kw.arg}' twice")
            given[kw.arg] = kw.value
        missing = required - given.keys()
        if missing:
            raise self.fail(node, f"{name}(...) is missing {', '.join(sorted(missing))}")
        values = {k: self.typed(v, fields[k], k, depth + 1) for k, v in given.items()}
        return _CLASSES[name](**values, lineno=node.lineno)


class _Misplaced(Exception):
    """A placeholder turned up outside an Inline payload: parse the file without the skeleton."""


def _elide(raw: bytes | mmap.mmap) -> tuple[bytes, dict[str, memoryview]]:
    """The skeleton: long base85 strings swapped for placeholders -> (skeleton, {placeholder: view})."""
    view = memoryview(raw)
    pieces: list[bytes] = []
    placeholders: dict[str, memoryview] = {}
    nonce = secrets.token_hex(8)  # unguessable: a file cannot plant a placeholder of its own
    pos = copied = 0
    while True:
        i = raw.find(_B85_MARKER, pos)
        if i < 0:
            break
        start = i + len(_B85_MARKER)
        end = raw.find(b'"', start)
        if end < 0:
            break
        pos = start
        if end - start < _ELIDE_MIN or any(raw.find(c, start, end) >= 0 for c in (b"\\", b"\n", b"\r", b"\x00")) \
                or np.frombuffer(raw, np.uint8, count=end - start, offset=start).max() >= 0x80:
            continue
        key = f"elided-payload-{nonce}-{len(placeholders)}"
        pieces.append(bytes(view[copied:start]))
        pieces.append(key.encode("ascii"))
        placeholders[key] = view[start:end]
        copied = pos = end
    if not placeholders:
        return raw, placeholders  # nothing elided: no copy of a (possibly hostile, large) file
    pieces.append(bytes(view[copied:]))
    return b"".join(pieces), placeholders


def _line_of(source: bytes | mmap.mmap, offset: int) -> int:
    return bytes(memoryview(source)[:offset]).count(b"\n") + 1


def _parse_tree(path: Path, source: bytes | mmap.mmap, limits: LoadLimits) -> ast.Module:
    """ast.parse with errors that name the line, after the budgets' pre-scan; nothing is
    compiled to code or run."""
    null = source.find(b"\x00")
    if null >= 0:
        raise UnsafeCheckpointError(f"{path}: line {_line_of(source, null)}: a null byte (not Python source)")
    prescan(path, source, limits)  # before the text is even decoded
    try:
        text = str(memoryview(source), "utf-8")
    except UnicodeDecodeError as e:
        raise UnsafeCheckpointError(f"{path}: line {_line_of(source, e.start)}: "
                                    "not UTF-8 text") from None
    cookie = re.match(r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)", "\n".join(text[:4096].splitlines()[:2]), re.M)
    if cookie and cookie.group(1).lower().replace("_", "-") not in ("utf-8", "utf8"):
        raise UnsafeCheckpointError(f"{path}: line 1: source encoding '{cookie.group(1)}' "
                                    "(a code checkpoint is UTF-8)")
    try:
        return ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise UnsafeCheckpointError(f"{path}: line {e.lineno}: not valid Python ({e.msg})") from None
    except (RecursionError, MemoryError):
        lines = text.split("\n")
        longest = max(range(len(lines)), key=lambda i: len(lines[i]))
        raise UnsafeCheckpointError(f"{path}: line {longest + 1}: too deeply nested for the parser "
                                    f"(this is the file's longest line, {len(lines[longest]):,} characters)") from None


def _walk_module(path: Path, tree: ast.Module, kind: str, placeholders: dict[str, memoryview],
                 limits: LoadLimits) -> ParsedFile:
    allowed = FILE_KINDS[kind]
    walker = _Walker(path, placeholders, limits)
    parsed = ParsedFile(path)
    for index, stmt in enumerate(tree.body):
        if index == 0 and isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            continue  # the docstring
        if isinstance(stmt, ast.ImportFrom) and stmt.module == IMPORT_MODULE and stmt.level == 0 \
                and all(a.name in CONSTRUCTOR_NAMES and a.asname is None for a in stmt.names):
            continue  # names for a person who imports the file; the loader binds nothing
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and stmt.decorator_list:
            raise walker.fail(stmt.decorator_list[0], f"a decorator on {describe(stmt)} is not allowed; a code "
                                                      "checkpoint holds only literals and cells (it is never run)")
        if not isinstance(stmt, ast.Assign):
            raise walker.refuse(stmt)
        if len(stmt.targets) != 1 or not isinstance(stmt.targets[0], ast.Name):
            raise walker.fail(stmt, "only 'NAME = value' assignments are allowed")
        name = stmt.targets[0].id
        if allowed is None:
            if not _UPPER.match(name):
                raise walker.fail(stmt, f"'{name}': variables here are UPPER_CASE names bound to literals")
            value_kind = "literal"
        elif name not in allowed:
            raise walker.fail(stmt, f"unexpected variable '{name}' (a {kind} file has {', '.join(allowed)})")
        else:
            value_kind = allowed[name]
        if name in parsed.variables:
            raise walker.fail(stmt, f"'{name}' is assigned twice")
        if value_kind == "literal":
            value = walker.literal(stmt.value, 0)
        else:
            value = walker.typed(stmt.value, value_kind, name, 0)
        parsed.variables[name] = value
        parsed.lines[name] = stmt.lineno
    if walker.found != placeholders.keys():
        raise _Misplaced()
    return parsed


def parse_file(path: str | Path, kind: str = "weights", limits: LoadLimits | None = None) -> ParsedFile:
    """Parse and validate one file of a code checkpoint. `kind`: "weights" (weights.py and shared
    cell files), "delta" (delta.py) or "literals" (config.py, vocab.py). `limits`: the budgets
    (default: `default_limits()`)."""
    limits = limits if limits is not None else default_limits()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        # map large files: payload views point into the page cache instead of a copy
        raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > (1 << 20) else path.read_bytes()
    skeleton, placeholders = _elide(raw)
    try:
        parsed = _walk_module(path, _parse_tree(path, skeleton, limits), kind, placeholders, limits)
    except _Misplaced:  # a long base85-looking string somewhere else: parse the file as it is
        del skeleton
        parsed = _walk_module(path, _parse_tree(path, raw, limits), kind, {}, limits)
    parsed.buffer = raw
    return parsed
