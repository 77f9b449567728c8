"""Where does FSDP2 fault? Small two-process cases, each its own torchrun launch, from raw NCCL
collectives up to the trainer, so that a CUDA fault (which poisons the process) ends only its case.

    python benchmarks/gpu_fsdp_probe.py --out $OUT --commit SHA       # 2 CUDA GPUs, about 3 minutes
    python benchmarks/gpu_fsdp_probe.py --smoke --out /tmp/probe      # CPU, gloo, tiny
    python benchmarks/gpu_fsdp_probe.py --out $OUT --tiny --cases model-root-reshard \
        --under "compute-sanitizer --tool memcheck --target-processes all"   # which kernel faults

Every rank synchronises the device after each phase of a case and appends the phase's name to its
own marker file, so a fault is pinned to the phase between the last marker and the next. Each case
also ends with `torch.cuda.empty_cache()` and a synchronisation: after an FSDP2 training run on two
H200s, that is where the first error surfaced. Writes gpu_fsdp_probe.json and .md to --out, plus
each failed case's log."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CASES = {  # name: what it isolates
    "nccl": "all_gather_into_tensor and reduce_scatter_tensor, 64 MiB fp32, default and a side stream",
    "toy": "fully_shard on 4 Linear layers + root, fused AdamW, clip_grad_norm_, 3 steps",
    "model": "gpt2-small-like, dynlm.distributed.wrap_model (the trainer's FSDP2), bf16 autocast, "
             "foreach AdamW, clip_grad_norm_, 3 steps",
    "model-fused-adamw": "as model, fused AdamW (the trainer's optimizer)",
    "model-default-policy": "as model-fused-adamw, fully_shard by hand with its defaults (no MixedPrecisionPolicy; "
                            "the root keeps its parameters gathered after forward)",
    "model-root-reshard": "as model-default-policy, but the root too frees its parameters after forward "
                          "(reshard_after_forward=True)",
    "model-fp32-policy": "as model-default-policy, with MixedPrecisionPolicy(float32, float32) on every unit",
    "model-bf16-gathers": "as model-fused-adamw, wrap_model with bfloat16 gathers (train.fsdp_param_dtype)",
    "model-no-rope-table": "as model-fused-adamw, rotary cos/sin computed per forward (no table buffers)",
    "model-fp32": "as model-fused-adamw, no autocast",
    "model-untied": "as model-fused-adamw, LM head not tied to the embedding",
    "trainer": "dynlm.train.train with train.fsdp=true, 3 steps, validation and checkpoint",
    "trainer-no-caching-allocator": "as trainer, PYTORCH_NO_CUDA_MEMORY_CACHING=1",
}


# ---------------------------------------------------------------------------------------------
# The worker: one rank of one case


class Phases:
    """Synchronise, then append the phase's name to this rank's marker file."""

    def __init__(self, path: Path, device: Any):
        self.path, self.device = path, device

    def __call__(self, name: str) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        with open(self.path, "a") as f:
            f.write(json.dumps({"phase": name, "t": time.time()}) + "\n")


def nccl_case(ctx: Any, phase: Phases, tiny: bool) -> None:
    import torch
    import torch.distributed as dist

    n = (1 << 10) if tiny else (16 << 20)  # fp32 elements per rank's shard
    for stream_name in ("default", "side"):
        stream = torch.cuda.Stream(ctx.device) if ctx.device.type == "cuda" and stream_name == "side" else None
        for _ in range(3):
            shard = torch.full((n,), float(ctx.rank + 1), device=ctx.device)
            full = torch.empty(n * ctx.world_size, device=ctx.device)
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(ctx.device))
                with torch.cuda.stream(stream):
                    dist.all_gather_into_tensor(full, shard)
                    out = torch.empty(n, device=ctx.device)
                    dist.reduce_scatter_tensor(out, full)
                torch.cuda.current_stream(ctx.device).wait_stream(stream)
            else:
                dist.all_gather_into_tensor(full, shard)
                out = torch.empty(n, device=ctx.device)
                dist.reduce_scatter_tensor(out, full)
            # rank r's shard holds r + 1: its reduce-scattered chunk is (r + 1) summed over the ranks
            expected = float((ctx.rank + 1) * ctx.world_size)
            if float(out[0]) != expected or float(out[-1]) != expected:
                raise RuntimeError(f"reduce_scatter_tensor gave {float(out[0])}, expected {expected}")
        phase(f"collectives on the {stream_name} stream")


def train_steps(phase: Phases, model: Any, optimizer: Any, loss_of_step: Callable[[int], Any]) -> None:
    """Three steps of forward (`loss_of_step`), backward, clipping and the optimizer, a phase each."""
    import torch

    for step in range(3):
        loss = loss_of_step(step)
        phase(f"step {step}: forward (loss {float(loss):.4f})")
        loss.backward()
        phase(f"step {step}: backward")
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        phase(f"step {step}: clip (norm {float(norm):.3g})")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        phase(f"step {step}: optimizer")


def toy_case(ctx: Any, phase: Phases, tiny: bool) -> None:
    import torch
    from torch.distributed.fsdp import fully_shard

    width = 64 if tiny else 1024
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)]).to(ctx.device)
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    fused = ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=fused or None)
    phase("sharded")
    train_steps(phase, model, optimizer, lambda step: model(torch.randn(8, width, device=ctx.device)).square().mean())


def model_case(ctx: Any, phase: Phases, tiny: bool, *, fused_adamw: bool, by_hand: dict[str, Any] | None = None,
               wrap_options: dict[str, Any] | None = None, rope_table: bool = True, autocast: bool = True,
               tied: bool = True) -> None:
    """`by_hand`: fully_shard each layer, then the root, with these options (root_reshard: the
    root's reshard_after_forward; mp: a MixedPrecisionPolicy's dtypes); otherwise wrap_model."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from dynlm import build_model, distributed

    sizes = ({"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2, "intermediate_size": 64,
              "vocab_size": 320} if tiny else {"vocab_size": 50304})
    torch.manual_seed(1337)
    with torch.device(ctx.device):
        model = build_model("gpt2-small-like", tie_word_embeddings=tied, **sizes)
    if not rope_table:
        model.rotary.table_positions = 0
    phase(f"built ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    if by_hand is None:
        distributed.wrap_model(model, ctx, fsdp=True, **(wrap_options or {}))
    else:
        mp = {"mp_policy": MixedPrecisionPolicy(*by_hand["mp"])} if "mp" in by_hand else {}
        for layer in model.model.layers:
            fully_shard(layer, **mp)
        fully_shard(model, reshard_after_forward=by_hand.get("root_reshard"), **mp)
    phase("sharded")
    use_fused = fused_adamw and ctx.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, fused=True if use_fused else None,
                                  foreach=None if use_fused else True)
    batch, seq = (2, 32) if tiny else (8, 1024)
    dtype = torch.bfloat16 if autocast and ctx.device.type == "cuda" else torch.float32
    generator = torch.Generator().manual_seed(ctx.rank)

    def loss(step: int) -> Any:
        ids = torch.randint(0, sizes["vocab_size"], (batch, seq), generator=generator).to(ctx.device)
        with distributed.autocast(ctx.device, dtype):
            return model(ids, labels=ids).loss

    train_steps(phase, model, optimizer, loss)


def trainer_case(ctx: Any, phase: Phases, tiny: bool, work: Path) -> None:
    from dynlm.train import train

    model = {"preset": "gpt2-small-like", "vocab_size": 50304}
    if tiny:
        model = {"preset": "standard-tiny", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 2,
                 "intermediate_size": 64, "vocab_size": 320}
    run = {"model": model,
           "data": {"corpus": "python-stdlib", "tokenizer": "bytes", "seq_len": 32 if tiny else 1024,
                    "cache_dir": str(work / "cache")},
           "train": {"max_steps": 3, "batch_size": 4 if tiny else 16, "lr": 3e-4, "warmup_steps": 1, "log_every": 1,
                     "eval_every": 0, "eval_bytes": 20_000, "save_every": 3, "final_eval": [], "sample_prompt": None,
                     "plot": False, "progress": False, "device": ctx.device.type, "fsdp": True},
           "out_dir": str(work / "runs"), "run_name": "probe"}
    phase("configured")
    train(run, force=True)
    phase("trained, validated and saved")


def worker(case: str, work: Path, smoke: bool, tiny: bool) -> int:
    import torch

    from dynlm import distributed

    ctx = distributed.setup("cpu" if smoke else "cuda")
    phase = Phases(work / f"{case}.rank{ctx.rank}.jsonl", ctx.device)
    phase("joined")
    cases: dict[str, Callable[[], None]] = {
        "nccl": lambda: nccl_case(ctx, phase, tiny),
        "toy": lambda: toy_case(ctx, phase, tiny),
        "model": lambda: model_case(ctx, phase, tiny, fused_adamw=False),
        "model-fused-adamw": lambda: model_case(ctx, phase, tiny, fused_adamw=True),
        "model-default-policy": lambda: model_case(ctx, phase, tiny, fused_adamw=True, by_hand={}),
        "model-root-reshard": lambda: model_case(ctx, phase, tiny, fused_adamw=True, by_hand={"root_reshard": True}),
        "model-fp32-policy": lambda: model_case(ctx, phase, tiny, fused_adamw=True,
                                                by_hand={"mp": (torch.float32, torch.float32)}),
        "model-bf16-gathers": lambda: model_case(ctx, phase, tiny, fused_adamw=True,
                                                 wrap_options={"param_dtype": torch.bfloat16}),
        "model-no-rope-table": lambda: model_case(ctx, phase, tiny, fused_adamw=True, rope_table=False),
        "model-fp32": lambda: model_case(ctx, phase, tiny, fused_adamw=True, autocast=False),
        "model-untied": lambda: model_case(ctx, phase, tiny, fused_adamw=True, tied=False),
        "trainer": lambda: trainer_case(ctx, phase, tiny, work / f"{case}-{ctx.rank}"),
        "trainer-no-caching-allocator": lambda: trainer_case(ctx, phase, tiny, work / f"{case}-{ctx.rank}"),
    }
    try:
        cases[case]()
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
        phase("empty_cache")
        distributed.settle(ctx)
        phase("settled")
    finally:
        distributed.teardown(ctx)
    return 0


# ---------------------------------------------------------------------------------------------
# The launcher


def say(message: str) -> None:
    print(f"[gpu_fsdp_probe {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_case(case: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "4",
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)}
    if not args.smoke:
        env.setdefault("NCCL_DEBUG", "WARN")
    if case == "trainer-no-caching-allocator":
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    log_path = work / f"{case}.log"
    command = [*shlex.split(args.under), sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", str(Path(__file__).resolve()), "--worker", case, "--work", str(work)]
    command += (["--smoke"] if args.smoke else []) + (["--tiny"] if args.tiny else [])
    start = time.perf_counter()
    with open(log_path, "w") as log:
        try:
            code: int | None = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work,
                                              timeout=args.case_timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    record: dict[str, Any] = {"case": case, "what": CASES[case], "exit_status": code,
                              "wall_s": round(time.perf_counter() - start, 1)}
    for rank in (0, 1):
        marker = work / f"{case}.rank{rank}.jsonl"
        lines = marker.read_text().splitlines() if marker.is_file() else []
        record[f"rank{rank}_phases"] = [json.loads(line)["phase"] for line in lines]
    text = log_path.read_text(errors="replace")
    record["errors"] = sorted({line.strip()[:300] for line in text.splitlines()
                               if ("Error" in line or "error" in line or "NCCL WARN" in line)
                               and "Traceback" not in line})[:12]
    record["ok"] = code == 0 and "settled" in record["rank0_phases"] and "settled" in record["rank1_phases"]
    if not record["ok"] and args.out is not None:
        shutil.copyfile(log_path, args.out / f"{case}.log")
    return record


def to_markdown(report: dict[str, Any]) -> str:
    lines = [f"# {report['title']}", "",
             f"{report['device']} x 2, torch {report['torch']}, NCCL {report['nccl']}, NCCL_NVLS_ENABLE=0, commit "
             f"{report['commit']}, {report['time']}. Each case is its own `torchrun --nproc_per_node 2` launch; every "
             "rank synchronises the device after each phase and records it, so a fault lies between a case's last "
             "phase and the next. Every case ends with `torch.cuda.empty_cache()`, a synchronisation and two "
             "barriers." + (" Tiny shapes (`--tiny`)." if report.get("tiny") else "")
             + (f" Each launch ran under `{report['under']}`; its report is in the case's log." if report.get("under")
                else ""), "",
             "| case | what it isolates | result | last phase reached (rank 0 / rank 1) | wall s |",
             "|---|---|---|---|---|"]
    for r in report["cases"]:
        result = "ok" if r["ok"] else ("timed out" if r["exit_status"] is None else f"failed (exit {r['exit_status']})")
        last = " / ".join((r[f"rank{k}_phases"] or ["(none)"])[-1] for k in (0, 1))
        lines.append(f"| {r['case']} | {r['what']} | {result} | {last} | {r['wall_s']} |")
    failed = [r for r in report["cases"] if not r["ok"]]
    if failed:
        lines += ["", "## Error lines of the failed cases", ""]
        for r in failed:
            lines.append(f"**{r['case']}**:")
            lines += [f"- `{e}`" for e in r["errors"]] or ["- (no error line in the log)"]
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny sizes")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes on the GPU (for --under compute-sanitizer)")
    parser.add_argument("--under", default="", help="a command each case's torchrun runs under, e.g. "
                        "'compute-sanitizer --tool memcheck --target-processes all' (its report: the case's log)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated, run in that order")
    parser.add_argument("--case-timeout", type=float, default=90.0, help="seconds per case")
    parser.add_argument("--commit", default=None, help="git commit of the source (when the copy has no .git)")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker, args.work, args.smoke, args.smoke or args.tiny)
    if args.out is None:
        parser.error("--out is required")
    cases = [c for c in args.cases.split(",") if c]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; valid: {', '.join(CASES)}")

    import torch

    if not args.smoke and not (torch.cuda.is_available() and torch.cuda.device_count() >= 2):
        print("gpu_fsdp_probe: needs 2 CUDA GPUs; --smoke checks the script on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_fsdp_probe_"))
    work.mkdir(parents=True, exist_ok=True)
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else "n/a"
    report: dict[str, Any] = {"title": "FSDP2 fault probe" + (" (CPU smoke)" if args.smoke else ""),
                              "device": "CPU" if args.smoke else torch.cuda.get_device_name(0),
                              "torch": torch.__version__, "nccl": nccl, "commit": provenance.commit(args.commit),
                              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "tiny": args.tiny,
                              "under": args.under, "cases": []}
    for case in cases:
        record = run_case(case, args, work)
        report["cases"].append(record)
        say(f"{case}: {'ok' if record['ok'] else 'FAILED'} in {record['wall_s']} s; last phases "
            f"{record['rank0_phases'][-1:]} / {record['rank1_phases'][-1:]}")
        (args.out / "gpu_fsdp_probe.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "gpu_fsdp_probe.md").write_text(to_markdown(report))
    return 0 if all(r["ok"] for r in report["cases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
