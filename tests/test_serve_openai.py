"""The OpenAI-compatible server, exercised with the real `openai` client over loopback HTTP.

The server runs as a subprocess (`mateconv.procs.start_background`) over the tiny SFT model of the test world; its
greedy replies must equal the in-process reference (`greedy_reply`).
"""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

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


def test_model_named_by_its_path_by_default(tiny_untrained_model):
    """Without --served_model_name, a server is named by its --model_path (as vLLM names one), so that servers of
    several checkpoints are told apart; "mateconv", every server's one name before, is still accepted."""
    with served(tiny_untrained_model, None) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        name = str(tiny_untrained_model)
        assert [m.id for m in client.models.list().data] == [name]
        for model in (name, "mateconv"):
            reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                   max_tokens=1)
            assert reply.model == model
        chunks = client.completions.create(model=name, prompt="Hi", max_tokens=1, stream=True)
        assert {chunk.model for chunk in chunks} == {name}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="sft", prompt="Hi", max_tokens=1)


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


def test_reply_cut_inside_a_character_drops_its_bytes(client, tiny_tokenizer):
    """max_tokens that end the reply inside a character of several bytes: its incomplete bytes are left out, as
    vLLM and OpenAI leave them out (no U+FFFD at the end), streamed or not."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    half = tokenizer.encode("中", add_special_tokens=False)[0]
    assert tokenizer.decode([half]) == "\ufffd"  # the case under test: a token that is only part of a character
    options = {"temperature": 0, "max_tokens": 1, "logit_bias": {str(half): 100}}
    reply = ask(client, **options)
    chunks = list(ask(client, stream=True, **options))
    assert (reply.choices[0].message.content, reply.choices[0].finish_reason) == ("", "length")
    assert reply.usage.completion_tokens == 1
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""


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


def test_more_stop_strings_than_openai_takes(client, expected):
    """lm-eval's local-completions sends a task's stop strings and EOS: humaneval's are six, as vLLM takes them."""
    middle = expected[0][len(expected[0]) // 2:][:2]
    humaneval = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|im_end|>"]
    choice = ask(client, temperature=0, max_tokens=24, stop=[*humaneval, middle]).choices[0]
    assert (choice.message.content, choice.finish_reason) == (expected[0][:expected[0].index(middle)], "stop")


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
    from mateconv.serve.engine import Choice, Engine, Sampling

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
    calls.clear()
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:  # n > 1: the batch runs until every choice has stopped
        both = engine.complete(ids, Sampling(40, 0.0, 1.0, [free.text[3:6]], None), 2)
    finally:
        hook.remove()
    assert both == [cut, cut]
    assert len(calls) <= len(cut.tokens) + 1
    cancelled = threading.Event()
    cancelled.set()  # as a client that disconnected: not a reply that the model ended
    assert engine.complete(ids, Sampling(40, 0.0, 1.0, [], None), 1, cancelled) == [Choice("", "length", [])]


def test_a_disconnect_between_steps_draws_no_further_step(tiny_untrained_model, monkeypatch):
    """A non-streamed request whose client disconnects while a token is decoded: the choice took the next token's
    step (a forward pass of the whole batch) before it looked at the cancel. The other choices of the batch draw
    none."""
    from mateconv.chat import load_model
    from mateconv.serve.engine import Engine, Sampling

    model, tokenizer = load_model(tiny_untrained_model, device="cpu")
    engine, ids = Engine(model, tokenizer), tokenizer.encode("Hello there")
    cancel, forwards, decode = threading.Event(), [], tokenizer.decode

    def decode_and_disconnect(*args, **kwargs):
        if len(forwards) == 3:  # the third token is being decoded
            cancel.set()
        return decode(*args, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", decode_and_disconnect)
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        choices = engine.complete(ids, Sampling(40, 0.0, 1.0, [], None), 3, cancel)
    finally:
        hook.remove()
    assert [len(choice.tokens) for choice in choices] == [3, 0, 0]
    assert len(forwards) == 3  # one per token taken, the first with the prompt


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


def test_text_parts_are_joined_by_newlines_as_vllm_joins_them(client):
    parts = [{"type": "text", "text": "What is 3"}, {"type": "text", "text": "plus 4?"}]
    joined = ask(client, "What is 3\nplus 4?", temperature=0, max_tokens=24)
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}],
                                           temperature=0, max_tokens=24)
    assert reply.usage.prompt_tokens == joined.usage.prompt_tokens
    assert reply.choices[0].message.content == joined.choices[0].message.content


def test_unknown_role_lists_developer():
    """The 422 for an unknown role named the roles taken without `developer` (taken as system)."""
    from pydantic import ValidationError

    from mateconv.serve.schema import Message

    with pytest.raises(ValidationError, match="'system', 'developer', 'user', 'assistant' or 'tool'"):
        Message.model_validate({"role": "robot", "content": "hi"})
    assert Message.model_validate({"role": "developer", "content": "hi"}).role == "system"


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
    from mateconv.serve.schema import APIError, ChatCompletionRequest, parse_request

    body = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(APIError) as error:
        parse_request(body, ChatCompletionRequest)
    assert error.value.status == 400 and "nests too deeply" in error.value.message


@pytest.fixture(scope="module")
def busy_server(tiny_untrained_model):
    """In-process app (create_app) on a uvicorn thread: one generation at a time, one more may wait."""
    import uvicorn

    from mateconv.procs import free_port
    from mateconv.serve.app import create_app

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
LONG_COMPLETION = {"model": "tiny", "prompt": "go", "max_tokens": 300, "temperature": 1.0, "n": 2}


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


def test_a_client_that_disconnects_from_a_whole_reply_frees_the_slot(busy_server, tiny_untrained_model):
    """Not streamed: the server notices the closed connection while the model works and stops it. Every reply runs
    to its max_tokens (EOS banned: the measured reply once ended after 20 tokens, which left the test 9 ms to
    disconnect in), most of the context, so that noticing (a poll every 0.1 s, then one more token) is short beside
    it on a loaded machine."""
    eos = AutoTokenizer.from_pretrained(tiny_untrained_model).eos_token_id
    chat, completion = ({**body, "max_tokens": 1000, "logit_bias": {str(eos): -100}}
                        for body in (LONG, LONG_COMPLETION))
    with httpx.Client(base_url=busy_server, timeout=120) as http:
        start = time.perf_counter()
        http.post("/v1/chat/completions", json=chat)
        full_generation_s = time.perf_counter() - start
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
            with pytest.raises(httpx.ReadTimeout):
                http.post(path, json=body, timeout=full_generation_s / 8)
            deadline = time.perf_counter() + full_generation_s / 2
            while http.get("/health").json()["running"] and time.perf_counter() < deadline:
                time.sleep(0.02)
            assert http.get("/health").json()["running"] == 0, path


def test_create_app_serves_a_moe_model_in_process(tiny_moe_sft_model, greedy_reply):
    from fastapi.testclient import TestClient

    from mateconv.serve.app import create_app

    text, tokens, ended = greedy_reply(tiny_moe_sft_model, QUESTION, 6)
    with TestClient(create_app(tiny_moe_sft_model, served_model_name="moe", device="cpu")) as http:
        response = http.post("/v1/chat/completions", json={"model": "moe", "messages": [{"role": "user", "content":
                                                           QUESTION}], "temperature": 0, "max_tokens": 6})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == ("stop" if ended else "length")
        assert body["usage"]["completion_tokens"] == tokens


def greedy_choices(client, **kwargs) -> list[tuple[str, list[bytes]]]:
    """(text, generated tokens as bytes from chat logprobs) of each choice of a greedy reply to QUESTION."""
    reply = ask(client, temperature=0, logprobs=True, **kwargs)
    return [(c.message.content, [bytes(entry.bytes) for entry in c.logprobs.content]) for c in reply.choices]


def streamed_texts(client, **kwargs) -> dict[int, str]:
    texts: dict[int, str] = {}
    for chunk in ask(client, temperature=0, stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
    return texts


def test_logit_bias_bans_and_forces_tokens(client, expected, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    [(text, tokens)] = greedy_choices(client, max_tokens=24)
    first = tokenizer.encode(expected[0])[0]
    assert text == expected[0] and tokens[0] == tokenizer.decode([first]).encode()
    ban = {str(first): -100}
    banned = greedy_choices(client, max_tokens=24, n=2, logit_bias=ban)
    assert banned[0] == banned[1] and banned[0][0] != text and tokens[0] not in banned[0][1]
    assert streamed_texts(client, max_tokens=24, n=2, logit_bias=ban) == {0: banned[0][0], 1: banned[0][0]}

    forced = tokenizer.encode(" zebra")[0]
    force = {str(forced): 100}
    thrice = tokenizer.decode([forced] * 3)
    assert greedy_choices(client, max_tokens=3, logit_bias=force) == [(thrice, [tokenizer.decode([forced]).encode()]
                                                                       * 3)]
    assert streamed_texts(client, max_tokens=3, n=2, logit_bias=force) == {0: thrice, 1: thrice}
    completion = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=3,
                                           n=2, logit_bias=force)
    assert [choice.text for choice in completion.choices] == [thrice, thrice]


def most_repeated(tokens: list) -> int:
    return max(tokens.count(token) for token in tokens)


def test_penalties_cut_repeats(busy_server):
    """On the untrained model, whose greedy reply repeats one token: presence and frequency penalties, whole and
    streamed, n > 1."""
    client = openai.OpenAI(base_url=f"{busy_server}/v1", api_key="unused", max_retries=0, timeout=60)

    def choices(**kwargs) -> list[tuple[str, list[str]]]:
        reply = client.completions.create(model="tiny", prompt="go", temperature=0, max_tokens=24, logprobs=0,
                                          **kwargs)
        return [(choice.text, choice.logprobs.tokens) for choice in reply.choices]

    plain = choices()[0][1]
    assert most_repeated(plain) >= 10
    for penalty in ("presence_penalty", "frequency_penalty"):
        penalized = choices(n=2, **{penalty: 2.0})
        assert penalized[0] == penalized[1] and most_repeated(penalized[0][1]) == 1, penalty
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt="go", temperature=0, max_tokens=24, stream=True, **{penalty: 2.0}))
        assert streamed == penalized[0][0], penalty
    # vLLM's CTRL-style repetition_penalty (prompt tokens included)
    assert most_repeated(choices(extra_body={"repetition_penalty": 2.0})[0][1]) < most_repeated(plain)
    # a frequency penalty grows with each repeat: a small one lets a token come back, not without end
    assert 1 < most_repeated(choices(frequency_penalty=0.5)[0][1]) < most_repeated(choices(presence_penalty=0.5)[0][1])


def test_top_k_one_is_greedy(client, expected):
    """vLLM's top_k, sent as the openai client sends it (extra_body)."""
    sampled = ask(client, temperature=2.0, n=4, seed=0, max_tokens=24)
    assert any(choice.message.content != expected[0] for choice in sampled.choices)
    top_1 = ask(client, temperature=2.0, n=4, seed=0, max_tokens=24, extra_body={"top_k": 1})
    assert [choice.message.content for choice in top_1.choices] == [expected[0]] * 4


def test_penalty_and_logit_bias_validation(server):
    root = server[0]
    question = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [({"presence_penalty": 2.5}, 422, "presence_penalty"), ({"frequency_penalty": -3}, 422,
                                                                      "frequency_penalty"),
             ({"logit_bias": {"abc": 1}}, 422, "logit_bias"), ({"logit_bias": {"5": 101}}, 422, "logit_bias"),
             ({"logit_bias": {"-1": 1}}, 422, "logit_bias"), ({"logit_bias": [1]}, 422, "logit_bias"),
             ({"logit_bias": {"1000000": 1}}, 400, "logit_bias"), ({"top_k": -2}, 422, "top_k"),
             ({"repetition_penalty": 0}, 422, "repetition_penalty")]
    for path, body in (("chat/completions", question), ("completions", {"model": "tiny", "prompt": "hi",
                                                                        "max_tokens": 2})):
        for extra, status, param in cases:
            response = httpx.post(f"{root}/{path}", json={**body, **extra})
            assert response.status_code == status, (extra, response.text)
            assert response.json()["error"]["param"] == param, response.text
    assert httpx.post(f"{root}/chat/completions", json={**question, "logit_bias": {"5": -100.0},
                                                         "presence_penalty": -2}).status_code == 200


def test_suffix_and_best_of_are_refused_not_ignored(client):
    for option in ({"suffix": " and so on."}, {"best_of": 3}):
        with pytest.raises(openai.BadRequestError) as error:
            client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=2, **option)
        assert error.value.param == next(iter(option))
    assert client.completions.create(model="tiny", prompt="Once", max_tokens=2, n=2, best_of=2).choices[1].index == 1


def test_a_lone_surrogate_is_a_400():
    """An emoji cut in half by a JavaScript client's `slice` reaches JSON as an unpaired "\\ud83d" escape: not text
    the tokenizer can encode, so a client's error, not a 500."""
    from mateconv.serve.schema import APIError, ChatCompletionRequest, CompletionRequest, parse_request

    for body, schema in [(rb'{"model": "tiny", "messages": [{"role": "user", "content": "hi \ud83d"}]}',
                          ChatCompletionRequest),
                         (rb'{"model": "tiny", "prompt": "ok", "stop": ["\udc00"]}', CompletionRequest)]:
        with pytest.raises(APIError) as error:
            parse_request(body, schema)
        assert error.value.status == 400 and "unpaired UTF-16 surrogate" in error.value.message
    emoji = parse_request(rb'{"model": "tiny", "prompt": "\ud83d\ude00"}', CompletionRequest)  # a pair is one character
    assert emoji.prompt == "😀"
