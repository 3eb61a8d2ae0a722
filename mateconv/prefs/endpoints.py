"""The generator and judge endpoints: where they are (flags and environment), how they are called (bounded
concurrency, retries with backoff), and what their tokens cost."""
from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import openai

OPENAI_URL = "https://api.openai.com/v1"
LOCAL_MODEL_NAME = "mateconv"  # the name the locally started server serves the SFT model under
NO_KEY = "unused"  # the openai client needs some key; servers without authentication ignore it
RETRYABLE_STATUS = {408, 409, 429}
OUT_OF_CREDIT = "insufficient_quota"  # OpenAI's 429 for an account without credit: waiting does not end it
# USD per million (input, output) tokens; override or extend with --price MODEL=IN,OUT.
PRICES = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    LOCAL_MODEL_NAME: (0.0, 0.0),
}


class PrefsError(RuntimeError):
    """A problem with the inputs, the flags or an endpoint; shown as one line."""


class RequestFailed(Exception):
    """A request that failed for good (not retryable, or out of retries); the reason is shown in failures.jsonl."""


@dataclass
class Endpoint:
    role: str  # "generator" or "judge"
    base_url: str | None  # None: the generator is the local server, started by the run
    model: str
    api_key: str = NO_KEY

    @property
    def local(self) -> bool:
        return self.base_url is None

    def describe(self) -> str:
        return f"{self.role} {self.model} at {self.base_url or 'a local mateconv.serve'}"


def _api_key(role: str, env: Mapping[str, str], base_url: str | None) -> str:
    key = env.get(f"{role.upper()}_API_KEY") or env.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url == OPENAI_URL:
        raise PrefsError(f"the {role} is OpenAI's API but no key is set: export OPENAI_API_KEY "
                         f"(or {role.upper()}_API_KEY)")
    return NO_KEY


def _url(value: str) -> str:
    return OPENAI_URL if value == "openai" else value.rstrip("/")


def resolve_generator(base_url: str | None, model: str | None, env: Mapping[str, str]) -> Endpoint:
    """--generator_base_url URL|openai|local, else $OPENAI_BASE_URL, else OpenAI when --generator_model is given,
    else the local server over --generator_model_path."""
    if base_url == "local" or (base_url is None and not env.get("OPENAI_BASE_URL") and model is None):
        return Endpoint("generator", None, model or LOCAL_MODEL_NAME)
    url = _url(base_url or env.get("OPENAI_BASE_URL") or OPENAI_URL)
    return Endpoint("generator", url, model or "gpt-4o", _api_key("generator", env, url))


def resolve_judge(base_url: str | None, model: str | None, env: Mapping[str, str],
                  generator: Endpoint) -> Endpoint | None:
    """--judge_base_url URL|openai|generator, else $OPENAI_BASE_URL, else OpenAI when --judge_model or a judge key
    ($JUDGE_API_KEY or $OPENAI_API_KEY) is given; otherwise there is no judge endpoint (None)."""
    if base_url == "generator":
        return Endpoint("judge", generator.base_url, model or generator.model, generator.api_key)
    url = base_url or env.get("OPENAI_BASE_URL") or None  # an empty variable is unset, as for the generator
    if url is None and (model is not None or env.get("JUDGE_API_KEY") or env.get("OPENAI_API_KEY")):
        url = OPENAI_URL
    if url is None:
        return None
    url = _url(url)
    return Endpoint("judge", url, model or "gpt-4o-mini", _api_key("judge", env, url))


def health_problem(endpoint: Endpoint, timeout_s: float) -> str | None:
    """Why `endpoint` fails its health check (`Caller.check`) now, or None."""
    async def probe() -> None:
        caller = Caller(endpoint, RetryPolicy(timeout_s=timeout_s), asyncio.Semaphore(1))
        try:
            await caller.check(timeout_s)
        finally:
            await caller.close()

    try:
        asyncio.run(probe())
    except PrefsError as error:
        return str(error)
    return None


# ---------------------------------------------------------------- token usage and cost

@dataclass
class Usage:
    requests: int = 0  # every request sent: answered, retried or failed
    retries: int = 0
    failed: int = 0  # calls given up on (not retryable, or out of retries)
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, response: Any) -> None:
        if response.usage is not None:  # some servers leave it out
            self.prompt_tokens += response.usage.prompt_tokens or 0
            self.completion_tokens += response.usage.completion_tokens or 0


def parse_prices(overrides: list[str]) -> dict[str, tuple[float, float]]:
    """The price table with each `MODEL=IN,OUT` (USD per million tokens) applied."""
    prices = dict(PRICES)
    for item in overrides:
        name, _, values = item.partition("=")
        try:
            price_in, price_out = (float(v) for v in values.split(","))
        except ValueError:
            raise PrefsError(f"--price {item!r}: expected MODEL=IN,OUT in USD per million tokens, "
                             "e.g. gpt-4o=2.5,10") from None
        prices[name.strip()] = (price_in, price_out)
    return prices


def cost_usd(model: str, usage: Usage, prices: Mapping[str, tuple[float, float]]) -> float | None:
    """Estimated cost, or None for a model missing from the price table."""
    if model not in prices:
        return None
    price_in, price_out = prices[model]
    return (usage.prompt_tokens * price_in + usage.completion_tokens * price_out) / 1e6


# ---------------------------------------------------------------- calling

@dataclass
class RetryPolicy:
    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 120.0

    def delay(self, attempt: int, retry_after_s: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff; a server's Retry-After is honoured (capped at backoff_max_s)."""
        if retry_after_s is not None:
            return min(retry_after_s, self.backoff_max_s)
        return rng.uniform(0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))


def retry_after_s(response) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), None when absent or unreadable."""
    headers = response.headers if response is not None else {}
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        value = headers.get("retry-after")
        if value is None:
            return None
        if value.strip().replace(".", "", 1).isdigit():
            return float(value)
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError):
        return None


def _error_text(error: openai.APIStatusError) -> str:
    message = error.body.get("message") if isinstance(error.body, dict) else None  # the client unwraps {"error": ..}
    return f"HTTP {error.status_code}: {message or error.message}"[:300]


def not_a_completion(response: Any) -> str | None:
    """Why an answer is not a chat completion (a proxy's web page at status 200, JSON of another shape), or None:
    the client hands such an answer on as text or as an object without its fields."""
    choices = getattr(response, "choices", None)
    if isinstance(choices, list) and all(getattr(choice, "message", None) is not None for choice in choices):
        return None
    return f"the answer is not a chat completion: {str(response)[:200]!r}"


@dataclass
class Caller:
    """One endpoint's client, sharing the run's limit on requests in flight; counts tokens and retries."""

    endpoint: Endpoint
    policy: RetryPolicy
    in_flight: asyncio.Semaphore
    usage: Usage = field(default_factory=Usage)
    rng: random.Random = field(default_factory=random.Random)
    base_url: str | None = None  # where the local server ended up, for local endpoints
    supports_n: bool | None = None  # learnt from the first sampling request

    def __post_init__(self):
        self.client = openai.AsyncOpenAI(base_url=self.base_url or self.endpoint.base_url,
                                         api_key=self.endpoint.api_key, max_retries=0, timeout=self.policy.timeout_s)

    async def call(self, request: Callable[[], Awaitable[Any]]) -> Any:
        """Runs `request()` (one API call), retrying timeouts, dropped connections, 408/409/429 and 5xx."""
        for attempt in range(self.policy.max_retries + 1):
            self.usage.requests += 1
            try:
                async with self.in_flight:
                    response = await request()
                if (problem := not_a_completion(response)) is not None:
                    self.usage.failed += 1
                    raise RequestFailed(problem)
                self.usage.add(response)
                return response
            except json.JSONDecodeError as error:  # status 200 and a JSON content type, the body cut short say
                self.usage.failed += 1
                raise RequestFailed(f"the answer's body is not valid JSON ({error.msg})") from None
            except openai.APIConnectionError as error:  # includes APITimeoutError
                reason, wait_hint = f"{type(error).__name__}: {error}", None
            except openai.APIStatusError as error:
                if (error.status_code not in RETRYABLE_STATUS and error.status_code < 500
                        or OUT_OF_CREDIT in (error.code, error.type)):
                    self.usage.failed += 1
                    raise RequestFailed(_error_text(error)) from None
                reason, wait_hint = _error_text(error), retry_after_s(error.response)
            if attempt == self.policy.max_retries:
                self.usage.failed += 1
                raise RequestFailed(f"gave up after {attempt + 1} attempts: {reason}")
            self.usage.retries += 1
            await asyncio.sleep(self.policy.delay(attempt, wait_hint, self.rng))

    async def check(self, timeout_s: float) -> None:
        """A quick health check (GET /models): unreachable, refused key or unknown model -> PrefsError."""
        where = self.base_url or self.endpoint.base_url
        try:
            # as plain data: the client's model list takes a web page or JSON of another shape for one, then breaks
            listing = await self.client.get("/models", cast_to=object, options={"timeout": timeout_s})
        except json.JSONDecodeError as error:
            raise PrefsError(f"{self.endpoint.role} endpoint {where} answered GET /models with a body that is not "
                             f"valid JSON ({error.msg})") from None
        except openai.APIConnectionError as error:
            raise PrefsError(f"{self.endpoint.role} endpoint {where} is unreachable: {type(error).__name__}: "
                             f"{error}") from None
        except openai.AuthenticationError:
            raise PrefsError(f"{self.endpoint.role} endpoint {where} rejected the API key (HTTP 401)") from None
        except openai.APIStatusError as error:
            if error.status_code == 404:  # no /models route: reachable, cannot check the name
                if not where.endswith("/v1") and await self._answers_models(f"{where}/v1/models", timeout_s):
                    raise PrefsError(f"{self.endpoint.role} endpoint {where} has no /models route, but {where}/v1 "
                                     f"has: use {where}/v1 as the base URL") from None
                return
            raise PrefsError(f"{self.endpoint.role} endpoint {where} failed its health check: "
                             f"{_error_text(error)}") from None
        if isinstance(listing, str):  # not JSON, a web page say: the client hands on the text
            raise PrefsError(f"{self.endpoint.role} endpoint {where} answered GET /models with no JSON: not the "
                             "base URL of an OpenAI-compatible API (which usually ends in /v1)")
        cards = listing.get("data") if isinstance(listing, dict) else None
        if not isinstance(cards, list):  # JSON of another shape: the model name cannot be checked, as with a 404
            return
        served = [card.get("id") for card in cards if isinstance(card, dict)]
        # a name the list leaves out may still be served (mateconv.serve's alias 'mateconv'): its own card says so
        if (served and self.endpoint.model not in served
                and not await self._answers_models(f"{where}/models/{self.endpoint.model}", timeout_s, card=True)):
            raise PrefsError(f"{self.endpoint.role} model '{self.endpoint.model}' is not served at {where}; it "
                             f"serves: {', '.join(served[:10])}{' ...' if len(served) > 10 else ''}")

    async def _answers_models(self, url: str, timeout_s: float, card: bool = False) -> bool:
        """Whether `url` answers with a model list (the base URL was given without its /v1), or with `card` a
        model's card."""
        try:
            answer = await self.client.get(url, cast_to=object, options={"timeout": timeout_s})
        except (openai.APIError, json.JSONDecodeError):
            return False
        return isinstance(answer, dict) and (isinstance(answer.get("id"), str) if card else
                                             isinstance(answer.get("data"), list))

    async def close(self) -> None:
        await self.client.close()
