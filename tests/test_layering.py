"""The package's layers import one way (docs/architecture.md, "Layers"):

    core (errors, fileio, config, registry, distributed) -> nn -> models -> checkpoint
    -> data, eval, infer, memory -> train -> interop -> weights -> the API (`dynlm`), cli, commands, serve

Every `import` of a dynlm module, at the top of a file or inside a function, must go to the same
layer or a lower one, and the module graph (all imports counted) must have no cycle: an import
inside a function is only a lazy import, never a way around a cycle. Third-party imports inside
functions are allowed only for the optional or heavy dependencies listed in `LAZY_THIRD_PARTY`.
Imports under `if TYPE_CHECKING:` are annotations only and are not counted.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dynlm"

# lowest first; a module belongs to the longest prefix listed
LAYERS: list[tuple[str, ...]] = [
    ("dynlm.errors", "dynlm.output_dir", "dynlm.fileio", "dynlm.config", "dynlm.registry", "dynlm.distributed"),
    ("dynlm.nn",),
    ("dynlm.models",),
    ("dynlm.checkpoint",),
    ("dynlm.data", "dynlm.eval", "dynlm.infer", "dynlm.memory"),
    ("dynlm.train",),
    ("dynlm.interop",),
    ("dynlm.weights",),
    ("dynlm", "dynlm.cli", "dynlm.__main__", "dynlm.commands", "dynlm.serve"),
]

# optional dependencies (extras) and heavy imports kept off the import of a light module
LAZY_THIRD_PARTY = {
    "gguf": "optional (the hf extra): only to read .gguf files",
    "transformers": "optional (the hf extra)",
    "sentencepiece": "optional (the hf extra)",
    "matplotlib": "optional (the plot extra): loss curves and analysis plots",
    "onnx": "optional (the onnx extra): to write ONNX files",
    "onnxruntime": "optional (the onnx extra): `OnnxDecoder`",
    "jinja2": "chat templates, rendered only when a template is used",
    "torch": "kept out of the NumPy-only code paths and of `dynlm --help`",
    "numpy": "kept out of `dynlm --help`",
    "tqdm": "progress bars, only on long work",
    "tokenizers": "kept out of `dynlm --help`",
    "safetensors": "kept out of `dynlm --help`",
    "omegaconf": "kept out of `dynlm --help`",
    "torch.distributed.checkpoint": "FSDP state dicts, only for sharded runs",
    "torch.utils.tensorboard": "optional metrics sink",
    "uvicorn": "optional server",
    "fastapi": "optional server",
    "httpx": "optional (the serve extra): the `dynlm chat` client",
    "huggingface_hub": "optional",
    "yaml": "optional",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer"
    return best


def _type_checking_nodes(tree: ast.Module) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    return skipped


def imports_of(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, inside a function) for every import outside TYPE_CHECKING blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    skipped = _type_checking_nodes(tree)
    own = module_name(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, lazy) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names_only = False  # `from dynlm import distributed` imports the submodule, not the package's names
            for alias in node.names:
                candidate = f"{module}.{alias.name}"
                if (SRC / Path(*candidate.split("."))).with_suffix(".py").is_file() or \
                        (SRC / Path(*candidate.split(".")) / "__init__.py").is_file():
                    found.append((candidate, node.lineno, lazy))
                else:
                    names_only = True
            if names_only:
                found.append((module, node.lineno, lazy))
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


def graph() -> dict[str, set[str]]:
    modules = {module_name(f) for f in FILES}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for file in FILES:
        source = module_name(file)
        for target, _, _ in imports_of(file):
            if target in modules and target != source and target != "dynlm":
                edges[source].add(target)
    return edges


def test_every_module_is_in_a_layer():
    for file in FILES:
        layer_of(module_name(file))


@pytest.mark.parametrize("file", FILES, ids=[module_name(f) for f in FILES])
def test_imports_go_down_the_layers(file):
    source = module_name(file)
    problems = []
    for target, line, lazy in imports_of(file):
        where = f"{file.relative_to(SRC)}:{line}"
        if target == "dynlm" or target.startswith("dynlm."):
            if layer_of(target) > layer_of(source):
                problems.append(f"{where}: {source} (layer {layer_of(source)}) imports {target} "
                                f"(layer {layer_of(target)}){' inside a function' if lazy else ''}")
        elif lazy and target.split(".")[0] not in sys.stdlib_module_names and target not in LAZY_THIRD_PARTY \
                and target.split(".")[0] not in LAZY_THIRD_PARTY:
            problems.append(f"{where}: lazy import of '{target}', which is not a listed optional dependency")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_what_it_must(tmp_path):
    """The parser behind the tests above finds lazy, relative and `from package import module`
    imports, and skips TYPE_CHECKING blocks (a checker that misses them could never fail)."""
    probe = PACKAGE / "nn" / "attention.py"
    found = {(t, lazy) for t, _, lazy in imports_of(probe)}
    assert ("dynlm.nn.cache", False) in found
    text = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dynlm.weights import store\n"
            "from . import cache\ndef f():\n    from dynlm import checkpoint\n")
    fake = PACKAGE / "nn" / "_layering_probe.py"
    fake.write_text(text)
    try:
        got = {(t, lazy) for t, _, lazy in imports_of(fake)}
    finally:
        fake.unlink()
    assert ("dynlm.nn.cache", False) in got and ("dynlm.checkpoint", True) in got
    assert not any("weights" in t for t, _ in got)
    assert layer_of("dynlm.checkpoint") > layer_of("dynlm.nn.attention")
