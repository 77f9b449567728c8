"""Decoding speed on one GPU, every variant in one process: `transformers` `generate` (dynamic
cache, the peer, same weights), `transformers` with its static cache (which `generate` compiles
itself) where it runs, dynlm eager (the reference path), dynlm with CUDA graphs (length-bucketed
attention, the default), and dynlm graphs over an inductor-compiled step (and at context 4,096 the
same with cached attention on the math kernel, which inductor fuses).

Random weights in bf16, greedy, prompts of random tokens that differ in every row, batch 1 and 8,
context 128 and 4,096. Decode tokens/s = batch x (new tokens - 1) / (time for all new tokens -
time for the first one), so prefill is left out for every variant alike. The floor is the bytes
one step must read (weights + the KV cache at the final length) over the datasheet bandwidth.
Parts run in order of importance under a time budget (`--budget-s`): a part that would start
after it is recorded as skipped, a part that fails is recorded with its error, and the results
files are rewritten after every part.

    python benchmarks/gpu_decode.py --out $OUT          # on the GPU: at most ~5 minutes
    python benchmarks/gpu_decode.py --smoke             # tiny shapes on any device: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend

import dynlm
import dynlm.nn.attention as attention
from dynlm.infer.graphs import GraphDecoder

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
         compile: str | None = None, compile_backend: str = "inductor") -> dict[str, Any]:
    """Greedy decoding with dynlm; times the prefill and the decode loop separately. The sampled
    token is fed back on the device: no host sync inside the loop."""
    decoder = GraphDecoder(model, compile=compile, compile_backend=compile_backend) if graphs else None

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


def math_attention(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`function` with cached attention forced onto the math kernel (matmuls + softmax)."""
    default = attention.CACHED_ATTENTION_BACKENDS
    attention.CACHED_ATTENTION_BACKENDS = [SDPBackend.MATH]
    try:
        return function(*args, **kwargs)
    finally:
        attention.CACHED_ATTENTION_BACKENDS = default


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


def floor_ms(model: torch.nn.Module, batch: int, length: int) -> float:
    """Bytes a decode step must read (every weight once, the KV cache at `length`) / bandwidth."""
    c = model.config
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    weights -= c.vocab_size * c.hidden_size * 2 if c.tie_word_embeddings else 0  # the lookup reads 1 row
    weights += c.vocab_size * c.hidden_size * 2  # the LM head reads the whole matrix
    kv = 2 * c.num_layers * batch * c.num_kv_heads * c.head_dim * length * 2
    return 1000 * (weights + kv) / BANDWIDTH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--commit", help="the commit measured, where the tree has no .git")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--budget-s", type=float, default=210.0, help="start no part after this many seconds")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the compiled variant")
    parser.add_argument("--smoke", "--quick", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--no-hf-static", action="store_true", help="skip transformers' static cache")
    args = parser.parse_args()
    started = time.perf_counter()
    commit = provenance.commit(args.commit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    # on a CPU the compiled variant only traces (dynamo, no inductor code): the smoke run checks
    # the path, not the speed
    compile_backend = "inductor" if device == "cuda" else "eager"
    torch.manual_seed(0)
    if args.smoke:
        preset, overrides, shapes, new_tokens = "standard-tiny", dict(vocab_size=512), [(1, 16), (4, 40)], 8
        long_context = 40
    else:
        preset, overrides, new_tokens = "qwen2.5-0.5b", {}, args.new_tokens
        shapes, long_context = [(1, 128), (8, 128), (1, 4096), (8, 4096)], 4096
    rows: list[dict[str, Any]] = []
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": commit, "dtype": str(dtype), "model": preset,
              "compile_mode": args.compile_mode, "compile_backend": compile_backend, "budget_s": args.budget_s,
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    print(f"commit {commit}, device {result['device']}", flush=True)
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        transformers = None
    with torch.device(device):
        model = dynlm.build_model(preset, **overrides)
    model = model.to(dtype).eval()
    reference = hf_model(model.config, device) if transformers is not None else None
    if reference is not None:  # the same weights: the peer reads dynlm's tensors (same names)
        ours_state = model.state_dict()
        theirs = reference.state_dict()
        shared = {k: v for k, v in ours_state.items() if k in theirs and theirs[k].shape == v.shape}
        reference.load_state_dict(shared, strict=False)
        result["peer_tensors_shared"] = f"{len(shared)} of {len(theirs)}"

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
        print(f"{row['batch']}x{row['context']} {name}: {json.dumps(row[name])}", flush=True)
        write(args.out, result)  # after every part: a later failure or timeout keeps what was measured

    prompts_of = {shape: distinct_prompts(*shape, model.config.vocab_size, device) for shape in shapes}
    for batch, context in shapes:  # first every shape's main variants, then the extras
        prompts = prompts_of[batch, context]
        row: dict[str, Any] = {"batch": batch, "context": context, "new_tokens": new_tokens,
                               "floor_ms_per_step": floor_ms(model, batch, context + new_tokens)}
        rows.append(row)
        part(row, "dynlm_eager", ours, model, prompts, new_tokens, graphs=False)
        part(row, "dynlm_graphs", ours, model, prompts, new_tokens, graphs=True)
        if reference is not None:
            part(row, "hf_generate", hf, reference, prompts, new_tokens, static=False)
        part(row, "dynlm_graphs_compile", ours, model, prompts, new_tokens, graphs=True, compile=args.compile_mode,
             compile_backend=compile_backend)
    # transformers' static cache (generate compiles its forward for every batch size) at the short
    # context, our compiled step with math attention at the long one, then the static cache there
    hf_static = reference is not None and not args.no_hf_static and device == "cuda"
    for row in rows if hf_static else []:
        if row["context"] != long_context:
            part(row, "hf_static", hf, reference, prompts_of[row["batch"], row["context"]], new_tokens, static=True)
    for row in rows:
        if row["context"] == long_context:
            prompts = prompts_of[row["batch"], row["context"]]
            part(row, "dynlm_graphs_compile_math", math_attention, ours, model, prompts, new_tokens, graphs=True,
                 compile=args.compile_mode, compile_backend=compile_backend)
    for row in rows if hf_static else []:
        if row["context"] == long_context:
            part(row, "hf_static", hf, reference, prompts_of[row["batch"], row["context"]], new_tokens, static=True)
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
           ("dynlm_graphs_compile", "dynlm graphs + compile"),
           ("dynlm_graphs_compile_math", "dynlm graphs + compile, math attention")]


def _cell(part: dict[str, Any] | None) -> str:
    if part is None:
        return "-"
    if "decode_tokens_per_s" in part:
        same = part.get("same_tokens_as_eager")
        return f"{part['decode_tokens_per_s']:,.1f}" + ("" if same is None else f" ({100 * same:.0f}%)")
    return "skipped" if "skipped" in part else "failed (see json)"


def to_markdown(result: dict[str, Any]) -> str:
    lines = [f"# Decoding: {result['model']}, transformers vs dynlm eager, graphs, graphs + compile (one run)", "",
             f"Device: **{result['device']}**, torch {result['torch']}, transformers "
             f"{result.get('transformers', '-')}, commit {result['commit']}, {result['time']}"
             + (f", {result['wall_s']:.0f} s" if "wall_s" in result else " (partial)") + ". Random weights in "
             f"{result['dtype'].removeprefix('torch.')} (the peer loads the same tensors), greedy, distinct random "
             "prompts per row; decode tokens/s excludes prefill. Compile: torch.compile mode "
             f"{result['compile_mode']}, backend {result['compile_backend']}, captured in our CUDA graph. In "
             "brackets: tokens equal to dynlm eager's. Floor: bytes read per step (weights + KV cache) / 4.8 TB/s "
             "(datasheet).", "",
             "| batch | context | " + " | ".join(f"{title} tok/s" for _, title in COLUMNS)
             + " | best dynlm / transformers generate | best dynlm ms/step | floor ms/step |",
             "|---|---|" + "---|" * (len(COLUMNS) + 3)]
    for r in result["rows"]:
        ours_rates = {k: r[k]["decode_tokens_per_s"] for k, _ in COLUMNS[2:] if "decode_tokens_per_s" in r.get(k, {})}
        best = max(ours_rates.values(), default=None)
        peer = r.get("hf_generate", {}).get("decode_tokens_per_s")
        ratio = "-" if best is None or peer is None else f"{best / peer:.1f}x"
        best_ms = "-" if best is None else f"{1000 * r['batch'] / best:.2f}"
        lines.append(f"| {r['batch']} | {r['context']:,} | " + " | ".join(_cell(r.get(k)) for k, _ in COLUMNS)
                     + f" | {ratio} | {best_ms} | {r['floor_ms_per_step']:.3f} |")
    errors = [f"- {r['batch']}x{r['context']} {k}: {r[k]['error']}" for r in result["rows"] for k, _ in COLUMNS
              if isinstance(r.get(k), dict) and "error" in r[k]]
    if errors:
        lines += ["", "Failures:", *errors]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
