"""Training speed of gpt2-small-like against nanoGPT, in one process: tokens/s, MFU, peak memory, loss.

    python benchmarks/gpu_train.py --out OUT --nanogpt-dir .gpu/trainspeed/nanogpt \
        --before-src .gpu/trainspeed/before/src                                                   # CUDA
    python benchmarks/gpu_train.py --out /tmp/gpu_train --nanogpt-dir .gpu/trainspeed/nanogpt \
        --before-src .gpu/trainspeed/before/src --smoke                                          # CPU check

`--nanogpt-dir` holds nanoGPT's `model.py` (github karpathy/nanoGPT, not part of this repository);
its GPT is trained the way its `bench.py` does: bf16 autocast, torch.compile, fused AdamW, no
gradient clipping. Variants, each measured at every batch size of `--batches`:

  nanogpt        the peer: 12 layers, 768 wide, 12 heads, vocab 50304, seq 1024, bias off
  dynlm-before   `dynlm` below run on an older copy of the package (`--before-src`, a `src/` exported
                 with `git archive COMMIT src`), in a child process with the same data and settings:
                 what a change to the model or trainer gained, measured in the same run
  dynlm          preset gpt2-small-like through the trainer's step (`dynlm.train.trainer.TrainStep`:
                 bf16 autocast, fused AdamW, clipping at 1.0, device-side NaN guard), the model
                 compiled as the trainer compiles it; plain loss (the [B, T, V] logits)
  dynlm-fusedproj  `dynlm` with q/k/v computed by one matmul over the concatenated weights and gate/up
                 by one (nanoGPT's c_attn and c_fc shapes), parameters and their names unchanged: a
                 benchmark-only patch (`use_fused_projections`); whether the model itself should
                 do this is decided by this figure
  dynlm-cudagraphs  `dynlm` compiled with mode="reduce-overhead" (the trainer's `train.compile_mode`):
                 forward and backward replayed as CUDA graphs; tells whether the step is launch-bound
  dynlm-chunked  `dynlm` with `train.fused_loss` (chunked LM head + cross-entropy, dynlm.nn.loss)
  dynlm-liger    `dynlm` with Liger's fused linear cross-entropy as the fused loss's kernel, run
                 outside the compiled graph (one graph break at the loss): Liger's autograd Functions
                 launch Triton kernels that dynamo cannot trace (liger-kernel 0.8.5, torch 2.11:
                 "RuntimeError when making fake tensor call") and its loss reads a count back (.item()).
                 Optional: an import or runtime error is recorded in the results.
  dynlm-liger-blocks  (not in the default list) also Liger's RMSNorm and SiLU-mul (SwiGLU) kernels in
                 the blocks, each outside the graph: three graph breaks per layer. Liger's RoPE is not
                 used: it rotates q and k together in Hugging Face's layout, ours rotates each through
                 the KV-cache path.
  dynlm-autotune (not in the default list) `dynlm` compiled with mode="max-autotune-no-cudagraphs"
                 (the trainer's `train.compile_mode`); its compilation takes minutes.

Every variant trains on the same random tokens (`--data-batches` fixed batches, cycled) with the
same learning rate, so the loss after the timed steps shows that the faster variants learn alike.
MFU = tokens/s x FLOPs per token / 989 TFLOP/s (H100/H200 dense bf16 datasheet peak), FLOPs per
token by nanoGPT's `estimate_mfu` formula for each model: 6 N + 12 L H Q T (N = parameters in
matmuls, the tied LM head counted once; L layers, H heads, Q head dim, T sequence length). The
warm-up time (compilation, printed) is reported as "compile s".
Writes gpu_train.json and gpu_train.md into --out (after every variant, so an interrupted run
keeps what it measured); `--profile` adds profile_<variant>.txt (torch.profiler, top kernels)."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import MethodType, ModuleType
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402
from dynlm.config import model_config
from dynlm.registry import get_architecture
from dynlm.train.config import TrainConfig
from dynlm.train.optim import build_optimizer
from dynlm.train.trainer import TrainStep

PEAK_BF16 = 989e12  # dense bf16 FLOP/s by datasheet (H100 / H200 SXM)
VARIANTS = ("nanogpt", "dynlm-before", "dynlm", "dynlm-fusedproj", "dynlm-cudagraphs", "dynlm-liger",
            "dynlm-chunked", "dynlm-liger-blocks", "dynlm-autotune")
DEFAULT_VARIANTS = VARIANTS[:7]  # the most telling first: --time-limit skips the last ones
COMPILE_MODES = {"dynlm-cudagraphs": "reduce-overhead", "dynlm-autotune": "max-autotune-no-cudagraphs"}


def load_nanogpt(directory: Path) -> ModuleType:
    path = directory / "model.py"
    if not path.is_file():
        raise FileNotFoundError(f"no nanoGPT model.py in {directory} (fetch karpathy/nanoGPT and copy it there)")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Runner:
    """One variant: `step(tokens [B, T+1]) -> loss tensor`, its model, FLOPs per token."""

    def __init__(self, model: torch.nn.Module, step: Callable[[torch.Tensor], torch.Tensor], flops_per_token: float,
                 parameters: int):
        self.model, self.step, self.flops_per_token, self.parameters = model, step, flops_per_token, parameters


def build_nanogpt(args: argparse.Namespace, shape: dict[str, int], device: torch.device, dtype: torch.dtype,
                  compile_: bool) -> Runner:
    nano = load_nanogpt(args.nanogpt_dir)
    config = nano.GPTConfig(block_size=shape["seq"], vocab_size=shape["vocab"], n_layer=shape["layers"],
                            n_head=shape["heads"], n_embd=shape["width"], dropout=0.0, bias=False)
    with contextlib.redirect_stdout(sys.stderr):  # nanoGPT prints its parameter count
        model = nano.GPT(config).to(device)
        optimizer = model.configure_optimizers(weight_decay=0.1, learning_rate=args.lr, betas=(0.9, 0.95),
                                               device_type=device.type)
    module = torch.compile(model) if compile_ else model

    def step(tokens: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = module(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # nanoGPT's estimate_mfu: N = get_num_params() (position embeddings excluded, tied head once)
    n = model.get_num_params()
    head_dim = shape["width"] // shape["heads"]
    flops = 6 * n + 12 * shape["layers"] * shape["heads"] * head_dim * shape["seq"]
    return Runner(model, step, flops, n)


def use_liger(model: torch.nn.Module, blocks: bool) -> None:
    """Liger's fused linear cross-entropy as the fused loss; with `blocks` also its RMSNorm and
    SiLU-mul. Each Liger call runs outside the compiled graph (see the module docstring). Raises
    ImportError without liger-kernel."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_rms_norm, liger_swiglu

    from dynlm.nn import RMSNorm, SwiGLU

    fused_linear_cross_entropy = torch.compiler.disable(liger_fused_linear_cross_entropy)
    rms_norm, silu_mul = torch.compiler.disable(liger_rms_norm), torch.compiler.disable(liger_swiglu)

    def liger_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # fp32 hidden states and weight under bf16 autocast: Liger's mixed-precision path (matmuls in
        # the autocast dtype, the weight gradient accumulated in fp32)
        return fused_linear_cross_entropy(hidden, weight, targets, ignore_index=-100)

    def rms_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        # casting mode "llama": normalise in fp32, cast back, then scale: our RMSNorm's arithmetic
        return rms_norm(x, self.weight, self.eps, casting_mode="llama", in_place=False)

    def mlp_forward(self: SwiGLU, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))

    if blocks:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.forward = MethodType(rms_forward, module)
            elif isinstance(module, SwiGLU):
                module.forward = MethodType(mlp_forward, module)
    model.fused_loss = True
    model.fused_loss_kernel = liger_loss


def use_fused_projections(model: torch.nn.Module) -> None:
    """q/k/v as one matmul over the concatenated weights, gate/up as one: the larger matmuls of
    nanoGPT's c_attn and c_fc, with the parameters (names, checkpoints) unchanged. The modules'
    own fused path (`nn.fusion`), fed a concatenation made at every forward so gradients reach
    the separate weights. Under autocast the weights are cast to bf16 at every step anyway;
    compiled, the concatenation joins that cast."""
    from dynlm.nn import Attention, SwiGLU
    from dynlm.nn.fusion import concatenated, fusable_linears

    def through_concatenation(method: Any) -> Any:
        def fused_method(self: torch.nn.Module, x: torch.Tensor) -> Any:
            self.fused = concatenated(fusable_linears(self))
            try:
                return method(self, x)
            finally:
                self.fused = None
        return fused_method

    for module in model.modules():
        if isinstance(module, Attention):
            module.project = MethodType(through_concatenation(Attention.project), module)
        elif isinstance(module, SwiGLU):
            module.forward = MethodType(through_concatenation(SwiGLU.forward), module)


def build_dynlm(variant: str, args: argparse.Namespace, shape: dict[str, int], device: torch.device,
                dtype: torch.dtype, compile_: bool) -> Runner:
    overrides = {"vocab_size": shape["vocab"], "hidden_size": shape["width"], "num_layers": shape["layers"],
                 "num_heads": shape["heads"], "num_kv_heads": shape["heads"],
                 "head_dim": shape["width"] // shape["heads"],
                 "max_position_embeddings": shape["seq"]}
    if args.smoke:
        overrides["intermediate_size"] = 2 * shape["width"]
    config = model_config("gpt2-small-like", **overrides)
    model = get_architecture(config.type)[1](config).to(device).train()
    model.fused_loss = variant == "dynlm-chunked"
    if variant == "dynlm-fusedproj":
        use_fused_projections(model)
    if variant.startswith("dynlm-liger"):
        use_liger(model, blocks=variant == "dynlm-liger-blocks")
    optimizer = build_optimizer(model, TrainConfig(lr=args.lr, weight_decay=0.1, betas=[0.9, 0.95]), device)
    module = torch.compile(model, mode=COMPILE_MODES.get(variant)) if compile_ else model
    train_step = TrainStep(module, model, optimizer, device, dtype, clip=1.0)
    seq = shape["seq"]

    def step(tokens: torch.Tensor) -> torch.Tensor:
        return train_step([tokens[:, :seq].contiguous()]).loss  # the trainer shifts the labels inside the model

    return Runner(model, step, model.flops_per_token(seq), model.num_parameters())


def measure_before(args: argparse.Namespace, batch: int, time_left: float) -> tuple[dict[str, Any], Path | None]:
    """`dynlm` at `batch` on the package copy in `--before-src`, in a child process (one process
    cannot import two versions of a package): its result row, and its profile when asked."""
    if args.before_src is None or not (args.before_src / "dynlm").is_dir():
        raise FileNotFoundError(f"--before-src {args.before_src}: no dynlm package there "
                                "(git archive COMMIT src | tar -x -C DIR; pass DIR/src)")
    out = Path(tempfile.mkdtemp(prefix="gpu_train_before_"))
    command = [sys.executable, __file__, "--out", str(out), "--variants", "dynlm", "--batches", str(batch),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--data-batches", str(args.data_batches),
               "--lr", str(args.lr), "--time-limit", str(time_left)]
    command += [flag for flag, on in (("--smoke", args.smoke), ("--no-compile", args.no_compile),
                                      ("--profile", args.profile)) if on]
    paths = [str(args.before_src.resolve())] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    done = subprocess.run(command, env=env, timeout=max(time_left, 1.0) + 60, capture_output=True, text=True)
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        raise RuntimeError(f"child exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    child = json.loads((out / "gpu_train.json").read_text())
    row = child["results"][str(batch)]["dynlm"]
    row["package"] = f"src tree {provenance.tree_id(args.before_src)}"
    profile = out / "profile_dynlm.txt"
    return row, profile if profile.is_file() else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(runner: Runner, data: torch.Tensor, warmup: int, steps: int, device: torch.device) -> dict[str, Any]:
    """data [K, B, T+1]: warm-up steps (compilation), then timed steps, batches cycled."""
    k = data.shape[0]
    start = time.perf_counter()
    for i in range(warmup):
        runner.step(data[i % k])
    synchronize(device)
    warmup_seconds = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    loss = None
    for i in range(warmup, warmup + steps):
        loss = runner.step(data[i % k])
    synchronize(device)
    seconds = time.perf_counter() - start
    b, t = data.shape[1], data.shape[2] - 1
    tokens_per_s = b * t * steps / seconds
    return {"tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
            "mfu": tokens_per_s * runner.flops_per_token / PEAK_BF16 if device.type == "cuda" else None,
            "flops_per_token": runner.flops_per_token, "parameters": runner.parameters,
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
            "warmup_seconds": warmup_seconds, "loss_after": float(loss) if loss is not None else None,
            "steps_before_loss": warmup + steps}


def profile_variant(runner: Runner, data: torch.Tensor, device: torch.device, path: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(3):
            runner.step(data[i % data.shape[0]])
        synchronize(device)
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.write_text(prof.key_averages().table(sort_by=sort, row_limit=30) + "\n")


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def to_markdown(report: dict[str, Any]) -> str:
    env, shape = report["environment"], report["shape"]
    lines = [f"# Training step: dynlm vs nanoGPT, {env['device']}", "",
             f"torch {env['torch']}, commit `{provenance.short(env['commit'])}`, {env['started']}. "
             "Produced by `benchmarks/gpu_train.py`"
             f"{' --smoke' if report['smoke'] else ''}.", "",
             f"Shape: {shape['layers']} layers x {shape['width']}, {shape['heads']} heads, vocab {shape['vocab']}, "
             f"seq {shape['seq']}; {report['dtype']}, compile={'on' if report['compile'] else 'off'}, fused "
             f"AdamW (lr {report['lr']}). Random tokens: {report['data_batches']} fixed batches cycled, the same for "
             f"every variant; {report['warmup']} warm-up + {report['steps']} timed steps.", "",
             "MFU = tokens/s x FLOPs/token / 989 TFLOP/s (dense bf16 datasheet peak); FLOPs/token = 6 N + "
             "12 L H Q T (nanoGPT's estimate_mfu) for each model.", "",
             "| batch | variant | params | tokens/s | vs nanoGPT | MFU | step ms | FLOPs/token | peak memory | "
             "loss after | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for batch, rows in report["results"].items():
        peer = rows.get("nanogpt", {}).get("tokens_per_s")
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {batch} | {name} | error: {r['error']} |  |  |  |  |  |  |  |  |")
                continue
            ratio = f"{r['tokens_per_s'] / peer:.3f}x" if peer else "-"
            mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(f"| {batch} | {name} | {r['parameters'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {ratio} | "
                         f"{mfu} | {r['step_ms']:.1f} | {r['flops_per_token'] / 1e6:,.0f}M | "
                         f"{gib(r['peak_memory_bytes'])} | {r['loss_after']:.4f} | {r['warmup_seconds']:.0f} |")
    before = {r.get("package") for rows in report["results"].values() for r in rows.values() if "package" in r}
    if before:
        lines += ["", "dynlm-before ran on the package of " + ", ".join(f"`{p}`" for p in sorted(before)) + "."]
    if report.get("profiles"):
        lines += ["", "Profiles: " + ", ".join(f"`{p}`" for p in report["profiles"]) + "."]
    lines += ["", f"Total wall time: {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_train.json and gpu_train.md")
    parser.add_argument("--nanogpt-dir", type=Path, default=Path(".gpu/trainspeed/nanogpt"),
                        help="folder with nanoGPT's model.py")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no compile: checks the script on a CPU")
    parser.add_argument("--batches", help="batch sizes, comma-separated (default 16,32; --smoke: 2,4)")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--before-src", type=Path, help="a src/ folder of an older dynlm, for dynlm-before")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (compilation happens here)")
    parser.add_argument("--data-batches", type=int, default=4, help="fixed random batches, cycled")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--profile", action="store_true", help="torch.profiler table per variant at the first batch")
    parser.add_argument("--time-limit", type=float, default=240.0,
                        help="seconds; variants not started by then are recorded as skipped")
    parser.add_argument("--commit", help="git commit of the tree measured (when the copy has no .git)")
    args = parser.parse_args(argv)

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        parser.error(f"unknown variant {bad[0]!r}; valid: {', '.join(VARIANTS)}")
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        parser.error("no CUDA device: use --smoke for a CPU check")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = dict(layers=12, width=768, heads=12, vocab=50304, seq=1024)
    batches = [int(b) for b in (args.batches or ("2,4" if args.smoke else "16,32")).split(",")]
    compile_ = not args.no_compile and not args.smoke
    if args.smoke:
        shape = dict(layers=2, width=64, heads=4, vocab=512, seq=64)
        args.steps, args.warmup = 2, 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    report: dict[str, Any] = {
        "environment": {"device": torch.cuda.get_device_name(device) if cuda else "CPU", "torch": torch.__version__,
                        "cuda": torch.version.cuda,
                        "commit": provenance.commit(args.commit or os.environ.get("DYNLM_COMMIT")),
                        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "smoke": args.smoke, "shape": shape, "dtype": str(dtype).replace("torch.", ""), "compile": compile_,
        "lr": args.lr, "steps": args.steps, "warmup": args.warmup, "data_batches": args.data_batches,
        "results": {}, "profiles": [],
    }
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["seconds"] = time.perf_counter() - start
        (args.out / "gpu_train.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_train.md").write_text(to_markdown(report))

    for batch in batches:
        generator = torch.Generator().manual_seed(1234 + batch)
        data = torch.randint(0, shape["vocab"], (args.data_batches, batch, shape["seq"] + 1), generator=generator)
        data = data.to(device)
        rows: dict[str, Any] = report["results"].setdefault(str(batch), {})
        for name in names:
            if time.perf_counter() - start > args.time_limit:
                rows[name] = {"error": f"skipped: past --time-limit {args.time_limit:.0f} s"}
                continue
            print(f"batch {batch} {name} ...", file=sys.stderr, flush=True)
            runner = None
            try:
                torch.manual_seed(0)
                if name == "dynlm-before":
                    rows[name], profile = measure_before(args, batch, args.time_limit - (time.perf_counter() - start))
                    if profile is not None and batch == batches[0]:
                        path = args.out / f"profile_{name}.txt"
                        path.write_text(profile.read_text())
                        report["profiles"].append(path.name)
                else:
                    runner = (build_nanogpt(args, shape, device, dtype, compile_) if name == "nanogpt"
                              else build_dynlm(name, args, shape, device, dtype, compile_))
                    rows[name] = measure(runner, data, args.warmup, args.steps, device)
                    if args.profile and batch == batches[0]:
                        path = args.out / f"profile_{name}.txt"
                        profile_variant(runner, data, device, path)
                        report["profiles"].append(path.name)
                print(f"  {rows[name]['tokens_per_s']:,.0f} tokens/s, loss {rows[name]['loss_after']:.4f}, "
                      f"compile + warm-up {rows[name]['warmup_seconds']:.0f} s", file=sys.stderr, flush=True)
            except Exception as error:  # noqa: BLE001 - one variant's failure is recorded, the run goes on
                first_line = str(error).splitlines()[0][:200] if str(error) else ""
                rows[name] = {"error": f"{type(error).__name__}: {first_line}"}
                traceback.print_exc()
            del runner
            if cuda:
                torch.cuda.empty_cache()
            torch._dynamo.reset()
            save()
    save()
    print(to_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
