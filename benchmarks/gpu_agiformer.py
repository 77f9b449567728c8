"""GPU figures of AGIFORMER, each next to its baseline in the same process.

    python benchmarks/gpu_agiformer.py --out OUT --commit SHA            # on a CUDA GPU
    python benchmarks/gpu_agiformer.py --smoke --out /tmp/agi_smoke       # tiny shapes, any device

1. Decayed linear attention, forward + backward, B=1, H=16, D=64, T in {8K, 2K, 32K}, bf16 inputs:
   causal SDPA (flash) vs our vectorised chunked form eager, compiled in each `--modes` at each
   `--chunks` length, and the default compile captured whole (forward + backward) in one CUDA
   graph; flash-linear-attention's `chunk_simple_gla` when it imports and runs (its error is
   recorded otherwise). Each variant's output and dq are checked against the fp32 recurrent
   reference at the shortest length. A time budget (`--budget-s`) cuts the slowest-to-compile
   variants last; what it cut is recorded as skipped.
2. Training bytes/s: agiformer-31m on bytes vs a standard transformer of equal parameters on
   BPE tokens (its tokens/s times the BPE's measured bytes per token, passed in).
3. Decode: state bytes and ms per byte/token after contexts of 1K ... 32K (batch 1).
Writes gpu_agiformer_<parts>_<device>.json and .md (e.g. gpu_agiformer_kernel_sweep_h200.md
for `--parts kernel` on an H200); partial results are written after each length and each part.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dynlm.eval.flops import device_name
from dynlm.nn.linear_attention import chunked_linear_attention, recurrent_linear_attention
from dynlm.train.bench import BenchConfig, run_suite

# standard body with the parameters of agiformer-31m (37.95M): 9 layers x 512, vocab 2048 -> 38.8M
STANDARD_EQUAL = {"hidden_size": 512, "num_layers": 9, "num_heads": 8, "num_kv_heads": 8,
                  "intermediate_size": 2048, "vocab_size": 2048, "max_position_embeddings": 65536}


def time_ms(fn: Callable[[], Any], warmup: int, iters: int) -> float:
    """Mean milliseconds per call of `fn` (CUDA events on a GPU, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return 1000 * (time.perf_counter() - start) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def cuda_graphed(step: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> tuple[Callable[[], Any], Any]:
    """Capture `step` (forward + backward on fixed input tensors) in one CUDA graph: a replay
    launches every kernel of the step at once, removing the per-kernel launch overhead.
    Returns (replay, the captured output tensor, refreshed by each replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the graph (allocations, autotuning, lazy init)
        for _ in range(3):
            for leaf in leaves:
                leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None  # the grads are allocated inside the graph, written (not accumulated) by each replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


def _relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.float() - reference.float()).abs().max() / reference.float().abs().max().clamp(min=1e-30))


def kernel_variants(chunks: list[int], modes: list[str], cuda: bool) -> list[dict[str, Any]]:
    """Our fast variants, most informative first (a time budget may cut the tail): eager, then
    each compile mode at each chunk length, then CUDA-graph captures of the default compile."""
    variants = [{"name": f"eager c{chunks[0]}", "chunk": chunks[0], "mode": None, "graph": False}]
    captures = []  # last: a failed capture can leave the CUDA context unusable for what follows
    for mode in modes:
        for chunk in chunks:
            variants.append({"name": f"compile {mode} c{chunk}", "chunk": chunk, "mode": mode, "graph": False})
            if cuda and mode == "default":
                captures.append({"name": f"compile default + CUDA graph c{chunk}", "chunk": chunk, "mode": mode,
                                 "graph": True})
    return variants + captures


def _compiled(mode: str | None, cache: dict[str | None, Any]) -> Any:
    if mode not in cache:
        cache[mode] = chunked_linear_attention if mode is None else torch.compile(
            chunked_linear_attention, dynamic=False, mode=None if mode == "default" else mode)
    return cache[mode]


def _kernel_row(t: int, heads: int, dim: int, variants: list[dict[str, Any]], compiled: dict[str | None, Any],
                fla_fn: Any, check: bool, deadline: float, device: torch.device,
                on_update: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(t)
    q, k, v = (torch.randn(1, heads, t, dim, device=device, generator=g).bfloat16().requires_grad_()
               for _ in range(3))
    log_decay = (-torch.rand(1, heads, t, device=device, generator=g) * 0.05).requires_grad_()
    grad = torch.randn(1, heads, t, dim, device=device, generator=g)
    leaves = [q, k, v, log_decay]
    row: dict[str, Any] = {"T": t, "variants": {}}
    reference = None
    if check:  # the recurrent reference in fp32 on the same (bf16-valued) inputs: output and dq
        ref_q = q.detach().float().requires_grad_()
        ref_o, _ = recurrent_linear_attention(ref_q, k.detach().float(), v.detach().float(), log_decay.detach())
        ref_o.backward(grad)
        reference = (ref_o.detach(), ref_q.grad)
        row["checked_against"] = "recurrent reference, fp32 (output and dq), relative max error"

    def record_error(entry: dict[str, Any], out: torch.Tensor, dq: torch.Tensor) -> None:
        if reference is not None:
            entry["max_rel_error_out"] = _relative_error(out, reference[0])
            entry["max_rel_error_dq"] = _relative_error(dq, reference[1])

    if device.type == "cuda":
        def sdpa():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad.bfloat16())

        row["sdpa_flash_ms"] = time_ms(sdpa, 3, 20)
    for variant in variants:
        entry: dict[str, Any] = {"chunk": variant["chunk"], "mode": variant["mode"] or "eager",
                                 "cuda_graph": variant["graph"]}
        row["variants"][variant["name"]] = entry
        if time.time() > deadline:
            entry["skipped"] = "time budget"
            continue
        try:
            fn, chunk = _compiled(variant["mode"], compiled), variant["chunk"]

            def step(fn=fn, chunk=chunk, mode=variant["mode"]) -> torch.Tensor:
                if mode == "reduce-overhead":  # cudagraph trees: a new step, the previous outputs may go
                    torch.compiler.cudagraph_mark_step_begin()
                out = fn(q, k, v, log_decay, None, chunk)[0]
                out.backward(grad)
                return out

            started = time.time()
            if variant["graph"]:
                replay, out = cuda_graphed(step, leaves)
                entry["ms"] = time_ms(replay, 3, 20)
                replay()
            else:
                step()  # compiles here
                entry["ms"] = time_ms(step, 2, 10 if device.type == "cuda" else 2)
                for leaf in leaves:
                    leaf.grad = None
                out = step()
            entry["setup_and_timing_s"] = time.time() - started
            record_error(entry, out.detach(), q.grad)
            if "sdpa_flash_ms" in row:
                entry["over_sdpa"] = entry["ms"] / row["sdpa_flash_ms"]
        except Exception as e:  # noqa: BLE001 - recorded, the next variant still runs
            entry["error"] = _first_line(e)
        finally:
            for leaf in leaves:
                leaf.grad = None
        on_update(row)  # partial results survive a kill during the next (maybe long) compile
    if fla_fn is not None:
        entry = row["fla_chunk_simple_gla"] = {}
        # fla's layout [B, T, H, D] (contiguous copies, made once); g is the per-step log-decay;
        # scale 1 as ours (fla's default is D^-0.5)
        fq, fk, fv, fg = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, log_decay))
        fla_grad = grad.bfloat16().transpose(1, 2).contiguous()

        def fla_step() -> torch.Tensor:
            out, _ = fla_fn(fq, fk, fv, g=fg, scale=1.0)
            out.backward(fla_grad)
            return out.transpose(1, 2)
        try:
            entry["ms"] = time_ms(fla_step, 2, 10)
            fq.grad = None
            record_error(entry, fla_step().detach(), fq.grad.transpose(1, 2))
            if "sdpa_flash_ms" in row:
                entry["over_sdpa"] = entry["ms"] / row["sdpa_flash_ms"]
        except Exception as e:  # noqa: BLE001 - fla refusing this GPU's Triton is a finding
            entry["error"] = "run: " + _first_line(e)
    timed = [e["ms"] for e in row["variants"].values() if "ms" in e]
    if timed and "sdpa_flash_ms" in row:
        best = min(row["variants"].items(), key=lambda item: item[1].get("ms", float("inf")))
        row["best_variant"], row["best_over_sdpa"] = best[0], best[1]["ms"] / row["sdpa_flash_ms"]
    return row


def kernel_bench(lengths: list[int], heads: int, dim: int, chunks: list[int], modes: list[str], budget_s: float,
                 device: torch.device, progress: Callable[[list[dict[str, Any]]], None]) -> dict[str, Any]:
    """Every variant at every length in one process, with SDPA; lengths in the order given (put
    the one that matters most first), each given an equal share of the remaining time budget."""
    # one compiled function per (mode, chunk, length): more than dynamo's default cache holds
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    fla_fn, fla_error = None, None
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        fla_fn = chunk_simple_gla
    except Exception as e:  # noqa: BLE001 - any import failure is the finding
        fla_error = "import: " + _first_line(e)
    if device.type != "cuda":
        fla_fn, fla_error = None, "not run: needs CUDA (Triton)"
    variants = kernel_variants(chunks, modes, device.type == "cuda")
    compiled: dict[str | None, Any] = {}
    result: dict[str, Any] = {"lengths": lengths, "chunks": chunks, "modes": modes, "budget_s": budget_s,
                              "fla_error": fla_error, "rows": []}
    started = time.time()
    for i, t in enumerate(lengths):
        share = (budget_s - (time.time() - started)) / (len(lengths) - i)
        row = _kernel_row(t, heads, dim, variants, compiled, fla_fn, check=t == min(lengths),
                          deadline=time.time() + share, device=device,
                          on_update=lambda partial_row: progress([*result["rows"], partial_row]))
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        progress(result["rows"])
    return result


def results_name(parts: set[str], device: str) -> str:
    """gpu_agiformer_<parts>_<device>: e.g. gpu_agiformer_kernel_sweep_h200 on an NVIDIA H200."""
    if device.startswith("CPU"):
        tag = "cpu"
    else:  # "NVIDIA H200" -> h200
        tag = re.sub(r"[^a-z0-9]+", "-", device.lower().split()[-1]).strip("-") or "device"
    labels = {"kernel": "kernel_sweep", "models": "models"}  # kernel_sweep: the variant sweep of this version
    return f"gpu_agiformer_{'_'.join(labels[p] for p in labels if p in parts)}_{tag}"


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{result['name']}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{result['name']}.md").write_text(to_markdown(result))


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# AGIFORMER on {result['device']}", "",
             f"Produced by `benchmarks/gpu_agiformer.py` at commit {result['commit']}; torch {result['torch']}.", ""]
    kernel = result.get("kernel")
    if kernel:
        lines += ["## Decayed linear attention vs causal SDPA (flash), forward + backward, B=1, H=16, D=64, bf16", "",
                  "Every variant in the same process as SDPA. Ours: the vectorised chunked form "
                  "(`chunked_linear_attention`) eager, under `torch.compile` modes, and the compiled step captured "
                  "whole (forward + backward) in one CUDA graph. Errors: relative max error against the fp32 "
                  f"recurrent reference at T={min(kernel['lengths'])}, of the output and of dq. Time budget "
                  f"{kernel['budget_s']:.0f} s.", ""]
        for row in kernel["rows"]:
            sdpa = row.get("sdpa_flash_ms")
            lines += [f"### T = {row['T']}" + (f": SDPA flash {sdpa:.3f} ms" if sdpa else ""), "",
                      "| variant | ms | / SDPA | rel. error out | rel. error dq | note |", "|---|---|---|---|---|---|"]
            entries = list(row["variants"].items())
            if "fla_chunk_simple_gla" in row:
                entries.append(("fla chunk_simple_gla", row["fla_chunk_simple_gla"]))
            for name, e in entries:
                cells = [f"{e['ms']:.3f}" if "ms" in e else "-", f"{e['over_sdpa']:.2f}x" if "over_sdpa" in e else "-",
                         f"{e['max_rel_error_out']:.1e}" if "max_rel_error_out" in e else "-",
                         f"{e['max_rel_error_dq']:.1e}" if "max_rel_error_dq" in e else "-",
                         e.get("error") or e.get("skipped") or ""]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
            if "best_variant" in row:
                lines += ["", f"Best: {row['best_variant']}, {row['best_over_sdpa']:.2f}x SDPA's time."]
            lines.append("")
        if kernel.get("fla_error"):
            lines += [f"flash-linear-attention: {kernel['fla_error']}", ""]
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
    parser.add_argument("--lengths", default="8192,2048,32768",
                        help="sequence lengths of the kernel benchmark, most important first")
    parser.add_argument("--chunks", default="64,128,256", help="chunk lengths of our chunked form")
    parser.add_argument("--modes", default=None,
                        help="torch.compile modes tried, comma-separated (the default mode is also captured in a "
                             "CUDA graph); default: default,reduce-overhead,max-autotune-no-cudagraphs, none with "
                             "--smoke (a compile takes minutes on a loaded CPU)")
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="time budget of the kernel part (variants past it are recorded as skipped)")
    parser.add_argument("--parts", default="kernel,models", help="kernel, models or both")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_agiformer: no CUDA device (use --smoke to check the script)", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"device": device_name(device), "commit": args.commit, "torch": torch.__version__,
                              "bpe_bytes_per_token": args.bpe_bytes_per_token, "errors": [],
                              "name": results_name(parts, device_name(device))}
    started = time.time()
    if "kernel" in parts:
        lengths = [int(t) for t in args.lengths.split(",")]
        chunks = [int(c) for c in args.chunks.split(",")]
        heads, dim = (16, 64) if not args.smoke else (2, 16)
        if args.smoke:
            lengths, chunks = [min(t, 96) for t in lengths[:1]], [c for c in chunks if c <= 32] or [16]

        def partial(rows: list[dict[str, Any]]) -> None:
            result["kernel"] = {"lengths": lengths, "budget_s": args.budget_s, "rows": rows, "partial": True}
            write(args.out, result)
        modes = args.modes if args.modes is not None else (
            "" if args.smoke else "default,reduce-overhead,max-autotune-no-cudagraphs")
        try:
            result["kernel"] = kernel_bench(lengths, heads, dim, chunks, [m for m in modes.split(",") if m],
                                            args.budget_s, device, partial)
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
