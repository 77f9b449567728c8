"""Three-level memory: budgets, overflow, compression, facts (add/update/noop), hybrid retrieval,
build_context within budget and delivered to the model, crash safety."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from dynlm.data.tokenizers import ByteTokenizer
from dynlm.errors import ContextLengthError, DataError
from dynlm.memory.compress import extract_facts, extractive_summary, words
from dynlm.memory.embeddings import HashingEncoder
from dynlm.memory.store import ConversationMemory, MemoryBudgets
from dynlm.serve.app import ServeLimits, create_app
from dynlm.serve.deployment import Deployment, Expert
from test_serve import LiveServer, tiny_checkpoint

TOKENIZER = ByteTokenizer()


def count(text: str) -> int:
    return len(TOKENIZER.encode(text))


def count_prompt(messages) -> int:
    return count("".join(f"<{m['role']}>{m['content']}\n" for m in messages))


def filler(i: int) -> str:
    return (f"We talked about topic {i % 17} today. The weather was mild and the pasta was good. "
            f"Later the conversation moved on to gardening and old films.")


def memory(tmp_path: Path, **budgets) -> ConversationMemory:
    return ConversationMemory(tmp_path / "m.sqlite", HashingEncoder(), MemoryBudgets(**budgets))


def test_extractive_summary_is_central_novel_and_in_order():
    text = ("The cat sat on the mat. The cat sat on the mat. The cat sat on the mat! "
            "The dog sat on the mat. Stock prices fell sharply today.")
    summary = extractive_summary(text, ratio=0.3)
    # a repeated sentence counts once; after the most central one, novelty beats a near-duplicate
    assert summary == "The cat sat on the mat. Stock prices fell sharply today."
    assert len(words(extractive_summary(text, ratio=0.0))) == 6  # at least one sentence


def test_facts_names_numbers_preferences():
    facts = {f.key: f for f in extract_facts("Hi, my name is Alice. Remember that my locker code is 4821. "
                                             "I prefer green tea. The meeting has 12 people.")}
    assert facts["name"].text == "The user's name is Alice"
    assert facts["my locker code"].importance == 1.0 and "4821" in facts["my locker code"].text
    assert facts["preference green tea"].importance == 0.7
    assert any(k.startswith("number") for k in facts)
    assert [f.key for f in extract_facts("My sister's city is Lisbon.")] == ["my sister s city"]


def test_facts_are_updated_or_left_alone_not_appended(tmp_path):
    mem = memory(tmp_path)
    mem.add_message("a", "user", "Remember that my locker code is 4821.", count)
    mem.add_message("a", "user", "Remember that my locker code is 4821.", count)
    assert [f["text"] for f in mem.facts("a")] == ["my locker code is 4821"]  # NOOP
    mem.add_message("a", "user", "My locker code is 7777 now", count)
    assert [f["text"] for f in mem.facts("a")] == ["My locker code is 7777 now"]  # UPDATE
    assert mem.facts("b") == []  # conversations are separate


def test_overflow_moves_oldest_down_and_keeps_every_message(tmp_path):
    mem = memory(tmp_path, current_tokens=600, outdated_tokens=400, longterm_tokens=300)
    for i in range(60):
        mem.add_message("a", "user" if i % 2 else "assistant", filler(i), count)
        stats = mem.stats("a")
        assert stats["current_tokens"] <= 600 or stats["current_messages"] <= 2
        assert stats["outdated_tokens"] <= 400
    assert stats["outdated_chunks"] > 0 and stats["compression_ratio"] > 1.5
    assert stats["fact_tokens"] <= 300
    assert [m["content"] for m in mem.messages("a")] == [filler(i) for i in range(60)]
    assert mem.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_build_context_is_within_budget_and_recalls_planted_facts(tmp_path):
    mem = memory(tmp_path, current_tokens=600)
    mem.add_message("a", "user", "Remember that my locker code is 4821.", count)
    for i in range(80):
        mem.add_message("a", "user" if i % 2 else "assistant", filler(i), count)
    request = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is my locker code?"}]
    for budget in (120, 200, 333, 600, 1500):
        context = mem.build_context("a", request, budget, count_prompt)
        assert count_prompt(context) <= budget
        assert context[0]["role"] == "system" and context[0]["content"].startswith("Be brief.")
        assert context[-1] == {"role": "user", "content": "What is my locker code?"}
        if budget >= 200:
            assert "4821" in context[0]["content"]
    big = mem.build_context("a", request, 1500, count_prompt)
    assert count_prompt(big) > 1500 - 200  # the budget is used, not left empty
    with pytest.raises(ContextLengthError):
        mem.build_context("a", request, 20, count_prompt)


def test_hybrid_search_finds_the_relevant_chunk(tmp_path):
    mem = memory(tmp_path, current_tokens=300)
    mem.add_message("a", "user", "Our submarine expedition to the Mariana trench starts in March.", count)
    for i in range(30):
        mem.add_message("a", "assistant", filler(i), count)
    hits = mem.search("a", "submarine expedition trench")
    assert "submarine" in hits[0][2]


def test_corrupted_database_is_a_clear_error_and_left_alone(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    before = path.read_bytes()
    with pytest.raises(DataError, match="not a usable memory database"):
        ConversationMemory(path, HashingEncoder())
    assert path.read_bytes() == before


def test_built_context_is_what_the_expert_receives(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny", max_positions=4096)
    deployment = Deployment.single(ckpt, name="tiny")
    deployment.attach_memory(tmp_path / "m.sqlite", context_budget=700, encoder=HashingEncoder())
    expert: Expert = deployment.experts["tiny"]
    prefills: list[torch.Tensor] = []
    expert.model.register_forward_pre_hook(lambda module, args: prefills.append(args[0].clone())
                                           if args[0].size(1) > 1 else None)
    app = create_app(deployment, ServeLimits(max_tokens=8, max_prompt_tokens=4000))
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        client.chat.completions.create(model="tiny", user="alice", max_tokens=4,
                                       messages=[{"role": "user", "content": "Remember that my locker code is 4821."}])
        for i in range(40):
            deployment.memory.add_message("alice", "user" if i % 2 else "assistant", filler(i), expert.count_tokens)
        question = [{"role": "user", "content": "What is my locker code?"}]
        expected = deployment.memory.build_context("alice", question, 700, expert.count_prompt)
        prefills.clear()
        answer = client.chat.completions.create(model="tiny", user="alice", max_tokens=4, messages=question)
    received = prefills[0][0].tolist()
    assert received == expert.tokenizer.encode(expert.render_chat(expected))
    assert "4821" in expert.tokenizer.decode(received)  # the memory reached the model, not just the question
    assert answer.usage.prompt_tokens == len(received) <= 700
    stored = ConversationMemory(tmp_path / "m.sqlite", HashingEncoder()).messages("alice")  # closed on shutdown
    assert stored[-2]["content"] == "What is my locker code?" and stored[-1]["role"] == "assistant"
    assert stored[-1]["content"] == answer.choices[0].message.content


@pytest.mark.slow
def test_kill_9_mid_conversation_loses_no_committed_message(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny", max_positions=100_000)
    db = tmp_path / "memory.sqlite"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src"), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "dynlm", "serve", "--model", str(ckpt), "--name", "tiny",
                               "--db", str(db), "--embeddings", "hashing", "--port", str(port),
                               "--max-tokens", "90000", "--max-prompt-tokens", "5000"],
                              env=env, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert time.time() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.2)
        for i in range(3):
            r = httpx.post(url + "/v1/chat/completions", timeout=60,
                           json={"model": "tiny", "user": "bob", "max_tokens": 3,
                                 "messages": [{"role": "user", "content": f"message {i}"}]})
            assert r.status_code == 200
        body = {"model": "tiny", "user": "bob", "max_tokens": 90000, "stream": True,
                "messages": [{"role": "user", "content": "the last one"}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # generating now
            server.send_signal(signal.SIGKILL)
            server.wait(10)
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(10)
    db_conn = sqlite3.connect(db)
    assert db_conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    rows = db_conn.execute("SELECT role, content FROM messages WHERE conversation = 'bob' ORDER BY id").fetchall()
    assert [c for r, c in rows if r == "user"] == ["message 0", "message 1", "message 2", "the last one"]
    assert [r for r, _ in rows].count("assistant") == 3
