"""Server throughput and latency under a bounded local load: `dynlm serve` in a subprocess on
loopback, an asyncio client keeping 1, 8 or 32 streams open (each a streamed chat completion
with a distinct prompt, max_tokens 32, greedy), 2 x concurrency requests per level (at least 4).

    python benchmarks/server_load.py --model smollm2/ [--model tiny/] [--out benchmarks/results]
    python benchmarks/server_load.py --random-weights .gpu/decode/smollm2-135m-instruct-shape --device cuda --out $OUT

`--random-weights DIR`: DIR holds a dynlm checkpoint's config.json and tokenizer files (no
weights); the model of that exact shape is built with random weights (seed 0) and served with the
real tokenizer and chat template: the serving cost of the shape, not the answers' quality.
`--device cuda`: the server decodes on the GPU (CUDA graphs, the default there).
Results merge into the files in `--out` (or, when it has none, into a copy of the committed
`benchmarks/results/server_load.*`): rows of other models or devices are kept, a row of the same
model, device and level is replaced.

Per level: completion tokens per second over the whole level, requests per second, latency
(request sent -> [DONE]) p50/p95 and time to first token p50/p95. With `--memory`, one more
level at concurrency 1 where the server has a memory database (MiniLM retrieval, context budget
1024) and every request names a conversation: the end-to-end latency a chat user sees.
Writes server_load.json and server_load.md; `--render-only` rewrites the .md from the .json in
`--out` without measuring.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))

import provenance  # noqa: E402
from serve_common import environment, write_results  # noqa: E402

DATA = Path(__file__).parent / "data" / "router"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: str, db: Path | None = None, device: str = "cpu"):
        self.port = free_port()
        command = [sys.executable, "-m", "dynlm", "serve", "--model", model, "--name", "m", "--port", str(self.port),
                   "--max-concurrent", "64", "--max-tokens", "64", "--device", device]
        if db is not None:
            command += ["--db", str(db), "--context-budget", "1024"]
        path = [str(Path(__file__).parent.parent / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="server_load_", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(command, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline = time.time() + 300
        while True:
            try:
                httpx.get(self.url + "/health")
                return self
            except httpx.TransportError:
                if time.time() > deadline or self.process.poll() is not None:
                    self.log.seek(0)
                    tail = "".join(self.log.readlines()[-20:])
                    raise RuntimeError(f"the server did not start; its output ends:\n{tail}") from None
                time.sleep(0.3)

    def __exit__(self, *exc) -> None:
        self.process.terminate()  # graceful shutdown (SIGTERM)
        self.process.wait(60)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the server process so far (all its threads)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_request(client: httpx.AsyncClient, prompt: str, user: str | None) -> dict[str, float]:
    body = {"model": "m", "stream": True, "max_tokens": 32, "temperature": 0,
            "stream_options": {"include_usage": True}, "messages": [{"role": "user", "content": prompt}]}
    if user is not None:
        body["user"] = user
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return {"latency": total, "ttft": first if first is not None else total, "tokens": tokens}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def level(server: Server, concurrency: int, prompts: list[str], users: bool) -> dict[str, float]:
    n = max(4, 2 * concurrency)
    gate = asyncio.Semaphore(concurrency)  # the bound: never more than `concurrency` open streams
    cpu0 = server.cpu_seconds()
    async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
        async def bounded(i: int) -> dict[str, float]:
            async with gate:
                return await one_request(client, prompts[i % len(prompts)], f"user{i % 4}" if users else None)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(bounded(i) for i in range(n)))
        wall = time.perf_counter() - t0
    cpu = server.cpu_seconds() - cpu0
    latencies = [r["latency"] * 1000 for r in results]
    ttfts = [r["ttft"] * 1000 for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"concurrency": concurrency, "requests": n, "completion_tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "requests_per_s": n / wall, "server_cpu_s": cpu,
            "server_cpu_ms_per_token": 1000 * cpu / max(tokens, 1),
            "latency_p50_ms": percentile(latencies, 0.5), "latency_p95_ms": percentile(latencies, 0.95),
            "ttft_p50_ms": percentile(ttfts, 0.5), "ttft_p95_ms": percentile(ttfts, 0.95)}


def random_weights_checkpoint(source: Path, directory: Path) -> Path:
    """A checkpoint of the shape in `source`/config.json with random weights (seed 0) and the
    tokenizer files of `source`."""
    import torch

    import dynlm

    config = json.loads((source / "config.json").read_text())["dynlm"]["config"]
    torch.manual_seed(0)
    model = dynlm.build_model(config)
    generation = source / "generation_config.json"
    model.save_pretrained(directory, tokenizer=dynlm.load_tokenizer(source),
                          generation_config=json.loads(generation.read_text()) if generation.exists() else None)
    return directory


def device_label(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return f"GPU: {torch.cuda.get_device_name(torch.device(device))}"
    return environment()["device"]


def load_previous(out: Path) -> list[dict]:
    """Rows of the earlier results in `out` (else the committed ones, so that a run into an empty
    folder still carries them), each with its model, device and commit (older files kept the
    device and commit once for the whole file)."""
    file = out / "server_load.json"
    if not file.exists():
        file = Path(__file__).parent / "results" / "server_load.json"
    if not file.exists():
        return []
    old = json.loads(file.read_text())
    if "rows" in old:
        return old["rows"]
    return [{"model": name, "device": old["device"], "commit": old["commit"], **row}
            for name, rows in old.get("models", {}).items() for row in rows]


def markdown(rows: list[dict]) -> list[str]:
    lines = ["# Server throughput and latency (loopback, bounded asyncio client)", "",
             "Produced by `benchmarks/server_load.py` (rows of earlier runs are kept, each with its device and "
             "commit). Streamed chat completions, distinct prompts, greedy, max_tokens 32 (fewer when the model "
             "ends its answer); 2 x concurrency requests per level. Server CPU = user + system CPU time of the "
             "server process per completion token (what serving costs, independent of how busy the shared "
             "machine was); the other columns are wall clock. The server runs every model call in one worker "
             "thread (requests interleave token by token, batch 1 per step; on a GPU each step is a CUDA-graph "
             "replay on the request's own static cache). `-random`, `-shape-random`: random weights.", "",
             "| model | device | concurrent streams | requests | completion tokens/s | requests/s | latency p50 ms "
             "| latency p95 ms | first token p50 ms | first token p95 ms | server CPU ms/token | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        label = f"{r['concurrency']}" + (" (with memory)" if r.get("memory") else "")
        lines.append(f"| {r['model']} | {r['device']} | {label} | {r['requests']} | {r['tokens_per_s']:.1f} "
                     f"| {r['requests_per_s']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} "
                     f"| {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['server_cpu_ms_per_token']:.1f} "
                     f"| {provenance.short(r['commit'])} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[],
                        help="checkpoint to serve (repeatable), optionally with its own levels: PATH:1,8")
    parser.add_argument("--random-weights", action="append", default=[], type=Path,
                        help="directory with a checkpoint's config.json + tokenizer files: serve that shape with "
                             "random weights (repeatable)")
    parser.add_argument("--levels", default="1,8,32")
    parser.add_argument("--device", default="cpu", help="the server's device (cuda: CUDA-graph decoding)")
    parser.add_argument("--memory", action="store_true", help="also measure concurrency 1 with a memory database")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--commit", help="the commit measured, where the tree has no .git")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: rewrite server_load.md in --out from its server_load.json")
    args = parser.parse_args(argv)
    if args.render_only:
        report = json.loads((args.out / "server_load.json").read_text())
        write_results(args.out, "server_load", report, markdown(report["rows"]))
        return 0
    if not args.model and not args.random_weights:
        parser.error("give --model or --random-weights")
    prompts = [json.loads(line)["prompt"] for line in (DATA / "heldout.jsonl").read_text().splitlines()]
    env = environment(args.commit)
    device = device_label(args.device)
    rows = load_previous(args.out)
    report = {"python": env["python"], "max_tokens": 32, "rows": rows}

    def add(row: dict) -> None:  # replace the same model/device/level, keep the rest; save at once
        same = [i for i, r in enumerate(rows) if (r["model"], r["device"], r["concurrency"], r.get("memory")) ==
                (row["model"], row["device"], row["concurrency"], row.get("memory"))]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
        print(row, flush=True)
        write_results(args.out, "server_load", report, markdown(rows))

    with tempfile.TemporaryDirectory() as scratch:
        specs = [(spec.partition(":")[0], Path(spec.partition(":")[0]).name, spec.partition(":")[2])
                 for spec in args.model]
        for source in args.random_weights:
            path = random_weights_checkpoint(source, Path(scratch) / source.name)
            specs.append((str(path), source.name.removesuffix("-shape") + "-shape-random", ""))
        for model, name, own_levels in specs:
            stamp = {"model": name, "device": device, "commit": env["commit"]}
            with Server(model, device=args.device) as server:
                asyncio.run(level(server, 1, prompts[100:], False))  # warm-up, not reported
                for c in (int(x) for x in (own_levels or args.levels).split(",")):
                    add({**stamp, **asyncio.run(level(server, c, prompts, False))})
            if args.memory:
                with tempfile.TemporaryDirectory() as tmp, Server(model, Path(tmp) / "memory.sqlite",
                                                                   args.device) as server:
                    asyncio.run(level(server, 1, prompts[100:], True))  # warm-up: loads MiniLM
                    add({**stamp, **asyncio.run(level(server, 1, prompts, True)), "memory": True})
    return 0


if __name__ == "__main__":
    sys.exit(main())
