"""CPU decoding: dynlm vs llama.cpp (`llama-cpp-python`) on SmolLM2-135M-Instruct, in one run.

Greedy, one chat prompt, `--new-tokens` new tokens (EOS ignored, so every row decodes the same
count), `--threads` threads on both sides, each row repeated `--repeats` times after one warm-up
(which also compiles, for the compiled rows): the median is reported.

The shipped GGUF is Q4_1 and dynlm dequantizes it on import, so the peer is compared at the same
weight precision on GGUF files derived here from the same (dequantized) weights with the `gguf`
package: F32 (pairs with our fp32 rows; greedy tokens compared), BF16 (our bf16 rows), Q8_0
(our int8 weight-only rows: per-row int8 vs llama.cpp's per-32-block int8). llama.cpp on the
Q4_1 file as shipped is reported too; dynlm has no 4-bit path.

Our rows are levers of the one generator (`dynlm.infer.generate.iter_token_steps`): the eager
path (growable cache), the static KV cache (`graphs=True`: no per-token allocation),
`compile=True` (the static step through `torch.compile`), and the weight precision.

llama-cpp-python is a measurement peer, not a dependency: it runs in a subprocess of its own
interpreter (`--llama-python`, default `.venv-llamacpp/bin/python`; see docs/performance.md for
how it is built). If it is missing its rows record the error and the rest still runs.

    python benchmarks/cpu_decode.py                  # writes benchmarks/results/cpu_decode.{json,md}
    python benchmarks/cpu_decode.py --smoke          # 8 tokens, 1 repeat, into /tmp/cpu_decode_smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a short story about a robot who learns to paint."

# our rows: name -> (weights, path); weights in fp32 / bf16 / int8 (int8 linears, fp32 activations)
OUR_ROWS = {
    "dynlm fp32 eager": ("fp32", "eager"),
    "dynlm fp32 static cache": ("fp32", "static"),
    "dynlm fp32 static + compile": ("fp32", "compile"),
    "dynlm bf16 static cache": ("bf16", "static"),
    "dynlm bf16 static + compile": ("bf16", "compile"),
    "dynlm int8 static cache": ("int8", "static"),
    "dynlm int8 static + compile": ("int8", "compile"),
}
# llama.cpp rows: name -> GGUF tensor type of the 2-D weights (None: the shipped file)
LLAMA_ROWS = {"llama.cpp F32": "F32", "llama.cpp BF16": "BF16", "llama.cpp Q8_0": "Q8_0",
              "llama.cpp Q4_1 (as shipped)": None}
PAIRS = {"fp32": "llama.cpp F32", "bf16": "llama.cpp BF16", "int8": "llama.cpp Q8_0"}


# ---------------------------------------------------------------------------------------------
# The llama.cpp side (runs in the llama-cpp-python interpreter: no torch, no dynlm imports)


def llama_worker(args: argparse.Namespace) -> int:
    import llama_cpp
    import numpy as np

    ids = [int(i) for i in args.ids.split(",")]
    n_ctx = -(-(len(ids) + args.new_tokens) // 256) * 256  # dynlm's static cache rounds the same way
    llm = llama_cpp.Llama(model_path=args.llama_worker, n_ctx=n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    def next_token() -> int:
        # the last position's logits, as llama.cpp left them (`Llama.scores` is only filled with
        # logits_all=True, which would copy every position's logits)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    runs = []
    for _ in range(args.repeats + 1):  # the first is the warm-up
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        token = next_token()
        first = time.perf_counter()
        tokens = [token]
        for _ in range(args.new_tokens - 1):
            llm.eval([token])
            token = next_token()
            tokens.append(token)
        runs.append({"prefill_s": first - start, "decode_s": time.perf_counter() - first, "tokens": tokens})
    print(json.dumps({"version": llama_cpp.__version__, "warmup": runs[0], "runs": runs[1:]}))
    return 0


GGUF_FILE_TYPES = {"F32": 0, "BF16": 32, "Q8_0": 7}  # llama.cpp's `general.file_type` values


def derive_gguf(source: Path, target: Path, kind: str) -> Path:
    """A copy of `source` whose 2-D weights are dequantized and stored as `kind` (F32, BF16,
    Q8_0); 1-D tensors (norms) stay F32, as llama.cpp expects. Metadata is copied unchanged
    except `general.file_type`."""
    if target.is_file():
        return target
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(str(target) + ".part", reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        value_type = field.types[0]
        value = GGUF_FILE_TYPES[kind] if field.name == "general.file_type" else field.contents()
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    qtype = gguf.GGMLQuantizationType[kind]
    for tensor in reader.tensors:
        values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)  # [rows, cols]
        if values.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, values, raw_dtype=gguf.GGMLQuantizationType.F32)
        else:
            writer.add_tensor(tensor.name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(str(target) + ".part", target)
    return target


def run_llama(python: str, gguf_path: Path, ids: list[int], new_tokens: int, threads: int, repeats: int) -> dict:
    command = [python, str(Path(__file__).resolve()), "--llama-worker", str(gguf_path), "--ids",
               ",".join(map(str, ids)), "--new-tokens", str(new_tokens), "--threads", str(threads),
               "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"llama-cpp-python worker ({python}) failed: {last}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Our side


def run_ours(model: Any, ids: list[int], new_tokens: int, path: str, repeats: int) -> dict:
    import torch

    from dynlm.infer.generate import iter_token_steps

    prompt = torch.tensor([ids])
    options = {"eager": dict(graphs=False), "static": dict(graphs=True), "compile": dict(compile=True)}[path]
    runs = []
    for _ in range(repeats + 1):  # the first is the warm-up (and the compilation)
        start = time.perf_counter()
        steps = iter_token_steps(model, prompt, new_tokens, **options)
        tokens = [next(steps)]
        first = time.perf_counter()
        tokens += list(steps)
        end = time.perf_counter()
        runs.append({"prefill_s": first - start, "decode_s": end - first, "tokens": [int(t[0]) for t in tokens]})
    return {"warmup": runs[0], "runs": runs[1:]}


def build_models(gguf_path: Path, weights: set[str]) -> dict[str, Any]:
    import copy

    import torch

    from dynlm.interop.gguf import load_gguf
    from dynlm.nn.quant import quantize_linears_int8

    fp32 = load_gguf(gguf_path).eval()
    models: dict[str, Any] = {"fp32": fp32}
    if "bf16" in weights:
        models["bf16"] = copy.deepcopy(fp32).to(torch.bfloat16)
    if "int8" in weights:
        models["int8"] = copy.deepcopy(fp32)
        quantize_linears_int8(models["int8"])
    return models


def int8_logit_error(models: dict[str, Any], ids: list[int]) -> float | None:
    """max |int8 logits - fp32 logits| / max |fp32 logits| over the prompt positions."""
    if "int8" not in models:
        return None
    import torch

    with torch.no_grad():
        prompt = torch.tensor([ids])
        reference = models["fp32"](prompt).logits
        return float((models["int8"](prompt).logits - reference).abs().max() / reference.abs().max())


# ---------------------------------------------------------------------------------------------


def summarise(result: dict, new_tokens: int) -> dict:
    decode = [(new_tokens - 1) / r["decode_s"] for r in result["runs"]]
    return {"decode_tokens_per_s": statistics.median(decode), "decode_tokens_per_s_runs": decode,
            "prefill_ms": 1000 * statistics.median(r["prefill_s"] for r in result["runs"]),
            "warmup_s": result["warmup"]["prefill_s"] + result["warmup"]["decode_s"],
            "tokens": result["runs"][0]["tokens"]}


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def write_results(report: dict, out: Path, new_tokens: int, repeats: int) -> None:
    """cpu_decode.json / .md from the rows measured so far (called after every row, so an
    interrupted run leaves what it measured)."""
    import torch

    from report_files import write_report

    report["load_average_after"] = os.getloadavg()

    rows = report["rows"]
    reference = rows.get("dynlm fp32 eager", {}).get("tokens")
    for name, row in rows.items():
        if "tokens" not in row:
            continue
        peer = rows.get(PAIRS.get(row.get("weights", ""), ""), {})
        if name in OUR_ROWS and "decode_tokens_per_s" in peer:
            row["vs_llama_cpp_same_precision"] = row["decode_tokens_per_s"] / peer["decode_tokens_per_s"]
        if reference is not None:
            row["same_tokens_as_dynlm_fp32_eager"] = same_prefix(row["tokens"], reference)

    def cell(row: dict, key: str, fmt: str) -> str:
        return fmt.format(row[key]) if row.get(key) is not None else "-"

    table = []
    for name, row in rows.items():
        if "error" in row:
            table.append([name, row.get("weights", "-"), "failed: " + row["error"][:160]] + ["-"] * 5)
            continue
        runs = row["decode_tokens_per_s_runs"]
        table.append([name, row["weights"], f"{row['decode_tokens_per_s']:.1f}",
                      f"{min(runs):.1f}-{max(runs):.1f}", f"{row['prefill_ms']:.0f}",
                      cell(row, "vs_llama_cpp_same_precision", "{:.2f}x"),
                      cell(row, "same_tokens_as_dynlm_fp32_eager", "{}") + f"/{new_tokens}",
                      f"{row['warmup_s']:.1f}"])
    error = report["int8_logit_error"]
    context = (f"{report['device']}, {report['threads']} threads, torch {torch.__version__}, commit "
               f"{report['commit'][:7]}, nice {report['nice']}. {report['gguf']}, greedy, "
               f"{report['prompt_tokens']}-token chat "
               f"prompt \"{PROMPT}\", {new_tokens} new tokens, median of {repeats} after a warm-up. "
               f"Load average (1, 5, 15 min) before {tuple(round(x, 2) for x in report['load_average_before'])}, "
               f"after {tuple(round(x, 2) for x in report['load_average_after'])}. Decode tokens/s exclude the "
               f"prefill. llama.cpp F32/BF16/Q8_0 files are derived from the dequantized Q4_1 weights; pairs: "
               f"fp32-F32, bf16-BF16, int8 (per-row, fp32 activations)-Q8_0. int8 logit error on the prompt: "
               + ("-" if error is None else f"{error:.4f}") + " of the largest fp32 logit.")
    write_report(out, "cpu_decode", report, "CPU decoding: dynlm vs llama.cpp, SmolLM2-135M-Instruct", context,
                 ["row", "weights", "decode tokens/s", "range", "prefill ms", "vs llama.cpp same precision",
                  "greedy tokens equal to dynlm fp32 eager", "warm-up s"], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the Q4_1 GGUF (default: fetched SmolLM2-135M-Instruct)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default="all", help="comma-separated row names, or 'all'")
    parser.add_argument("--llama-python", default=str(ROOT / ".venv-llamacpp" / "bin" / "python"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dynlm_cpu_decode"), help="derived GGUF files")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--commit", help="git commit measured (default: git rev-parse HEAD)")
    parser.add_argument("--smoke", action="store_true", help="8 tokens, 1 repeat, no compiled rows")
    parser.add_argument("--llama-worker", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_worker:
        return llama_worker(args)

    import torch

    from dynlm.data.tokenizers import tokenizer_from_gguf
    from dynlm.infer.generate import encode_prompt
    from dynlm.interop.gguf import fetch_smollm2
    from report_files import git_commit

    if args.smoke:
        args.new_tokens, args.repeats = 8, 1
    out = args.out or (Path("/tmp/cpu_decode_smoke") if args.smoke else ROOT / "benchmarks" / "results")
    names = list(OUR_ROWS) + list(LLAMA_ROWS) if args.rows == "all" else args.rows.split(",")
    if args.smoke and args.rows == "all":
        names = [n for n in names if "compile" not in n]
    names.sort(key=lambda n: "compile" in n)  # the slow-to-warm compiled rows last (results are written per row)
    unknown = [n for n in names if n not in OUR_ROWS and n not in LLAMA_ROWS]
    if unknown:
        parser.error(f"unknown row '{unknown[0]}'; rows: {', '.join(list(OUR_ROWS) + list(LLAMA_ROWS))}")
    torch.set_num_threads(args.threads)
    gguf_path = args.gguf or fetch_smollm2()
    ids = encode_prompt(tokenizer_from_gguf(gguf_path), PROMPT, chat=True)
    report: dict[str, Any] = {
        "device": cpu_name(), "threads": args.threads, "torch": torch.__version__,
        "commit": args.commit or git_commit(), "gguf": gguf_path.name, "prompt": PROMPT, "chat_template": True,
        "prompt_tokens": len(ids), "new_tokens": args.new_tokens, "repeats": args.repeats,
        "nice": os.nice(0), "load_average_before": os.getloadavg(), "rows": {}}
    print(f"{report['device']}, {args.threads} threads, load {report['load_average_before']}", flush=True)

    weights = {OUR_ROWS[n][0] for n in names if n in OUR_ROWS}
    models = build_models(gguf_path, weights) if weights else {}
    report["int8_logit_error"] = int8_logit_error(models, ids)
    args.work.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"{name} ...", flush=True)
        row: dict[str, Any] = {"load_average_start": os.getloadavg()}
        try:
            if name in OUR_ROWS:
                kind, path = OUR_ROWS[name]
                row.update(weights=kind, path=path)
                row.update(summarise(run_ours(models[kind], ids, args.new_tokens, path, args.repeats),
                                     args.new_tokens))
            else:
                kind = LLAMA_ROWS[name]
                target = gguf_path if kind is None else derive_gguf(
                    gguf_path, args.work / f"{gguf_path.stem}.{kind}.gguf", kind)
                result = run_llama(args.llama_python, target, ids, args.new_tokens, args.threads, args.repeats)
                row.update(weights=kind or "Q4_1", llama_cpp_python=result["version"])
                row.update(summarise(result, args.new_tokens))
            print(f"  {row['decode_tokens_per_s']:.1f} tokens/s", flush=True)
        except Exception as e:  # a failed row is recorded, the others still run
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"  failed: {row['error']}", flush=True)
        report["rows"][name] = row
        write_results(report, out, args.new_tokens, args.repeats)
    write_results(report, out, args.new_tokens, args.repeats)
    print(f"wrote {out / 'cpu_decode.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
