"""Conversation memory: recall of facts planted early vs plain truncation at the same budget, the
compression ratio, and `build_context` latency at 1K, 10K and 100K stored messages.

    python benchmarks/memory_bench.py [--tokenizer DIR] [--out benchmarks/results]

Recall: 10 synthetic conversations (seeds 0-9). Each plants 6 facts in its first 12 messages
(an explicit "remember that", a name, a "my X is Y", a preference, a number, and one no fact
rule recognises, which only retrieval of compressed chunks can bring back), then 300 filler
messages (the held-out router prompts as user turns, sentences of the design text as answers),
then asks one question per fact. A fact is recalled when its answer string (e.g. the code
"4821") is in the context the expert would receive. The same budget of tokens is given to the
memory (`build_context`) and to plain truncation (the newest messages that fit). This measures
what reaches the model, not what a model then answers.

Latency: one conversation grows to 100K messages through `add_message` (the real overflow and
compression path); at 1K, 10K and 100K messages, 40 different queries each time `build_context`
(budget 1024) with MiniLM retrieval. The first call after growth also embeds the new chunks and
facts (reported apart). Token counts use the tokenizer given (the committed results used
SmolLM2-135M-Instruct's, from `dynlm convert smollm2-135m-instruct smollm2/`).
Writes memory_recall.{json,md} and memory_latency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import dynlm  # noqa: E402
from dynlm.memory.embeddings import MiniLMEncoder  # noqa: E402
from dynlm.memory.store import ConversationMemory, MemoryBudgets  # noqa: E402
from serve_common import environment, write_results  # noqa: E402

DATA = Path(__file__).parent / "data" / "router"
FACTS = [  # (planted message, question, answer string)
    ("Remember that my locker code is {n4}.", "What is my locker code?", "{n4}"),
    ("By the way, my name is {name}.", "Do you remember my name?", "{name}"),
    ("My sister's city is {city}.", "Which city does my sister live in?", "{city}"),
    ("I really prefer {drink} in the morning.", "What do I like to drink in the morning?", "{drink}"),
    ("The flight leaves at gate {n2} on Friday.", "Which gate does the flight leave from?", "{n2}"),
    ("The spare key is hidden under the {thing}.", "Where is the spare key hidden?", "{thing}"),  # no fact rule
]
KINDS = ["remember that", "name", "my X is Y", "preference", "number", "unmarked (retrieval only)"]
THINGS = ["blue flowerpot", "doormat", "garden gnome", "loose brick", "porch lamp", "rain barrel", "birdhouse",
          "mailbox", "welcome sign", "stone frog"]
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Esther", "Farid", "Greta", "Hiro", "Ines", "Jonas"]
CITIES = ["Lisbon", "Osaka", "Tallinn", "Quito", "Dakar", "Hobart", "Bergen", "Cusco", "Tbilisi", "Windhoek"]
DRINKS = ["green tea", "black coffee", "hot chocolate", "mint tea", "oat latte", "matcha", "rooibos",
          "espresso", "chai", "lemon water"]
ANSWERS = [
    "That is a good question; here is what I would suggest.",
    "There are a few things to consider before deciding.",
    "Most people find that a short walk after dinner helps.",
    "It depends on the context, but usually the simplest option works.",
    "Let me explain the main idea in a few steps.",
    "Here is a short summary of the options you have.",
]


def filler(rng: random.Random, prompts: list[str], i: int) -> tuple[str, str]:
    if i % 2:
        return "assistant", " ".join(rng.sample(ANSWERS, 2))
    return "user", rng.choice(prompts)


def conversation(seed: int, prompts: list[str], length: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    values = {"n4": str(rng.randint(1000, 9999)), "n2": str(rng.randint(10, 99)), "name": NAMES[seed % 10],
              "city": CITIES[seed % 10], "drink": DRINKS[seed % 10], "thing": THINGS[seed % 10]}
    messages: list[tuple[str, str]] = []
    for fact in FACTS:
        messages += [("user", fact[0].format(**values)), ("assistant", "Noted.")]
    messages += [filler(rng, prompts, i) for i in range(length)]
    questions = [(q, a.format(**values)) for _, q, a in FACTS]
    return messages, questions


def truncation(messages: list[tuple[str, str]], question: str, budget: int, count_prompt) -> list[dict[str, str]]:
    """The newest messages that fit the budget with the question: what a plain chat client sends."""
    context = [{"role": "user", "content": question}]
    for role, content in reversed(messages):
        candidate = [{"role": role, "content": content}, *context]
        if count_prompt(candidate) > budget:
            break
        context = candidate
    return context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=None, help="checkpoint or tokenizer dir (default: raw bytes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--only", choices=["recall", "latency"], help="run one of the two measurements")
    args = parser.parse_args(argv)
    tokenizer = dynlm.load_tokenizer(args.tokenizer or "bytes")
    tokenizer_name = f"{Path(args.tokenizer).name if args.tokenizer else 'bytes'} (vocab {tokenizer.vocab_size})"

    def count(text: str) -> int:
        return len(tokenizer.encode(text))

    def count_prompt(messages: list[dict[str, str]]) -> int:
        if getattr(tokenizer, "chat_template", None):
            return count(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return count("\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages) + "\nAssistant:")

    prompts = [json.loads(line)["prompt"] for line in (DATA / "heldout.jsonl").read_text().splitlines()]
    encoder = MiniLMEncoder.load()
    env = {**environment(), "tokenizer": tokenizer_name, "budgets": MemoryBudgets().__dict__}

    if args.only != "latency":
        recall_benchmark(args, prompts, encoder, env, count, count_prompt, tokenizer_name)
    if args.only != "recall":
        latency_benchmark(args, prompts, encoder, env, count, count_prompt)
    return 0


def recall_benchmark(args, prompts, encoder, env, count, count_prompt, tokenizer_name) -> None:
    budgets = [256, 512, 1024]
    hits = {("memory", b): 0 for b in budgets} | {("truncation", b): 0 for b in budgets}
    by_kind = {(kind, b): 0 for kind in KINDS for b in budgets}
    total, ratios, stored_tokens = 0, [], []
    with tempfile.TemporaryDirectory() as tmp:
        memory = ConversationMemory(Path(tmp) / "recall.sqlite", encoder)
        for seed in range(10):
            messages, questions = conversation(seed, prompts, 300)
            cid = f"c{seed}"
            for role, content in messages:
                memory.add_message(cid, role, content, count)
            ratios.append(memory.stats(cid)["compression_ratio"])
            stored_tokens.append(sum(count(c) for _, c in messages))
            for kind, (question, answer) in zip(KINDS, questions):
                total += 1
                for b in budgets:
                    built = memory.build_context(cid, [{"role": "user", "content": question}], b, count_prompt)
                    assert count_prompt(built) <= b
                    found = any(answer in m["content"] for m in built[:-1])
                    hits[("memory", b)] += found
                    by_kind[(kind, b)] += found
                    plain = truncation(messages, question, b, count_prompt)
                    hits[("truncation", b)] += any(answer in m["content"] for m in plain[:-1])
        memory.close()
    per_kind = total // len(KINDS)
    recall = {"questions": total, "conversations": 10, "messages_per_conversation": 312,
              "memory_recall_by_fact_kind": {f"{kind}@{b}": by_kind[(kind, b)] / per_kind for kind, b in by_kind},
              "mean_stored_tokens": statistics.mean(stored_tokens),
              "compression_ratio_mean": statistics.mean(ratios),
              "recall": {f"{kind}@{b}": hits[(kind, b)] / total for kind, b in hits}}
    lines = ["# Memory recall vs plain truncation", "",
             "Produced by `benchmarks/memory_bench.py`. 10 conversations x 6 facts planted in the first 12 "
             f"messages, then 300 filler messages (mean {recall['mean_stored_tokens']:.0f} tokens stored), then one "
             "question per fact. Recalled = the answer string is in the context the expert receives. "
             f"Tokenizer: {tokenizer_name}.", "",
             "| budget (tokens) | memory (`build_context`) | plain truncation |", "|---|---|---|"]
    lines += [f"| {b} | {hits[('memory', b)] / total:.2f} | {hits[('truncation', b)] / total:.2f} |" for b in budgets]
    lines += ["", "Memory recall by kind of fact:", "", "| fact | " + " | ".join(f"budget {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    lines += [f"| {kind} | " + " | ".join(f"{by_kind[(kind, b)] / per_kind:.2f}" for b in budgets) + " |"
              for kind in KINDS]
    lines += ["", f"Extractive compression of outdated messages: {recall['compression_ratio_mean']:.2f}x "
                  "(tokens of the moved messages / tokens of their summary, mean over the conversations).", "",
              f"Device: {env['device']}. Commit {env['commit']}."]
    write_results(args.out, "memory_recall", {**env, **recall}, lines)


def latency_benchmark(args, prompts, encoder, env, count, count_prompt) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random(123)
    queries = [rng.choice(prompts) for _ in range(40)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        memory = ConversationMemory(Path(tmp) / "latency.sqlite", encoder)
        memory.db.execute("PRAGMA synchronous=NORMAL")  # filling 100K messages; the server keeps FULL
        messages, _ = conversation(99, prompts, max(sizes))
        added, fill_seconds = 0, 0.0
        for size in sizes:
            t0 = time.perf_counter()
            for role, content in messages[added:size]:
                memory.add_message("big", role, content, count)
            fill_seconds += time.perf_counter() - t0
            added = size
            stored = memory.db.execute("SELECT COALESCE(SUM(tokens), 0) FROM messages WHERE conversation='big'"
                                       ).fetchone()[0]
            t0 = time.perf_counter()
            memory.build_context("big", [{"role": "user", "content": queries[0]}], 1024, count_prompt)
            first = time.perf_counter() - t0
            times, cpu_times, embed_times = [], [], []
            for q in queries:
                t0, c0 = time.perf_counter(), time.thread_time()
                built = memory.build_context("big", [{"role": "user", "content": q}], 1024, count_prompt)
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.thread_time() - c0)
                c0 = time.thread_time()
                encoder.encode([q])
                embed_times.append(time.thread_time() - c0)
                assert count_prompt(built) <= 1024
            times.sort()
            cpu_times.sort()
            embed_times.sort()
            index = memory._index("big")
            results.append({"stored_messages": size, "stored_tokens": int(stored),
                            "indexed_documents": len(index.texts), "first_call_ms": first * 1000,
                            "p50_ms": 1000 * times[len(times) // 2], "p95_ms": 1000 * times[int(0.95 * len(times))],
                            "cpu_p50_ms": 1000 * cpu_times[len(times) // 2],
                            "cpu_p95_ms": 1000 * cpu_times[int(0.95 * len(times))],
                            "query_embedding_cpu_p50_ms": 1000 * embed_times[len(embed_times) // 2],
                            "fill_seconds_so_far": fill_seconds,
                            "db_bytes": (Path(tmp) / "latency.sqlite").stat().st_size})
            print(results[-1])
            write_latency(args.out, env, results)  # after every size: a long run keeps what it measured
        memory.close()


def write_latency(out: Path, env: dict, results: list[dict]) -> None:
    lines = ["# build_context latency", "",
             "Produced by `benchmarks/memory_bench.py`. One conversation grown through `add_message`; 40 queries "
             "per size, budget 1024 tokens, MiniLM + BM25 retrieval, token counts with the chat template. CPU = "
             "the thread's CPU time (what the call costs; wall time adds waiting for a core on this shared "
             "machine). `query embedding` is the MiniLM encoding of the query alone, part of every call. "
             "First call = after growth, embeds the new chunks and facts.", "",
             "| stored messages | stored tokens | indexed chunks+facts | CPU p50 ms | CPU p95 ms | wall p50 ms "
             "| wall p95 ms | query embedding CPU p50 ms | first call wall ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['stored_messages']:,} | {r['stored_tokens']:,} | {r['indexed_documents']:,} "
              f"| {r['cpu_p50_ms']:.1f} | {r['cpu_p95_ms']:.1f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} "
              f"| {r['query_embedding_cpu_p50_ms']:.1f} | {r['first_call_ms']:.0f} |" for r in results]
    lines += ["", f"Device: {env['device']} (load average about 15 on 2 cores while measured). Commit "
                  f"{env['commit']}. Compare rows with each other, not with other machines."]
    write_results(out, "memory_latency", {**env, "sizes": results}, lines)


if __name__ == "__main__":
    sys.exit(main())
