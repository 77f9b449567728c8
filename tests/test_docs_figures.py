"""Every measured figure in README.md and docs/ comes from a committed results file.

A figure is a number carrying a unit of speed (tokens/s, bytes/s, ms, TFLOP/s), size (KB ... GiB)
or bits per byte, in prose or in a table column whose header names such a unit. It must equal,
at the precision written, a number in a file under benchmarks/results/, or sit in a paragraph (or a
table, or the paragraph introducing it) that says "quoted" and names where it comes from. Fenced
code blocks (commands and their sample output) are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RESULTS = ROOT / "benchmarks" / "results"

NUMBER = r"(\d[\d,]*(?:\.\d+)?)"
UNIT = (r"(?:tokens/s|tok/s|bytes/s|B/s|ms\b|ms/token|TFLOP/s|KiB|MiB|GiB|KB|MB|GB|TB|bits per byte|"
        r"bits/byte|bpb|bits per char(?:acter)?|BPC)")
FIGURE = re.compile(NUMBER + r"\s?" + UNIT)
RANGE = re.compile(NUMBER + r"\s?[–-]\s?" + NUMBER + r"\s?" + UNIT)
UNIT_HEADER = re.compile(UNIT + r"|bits per byte|val bpb|test bpb", re.I)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def result_numbers() -> set[str]:
    numbers: set[str] = set()
    for path in RESULTS.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt", ".csv"):
            for match in re.finditer(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?", path.read_text(errors="replace")):
                numbers.add(match.group(0).replace(",", ""))
    return numbers


def matches(figure: str, numbers: set[str], cache: dict[int, set[str]]) -> bool:
    """`figure` ("2.017", "195,056") equals some results number rounded to its precision."""
    plain = figure.replace(",", "")
    decimals = len(plain.split(".")[1]) if "." in plain else 0
    if decimals not in cache:
        rounded = set()
        for n in numbers:
            try:
                value = float(n)
            except ValueError:
                continue
            rounded.add(f"{value:.{decimals}f}")
        cache[decimals] = rounded
    return f"{float(plain):.{decimals}f}" in cache[decimals]


def blocks_of(text: str) -> list[list[tuple[int, str]]]:
    """Paragraphs and tables: runs of non-blank lines, with their line numbers."""
    blocks: list[list[tuple[int, str]]] = [[]]
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            blocks[-1].append((number, line))
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]


def doc_figures() -> list[tuple[str, int, str, str]]:
    """(doc, line number, figure, line) of every figure outside code blocks and quoted passages:
    a paragraph that says "quoted", or a table whose header or introducing paragraph does."""
    found = []
    for doc in DOCS:
        text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), doc.read_text())
        previous_quoted = False
        for block in blocks_of(text):
            quoted = any("quoted" in line.lower() for _, line in block)
            is_table = block[0][1].startswith("|")
            if quoted or (is_table and previous_quoted):
                previous_quoted = quoted
                continue
            previous_quoted = quoted
            header: list[str] = []
            for number, line in block:
                if is_table and line.startswith("|"):
                    cells = [c.strip() for c in line.strip().strip("|").split("|")]
                    if not header:
                        header = cells
                        continue
                    if set("".join(cells)) <= set("-: "):
                        continue
                    for cell, title in zip(cells, header):
                        if UNIT_HEADER.search(title) and not FIGURE.search(cell):
                            for figure in re.findall(r"(?<![\w.])" + NUMBER + r"(?![\w.])", cell.replace("**", "")):
                                found.append((doc.name, number, figure, line))
                for match in RANGE.finditer(line):
                    found += [(doc.name, number, match.group(1), line), (doc.name, number, match.group(2), line)]
                for match in FIGURE.finditer(RANGE.sub("", line)):
                    found.append((doc.name, number, match.group(1), line))
    return found


FIGURES = doc_figures()


def test_docs_have_figures_to_check():
    assert any(doc == "README.md" for doc, *_ in FIGURES)


def test_every_figure_comes_from_a_results_file():
    numbers = result_numbers()
    cache: dict[int, set[str]] = {}
    missing = [f"{doc}:{line}: {figure} in: {text.strip()[:140]}" for doc, line, figure, text in FIGURES
               if not matches(figure, numbers, cache)]
    assert not missing, "figures with no results file (add one, or mark the line as quoted with its " \
                        "source):\n" + "\n".join(missing)


@pytest.mark.parametrize("figure,ok", [("2.017", True), ("2.02", True), ("195,056", True), ("2.018", False)])
def test_rounding_rule(figure, ok):
    assert matches(figure, {"2.0171", "195056"}, {}) is ok
