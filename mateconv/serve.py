"""OpenAI-compatible HTTP server over a saved model (FastAPI + uvicorn).

    python -m mateconv.serve --model_path out/sft/final --host 127.0.0.1 --port 8000 --served_model_name mateconv

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions and POST /v1/completions (JSON or server-sent
events with "stream": true; `logprobs`/`top_logprobs` on both, `echo` on completions, as lm-eval's API models use).
Chat takes OpenAI tool calling (`tools`, `tool_choice` "auto"/"none"/"required"/a named function, `tool_calls` and
`tool` turns, rendered as SFT records are) and returns the reply's <tool_call> blocks as `tool_calls` and a leading
<think> block as `reasoning_content`; forced calls (their arguments held to the function's parameters) and
`response_format` json_object and json_schema are held to JSON by constrained decoding (mateconv/json_grammar.py,
mateconv/json_schema.py).
Generation runs in worker threads, at most `max_concurrent` at a time; up to `max_queued` more requests wait, and
the rest get 429 at once. Every error is answered in OpenAI's JSON shape: {"error": {"message", "type", "param", "code"}},
with OpenAI's wording where clients parse it (context length, API key). With `--api_key` (or MATECONV_API_KEY) every
endpoint but /health wants `Authorization: Bearer KEY`.
"""
from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import itertools
import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mateconv.chat import ChatError, context_length, load_model, prompt_ids
from mateconv.config import add_decode_flags
from mateconv.data import DataError
from mateconv.data.formats import chat_messages
from mateconv.json_grammar import Grammar, GrammarConstraint, TokenGrammar, TokenTable, token_bytes
from mateconv.json_schema import Schema, SchemaBuilder, SchemaError
from mateconv.logprobs import token_logps
from mateconv.terminal import run_main
from model.generation import SamplingConfig, detokenize, iter_tokens

logger = logging.getLogger("mateconv.serve")
MAX_N = 16
MAX_STOPS = 16  # OpenAI takes 4; lm-eval sends a task's stop strings and EOS (6 for humaneval), vLLM any number
MAX_TOP_LOGPROBS = 20
API_KEY_ENV = "MATECONV_API_KEY"
THINK = ("<think>", "</think>")  # the chat format's reasoning and tool-call blocks (mateconv/data/formats.py)
TOOL_CALL = ("<tool_call>", "</tool_call>")


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


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict  # OpenAI sends JSON text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    """A turn as OpenAI clients send it: an assistant turn may carry `tool_calls` (content null) and
    `reasoning_content`; a `tool` turn is a tool's result (its tool_call_id and name are not shown to the model, as
    in the training data)."""
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _developer_is_system(cls, message):
        """OpenAI's newer `developer` role is the system prompt."""
        if isinstance(message, dict) and message.get("role") == "developer":
            message = {**message, "role": "system"}
        return message

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """A list of parts must be text parts: say so, rather than that the list is not a string."""
        for i, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"part {i} is not a text part {{\"type\": \"text\", \"text\": \"...\"}} (type "
                                 f"{json.dumps(kind)}): this model reads text only")
        return content

    @model_validator(mode="after")
    def _check_turn(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"a {self.role} message cannot carry tool_calls (only assistant turns do)")
        return self

    def turn(self) -> dict[str, Any]:
        """The turn as a training record holds it, for `chat_messages` (which joins text parts)."""
        content = self.content if isinstance(self.content, str) else [part.model_dump() for part in self.content or []]
        turn = {"role": self.role, "content": content}
        if self.tool_calls:
            turn["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.reasoning_content:
            turn["reasoning_content"] = self.reasoning_content
        return turn


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationRequest(BaseModel):
    """What chat and text completions share. Fields we do not use (user, ...) are accepted and ignored, as other
    OpenAI servers do."""
    model_config = ConfigDict(extra="ignore")
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    top_k: int = Field(0, ge=-1)  # vLLM's extra sampling options: -1 or 0 disables top_k, 1.0 the penalty
    repetition_penalty: float = Field(1.0, gt=0.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=0, lt=2**63)  # torch's generator seeds
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, body):
        """An option sent as null means its default, as OpenAI takes it (some clients send every unset option)."""
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
        return stops

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _check_logit_bias(cls, bias):
        """OpenAI's {"token id": bias in [-100, 100]}; one message for any bad entry."""
        for key, value in bias.items() if isinstance(bias, dict) else []:
            try:
                ok = int(key) >= 0 and not isinstance(value, bool) and -100 <= float(value) <= 100
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"entry {json.dumps(key)}: {json.dumps(value)} is not a token id (a whole number "
                                 ">= 0) with a bias in [-100, 100]")
        return bias


class ChatCompletionRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    functions: list | None = None  # OpenAI's deprecated names for tools and tool_choice: refused, not ignored
    function_call: str | dict | None = None

    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools to list in the prompt and to parse calls of: none without tools or with tool_choice "none";
        400 for tools that are not functions."""
        if self.functions is not None or self.function_call is not None:
            raise APIError(400, "functions and function_call are deprecated; send tools and tool_choice",
                           param="functions" if self.functions is not None else "function_call")
        for i, tool in enumerate(self.tools or []):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise APIError(400, f"tools.{i}: only function tools are supported, as {{\"type\": \"function\", "
                                    "\"function\": {\"name\": ..., \"parameters\": ...}}", param=f"tools.{i}")
        return self.tools if self.tools and self.tool_choice != "none" else None

    def called_functions(self) -> list[str] | None:
        """The functions of which the reply must call one: all listed ones for tool_choice "required", the named
        one for {"type": "function", "function": {"name": ...}}; None when the reply need not call any. 400 for a
        choice this server does not know, one that needs tools without them, and a function not in tools."""
        choice = self.tool_choice or "auto"
        if choice in ("auto", "none"):
            return None
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if choice != "required" and not (isinstance(choice, dict) and choice.get("type") == "function"
                                         and isinstance(name, str)):
            raise APIError(400, f"tool_choice {json.dumps(choice)} is not one of \"auto\", \"none\", \"required\" "
                                "or {\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")
        if not self.tools:
            raise APIError(400, f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice")
        names = [tool["function"]["name"] for tool in self.tools]
        if choice == "required":
            return names
        if name not in names:
            raise APIError(400, f"tool_choice names the function '{name}', which is not in tools",
                           param="tool_choice")
        return [name]

    def reply_grammar(self) -> Grammar | None:
        """What the reply must be, held to by constrained decoding: one call of the functions `called_functions`
        names, with arguments that the function's parameters hold; else a JSON object for response_format
        json_object, or one that its json_schema holds; else, with a strict function among the tools, text whose
        calls are such calls (a call, once begun, is held to the schema); else anything (None)."""
        names = self.called_functions()
        opening, closing = f"{TOOL_CALL[0]}\n", f"\n{TOOL_CALL[1]}"
        if names:
            return Grammar.framed(opening, self.call_schema(names), closing)
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return Grammar.json_object()
        if kind == "json_schema":
            return Grammar.schema_object(self.reply_schema())
        if kind != "text":
            raise APIError(400, f"response_format type {json.dumps(kind)} is not one of \"text\", \"json_object\" and "
                                "\"json_schema\"", param="response_format")
        tools = self.prompt_tools() or []
        if any(tool["function"].get("strict") for tool in tools):
            return Grammar.calls(opening, self.call_schema([tool["function"]["name"] for tool in tools]), closing)
        return None

    def call_schema(self, names: list[str]) -> Schema:
        """A call of one of the functions `names`, as SFT renders calls: {"name": ..., "arguments": {...}}."""
        builder = SchemaBuilder()
        calls = [builder.object([("name", builder.const(tool["function"]["name"])),
                                 ("arguments", arguments_node(builder, tool["function"], i))])
                 for i, tool in enumerate(self.tools) if tool["function"]["name"] in names]
        return builder.build(builder.any_of(calls))

    def reply_schema(self) -> Schema:
        spec = self.response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise APIError(400, 'response_format json_schema needs "json_schema": {"name": ..., "schema": {...}}',
                           param="response_format")
        builder = SchemaBuilder()
        try:
            return builder.build(builder.compile_object(spec.get("schema", {"type": "object"})))
        except SchemaError as error:
            raise APIError(400, f"response_format.json_schema.schema: {error}", param="response_format") from None


def arguments_node(builder: SchemaBuilder, function: dict[str, Any], index: int) -> int:
    """A held call's arguments: what the function's parameters hold; any JSON object where this server cannot hold
    them to that schema, unless the function is strict (then a 400, as the arguments could not be promised)."""
    parameters = function.get("parameters")
    if parameters is None:
        return builder.any_object()
    try:
        return builder.compile_object(parameters)
    except SchemaError as error:
        if function.get("strict"):
            raise APIError(400, f"tools.{index}.function.parameters: {error}",
                           param=f"tools.{index}.function.parameters") from None
        return builder.any_object()


class CompletionRequest(GenerationRequest):
    """A text prompt, a list of them, token ids, or a list of token-id lists (lm-eval sends token ids)."""
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)  # 0 with echo: score the prompt only
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str = ""
    best_of: int | None = Field(None, ge=1)


# ---------------------------------------------------------------- generation

def held_tail(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could be the start of `marker` (held back while streaming)."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


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
        hold = max((held_tail(self.pending, stop) for stop in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextChannel:
    """Content or reasoning as it streams, a run of whitespace held back until more text follows: the whitespace the
    chat format puts around <think> and <tool_call> blocks goes with them."""

    def __init__(self):
        self.held = ""
        self.sent = False

    def add(self, text: str, trim: bool) -> str:
        text = self.held + text
        body = text.rstrip()
        if not body:
            self.held = text
            return ""
        self.held = text[len(body):]
        if trim and not self.sent:
            body = body.lstrip()
        self.sent = True
        return body

    def end(self, trim: bool) -> str:
        tail, self.held = ("" if trim else self.held), ""
        return tail


def parse_tool_call(block: str) -> dict[str, str] | None:
    """{"name", "arguments": JSON text} from the JSON inside a <tool_call> block; None when it is not a call."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments", {}), dict)):
        return None
    return {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}


class ReplyParser:
    """Splits a chat reply, fed in pieces as it is generated, into what OpenAI clients read: `reasoning` (a
    leading <think> block), `content`, and `tool_call`s (<tool_call>{"name", "arguments"}</tool_call> blocks, looked
    for only when the request lists tools; a block that is not such JSON stays text). `feed` and `finish` return
    events (kind, text or {"name", "arguments"}) in reply order; the whole reply fed at once gives the same ones."""

    def __init__(self, parse_calls: bool):
        self.parse_calls = parse_calls
        self.mode = "start"  # then "think", "content" or "call" (inside a <tool_call> block)
        self.pending = ""
        self.content, self.reasoning = TextChannel(), TextChannel()
        self.trim = False  # a <think> or call block was taken out: the content's outer whitespace goes too
        self.events: list[tuple[str, Any]] = []

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.pending += piece
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[tuple[str, Any]]:
        leftover, self.pending = self.pending, ""
        if self.mode == "think":
            self._say("reasoning", self.reasoning.add(leftover, trim=True))
        else:  # an unclosed <tool_call> block is text
            self._say("content", self.content.add((TOOL_CALL[0] if self.mode == "call" else "") + leftover, self.trim))
        self._say("content", self.content.end(self.trim))
        return self._take()

    def _step(self) -> bool:
        """One move through the pending text; False when it needs more."""
        if self.mode == "start":
            if self.pending.startswith(THINK[0]):
                self.pending, self.mode, self.trim = self.pending[len(THINK[0]):], "think", True
                return True
            if THINK[0].startswith(self.pending):
                return False
            self.mode = "content"
            return True
        if self.mode == "think":
            before, found = self._until(THINK[1])
            self._say("reasoning", self.reasoning.add(before, trim=True))
            self.mode = "content" if found else "think"
            return found
        if self.mode == "content":
            if self.parse_calls:
                before, found = self._until(TOOL_CALL[0])
            else:
                before, found, self.pending = self.pending, False, ""
            self._say("content", self.content.add(before, self.trim))
            self.mode = "call" if found else "content"
            return found
        end = self.pending.find(TOOL_CALL[1])
        if end < 0:
            return False
        block, self.pending, self.mode = self.pending[:end], self.pending[end + len(TOOL_CALL[1]):], "content"
        call = parse_tool_call(block)
        if call is None:
            self._say("content", self.content.add(TOOL_CALL[0] + block + TOOL_CALL[1], self.trim))
        else:
            self.trim = True
            self.events.append(("tool_call", call))
        return True

    def _until(self, marker: str) -> tuple[str, bool]:
        """(the pending text before `marker`, True), the marker taken out; while it has not come, (what cannot be
        its start, False)."""
        at = self.pending.find(marker)
        if at >= 0:
            before, self.pending = self.pending[:at], self.pending[at + len(marker):]
            return before, True
        cut = len(self.pending) - held_tail(self.pending, marker)
        before, self.pending = self.pending[:cut], self.pending[cut:]
        return before, False

    def _say(self, kind: str, text: str) -> None:
        if text:
            self.events.append((kind, text))

    def _take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events


def tool_call_entry(call: dict[str, str]) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}


def chat_finish_reason(finish_reason: str, called: bool) -> str:
    """OpenAI's "tool_calls" for a reply that called tools and ended by itself."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def chat_message(text: str, parse_calls: bool) -> dict:
    """The assistant message of a whole reply: content (null when it only called tools, as OpenAI's), and
    `reasoning_content` and `tool_calls` when it has them."""
    parser = ReplyParser(parse_calls)
    events = parser.feed(text) + parser.finish()
    message = {"role": "assistant", "content": "".join(text for kind, text in events if kind == "content")}
    reasoning = "".join(text for kind, text in events if kind == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [tool_call_entry(call) for kind, call in events if kind == "tool_call"]
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return message


@dataclass
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    stops: list[str]
    seed: int | None
    grammar: Grammar | None = None  # what the reply must be (constrained decoding); None: anything
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    top_k: int = 0
    repetition_penalty: float = 1.0


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: list[int]  # the completion's tokens (those behind the text when a stop string cut it)
    eos: bool = False  # the model ended it with EOS (which `tokens` leaves out)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def batch_rows(steps: Iterator[torch.Tensor], n: int) -> list[Iterator[int]]:
    """The n rows of `steps` ([n] tensors) as token iterators, read one after another: a row draws a step from
    `steps` only when no row has drawn it before, so the batch runs as long as the longest-read row needs."""
    drawn: list[list[int]] = []

    def row(index: int) -> Iterator[int]:
        for step in itertools.count():
            if step == len(drawn):
                tokens = next(steps, None)
                if tokens is None:
                    return
                drawn.append(tokens.tolist())
            yield drawn[step][index]

    return [row(index) for index in range(n)]


class Engine:
    """The model, its tokenizer and the two ways to generate: whole choices (batched) and one streamed choice."""

    def __init__(self, model, tokenizer, compile: bool | None = None):
        self.model, self.tokenizer, self.compile = model, tokenizer, compile
        self.context = context_length(model)
        self.eos_id = tokenizer.eos_token_id
        self.grammars: dict[Grammar, TokenGrammar] = {}  # each grammar over this model's tokens, built once

    @functools.cached_property
    def token_table(self) -> TokenTable:
        return TokenTable(token_bytes(self.tokenizer, self.model.config.vocab_size))

    def constraint(self, grammar: Grammar | None, rows: int) -> GrammarConstraint | None:
        if grammar is None:
            return None
        if grammar not in self.grammars:
            if len(self.grammars) >= 64:
                self.grammars.clear()
            self.grammars[grammar] = TokenGrammar(grammar, self.token_table, self.eos_id, self.model.device)
        return GrammarConstraint(self.grammars[grammar], rows)

    def chat_prompt(self, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
        """The prompt as stage 3 renders an SFT record: tool calls, tool results and tools converted by
        `chat_messages`."""
        try:
            conversation = chat_messages([message.turn() for message in messages], tools)
        except DataError as error:
            raise APIError(400, f"messages: {error}", param="messages") from None
        return prompt_ids(self.tokenizer, conversation)

    def text_prompts(self, prompt: str | list) -> list[list[int]]:
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        prompts = [p if isinstance(p, list) else self.tokenizer.encode(p, add_special_tokens=False) for p in prompt]
        if not prompts or any(not p for p in prompts):
            raise APIError(400, "prompt must not be empty", param="prompt")
        vocab = len(self.tokenizer)
        if any(not 0 <= token < vocab for p in prompts for token in p):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return prompts

    def budget(self, prompt_tokens: int, max_tokens: int | None, default_max_tokens: int, what: str) -> int:
        """New tokens to allow; 400 in OpenAI's words (which client libraries recognise) when they do not fit."""
        room = self.context - prompt_tokens
        if max_tokens is None and room < 1:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, your "
                                f"{what} resulted in {prompt_tokens} tokens. Please reduce the length of the {what}.",
                           param=what, code="context_length_exceeded")
        wanted = max_tokens if max_tokens is not None else min(default_max_tokens, room)
        if wanted > room:
            raise APIError(400, f"This model's maximum context length is {self.context} tokens. However, you "
                                f"requested {prompt_tokens + wanted} tokens ({prompt_tokens} in the {what}, {wanted} "
                                f"in the completion). Please reduce the length of the {what} or completion.",
                           param=what, code="context_length_exceeded")
        return wanted

    def sampling(self, req: GenerationRequest, max_tokens: int, grammar: Grammar | None = None) -> Sampling:
        """The request's sampling options; 400 for logit_bias token ids outside the vocabulary."""
        vocab = min(len(self.tokenizer), self.model.config.vocab_size)
        if any(not 0 <= token < vocab for token in req.logit_bias or {}):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab})", param="logit_bias")
        return Sampling(max_tokens, req.temperature, req.top_p, req.stop, req.seed, grammar, req.presence_penalty,
                        req.frequency_penalty, req.logit_bias, max(req.top_k, 0), req.repetition_penalty)

    def token_bytes(self, token: int) -> bytes:
        return self.token_table.pieces[token] or self.tokenizer.decode([token]).encode()

    def token_text(self, token: int) -> str:
        """A token as OpenAI's logprobs show it: its text, or "bytes:\\xe4\\xbd" for bytes that are part of a
        character (two such tokens would otherwise both be U+FFFD, one key in legacy `top_logprobs`)."""
        data = self.token_bytes(token)
        try:
            return data.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)

    def logprobs(self, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: (its log-probability given the tokens before it, the `top` most likely
        tokens there with theirs), from one forward pass over the whole sequence (the model's own distribution,
        before temperature or top_p)."""
        with torch.inference_mode():
            input_ids = torch.tensor([ids], device=self.model.device)
            logits = self.model(input_ids).logits
            if not top:
                return [(logprob, []) for logprob in token_logps(logits, input_ids)[0][0].tolist()]
            # the chosen tokens' numbers from the same log-softmax as the alternatives': lm-eval's is_greedy compares
            # a token's logprob with the best alternative's by ==
            logps = logits[0, :-1].float().log_softmax(-1)
            chosen = logps.gather(-1, input_ids[0, 1:, None])[:, 0].tolist()
            best = logps.topk(top, dim=-1)
        return [(logprob, list(zip(indices, values)))
                for logprob, indices, values in zip(chosen, best.indices.tolist(), best.values.tolist())]

    def _generator(self, seed: int | None) -> torch.Generator | None:
        return None if seed is None else torch.Generator(device=self.model.device).manual_seed(seed)

    def steps(self, ids: list[int], sampling: Sampling, n: int) -> Iterator[torch.Tensor]:
        """The next token of each of n samples of `ids` ([n] tensors), until all of them end or max_tokens."""
        config = SamplingConfig(sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.top_k,
                                sampling.repetition_penalty, sampling.presence_penalty, sampling.frequency_penalty,
                                sampling.logit_bias)
        return iter_tokens(self.model, torch.tensor([ids] * n, device=self.model.device), config,
                           eos_token_id=self.eos_id, generator=self._generator(sampling.seed), compile=self.compile,
                           constraint=self.constraint(sampling.grammar, n))

    def complete(self, ids: list[int], sampling: Sampling, n: int, cancel: threading.Event | None = None
                 ) -> list[Choice]:
        """n choices sampled as one batch, which runs only until every choice has ended (EOS, a stop string:
        lm-eval's generate_until asks for 256 tokens and cuts at its stop strings) or `cancel` is set."""
        if sampling.max_tokens == 0:
            return [Choice("", "length", []) for _ in range(n)]
        steps = self.steps(ids, sampling, n)
        try:
            return [list(self.reply(row, sampling, cancel))[-1] for row in batch_rows(steps, n)]
        finally:
            steps.close()

    def stream(self, ids: list[int], sampling: Sampling, cancel: threading.Event) -> Iterator[str | Choice]:
        """Text pieces as they come, then one Choice with the whole text, finish reason and token count."""
        steps = self.steps(ids, sampling, 1)
        try:
            yield from self.reply(batch_rows(steps, 1)[0], sampling, cancel)
        finally:
            steps.close()

    def reply(self, tokens: Iterable, sampling: Sampling, cancel: threading.Event | None = None
              ) -> Iterator[str | Choice]:
        """The text of generated `tokens` in pieces as it decodes, cut before the first stop string, then the Choice.
        Tokens are taken only until EOS, the one that completes a stop string, or `cancel`: streamed or not, a
        choice counts the tokens generated up to there."""
        taken: list[int] = []
        eos = False

        def cancelled() -> bool:
            return cancel is not None and cancel.is_set()

        def until_end() -> Iterator[int]:
            nonlocal eos
            for token in map(int, tokens):
                eos = token == self.eos_id
                if eos or cancelled():
                    return
                taken.append(token)
                yield token
                if cancelled():  # set while the token was decoded: before the next token's step is drawn
                    return

        scanner, pieces = StopScanner(sampling.stops), []
        for piece in detokenize(self.tokenizer, until_end()):
            pieces.append(scanner.feed(piece))
            if pieces[-1]:
                yield pieces[-1]
            if scanner.stopped:
                break
        pieces.append(scanner.flush())
        if pieces[-1]:
            yield pieces[-1]
        ended = eos and not scanner.stopped
        yield Choice("".join(pieces), "stop" if scanner.stopped or ended else "length", taken, eos=ended)


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


def parse_request(body: bytes, schema: type[GenerationRequest]) -> GenerationRequest:
    try:
        payload = json.loads(body)
        json.dumps(payload, ensure_ascii=False).encode()  # JSON may escape half of a pair ("\ud83d"): no character
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise APIError(400, f"request body is not valid JSON: {error}") from None
    except UnicodeEncodeError as error:
        raise APIError(400, f"request body holds an unpaired UTF-16 surrogate ({error.object[error.start]!a}), "
                            "not text (a character cut in half?)") from None
    except RecursionError:
        raise APIError(400, "request body nests too deeply to be read") from None
    if not isinstance(payload, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return schema.model_validate(payload)
    except ValidationError as error:
        first = error.errors()[0]
        status = 400 if first["type"] == "missing" else 422
        union = union_types(error.errors())
        if union is not None:  # pydantic's error for the first type only would name it as part of the field
            param, types = union
            raise APIError(status, f"{param}: expected {' or '.join(types)}", param=param) from None
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(status, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


UNION_MEMBER = re.compile(r"(str|int|float|bool|dict|list)(\[.*\])?")


def union_types(errors: list[dict]) -> tuple[str, list[str]] | None:
    """(the field, the types it takes) when the first error is a field of several accepted types (`stop`, `prompt`,
    `content`, ...), for which pydantic reports each type's failure under that type's name; else None."""
    loc = errors[0]["loc"]
    at = next((i for i, part in enumerate(loc) if isinstance(part, str) and UNION_MEMBER.fullmatch(part)), None)
    if at is None:
        return None
    field = loc[:at]
    types = [e["loc"][at] for e in errors if e["loc"][:at] == field and len(e["loc"]) > at]
    return ".".join(map(str, field)), list(dict.fromkeys(types))


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


def create_app(model_path: str | Path, served_model_name: str = "mateconv", device: str = "auto",
               dtype: str = "auto", max_concurrent: int = 1, max_queued: int = 16,
               max_request_bytes: int = 1_000_000, default_max_tokens: int = 256, api_key: str = "",
               compile: bool | None = None) -> FastAPI:
    """The FastAPI app serving the model at `model_path` (loaded now) under the name `served_model_name`;
    with `api_key`, every endpoint but /health answers 401 to requests without `Authorization: Bearer <api_key>`.
    compile: torch.compile the decode step (None: on CUDA yes, on CPU no)."""
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
        return {"status": "ok", "model": served_model_name, "running": admission.running, "queued": admission.waiting}

    card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "mateconv",
            "max_model_len": engine.context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str):
        if model != served_model_name:
            raise APIError(404, f"the model '{model}' does not exist; this server serves '{served_model_name}'",
                           param="model", code="model_not_found")
        return card

    async def read(request: Request, schema: type[GenerationRequest]) -> GenerationRequest:
        req = parse_request(await read_body(request, max_request_bytes), schema)
        if req.model != served_model_name:
            raise APIError(404, f"the model '{req.model}' does not exist; this server serves '{served_model_name}'",
                           param="model", code="model_not_found")
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
            return stream(ids, sampling, req, ChatChunks(f"chatcmpl-{uuid.uuid4().hex}", served_model_name,
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
                "model": served_model_name, "choices": answers,
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
            return stream(prompts[0], samplings[0], req, TextChunks(f"cmpl-{uuid.uuid4().hex}", served_model_name))

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
                "model": served_model_name, "choices": answers,
                "usage": usage(sum(map(len, prompts)), completion_tokens)}

    return app


def chat_logprobs(engine: Engine, prompt: list[int], tokens: list[int], top: int) -> dict:
    """OpenAI's chat shape: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": engine.token_text(token), "logprob": logprob, "bytes": list(engine.token_bytes(token))}

    scored = engine.logprobs(prompt + tokens, top)[len(prompt) - 1:] if tokens else []
    content = [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]}
               for token, (logprob, alternatives) in zip(tokens, scored)]
    return {"content": content, "refusal": None}


def completion_logprobs(engine: Engine, prompt: list[int], tokens: list[int], top: int, echo: bool) -> dict:
    """OpenAI's legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset; with echo the prompt's
    tokens come first and the very first one has no log-probability (null)."""
    shown = prompt + tokens if echo else tokens
    scored = engine.logprobs(prompt + tokens, top) if len(prompt) + len(tokens) > 1 else []
    scored = [(None, None)] + scored if echo else scored[len(prompt) - 1:]
    texts = [engine.token_text(token) for token in shown]
    start = len(engine.tokenizer.decode(prompt)) if echo else 0  # the reply's text: the prompt's, then the choice's
    offsets = (text_offsets(engine.tokenizer, prompt, skip_special_tokens=False) if echo else []) + \
        text_offsets(engine.tokenizer, tokens, skip_special_tokens=True, start=start)
    return {"tokens": texts, "token_logprobs": [logprob for logprob, _ in scored],
            "top_logprobs": [None if alternatives is None else {engine.token_text(t): lp for t, lp in alternatives}
                             for _, alternatives in scored],
            "text_offset": offsets}


def text_offsets(tokenizer, ids: list[int], skip_special_tokens: bool, start: int = 0) -> list[int]:
    """Where each token's text begins in `start` characters + the decoded `ids`. All the tokens of a character split
    across several (their text alone U+FFFD) begin where it does. Each step decodes only the tokens since the last
    clean cut, with the ones before it as context (as `detokenize` does), so a long prompt costs linear time."""
    def decode(part: list[int]) -> str:
        return tokenizer.decode(part, skip_special_tokens=skip_special_tokens)

    offsets, base, context, anchor = [], start, 0, 0  # ids[anchor] begins at `base`; ids[context:anchor] is context
    for i in range(len(ids)):
        so_far = decode(ids[context:i])
        offset = base + len(so_far.rstrip("\ufffd")) - len(decode(ids[context:anchor]))
        if not so_far.endswith("\ufffd"):  # a clean cut: ids[i] begins a character
            base, context, anchor = offset, anchor, i
        offsets.append(offset)
    return offsets


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


# ---------------------------------------------------------------- running it

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
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV, ""),
                        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; empty: no key)")
    add_decode_flags(parser)
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.max_concurrent < 1 or args.max_queued < 0 or args.max_request_bytes < 1 or args.default_max_tokens < 1:
        raise SystemExit("serve: max_concurrent, max_request_bytes and default_max_tokens must be >= 1, "
                         "max_queued >= 0")
    if not args.api_key and not is_loopback(args.host):
        print(f"serve: WARNING: listening on {args.host} without an API key: anyone who can reach port {args.port} "
              f"can use the model (set --api_key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    try:
        app = create_app(args.model_path, args.served_model_name, args.device, args.dtype, args.max_concurrent,
                         args.max_queued, args.max_request_bytes, args.default_max_tokens, args.api_key, args.compile)
    except ChatError as error:
        raise SystemExit(f"serve: {error}") from None
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    run_main(main)
