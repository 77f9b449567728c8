"""The OpenAI-compatible HTTP server (FastAPI): `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (SSE streaming ending in `data: [DONE]`), `GET /health`, and the chat
page at `/`.

    app = create_app(Deployment.single("smollm2/"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every model call runs in ONE worker thread, so concurrent requests take turns token by token: each
request decodes with its own state (nothing is shared between requests) and a request that arrives
while others stream starts at once instead of waiting for them to finish. Requests beyond
`max_concurrent` are refused with 429. A client that disconnects stops its generation at the next
token. Errors have the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask

from dynlm.errors import DynlmError
from dynlm.infer.generate import DecodeStep, beam_search, stream_decode, token_logprobs
from dynlm.infer.graphs import graph_decoder, graphs_by_default
from dynlm.serve.deployment import Deployment, Expert

CONVERSATION_HEADER = "x-dynlm-conversation"
EXPERT_HEADER = "x-dynlm-expert"


@dataclass
class ServeLimits:
    max_prompt_tokens: int = 4096  # longer prompts (after the chat template and memory) get 400
    max_tokens: int = 2048  # the largest `max_tokens` a request may ask for
    max_concurrent: int = 32  # requests decoding or waiting at once; more get 429
    default_max_tokens: int = 256  # chat requests without `max_tokens`


class APIError(Exception):
    """An error answered with an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# --- request bodies (unknown fields are ignored, as the OpenAI API does for most) ----------------

class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    stream_options: dict[str, Any] | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    num_beams: int = Field(1, ge=1, le=16)  # beam search (not in OpenAI's API; the client's extra_body)
    length_penalty: float = 1.0


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatBody(_Body):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool = False


# --- helpers --------------------------------------------------------------------------------------

def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences are allowed", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop sequences must be non-empty", "stop")
    return stops


def _sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass
class _Job:
    """One request's decoding, prepared and validated."""

    expert: Expert
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    seed: int | None
    temperature: float
    top_p: float


class Worker:
    """Runs every model call in one thread: requests take turns at token granularity."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynlm-model")

    async def call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def close_later(self, it: Iterator[Any]) -> None:
        # A generator may only be closed when it is not running: queue the close behind its step.
        with contextlib.suppress(RuntimeError):  # shutting down: the worker is gone, the generator with it
            self._executor.submit(it.close)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Server:
    """State shared by the routes: the deployment, the limits, the worker and the admission count."""

    def __init__(self, deployment: Deployment, limits: ServeLimits):
        self.deployment = deployment
        self.limits = limits
        self.worker = Worker()
        self.active = 0
        for expert in deployment.experts.values():  # every admitted request may hold a static cache
            if graphs_by_default(expert.model):
                decoder = graph_decoder(expert.model)
                decoder.max_idle_sessions = max(decoder.max_idle_sessions, limits.max_concurrent)
        self.started = time.time()

    # -- admission and validation -----------------------------------------------------------------

    def admit(self) -> None:
        if self.active >= self.limits.max_concurrent:
            raise APIError(429, f"the server is busy ({self.active} requests running, the limit is "
                                f"{self.limits.max_concurrent}); retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error")
        self.active += 1

    def release(self) -> None:
        self.active -= 1

    def job(self, body: _Body, expert: Expert, prompt_ids: list[int], max_tokens: int | None,
            prompt_param: str = "messages") -> _Job:
        if body.n != 1:
            raise APIError(400, "only n=1 is supported", "n")
        if max_tokens is None:
            max_tokens = min(self.limits.default_max_tokens, self.limits.max_tokens)
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {self.limits.max_tokens}, got {max_tokens}",
                           "max_tokens")
        if not prompt_ids:
            raise APIError(400, "the prompt is empty", prompt_param)
        limit = min(self.limits.max_prompt_tokens, expert.max_positions - max_tokens)
        if len(prompt_ids) > limit:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; with max_tokens={max_tokens} at most "
                                f"{limit} fit (model positions {expert.max_positions}, prompt limit "
                                f"{self.limits.max_prompt_tokens})", prompt_param, "context_length_exceeded")
        return _Job(expert, prompt_ids, max_tokens, _stop_list(body.stop), body.seed, body.temperature, body.top_p)

    # -- decoding ---------------------------------------------------------------------------------

    async def decode(self, job: _Job, request: Request) -> AsyncIterator[DecodeStep]:
        """The steps of one generation, each computed in the worker thread. Stops (and frees the
        state) when the client disconnects or the consumer stops iterating."""
        steps = stream_decode(job.expert.model, job.expert.tokenizer, job.prompt_ids, job.max_tokens, job.stop,
                              seed=job.seed, temperature=job.temperature, top_p=job.top_p)
        try:
            while True:
                step = await self.worker.call(next, steps, None)
                if step is None:
                    return
                yield step
                if step.finish_reason is not None or await request.is_disconnected():
                    return
        finally:
            self.worker.close_later(steps)


def _completion_logprobs(job: _Job, new_ids: list[int], top: int, prefix_chars: int) -> dict[str, Any]:
    chosen, alternatives = token_logprobs(job.expert.model, job.prompt_ids, new_ids, top)
    tokenizer = job.expert.tokenizer
    tokens = [tokenizer.decode([t]) for t in new_ids]
    offsets, position = [], prefix_chars
    for token in tokens:
        offsets.append(position)
        position += len(token)
    tops = [{tokenizer.decode([t]): lp for t, lp in alt} for alt in alternatives] if top else None
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def create_app(deployment: Deployment, limits: ServeLimits | None = None) -> FastAPI:
    """The FastAPI application serving `deployment` (one model, or routed experts with memory)."""
    server = Server(deployment, limits or ServeLimits())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        # graceful shutdown: uvicorn has stopped accepting and waited for running requests
        server.worker.shutdown()
        deployment.close()

    app = FastAPI(title="dynlm", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"msg": "invalid request", "loc": ()}
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON", code="invalid_json")
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        return error_response(400, f"{'.'.join(loc) or 'body'}: {first.get('msg')}", ".".join(loc) or None)

    @app.exception_handler(DynlmError)
    async def _dynlm_error(request: Request, exc: DynlmError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _bad_method(request: Request, exc: Exception) -> JSONResponse:
        return error_response(405, f"method {request.method} not allowed on {request.url.path}",
                              code="method_not_allowed")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": deployment.model_names(), "active_requests": server.active,
                "uptime_s": round(time.time() - server.started, 1)}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(server.started)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "dynlm"}
                                           for name in deployment.model_names()]}

    @app.get("/v1/conversations")
    async def conversations() -> dict[str, Any]:
        names = [] if deployment.memory is None else await server.worker.call(deployment.memory.conversations)
        return {"object": "list", "data": [{"id": name} for name in names]}

    @app.get("/v1/conversations/{conversation}")
    async def conversation(conversation: str) -> dict[str, Any]:
        if deployment.memory is None:
            raise APIError(404, "this server has no memory (start it with --db)", code="no_memory")

        def read() -> dict[str, Any]:
            memory = deployment.memory
            return {"id": conversation, "messages": memory.messages(conversation), "facts": memory.facts(conversation),
                    "stats": memory.stats(conversation)}

        return await server.worker.call(read)

    @app.get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(resources.files("dynlm.serve").joinpath("chat.html").read_text(encoding="utf-8"))

    def _conversation(request: Request, body: _Body) -> str | None:
        return request.headers.get(CONVERSATION_HEADER) or body.user

    def _choose(body: _Body, query: str) -> tuple[Expert, str]:
        try:
            return deployment.choose(body.model, query)
        except KeyError:
            raise APIError(404, f"the model '{body.model}' does not exist; available: "
                                f"{', '.join(deployment.model_names())}", "model", "model_not_found") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, "send one prompt per request", "prompt")
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        if body.stream and body.logprobs is not None:
            raise APIError(400, "logprobs are returned for non-streamed completions only", "logprobs")
        if body.num_beams > 1 and (body.stream or body.logprobs is not None or body.temperature != 0):
            raise APIError(400, "num_beams > 1 is deterministic and not streamed: it needs temperature 0, no "
                                "stream and no logprobs", "num_beams")
        if body.num_beams == 1 and body.length_penalty != 1.0:
            raise APIError(400, "length_penalty applies to beam search (num_beams > 1)", "length_penalty")
        expert, reason = _choose(body, prompts[0])
        prompt_ids = expert.encode_text(prompts[0])
        job = server.job(body, expert, prompt_ids, body.max_tokens if body.max_tokens is not None else 16, "prompt")
        if body.num_beams > 1:
            return await _beam_respond(body, job, reason)
        return await _respond(request, body, job, reason, chat=False)

    async def _beam_respond(body: CompletionBody, job: _Job, reason: str) -> JSONResponse:
        """The best beam as one text completion."""
        server.admit()
        try:
            tokenizer = job.expert.tokenizer
            eos = list(tokenizer.eos_ids)
            best = (await server.worker.call(lambda: beam_search(job.expert.model, job.prompt_ids, body.num_beams,
                                                                 job.max_tokens, body.length_penalty, eos)))[0]
        finally:
            server.release()
        ids = best.ids[:-1] if best.ids and best.ids[-1] in eos else best.ids
        text = tokenizer.decode(ids)
        cut = min((i for s in job.stop if (i := text.find(s)) >= 0), default=-1)
        finish = "stop" if cut >= 0 or len(ids) < len(best.ids) else "length"
        choice = {"index": 0, "text": text if cut < 0 else text[:cut], "finish_reason": finish, "logprobs": None}
        n = len(best.ids)
        return JSONResponse({"id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
                             "created": int(time.time()), "model": job.expert.name, "expert": job.expert.name,
                             "route": reason, "choices": [choice],
                             "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,
                                       "total_tokens": len(job.prompt_ids) + n}},
                            headers={EXPERT_HEADER: job.expert.name})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Any:
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        if body.logprobs:
            raise APIError(400, "logprobs are supported on /v1/completions only", "logprobs")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        if messages[-1]["role"] != "user":
            raise APIError(400, "the last message must come from the user", "messages")
        expert, reason = _choose(body, messages[-1]["content"])
        conversation = _conversation(request, body)
        context = await server.worker.call(deployment.context_messages, conversation, expert, messages)
        prompt_ids = expert.tokenizer.encode(expert.render_chat(context))
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = server.job(body, expert, prompt_ids, max_tokens)

        def remember_question() -> None:
            deployment.remember(conversation, expert, "user", messages[-1]["content"])

        def remember_answer(answer: str) -> None:
            deployment.remember(conversation, expert, "assistant", answer)

        return await _respond(request, body, job, reason, chat=True, on_start=remember_question,
                              on_answer=remember_answer)

    async def _respond(request: Request, body: _Body, job: _Job, reason: str, chat: bool,
                       on_start: Any = None, on_answer: Any = None) -> Any:
        server.admit()
        if on_start is not None:
            try:
                await server.worker.call(on_start)
            except BaseException:
                server.release()
                raise
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        kind = "chat.completion" if chat else "text_completion"
        headers = {EXPERT_HEADER: job.expert.name}
        base = {"id": rid, "created": created, "model": job.expert.name, "expert": job.expert.name,
                "route": reason}

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n,
                    "total_tokens": len(job.prompt_ids) + n}

        def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": text or ""} if first else \
                    ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**base, "object": f"{kind}.chunk" if chat else kind, "choices": [choice]}

        if not body.stream:
            try:
                pieces, ids, finish = [], [], None
                async for step in server.decode(job, request):
                    pieces.append(step.text)
                    if step.token_id is not None:
                        ids.append(step.token_id)
                    finish = step.finish_reason or finish
                if finish is None:  # the client went away: nobody to answer, nothing to store
                    return JSONResponse({}, status_code=499)
                text = "".join(pieces)
                if on_answer is not None:
                    await server.worker.call(on_answer, text)
                if chat:
                    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                              "logprobs": None}
                else:
                    top = getattr(body, "logprobs", None)
                    logprobs = None if top is None else await server.worker.call(
                        _completion_logprobs, job, ids, top, 0)
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
                return JSONResponse({**base, "object": kind, "choices": [choice], "usage": usage(len(ids))},
                                    headers=headers)
            finally:
                server.release()

        include_usage = bool((body.stream_options or {}).get("include_usage"))
        released = False

        def release_once() -> None:
            nonlocal released
            if not released:
                released = True
                server.release()

        async def events() -> AsyncIterator[bytes]:
            try:
                n, pieces, first, finished = 0, [], True, False
                async for step in server.decode(job, request):
                    n += step.token_id is not None
                    pieces.append(step.text)
                    finished = step.finish_reason is not None
                    if step.text or finished or first:
                        yield _sse(chunk(step.text, step.finish_reason, first))
                        first = False
                if on_answer is not None and finished:  # an abandoned answer is not stored
                    await server.worker.call(on_answer, "".join(pieces))
                if include_usage:
                    yield _sse({**base, "object": f"{kind}.chunk" if chat else kind, "choices": [],
                                "usage": usage(n)})
                yield _sse("[DONE]")
            finally:
                release_once()

        # the background task also releases a stream whose body never started (client gone at once)
        return StreamingResponse(events(), media_type="text/event-stream", background=BackgroundTask(release_once),
                                 headers={**headers, "Cache-Control": "no-cache"})

    return app
