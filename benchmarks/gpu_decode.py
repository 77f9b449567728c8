"""Decoding speed on one GPU, every variant in one process: dynlm with CUDA graphs (the default),
dynlm eager (the reference path), `transformers` `generate` (dynamic cache), and `transformers`
with its static cache + `torch.compile` where it runs.

Random weights in bf16, greedy, prompts of random tokens that differ in every row. Decode tokens/s
= batch x (new tokens - 1) / (time for all new tokens - time for the first one), so prefill is
left out for every variant alike. The floor is the bytes one step must read (weights + the KV
cache at the final length) over the datasheet bandwidth.

    python benchmarks/gpu_decode.py --out benchmarks/results --commit $(git rev-parse --short HEAD)
    python benchmarks/gpu_decode.py --quick      # tiny shapes on any device: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend

import dynlm
import dynlm.nn.attention as attention
from dynlm.infer.graphs import GraphDecoder

BANDWIDTH = 4.8e12  # H200 datasheet bytes/s (the floor's denominator; a lead, not a measurement)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def distinct_prompts(batch: int, length: int, vocab: int, device: str) -> torch.Tensor:
    prompts = torch.randint(0, vocab, (batch, length), device=device)
    assert len({tuple(row.tolist()) for row in prompts}) == batch, "prompt rows must differ"
    return prompts


def ours(model: torch.nn.Module, prompts: torch.Tensor, new_tokens: int, graphs: bool) -> dict[str, Any]:
    """Greedy decoding with dynlm; times the prefill and the decode loop separately."""
    decoder = GraphDecoder(model) if graphs else None

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
        run()  # warm-up: kernels, allocator, graph capture
        prefill_s, decode_s, tokens = run()
    b = prompts.size(0)
    result = {"decode_tokens_per_s": b * (new_tokens - 1) / decode_s, "ms_per_step": 1000 * decode_s / (new_tokens - 1),
              "prefill_s": prefill_s, "tokens": tokens}
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

    def timed(n: int) -> float:
        sync()
        start = time.perf_counter()
        model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                       **options)
        sync()
        return time.perf_counter() - start

    with torch.no_grad():
        timed(min(8, new_tokens))  # warm-up (and compilation)
        one, full = timed(1), timed(new_tokens)
    b = prompts.size(0)
    return {"decode_tokens_per_s": b * (new_tokens - 1) / (full - one),
            "ms_per_step": 1000 * (full - one) / (new_tokens - 1), "prefill_s": one}


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
    parser.add_argument("--commit", default="unknown")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, any device")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip transformers static cache + compile")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    if args.quick:
        cases = [("standard-tiny", dict(vocab_size=512), [(1, 16), (4, 40)], True)]
        new_tokens = 8
    else:
        cases = [("qwen2.5-0.5b", {}, [(1, 128), (1, 4096), (8, 128), (8, 4096)], True),
                 ("gpt2-small-like", dict(vocab_size=50304), [(1, 128)], False),
                 ("mod-gpt2-small-like", dict(vocab_size=50304), [(1, 128)], False),
                 ("dtf-gpt2-small-like", dict(vocab_size=50304), [(1, 128)], False)]
        new_tokens = args.new_tokens
    rows: list[dict[str, Any]] = []
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "commit": args.commit, "dtype": str(dtype),
              "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    for preset, overrides, shapes, with_hf in cases:
        with torch.device(device):
            model = dynlm.build_model(preset, **overrides)
        model = model.to(dtype).eval()
        reference = hf_model(model.config, device) if with_hf else None
        for batch, context in shapes:
            prompts = distinct_prompts(batch, context, model.config.vocab_size, device)
            row: dict[str, Any] = {"model": preset, "batch": batch, "context": context, "new_tokens": new_tokens,
                                   "floor_ms_per_step": floor_ms(model, batch, context + new_tokens)}
            graphed = ours(model, prompts, new_tokens, graphs=True)  # static cache, eager steps on a CPU
            eager = ours(model, prompts, new_tokens, graphs=False)
            row["same_tokens"] = float((graphed.pop("tokens") == eager.pop("tokens")).float().mean())
            row["dynlm_graphs"], row["dynlm_eager"] = graphed, eager
            # the same graphs with cached attention forced onto the math kernel (cuBLAS matmuls)
            default_backends = attention.CACHED_ATTENTION_BACKENDS
            attention.CACHED_ATTENTION_BACKENDS = [SDPBackend.MATH]
            row["dynlm_graphs_math_attention"] = ours(model, prompts, new_tokens, graphs=True)
            row["dynlm_graphs_math_attention"].pop("tokens")
            attention.CACHED_ATTENTION_BACKENDS = default_backends
            if reference is not None:
                row["hf_generate"] = hf(reference, prompts, new_tokens, static=False)
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(args.out, result)  # after every row: a later failure or timeout keeps what was measured
        # last, as it compiles for minutes: transformers' static cache + compile at context 128
        if reference is not None and not args.no_hf_compile and device == "cuda":
            reference.forward = torch.compile(reference.forward, mode="max-autotune-no-cudagraphs")
            for row in rows:
                if row["model"] == preset and row["context"] == 128:
                    prompts = distinct_prompts(row["batch"], row["context"], model.config.vocab_size, device)
                    try:
                        row["hf_static_compile"] = hf(reference, prompts, new_tokens, static=True)
                    except Exception as error:  # a peer that fails is reported, not fatal
                        row["hf_static_compile"] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
                    print(json.dumps(row), flush=True)
                    write(args.out, result)
        del model, reference
        if device == "cuda":
            torch.cuda.empty_cache()
    print(to_markdown(result))


def write(out: Path | None, result: dict[str, Any]) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "gpu_decode.md").write_text(to_markdown(result))


def to_markdown(result: dict[str, Any]) -> str:
    lines = ["# Decoding: dynlm CUDA graphs vs eager vs transformers (one run)", "",
             f"Device: **{result['device']}**, torch {result['torch']}, transformers "
             f"{result.get('transformers', '-')}, commit {result['commit']}, {result['time']}. Random weights in "
             f"{result['dtype'].removeprefix('torch.')}, greedy, distinct random prompts per row; decode tokens/s "
             "excludes prefill. Floor: bytes read per step (weights + KV cache) / 4.8 TB/s (datasheet).", "",
             "| model | batch | context | dynlm graphs tok/s | ms/step | graphs, math attention tok/s "
             "| dynlm eager tok/s | graphs / eager "
             "| transformers generate tok/s | graphs / transformers | transformers static+compile tok/s "
             "| floor ms/step | same tokens graphs vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        g, e = r["dynlm_graphs"], r["dynlm_eager"]
        h = r.get("hf_generate")
        s = r.get("hf_static_compile")
        s_text = "-" if s is None else (s["error"][:60] if "error" in s else f"{s['decode_tokens_per_s']:,.1f}")
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['context']:,} | {g['decode_tokens_per_s']:,.1f} "
            f"| {g['ms_per_step']:.2f} | {r['dynlm_graphs_math_attention']['decode_tokens_per_s']:,.1f} "
            f"| {e['decode_tokens_per_s']:,.1f} | {g['decode_tokens_per_s'] / e['decode_tokens_per_s']:.1f}x "
            f"| {'-' if h is None else format(h['decode_tokens_per_s'], ',.1f')} "
            f"| {'-' if h is None else format(g['decode_tokens_per_s'] / h['decode_tokens_per_s'], '.1f') + 'x'} "
            f"| {s_text} | {r['floor_ms_per_step']:.3f} | {100 * r['same_tokens']:.0f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
