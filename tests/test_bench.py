"""`dynlm bench`: the FLOPs formula, the peak table, variants, and a CPU smoke run end to end."""

from __future__ import annotations

import json

import pytest
import torch

import dynlm
from dynlm.cli import main
from dynlm.errors import ConfigError
from dynlm.eval.flops import mfu, peak_flops
from dynlm.train.bench import BenchConfig, expand, parse_compare


def test_mfu_formula_reproduces_nanogpt_figures():
    """nanoGPT's GPT-2 124M on an H100: 448K tokens/s = 38.7% MFU, 475K = 41.1% (989 TFLOP/s)."""
    with torch.device("meta"):
        model = dynlm.build_model("gpt2-small-like")
    flops_per_token = model.flops_per_token(1024)
    assert mfu(448e3, flops_per_token, 989e12) == pytest.approx(0.387, abs=0.001)
    assert mfu(475e3, flops_per_token, 989e12) == pytest.approx(0.411, abs=0.001)
    assert mfu(1e6, flops_per_token, None) is None


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756),
                                          ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312),
                                          ("NVIDIA GeForce RTX 3090", None)])
def test_peak_table(monkeypatch, name, tflops):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = peak_flops(torch.device("cuda"))
    assert peak == (tflops * 1e12 if tflops else None)
    assert ("unknown" in source) == (tflops is None)
    assert peak_flops(torch.device("cpu"))[0] is None


def test_compare_expands_to_every_combination():
    configs = expand(BenchConfig(), parse_compare(["compile=on,off", "batch=16,32"]))
    assert [(c.compile, c.batch) for c in configs] == [(True, 16), (True, 32), (False, 16), (False, 32)]
    assert configs[0].label == "compile=on batch=16"
    with pytest.raises(ConfigError, match="cannot compare 'bach'.*batch"):
        expand(BenchConfig(), parse_compare(["bach=1,2"]))
    with pytest.raises(ConfigError, match="bad --compare"):
        parse_compare(["compile"])


def test_smoke_run_writes_json_and_markdown(tmp_path, capsys):
    assert main(["bench", "--smoke", "--compare", "batch=2,4", "--decode-contexts", "8,32", "--out",
                 str(tmp_path)]) == 0
    suite = json.loads((tmp_path / "bench.json").read_text())
    assert suite["device_type"] == "cpu" and suite["peak_flops"] is None
    first, second = suite["results"]
    assert first["train"]["tokens_per_s"] > 0 and first["train"]["mfu"] is None
    assert second["train"]["ratio"] == pytest.approx(second["train"]["tokens_per_s"] / first["train"]["tokens_per_s"])
    decode = first["decode"]
    assert [d["context"] for d in decode] == [8, 32]
    # the KV cache grows with the context: 2 layers x (K, V) x kv_heads x head_dim x fp32 per position
    cfg = dynlm.build_model("standard-tiny").config
    per_position = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4
    assert decode[0]["state_bytes"] == per_position * (8 + 8) and decode[1]["state_bytes"] == per_position * (32 + 8)
    markdown = (tmp_path / "bench.md").read_text()
    assert "| batch=2 |" in markdown and "state (KV) bytes" in markdown and "no MFU on cpu" in markdown
    assert markdown.strip() in capsys.readouterr().out
