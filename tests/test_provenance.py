"""benchmarks/provenance.py: the commit label a results table shows."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import provenance  # noqa: E402

TREE = "217fa1c377110cad79430f484c9d784f29268933"


def test_short_label_keeps_the_tree_id_and_the_given_commit():
    label = f"src tree {TREE} (= git rev-parse COMMIT:src); --commit 26348a6 given by hand"
    assert provenance.short(label) == "src tree 217fa1c37711 (given: 26348a6)"
    assert provenance.short(f"src tree {TREE} (= git rev-parse COMMIT:src)") == "src tree 217fa1c37711"


def test_short_label_of_a_git_commit_is_its_first_ten_characters():
    assert provenance.short("5ef2a503266ad20ab26e913babe8fa792e62d738") == "5ef2a50326"
    assert provenance.short("no git: copied tree") == "no git: copied tree"


def test_server_load_table_shows_the_short_label():
    import server_load

    row = {"model": "m", "device": "GPU: X", "concurrency": 1, "requests": 4, "tokens_per_s": 1.0,
           "requests_per_s": 1.0, "latency_p50_ms": 1.0, "latency_p95_ms": 1.0, "ttft_p50_ms": 1.0,
           "ttft_p95_ms": 1.0, "server_cpu_ms_per_token": 1.0,
           "commit": f"src tree {TREE} (= git rev-parse COMMIT:src); --commit 26348a6 given by hand"}
    assert server_load.markdown([row])[-1].endswith("| src tree 217fa1c37711 (given: 26348a6) |")
