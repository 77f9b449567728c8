"""The OpenAI-compatible server against the official `openai` client on loopback, with a tiny
randomly initialised checkpoint; the streaming decoder it is built on."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

import dynlm
from dynlm.checkpoint import save_checkpoint
from dynlm.data.tokenizers import ByteTokenizer
from dynlm.infer.generate import generate_ids, stream_decode, token_logprobs
from dynlm.serve.app import ServeLimits, create_app
from dynlm.serve.deployment import Deployment

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_checkpoint(directory, seed: int = 0, chat_template: str | None = CHATML, max_positions: int = 512):
    torch.manual_seed(seed)
    model = dynlm.build_model("standard-tiny", vocab_size=258, hidden_size=32, num_layers=1, num_heads=2,
                              num_kv_heads=1, intermediate_size=64, max_position_embeddings=max_positions)
    save_checkpoint(model, directory, tokenizer=ByteTokenizer(chat_template=chat_template))
    return directory


class LiveServer:
    """uvicorn in a thread on a free loopback port."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny")


@pytest.fixture(scope="module")
def live(checkpoint):
    deployment = Deployment.single(checkpoint, name="tiny")
    app = create_app(deployment, ServeLimits(max_prompt_tokens=300, max_tokens=64, max_concurrent=4))
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)


# --- the decoder -----------------------------------------------------------------------------------

def test_stream_decode_matches_generate_ids_and_hides_stop_strings(checkpoint):
    model, tok = dynlm.load_pretrained(checkpoint), dynlm.load_tokenizer(checkpoint)
    prompt = [256, *b"Hello"]
    steps = list(stream_decode(model, tok, prompt, max_new_tokens=40, eos_ids=[]))
    ids = [s.token_id for s in steps if s.token_id is not None]
    reference = generate_ids(model, torch.tensor([prompt]), 40, eos_ids=[])[0, len(prompt):].tolist()
    assert ids == reference
    assert steps[-1].finish_reason == "length"
    full = tok.decode(ids)
    assert "".join(s.text for s in steps) == full
    stop = full[5:8]  # a stop string that occurs in the greedy continuation
    text = "".join(s.text for s in stream_decode(model, tok, prompt, 40, stop=[stop], eos_ids=[]))
    assert text == full[: full.find(stop)]


def test_token_logprobs_match_the_decoding_distribution(checkpoint):
    model = dynlm.load_pretrained(checkpoint)
    prompt = [256, *b"ab"]
    new = generate_ids(model, torch.tensor([prompt]), 3, eos_ids=[])[0, len(prompt):].tolist()
    chosen, top = token_logprobs(model, prompt, new, top=2)
    logits = model(torch.tensor([prompt])).logits[0, -1].float()
    assert chosen[0] == pytest.approx(logits.log_softmax(-1)[new[0]].item(), abs=1e-5)
    assert top[0][0][0] == new[0]  # greedy picked the most likely token


# --- the API through the official client -------------------------------------------------------------

def test_models_and_health(client, live):
    assert {m.id for m in client.models.list()} == {"auto", "tiny"}
    health = httpx.get(live.url + "/health").json()
    assert health["status"] == "ok"


def test_chat_completion_sync_equals_streamed(client):
    messages = [{"role": "user", "content": "Hi there"}]
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.model_extra["expert"] == "tiny"


def test_chat_prompt_is_the_checkpoints_chat_template(checkpoint, client):
    model, tok = dynlm.load_pretrained(checkpoint), dynlm.load_tokenizer(checkpoint)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    expected = tok.decode(generate_ids(model, torch.tensor([ids]), 10, eos_ids=tok.eos_ids)[0, len(ids):].tolist())
    answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert answer.usage.prompt_tokens == len(ids)
    assert expected.startswith(answer.choices[0].message.content)


def test_completion_seed_stop_and_logprobs(client):
    kwargs = dict(model="tiny", prompt="Once upon", max_tokens=20, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**kwargs)
    b = client.completions.create(**kwargs)
    assert a.choices[0].text == b.choices[0].text  # same seed, same text
    text = a.choices[0].text
    if len(text) > 4:
        cut = client.completions.create(**kwargs, stop=[text[3:5]])
        assert cut.choices[0].text == text[: text.find(text[3:5])]
        assert cut.choices[0].finish_reason == "stop"
    scored = client.completions.create(model="tiny", prompt="Once upon", max_tokens=5, temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.token_logprobs) == scored.usage.completion_tokens
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(len(t) <= 2 for t in lp.top_logprobs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="Once upon", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert streamed == scored.choices[0].text


def test_sse_stream_ends_with_done(live):
    body = {"model": "tiny", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-dynlm-expert"] == "tiny"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ({"model": "tiny"}, 400, "messages"),
])
def test_bad_requests_get_openai_shaped_4xx(live, body, status, param):
    r = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_malformed_json_and_the_server_keeps_serving(live, client):
    r = httpx.post(live.url + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert client.completions.create(model="tiny", prompt="ok", max_tokens=2).choices[0].finish_reason


def test_concurrent_requests_do_not_share_state_and_overload_gets_429(checkpoint):
    deployment = Deployment.single(checkpoint, name="tiny")
    app = create_app(deployment, ServeLimits(max_tokens=64, max_concurrent=3))
    prompts = ["alpha", "a different prompt", "third one"]
    with LiveServer(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
        alone = [client.completions.create(model="tiny", prompt=p, max_tokens=30, temperature=0).choices[0].text
                 for p in prompts]
        together: list[str | None] = [None] * 3
        errors: list[Exception] = []

        def ask(i: int) -> None:
            try:
                together[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=30,
                                                        temperature=0).choices[0].text
            except Exception as e:  # collected: a thread's assertion would be lost
                errors.append(e)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors and together == alone  # interleaved token by token, each with its own state
        app.state.server.active = 3  # as if three requests were running
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="tiny", prompt="x", max_tokens=2)
        app.state.server.active = 0


def test_client_disconnect_stops_generation(tmp_path):
    deployment = Deployment.single(tiny_checkpoint(tmp_path / "long", max_positions=100_100), name="tiny")
    app = create_app(deployment, ServeLimits(max_tokens=100_000, max_prompt_tokens=10))
    with LiveServer(app) as server:
        body = {"model": "tiny", "prompt": "x", "max_tokens": 100_000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body) as r:
            next(r.iter_lines())  # the stream has started
        deadline = time.time() + 10
        while app.state.server.active and time.time() < deadline:
            time.sleep(0.05)
        assert app.state.server.active == 0  # released long before 100k tokens
        assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_chat_page_is_served(live):
    r = httpx.get(live.url + "/")
    assert r.status_code == 200 and "<script>" in r.text and "/v1/chat/completions" in r.text


@pytest.mark.parametrize("body, param", [
    ({"model": "tiny", "prompt": ""}, "prompt"),
    ({"model": "tiny", "prompt": "x" * 400}, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, "prompt"),
    ({"model": "tiny", "prompt": "x", "logprobs": 9}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
])
def test_bad_completion_requests(live, body, param):
    r = httpx.post(live.url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_completion_with_beam_search(client, checkpoint):
    """`num_beams` (through the client's extra_body) answers with the engine's best beam; with
    sampling or streaming it is a 400."""
    from dynlm.infer.generate import beam_generate

    model, tok = dynlm.load_pretrained(checkpoint), dynlm.load_tokenizer(checkpoint)
    expected = beam_generate(model, tok, "Once upon", num_beams=3, max_new_tokens=6, length_penalty=0.5, chat=False)
    answer = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, temperature=0,
                                       extra_body={"num_beams": 3, "length_penalty": 0.5})
    assert answer.choices[0].text == expected
    with pytest.raises(openai.BadRequestError, match="num_beams"):
        client.completions.create(model="tiny", prompt="x", max_tokens=4, temperature=0.8, extra_body={"num_beams": 2})
