"""The FastAPI app: endpoints, admission control (how many generations run and wait), API keys and streamed
events."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mateconv.chat import load_model
from mateconv.serve.engine import Choice, Engine, Sampling, chat_logprobs, completion_logprobs
from mateconv.serve.replies import ReplyParser, chat_finish_reason, chat_message, tool_call_entry
from mateconv.serve.schema import (APIError, ChatCompletionRequest, CompletionRequest, GenerationRequest,
                                   parse_request)

logger = logging.getLogger("mateconv.serve")


class Admission:
    """At most `max_concurrent` generations run; up to `max_queued` more wait; beyond that, 429 at once.

    A slot is taken in the request handler and released by the worker thread when its generation ends, so a
    client that disconnects mid-stream still frees its slot only after the model stops working for it.
    """

    def __init__(self, max_concurrent: int, max_queued: int):
        self.max_concurrent, self.max_queued = max_concurrent, max_queued
        self.executor = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="generate")
        self.semaphore: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0

    async def acquire(self) -> None:
        if self.semaphore is None:  # created lazily, inside the server's event loop
            self.semaphore = asyncio.Semaphore(self.max_concurrent)
        if self.semaphore.locked() and self.waiting >= self.max_queued:
            raise APIError(429, f"the server is busy ({self.max_concurrent} running, {self.waiting} queued); retry "
                                "later", type="server_overloaded", code="queue_full")
        self.waiting += 1
        try:
            await self.semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self.semaphore.release()

    def run(self, loop: asyncio.AbstractEventLoop, work, *args) -> asyncio.Future:
        """Runs `work(*args)` in a worker thread; the slot is released when it returns or fails."""
        def job():
            try:
                return work(*args)
            finally:
                loop.call_soon_threadsafe(self.release)

        return loop.run_in_executor(self.executor, job)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {declared} bytes; the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class KeyCheck:
    """401 for an HTTP request without `Authorization: <expected>`, but for /health. Plain ASGI, not
    `@app.middleware("http")`, whose wrapping hides a client's disconnect from `Request.is_disconnected`."""

    def __init__(self, app, expected: bytes):
        self.app, self.expected = app, expected

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                                    code="invalid_api_key").response()
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


# Accepted beside a server's own names: the one name every server had before they took the model's
ALIAS = "mateconv"


def served_names(model_path: str | Path, served_model_name: str | Sequence[str] | None) -> list[str]:
    """The names clients may send as `model`, the first listed in /v1/models: those given, else (as vLLM names a
    model) the model path as given, with ALIAS beside it."""
    if served_model_name:
        return [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
    return [str(model_path), ALIAS]


def create_app(model_path: str | Path, served_model_name: str | Sequence[str] | None = None, device: str = "auto",
               dtype: str = "auto", max_concurrent: int = 1, max_queued: int = 16,
               max_request_bytes: int = 1_000_000, default_max_tokens: int = 256, api_key: str = "",
               compile: bool | None = None) -> FastAPI:
    """The FastAPI app serving the model at `model_path` (loaded now) under the names served_names gives (a reply
    names the model as its request did);
    with `api_key`, every endpoint but /health answers 401 to requests without `Authorization: Bearer <api_key>`.
    compile: torch.compile the decode step (None: on CUDA yes, on CPU no)."""
    names = served_names(model_path, served_model_name)
    model, tokenizer = load_model(model_path, device, dtype)
    engine = Engine(model, tokenizer, compile)
    admission = Admission(max_concurrent, max_queued)
    created = int(time.time())
    app = FastAPI(title="MateConv OpenAI-compatible server")
    if api_key:
        app.add_middleware(KeyCheck, expected=f"Bearer {api_key}".encode())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return APIError(error.status_code, str(error.detail), type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return APIError(400, str(error.errors()[0].get("msg", "invalid request"))).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        logger.exception("unexpected error on %s", request.url.path)
        return APIError(500, f"internal error: {type(error).__name__}: {error}", type="server_error").response()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": names[0], "running": admission.running, "queued": admission.waiting}

    card = {"id": names[0], "object": "model", "created": created, "owned_by": "mateconv",
            "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    def check_served(model: str) -> None:
        if model not in names:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{names[0]}'",
                           param="model", code="model_not_found")

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        check_served(model)
        return card

    async def read(request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
        req = parse_request(await read_body(request, max_request_bytes), schema)
        check_served(req.model)
        return req

    def stream(ids: list[int], sampling: Sampling, req: GenerationRequest, shape) -> StreamingResponse:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = stream_events(asyncio.get_running_loop(), admission, engine, ids, sampling, req.n, shape,
                               include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def run_watched(request: Request, work):
        """`work(cancel)` in a worker (it owns the admission slot); a client that disconnects sets `cancel`, which
        ends the generation at its next token, so its slot is freed as a streaming client's is."""
        cancel = threading.Event()
        job = admission.run(asyncio.get_running_loop(), work, cancel)
        while not job.done():
            await asyncio.wait([job], timeout=0.1)
            if not job.done() and await request.is_disconnected():
                cancel.set()
                break
        return await job

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read(request, ChatCompletionRequest)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if req.logprobs and req.stream:
            raise APIError(400, "logprobs are not available with stream: true on this server", param="logprobs")
        tools = req.prompt_tools()
        grammar = req.reply_grammar()
        ids = engine.chat_prompt(req.messages, tools)
        max_tokens = engine.budget(len(ids), req.max_completion_tokens or req.max_tokens, default_max_tokens,
                                   "messages")
        sampling = engine.sampling(req, max_tokens, grammar)
        await admission.acquire()
        if req.stream:
            return stream(ids, sampling, req, ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", req.model,
                                                         parse_calls=tools is not None))

        def work(cancel: threading.Event) -> list[tuple[Choice, dict | None]]:
            return [(choice, chat_logprobs(engine, ids, choice.tokens, req.top_logprobs or 0) if req.logprobs
                     else None) for choice in engine.complete(ids, sampling, req.n, cancel)]

        results = await run_watched(request, work)
        messages = [chat_message(choice.text, parse_calls=tools is not None) for choice, _ in results]
        answers = [{"index": i, "message": message, "logprobs": logprobs,
                    "finish_reason": chat_finish_reason(choice.finish_reason, "tool_calls" in message)}
                   for i, ((choice, logprobs), message) in enumerate(zip(results, messages))]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": created_now(),
                "model": req.model, "choices": answers,
                "usage": usage(len(ids), sum(choice.completion_tokens for choice, _ in results))}

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await read(request, CompletionRequest)
        prompts = engine.text_prompts(req.prompt)
        if req.stream and (len(prompts) > 1 or req.logprobs is not None or req.echo):
            raise APIError(400, "streaming completions take one prompt, without logprobs or echo", param="stream")
        if req.max_tokens == 0 and not req.echo:
            raise APIError(400, "max_tokens 0 only makes sense with echo: true", param="max_tokens")
        # insertion and best-of sampling would be answered as plain completions: refused, as vLLM refuses them
        if req.suffix:
            raise APIError(400, "suffix (insertion) is not supported: the model only continues the prompt",
                           param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of {req.best_of} is not supported (each of the n choices is one sample); "
                                "leave it unset", param="best_of")
        samplings = [engine.sampling(req, engine.budget(len(ids), req.max_tokens, default_max_tokens, "prompt"))
                     for ids in prompts]
        await admission.acquire()
        if req.stream:
            return stream(prompts[0], samplings[0], req, TextChunks(f"cmpl-{uuid.uuid4().hex}", req.model))

        def work(cancel: threading.Event) -> list[dict]:
            """Every prompt's n choices in order: choice i * n + j is prompt i's j-th sample."""
            answers = []
            for ids, sampling in zip(prompts, samplings):
                for choice in engine.complete(ids, sampling, req.n, cancel):
                    # EOS is listed, as OpenAI and vLLM list it: lm-eval takes the last entry as the generated one
                    scored = choice.tokens + [engine.eos_id] if choice.eos else choice.tokens
                    logprobs = (completion_logprobs(engine, ids, scored, req.logprobs, req.echo)
                                if req.logprobs is not None else None)
                    text = (engine.tokenizer.decode(ids) if req.echo else "") + choice.text
                    answers.append({"index": len(answers), "text": text, "logprobs": logprobs,
                                    "finish_reason": choice.finish_reason, "completion_tokens": choice.completion_tokens})
            return answers

        answers = await run_watched(request, work)
        completion_tokens = sum(answer.pop("completion_tokens") for answer in answers)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": created_now(),
                "model": req.model, "choices": answers,
                "usage": usage(sum(map(len, prompts)), completion_tokens)}

    return app


def created_now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass
class ChatChunks:
    """Streamed chat completion chunks: a role delta opens each choice; content, reasoning_content and tool_calls
    deltas follow (each call whole, with its index among the choice's calls, as the openai client accumulates
    them)."""
    completion_id: str
    model_name: str
    parse_calls: bool = False
    parsers: dict[int, ReplyParser] = field(default_factory=dict)
    calls: dict[int, int] = field(default_factory=dict)
    object = "chat.completion.chunk"

    def opening(self, index: int) -> dict | None:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def pieces(self, index: int, text: str) -> list[dict]:
        return [self._delta(index, event) for event in self._parser(index).feed(text)]

    def ending(self, index: int, finish_reason: str) -> list[dict]:
        deltas = [self._delta(index, event) for event in self._parser(index).finish()]
        reason = chat_finish_reason(finish_reason, self.calls.get(index, 0) > 0)
        return deltas + [{"index": index, "delta": {}, "finish_reason": reason}]

    def _parser(self, index: int) -> ReplyParser:
        return self.parsers.setdefault(index, ReplyParser(self.parse_calls))

    def _delta(self, index: int, event: tuple[str, Any]) -> dict:
        kind, value = event
        if kind == "tool_call":
            self.calls[index] = self.calls.get(index, 0) + 1
            delta = {"tool_calls": [{"index": self.calls[index] - 1, **tool_call_entry(value)}]}
        else:
            delta = {"content" if kind == "content" else "reasoning_content": value}
        return {"index": index, "delta": delta, "finish_reason": None}


@dataclass
class TextChunks:
    """Streamed text completion chunks: {"index", "text", "logprobs", "finish_reason"}."""
    completion_id: str
    model_name: str
    object = "text_completion"

    def opening(self, index: int) -> dict | None:
        return None

    def pieces(self, index: int, text: str) -> list[dict]:
        return [{"index": index, "text": text, "logprobs": None, "finish_reason": None}]

    def ending(self, index: int, finish_reason: str) -> list[dict]:
        return [{"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}]


def stream_events(loop, admission: Admission, engine: Engine, ids: list[int], sampling: Sampling, n: int,
                  shape: ChatChunks | TextChunks, include_usage: bool):
    """Starts the worker now (it owns the admission slot) and returns the async iterator of server-sent events.

    The n choices are generated one after another; a client that disconnects stops the worker at its next token.
    """
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for index in range(n):
                seed = None if sampling.seed is None else sampling.seed + index
                for event in engine.stream(ids, Sampling(**{**sampling.__dict__, "seed": seed}), cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, event))
                if cancel.is_set():
                    break
        except Exception as error:  # reported to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, (None, error))
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, (None, done))

    created = created_now()

    def chunk(choices: list[dict], usage_block: dict | None = None) -> str:
        payload = {"id": shape.completion_id, "object": shape.object, "created": created,
                   "model": shape.model_name, "choices": choices}
        if include_usage:
            payload["usage"] = usage_block
        return sse(payload)

    async def events():
        completion_tokens = 0
        try:
            for index in range(n):
                if (opening := shape.opening(index)) is not None:
                    yield chunk([opening])
            while True:
                index, event = await queue.get()
                if event is done:
                    break
                if isinstance(event, Exception):
                    error = {"message": f"generation failed: {type(event).__name__}: {event}",
                             "type": "server_error", "param": None, "code": None}
                    yield sse({"error": error})
                    return
                if isinstance(event, Choice):
                    completion_tokens += event.completion_tokens
                    choices = shape.ending(index, event.finish_reason)
                else:
                    choices = shape.pieces(index, event)
                for choice in choices:
                    yield chunk([choice])
            if include_usage:
                yield chunk([], usage(len(ids), completion_tokens))
            yield sse("[DONE]")
        finally:
            cancel.set()

    admission.run(loop, produce)
    return events()
