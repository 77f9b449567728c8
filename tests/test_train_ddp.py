"""Data parallel training: 2 CPU processes (gloo) launched by torchrun give the losses of a
single-process run with the same global batch, and only rank 0 writes. FSDP2 (sharded
parameters and optimizer state) the same, resume included."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dynlm.train import train
from dynlm.train.trainer import read_metrics
from test_train import corpus_dir, tiny_run  # noqa: F401  (a fixture, imported to share it)


def _losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["event"] == "train"]


def torchrun(*args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dynlm", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("grad_accum", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_two_process_ddp_matches_single_process(tmp_path, corpus_dir, grad_accum):  # noqa: F811
    single = train(tiny_run(tmp_path, corpus_dir, "single", batch_size=8, grad_accum=grad_accum, max_steps=6,
                            eval_every=3, save_every=3))

    cfg = tiny_run(tmp_path, corpus_dir, "ddp", batch_size=8, grad_accum=grad_accum, max_steps=6, eval_every=3,
                   save_every=3)
    config_file = tmp_path / "ddp.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    torchrun(str(config_file))

    ddp = tmp_path / "runs" / "ddp"
    assert not (tmp_path / "runs" / "ddp-2").exists()  # both ranks used one folder
    assert [r["step"] for r in read_metrics(ddp) if r["event"] == "train"] == [1, 2, 3, 4, 5, 6]  # rank 0 only
    assert _losses(ddp) == pytest.approx(_losses(single), rel=1e-5)
    val = lambda d: [r["val_bpb"] for r in read_metrics(d) if r["event"] == "eval"]  # noqa: E731
    assert val(ddp) == pytest.approx(val(single), rel=1e-5)
    assert (ddp / "step-000006" / "trainer" / "state.json").is_file()


@pytest.mark.slow
def test_two_process_fsdp_matches_single_process_and_resumes(tmp_path, corpus_dir):  # noqa: F811
    import dynlm

    # a constant schedule after warm-up: the FSDP run stops at 4 and resumes to 6, and a cosine's
    # learning rates depend on max_steps (4 vs 6 would differ from the third update on)
    single = train(tiny_run(tmp_path, corpus_dir, "single", batch_size=8, max_steps=6, eval_every=3, save_every=3,
                            final_eval=["val"], schedule="constant"))
    cfg = tiny_run(tmp_path, corpus_dir, "fsdp", batch_size=8, max_steps=4, eval_every=3, save_every=3,
                   final_eval=["val"], fsdp=True, schedule="constant")
    config_file = tmp_path / "fsdp.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    torchrun(str(config_file))
    fsdp = tmp_path / "runs" / "fsdp"
    torchrun("--resume", str(fsdp), "train.max_steps=6")  # from step 4: gathered optimizer state re-sharded
    assert _losses(fsdp) == pytest.approx(_losses(single), rel=1e-5)  # the resumed steps 5 and 6 included
    assert len(_losses(fsdp)) == 6
    # full (unsharded) weights in the checkpoints: they load in one process
    model = dynlm.load_pretrained(fsdp / "last")
    assert model.config.hidden_size == 32


@pytest.mark.slow
def test_distributed_benchmark_smoke_matches_one_process(tmp_path):
    """benchmarks/gpu_distributed.py --smoke launches torchrun itself (gloo, 2 CPU processes) and
    reports DDP and FSDP2 (a tied-embedding qwen2 shape) losses equal to 1 process at the same
    global batch, with the scaling figures and the loss plot."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_distributed.py"
    runs = "gpt2-small-like:single,gpt2-small-like:ddp,0.5b:single,0.5b:fsdp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), "--smoke", "--runs", runs, "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_distributed.json").read_text())
    assert [r.get("error") for r in report["runs"]] == [None] * 4
    assert [len(r["losses"]) for r in report["runs"]] == [6] * 4
    for model, strategy in (("gpt2-small-like", "ddp"), ("0.5b", "fsdp")):
        entry = report["summary"][model][strategy]
        assert entry["max_abs_loss_delta"] < 1e-4, (model, strategy, entry)
        assert entry["scaling_efficiency"] > 0
    assert (tmp_path / "out" / "gpu_distributed.md").is_file()
    assert (tmp_path / "out" / "gpu_distributed_loss.png").is_file()
    assert not (tmp_path / "work" / "runs" / "gpt2-small-like-ddp").exists()  # checkpoints are not kept


def test_distributed_benchmark_figures():
    """The benchmark's arithmetic: warm-up steps left out of tokens/s; efficiency against twice one
    process; the loss delta taken step by step."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_distributed.py"
    spec = importlib.util.spec_from_file_location("gpu_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    steps = [{"step": 1, "loss": 3.0, "seconds": 9.0}, {"step": 2, "loss": 2.0, "seconds": 1.0},
             {"step": 3, "loss": 1.0, "seconds": 1.0}]
    single = bench.measure({"steps": steps, "peak_bytes": [None]}, warmup=1, tokens_per_step=100)
    assert single["tokens_per_s"] == pytest.approx(100.0) and single["timed_steps"] == 2
    runs = [{"model": "m", "strategy": "single", "processes": 1, **single},
            {"model": "m", "strategy": "ddp", "processes": 2, "tokens_per_s": 180.0, "losses": [3.0, 2.1, 0.95]}]
    summary = bench.summarize(runs)["m"]["ddp"]
    assert summary["scaling_efficiency"] == pytest.approx(0.9)
    assert summary["max_abs_loss_delta"] == pytest.approx(0.1)
