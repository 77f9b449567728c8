"""Three-level conversation memory in one SQLite database (WAL), conversations keyed by id.

    memory = ConversationMemory("memory.sqlite", encoder=MiniLMEncoder.load())
    memory.add_message("alice", "user", "Remember that my locker code is 4821", count=expert.count_tokens)
    messages = memory.build_context("alice", [{"role": "user", "content": "What is my locker code?"}],
                                    budget_tokens=1024, count_prompt=expert.count_prompt)

Levels (budgets in tokens of the answering expert's tokenizer):

1. current: recent messages, verbatim. When they exceed `current_tokens`, the oldest move down
   until a quarter of the budget is free: they are compressed together (extractive summary) into
   one chunk of level 2. The messages themselves stay stored (nothing is ever deleted).
2. outdated: the compressed chunks. Beyond `outdated_tokens`, the oldest chunks move down: each
   is compressed again to its most central sentence, kept as a long-term fact of low importance.
3. long-term: facts with importance (explicit "remember that ...", names, "my X is Y",
   preferences, numbers), one per key: a new fact with a known key updates it, the same text is
   a no-op. Beyond `longterm_tokens` the least important, oldest facts leave the context.

`build_context` fills the budget in this order: the system messages and the new user message
(required), the important facts (explicit, names, "my X is Y"), the two newest messages, the other
facts by importance, the rest of the 10 newest messages, then outdated chunks and older facts by
hybrid relevance to the query (MiniLM cosine + BM25). Every candidate is admitted only if the
whole rendered prompt still fits, so the result never exceeds the budget.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rank_bm25 import BM25Okapi

from dynlm.errors import ContextLengthError, DataError
from dynlm.memory.compress import extract_facts, extractive_summary, words
from dynlm.memory.embeddings import Encoder

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY, conversation TEXT NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL,
    expert TEXT, tokens INTEGER NOT NULL, level INTEGER NOT NULL DEFAULT 1, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS messages_by_conversation ON messages (conversation, level, id);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY, conversation TEXT NOT NULL, first_message INTEGER NOT NULL,
    last_message INTEGER NOT NULL, text TEXT NOT NULL, tokens INTEGER NOT NULL, source_tokens INTEGER NOT NULL,
    level INTEGER NOT NULL DEFAULT 2, embedding BLOB, created REAL NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_conversation ON chunks (conversation, level, id);
CREATE TABLE IF NOT EXISTS facts (
    id INTEGER PRIMARY KEY, conversation TEXT NOT NULL, key TEXT NOT NULL, text TEXT NOT NULL,
    importance REAL NOT NULL, tokens INTEGER NOT NULL, active INTEGER NOT NULL DEFAULT 1, embedding BLOB,
    updated REAL NOT NULL, UNIQUE (conversation, key));
"""

Count = Callable[[str], int]
CountPrompt = Callable[[list[dict[str, str]]], int]
RECENT_MESSAGES = 10
IMPORTANT = 0.8  # facts at least this important (explicit, names, "my X is Y") go in before recent messages
HYBRID_WEIGHT = 0.5  # share of the cosine score in the hybrid relevance; the rest is normalised BM25


@dataclass
class MemoryBudgets:
    current_tokens: int = 1024
    outdated_tokens: int = 4096
    longterm_tokens: int = 512


@dataclass
class _Index:
    version: tuple[int, int, int]
    kinds: list[tuple[str, int]]  # ("chunk" | "fact", row id) per document
    texts: list[str]
    vectors: np.ndarray  # [N, D]
    bm25: BM25Okapi | None


class ConversationMemory:
    def __init__(self, path: str | Path, encoder: Encoder, budgets: MemoryBudgets | None = None):
        self.path = Path(path)
        self.encoder = encoder
        self.budgets = budgets or MemoryBudgets()
        self._lock = threading.Lock()
        self._indexes: dict[str, _Index] = {}
        self._piece_tokens: dict[tuple[CountPrompt, str], int] = {}
        try:
            self.db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
            if self.db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("integrity check failed")
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed message survives a crash
            self.db.executescript(SCHEMA)
        except sqlite3.DatabaseError as e:
            raise DataError(f"{self.path}: not a usable memory database ({e})",
                            "give another --db file; this one is left as it is") from None

    def close(self) -> None:
        self.db.close()

    # --- writing ----------------------------------------------------------------------------------

    def add_message(self, conversation: str, role: str, content: str, count: Count, expert: str | None = None) -> int:
        """Store one message (committed before returning), extract facts from a user's message,
        and move what overflows down a level."""
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                row = self.db.execute(
                    "INSERT INTO messages (conversation, role, content, expert, tokens, level, created) "
                    "VALUES (?, ?, ?, ?, ?, 1, ?)", (conversation, role, content, expert, count(content), time.time()))
                if role == "user":
                    for fact in extract_facts(content):
                        self._upsert_fact(conversation, fact.key, fact.text, fact.importance, count)
                self._overflow(conversation, count)
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            return int(row.lastrowid)

    def _upsert_fact(self, conversation: str, key: str, text: str, importance: float, count: Count) -> str:
        """ADD a new key, UPDATE a known key with new text, NOOP on the same text."""
        old = self.db.execute("SELECT text, importance FROM facts WHERE conversation = ? AND key = ?",
                              (conversation, key)).fetchone()
        if old is not None and old[0] == text:
            return "noop"
        if old is None:
            self.db.execute("INSERT INTO facts (conversation, key, text, importance, tokens, updated) "
                            "VALUES (?, ?, ?, ?, ?, ?)",
                            (conversation, key, text, importance, count(text), time.time()))
            return "add"
        self.db.execute("UPDATE facts SET text = ?, importance = ?, tokens = ?, active = 1, embedding = NULL, "
                        "updated = ? WHERE conversation = ? AND key = ?",
                        (text, max(importance, old[1]), count(text), time.time(), conversation, key))
        return "update"

    def _overflow(self, conversation: str, count: Count) -> None:
        b = self.budgets
        current = self.db.execute("SELECT id, role, content, tokens FROM messages WHERE conversation = ? AND level = 1 "
                                  "ORDER BY id", (conversation,)).fetchall()
        total = sum(r[3] for r in current)
        if total > b.current_tokens:
            moved, freed = [], 0
            for r in current[:-2]:  # the two newest always stay verbatim
                if total - freed <= b.current_tokens * 3 // 4:
                    break
                moved.append(r)
                freed += r[3]
            if moved:
                source = "\n".join(f"{r[1]}: {r[2]}" for r in moved)
                summary = extractive_summary(source)
                self.db.execute("INSERT INTO chunks (conversation, first_message, last_message, text, tokens, "
                                "source_tokens, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                (conversation, moved[0][0], moved[-1][0], summary, count(summary), freed, time.time()))
                self.db.execute(f"UPDATE messages SET level = 2 WHERE id IN ({','.join('?' * len(moved))})",
                                [r[0] for r in moved])
        chunks = self.db.execute("SELECT id, text, tokens FROM chunks WHERE conversation = ? AND level = 2 ORDER BY id",
                                 (conversation,)).fetchall()
        total = sum(c[2] for c in chunks)
        for chunk_id, text, tokens in chunks:
            if total <= b.outdated_tokens:
                break
            gist = extractive_summary(text, ratio=0.0)  # the single most central sentence
            self._upsert_fact(conversation, f"chunk {chunk_id}", gist, 0.3, count)
            self.db.execute("UPDATE chunks SET level = 3 WHERE id = ?", (chunk_id,))
            total -= tokens
        facts = self.db.execute("SELECT id, tokens FROM facts WHERE conversation = ? AND active = 1 "
                                "ORDER BY importance DESC, updated DESC", (conversation,)).fetchall()
        used = 0
        for fact_id, tokens in facts:
            used += tokens
            if used > b.longterm_tokens:
                self.db.execute("UPDATE facts SET active = 0 WHERE id = ?", (fact_id,))

    # --- reading ----------------------------------------------------------------------------------

    def messages(self, conversation: str) -> list[dict[str, str]]:
        """Every stored message of a conversation, oldest first (all levels)."""
        rows = self.db.execute("SELECT role, content, expert FROM messages WHERE conversation = ? ORDER BY id",
                               (conversation,)).fetchall()
        return [{"role": r, "content": c, "expert": e} for r, c, e in rows]

    def conversations(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT conversation FROM messages GROUP BY conversation "
                                              "ORDER BY MAX(id) DESC")]

    def stats(self, conversation: str) -> dict[str, float]:
        q = self.db.execute
        current = q("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM messages WHERE conversation = ? AND level = 1",
                    (conversation,)).fetchone()
        chunks = q("SELECT COUNT(*), COALESCE(SUM(tokens), 0), COALESCE(SUM(source_tokens), 0) FROM chunks "
                   "WHERE conversation = ? AND level = 2", (conversation,)).fetchone()
        facts = q("SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM facts WHERE conversation = ? AND active = 1",
                  (conversation,)).fetchone()
        stored = q("SELECT COUNT(*) FROM messages WHERE conversation = ?", (conversation,)).fetchone()[0]
        return {"messages": stored, "current_messages": current[0], "current_tokens": current[1],
                "outdated_chunks": chunks[0], "outdated_tokens": chunks[1],
                "compression_ratio": chunks[2] / chunks[1] if chunks[1] else 0.0,
                "facts": facts[0], "fact_tokens": facts[1]}

    def facts(self, conversation: str) -> list[dict[str, object]]:
        rows = self.db.execute("SELECT key, text, importance, active FROM facts WHERE conversation = ? "
                               "ORDER BY importance DESC, updated DESC", (conversation,)).fetchall()
        return [{"key": k, "text": t, "importance": i, "active": bool(a)} for k, t, i, a in rows]

    def _index(self, conversation: str) -> _Index:
        """Embeddings (computed once per chunk or fact, stored) and BM25 over the outdated chunks and
        the facts of a conversation; rebuilt only when they changed."""
        q = self.db.execute
        version = (q("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM chunks WHERE conversation = ? AND level = 2",
                     (conversation,)).fetchone()
                   + (q("SELECT COALESCE(SUM(updated), 0) FROM facts WHERE conversation = ?",
                        (conversation,)).fetchone()[0],))
        cached = self._indexes.get(conversation)
        if cached is not None and cached.version == version:
            return cached
        rows = [("chunk", i, t, e) for i, t, e in q("SELECT id, text, embedding FROM chunks WHERE conversation = ? "
                                                     "AND level = 2 ORDER BY id", (conversation,))]
        rows += [("fact", i, t, e) for i, t, e in q("SELECT id, text, embedding FROM facts WHERE conversation = ? "
                                                     "ORDER BY id", (conversation,))]
        missing = [k for k, r in enumerate(rows) if r[3] is None]
        if missing:  # embed in batches and keep the vectors, so each text is embedded once
            vectors = self.encoder.encode([rows[k][2] for k in missing])
            with self._lock:
                self.db.execute("BEGIN")
                for k, vector in zip(missing, vectors):
                    table = "chunks" if rows[k][0] == "chunk" else "facts"
                    blob = np.asarray(vector, dtype=np.float32).tobytes()
                    self.db.execute(f"UPDATE {table} SET embedding = ? WHERE id = ?", (blob, rows[k][1]))
                    rows[k] = (*rows[k][:3], blob)
                self.db.execute("COMMIT")
        matrix = np.stack([np.frombuffer(r[3], dtype=np.float32) for r in rows]) if rows else np.zeros((0, 1))
        tokenized = [words(r[2]) or ["_"] for r in rows]
        index = _Index(version, [(r[0], r[1]) for r in rows], [r[2] for r in rows], matrix,
                       BM25Okapi(tokenized) if rows else None)
        self._indexes[conversation] = index
        return index

    def search(self, conversation: str, query: str, limit: int = 20) -> list[tuple[str, int, str, float]]:
        """(kind, id, text, score) of the outdated chunks and facts most relevant to `query`:
        `HYBRID_WEIGHT` x cosine + the rest x BM25 divided by its maximum."""
        index = self._index(conversation)
        if not index.texts:
            return []
        cosine = index.vectors @ self.encoder.encode([query])[0]
        bm25 = np.asarray(index.bm25.get_scores(words(query)), dtype=np.float32)
        bm25 = bm25 / bm25.max() if bm25.max() > 0 else bm25
        score = HYBRID_WEIGHT * cosine + (1 - HYBRID_WEIGHT) * bm25
        order = np.argsort(-score, kind="stable")[:limit]
        return [(*index.kinds[i], index.texts[i], float(score[i])) for i in order]

    def build_context(self, conversation: str, request: Sequence[dict[str, str]], budget_tokens: int,
                      count_prompt: CountPrompt) -> list[dict[str, str]]:
        """The messages the expert receives for the request's last (user) message: its system
        messages, a memory system message (facts, relevant earlier parts), recent messages verbatim
        and the new message; `count_prompt(messages)` (the rendered prompt's tokens) never
        exceeds `budget_tokens`."""
        system = "\n\n".join(m["content"] for m in request if m["role"] == "system")
        query = request[-1]["content"]
        recent = self.db.execute("SELECT role, content FROM messages WHERE conversation = ? AND level = 1 "
                                 "ORDER BY id DESC LIMIT ?", (conversation, RECENT_MESSAGES)).fetchall()
        facts = self.db.execute("SELECT id, text, importance FROM facts WHERE conversation = ? AND active = 1 "
                                "ORDER BY importance DESC, updated DESC", (conversation,)).fetchall()

        header = "What you remember from this conversation:"

        def assemble(recent_ids: list[int], memory: list[str]) -> list[dict[str, str]]:
            parts = [system] if system else []
            if memory:
                parts.append(header + "".join(f"\n- {m}" for m in memory))
            out = [{"role": "system", "content": "\n\n".join(parts)}] if parts else []
            out += [{"role": recent[i][0], "content": recent[i][1]} for i in sorted(recent_ids, reverse=True)]
            return out + [{"role": "user", "content": query}]

        base = count_prompt(assemble([], []))
        if base > budget_tokens:
            raise ContextLengthError(f"the new message alone needs {base} tokens, more than the context budget of "
                                     f"{budget_tokens}")
        # Rendering and tokenizing the whole prompt for every candidate costs O(candidates x budget):
        # admit on each piece's own token count instead, then check the real prompt and drop the
        # last admitted pieces while it is over (token merges across a boundary can differ by a few).
        empty = count_prompt([{"role": "user", "content": ""}])
        if len(self._piece_tokens) > 100_000:
            self._piece_tokens.clear()

        def tokens_of(text: str) -> int:  # cached: the same facts and messages come back query after query
            key = (count_prompt, text)
            if key not in self._piece_tokens:
                self._piece_tokens[key] = count_prompt([{"role": "user", "content": text}]) - empty
            return self._piece_tokens[key]

        per_message = count_prompt([{"role": "user", "content": ""}] * 2) - empty
        header_cost = tokens_of(header) + (tokens_of("\n\n") if system else per_message)
        admitted: list[tuple[str, int | str]] = []
        used = base

        def try_add(kind: str, item: int | str, cost: int) -> None:
            nonlocal used
            extra = cost + (header_cost if kind == "memory" and not any(k == "memory" for k, _ in admitted) else 0)
            if used + extra <= budget_tokens:
                admitted.append((kind, item))
                used += extra

        for _, text, importance in facts:
            if importance >= IMPORTANT:
                try_add("memory", text, tokens_of(f"\n- {text}"))
        for i in range(min(2, len(recent))):
            try_add("recent", i, per_message + tokens_of(recent[i][1]))
        for _, text, importance in facts:
            if importance < IMPORTANT:
                try_add("memory", text, tokens_of(f"\n- {text}"))
        for i in range(2, len(recent)):
            try_add("recent", i, per_message + tokens_of(recent[i][1]))
        shown = {item for kind, item in admitted if kind == "memory"}
        for _, _, text, _ in self.search(conversation, query):
            if text not in shown:
                try_add("memory", text, tokens_of(f"\n- {text}"))

        def chosen() -> list[dict[str, str]]:
            return assemble([i for k, i in admitted if k == "recent"], [t for k, t in admitted if k == "memory"])

        while count_prompt(chosen()) > budget_tokens:  # never true when the estimates add up exactly
            admitted.pop()
        return chosen()
