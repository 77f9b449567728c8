"""The safe loader: a hostile weights.py is refused with an error naming the line, and nothing in
it runs. Two independent witnesses, neither of which stops what it watches (so a loader that ran
the file would be caught, not shielded): each hostile file tries to create a marker file, and an
audit hook records every code object executed whose file is the checkpoint's or whose constants
name the marker. `test_the_witnesses_see_a_file_that_runs` shows both catch a file that is run."""

from __future__ import annotations

import ast
import inspect
import re
import runpy
import shutil
import sys
import zlib
from pathlib import Path

import pytest
import torch

import dynlm
from dynlm.errors import CheckpointError
from dynlm.weights import export_code_checkpoint, safe_loader, store
from dynlm.weights import format as fmt
from dynlm.weights.safe_loader import UnsafeCheckpointError, parse_file
from dynlm.weights.store import CodeCheckpoint


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = dynlm.build_model("standard-tiny", vocab_size=64, hidden_size=32, num_layers=1, intermediate_size=64)
    out = tmp_path_factory.mktemp("code") / "code"
    export_code_checkpoint(model, out, literal_max=64)
    return out


@pytest.fixture
def code(exported, tmp_path) -> Path:
    dst = tmp_path / "code"
    shutil.copytree(exported, dst)
    return dst


class ExecutionWitness:
    """An audit hook (hooks cannot be removed: this one is installed once and reports only while
    `watching`) recording the code objects executed that come from `folder` or mention `needle`."""

    def __init__(self):
        self.watching: tuple[str, str] | None = None
        self.seen: list[str] = []
        sys.addaudithook(self.hook)

    def hook(self, event: str, args: tuple) -> None:
        if self.watching is None or event != "exec" or not args or not hasattr(args[0], "co_filename"):
            return
        folder, needle = self.watching
        code = args[0]
        constants = [c for c in code.co_consts if isinstance(c, str)]
        if code.co_filename.startswith(folder) or any(needle in c for c in constants):
            self.seen.append(f"{code.co_filename}:{code.co_firstlineno}")


WITNESS = ExecutionWitness()


@pytest.fixture
def no_exec(code, tmp_path):
    """Records what runs from the checkpoint folder (or names the marker) during the test."""
    WITNESS.seen.clear()
    WITNESS.watching = (str(code), str(tmp_path / "MARKER"))
    yield WITNESS
    WITNESS.watching = None
    assert not WITNESS.seen, f"code from the checkpoint ran: {WITNESS.seen}"


def weights_text(code: Path) -> str:
    return (code / "weights.py").read_text()


def line_of(text: str, needle: str) -> int:
    return text[: text.index(needle)].count("\n") + 1


def refuse(code: Path, marker: Path, line: int | None, message: str = "") -> str:
    """Loading must fail, name the line, and leave no marker behind (with the `no_exec` fixture,
    nothing from the file may have been executed either)."""
    with pytest.raises(CheckpointError) as info:
        CodeCheckpoint(code).arrays()
    text = str(info.value)
    if line is not None:
        assert f"weights.py: line {line}:" in text, text
    if message:
        assert re.search(message, text), text
    assert not marker.exists(), "the hostile file ran"
    with pytest.raises(CheckpointError):  # the public entry point refuses it too
        dynlm.load_pretrained(code)
    assert not marker.exists()
    return text


# -- statements and expressions outside the grammar, each trying to touch the marker ----------------

HOSTILE_TOP = {
    "import": ("import os\nos.system('touch {m}')\n", "import os", r"an import of 'os'"),
    "from_import": ("from os import system\nsystem('touch {m}')\n", "from os", r"an import of 'os'"),
    "dunder_import": ("__import__('os').system('touch {m}')\n", "__import__", r"call to '.system'|expression"),
    "exec": ("exec(\"open('{m}', 'w')\")\n", "exec(", r"expression statement"),
    "eval_in_value": ("MODEL = eval(\"open('{m}', 'w')\")\n", "MODEL = eval", r"a call to 'eval'"),
    "decorator": ("@__import__('os').system\ndef f(): pass\n", "@__import__", r"decorator"),
    "class_body": ("class X:\n    open('{m}', 'w')\n", "class X", r"class definition"),
    "function": ("def f():\n    open('{m}', 'w')\n", "def f", r"function definition"),
    "lambda": ("MODEL = (lambda: open('{m}', 'w'))()\n", "MODEL = (lambda", r"call|lambda"),
    "comprehension": ("MODEL = [open('{m}', 'w') for _ in range(1)]\n", "MODEL = [open", r"comprehension"),
    "fstring": ("MODEL = f\"{{open('{m}', 'w')}}\"\n", "MODEL = f", r"f-string"),
    "walrus": ("MODEL = (x := open('{m}', 'w'))\n", "MODEL = (x", r"assignment expression"),
    "attribute_chain": ("MODEL = ''.__class__.__mro__[1].__subclasses__()\n", "MODEL = ''", r"call|attribute"),
    "builtins_rebind": ("__builtins__ = {{}}\n", "__builtins__", r"unexpected variable"),
    "augassign": ("MODEL += 1\n", "MODEL +=", r"augmented assignment"),
    "if_statement": ("if True:\n    open('{m}', 'w')\n", "if True", r"'if' statement"),
    "with_statement": ("with open('{m}', 'w'):\n    pass\n", "with open", r"'with' statement"),
    "while": ("while False:\n    pass\n", "while False", r"'while' statement"),
    "try": ("try:\n    pass\nexcept Exception:\n    pass\n", "try:", r"'try' statement"),
    "global": ("global X\n", "global X", r"'global'"),
    "delete": ("del MODEL\n", "del MODEL", r"'del'"),
    "binop_huge": ("MODEL = [0.0] * 10**9\n", "MODEL = [0.0]", r"arithmetic"),
    "set_literal": ("MODEL = {{1, 2}}\n", "MODEL = {{1", r"a set"),
    "bytes": ("MODEL = b'abc'\n", "MODEL = b'", r"bytes literal"),
    "complex": ("MODEL = 1j\n", "MODEL = 1j", r"complex"),
    "name": ("MODEL = open\n", "MODEL = open", r"the name 'open'"),
    "subscript": ("MODEL = CELLS[0]\n", "MODEL = CELLS", r"subscript"),
    "starred_call": ("CELLS = [Cell(*[1, 2])]\n", "CELLS = [Cell(*", r"positional|starred"),
    "kwargs_call": ("CELLS = [Cell(**{{'name': 'x'}})]\n", "CELLS = [Cell(**", r"'\*\*' unpacking"),
    "other_call_in_cells": ("CELLS = [open('{m}', 'w')]\n", "CELLS = [open", r"a call to 'open'"),
    "dict_unpack": ("MODEL = {{**{{}}}}\n", "MODEL = {{**", r"'\*\*' unpacking"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_TOP))
def test_hostile_statements_refused_and_nothing_runs(case, code, tmp_path, no_exec):
    marker = tmp_path / "MARKER"
    snippet, needle, message = HOSTILE_TOP[case]
    snippet = snippet.format(m=marker)
    text = weights_text(code)
    # put the hostile code in place of the FORMAT line (and before CELLS for the *_call cases)
    anchor = 'FORMAT = "dynlm-weights-as-code"\n'
    if snippet.startswith(("CELLS =", "MODEL =")):
        name = snippet.split(" ", 1)[0]
        start = text.index(f"{name} = ")
        end = text.index("\n\n", start) + 1 if name == "MODEL" else len(text)
        text = text[:start] + snippet + text[end:]
    else:
        text = text.replace(anchor, snippet + anchor)
    (code / "weights.py").write_text(text)
    refuse(code, marker, line_of(text, needle.format(m=marker).replace("{{", "{")), message)


def test_cell_fields_refused(code, tmp_path, no_exec):
    marker = tmp_path / "MARKER"
    original = weights_text(code)
    cases = [
        ('note=""', f'note=__import__("subprocess").call(["touch", "{marker}"])', "a call to '.call'"),
        ('note=""', "note=f\"{open('x')}\"", "f-string"),
        ('note=""', 'note="".join([])', "a call to '.join'"),
        ('note=""', 'evil=1', "has no argument 'evil'"),
        ('dtype="float32"', 'dtype="float128"', "dtype must be one of"),
        ('dtype="float32"', 'dtype=open', "the name 'open'"),
        ("shape=(32,)", "shape=(-32,)", "non-negative"),
        ("shape=(32,)", "shape=(10**12,)", "arithmetic"),
    ]
    for old, new, message in cases:
        text = original.replace(old, new, 1)
        assert text != original
        (code / "weights.py").write_text(text)
        refuse(code, marker, line_of(text, new), message)


@pytest.mark.parametrize("case", ["import", "exec", "with_statement", "other_call_in_cells", "comprehension"])
def test_the_witnesses_see_a_file_that_runs(case, code, tmp_path):
    """Running a hostile file for real (as a trusting `import` would) creates the marker and is
    recorded by the audit hook: the checks in the tests above can fail."""
    marker = tmp_path / "MARKER"
    snippet = HOSTILE_TOP[case][0].format(m=marker)
    anchor = 'FORMAT = "dynlm-weights-as-code"\n'
    text = weights_text(code).replace(anchor, snippet + anchor)
    (code / "weights.py").write_text(text)
    WITNESS.seen.clear()
    WITNESS.watching = (str(code), str(marker))
    try:
        runpy.run_path(str(code / "weights.py"))
    except Exception:  # the marker is made before anything else can fail
        pass
    finally:
        WITNESS.watching = None
    assert marker.exists() and WITNESS.seen


def test_huge_literals_refused_before_parsing(code, tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    monkeypatch.setenv("DYNLM_LOAD_LIMITS", "tokens=100000")
    text = weights_text(code)
    huge = "MODEL = [" + "0," * 100_000 + "]\n"
    start = text.index("MODEL = ")
    end = text.index("\n\n", start) + 1
    text = text[:start] + huge + text[end:]
    (code / "weights.py").write_text(text)
    refuse(code, marker, line_of(text, "MODEL = ["), r"Python tokens, at least \(\d[\d,]*\) exceeds the loader's limit "
           "tokens=100,000")


def test_literal_limit(code, tmp_path, monkeypatch):
    monkeypatch.setattr(safe_loader, "MAX_LITERAL_VALUES", 10)
    text = weights_text(code)
    refuse(code, tmp_path / "MARKER", line_of(text, "data=Literal("), "a Literal of 32 values")


def test_deep_nesting_refused(code, tmp_path):
    marker = tmp_path / "MARKER"
    original = weights_text(code)
    start = original.index("MODEL = ")
    end = original.index("\n\n", start) + 1
    for nested, message in [("[" * 40 + "]" * 40, r"bracket depth \(40\) exceeds the loader's limit depth=32"),
                            ("[" * 300 + "]" * 300, r"bracket depth \(300\)"),
                            ("{'a': " * 33 + "1" + "}" * 33, "nesting deeper than 32"),
                            ("-" * 200_000 + "1", "too deeply nested for the parser|not valid Python")]:
        text = original[:start] + "MODEL = " + nested + "\n" + original[end:]
        (code / "weights.py").write_text(text)
        refuse(code, marker, line_of(text, "MODEL = "), message)


def test_not_utf8_null_bytes_and_encoding_cookie(code, tmp_path):
    marker = tmp_path / "MARKER"
    raw = (code / "weights.py").read_bytes()
    for bad, needle, message in [(b"\xff\xfe", b"\xff", "not UTF-8"), (b"\x00", b"\x00", "a null byte"),
                                 (b"# -*- coding: utf-7 -*-\n", b"# -*-", "source encoding")]:
        data = bad + raw if needle == b"# -*-" else raw.replace(b'FORMAT = "', b'FORMAT = "' + bad, 1)
        (code / "weights.py").write_bytes(data)
        line = data[: data.index(needle)].count(b"\n") + 1
        refuse(code, marker, line, message)


def test_duplicates_refused(code, tmp_path):
    marker = tmp_path / "MARKER"
    text = weights_text(code)
    (code / "weights.py").write_text(text + 'FORMAT = "again"\n')
    refuse(code, marker, text.count("\n") + 1, "assigned twice")
    start = text.index("    Cell(\n")
    end = text.index("    Cell(\n", start + 1)
    doubled = text[:end] + text[start:end] + text[end:]
    (code / "weights.py").write_text(doubled)
    refuse(code, marker, None, "appears twice")


# -- payloads: bad base85, wrong hash, shape / dtype mismatches, bombs ------------------------------


def _inline_cell(text: str) -> tuple[int, int]:
    """(start, end) of the first b85 string's text."""
    start = text.index('b85="', text.index("CELLS = [")) + 5
    return start, text.index('"', start)


def test_bad_base85_refused(code, tmp_path):
    text = weights_text(code)
    start, end = _inline_cell(text)
    broken = text[:start + 7] + "." + text[start + 8:]
    (code / "weights.py").write_text(broken)
    message = refuse(code, tmp_path / "MARKER", None, r"bad base85 character '\.'")
    assert "cell 'model.embed_tokens.weight'" in message
    truncated = text[:start] + text[start:end - 3] + text[end:]  # the planes no longer add up
    (code / "weights.py").write_text(truncated)
    refuse(code, tmp_path / "MARKER", None, "planes declare|truncated")


def test_wrong_hash_refused(code, tmp_path):
    text = weights_text(code)
    digest = re.search(r'sha256="([0-9a-f]{64})"', text).group(1)
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    text = text.replace(digest, other, 1)
    (code / "weights.py").write_text(text)
    message = refuse(code, tmp_path / "MARKER", None, "sha256 mismatch")
    sha_line = text[: text.index(other)].count("\n") + 1
    assert f"line {sha_line - 4}:" in message  # the line of its Cell(
    assert "dynlm weights rehash" in message


EMBED_F32 = 'shape=(64, 32),\n        dtype="float32"'


def test_shape_and_dtype_mismatch_refused(code, tmp_path):
    original = weights_text(code)
    literal_shape = re.search(r"shape=\((\d+),\),\n        dtype=\"float32\"", original)
    n = int(literal_shape.group(1))
    for old, new, message in [
        (literal_shape.group(0), literal_shape.group(0).replace(f"({n},)", f"({n + 1},)"), "Literal holds"),
        ("shape=(64, 32)", "shape=(64, 31)", "byte plane|holds"),
        (EMBED_F32, EMBED_F32.replace("float32", "float16"), "4 byte planes for dtype float16"),
        (EMBED_F32, EMBED_F32.replace("float32", "int32"), "sha256 mismatch"),
    ]:
        assert old in original, old
        (code / "weights.py").write_text(original.replace(old, new, 1))
        refuse(code, tmp_path / "MARKER", None, message)


def test_deflate_bomb_refused(code, tmp_path):
    """A zlib plane that inflates far past the tensor's size is stopped one byte past it."""
    text = weights_text(code)
    start = text.index('name="model.embed_tokens.weight"')
    planes_start = text.index("planes=", start)
    b85_end = text.index('"', text.index('b85="', start) + 5) + 1
    numel = 64 * 32
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    payload = fmt.b85encode(bomb + bytes(3 * numel)).tobytes().decode()
    forged = (f'planes=(("zlib", {len(bomb)}), ("raw", {numel}), ("raw", {numel}), ("raw", {numel})),\n'
              f'            b85="{payload}"')
    (code / "weights.py").write_text(text[:planes_start] + forged + text[b85_end:])
    refuse(code, tmp_path / "MARKER", None, "inflates past|holds more than the 2048 bytes")


# -- paths --------------------------------------------------------------------------------------------


def test_ref_and_shared_paths_cannot_leave_the_folder(code, tmp_path):
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"")
    original = weights_text(code)
    start = original.index("data=Inline(")
    end = original.index("\n        ),\n", start) + len("\n        ),\n") - 2
    cases = [
        ('Ref("../../../../etc/passwd", "x")', "leads outside"),
        ('Ref("/etc/passwd", "x")', "must be relative"),
        ('Ref("..", "x")', "leads outside|missing"),
        ('Shared("../../../../../etc/passwd.py", "x")', "leads outside"),
        ('Shared("/etc/x.py", "x")', "must be relative"),
    ]
    for payload, message in cases:
        text = original[:start] + "data=" + payload + original[end:]
        (code / "weights.py").write_text(text)
        refuse(code, tmp_path / "MARKER", None, message)
    (code / "link.safetensors").symlink_to(outside)  # a symlink inside that points outside
    text = original[:start] + 'data=Ref("link.safetensors", "x")' + original[end:]
    (code / "weights.py").write_text(text)
    refuse(code, tmp_path / "MARKER", None, "leads outside")


# -- what is accepted ------------------------------------------------------------------------------


def test_valid_file_parses_without_running(code, no_exec):
    arrays = CodeCheckpoint(code).arrays()
    assert arrays and all(a.size for a in arrays.values())


def test_payload_lookalike_in_a_note_is_parsed_exactly(code):
    """A note that contains `b85="..."` makes the skeleton parse fall back to a full parse; the
    result is the same."""
    ckpt = CodeCheckpoint(code)
    name = next(iter(ckpt.cells))
    decoy = 'b85="' + "A" * 400 + '"'
    text = weights_text(code).replace('note=""', f"note='{decoy}'", 1)
    (code / "weights.py").write_text(text)
    again = CodeCheckpoint(code)
    assert again.cells[name].note == decoy
    assert (again.array(name) == ckpt.array(name)).all()


def test_payload_lookalike_cannot_hide_code(code, tmp_path):
    """Code after a comment holding a payload-like string is still seen and refused."""
    marker = tmp_path / "MARKER"
    text = weights_text(code)
    hostile = "# b85=\"" + "A" * 400 + "\"\nimport os\n"
    text = text.replace('FORMAT = "', hostile + 'FORMAT = "', 1)
    (code / "weights.py").write_text(text)
    refuse(code, marker, line_of(text, "import os"), "an import of 'os'")


def test_trusted_import_still_works(code, monkeypatch):
    """The file stays valid Python: a person who trusts it can import it."""
    monkeypatch.syspath_prepend(str(code))
    import importlib

    module = importlib.import_module("weights")
    try:
        assert module.CELLS[0].name == CodeCheckpoint(code).cells[next(iter(CodeCheckpoint(code).cells))].name
    finally:
        monkeypatch.delitem(__import__("sys").modules, "weights")


def test_loader_modules_never_call_exec_eval_or_import_by_name():
    for module in (safe_loader, store, fmt):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("exec", "eval", "compile", "__import__"), module.__name__
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert "importlib" not in names and "runpy" not in names, module.__name__


def test_parse_file_kinds(code):
    config = parse_file(code / "config.py", "literals")
    assert config.variables["CONFIG"]["dynlm"]["architecture"] == "standard"
    with pytest.raises(UnsafeCheckpointError, match="unexpected variable 'CONFIG'"):
        parse_file(code / "config.py", "weights")
