"""GPU figures of AGIFORMER, each next to its baseline in the same process.

    python benchmarks/gpu_agiformer.py --out OUT --commit SHA            # on a CUDA GPU
    python benchmarks/gpu_agiformer.py --smoke --out /tmp/agi_smoke       # tiny shapes, any device

1. Decayed linear attention, forward + backward, B=1, H=16, D=64, T in {2K, 8K, 32K}, bf16 inputs:
   causal SDPA (flash) vs our vectorised chunked form (eager and torch.compile), the readable
   chunk loop at 2K and 8K only (it is the reference, not a product), and flash-linear-attention's
   `chunk_simple_gla` when it imports and runs (its error is recorded otherwise).
2. Training bytes/s: agiformer-31m on bytes vs a standard transformer of equal parameters on
   BPE tokens (its tokens/s times the BPE's measured bytes per token, passed in).
3. Decode: state bytes and ms per byte/token after contexts of 1K ... 32K (batch 1).
Writes gpu_agiformer.json and gpu_agiformer.md; partial results are written after each part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynlm.eval.flops import device_name
from dynlm.nn.linear_attention import chunked_linear_attention, chunked_linear_attention_loop
from dynlm.train.bench import BenchConfig, run_suite

# standard body with the parameters of agiformer-31m (37.95M): 9 layers x 512, vocab 2048 -> 38.8M
STANDARD_EQUAL = {"hidden_size": 512, "num_layers": 9, "num_heads": 8, "num_kv_heads": 8,
                  "intermediate_size": 2048, "vocab_size": 2048, "max_position_embeddings": 65536}


def time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _kernel_row(t: int, heads: int, dim: int, chunk: int, compiled: Any, fla_fn: Any) -> dict[str, Any]:
    g = torch.Generator(device="cuda").manual_seed(t)
    q, k, v = (torch.randn(1, heads, t, dim, device="cuda", generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    log_decay = (-torch.rand(1, heads, t, device="cuda", generator=g) * 0.05).requires_grad_()
    grad = torch.randn(1, heads, t, dim, device="cuda", generator=g)
    row: dict[str, Any] = {"T": t}

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad.bfloat16())

    def ours(fn):
        def step():
            fn(q, k, v, log_decay, None, chunk)[0].backward(grad)
        return step

    row["sdpa_flash_ms"] = time_ms(sdpa, 3, 10)
    row["ours_eager_ms"] = time_ms(ours(chunked_linear_attention), 2, 5)
    try:
        row["ours_compiled_ms"] = time_ms(ours(compiled), 2, 10)
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        row["ours_compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0]}"
    if t <= 8192:
        row["chunk_loop_fp32_ms"] = time_ms(ours(chunked_linear_attention_loop), 1, 2)
    if fla_fn is not None:
        def fla_step():
            # fla layout [B, T, H, D]; g is the per-step log-decay; scale 1 as ours (its default is D^-0.5)
            out, _ = fla_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            g=log_decay.transpose(1, 2), scale=1.0)
            out.backward(grad.bfloat16().transpose(1, 2))
        try:
            row["fla_chunk_simple_gla_ms"] = time_ms(fla_step, 2, 10)
        except Exception as e:  # noqa: BLE001
            row["fla_run_error"] = f"run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return row


def kernel_bench(lengths: list[int], heads: int, dim: int, chunk: int) -> list[dict[str, Any]]:
    rows = []
    compiled = torch.compile(chunked_linear_attention, dynamic=False)
    fla_fn, fla_error = None, None
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        fla_fn = chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        fla_error = f"import: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    for t in lengths:
        row = _kernel_row(t, heads, dim, chunk, compiled, fla_fn)
        fla_error = row.pop("fla_run_error", None) or fla_error
        if fla_error:
            row["fla_error"] = fla_error
        best = min(row.get("ours_compiled_ms", float("inf")), row["ours_eager_ms"])
        row["ours_best_over_sdpa"] = best / row["sdpa_flash_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_agiformer.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "gpu_agiformer.md").write_text(to_markdown(result))


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# AGIFORMER on {result['device']}", "",
             f"Produced by `benchmarks/gpu_agiformer.py` at commit {result['commit']}; torch {result['torch']}.", ""]
    if result.get("kernel"):
        lines += ["## Decayed linear attention vs causal SDPA (flash), forward + backward, B=1, H=16, D=64, bf16", "",
                  f"Our chunk length: {result['chunk']}.", "",
                  "| T | SDPA flash ms | ours compiled ms | ours eager ms | chunk loop fp32 ms | fla simple_gla ms |"
                  " best ours / SDPA |", "|---|---|---|---|---|---|---|"]
        keys = ["sdpa_flash_ms", "ours_compiled_ms", "ours_eager_ms", "chunk_loop_fp32_ms", "fla_chunk_simple_gla_ms"]
        for r in result["kernel"]:
            cells = " | ".join(f"{r[key]:.3f}" if key in r else "-" for key in keys)
            lines.append(f"| {r['T']} | {cells} | {r['ours_best_over_sdpa']:.2f}x |")
        errors = {r.get("fla_error") for r in result["kernel"]} - {None}
        if errors:
            lines += ["", "flash-linear-attention: " + "; ".join(sorted(errors))]
        lines.append("")
    if result.get("models"):
        bpt = result["bpe_bytes_per_token"]
        lines += ["## Training throughput at equal parameters (bf16 autocast, eager)", "",
                  f"The standard model's bytes/s = its tokens/s x {bpt:.3f} bytes per BPE-2048 token "
                  "(measured on the Shakespeare validation split).", "",
                  "| model | parameters | batch x seq | tokens/s | bytes/s | step ms | peak GiB |",
                  "|---|---|---|---|---|---|---|"]
        for r in result["models"]["results"]:
            if "train" not in r:
                continue
            tr, cfg = r["train"], r["config"]
            per = 1.0 if cfg["model"].startswith("agiformer") else bpt
            peak = tr["peak_memory_bytes"] / 2**30 if tr.get("peak_memory_bytes") else float("nan")
            lines.append(f"| {r['label']} | {tr['parameters'] / 1e6:.2f}M | {cfg['batch']} x {cfg['seq_len']} | "
                         f"{tr['tokens_per_s']:,.0f} | {tr['tokens_per_s'] * per:,.0f} | {tr['step_ms']:.1f} | "
                         f"{peak:.2f} |")
        lines += ["", "## Decode (batch 1, bf16 weights): state size vs context", "",
                  "| model | context | state bytes | ms per step | peak GiB |", "|---|---|---|---|---|"]
        for r in result["models"]["results"]:
            for d in r.get("decode", []):
                peak = d["peak_memory_bytes"] / 2**30 if d.get("peak_memory_bytes") else float("nan")
                lines.append(f"| {r['label']} | {d['context']} | {d['state_bytes']:,} | {d['ms_per_token']:.2f} | "
                             f"{peak:.2f} |")
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {e}" for e in result["errors"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--commit", default="unknown", help="git commit of the code measured")
    parser.add_argument("--bpe-bytes-per-token", type=float, default=1.0,
                        help="bytes per token of the standard model's BPE tokenizer (for bytes/s)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on any device (checks the script)")
    parser.add_argument("--lengths", default="2048,8192,32768", help="sequence lengths of the kernel benchmark")
    parser.add_argument("--chunk", type=int, default=64, help="chunk length of our chunked form")
    parser.add_argument("--parts", default="kernel,models", help="kernel, models or both")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_agiformer: no CUDA device (use --smoke to check the script)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"device": device_name(device), "commit": args.commit, "torch": torch.__version__,
                              "bpe_bytes_per_token": args.bpe_bytes_per_token, "errors": []}
    started = time.time()
    parts = set(args.parts.split(","))
    result["chunk"] = args.chunk
    if device.type == "cuda" and "kernel" in parts:
        try:
            lengths = [int(t) for t in args.lengths.split(",")]
            result["kernel"] = kernel_bench(lengths, heads=16, dim=64, chunk=args.chunk)
        except Exception:  # noqa: BLE001 - keep the other parts
            result["errors"].append("kernel: " + traceback.format_exc().splitlines()[-1])
        write(args.out, result)
    seq, batch, contexts = (2048, 8, [1024, 8192, 32768]) if not args.smoke else (64, 2, [16, 64])
    agi = dict(model="agiformer-31m" if not args.smoke else "agiformer-tiny", seq_len=seq, batch=batch,
               steps=10 if not args.smoke else 2, warmup=3 if not args.smoke else 1)
    std = dict(agi, model="standard-tiny" if args.smoke else "standard-quick",
               overrides={} if args.smoke else STANDARD_EQUAL)
    configs = [BenchConfig(**agi, forward=False, label="agiformer-31m (bytes)"),
               BenchConfig(**std, forward=False, label="standard 9x512 (BPE tokens)"),
               BenchConfig(**dict(agi, batch=1), train=False, forward=False, decode_contexts=contexts,
                           decode_tokens=32, label="agiformer-31m decode"),
               BenchConfig(**dict(std, batch=1), train=False, forward=False, decode_contexts=contexts,
                           decode_tokens=32, label="standard 9x512 decode")]
    try:
        if "models" in parts:
            result["models"] = run_suite(configs, title="agiformer vs standard")
    except Exception:  # noqa: BLE001
        result["errors"].append("models: " + traceback.format_exc().splitlines()[-1])
    result["seconds"] = time.time() - started
    write(args.out, result)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
