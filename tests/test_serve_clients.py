"""The server as the ecosystem's clients see it: an API key, /v1/completions (text, token ids, echo, streaming),
log-probabilities equal to the model's own, and context-length errors that litellm and LangChain recognise.

One server subprocess with an API key over the tiny SFT model of the test world, driven by the real `openai`
client, litellm and LangChain's ChatOpenAI over loopback HTTP.
"""
from __future__ import annotations

import os

import httpx
import openai
import pytest
import torch
from langchain_openai import ChatOpenAI
from lm_eval.models.openai_completions import LocalCompletionsAPI

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else litellm fetches a price list from the internet
import litellm  # noqa: E402

from conftest import served

from mateconv.chat import load_model

pytestmark = pytest.mark.usefixtures("single_thread")
KEY = "sk-test-0123456789"
QUESTION = "What is 3 plus 4?"
TOO_LONG = "seven " * 200  # far past the tiny model's 96-token context


@pytest.fixture(scope="module")
def server(tiny_sft_model):
    with served(tiny_sft_model, "tiny", ["--api_key", KEY]) as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def local(tiny_sft_model):
    """(model, tokenizer, the chat prompt's token ids) in this process: the reference for every number served."""
    model, tokenizer = load_model(tiny_sft_model, device="cpu", dtype="float32")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    return model, tokenizer, list(prompt)


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1."""
    with torch.no_grad():
        logps = model(torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
    return logps.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]


def test_api_key_required_and_compared(server, client):
    assert httpx.get(server.removesuffix("/v1") + "/health").status_code == 200  # liveness stays open
    for key in ("wrong", KEY[:-1]):
        with pytest.raises(openai.AuthenticationError) as error:
            openai.OpenAI(base_url=server, api_key=key, max_retries=0).models.list()
        assert error.value.code == "invalid_api_key"
    assert httpx.get(f"{server}/models").status_code == 401  # no Authorization header at all
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completions_text_tokens_and_stream_agree_with_chat(client, greedy_reply, tiny_sft_model, local):
    expected, count, _ = greedy_reply(tiny_sft_model, QUESTION)
    _, tokenizer, prompt = local
    text = tokenizer.decode(prompt)
    by_text = client.completions.create(model="tiny", prompt=text, max_tokens=24, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_ids.usage.prompt_tokens == len(prompt) and by_ids.usage.completion_tokens == count
    pieces = [c.choices[0].text for c in client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                                     temperature=0, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == expected
    two = client.completions.create(model="tiny", prompt=[prompt, prompt[:-1]], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == expected[:len(two.choices[0].text)]


def test_chat_logprobs_are_the_models_own(client, local):
    model, tokenizer, prompt = local
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}],
                                           temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens >= 4
    tokens = [tokenizer.encode(entry.token, add_special_tokens=False) for entry in content]
    ids = prompt + [t for piece in tokens for t in piece]
    expected = reference_logprobs(model, ids)[len(prompt) - 1:]
    served = torch.tensor([entry.logprob for entry in content])
    assert torch.allclose(served, expected, atol=1e-4), (served, expected)
    for entry in content:  # greedy: the chosen token is the most likely one, and the top 3 are sorted
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_echo_scores_the_prompt_like_lm_eval(client, local):
    """lm-eval's loglikelihood requests: token ids, echo, max_tokens 0, logprobs 1."""
    model, _, prompt = local
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) and logprobs.token_logprobs[0] is None
    served = torch.tensor(logprobs.token_logprobs[1:])
    assert torch.allclose(served, reference_logprobs(model, prompt), atol=1e-4)
    assert logprobs.text_offset == sorted(logprobs.text_offset) and len(logprobs.top_logprobs[1]) == 1


def test_tokens_that_split_characters(client, local):
    """A character of several bytes split across tokens (each alone decodes to U+FFFD): such tokens are shown as
    OpenAI shows them, "bytes:\\xf0\\x9d", so the tokens' bytes make up the text and no two alternatives in the
    legacy `top_logprobs` share a key; every later token's text_offset is still at its text in the echoed prompt;
    chat logprobs carry each token's own bytes."""
    _, tokenizer, _ = local
    prompt = "𝄞 music, 你好 Once"
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    assert any(tokenizer.decode([token]) == "\ufffd" for token in ids)  # the case under test
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=5)
    text, logprobs = reply.choices[0].text, reply.choices[0].logprobs
    assert text == prompt and logprobs.text_offset == sorted(logprobs.text_offset)
    assert b"".join(token_bytes(token) for token in logprobs.tokens) == prompt.encode()
    assert all(len(alternatives) == 5 for alternatives in logprobs.top_logprobs[1:])
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        assert token.startswith("bytes:") or text[offset:offset + len(token)] == token, (token, offset)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=8,
                                          temperature=1.0, seed=0, logprobs=True, top_logprobs=5)
    content = chat.choices[0].logprobs.content
    assert b"".join(bytes(entry.bytes) for entry in content).decode(errors="replace") == chat.choices[0].message.content
    for entry in content:
        assert bytes(entry.bytes) == token_bytes(entry.token)
        assert len({alternative.token for alternative in entry.top_logprobs}) == 5


def test_token_id_prompt_that_ends_inside_a_character(client, local):
    """A token-id prompt cut inside a character, continued twice by the byte that completes it: the echo shows the
    prompt's incomplete character as one U+FFFD and nothing more (the first byte completes it, the second is a
    stray byte at the end, dropped as an incomplete one is); both completion tokens begin at the end of the text."""
    _, tokenizer, _ = local
    ids = tokenizer.encode("Once 中", add_special_tokens=False)
    assert tokenizer.decode(ids[-1:]) == "\ufffd"  # the case under test
    prompt, rest = ids[:-1], ids[-1]
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                      logit_bias={str(rest): 100}, temperature=0)
    choice = reply.choices[0]
    assert choice.text == tokenizer.decode(prompt) == "Once \ufffd"
    assert len(choice.logprobs.tokens) == len(prompt) + 2
    assert choice.logprobs.text_offset[-2:] == [len(choice.text)] * 2


def token_bytes(token: str) -> bytes:
    """The bytes of a token as the server shows it."""
    if token.startswith("bytes:"):
        return bytes(int(hexa, 16) for hexa in token.removeprefix("bytes:").split("\\x")[1:])
    return token.encode()


def test_lm_eval_loglikelihood_keeps_the_continuation_when_the_model_ends(client, local, greedy_reply,
                                                                         tiny_sft_model):
    """lm-eval's local-completions sends context + continuation with max_tokens 1, echo and logprobs, and drops the
    last entry as the generated token: when that token is EOS it must still be listed (as OpenAI and vLLM do), else
    the continuation's last token is lost from its log-likelihood."""
    model, tokenizer, prompt = local
    answer, _, ended = greedy_reply(tiny_sft_model, QUESTION)
    assert ended  # the greedy token after the whole answer is EOS
    ids = prompt + tokenizer.encode(answer, add_special_tokens=False)
    reply = client.completions.create(model="tiny", prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 1 and logprobs.tokens[-1] == tokenizer.eos_token
    continuation = sum(logprobs.token_logprobs[len(prompt):-1])  # lm-eval's parse_logprobs
    expected = reference_logprobs(model, ids)[len(prompt) - 1:].sum().item()
    assert continuation == pytest.approx(expected, abs=1e-3)
    assert reply.choices[0].text == tokenizer.decode(ids) and reply.usage.completion_tokens == 0
    # lm-eval's is_greedy compares each token's logprob to the best in top_logprobs with `==`: the same number
    [(_, is_greedy)] = LocalCompletionsAPI.parse_logprobs(reply.model_dump(), ctxlens=[len(prompt)])
    assert is_greedy


def test_context_errors_in_openai_words(client, server):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": TOO_LONG}])
    assert error.value.code == "context_length_exceeded"
    message = str(error.value)
    assert "maximum context length is 96 tokens" in message and "-" not in message.split("tokens.")[1]
    with pytest.raises(openai.BadRequestError, match=r"you requested \d+ tokens \(\d+ in the messages, 90 in"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=90)
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model="openai/tiny", api_base=server, api_key=KEY, num_retries=0,
                           messages=[{"role": "user", "content": TOO_LONG}])


def test_langchain_chat_openai(server, greedy_reply, tiny_sft_model):
    chat = ChatOpenAI(model="tiny", base_url=server, api_key=KEY, temperature=0, max_tokens=24, max_retries=0)
    assert chat.invoke(QUESTION).content == greedy_reply(tiny_sft_model, QUESTION)[0]
