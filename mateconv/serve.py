"""OpenAI-compatible HTTP server over a saved model (FastAPI + uvicorn).

    python -m mateconv.serve --model_path out/sft/final --host 127.0.0.1 --port 8000 --served_model_name mateconv

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (JSON or server-sent events with "stream": true).
Generation runs in worker threads, at most `max_concurrent` at a time; up to `max_queued` more requests wait, and
the rest get 429 at once. Every error is answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mateconv.chat import ChatError, context_length, load_model, prompt_ids
from model.generation import SamplingConfig, detokenize, generate_tokens, iter_tokens

logger = logging.getLogger("mateconv.serve")
MAX_N = 16
MAX_STOPS = 4


class ServeError(RuntimeError):
    """The server could not be started or reached; shown as one line."""


class APIError(Exception):
    """An error answered to the client as OpenAI's error JSON with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# ---------------------------------------------------------------- request schema

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Fields we do not use (frequency_penalty, user, ...) are accepted and ignored, as other OpenAI servers do.
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
        return stops


# ---------------------------------------------------------------- generation

class StopScanner:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.pending += piece
        hits = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = max((k for stop in self.stops for k in range(1, len(stop)) if self.pending.endswith(stop[:k])),
                   default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    completion_tokens: int


class Engine:
    """The model, its tokenizer and the two ways to generate: whole choices (batched) and one streamed choice."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.context = context_length(model)
        self.eos_id = tokenizer.eos_token_id

    def prompt(self, messages: list[Message], max_tokens: int | None, default_max_tokens: int) -> tuple[list[int], int]:
        """Prompt ids and the number of new tokens to allow; 400 when the prompt does not fit the context."""
        ids = prompt_ids(self.tokenizer, [{"role": m.role, "content": m.text()} for m in messages])
        room = self.context - len(ids)
        wanted = max_tokens if max_tokens is not None else min(default_max_tokens, room)
        if room < 1 or wanted > room:
            raise APIError(400, f"this model's context is {self.context} tokens; the messages use {len(ids)} and "
                                f"{wanted} were asked for completion", param="messages",
                           code="context_length_exceeded")
        return ids, wanted

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed)

    def complete(self, ids: list[int], sampling: Sampling, n: int) -> list[Choice]:
        input_ids = torch.tensor([ids] * n, device=self.model.device)
        with torch.inference_mode():
            new_tokens = generate_tokens(
                self.model, input_ids, max_new_tokens=sampling.max_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, eos_token_id=self.eos_id, generator=self._generator(sampling.seed),
            )[:, len(ids):].tolist()
        choices = []
        for row in new_tokens:
            hit_eos = self.eos_id in row
            tokens = row[: row.index(self.eos_id)] if hit_eos else row
            scanner = StopScanner(sampling.stops)
            text = scanner.feed(self.tokenizer.decode(tokens, skip_special_tokens=True))
            if scanner.stopped:
                count = len(self.tokenizer.encode(text, add_special_tokens=False))
                choices.append(Choice(text, "stop", min(count, len(tokens))))
            else:
                text += scanner.flush()
                choices.append(Choice(text, "stop" if hit_eos else "length", len(tokens)))
        return choices

    def stream(self, ids: list[int], sampling: Sampling, cancel: threading.Event) -> Iterator[str | Choice]:
        """Text pieces as they come, then one Choice with the whole text, finish reason and token count."""
        config = SamplingConfig(sampling.max_tokens, sampling.temperature, sampling.top_p)
        tokens = iter_tokens(self.model, torch.tensor([ids], device=self.model.device), config,
                             eos_token_id=self.eos_id, generator=self._generator(sampling.seed))
        counted = {"tokens": 0, "eos": False}

        def until_eos() -> Iterator[int]:
            for token in tokens:
                if int(token) == self.eos_id:
                    counted["eos"] = True
                    return
                counted["tokens"] += 1
                yield int(token)

        scanner = StopScanner(sampling.stops)
        pieces: list[str] = []
        for piece in detokenize(self.tokenizer, until_eos()):
            safe = scanner.feed(piece)
            if safe:
                pieces.append(safe)
                yield safe
            if scanner.stopped or cancel.is_set():
                tokens.close()
                break
        if not scanner.stopped:
            tail = scanner.flush()
            if tail:
                pieces.append(tail)
                yield tail
        finish = "stop" if scanner.stopped or counted["eos"] else "length"
        yield Choice("".join(pieces), finish, counted["tokens"])


# ---------------------------------------------------------------- admission control

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


# ---------------------------------------------------------------- the app

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


def parse_request(body: bytes) -> ChatCompletionRequest:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        status = 400 if first["type"] == "missing" else 422
        raise APIError(status, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(model_path: str | Path, served_model_name: str = "mateconv", device: str = "auto",
               dtype: str = "auto", max_concurrent: int = 1, max_queued: int = 16,
               max_request_bytes: int = 1_000_000, default_max_tokens: int = 256) -> FastAPI:
    """The FastAPI app serving the model at `model_path` (loaded now) under the name `served_model_name`."""
    model, tokenizer = load_model(model_path, device, dtype)
    engine = Engine(model, tokenizer)
    admission = Admission(max_concurrent, max_queued)
    created = int(time.time())
    app = FastAPI(title="MateConv OpenAI-compatible server")

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
        return {"status": "ok", "model": served_model_name, "running": admission.running, "queued": admission.waiting}

    @app.get("/v1/models")
    async def models():
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "mateconv",
                "max_model_len": engine.context}
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse_request(await read_body(request, max_request_bytes))
        if req.model != served_model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{served_model_name}'",
                           param="model", code="model_not_found")
        ids, max_tokens = engine.prompt(req.messages, req.max_completion_tokens or req.max_tokens, default_max_tokens)
        sampling = Sampling(max_tokens, req.temperature, req.top_p, req.stop, req.seed)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        loop = asyncio.get_running_loop()
        await admission.acquire()
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = stream_events(loop, admission, engine, ids, sampling, req.n, completion_id, created_now(),
                                   served_model_name, include_usage)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        choices = await admission.run(loop, engine.complete, ids, sampling, req.n)
        completion_tokens = sum(choice.completion_tokens for choice in choices)
        return {
            "id": completion_id, "object": "chat.completion", "created": created_now(), "model": served_model_name,
            "choices": [{"index": i, "message": {"role": "assistant", "content": choice.text},
                         "finish_reason": choice.finish_reason, "logprobs": None} for i, choice in enumerate(choices)],
            "usage": usage(len(ids), completion_tokens),
        }

    return app


def created_now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def stream_events(loop, admission: Admission, engine: Engine, ids: list[int], sampling: Sampling, n: int,
                  completion_id: str, created: int, model_name: str, include_usage: bool):
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

    def chunk(choices: list[dict], usage_block: dict | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                   "choices": choices}
        if include_usage:
            payload["usage"] = usage_block
        return sse(payload)

    async def events():
        completion_tokens = 0
        try:
            for index in range(n):
                yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
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
                    yield chunk([{"index": index, "delta": {}, "finish_reason": event.finish_reason}])
                else:
                    yield chunk([{"index": index, "delta": {"content": event}, "finish_reason": None}])
            if include_usage:
                yield chunk([], usage(len(ids) * n, completion_tokens))
            yield sse("[DONE]")
        finally:
            cancel.set()

    admission.run(loop, produce)
    return events()


# ---------------------------------------------------------------- running it

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def start_background(model_path: str | Path, served_model_name: str = "mateconv", timeout_s: float = 120.0,
                     extra_args: list[str] | None = None) -> tuple[str, subprocess.Popen]:
    """Starts `python -m mateconv.serve` on a free loopback port and waits until /health answers.

    Returns (base URL such as "http://127.0.0.1:PORT/v1", the process). Stop it with `stop_background(process)`.
    The server's output goes to a log file whose tail is shown if it fails to come up.
    """
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="mateconv-serve-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "mateconv.serve", "--model_path", str(model_path), "--host", "127.0.0.1",
               "--port", str(port), "--served_model_name", served_model_name, *(extra_args or [])]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    process.log_path = log.name
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = Path(log.name).read_text(errors="replace").strip().splitlines()[-5:]
            raise ServeError(f"server exited with code {process.returncode}: {' | '.join(tail)}")
        try:
            if httpx.get(f"{root}/health", timeout=2.0).status_code == 200:
                return f"{root}/v1", process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_background(process)
    raise ServeError(f"server on port {port} not healthy after {timeout_s:.0f} s (log: {log.name})")


def stop_background(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stops a server from `start_background` (SIGTERM, then SIGKILL) and removes its log file."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log_path = getattr(process, "log_path", None)
    if log_path:
        Path(log_path).unlink(missing_ok=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="OpenAI-compatible chat completions server over a saved model.")
    parser.add_argument("--model_path", default="out/sft/final", help="save_pretrained directory")
    parser.add_argument("--served_model_name", default="mateconv", help="the name clients pass as 'model'")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max_concurrent", type=int, default=1, help="generations running at once")
    limits.add_argument("--max_queued", type=int, default=16, help="requests that may wait; more get 429")
    limits.add_argument("--max_request_bytes", type=int, default=1_000_000, help="larger bodies get 413")
    limits.add_argument("--default_max_tokens", type=int, default=256, help="when a request sets no max_tokens")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_concurrent < 1 or args.max_queued < 0 or args.max_request_bytes < 1 or args.default_max_tokens < 1:
        raise SystemExit("serve: max_concurrent, max_request_bytes and default_max_tokens must be >= 1, "
                         "max_queued >= 0")
    try:
        app = create_app(args.model_path, args.served_model_name, args.device, args.dtype, args.max_concurrent,
                         args.max_queued, args.max_request_bytes, args.default_max_tokens)
    except ChatError as error:
        raise SystemExit(f"serve: {error}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
