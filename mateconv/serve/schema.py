"""The requests the server takes (OpenAI's chat and text completions, validated by pydantic) and the error every
failure is answered with."""
from __future__ import annotations

import json
import re
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mateconv.json_grammar import Grammar
from mateconv.json_schema import Schema, SchemaBuilder, SchemaError
from mateconv.serve.replies import TOOL_CALL

MAX_N = 16
MAX_STOPS = 16  # OpenAI takes 4; lm-eval sends a task's stop strings and EOS (6 for humaneval), vLLM any number
MAX_TOP_LOGPROBS = 20


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
    # `developer` never stays (the validator below makes it system): it is listed so a 422 names every role taken
    role: Literal["system", "developer", "user", "assistant", "tool"]
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
