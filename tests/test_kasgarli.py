"""`dynlm kasgarli` end to end on a tiny parallel corpus (slow) and its input checks."""

from __future__ import annotations

import json

import pytest

from dynlm.cli import main
from dynlm.commands.kasgarli import parse_size

VERSES = {"tr": "Rahman ve Rahim olan Allah'ın adıyla. Hamd, âlemlerin Rabbi Allah'a mahsustur.",
          "en": "In the name of God, the Gracious, the Merciful. Praise be to God, Lord of the Worlds."}


@pytest.fixture
def parallel(tmp_path):
    for lang, verse in VERSES.items():
        folder = tmp_path / "parallel" / lang
        folder.mkdir(parents=True)
        for i in range(6):  # the same documents in each language
            (folder / f"surah-{i}.txt").write_text("\n".join(f"{i}.{j} {verse}" for j in range(30)) + "\n")
    return str(tmp_path / "parallel" / "{lang}")


def test_sizes_and_bad_inputs(tmp_path, capsys):
    assert parse_size("20M") == 20_000_000 and parse_size("500K") == 500_000 and parse_size("123") == 123
    assert main(["kasgarli", "--budget-bytes", "lots", "--out", str(tmp_path / "o")]) == 2
    assert main(["kasgarli", "--languages", "xx", "--out", str(tmp_path / "o")]) == 2
    assert main(["kasgarli", "--byte-preset", "standard-tiny", "--out", str(tmp_path / "o")]) == 2
    assert main(["kasgarli", "--budget-bytes", "100", "--out", str(tmp_path / "o")]) == 2
    assert "raise the budget" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_kasgarli_runs_on_cpu_with_a_small_budget(tmp_path, parallel):
    out = tmp_path / "out"
    args = ["kasgarli", "--corpus-pattern", parallel, "--languages", "tr,en", "--budget-bytes", "2048",
            "--byte-preset", "agiformer-tiny", "--batch-size", "2", "--seq-len", "32", "--vocab", "300",
            "--threshold", "6", "--out", str(out)]
    assert main(args) == 0
    report = json.loads((out / "kasgarli.json").read_text())
    assert report["steps"] == 32
    assert abs(report["standard_params"] - report["byte_params"]) / report["byte_params"] < 0.2  # matched size
    for lang in ("tr", "en"):
        entry = report["languages"][lang]
        assert entry["agiformer"]["test_bpb"] > 0 and entry["standard-bpe"]["test_bpb"] > 0
        assert entry["bpe_bytes_per_token"] > 1
    # Turkish has 2-byte characters: per character is above per byte; English is ASCII here: equal
    assert report["languages"]["tr"]["agiformer"]["test_bpc"] > report["languages"]["tr"]["agiformer"]["test_bpb"]
    assert report["languages"]["en"]["agiformer"]["test_bpc"] == report["languages"]["en"]["agiformer"]["test_bpb"]
    assert (out / "kasgarli.png").stat().st_size > 1000 and "| tr |" in (out / "kasgarli.md").read_text()
    assert main(args) == 2  # not empty: needs --force
