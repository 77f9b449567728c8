"""benchmarks/gpu_thl.py speed part: the batch sweep's bookkeeping (out of memory stops a variant,
the time budget stops the rest, the ratios at equal batch and best against best), without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_thl  # noqa: E402

# tokens/s of each (preset, batch); THL runs out of memory above batch 64
SPEEDS = {("std", 16): 100.0, ("std", 64): 400.0, ("std", 256): 800.0, ("thl", 16): 10.0, ("thl", 64): 120.0}


def fake_train_speed(preset, device, batch, seq_len, steps, vocab, warmup=1, profile=False, timed=None, **overrides):
    if (preset, batch) not in SPEEDS:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    result = {"preset": preset, "batch": batch, "seq_len": seq_len, "tokens_per_s": SPEEDS[preset, batch],
              "seconds_per_step": batch * seq_len / SPEEDS[preset, batch], "parameters": 1e6, "peak_bytes": None,
              **overrides}
    timed(result)
    return result


def sweep(monkeypatch, budget: float) -> dict:
    monkeypatch.setattr(gpu_thl, "train_speed", fake_train_speed)
    cfg = {"std": "std", "thl": "thl", "seq": 8, "steps": 1, "vocab": 16, "speed_batches": [256, 16, 64],
           "speed_modes": ["reduce-overhead"], "speed_seconds": budget}
    report: dict = {}
    gpu_thl.part_speed(cfg, torch.device("cpu"), report)
    return report


def test_out_of_memory_stops_only_that_variant_and_ratios_are_per_batch_and_best(monkeypatch):
    report = sweep(monkeypatch, budget=1e9)
    rows = [(r["preset"], r["batch"], r.get("tokens_per_s"), r.get("error"), r.get("skipped"))
            for r in report["speed"]]
    assert [r[:2] for r in rows] == [("std", 16), ("thl", 16), ("std", 64), ("thl", 64), ("std", 256),
                                     ("thl", 256)]
    assert rows[5][3] == "out of memory" and report["speed"][5]["out_of_memory"]
    summary = report["speed_summary"]
    assert summary["equal_batch"] == {"16": pytest.approx(0.1), "64": pytest.approx(0.3)}
    assert summary["best"]["std"]["batch"] == 256 and summary["best"]["thl"]["batch"] == 64
    assert summary["best_over_best"] == pytest.approx(120 / 800)
    assert report["thl_fastest"] == {"compile_step": True, "compile_mode": "reduce-overhead"}
    page = "\n".join(gpu_thl.speed_markdown(report))
    assert "**0.150x**" in page and "batch 16 0.100x, batch 64 0.300x" in page


def test_a_variant_out_of_memory_is_not_tried_at_larger_batches(monkeypatch):
    SPEEDS_WITHOUT_THL_64 = {k: v for k, v in SPEEDS.items() if k != ("thl", 64)}
    monkeypatch.setattr(sys.modules[__name__], "SPEEDS", SPEEDS_WITHOUT_THL_64)
    report = sweep(monkeypatch, budget=1e9)
    thl = [r for r in report["speed"] if r["preset"] == "thl"]
    assert thl[1]["error"] == "out of memory"
    assert thl[2]["skipped"] == "out of memory at batch 64"


def test_the_time_budget_skips_every_later_row(monkeypatch):
    report = sweep(monkeypatch, budget=-1.0)
    assert all(r["skipped"].startswith("time budget spent") for r in report["speed"])
    assert "best_over_best" not in report["speed_summary"] and report["thl_fastest"] is None
