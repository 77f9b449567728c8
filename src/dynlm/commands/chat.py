"""`dynlm chat`: a terminal client for `dynlm serve`, streaming answers as they are decoded.

    dynlm chat --conversation alice                 # http://127.0.0.1:8000 by default
    > Remember that my locker code is 4821.
    > /memory                                       # what the server remembers of this conversation
    > /expert poetry                                # ask one expert (/expert auto: the router)
    > /new                                          # start a new conversation
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

from dynlm.errors import ConfigError, DynlmError

HELP = "/new  start a new conversation · /expert [NAME]  list or pick the expert · /memory  show the memory · /quit"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="terminal chat client for 'dynlm serve' (streaming)")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default http://127.0.0.1:8000)")
    p.add_argument("--conversation", help="conversation id: selects the server's memory (default: a new one)")
    p.add_argument("--expert", default="auto", help="expert (model) name, or auto for the router (default)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7)
    p.set_defaults(handler=run)


class ChatSession:
    """One conversation with a server: history kept here too, for servers without memory."""

    def __init__(self, url: str, conversation: str | None, expert: str, max_tokens: int, temperature: float,
                 out: Any = None):
        import httpx

        self.http = httpx.Client(base_url=url.rstrip("/"), timeout=httpx.Timeout(600, connect=5))
        self.conversation = conversation or f"chat-{uuid.uuid4().hex[:8]}"
        self.expert = expert
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.history: list[dict[str, str]] = []
        self.out = out

    def _get(self, path: str) -> dict[str, Any]:
        import httpx

        try:
            r = self.http.get(path)
        except httpx.TransportError as e:
            raise DynlmError(f"cannot reach the server at {self.http.base_url} ({e})",
                             "start it with 'dynlm serve' or give --url") from None
        body = r.json()
        if r.status_code >= 400:
            raise ConfigError(body.get("error", {}).get("message", r.text))
        return body

    def models(self) -> list[str]:
        return [m["id"] for m in self._get("/v1/models")["data"]]

    def print(self, text: str = "", end: str = "\n") -> None:
        out = self.out if self.out is not None else sys.stdout  # looked up now: stdout may be replaced
        out.write(text + end)
        out.flush()

    def command(self, line: str) -> bool:
        """Handle a /command; False to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/new":
            self.conversation = f"chat-{uuid.uuid4().hex[:8]}"
            self.history = []
            self.print(f"new conversation {self.conversation}")
        elif name == "/expert":
            names = self.models()
            if not arg.strip():
                self.print("experts: " + ", ".join(n + (" (current)" if n == self.expert else "") for n in names))
            elif arg.strip() not in names:
                self.print(f"no expert '{arg.strip()}'; experts: {', '.join(names)}")
            else:
                self.expert = arg.strip()
                self.print(f"expert: {self.expert}")
        elif name == "/memory":
            try:
                memory = self._get(f"/v1/conversations/{self.conversation}")
            except ConfigError as e:
                self.print(str(e))
                return True
            stats = memory["stats"]
            self.print(f"conversation {self.conversation}: {stats['messages']} messages stored; current "
                       f"{stats['current_messages']} messages / {stats['current_tokens']} tokens; outdated "
                       f"{stats['outdated_chunks']} chunks / {stats['outdated_tokens']} tokens (compression "
                       f"{stats['compression_ratio']:.1f}x); long-term {stats['facts']} facts")
            for fact in memory["facts"]:
                if fact["active"]:
                    self.print(f"  [{fact['importance']:.1f}] {fact['text']}")
        else:
            self.print(HELP)
        return True

    def ask(self, text: str) -> str:
        """Send one message and stream the answer to the terminal."""
        import httpx

        self.history.append({"role": "user", "content": text})
        body = {"model": self.expert, "user": self.conversation, "stream": True, "messages": self.history,
                "max_tokens": self.max_tokens, "temperature": self.temperature}
        pieces: list[str] = []
        try:
            with self.http.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    self.history.pop()
                    self.print("error: " + r.json().get("error", {}).get("message", r.text))
                    return ""
                self.print(f"[{r.headers.get('x-dynlm-expert', '?')}] ", end="")
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for choice in json.loads(line[6:]).get("choices", []):
                        piece = choice.get("delta", {}).get("content") or ""
                        pieces.append(piece)
                        self.print(piece, end="")
        except httpx.TransportError as e:
            self.history.pop()
            raise DynlmError(f"lost the server at {self.http.base_url} ({e})") from None
        self.print()
        answer = "".join(pieces)
        self.history.append({"role": "assistant", "content": answer})
        return answer


def run(args: argparse.Namespace) -> int:
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    session = ChatSession(args.url, args.conversation, args.expert, args.max_tokens, args.temperature)
    names = session.models()  # fails early, in one line, when the server is not there
    if session.expert not in names:
        raise ConfigError(f"no expert '{session.expert}' on {args.url}", "experts: " + ", ".join(names))
    interactive = sys.stdin.isatty()
    if interactive:
        session.print(f"conversation {session.conversation} on {args.url}; {HELP}")
    while True:
        if interactive:
            session.print("> ", end="")
        line = sys.stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        session.ask(line)
