"""Throughput, memory and MFU of any architecture: training steps, forward passes and decoding.

    suite = run_suite(expand(BenchConfig(model="gpt2-small-like", batch=16), {"compile": ["on", "off"]}))
    write_suite(suite, "bench_out/")          # bench.json + bench.md

What is measured (random tokens, after warm-up steps that include any compilation):
  train     the trainer's own optimizer step (forward + backward + clipping + fused AdamW, bf16
            autocast on CUDA), tokens/s and MFU = tokens/s x model.flops_per_token(seq_len) / peak
  forward   the evaluation forward (eval mode, no gradients), tokens/s
  decode    per context length: prefill of `context` tokens, then `decode_tokens` steps of one
            token each through the model's state (KV cache or recurrent state), tokens/s and the
            state's bytes; weights cast to the benchmark dtype as a server would; on CUDA the
            transformer family decodes on the static cache with captured CUDA graphs
            (`dynlm.infer.graphs`) unless `graphs` is off (the eager reference)
Variants are measured one after another in one process, so their ratios compare like with like.
On CUDA every timed region ends with a synchronize; nothing reads back from the device inside it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dynlm.config import model_config
from dynlm.distributed import autocast, resolve_device, resolve_dtype
from dynlm.errors import ConfigError, did_you_mean
from dynlm.eval.flops import device_name, mfu, peak_flops
from dynlm.infer.graphs import GraphDecoder, graphs_by_default
from dynlm.registry import get_architecture
from dynlm.train.config import COMPILE_MODES, TrainConfig
from dynlm.train.optim import build_optimizer
from dynlm.train.trainer import TrainStep


@dataclass
class BenchConfig:
    model: str = "gpt2-small-like"  # model preset
    overrides: dict[str, Any] = field(default_factory=dict)  # model config fields, e.g. {"num_layers": 6}
    seq_len: int = 1024
    batch: int = 16
    compile: bool = False  # torch.compile the training step's forward
    compile_mode: str = "default"  # torch.compile mode (default, max-autotune-no-cudagraphs, ...)
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 elsewhere) | float32 | bfloat16
    device: str = "auto"
    steps: int = 20  # timed steps
    warmup: int = 5  # untimed steps first (compilation happens here)
    train: bool = True
    forward: bool = True
    decode_contexts: list[int] = field(default_factory=list)  # e.g. [128, 1024, 8192]
    decode_tokens: int = 64
    decode_batch: int = 1
    graphs: bool = True  # decode on the static cache with CUDA graphs where supported (else eager)
    fused_loss: bool = False  # training step: chunked LM head + loss (`train.fused_loss`)
    peak_tflops: float | None = None  # overrides the table of known peaks
    label: str = ""  # variant name in reports

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch", "steps", "decode_tokens", "decode_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or any(c < 1 for c in self.decode_contexts):
            raise ConfigError("warmup must be >= 0 and decode contexts >= 1")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"bad compile mode '{self.compile_mode}'", did_you_mean(self.compile_mode, COMPILE_MODES))
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"bad dtype '{self.dtype}'", "valid: auto, float32, bfloat16")


# Keys that `--compare key=a,b` may vary, with their parsers.
def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise ConfigError(f"'{value}' is not on/off")


COMPARABLE: dict[str, Callable[[str], Any]] = {
    "compile": _parse_bool, "compile_mode": str, "graphs": _parse_bool, "fused_loss": _parse_bool, "batch": int,
    "seq_len": int, "dtype": str, "model": str,
}


def expand(base: BenchConfig, compare: dict[str, list[str]]) -> list[BenchConfig]:
    """One config per combination of the compared values (in the order given)."""
    for key in compare:
        if key not in COMPARABLE:
            raise ConfigError(f"cannot compare '{key}'", did_you_mean(key, COMPARABLE))
    if not compare:
        return [base]
    keys = list(compare)
    configs = []
    for values in itertools.product(*(compare[k] for k in keys)):
        try:
            changes = {k: COMPARABLE[k](v) for k, v in zip(keys, values)}
        except ValueError:
            bad = next(f"{k}={v}" for k, v in zip(keys, values) if not _parses(COMPARABLE[k], v))
            raise ConfigError(f"bad --compare value '{bad}'", "batch and seq_len take integers") from None
        label = " ".join(f"{k}={v}" for k, v in zip(keys, values))
        configs.append(dataclasses.replace(base, label=label, **changes))
    return configs


def _parses(parse: Callable[[str], Any], value: str) -> bool:
    try:
        parse(value)
    except ValueError:
        return False
    return True


def parse_compare(items: list[str]) -> dict[str, list[str]]:
    """["compile=on,off", "batch=16,32"] -> {"compile": ["on", "off"], "batch": ["16", "32"]}."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise ConfigError(f"bad --compare '{item}'", "expected key=value1,value2, e.g. compile=on,off")
        out[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return out


def source_commit() -> str | None:
    """The git commit of the dynlm source that runs ('-dirty' when it has uncommitted changes), for
    results files; $DYNLM_COMMIT where the source is a copy without git metadata; else None."""
    source = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=source, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=source,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("DYNLM_COMMIT") or None
    return commit + ("-dirty" if dirty else "") if commit else os.environ.get("DYNLM_COMMIT") or None


# ---------------------------------------------------------------------------------------------
# Measurements


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _timed(fn: Callable[[], Any], steps: int, device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _synchronize(device)
    return time.perf_counter() - start


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def _build(cfg: BenchConfig, **extra: Any) -> torch.nn.Module:
    config = model_config(cfg.model, **{**cfg.overrides, **extra})
    return get_architecture(config.type)[1](config)


def bench_train(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:

    model = _build(cfg).to(device).train()
    model.fused_loss = cfg.fused_loss
    optimizer = build_optimizer(model, TrainConfig(), device)
    module = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    step = TrainStep(module, model, optimizer, device, dtype, clip=1.0)
    vocab = model.config.vocab_size
    batches = [torch.randint(0, vocab, (cfg.batch, cfg.seq_len), device=device) for _ in range(2)]
    counter = itertools.count()

    def one_step() -> None:
        step([batches[next(counter) % 2]])

    warmup_seconds = _timed(one_step, cfg.warmup, device)
    _reset_memory(device)
    seconds = _timed(one_step, cfg.steps, device)
    tokens_per_s = cfg.batch * cfg.seq_len * cfg.steps / seconds
    flops_per_token = model.flops_per_token(cfg.seq_len)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(device, dtype)[0]
    result = {"tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / cfg.steps, "mfu": mfu(tokens_per_s,
              flops_per_token, peak), "flops_per_token": flops_per_token, "parameters": model.num_parameters(),
              "peak_memory_bytes": _peak_memory(device), "warmup_seconds": warmup_seconds}
    return result


def bench_forward(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:

    model = _build(cfg).to(device).eval()
    input_ids = torch.randint(0, model.config.vocab_size, (cfg.batch, cfg.seq_len), device=device)

    def forward() -> None:
        with torch.inference_mode(), autocast(device, dtype):
            model(input_ids)

    _timed(forward, max(1, cfg.warmup), device)
    _reset_memory(device)
    seconds = _timed(forward, cfg.steps, device)
    result = {"tokens_per_s": cfg.batch * cfg.seq_len * cfg.steps / seconds, "step_ms": 1000 * seconds / cfg.steps,
              "peak_memory_bytes": _peak_memory(device)}
    return result


def _prefill(model: torch.nn.Module, prompt: torch.Tensor, capacity: int, dtype: torch.dtype,
             decoder: GraphDecoder | None) -> tuple[torch.Tensor, Any]:
    """-> logits [B, V] at the last prompt position, eager state (None with a decoder)."""
    if decoder is not None:
        return decoder.prefill(prompt, capacity - prompt.size(1)), None
    state = model.init_state(prompt.size(0), device=prompt.device, dtype=dtype, max_length=capacity)
    out = model(prompt, state=state)
    return out.logits[:, -1], out.state


def _decode(model: torch.nn.Module, decoder: GraphDecoder | None, logits: torch.Tensor, state: Any,
            tokens: int) -> Any:
    """Greedy decoding of `tokens` tokens from logits [B, V]; returns the eager state."""
    for _ in range(tokens):
        next_token = logits.argmax(-1)  # [B]
        if decoder is not None:
            logits = decoder.step(next_token)
        else:
            out = model(next_token[:, None], state=state)
            logits, state = out.logits[:, -1], out.state
    return state


@torch.inference_mode()
def decode_speed(model: torch.nn.Module, prompt: torch.Tensor, decode_tokens: int,
                 dtype: torch.dtype, graphs: bool = True) -> dict[str, Any]:
    """Prefill `prompt` [B, T] into a fresh state, then `decode_tokens` greedy steps of one token
    per row: decode and prefill tokens/s (all rows) and the state's bytes at the end. `model` is
    in eval mode, on the prompt's device, its weights in `dtype`. With `graphs`, models that
    support it decode with captured CUDA-graph steps (on CUDA only)."""
    device = prompt.device
    batch, context = prompt.shape
    capacity = context + decode_tokens
    decoder = GraphDecoder(model) if graphs and graphs_by_default(model) else None
    # warm-up: kernels, allocator, graph capture
    _decode(model, decoder, *_prefill(model, prompt, capacity, dtype, decoder), decode_tokens)
    _synchronize(device)
    start = time.perf_counter()
    logits, state = _prefill(model, prompt, capacity, dtype, decoder)
    _synchronize(device)
    prefill_seconds = time.perf_counter() - start
    start = time.perf_counter()
    state = _decode(model, decoder, logits, state, decode_tokens)
    _synchronize(device)
    decode_seconds = time.perf_counter() - start
    if decoder is not None:
        state = decoder.session.state
    return {"context": context, "decode_tokens_per_s": batch * decode_tokens / decode_seconds,
            "ms_per_token": 1000 * decode_seconds / decode_tokens,
            "prefill_tokens_per_s": batch * context / prefill_seconds,
            "state_bytes": model.state_nbytes(state), "peak_memory_bytes": _peak_memory(device),
            "graphs": decoder is not None}


def bench_decode(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> list[dict[str, Any]]:
    longest = max(cfg.decode_contexts) + cfg.decode_tokens
    model = _build(cfg, max_position_embeddings=max(longest, 16)).to(device=device, dtype=dtype).eval()
    vocab = model.config.vocab_size
    rows = []
    for context in cfg.decode_contexts:
        _reset_memory(device)
        prompt = torch.randint(0, vocab, (cfg.decode_batch, context), device=device)
        rows.append(decode_speed(model, prompt, cfg.decode_tokens, dtype, cfg.graphs))
    return rows


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    """Every measurement one config asks for."""

    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as in training: fp32 matmuls outside autocast
    torch.manual_seed(0)
    result: dict[str, Any] = {"label": cfg.label, "config": dataclasses.asdict(cfg), "dtype": str(dtype)}
    if cfg.train:
        if cfg.compile:
            torch._dynamo.reset()  # each variant compiles its own model
        result["train"] = bench_train(cfg, device, dtype)
    if cfg.forward:
        result["forward"] = bench_forward(cfg, device, dtype)
    if cfg.decode_contexts:
        result["decode"] = bench_decode(cfg, device, dtype)
    _reset_memory(device)
    return result


def run_suite(configs: list[BenchConfig], title: str = "dynlm bench",
              progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every config; ratios of training tokens/s are relative to the first."""

    device = resolve_device(configs[0].device)
    dtype = resolve_dtype(configs[0].dtype, device)
    peak, peak_source = peak_flops(device, dtype)
    if configs[0].peak_tflops:
        peak, peak_source = configs[0].peak_tflops * 1e12, f"given: {configs[0].peak_tflops:g} TFLOP/s"
    results = []
    for cfg in configs:
        if progress is not None:
            progress(f"benchmarking {cfg.label or cfg.model} ...")
        results.append(run_benchmark(cfg))
    base = results[0].get("train", {}).get("tokens_per_s")
    for r in results:
        if base and "train" in r:
            r["train"]["ratio"] = r["train"]["tokens_per_s"] / base
    return {"title": title, "device": device_name(device), "device_type": device.type,
            "torch": torch.__version__, "python": platform.python_version(), "commit": source_commit(),
            "peak_flops": peak, "peak_source": peak_source,
            "mfu_formula": "MFU = train tokens/s x FLOPs per token / peak; FLOPs per token = model.flops_per_token"
                           "(seq_len) = 6·N + 12·L·H·Q·T (nanoGPT; N = parameters in matmuls)",
            "results": results, "time": time.strftime("%Y-%m-%d %H:%M:%S")}


# ---------------------------------------------------------------------------------------------
# Reports


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def _compile_text(config: dict[str, Any]) -> str:
    if not config["compile"]:
        return "off"
    return "on" if config.get("compile_mode", "default") == "default" else f"on ({config['compile_mode']})"


def to_markdown(suite: dict[str, Any]) -> str:
    lines = [f"# {suite['title']}", "",
             f"Device: **{suite['device']}**, torch {suite['torch']}, {suite['time']}.", "",
             f"{suite['mfu_formula']}. Peak: {suite['peak_source']}.", ""]
    train_rows = [r for r in suite["results"] if "train" in r]
    if train_rows:
        lines += ["## Training step (forward + backward + AdamW)", "",
                  "| variant | model | params | batch x seq | dtype | compile | tokens/s | ratio | MFU | step ms "
                  "| FLOPs/token | peak memory |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in train_rows:
            c, t = r["config"], r["train"]
            mfu_text = "n/a" if t["mfu"] is None else f"{100 * t['mfu']:.1f}%"
            lines.append(f"| {r['label'] or '-'} | {c['model']} | {t['parameters'] / 1e6:.1f}M | {c['batch']} x "
                         f"{c['seq_len']} | {r['dtype'].removeprefix('torch.')} | {_compile_text(c)} | "
                         f"{t['tokens_per_s']:,.0f} | {t.get('ratio', 1.0):.2f} | {mfu_text} | {t['step_ms']:.1f} | "
                         f"{t['flops_per_token'] / 1e6:.0f}M | {_gib(t['peak_memory_bytes'])} |")
        lines.append("")
    forward_rows = [r for r in suite["results"] if "forward" in r]
    if forward_rows:
        lines += ["## Forward only (evaluation path, no gradients, eager)", "",
                  "| variant | model | batch x seq | tokens/s | ms | peak memory |", "|---|---|---|---|---|---|"]
        for r in forward_rows:
            c, f = r["config"], r["forward"]
            lines.append(f"| {r['label'] or '-'} | {c['model']} | {c['batch']} x {c['seq_len']} | "
                         f"{f['tokens_per_s']:,.0f} | {f['step_ms']:.1f} | {_gib(f['peak_memory_bytes'])} |")
        lines.append("")
    for r in suite["results"]:
        if not r.get("decode"):
            continue
        c = r["config"]
        lines += [f"## Decoding, batch {c['decode_batch']}, {c['decode_tokens']} new tokens per context "
                  f"({c['model']}{', ' + r['label'] if r['label'] else ''}, weights in "
                  f"{r['dtype'].removeprefix('torch.')}, "
                  f"{'CUDA graphs' if r['decode'][0].get('graphs') else 'eager'})", "",
                  "| context | decode tokens/s | ms/token | prefill tokens/s | state (KV) bytes | peak memory |",
                  "|---|---|---|---|---|---|"]
        for d in r["decode"]:
            lines.append(f"| {d['context']:,} | {d['decode_tokens_per_s']:,.1f} | {d['ms_per_token']:.2f} | "
                         f"{d['prefill_tokens_per_s']:,.0f} | {_bytes(d['state_bytes'])} | "
                         f"{_gib(d['peak_memory_bytes'])} |")
        lines.append("")
    return "\n".join(lines)


def write_suite(suite: dict[str, Any], out_dir: str | Path, name: str = "bench") -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(suite, indent=2) + "\n")
    md_path.write_text(to_markdown(suite) + "\n")
    return json_path, md_path
