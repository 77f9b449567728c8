"""Decoding speed on one GPU, every variant in one process: `transformers` `generate` (dynamic
cache, the peer, same weights), optionally `transformers` with its static cache (which `generate`
compiles itself), dynlm eager (the reference path), dynlm with CUDA graphs (length-bucketed
attention, the default), and dynlm graphs over an inductor-compiled step with each decode-step
attention kernel (`GraphDecoder(decode_attention=...)`: "sdpa" the reference, "split",
"math", "auto" the decoder's default pick; see src/dynlm/nn/decode_attention.py; a "flex" column in
older results was FlexAttention, since taken out). The compiled step projects q|k|v and gate|up
through fused weights (`nn/fusion.py`, the compiled decoder's default); `--compare-fusion` also
runs each compiled variant unfused, right after it, as a column of its own.

Random weights in bf16, greedy, prompts of random tokens that differ in every row. Rows: the
Qwen2.5-0.5B shape at batch 1 and 8, context 4,096 and 128, and the gpt2-small-like preset at
batch 1, context 128 (`--rows`). Decode tokens/s = batch x (new tokens - 1) / (time for all new
tokens - time for the first one), so prefill is left out for every variant alike. The floor is
the bytes one step must read (weights + the KV cache at the final length) over the datasheet
bandwidth. Parts run in order of importance under a time budget (`--budget-s`): first the cheap
parts of every row (eager, graphs, the peer), then each kernel's attention alone at each row's
shape (a small compile each), then the compiled step (~30 s of compilation for 24 layers): row by
row the reference kernel and the one fastest alone, then the other kernels. A part that would
start after the budget is recorded as skipped, a part that fails is recorded with its error, and
the results files are rewritten after every part.

    python benchmarks/gpu_decode.py --out $OUT          # on the GPU: at most ~5 minutes
    python benchmarks/gpu_decode.py --out $OUT --rows gpt2-small-like:1x128,qwen2.5-0.5b:1x128 --no-attention-alone
    python benchmarks/gpu_decode.py --smoke             # tiny shapes on any device: checks that it runs
    python benchmarks/gpu_decode.py --out $OUT --rows qwen2.5-0.5b:1x128 --kernels auto --compare-fusion \
        --no-attention-alone
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import dynlm
import dynlm.nn.decode_attention as decode_kernels
from dynlm.infer.graphs import CAPACITY_MULTIPLE, GraphDecoder, attend_bucket
from dynlm.nn.attention import CACHED_ATTENTION_BACKENDS, attention_mask, grouped_query_attention
from dynlm.nn.cache import EMPTY_SLOT

sys.path.insert(0, str(Path(__file__).parent))
import provenance  # noqa: E402

BANDWIDTH = 4.8e12  # H200 datasheet bytes/s (the floor's denominator; a lead, not a measurement)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def distinct_prompts(batch: int, length: int, vocab: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * batch + length)
    prompts = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    assert len({tuple(row.tolist()) for row in prompts}) == batch, "prompt rows must differ"
    return prompts


def ours(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, graphs: bool,
         compile: str | None = None, compile_backend: str = "inductor", kernel: str = "sdpa",
         fuse_projections: bool | None = None) -> dict[str, Any]:
    """Greedy decoding with dynlm; times the prefill and the decode loop separately. The sampled
    token is fed back on the device: no host sync inside the loop. `fuse_projections` None: the
    decoder's default (fused when compiled)."""
    decoder = None
    if graphs:
        decoder = GraphDecoder(model, compile=compile, compile_backend=compile_backend, decode_attention=kernel,
                               fuse_projections=fuse_projections)

    def run() -> tuple[float, float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        if decoder is not None:
            logits, state = decoder.prefill(prompts, new_tokens), None
        else:
            state = model.init_state(prompts.size(0), max_length=prompts.size(1) + new_tokens)
            logits = model(prompts, state=state).logits[:, -1]
        tokens = [logits.argmax(-1)]
        sync()
        middle = time.perf_counter()
        for _ in range(new_tokens - 1):
            if decoder is not None:
                logits = decoder.step(tokens[-1])
            else:
                logits = model(tokens[-1][:, None], state=state).logits[:, -1]
            tokens.append(logits.argmax(-1))
        sync()
        return middle - start, time.perf_counter() - middle, torch.stack(tokens, 1)

    with torch.no_grad():
        started = time.perf_counter()
        run()  # warm-up: kernels, allocator, compilation, graph capture
        warmup_s = time.perf_counter() - started
        prefill_s, decode_s, tokens = run()
    b = prompts.size(0)
    result = {"decode_tokens_per_s": b * (new_tokens - 1) / decode_s, "ms_per_step": 1000 * decode_s / (new_tokens - 1),
              "prefill_s": prefill_s, "warmup_s": warmup_s, "tokens": tokens}
    if decoder is not None:
        result["graph_steps"], result["eager_steps"] = decoder.graph_steps, decoder.eager_steps
    return result


def hf_model(config: Any, device: str) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    c = config
    hf_config = Qwen2Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                            num_key_value_heads=c.num_kv_heads, max_position_embeddings=c.max_position_embeddings,
                            rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings,
                            rms_norm_eps=c.rms_norm_eps, attn_implementation="sdpa")
    with torch.device(device):
        model = Qwen2ForCausalLM(hf_config)
    return model.to(torch.bfloat16 if device == "cuda" else torch.float32).eval()


def hf(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, static: bool) -> dict[str, Any]:
    """`generate`, greedy, exactly `new_tokens` new tokens; decode rate from the difference
    between generating all of them and generating one."""
    options: dict[str, Any] = dict(do_sample=False, pad_token_id=0)
    if static:
        options["cache_implementation"] = "static"

    def timed(n: int) -> tuple[float, torch.Tensor]:
        sync()
        start = time.perf_counter()
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                             **options)
        sync()
        return time.perf_counter() - start, out[:, prompts.size(1):]

    with torch.no_grad():
        started = time.perf_counter()
        timed(min(8, new_tokens))  # warm-up (and compilation)
        warmup_s = time.perf_counter() - started
        (one, _), (full, tokens) = timed(1), timed(new_tokens)
    b = prompts.size(0)
    return {"decode_tokens_per_s": b * (new_tokens - 1) / (full - one),
            "ms_per_step": 1000 * (full - one) / (new_tokens - 1), "prefill_s": one, "warmup_s": warmup_s,
            "tokens": tokens}


def attention_only(config: Any, batch: int, context: int, new_tokens: int, kernel: str, device: str,
                   dtype: torch.dtype, compile_backend: str) -> dict[str, Any]:
    """One layer's decode-step attention alone, compiled (and on CUDA replayed from a graph of 24
    calls): the slots the decoder attends over at the middle of the row's decode, the mask of
    their positions as the model builds it. Cheap to compile, so every shape gets every kernel."""
    capacity = -(-(context + new_tokens) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
    position = context + new_tokens // 2
    slots = attend_bucket(position, capacity)
    generator = torch.Generator().manual_seed(batch * context)
    q = torch.randn(batch, config.num_heads, 1, config.head_dim, generator=generator).to(device, dtype)
    k, v = (torch.randn(batch, config.num_kv_heads, slots, config.head_dim, generator=generator).to(device, dtype)
            for _ in range(2))
    filled = torch.arange(slots, device=device)
    mask = attention_mask(torch.tensor([position], device=device),
                          torch.where(filled <= position, filled, torch.full_like(filled, EMPTY_SLOT)))

    def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        with torch.nn.attention.sdpa_kernel(CACHED_ATTENTION_BACKENDS):
            return grouped_query_attention(q, k, v, mask)

    function = reference if kernel == "sdpa" else functools.partial(decode_kernels.decode_attention, kernel=kernel)
    compiled = torch.compile(function, dynamic=False, backend=compile_backend, fullgraph=True)
    calls = 24  # a graph of this many calls (a 24-layer step) makes the launch cost that of a replay
    with torch.no_grad():
        started = time.perf_counter()
        y = compiled(q, k, v, mask)
        error = float((y.float() - reference(q, k, v, mask).float()).abs().max())
        sync()
        compile_s = time.perf_counter() - started
        if device == "cuda":
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    compiled(q, k, v, mask)
            run = graph.replay
        else:
            def run() -> None:
                for _ in range(calls):
                    compiled(q, k, v, mask)
        run()
        sync()
        replays = 20 if device == "cuda" else 2
        started = time.perf_counter()
        for _ in range(replays):
            run()
        sync()
    return {"us_per_call": 1e6 * (time.perf_counter() - started) / (replays * calls), "slots": slots,
            "max_abs_error_vs_sdpa": error, "compile_s": compile_s}


def floor_ms(model: torch.nn.Module, batch: int, length: int) -> float:
    """Bytes a decode step must read (every weight once, the KV cache at `length`) / bandwidth."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    weights -= c.vocab_size * c.hidden_size * 2 if c.tie_word_embeddings else 0  # the lookup reads 1 row
    weights += c.vocab_size * c.hidden_size * 2  # the LM head reads the whole matrix
    kv = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * length * 2
    return 1000 * (weights + kv) / BANDWIDTH


def parse_rows(text: str) -> list[tuple[str, int, int]]:
    """"preset:BxT,preset:BxT" -> [(preset, batch, context)]."""
    rows = []
    for item in text.split(","):
        preset, shape = item.strip().split(":")
        batch, context = shape.split("x")
        rows.append((preset, int(batch), int(context)))
    return rows


DEFAULT_ROWS = "qwen2.5-0.5b:1x4096,qwen2.5-0.5b:8x4096,gpt2-small-like:1x128,qwen2.5-0.5b:1x128,qwen2.5-0.5b:8x128"
SMOKE_ROWS = "standard-tiny:1x16,standard-tiny:4x40,mod-tiny:1x16"
KERNEL_PARTS = {"sdpa": "dynlm_graphs_compile", "split": "dynlm_graphs_compile_split",
                "math": "dynlm_graphs_compile_math", "auto": "dynlm_graphs_compile_auto"}
ALONE_KERNELS = [k for k in KERNEL_PARTS if k != "auto"]  # "auto" is the decoder's pick, not a kernel
UNFUSED = "_unfused"  # suffix of a compiled part run with `fuse_projections=False`


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", help="the commit measured, where the tree has no .git")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=240.0, help="start no part after this many seconds")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled variants")
    parser.add_argument("--rows", help=f"preset:BATCHxCONTEXT,... in order of importance (default {DEFAULT_ROWS})")
    parser.add_argument("--kernels", default="sdpa,split,math",
                        help="decode attention kernels of the compiled step, in order of importance")
    parser.add_argument("--split-chunk", type=int, default=decode_kernels.SPLIT_CHUNK,
                        help="keys per chunk of the split kernel")
    parser.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--no-attention-alone", dest="attention_alone", action="store_false",
                        help="skip the attention-alone table")
    parser.add_argument("--compare-fusion", action="store_true",
                        help="also each compiled variant with unfused q/k/v and gate/up projections")
    parser.add_argument("--hf-static", action="store_true", help="also transformers' static cache (after the rest)")
    args = parser.parse_args()
    started = time.perf_counter()
    commit = provenance.commit(args.commit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # on a CPU the compiled variant only traces (dynamo, no inductor code): the smoke run checks
    # the path, not the speed
    compile_backend = "inductor" if device == "cuda" else "eager"
    kernels = [k.strip() for k in args.kernels.split(",")]
    unknown = [k for k in kernels if k not in KERNEL_PARTS]
    if unknown:
        parser.error(f"--kernels {','.join(unknown)}: not one of {', '.join(KERNEL_PARTS)}")
    overrides, new_tokens = {}, args.new_tokens
    if args.smoke:  # small chunks, so the split kernel splits the 256 slots of the tiny caches
        overrides, new_tokens, args.split_chunk = dict(vocab_size=512), 8, 64
    decode_kernels.SPLIT_CHUNK = args.split_chunk
    plan = parse_rows(args.rows or (SMOKE_ROWS if args.smoke else DEFAULT_ROWS))
    # one compilation per (kernel, shape) of the attention alone: more than dynamo's default limit
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": commit, "dtype": str(dtype),
              "compile_mode": args.compile_mode, "compile_backend": compile_backend, "budget_s": args.budget_s,
              "split_chunk": args.split_chunk, "kernels": kernels, "compare_fusion": args.compare_fusion,
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    print(f"commit {commit}, device {result['device']}", flush=True)
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        transformers = None
    models: dict[str, tuple[torch.nn.Module, torch.nn.Module | None]] = {}

    def load(preset: str) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """The preset with random weights and its peer on the same tensors, built once."""
        if preset not in models:
            with torch.device(device):
                model = dynlm.build_model(preset, **overrides)
            model = model.to(dtype).eval()
            peer = None
            if transformers is not None and model.config.type == "standard":
                peer = hf_model(model.config, device)  # the same weights: the peer reads dynlm's tensors
                theirs = peer.state_dict()
                shared = {k: v for k, v in model.state_dict().items() if k in theirs and theirs[k].shape == v.shape}
                peer.load_state_dict(shared, strict=False)
                result.setdefault("peer_tensors_shared", {})[preset] = f"{len(shared)} of {len(theirs)}"
            models[preset] = model, peer
        return models[preset]

    def part(row: dict[str, Any], name: str, function: Any, *fargs: Any, **kwargs: Any) -> None:
        """Run one measurement into row[name]: skipped past the budget, its error on failure."""
        elapsed = time.perf_counter() - started
        if elapsed > args.budget_s:
            row[name] = {"skipped": f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"}
        else:
            try:
                row[name] = function(*fargs, **kwargs)
            except Exception as error:  # a variant that fails is reported, not fatal
                row[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            finally:
                if device == "cuda":
                    torch.cuda.empty_cache()
        tokens = row[name].pop("tokens", None)
        if tokens is not None:
            if name == "dynlm_eager":
                row["_eager_tokens"] = tokens
            elif "_eager_tokens" in row:
                row[name]["same_tokens_as_eager"] = float((tokens == row["_eager_tokens"]).float().mean())
        print(f"[{time.perf_counter() - started:.0f} s] {row['model']} {row['batch']}x{row['context']} {name}: "
              f"{json.dumps(row[name])}", flush=True)
        write(args.out, result)  # after every part: a later failure or timeout keeps what was measured

    prompts_of = {}
    for preset, batch, context in plan:  # first every row's cheap parts, the eager tokens among them
        model, peer = load(preset)
        prompts = prompts_of[preset, batch, context] = distinct_prompts(batch, context, model.config.vocab_size,
                                                                         device)
        row: dict[str, Any] = {"model": preset, "batch": batch, "context": context, "new_tokens": new_tokens,
                               "floor_ms_per_step": floor_ms(model, batch, context + new_tokens)}
        rows.append(row)
        part(row, "dynlm_eager", ours, model, prompts, new_tokens, graphs=False)
        part(row, "dynlm_graphs", ours, model, prompts, new_tokens, graphs=True)
        if peer is not None:
            part(row, "hf_generate", hf, peer, prompts, new_tokens, static=False)
    for row in rows if args.attention_alone else []:  # each kernel alone at each row's shape: seconds each
        model, _ = load(row["model"])
        for kernel in [k for k in kernels if k in ALONE_KERNELS]:
            part(row, f"attention_{kernel}", attention_only, model.config, row["batch"], row["context"], new_tokens,
                 kernel, device, dtype, compile_backend)
    # then the compiled step (~30 s of compilation each): first, row by row, the reference kernel
    # and the kernel fastest alone at that shape; then the other kernels
    first_round, second_round = [], []
    for row in rows:
        alone = {k: row.get(f"attention_{k}", {}).get("us_per_call", float("inf")) for k in kernels if k != "auto"}
        # stable: --kernels order on ties
        ranked = sorted([k for k in kernels if k != "sdpa"], key=lambda k: alone.get(k, float("inf")))
        head = (["sdpa"] if "sdpa" in kernels else []) + ranked[:1]
        first_round += [(row, k) for k in head]
        second_round += [(row, k) for k in kernels if k not in head]
    for row, kernel in first_round + second_round:
        model, _ = load(row["model"])
        for fuse in [None, False] if args.compare_fusion else [None]:  # None: fused, the default
            part(row, KERNEL_PARTS[kernel] + ("" if fuse is None else UNFUSED), ours, model,
                 prompts_of[row["model"], row["batch"], row["context"]], new_tokens, graphs=True,
                 compile=args.compile_mode, compile_backend=compile_backend, kernel=kernel, fuse_projections=fuse)
    for row in rows if args.hf_static and device == "cuda" else []:
        _, peer = load(row["model"])
        if peer is not None:
            part(row, "hf_static", hf, peer, prompts_of[row["model"], row["batch"], row["context"]], new_tokens,
                 static=True)
    result["wall_s"] = time.perf_counter() - started
    write(args.out, result)
    print(to_markdown(result))


def write(out: Path | None, result: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    clean = {**result, "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["rows"]]}
    (out / "gpu_decode.json").write_text(json.dumps(clean, indent=1) + "\n")
    (out / "gpu_decode.md").write_text(to_markdown(result))


COLUMNS = [("hf_generate", "transformers generate"), ("hf_static", "transformers static cache (compiled by generate)"),
           ("dynlm_eager", "dynlm eager"), ("dynlm_graphs", "dynlm graphs"),
           ("dynlm_graphs_compile", "dynlm graphs + compile, sdpa attention"),
           ("dynlm_graphs_compile_split", "dynlm graphs + compile, split attention"),
           ("dynlm_graphs_compile_math", "dynlm graphs + compile, math attention"),
           ("dynlm_graphs_compile_auto", "dynlm graphs + compile, auto attention")]
COLUMNS += [(key + UNFUSED, title + ", unfused projections") for key, title in COLUMNS[4:]]


def _cell(part: dict[str, Any] | None) -> str:
    if part is None:
        return "-"
    if "decode_tokens_per_s" in part:
        same = part.get("same_tokens_as_eager")
        return f"{part['decode_tokens_per_s']:,.1f}" + ("" if same is None else f" ({100 * same:.0f}%)")
    return "skipped" if "skipped" in part else "failed (see json)"


def to_markdown(result: dict[str, Any]) -> str:
    models = ", ".join(dict.fromkeys(r["model"] for r in result["rows"]))
    lines = [f"# Decoding: {models}, transformers vs dynlm eager, graphs, graphs + compile with each decode "
             "attention kernel (one run)", "",
             f"Device: **{result['device']}**, torch {result['torch']}, transformers "
             f"{result.get('transformers', '-')}, commit {result['commit']}, {result['time']}"
             + (f", {result['wall_s']:.0f} s" if "wall_s" in result else " (partial)") + ". Random weights in "
             f"{result['dtype'].removeprefix('torch.')} (the peer loads the same tensors), greedy, distinct random "
             "prompts per row; decode tokens/s excludes prefill. Compile: torch.compile mode "
             f"{result['compile_mode']}, backend {result['compile_backend']}, captured in our CUDA graph; decode "
             f"attention kernels as in src/dynlm/nn/decode_attention.py (split: {result['split_chunk']} keys per "
             "chunk). In brackets: tokens equal to dynlm eager's. Floor: bytes read per step (weights + KV cache) "
             "/ 4.8 TB/s (datasheet).", "",
             "| model | batch | context | " + " | ".join(f"{title} tok/s" for _, title in COLUMNS)
             + " | best compiled kernel / sdpa | fused / unfused projections | best dynlm / transformers generate "
             "| best dynlm ms/step | floor ms/step |",
             "|---|---|---|" + "---|" * (len(COLUMNS) + 5)]
    for r in result["rows"]:
        ours_rates = {k: r[k]["decode_tokens_per_s"] for k, _ in COLUMNS[2:] if "decode_tokens_per_s" in r.get(k, {})}
        best = max(ours_rates.values(), default=None)
        peer = r.get("hf_generate", {}).get("decode_tokens_per_s")
        ratio = "-" if best is None or peer is None else f"{best / peer:.1f}x"
        best_ms = "-" if best is None else f"{1000 * r['batch'] / best:.2f}"
        compiled = {k: v for k, v in ours_rates.items()
                    if k.startswith("dynlm_graphs_compile") and not k.endswith(UNFUSED)}
        fusion = [f"{k.removeprefix('dynlm_graphs_compile').lstrip('_') or 'sdpa'} {v / ours_rates[k + UNFUSED]:.2f}x"
                  for k, v in compiled.items() if k + UNFUSED in ours_rates]
        kernel = "-"
        if "dynlm_graphs_compile" in compiled and len(compiled) > 1:
            name = max(compiled, key=compiled.get)
            kernel = (f"{(name.removeprefix('dynlm_graphs_compile').lstrip('_') or 'sdpa')} "
                      f"{compiled[name] / compiled['dynlm_graphs_compile']:.2f}x")
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']:,} | "
                     + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS)
                     + f" | {kernel} | {', '.join(fusion) or '-'} | {ratio} | {best_ms} "
                     f"| {r['floor_ms_per_step']:.3f} |")
    lines += ["", "Attention alone (one layer's decode-step attention, compiled, replayed from a CUDA graph of 24 "
              "calls; the slots the decoder attends over at the middle of the row's decode, positions past it masked): "
              "microseconds per call.", "",
              "| model | batch | context | slots | " + " | ".join(f"{k} us" for k in ALONE_KERNELS)
              + " | best / sdpa | max abs error vs sdpa (per kernel) |",
              "|---|---|---|---|" + "---|" * (len(ALONE_KERNELS) + 2)]
    for r in result["rows"]:
        times = {k: r[f"attention_{k}"] for k in ALONE_KERNELS if "us_per_call" in r.get(f"attention_{k}", {})}
        if not times:
            continue
        slots = next(iter(times.values()))["slots"]
        best = min(times, key=lambda k: times[k]["us_per_call"])
        ratio = f"{best} {times['sdpa']['us_per_call'] / times[best]['us_per_call']:.2f}x" if "sdpa" in times else "-"
        cells = [f"{times[k]['us_per_call']:.1f}" if k in times else _cell(r.get(f"attention_{k}"))
                 for k in ALONE_KERNELS]
        errors_cell = ", ".join(f"{k} {t['max_abs_error_vs_sdpa']:.1e}" for k, t in times.items())
        lines.append(f"| {r['model']} | {r['batch']} | {r['context']:,} | {slots:,} | " + " | ".join(cells)
                     + f" | {ratio} | {errors_cell} |")
    errors = [f"- {r['model']} {r['batch']}x{r['context']} {k}: {r[k]['error']}" for r in result["rows"]
              for k in [c for c, _ in COLUMNS] + [f"attention_{k}" for k in ALONE_KERNELS]
              if isinstance(r.get(k), dict) and "error" in r[k]]
    if errors:
        lines += ["", "Failures:", *errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
