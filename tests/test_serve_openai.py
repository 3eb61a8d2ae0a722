"""The OpenAI-compatible server, exercised with the real `openai` client over loopback HTTP.

The server runs as a subprocess (`mateconv.procs.start_background`) over the tiny SFT model of the test world; its
greedy replies must equal the in-process reference (`greedy_reply`).
"""
from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from conftest import served

pytestmark = pytest.mark.usefixtures("single_thread")
QUESTION = "What is 3 plus 4?"


@pytest.fixture(scope="module")
def server(tiny_sft_model):
    with served(tiny_sft_model, "tiny") as (url, process):
        yield url, process


@pytest.fixture(scope="module")
def expected(tiny_sft_model, greedy_reply) -> tuple[str, int]:
    """(text, token count) of the model's greedy reply to QUESTION, computed in process."""
    text, tokens, ended = greedy_reply(tiny_sft_model, QUESTION)
    assert ended and tokens >= 4, (text, tokens)  # the cases below need a reply of several tokens that ends
    return text, tokens


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0], api_key="unused", max_retries=0, timeout=60)


def ask(client, question: str = QUESTION, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}], **kwargs)


def test_health_and_models(server, client):
    assert httpx.get(server[0].removesuffix("/v1") + "/health").json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"  # GET /v1/models/{model}
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4o")
    assert error.value.code == "model_not_found"


def test_greedy_answer_and_usage(client, expected, tiny_tokenizer):
    from transformers import AutoTokenizer

    reply = ask(client, temperature=0, max_tokens=24)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected[0]
    assert choice.finish_reason == "stop"
    prompt = AutoTokenizer.from_pretrained(tiny_tokenizer).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == expected[1]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_equals_non_streaming(client, expected):
    whole = ask(client, temperature=0, max_tokens=24).choices[0].message.content
    chunks = list(ask(client, temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert whole == expected[0]
    assert len(deltas) >= 2, "streaming should deliver the reply in several pieces"
    assert "".join(deltas) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == expected[1]


def test_max_tokens_gives_length(client, expected):
    reply = ask(client, temperature=0, max_tokens=1)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 1
    assert expected[0].startswith(reply.choices[0].message.content)
    chunks = list(ask(client, temperature=0, max_tokens=2, stream=True, stream_options={"include_usage": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("as_list", [False, True])
def test_stop_strings(client, expected, stream, as_list):
    middle = expected[0][len(expected[0]) // 2:][:2]  # two characters from the middle of the greedy reply
    stop = ["zzz", middle] if as_list else middle
    if stream:
        chunks = list(ask(client, temperature=0, max_tokens=24, stop=stop, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    else:
        choice = ask(client, temperature=0, max_tokens=24, stop=stop).choices[0]
        text, finish = choice.message.content, [choice.finish_reason]
    assert text == expected[0][:expected[0].index(middle)]
    assert finish == ["stop"]


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_usage_counts_the_generated_tokens(client, expected, stream):
    """A stop string that the reply's last token completes: every token was generated, streamed or not (the text
    left after the cut, tokenized again, is fewer tokens)."""
    stop = expected[0][-2:]
    assert expected[0].index(stop) == len(expected[0]) - 2
    reply = ask(client, temperature=0, max_tokens=24, stop=stop, stream=stream,
                **({"stream_options": {"include_usage": True}} if stream else {}))
    usage = list(reply)[-1].usage if stream else reply.usage
    assert usage.completion_tokens == expected[1]


def test_a_stop_string_ends_the_generation(tiny_untrained_model):
    """A whole (not streamed) reply with a stop string: the model ran until the stop string, not on to max_tokens
    (lm-eval's generate_until asks for 256 tokens and cuts at its stop strings)."""
    from mateconv.chat import load_model
    from mateconv.serve import Engine, Sampling

    model, tokenizer = load_model(tiny_untrained_model, device="cpu")
    engine, ids = Engine(model, tokenizer), tokenizer.encode("Hello there")
    free = engine.complete(ids, Sampling(40, 0.0, 1.0, [], None), 1)[0]
    assert free.finish_reason == "length" and len(free.text) > 8  # the random model runs on
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        cut = engine.complete(ids, Sampling(40, 0.0, 1.0, [free.text[3:6]], None), 1)[0]
    finally:
        hook.remove()
    assert cut.finish_reason == "stop" and cut.text == free.text[:free.text.index(free.text[3:6])]
    assert len(calls) <= len(cut.tokens) + 1 < 40  # the prompt's pass and one per token taken


def test_n_choices_and_seed(client):
    first = ask(client, temperature=1.5, top_p=1.0, n=3, seed=11, max_tokens=12)
    again = ask(client, temperature=1.5, top_p=1.0, n=3, seed=11, max_tokens=12)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert 3 <= first.usage.completion_tokens <= 3 * 12


def test_streaming_n_choices(client, expected):
    chunks = list(ask(client, temperature=0, n=2, max_tokens=24, stream=True))
    texts = {0: "", 1: ""}
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {0: expected[0], 1: expected[0]}


def test_usage_counts_the_prompt_once_for_n_choices(client):
    """As OpenAI and vLLM count it: each prompt once, however many choices it gets (streamed or not)."""
    once = ask(client, temperature=0, max_tokens=4).usage.prompt_tokens
    assert ask(client, temperature=0, n=2, max_tokens=4).usage.prompt_tokens == once
    chunks = list(ask(client, temperature=0, n=2, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens == once
    prompts = ["Once upon a time", "What is"]
    single = client.completions.create(model="tiny", prompt=prompts, max_tokens=2).usage
    double = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=2).usage
    assert double.prompt_tokens == single.prompt_tokens
    assert double.total_tokens == double.prompt_tokens + double.completion_tokens


def test_error_shapes(server, client, expected):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * 500}], max_tokens=5)
    assert error.value.code == "context_length_exceeded"

    root = server[0]
    cases = [
        ({"model": "tiny"}, 400, "messages"),  # missing messages
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 422, "temperature"),
        ({"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 0}, 422, "n"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 422, "stop"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 422, "stop"),  # not "stop.str"
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "seed": 10**20}, 422, "seed"),
    ]
    for body, status, param in cases:
        response = httpx.post(f"{root}/chat/completions", json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param
        assert response.json()["error"]["type"] == "invalid_request_error"

    mixed = httpx.post(f"{root}/completions", json={"model": "tiny", "prompt": [1, "a"]}).json()["error"]
    assert (mixed["param"], mixed["message"]) == ("prompt", "prompt: expected str or list[str] or list[int] or "
                                                            "list[list[int]]")
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    response = httpx.post(f"{root}/chat/completions", json={"model": "tiny", "messages": [{"role": "user",
                                                                                           "content": image}]})
    assert response.status_code == 422 and response.json()["error"]["param"] == "messages.0.content"
    assert 'part 0 is not a text part {"type": "text", "text": "..."} (type "image_url")' in \
        response.json()["error"]["message"]

    bad_json = httpx.post(f"{root}/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and "not valid JSON" in bad_json.json()["error"]["message"]
    huge = httpx.post(f"{root}/chat/completions", content=b"x" * 2_000_000)
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    unknown = httpx.get(f"{root}/completions_typo")
    assert unknown.status_code == 404 and "error" in unknown.json()
    # what OpenAI clients also send: null for an unset option, the `developer` role, an assistant turn of tool calls
    # with null content; each as the plain request
    plain = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": QUESTION}], "temperature": 0, "max_tokens": 24}
    answer = httpx.post(f"{root}/chat/completions", json=plain).json()["choices"][0]["message"]["content"]
    nulls = {**plain, "top_p": None, "n": None, "stop": None, "seed": None, "max_completion_tokens": None}
    developer = {**plain, "messages": [{"role": "developer", "content": "Be brief."}, plain["messages"][1]]}
    for body in (nulls, developer):
        response = httpx.post(f"{root}/chat/completions", json=body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == answer
    tool_turn = {**plain, "messages": [*plain["messages"], {"role": "assistant", "content": None},
                                       {"role": "user", "content": "And?"}]}
    assert httpx.post(f"{root}/chat/completions", json=tool_turn).status_code == 200
    completion = httpx.post(f"{root}/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": None,
                                                          "temperature": 0})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] <= 16
    # none of that hurt the server
    assert server[1].poll() is None
    assert ask(client, temperature=0, max_tokens=24).choices[0].message.content == expected[0]


def test_a_body_nested_too_deeply_is_a_400():
    """JSON that nests past Python's recursion limit is a client's error, not a 500 with a traceback in the log."""
    from mateconv.serve import APIError, ChatCompletionRequest, parse_request

    body = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(APIError) as error:
        parse_request(body, ChatCompletionRequest)
    assert error.value.status == 400 and "nests too deeply" in error.value.message


@pytest.fixture(scope="module")
def busy_server(tiny_untrained_model):
    """In-process app (create_app) on a uvicorn thread: one generation at a time, one more may wait."""
    import threading

    import uvicorn

    from mateconv.procs import free_port
    from mateconv.serve import create_app

    # an untrained model rarely emits EOS, so every request generates (nearly) all of its max_tokens
    app = create_app(tiny_untrained_model, served_model_name="tiny", device="cpu", max_concurrent=1, max_queued=1)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    yield f"http://{host}:{port}"
    server.should_exit = True
    thread.join(timeout=10)


LONG = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "max_tokens": 300, "temperature": 1.0}


def test_queue_full_gives_429_and_loop_stays_responsive(busy_server):
    async def scenario():
        async with httpx.AsyncClient(base_url=busy_server, timeout=60) as http:
            requests = [http.post("/v1/chat/completions", json={**LONG, "seed": i}) for i in range(5)]
            burst = asyncio.gather(*requests)
            await asyncio.sleep(0.05)
            start = time.perf_counter()
            health = await http.get("/health")
            health_latency = time.perf_counter() - start
            return await burst, health, health_latency

    responses, health, health_latency = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == "queue_full"
            assert response.headers["retry-after"] == "1"
        else:
            assert response.json()["usage"]["completion_tokens"] > 0
    assert health.status_code == 200 and health_latency < 1.0


def test_client_disconnect_frees_the_slot(busy_server):
    with httpx.Client(base_url=busy_server, timeout=60) as http:
        start = time.perf_counter()
        http.post("/v1/chat/completions", json=LONG)
        full_generation_s = time.perf_counter() - start
        with http.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as stream:
            lines = stream.iter_lines()
            assert next(lines).startswith("data: ") and next(lines) == "" and next(lines).startswith("data: ")
            assert http.get("/health").json()["running"] == 1
        # the worker notices the disconnect at its next token and releases its slot long before it would have ended
        deadline = time.perf_counter() + full_generation_s / 4
        while http.get("/health").json()["running"] and time.perf_counter() < deadline:
            time.sleep(0.02)
        assert http.get("/health").json()["running"] == 0
        assert http.post("/v1/chat/completions", json={**LONG, "max_tokens": 5}).status_code == 200


def test_create_app_serves_a_moe_model_in_process(tiny_moe_sft_model, greedy_reply):
    from fastapi.testclient import TestClient

    from mateconv.serve import create_app

    text, tokens, ended = greedy_reply(tiny_moe_sft_model, QUESTION, 6)
    with TestClient(create_app(tiny_moe_sft_model, served_model_name="moe", device="cpu")) as http:
        response = http.post("/v1/chat/completions", json={"model": "moe", "messages": [{"role": "user", "content":
                                                           QUESTION}], "temperature": 0, "max_tokens": 6})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == ("stop" if ended else "length")
        assert body["usage"]["completion_tokens"] == tokens
