"""Data parallel training: 2 CPU processes (gloo) launched by torchrun give the losses of a
single-process run with the same global batch, and only rank 0 writes. FSDP2 (sharded
parameters and optimizer state) the same, resume included."""

from __future__ import annotations

import json
import os
import re
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
    # NCCL_NVLS_ENABLE=0: NVLink multicast off, as the lent two-GPU machines need
    env = {"NCCL_NVLS_ENABLE": "0", **os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "dynlm", "train", *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("grad_accum, options", [
    (1, {}),
    pytest.param(2, {}, marks=pytest.mark.slow),
    # buckets of 1 KB: one all-reduce per parameter or two, each overlapping the rest of backward
    pytest.param(2, {"ddp_bucket_cap_mb": 0.001}, marks=pytest.mark.slow),
])
def test_two_process_ddp_matches_single_process(tmp_path, corpus_dir, grad_accum, options):  # noqa: F811
    single = train(tiny_run(tmp_path, corpus_dir, "single", batch_size=8, grad_accum=grad_accum, max_steps=6,
                            eval_every=3, save_every=3))

    cfg = tiny_run(tmp_path, corpus_dir, "ddp", batch_size=8, grad_accum=grad_accum, max_steps=6, eval_every=3,
                   save_every=3, **options)
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


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("options", [{}, {"fsdp": True}, {"fsdp": True, "fsdp_reshard_after_forward": False}],
                         ids=["ddp", "fsdp", "fsdp-keep-gathered"])
def test_two_gpus_match_one_gpu(tmp_path, corpus_dir, options):  # noqa: F811
    """NCCL on two GPUs with the trainer's own DDP and FSDP2: the losses of one GPU at the same
    global batch, in float32 so that only the order of the sums differs. (FSDP2 with the root
    resharded after forward died in its first backward on two H200s; the CPU runs never showed it.)"""
    run = {"batch_size": 8, "max_steps": 6, "eval_every": 3, "save_every": 3, "device": "cuda", "dtype": "float32"}
    single = train(tiny_run(tmp_path, corpus_dir, "single", **run))
    config_file = tmp_path / "two.yaml"
    config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(tiny_run(tmp_path, corpus_dir, "two", **run, **options))))
    torchrun(str(config_file))
    assert _losses(tmp_path / "runs" / "two") == pytest.approx(_losses(single), rel=1e-4)


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
def test_two_process_fsdp_options_match_single_process(tmp_path, corpus_dir):  # noqa: F811
    """Layers kept gathered from forward to backward, gradients reduce-scattered in float32:
    the same losses as one process. Gathering in bfloat16 rounds the weights, so its losses
    differ, but only by rounding."""
    single = train(tiny_run(tmp_path, corpus_dir, "single", batch_size=8, max_steps=4, eval_every=4))
    for name, options in (("kept", {"fsdp_reshard_after_forward": False, "fsdp_reduce_dtype": "float32"}),
                          ("bf16", {"fsdp_reshard_after_forward": False, "fsdp_param_dtype": "bfloat16"})):
        cfg = tiny_run(tmp_path, corpus_dir, name, batch_size=8, max_steps=4, eval_every=4, fsdp=True, **options)
        config_file = tmp_path / f"{name}.yaml"
        config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        torchrun(str(config_file))
    assert _losses(tmp_path / "runs" / "kept") == pytest.approx(_losses(single), rel=1e-5)
    bf16 = _losses(tmp_path / "runs" / "bf16")
    assert bf16 == pytest.approx(_losses(single), rel=1e-2) and bf16 != pytest.approx(_losses(single), rel=1e-6)


@pytest.mark.parametrize("overrides, message", [
    ({"ddp_bucket_cap_mb": 0}, "train.ddp_bucket_cap_mb must be > 0, got 0"),
    ({"fsdp": True, "fsdp_param_dtype": "float16"}, "bad value for 'train.fsdp_param_dtype': 'float16'"),
    ({"fsdp": True, "fsdp_reduce_dtype": "fp32"}, "bad value for 'train.fsdp_reduce_dtype': 'fp32'"),
    ({"fsdp_param_dtype": "bfloat16"}, "train.fsdp_param_dtype=bfloat16 needs train.fsdp=true"),
    ({"fsdp_reshard_after_forward": False}, "train.fsdp_reshard_after_forward=False needs train.fsdp=true"),
    ({"fsdp": True, "ddp_bucket_cap_mb": 100}, "train.ddp_bucket_cap_mb=100.0 needs train.fsdp=false"),
])
def test_data_parallel_options_are_checked(overrides, message):
    from dynlm.errors import ConfigError
    from dynlm.train.config import load_run_config

    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_run_config("quick", {"train": overrides})
    assert "\n" not in str(info.value)
    load_run_config("quick", {"train": {"fsdp": True, "fsdp_reshard_after_forward": False,
                                        "fsdp_param_dtype": "bfloat16", "fsdp_reduce_dtype": "bfloat16"}})
    load_run_config("quick", {"train": {"ddp_bucket_cap_mb": 100}})


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of one process: enough for DDP and FSDP2 to wrap a model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_wrap_model_hands_the_options_to_ddp_and_fsdp(one_process_group):
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from dynlm.config import model_config
    from dynlm.distributed import DistContext, wrap_model
    from dynlm.registry import get_architecture

    config = model_config({"preset": "standard-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                           "num_kv_heads": 1, "intermediate_size": 64, "vocab_size": 64})
    model_class = get_architecture(config.type)[1]
    ctx = DistContext(world_size=2)  # what wrap_model reads; the group itself has one process
    ddp = wrap_model(model_class(config), ctx, fsdp=False, bucket_cap_mb=3)
    assert isinstance(ddp, DistributedDataParallel) and ddp.bucket_bytes_cap == 3 * 1024 * 1024
    assert ddp.gradient_as_bucket_view

    ids = torch.randint(0, 64, (2, 8))
    for keep, dtype in ((False, torch.float32), (True, torch.bfloat16)):
        model = wrap_model(model_class(config), ctx, fsdp=True, reshard_after_forward=not keep, param_dtype=dtype)
        out = model(ids, labels=ids)
        assert out.logits.dtype == dtype  # computed in the gathered parameters' dtype
        # after forward a layer holds its gathered (plain) parameters only when kept for backward
        weight = model.model.layers[0].mlp.up_proj.weight
        assert (type(weight).__name__ != "DTensor") == keep
        # the root's (embedding, final norm, LM head) always are: a root resharded after forward
        # faulted in its first backward on two H200s (illegal memory access; gpu_fsdp_probe_h200)
        assert type(model.lm_head.weight).__name__ != "DTensor"
        out.loss.backward()
@pytest.mark.slow
def test_distributed_benchmark_smoke_matches_one_process(tmp_path):
    """benchmarks/gpu_distributed.py --smoke launches torchrun itself (gloo, 2 CPU processes):
    DDP and FSDP2 variants (a tied-embedding qwen2 shape for FSDP2) give the losses of one
    process at the same global batch, with the scaling figures and the loss plot."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_distributed.py"
    runs = ("gpt2-small-like:single,gpt2-small-like:single-accum2,gpt2-small-like:ddp,gpt2-small-like:ddp-grad-copy,"
            "gpt2-small-like:ddp-accum2,0.5b:single,0.5b:single-accum2,0.5b:fsdp-keep-gathered,0.5b:fsdp-bf16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(script), "--smoke", "--runs", runs, "--out", str(tmp_path / "out"),
                             "--work", str(tmp_path / "work")], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_distributed.json").read_text())
    assert [r.get("error") for r in report["runs"]] == [None] * 9
    assert [len(r["losses"]) for r in report["runs"]] == [6] * 9
    rows = {(r["model"], r["variant"]): r for r in report["summary"]}
    for key in (("gpt2-small-like", "ddp"), ("gpt2-small-like", "ddp-grad-copy"), ("0.5b", "fsdp-keep-gathered")):
        assert rows[key]["reference"] == "single-accum2" and rows[key]["baseline"] == "single"
        assert rows[key]["max_abs_loss_delta"] < 1e-4, (key, rows[key])
        assert rows[key]["scaling_efficiency"] > 0
    assert 1e-6 < rows[("0.5b", "fsdp-bf16")]["max_abs_loss_delta"] < 1e-2  # bfloat16 weights: rounding only
    accum = rows[("gpt2-small-like", "ddp-accum2")]  # global batch 4 x per-GPU: no 1-process run to compare
    assert accum["baseline"] == "single-accum2" and "reference" not in accum
    assert (tmp_path / "out" / "gpu_distributed.md").is_file()
    assert (tmp_path / "out" / "gpu_distributed_loss.png").is_file()
    assert not (tmp_path / "work" / "runs" / "gpt2-small-like-ddp").exists()  # run folders are not kept


@pytest.mark.slow
def test_fsdp_probe_smoke_records_every_phase(tmp_path):
    """benchmarks/gpu_fsdp_probe.py --smoke: each case its own 2-process launch, every rank's
    phases recorded up to the end; a case that dies is reported with its last phase, not lost."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_fsdp_probe.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, str(script), "--smoke", "--cases", "nccl,model-root-reshard",
                             "--out", str(out), "--work", str(tmp_path / "work")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads((out / "gpu_fsdp_probe.json").read_text())["cases"]
    assert [c["case"] for c in cases] == ["nccl", "model-root-reshard"] and all(c["ok"] for c in cases)
    phases = cases[1]["rank1_phases"]
    assert phases[0] == "joined" and phases[2] == "sharded" and phases[-2:] == ["empty_cache", "settled"]
    assert "step 2: optimizer" in phases
    # an unknown case is refused before anything is launched
    bad = subprocess.run([sys.executable, str(script), "--smoke", "--cases", "nope", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown case(s) nope" in bad.stderr


def test_distributed_benchmark_figures(monkeypatch):
    """The benchmark's arithmetic: tokens/s over the timed steps; efficiency against twice the
    1-process run with the same per-GPU batch and micro-batches; the loss delta taken step by
    step against the 1-process run of the same global batch."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_distributed.py"
    spec = importlib.util.spec_from_file_location("gpu_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    assert bench.measure({"seconds": 2.0, "timed_steps": 4, "tokens_per_step": 100}) == \
        {"tokens_per_s": 200.0, "step_ms": 500.0}

    def run(variant, processes, batch, accum, tokens_per_s, losses):
        return {"model": "m", "variant": variant, "processes": processes, "tokens_per_s": tokens_per_s,
                "losses": losses, "config": {"train": {"batch_size": batch, "grad_accum": accum}}}

    runs = [run("single", 1, 8, 1, 100.0, [9.0, 9.0, 9.0]),
            run("single-accum2", 1, 16, 2, 110.0, [3.0, 2.0, 1.0]),
            run("ddp", 2, 16, 1, 180.0, [3.0, 2.1, 0.95]),
            run("ddp-accum2", 2, 32, 2, 209.0, [5.0, 5.0, 5.0]),
            {"model": "m", "variant": "fsdp", "processes": 2, "error": "exit status 1",
             "config": {"train": {"batch_size": 16, "grad_accum": 1}}}]
    rows = {r["variant"]: r for r in bench.summarize(runs)}
    assert set(rows) == {"ddp", "ddp-accum2"}  # the failed run is left out
    assert rows["ddp"]["scaling_efficiency"] == pytest.approx(0.9) and rows["ddp"]["baseline"] == "single"
    assert rows["ddp"]["reference"] == "single-accum2"
    assert rows["ddp"]["max_abs_loss_delta"] == pytest.approx(0.1)
    assert rows["ddp"]["mean_abs_loss_delta"] == pytest.approx(0.05)
    assert rows["ddp-accum2"]["scaling_efficiency"] == pytest.approx(0.95)
    assert "reference" not in rows["ddp-accum2"]


def test_fsdp_step_skips_a_non_finite_gradient_on_the_device(one_process_group):
    """Sharded (DTensor) parameters: fused AdamW's found_inf skips the update of a step with a
    non-finite gradient, and the next finite one updates the weights, with no read-back."""
    import torch

    from dynlm.config import model_config
    from dynlm.distributed import DistContext, wrap_model
    from dynlm.registry import get_architecture
    from dynlm.train.config import TrainConfig
    from dynlm.train.optim import build_optimizer
    from dynlm.train.trainer import TrainStep

    config = model_config({"preset": "standard-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2,
                           "num_kv_heads": 1, "intermediate_size": 64, "vocab_size": 64})
    model = wrap_model(get_architecture(config.type)[1](config), DistContext(world_size=2), fsdp=True)
    device = torch.device("cpu")
    step = TrainStep(model, model, build_optimizer(model, TrainConfig(lr=1e-2), device), device, torch.float32, 1.0)
    assert step.skip_on_device

    def weights():
        return [p.detach().full_tensor().clone() for p in model.parameters()]

    ids = torch.randint(0, 64, (2, 8))
    before = weights()
    poison = model.model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * float("inf"))
    out = step([ids])
    poison.remove()
    assert bool(out.nonfinite) and all(torch.equal(a, b) for a, b in zip(before, weights()))
    out = step([ids])
    assert not bool(out.nonfinite) and not all(torch.equal(a, b) for a, b in zip(before, weights()))
