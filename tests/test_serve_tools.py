"""OpenAI tool calling and reasoning through the server, with the real `openai` client and LangChain's ChatOpenAI.

The model is the tiny MateConv model trained by the real engine, for a few hundred steps, on four conversations in
OpenAI's shape (tools, `tool_calls`, `tool` turns, `reasoning_content`), converted and rendered as stage 3 renders
every SFT record; its greedy replies are those conversations' assistant turns, learnt by heart. So a tool call, a
reasoning block and a malformed call come back from a real generation, not from a stub.
"""
from __future__ import annotations

import datetime
import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_openai import ChatOpenAI
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel, Field

from conftest import served

from mateconv.chat_format import render_chat
from mateconv.data.formats import to_sft
from mateconv.json_grammar import Grammar
from mateconv.serve.replies import ReplyParser, chat_message

pytestmark = pytest.mark.usefixtures("single_thread")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
STRICT_WEATHER = {"type": "function", "function": {**WEATHER["function"], "strict": True}}  # the same prompt
TOOLS = [WEATHER]
TIME = {"type": "function", "function": {"name": "get_time"}}
ZONED_TIME = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}
ASK_PARIS = {"role": "user", "content": "What is the weather in Paris?"}
CALL_PARIS = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT_PARIS = {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}
ANSWER_PARIS = "It is 21 degrees in Paris."
ASK_ROME = {"role": "user", "content": "And Rome?"}
ASK_PRIME = {"role": "user", "content": "Is 7 prime?"}
THOUGHT, VERDICT = "7 has no divisor but 1 and 7.", "Yes, 7 is prime."
ASK_BROKEN = {"role": "user", "content": "Call it badly."}
BROKEN = '<tool_call>\n{"name": get_weather}\n</tool_call>'
ASK_JSON, AS_JSON = {"role": "user", "content": "Paris as JSON?"}, {"city": "Paris", "temp_c": 21}
CONVERSATIONS = [
    [ASK_PARIS, CALL_PARIS, RESULT_PARIS, {"role": "assistant", "content": ANSWER_PARIS}],
    [ASK_ROME, {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}],
    [ASK_PRIME, {"role": "assistant", "content": VERDICT, "reasoning_content": THOUGHT}],
    [ASK_BROKEN, {"role": "assistant", "content": BROKEN}],
    [ASK_JSON, {"role": "assistant", "content": json.dumps(AS_JSON)}],
]


@pytest.fixture(scope="module")
def tool_model(tiny_tokenizer, tiny_flags, tmp_path_factory):
    """The tiny model trained on CONVERSATIONS (with TOOLS) until it replies with their assistant turns."""
    from mateconv.config import parse_config
    from mateconv.data.tokenizing import build_shards
    from mateconv.train.stages import RECIPES, run

    root = tmp_path_factory.mktemp("tool_model")
    records = [json.dumps({"tools": TOOLS, "messages": messages}) for messages in CONVERSATIONS]
    (root / "sft.jsonl").write_text("\n".join(records * 4) + "\n")
    build_shards("sft", [root / "sft.jsonl"], tiny_tokenizer, root / "tokens", workers=1, progress=False)
    flags = tiny_flags(root / "sft", "sft", data_path=root / "tokens", val_data_path="", init_from="",
                       max_seq_len=640, batch_size=4, max_steps=200, warmup_iters=10, learning_rate=3e-3,
                       save_interval_steps=1000, log_interval=50)
    run(RECIPES["sft"], parse_config(flags, RECIPES["sft"].defaults))
    return root / "sft" / "final"


@pytest.fixture(scope="module")
def server(tool_model):
    with served(tool_model, "tiny") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key="unused", max_retries=0, timeout=60)


def ask(client, messages: list[dict], **options):
    return client.chat.completions.create(model="tiny", messages=messages, temperature=0, **options)


def streamed(client, messages: list[dict], **options) -> tuple[str, str, list[dict], list[str]]:
    """(content, reasoning, tool calls, finish reasons) accumulated from the chunks by their index, as clients do."""
    content, reasoning, calls, finishes = "", "", {}, []
    for chunk in ask(client, messages, stream=True, **options):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
        for call in choice.delta.tool_calls or []:
            calls.setdefault(call.index, {"id": call.id, "name": call.function.name, "arguments": ""})
            calls[call.index]["arguments"] += call.function.arguments or ""
        finishes += [choice.finish_reason] if choice.finish_reason else []
    return content, reasoning, [calls[i] for i in sorted(calls)], finishes


@pytest.mark.parametrize("text", [
    "plain text that ends in a space ",
    "<think>\nfirst\nthen\n</think>\n\nThe answer.",
    'Let me look.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g"}\n'
    "</tool_call>",
    "<think>\nx\n</think>\n\n" + BROKEN + "\nafter <tool_call>\n{\"name\": \"f\"",
    "<thi", "a < b <tool_ca",
])
@pytest.mark.parametrize("parse_calls", [True, False])
def test_streamed_pieces_parse_as_the_whole_reply(text, parse_calls):
    whole = ReplyParser(parse_calls)
    expected = whole.feed(text) + whole.finish()
    for size in (1, 2, 5):
        parser = ReplyParser(parse_calls)
        events = [event for i in range(0, len(text), size) for event in parser.feed(text[i:i + size])]
        events += parser.finish()
        for kind in ("content", "reasoning"):
            assert "".join(v for k, v in events if k == kind) == "".join(v for k, v in expected if k == kind)
        assert [v for k, v in events if k == "tool_call"] == [v for k, v in expected if k == "tool_call"]


def test_reply_parsing_rules():
    calls = chat_message(CONVERSATIONS[1][1]["content"] + '\n<tool_call>\n{"name": "get_weather", "arguments": '
                         '{"city": "Rome"}}\n</tool_call>', parse_calls=True)
    assert calls["content"] == "Let me look." and len(calls["tool_calls"]) == 1
    assert calls["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Rome"}'}
    only_call = chat_message('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>', parse_calls=True)
    assert only_call["content"] is None and only_call["tool_calls"][0]["id"].startswith("call_")
    assert chat_message(BROKEN, parse_calls=True) == {"role": "assistant", "content": BROKEN}
    assert chat_message('<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>', True)["content"].startswith("<")
    assert chat_message("<think>\nhm\n</think>\n\nYes.", parse_calls=False) == {
        "role": "assistant", "content": "Yes.", "reasoning_content": "hm"}
    assert chat_message(" x\n", parse_calls=True) == {"role": "assistant", "content": " x\n"}  # untouched


def test_prompt_is_the_training_text(tool_model, client):
    """The prompt of a request with tools, a call and its result is the SFT record's text up to its last reply."""
    from mateconv.chat import load_model
    from mateconv.serve.engine import Engine
    from mateconv.serve.schema import ChatCompletionRequest

    model, tokenizer = load_model(tool_model, device="cpu")
    request = ChatCompletionRequest.model_validate({"model": "tiny", "messages": CONVERSATIONS[0][:-1],
                                                    "tools": TOOLS})
    prompt = tokenizer.decode(Engine(model, tokenizer).chat_prompt(request.messages, request.prompt_tools()))
    trained, _ = render_chat(to_sft({"tools": TOOLS, "messages": CONVERSATIONS[0]})["messages"])
    assert trained == f"{prompt}{ANSWER_PARIS}<|im_end|>\n"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"temp_c": 21}\n</tool_response>' in prompt and '"name": "get_weather"' in prompt
    reply = ask(client, CONVERSATIONS[0][:-1], tools=TOOLS)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert reply.choices[0].message.content == ANSWER_PARIS and reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason == "stop"


def test_tool_call_round_trip(client):
    first = ask(client, [ASK_PARIS], tools=TOOLS, tool_choice="auto")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    result = {"role": "tool", "tool_call_id": call.id, "content": RESULT_PARIS["content"]}
    second = ask(client, [ASK_PARIS, choice.message, result], tools=TOOLS)  # the client's own message object back
    assert second.choices[0].message.content == ANSWER_PARIS and second.choices[0].finish_reason == "stop"
    rome = ask(client, [ASK_ROME], tools=TOOLS).choices[0]
    assert rome.message.content == "Let me look." and rome.finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in rome.message.tool_calls] == [{"city": "Rome"}]


def test_streamed_tool_calls(client):
    content, reasoning, calls, finishes = streamed(client, [ASK_ROME], tools=TOOLS)
    assert (content, reasoning, finishes) == ("Let me look.", "", ["tool_calls"])
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", {"city": "Rome"})]
    assert calls[0]["id"].startswith("call_")
    with client.chat.completions.stream(model="tiny", messages=[ASK_PARIS], tools=TOOLS, temperature=0) as stream:
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and not final.message.content
    assert [(c.function.name, c.function.arguments) for c in final.message.tool_calls] == [
        ("get_weather", '{"city": "Paris"}')]


def reply(client, messages: list[dict], stream: bool, **options) -> tuple[str, str, list, list[str]]:
    """(content, reasoning, tool calls, finish reasons) of a reply, streamed or whole."""
    if stream:
        return streamed(client, messages, **options)
    choice = ask(client, messages, **options).choices[0]
    return (choice.message.content, (choice.message.model_extra or {}).get("reasoning_content") or "",
            choice.message.tool_calls or [], [choice.finish_reason])


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_content(client, stream):
    assert reply(client, [ASK_PRIME], stream, tools=TOOLS) == (VERDICT, THOUGHT, [], ["stop"])
    # sent back, the reasoning is rendered as training wrote it: the model's next turn sees its own <think> block
    again = ask(client, [ASK_PRIME, {"role": "assistant", "content": VERDICT, "reasoning_content": THOUGHT},
                         ASK_PRIME], tools=TOOLS)
    assert again.usage.prompt_tokens > ask(client, [ASK_PRIME], tools=TOOLS).usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_malformed_call_stays_text(client, stream):
    assert reply(client, [ASK_BROKEN], stream, tools=TOOLS) == (BROKEN, "", [], ["stop"])


@pytest.mark.parametrize("stream", [False, True])
def test_strict_tools_hold_the_calls_the_model_begins(client, stream):
    """With a strict function (listed as the same prompt), a call the model begins is held to the function's schema:
    the call it writes malformed (a text without `strict`) comes back as a call, with arguments the schema holds
    (whatever the model writes after it stays content); text and good calls are as without it."""
    if not stream:
        assert ask(client, [ASK_PRIME], tools=[STRICT_WEATHER]).usage.prompt_tokens == \
            ask(client, [ASK_PRIME], tools=TOOLS).usage.prompt_tokens
    content, _, calls, finishes = reply(client, [ASK_BROKEN], stream, tools=[STRICT_WEATHER], max_tokens=150)
    [call] = calls
    name, arguments = (call["name"], call["arguments"]) if stream else (call.function.name, call.function.arguments)
    assert (name, finishes) == ("get_weather", ["tool_calls"])
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
    assert reply(client, [ASK_PRIME], stream, tools=[STRICT_WEATHER]) == (VERDICT, THOUGHT, [], ["stop"])
    _, _, calls, _ = reply(client, [ASK_PARIS], stream, tools=[STRICT_WEATHER])
    assert [json.loads(call["arguments"] if stream else call.function.arguments) for call in calls] == [
        {"city": "Paris"}]


def test_tool_choice_none_and_no_tools(client):
    """Without tools, or with tool_choice "none", the prompt lists none and no reply is parsed into a call."""
    with_tools = ask(client, [ASK_PARIS], tools=TOOLS)
    for options in ({"tools": TOOLS, "tool_choice": "none"}, {}):
        reply = ask(client, [ASK_PARIS], **options)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
        assert reply.usage.prompt_tokens < with_tools.usage.prompt_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_forces_a_call(client, stream):
    """Asked whether 7 is prime the model answers in text; with tool_choice "required" the reply is a call."""
    content, reasoning, calls, finishes = reply(client, [ASK_PRIME], stream, tools=TOOLS, tool_choice="required",
                                                max_tokens=150)
    assert (content or "", reasoning, finishes) == ("", "", ["tool_calls"])
    [call] = calls
    name, arguments = (call["name"], call["arguments"]) if stream else (call.function.name, call.function.arguments)
    assert name == "get_weather" and isinstance(json.loads(arguments), dict)
    if not stream:  # n choices decode as one batch, each row held to the grammar
        choices = ask(client, [ASK_PRIME], tools=TOOLS, tool_choice="required", max_tokens=150, n=2).choices
        assert [c.finish_reason for c in choices] == ["tool_calls"] * 2
        assert [c.message.tool_calls[0].function.arguments for c in choices] == [arguments] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_calls_that_function(client, stream):
    """Asked whether 7 is prime the model answers in text; named, get_weather is called, with JSON arguments."""
    choice = {"type": "function", "function": {"name": "get_weather"}}
    _, _, calls, finishes = reply(client, [ASK_PRIME], stream, tools=[TIME] + TOOLS, tool_choice=choice,
                                  max_tokens=100)
    [call] = calls
    name, arguments = (call["name"], call["arguments"]) if stream else (call.function.name, call.function.arguments)
    assert name == "get_weather" and isinstance(json.loads(arguments), dict) and finishes == ["tool_calls"]


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_response_format(client, stream):
    """A reply held to a JSON object: the one the model writes anyway comes back; one it would write in text starts
    as an object, however short max_tokens cuts it."""
    assert reply(client, [ASK_JSON], stream, tools=TOOLS, response_format={"type": "json_object"}) == (
        json.dumps(AS_JSON), "", [], ["stop"])
    content, _, calls, finishes = reply(client, [ASK_PRIME], stream, tools=TOOLS, max_tokens=30,
                                        response_format={"type": "json_object"})
    grammar = Grammar.json_object()
    assert content.startswith("{") and grammar.feed(grammar.start(), content.encode()) and calls == []
    assert reply(client, [ASK_PRIME], stream, tools=TOOLS, response_format={"type": "text"})[0] == VERDICT


def test_langchain_structured_output(server):
    """LangChain's with_structured_output (function calling: a named tool_choice)."""
    chat = ChatOpenAI(model="tiny", base_url=server, api_key="unused", temperature=0, max_retries=0)
    weather = chat.with_structured_output(WEATHER["function"], method="function_calling")
    assert weather.invoke([HumanMessage(ASK_PARIS["content"])]) == {"city": "Paris"}


class Forecast(BaseModel):  # what the model answers ASK_JSON with, as a pydantic model
    city: str
    temp_c: int


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_response_format(client, stream):
    """A reply held to a schema (strict, as the `openai` package writes a pydantic model's): the object the model
    writes anyway comes back; asked what it answers in text, it answers in the schema's terms, to the end."""
    forecast = {"type": "json_schema", "json_schema": {"name": "Forecast", "strict": True,
                                                       "schema": to_strict_json_schema(Forecast)}}
    assert reply(client, [ASK_JSON], stream, tools=TOOLS, response_format=forecast) == (
        json.dumps(AS_JSON), "", [], ["stop"])
    verdict = {"type": "object", "additionalProperties": False, "required": ["prime", "sure"], "properties": {
        "prime": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}}}
    content, _, _, finishes = reply(client, [ASK_PRIME], stream, tools=TOOLS, response_format={
        "type": "json_schema", "json_schema": {"name": "verdict", "schema": verdict}})
    jsonschema.validate(json.loads(content), verdict)
    assert finishes == ["stop"]


class Verdict(BaseModel):
    prime: Literal["yes", "no"]
    sure: bool


def test_langchain_structured_output_by_json_schema(server):
    """LangChain's with_structured_output(method="json_schema") (a strict response_format, no tools in the prompt):
    whatever the tiny model would write without its tools, the reply is a Verdict."""
    chat = ChatOpenAI(model="tiny", base_url=server, api_key="unused", temperature=0, max_retries=0)
    verdict = chat.with_structured_output(Verdict, method="json_schema").invoke([HumanMessage(ASK_PRIME["content"])])
    assert isinstance(verdict, Verdict)


def test_openai_parse_returns_the_pydantic_object(client):
    parsed = client.chat.completions.parse(model="tiny", messages=[ASK_JSON], tools=[STRICT_WEATHER],
                                           response_format=Forecast, temperature=0)
    assert parsed.choices[0].message.parsed == Forecast(**AS_JSON)


class Booking(BaseModel):
    day: datetime.date
    guests: int = Field(ge=1, le=8)
    price: int = Field(gt=0, lt=1000)
    name: str = Field(min_length=2, max_length=12)
    code: str = Field(pattern=r"^[A-Z]{3}-\d{2}$")


@pytest.mark.parametrize("seed", [0, 1])
def test_openai_parse_holds_field_bounds_formats_and_patterns(client, seed):
    """A pydantic model with Field bounds, a date (format) and a pattern, which the tiny model never saw: sampled
    replies are Bookings that pydantic itself validates. (Every field has an end: a sampled email or float could
    run to max_tokens.)"""
    parsed = client.chat.completions.parse(model="tiny", messages=[ASK_JSON], response_format=Booking,
                                           temperature=1.0, seed=seed, max_tokens=400)
    assert isinstance(parsed.choices[0].message.parsed, Booking)
    assert parsed.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_forced_call_arguments_follow_the_parameters(client, stream):
    """Named, a function the model never saw is called with arguments its (strict) parameters hold. (Alone: the tiny
    model's context has no room for the prompt that lists two tools and the call.)"""
    choice = {"type": "function", "function": {"name": "get_time"}}
    _, _, calls, finishes = reply(client, [ASK_PARIS], stream, tools=[ZONED_TIME], tool_choice=choice)
    [call] = calls
    arguments = call["arguments"] if stream else call.function.arguments
    assert json.loads(arguments) in ({"zone": "UTC"}, {"zone": "CET"}) and finishes == ["tool_calls"]


def test_unsupported_tool_requests_are_one_line_400s(client, server):
    cases = [
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"ip": {"type": "string", "format": "ipv6"}}}}}}, "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}},
         "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}},
         "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}}}],
          "tool_choice": "required"}, "tools.0.function.parameters"),
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0"),
    ]
    for options, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            ask(client, [ASK_PARIS], **options)
        assert error.value.status_code == 400 and error.value.param == param
        assert "\n" not in error.value.message
    bad_arguments = {**CALL_PARIS, "tool_calls": [{**CALL_PARIS["tool_calls"][0], "function": {
        "name": "get_weather", "arguments": "{city: Paris"}}]}
    with pytest.raises(openai.BadRequestError, match="arguments of tool call 'get_weather' is not valid JSON"):
        ask(client, [ASK_PARIS, bad_arguments, RESULT_PARIS], tools=TOOLS)
    legacy = httpx.post(f"{server}/chat/completions", json={"model": "tiny", "messages": [ASK_PARIS],
                                                            "functions": [WEATHER["function"]]})
    assert legacy.status_code == 400 and legacy.json()["error"]["param"] == "functions"
    no_content = httpx.post(f"{server}/chat/completions", json={"model": "tiny", "messages": [
        ASK_PARIS, CALL_PARIS, {"role": "tool", "tool_call_id": "call_1"}]})
    assert no_content.status_code == 422 and "a tool message needs content" in no_content.json()["error"]["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_langchain_bind_tools(server, stream):
    chat = ChatOpenAI(model="tiny", base_url=server, api_key="unused", temperature=0, max_retries=0)
    with_tools = chat.bind_tools([WEATHER])
    question = HumanMessage(ASK_PARIS["content"])
    if stream:
        call = None
        for chunk in with_tools.stream([question]):
            call = chunk if call is None else call + chunk
        call = AIMessage(content=call.content, tool_calls=call.tool_calls)
    else:
        call = with_tools.invoke([question])
    assert [(c["name"], c["args"]) for c in call.tool_calls] == [("get_weather", {"city": "Paris"})]
    result = ToolMessage(RESULT_PARIS["content"], tool_call_id=call.tool_calls[0]["id"])
    assert with_tools.invoke([question, call, result]).content == ANSWER_PARIS
