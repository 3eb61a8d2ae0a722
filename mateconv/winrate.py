"""Pairwise win rates (stage 6): two models' greedy replies to the same held-out prompts, judged by a model at an
OpenAI-compatible endpoint with stage 7's rubric. Identical replies are ties without asking; of the other prompts, each
model's reply is shown first on half (a seeded choice of which), so a judge's preference for a position cancels out.
Equal scores are ties; a request that fails for good or an answer that is not the rubric's JSON counts as failed,
never as a result. Each verdict is handed to a callback as it comes (the evaluation keeps it on disk), and verdicts
given before (`kept`) are reused without asking."""
from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mateconv.prefs.endpoints import Caller, Endpoint, RequestFailed, RetryPolicy
from mateconv.prefs.judge import JudgeMalformed, judge_messages, parse_judgement
from mateconv.prefs.pipeline import stable_seed

MAX_REASONS = 5  # failure reasons kept per comparison


@dataclass
class WinRate:
    model: str
    baseline: str
    judge: str
    wins: int = 0
    losses: int = 0
    ties: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)  # the first few reasons
    first_shown: int = 0  # prompts on which the judge saw the model's reply first (half of those judged)

    @property
    def judged(self) -> int:
        return self.wins + self.losses + self.ties

    @property
    def win_rate(self) -> float:
        """(wins + ties / 2) / judged prompts; NaN when none was judged."""
        return (self.wins + self.ties / 2) / self.judged if self.judged else math.nan

    def as_dict(self) -> dict:
        return {"model": self.model, "baseline": self.baseline, "judge": self.judge, "win_rate": self.win_rate,
                "wins": self.wins, "losses": self.losses, "ties": self.ties, "failed": self.failed,
                "judged": self.judged, "first_shown": self.first_shown, "failures": self.failures}


async def _judge_one(caller: Caller, prompt: list[dict], replies: list[str], order: list[int], seed: int,
                     json_mode: bool) -> str:
    """'win', 'loss' or 'tie' for replies[0] against replies[1]; raises RequestFailed or JudgeMalformed."""
    options = {"response_format": {"type": "json_object"}} if json_mode else {}
    response = await caller.call(lambda: caller.client.chat.completions.create(
        model=caller.endpoint.model, messages=judge_messages(prompt, replies, order), temperature=0.0, seed=seed,
        **options))
    scores, _ = parse_judgement(response.choices[0].message.content if response.choices else None, order)
    return "win" if scores[0] > scores[1] else "loss" if scores[0] < scores[1] else "tie"


def model_shown_first(indices: list[int], seed: int, model: str, baseline: str) -> set[int]:
    """Half of `indices` (a seeded choice; the odd one out by the seed too) on which the model's reply comes first."""
    rng = random.Random(stable_seed(seed, model, baseline, "order"))
    return set(rng.sample(indices, (len(indices) + rng.randrange(2)) // 2))


async def _compare(caller: Caller, result: WinRate, prompts: list[list[dict]], model_replies: list[str],
                   baseline_replies: list[str], seed: int, json_mode: bool, kept: dict[int, str] | None = None,
                   on_verdict: Callable[[int, str], None] | None = None) -> None:
    asked = [index for index in range(len(prompts)) if model_replies[index] != baseline_replies[index]]
    result.ties += len(prompts) - len(asked)
    firsts = model_shown_first(asked, seed, result.model, result.baseline)
    result.first_shown = len(firsts)
    kept = kept or {}

    async def one(index: int) -> str:
        if index in kept:
            return kept[index]
        order = [0, 1] if index in firsts else [1, 0]
        try:
            verdict = await _judge_one(caller, prompts[index], [model_replies[index], baseline_replies[index]],
                                       order, stable_seed(seed, index, "judge"), json_mode)
        except (RequestFailed, JudgeMalformed) as error:
            if len(result.failures) < MAX_REASONS:
                result.failures.append(f"prompt {index}: {error}")
            return "failed"
        if on_verdict:
            on_verdict(index, verdict)
        return verdict

    for outcome in await asyncio.gather(*(one(index) for index in asked)):
        field_name = {"win": "wins", "loss": "losses", "tie": "ties", "failed": "failed"}[outcome]
        setattr(result, field_name, getattr(result, field_name) + 1)


async def _run(endpoint: Endpoint, pair: tuple[str, str], prompts: list[list[dict]], replies: dict[str, list[str]],
               seed: int, policy: RetryPolicy, concurrency: int, json_mode: bool, kept: dict[int, str] | None,
               on_verdict: Callable[[int, str], None] | None) -> WinRate:
    caller = Caller(endpoint, policy, asyncio.Semaphore(concurrency))
    try:
        model, baseline = pair
        result = WinRate(model, baseline, endpoint.model)
        await _compare(caller, result, prompts, replies[model], replies[baseline], seed, json_mode, kept, on_verdict)
        return result
    finally:
        await caller.close()


def win_rate(endpoint: Endpoint, pair: tuple[str, str], prompts: list[list[dict]], replies: dict[str, list[str]],
             seed: int = 0, retries: int = 2, concurrency: int = 8, json_mode: bool = True, timeout_s: float = 120.0,
             kept: dict[int, str] | None = None, on_verdict: Callable[[int, str], None] | None = None) -> WinRate:
    """The WinRate of a (model, baseline) label pair; `replies[label][i]` answers `prompts[i]`. `kept[i]` is a
    verdict ('win', 'loss' or 'tie') given before on prompt i, reused without asking; `on_verdict(i, verdict)` is called
    as each new one comes."""
    policy = RetryPolicy(max_retries=retries, timeout_s=timeout_s)
    return asyncio.run(_run(endpoint, pair, prompts, replies, seed, policy, concurrency, json_mode, kept, on_verdict))


def check_endpoint(endpoint: Endpoint, timeout_s: float = 30.0) -> None:
    """The judge's health check (PrefsError when unreachable, the key is refused or the model is not served)."""
    async def check() -> None:
        caller = Caller(endpoint, RetryPolicy(), asyncio.Semaphore(1))
        try:
            await caller.check(timeout_s)
        finally:
            await caller.close()
    asyncio.run(check())
