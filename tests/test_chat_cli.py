"""`dynlm chat` against a live server with memory."""

from __future__ import annotations

import io

from dynlm.cli import main
from dynlm.memory.embeddings import HashingEncoder
from dynlm.serve.app import ServeLimits, create_app
from dynlm.serve.deployment import Deployment
from test_serve import LiveServer, tiny_checkpoint


def test_chat_streams_and_handles_commands(tmp_path, monkeypatch, capsys):
    deployment = Deployment.single(tiny_checkpoint(tmp_path / "tiny"), name="tiny")
    deployment.attach_memory(tmp_path / "m.sqlite", 400, HashingEncoder())
    with LiveServer(create_app(deployment, ServeLimits(max_tokens=16))) as server:
        script = "Remember that my locker code is 4821.\n/memory\n/expert\n/expert nope\n/expert tiny\nhello\n/new\n"
        monkeypatch.setattr("sys.stdin", io.StringIO(script + "/quit\n"))
        assert main(["chat", "--url", server.url, "--conversation", "alice", "--max-tokens", "5",
                     "--expert", "auto"]) == 0
    out = capsys.readouterr().out
    assert out.count("[tiny] ") == 2  # two streamed answers, each naming the expert
    assert "2 messages stored" in out and "[1.0] my locker code is 4821" in out
    assert "experts: auto (current), tiny" in out and "no expert 'nope'" in out
    assert "new conversation chat-" in out


def test_chat_without_a_server_is_one_line(capsys):
    assert main(["chat", "--url", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dynlm: error: cannot reach the server")
