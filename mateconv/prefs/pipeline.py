"""Stage 7's run: sample prompts, ask the generator for K replies each, judge them, keep best/worst as a pair.

Prompts are worked on by `max_concurrency` workers sharing one limit on requests in flight; one writer task appends
every finished prompt to the result files, so a killed run loses only the prompts in flight and the next run skips
the ids already written.
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from mateconv.prefs.endpoints import (Caller, Endpoint, PrefsError, RequestFailed, RetryPolicy, Usage, cost_usd,
                                      parse_prices, resolve_generator, resolve_judge)
from mateconv.prefs.judge import (RULE_SCORES, JudgeMalformed, choose_pair, judge_messages, parse_judgement,
                                  rule_scores, shuffled_order)
from mateconv.prefs.store import ResultStore, read_records, sample_prompts
from mateconv.procs import ServeError, start_background, stop_background
from mateconv.terminal import PlainProgress

JUDGE_MODES = ("auto", "rule", "model", "both")


@dataclass
class PrefsConfig:
    # data
    prompts_path: str = "out/data/tasks_train.jsonl"
    n_prompts: int = 3000
    seed: int = 42
    output_dir: str = "out/prefs"
    skip_failed: bool = False
    # generator
    generator_base_url: str | None = None
    generator_model: str | None = None
    generator_model_path: str = "out/sft/final"
    k_samples: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None
    # judge
    judge: str = "auto"
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_temperature: float = 0.0
    judge_max_tokens: int | None = None
    judge_retries: int = 2
    judge_json_mode: bool = True
    min_margin: float = 1.0
    # requests
    max_concurrency: int = 8
    max_retries: int = 5
    request_timeout: float = 120.0
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    health_timeout: float = 10.0
    prices: list[str] = field(default_factory=list)
    progress: bool = True

    def validate(self) -> None:
        problems = [
            (self.n_prompts < 1, "--n_prompts must be >= 1"),
            (self.k_samples < 2, "--k_samples must be >= 2 (a pair needs two replies)"),
            (self.judge not in JUDGE_MODES, f"--judge must be one of {', '.join(JUDGE_MODES)}"),
            (not 0 <= self.temperature <= 2 or not 0 <= self.judge_temperature <= 2, "temperatures must be in [0, 2]"),
            (not 0 < self.top_p <= 1, "--top_p must be in (0, 1]"),
            (self.min_margin < 0, "--min_margin must be >= 0"),
            (self.max_concurrency < 1, "--max_concurrency must be >= 1"),
            (self.max_retries < 0 or self.judge_retries < 0, "--max_retries and --judge_retries must be >= 0"),
            (self.request_timeout <= 0 or self.health_timeout <= 0, "timeouts must be > 0"),
            (any(t is not None and t < 1 for t in (self.max_tokens, self.judge_max_tokens)), "max tokens must be >= 1"),
        ]
        for failed, message in problems:
            if failed:
                raise PrefsError(message)

    def settings(self) -> dict:
        """What each output record carries, so pairs made under different settings can be told apart."""
        keys = ("k_samples", "temperature", "top_p", "max_tokens", "judge_temperature", "judge_max_tokens",
                "min_margin", "seed")
        return {key: getattr(self, key) for key in keys}


def stable_seed(*parts) -> int:
    """A 31-bit seed from the parts, the same in every process (unlike hash())."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def judges_for(prompt: dict, mode: str, have_endpoint: bool) -> tuple[bool, bool]:
    """(use the rule judge, use the model judge) for one prompt. auto: a verifiable prompt (one with an "answer")
    gets the rule judge, plus the model judge when a judge endpoint is configured; any other prompt the model
    judge. Raises PrefsError when the mode cannot be honoured for this prompt."""
    verifiable = prompt["source"].get("answer") is not None
    if mode == "auto":
        mode = ("both" if have_endpoint else "rule") if verifiable else "model"
    if mode in ("rule", "both") and not verifiable:
        raise PrefsError(f"prompt {prompt['id']!r} has no 'answer', so --judge {mode} cannot judge it "
                         "(use --judge model or auto, or a tasks file)")
    if mode in ("model", "both") and not have_endpoint:
        raise PrefsError(f"prompt {prompt['id']!r} needs a judge model but no judge endpoint is configured: pass "
                         "--judge_base_url (or 'generator' to reuse the generator), or export OPENAI_API_KEY")
    return mode in ("rule", "both"), mode in ("model", "both")


class Worker:
    """Everything one prompt needs: the callers, the config, and the per-prompt steps."""

    def __init__(self, config: PrefsConfig, generator: Caller, judge: Caller | None):
        self.config, self.generator, self.judge = config, generator, judge

    def _base_record(self, prompt: dict) -> dict:
        return {"id": prompt["id"], "prompt": prompt["prompt"],
                "models": {"generator": self.generator.endpoint.model,
                           "judge": self.judge.endpoint.model if self.judge else None},
                "settings": self.config.settings()}

    async def sample(self, prompt: dict) -> list[dict]:
        """K replies: one request with n=K when the server honours n, else (or for what is missing) K requests."""
        config, caller = self.config, self.generator

        def request(n: int, index: int):
            options = {"n": n} if n > 1 else {}
            if config.max_tokens is not None:
                options["max_tokens"] = config.max_tokens
            return lambda: caller.client.chat.completions.create(
                model=caller.endpoint.model, messages=prompt["prompt"], temperature=config.temperature,
                top_p=config.top_p, seed=stable_seed(config.seed, prompt["id"], index), **options)

        def replies(response) -> list[dict]:
            """Each choice's text and finish reason, and its reasoning where the server splits it off (ours, vLLM's
            and DeepSeek's `reasoning_content`): the judges see the answer, the pair keeps both."""
            return [{"content": choice.message.content or "", "finish_reason": choice.finish_reason,
                     "reasoning": (choice.message.model_extra or {}).get("reasoning_content")}
                    for choice in response.choices]

        samples: list[dict] = []
        k = config.k_samples
        if caller.supports_n is not False:
            try:
                samples = replies(await caller.call(request(k, 0)))[:k]
                caller.supports_n = len(samples) == k
            except RequestFailed as error:
                # Until n is known to work, a 400 may be a server refusing n > 1: then try single requests below.
                if caller.supports_n is not None or "HTTP 400" not in str(error):
                    raise
        results = await asyncio.gather(*(caller.call(request(1, index)) for index in range(len(samples), k)),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
            samples += replies(result)[:1]
        if results and caller.supports_n is None:
            caller.supports_n = False
        return samples

    async def judge_with_model(self, prompt: dict, contents: list[str]) -> tuple[list[float], list[str], list[int]]:
        """Scores and reasons in the candidates' order; a malformed answer is asked again (in a new order) up to
        --judge_retries times, then JudgeMalformed."""
        config, caller = self.config, self.judge
        options = {"response_format": {"type": "json_object"}} if config.judge_json_mode else {}
        if config.judge_max_tokens is not None:
            options["max_tokens"] = config.judge_max_tokens
        error = None
        for attempt in range(config.judge_retries + 1):
            order = shuffled_order(len(contents), stable_seed(config.seed, prompt["id"], "order", attempt))
            messages = judge_messages(prompt["prompt"], contents, order)
            response = await caller.call(lambda: caller.client.chat.completions.create(
                model=caller.endpoint.model, messages=messages, temperature=config.judge_temperature,
                seed=stable_seed(config.seed, prompt["id"], "judge", attempt), **options))
            text = response.choices[0].message.content if response.choices else None
            try:
                scores, reasons = parse_judgement(text, order)
                return scores, reasons, order
            except JudgeMalformed as malformed:
                error = malformed
        raise JudgeMalformed(f"{error} (after {config.judge_retries + 1} answers)")

    async def process(self, prompt: dict, use_rule: bool, use_model: bool) -> tuple[str, dict]:
        """("pair" | "dropped" | "failure", the record to write)."""
        record = self._base_record(prompt)
        try:
            samples = await self.sample(prompt)
        except RequestFailed as error:
            return "failure", {**record, "stage": "generate", "reason": str(error), "samples": None}
        contents = [sample["content"] for sample in samples]
        record.update(samples=contents, finish_reasons=[sample["finish_reason"] for sample in samples])
        rule = model = order = judge_error = None
        reasons = [""] * len(contents)
        if use_rule:
            try:
                rule = rule_scores(prompt["source"], contents)
            except Exception as error:  # the checker rejected the record (unknown kind, bad answer, ...)
                return "failure", {**record, "stage": "rule", "reason": f"{type(error).__name__}: {error}"}
        if use_model:
            try:
                model, reasons, order = await self.judge_with_model(prompt, contents)
            except (RequestFailed, JudgeMalformed) as error:
                if rule is None:
                    return "failure", {**record, "stage": "judge", "reason": str(error)}
                judge_error = str(error)  # both: the known answer still decides; the model's failure is kept
        if rule is not None:
            verdicts = ["matches the known answer" if score == RULE_SCORES[True] else
                        "does not match the known answer" for score in rule]
            reasons = [f"{verdict}; {reason}" if reason else verdict for verdict, reason in zip(verdicts, reasons)]
        scores, verdict = choose_pair(rule, model, contents, self.config.min_margin)
        record.update(scores=scores, judge_scores={"rule": rule, "model": model}, rationale=reasons,
                      judge="model" if rule is None else "rule" if model is None else "both", judge_order=order,
                      judge_error=judge_error, margin=verdict.margin)
        if verdict.dropped:
            return "dropped", {**record, "dropped": verdict.dropped}
        return "pair", {**record, "chosen": pair_side(samples[verdict.chosen]),
                        "rejected": pair_side(samples[verdict.rejected]),
                        "chosen_index": verdict.chosen, "rejected_index": verdict.rejected}


def pair_side(sample: dict) -> list[dict]:
    """A sample as a pair's chosen or rejected reply; its reasoning, if the server split it off, kept as
    `reasoning_content`, which stage 3 writes back as the <think> block the model generated."""
    message = {"role": "assistant", "content": sample["content"]}
    if sample["reasoning"]:
        message["reasoning_content"] = sample["reasoning"]
    return [message]


async def _work(config: PrefsConfig, store: ResultStore, todo: list[tuple[dict, bool, bool]],
                generator: Endpoint, judge: Endpoint | None, local_url: str | None) -> dict:
    policy = RetryPolicy(config.max_retries, config.backoff_base, config.backoff_max, config.request_timeout)
    in_flight = asyncio.Semaphore(config.max_concurrency)
    callers = [Caller(endpoint, policy, in_flight, base_url=local_url if endpoint.local else None)
               for endpoint in ([generator] + ([judge] if judge else []))]
    worker = Worker(config, callers[0], callers[1] if judge else None)
    counts = {"pair": 0, "dropped": 0, "failure": 0, "judge_errors_in_both": 0}
    try:
        for caller in callers:
            await caller.check(config.health_timeout)
        # only now: a run that stops before its first request (an endpoint down) leaves the failures outstanding
        store.retire_failures({prompt["id"] for prompt, _, _ in todo})
        prompts: asyncio.Queue = asyncio.Queue()
        for item in todo:
            prompts.put_nowait(item)
        results: asyncio.Queue = asyncio.Queue()
        bar = tqdm(total=len(todo), desc="prefs", unit="prompt", disable=not config.progress, dynamic_ncols=True)
        plain = PlainProgress("prefs", len(todo), "prompts", enabled=config.progress)
        started = time.monotonic()

        async def work() -> None:
            while not prompts.empty():
                prompt, use_rule, use_model = prompts.get_nowait()
                await results.put(await worker.process(prompt, use_rule, use_model))

        workers: list[asyncio.Task] = []

        async def write() -> None:  # the only writer of the result files
            try:
                while (item := await results.get()) is not None:
                    kind, record = item
                    store.append(kind, record)
                    counts[kind] += 1
                    counts["judge_errors_in_both"] += kind != "failure" and record.get("judge_error") is not None
                    tokens = callers[0].usage.completion_tokens
                    bar.set_postfix(pairs=counts["pair"], dropped=counts["dropped"], failed=counts["failure"],
                                    gen_tok_s=f"{tokens / max(time.monotonic() - started, 1e-9):.0f}")
                    bar.update()
                    plain.update(counts["pair"] + counts["dropped"] + counts["failure"], pairs=counts["pair"],
                                 dropped=counts["dropped"], failed=counts["failure"])
            except BaseException:  # nothing more can be saved (a full disk): stop the requests, each one costs
                for task in workers:
                    task.cancel()
                raise

        writer = asyncio.create_task(write())
        workers += [asyncio.create_task(work()) for _ in range(min(config.max_concurrency, len(todo)))]
        try:
            await asyncio.gather(*workers)
        finally:
            await results.put(None)
            await writer
            bar.close()
    finally:
        for caller in callers:
            await caller.close()
    return {"counts": counts, "usage": {caller.endpoint.role: (caller.endpoint.model, caller.usage)
                                        for caller in callers}}


def _start_local_server(model_path: str, max_concurrency: int) -> tuple[str, object]:
    """Starts mateconv.serve over `model_path`. SIGINT/SIGTERM arriving while it starts are held back until the
    process handle is ours, then the server is stopped and the signal acted on: no server is left orphaned."""
    if not Path(model_path).is_dir():
        raise PrefsError(f"generator model {model_path} not found: train stage 5 first, pass --generator_model_path, "
                         "or use a remote generator (--generator_base_url)")
    held: list[int] = []
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, lambda number, _: held.append(number))
                for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    process = failed = None
    try:
        url, process = start_background(model_path, extra_args=["--max_queued", str(max(16, max_concurrency))])
    except ServeError as error:  # a Ctrl-C or `stop.sh prefs` reaches the whole process group, the server too
        failed = error
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        if process:
            stop_background(process)
        signal.raise_signal(held[0])
    if failed:
        raise PrefsError(f"could not start the local generator server: {failed}")
    return url, process


def _usage_report(usage: dict[str, tuple[str, Usage]], prices: dict) -> dict:
    report, total = {}, 0.0
    for role, (model, counted) in usage.items():
        cost = cost_usd(model, counted, prices)
        report[role] = {"model": model, **asdict(counted), "cost_usd": cost}
        total = None if cost is None or total is None else total + cost
    report["total_cost_usd"] = total
    return report


def _print_report(summary: dict) -> None:
    run = summary["this_run"]
    judge_failed = run["model_judge_failures_decided_by_rule"]
    print(f"prefs: {run['prompts']} prompts -> {run['pairs']} pairs, {run['dropped']} dropped, {run['failures']} "
          f"failed in {summary['elapsed_s']:.0f} s; {summary['output_dir']} now holds {summary['files']['pairs']} "
          f"pairs, {summary['files']['failures_outstanding']} outstanding failures"
          + (f"; the model judge failed on {judge_failed} (the known answers decided, its error is each record's "
             "judge_error)" if judge_failed else ""), file=sys.stderr)
    for role, used in summary["usage"].items():
        if role == "total_cost_usd":
            continue
        cost = "price unknown (--price)" if used["cost_usd"] is None else f"${used['cost_usd']:.4f}"
        print(f"  {role} {used['model']}: {used['requests']} requests ({used['retries']} retried, "
              f"{used['failed']} failed), "
              f"{used['prompt_tokens']:,} prompt + {used['completion_tokens']:,} completion tokens, {cost}",
              file=sys.stderr)
    total = summary["usage"]["total_cost_usd"]
    print(f"  estimated cost: {'unknown' if total is None else f'${total:.4f}'} (USD per 1M tokens table, "
          "--price MODEL=IN,OUT to override)", file=sys.stderr)


def local_max_n() -> int:
    """The most replies one request to the local server may ask for (imported here: the server module loads torch)."""
    from mateconv.serve.schema import MAX_N

    return MAX_N


def run(config: PrefsConfig, env: dict[str, str] | None = None) -> dict:
    """Runs stage 7 with `config` (environment: `env`, default os.environ); returns the summary written to
    summary.json. Raises PrefsError for bad inputs, flags or endpoints."""
    config.validate()
    env = dict(os.environ if env is None else env)
    prices = parse_prices(config.prices)
    generator = resolve_generator(config.generator_base_url, config.generator_model, env)
    if generator.local and config.k_samples > (max_n := local_max_n()):
        raise PrefsError(f"--k_samples {config.k_samples} is more replies per request than the local server gives "
                         f"({max_n})")
    judge = resolve_judge(config.judge_base_url, config.judge_model, env, generator)
    prompts = sample_prompts(config.prompts_path, config.n_prompts, config.seed)
    plan = [(prompt, *judges_for(prompt, config.judge, judge is not None)) for prompt in prompts]
    if judge is not None and not any(use_model for _, _, use_model in plan):
        judge = None  # --judge rule: no judge requests, no health check
    store = ResultStore(config.output_dir)
    done = store.done_ids(config.skip_failed)
    todo = [item for item in plan if item[0]["id"] not in done]
    print(f"prefs: {len(prompts)} prompts from {config.prompts_path}, {len(prompts) - len(todo)} already done, "
          f"{len(todo)} to go; {generator.describe()}; "
          f"{judge.describe() if judge else 'judge: the known answers'}", file=sys.stderr)
    _warn_made_otherwise(store, {prompt["id"] for prompt in prompts} & done,
                         {"models": {"generator": generator.model, "judge": judge.model if judge else None},
                          "settings": config.settings()})
    if todo:
        print(f"prefs: to stop, keeping the finished prompts (the same command resumes): `kill -2 {os.getpid()}` or "
              f"`kill {os.getpid()}`", file=sys.stderr)
    started = time.monotonic()
    process, result = None, {"counts": {"pair": 0, "dropped": 0, "failure": 0, "judge_errors_in_both": 0},
                             "usage": {}}
    try:
        if todo:
            local_url = None
            if generator.local:
                local_url, process = _start_local_server(config.generator_model_path, config.max_concurrency)
            result = asyncio.run(_work(config, store, todo, generator, judge, local_url))
    finally:
        store.close()
        if process is not None:
            stop_background(process)
    store.put_in_order([prompt["id"] for prompt in prompts])
    pair_ids, dropped_ids, failed_ids = store.ids("pair"), store.ids("dropped"), store.ids("failure")
    counts = result["counts"]
    summary = {
        "output_dir": str(store.dir),
        "prompts_path": config.prompts_path, "prompts_selected": len(prompts), "already_done": len(prompts) - len(todo),
        "this_run": {"prompts": len(todo), "pairs": counts["pair"], "dropped": counts["dropped"],
                     "failures": counts["failure"],
                     "model_judge_failures_decided_by_rule": counts["judge_errors_in_both"]},
        "files": {"pairs": len(pair_ids), "dropped": len(dropped_ids), "failures_outstanding": len(failed_ids)},
        "dropped_reasons": _count(read_records(store.paths["dropped"]), "dropped"),
        "failure_stages": _count(read_records(store.paths["failure"]), "stage"),
        "models": {"generator": generator.model, "judge": judge.model if judge else None,
                   "generator_base_url": generator.base_url or "local",
                   "judge_base_url": (judge.base_url or "local") if judge else None},
        "judge_mode": config.judge, "settings": config.settings(),
        "usage": _usage_report(result["usage"], prices),
        "elapsed_s": round(time.monotonic() - started, 3),
    }
    _print_report(summary)
    if todo and counts["failure"] == len(todo):  # no summary.json: a pipeline must not take the stage as done
        first = read_records(store.paths["failure"])[0]
        raise PrefsError(f"all {len(todo)} prompts failed, e.g. at {first['stage']}: {first['reason']} (every one "
                         f"in {store.paths['failure']})")
    store.write_summary(summary)
    return summary


def _warn_made_otherwise(store: ResultStore, skipped: set[str], made: dict) -> None:
    """One line when prompts this run skips as done were made with other models or settings (an output directory of
    another run): they stay in the set as they are."""
    other = [record for kind in ("pair", "dropped") for record in read_records(store.paths[kind])
             if str(record["id"]) in skipped and any(record.get(key) != value for key, value in made.items())]
    if other:
        key = next(key for key, value in made.items() if other[0].get(key) != value)
        print(f"prefs: warning: {len(other)} of the prompts already done in {store.dir} were made with other models "
              f"or settings ({key} {other[0].get(key)}); they are kept, not made again: to make them with these, use "
              "another --output_dir", file=sys.stderr)


def _count(records: list[dict], key: str) -> dict[str, int]:
    counted: dict[str, int] = {}
    for record in records:
        counted[record[key]] = counted.get(record[key], 0) + 1
    return counted
