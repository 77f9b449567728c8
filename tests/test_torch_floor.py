"""The torch version pyproject.toml asks for is the true floor: every torch API dynlm uses that is
younger than torch 2.0 is listed here with the release that introduced it, each must still be
used in the source (so the list cannot go stale silently), and the declared minimum must be at
least the newest of them. To check the floor itself on a machine with network access:

    python -m venv /tmp/floor && /tmp/floor/bin/pip install "torch==<floor>" -e ".[dev]"
    /tmp/floor/bin/python -m pytest -q
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]

# (API, first torch release with it, a regex finding its use in src/)
FLOORS = [
    ("F.scaled_dot_product_attention(enable_gqa=...)", (2, 5), r"enable_gqa="),
    ("torch.nn.utils.get_total_norm", (2, 6), r"get_total_norm\("),
    ("torch.distributed.fsdp.fully_shard (FSDP2)", (2, 6), r"from torch\.distributed\.fsdp import .*fully_shard"),
    ("torch.nn.attention.sdpa_kernel", (2, 3), r"from torch\.nn\.attention import .*sdpa_kernel"),
    ("torch.distributed.checkpoint.state_dict", (2, 2), r"torch\.distributed\.checkpoint\.state_dict"),
]


def declared_floor() -> tuple[int, ...]:
    """The torch lower bound in [project] dependencies (the one line that names torch there)."""
    text = (ROOT / "pyproject.toml").read_text()
    dependencies = text[text.index("dependencies = ["): text.index("]", text.index("dependencies = ["))]
    specs = re.findall(r'"torch\s*([^"]*)"', dependencies)
    assert len(specs) == 1, f"expected one torch requirement in [project] dependencies, found {specs}"
    match = re.search(r">=\s*(\d+)\.(\d+)", specs[0])
    assert match, f"torch has no lower bound in pyproject.toml: {specs[0]!r}"
    return int(match.group(1)), int(match.group(2))


def source_text() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "src" / "dynlm").rglob("*.py")))


def test_declared_floor_covers_every_listed_api():
    newest = max(version for _, version, _ in FLOORS)
    assert declared_floor() >= newest, f"pyproject.toml says torch>={declared_floor()}, dynlm needs {newest}"


def test_every_listed_api_is_still_used():
    text = source_text()
    unused = [api for api, _, pattern in FLOORS if not re.search(pattern, text)]
    assert not unused, f"no longer used (drop them from FLOORS, maybe lower the floor): {unused}"


def test_the_installed_torch_has_them():
    assert "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")  # a builtin: no signature
    assert callable(torch.nn.utils.get_total_norm)
    from torch.distributed.fsdp import fully_shard  # noqa: F401
    from torch.nn.attention import sdpa_kernel  # noqa: F401
