"""Stage 7 against a loopback OpenAI-compatible server that injects faults on a deterministic schedule (429 with
Retry-After, 500, 400, answers slower than the client's timeout, dropped connections, malformed judge JSON), driven
by the real `openai` client: every prompt ends as exactly one pair, dropped prompt or recorded failure; re-runs
skip what is done and retry failures; a run killed with SIGKILL and resumed equals an uninterrupted one."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mateconv.data.formats import to_preference
from mateconv.prefs import PrefsConfig, run
from mateconv.prefs.endpoints import PrefsError
from mateconv.prefs.cli import main
from prefs_fake_server import FakeOpenAI, tasks

ROOT = Path(__file__).resolve().parents[1]
FILES = {"pair": "dpo_pairs.jsonl", "dropped": "dropped.jsonl", "failure": "failures.jsonl"}


def write_tasks(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in tasks(n)))
    return path


def records(out: Path, kind: str) -> list[dict]:
    path = out / FILES[kind]
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def ids(out: Path, kind: str) -> list[str]:
    return [record["id"] for record in records(out, kind)]


def config(fake: FakeOpenAI, prompts: Path, out: Path, n: int, **overrides) -> PrefsConfig:
    settings = dict(prompts_path=str(prompts), n_prompts=n, output_dir=str(out), generator_base_url=fake.url,
                    generator_model="gen", judge_base_url=fake.url, judge_model="judge", judge="model",
                    max_concurrency=4, max_retries=3, request_timeout=0.5, backoff_base=0.01, backoff_max=0.1,
                    progress=False)
    return PrefsConfig(**{**settings, **overrides})


@pytest.fixture
def fake_factory():
    servers = []

    def make(**kwargs) -> FakeOpenAI:
        servers.append(FakeOpenAI(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


SCHEDULE = {
    ("gen", "p00"): ["429", "500"],            # recovers on the 3rd attempt
    ("gen", "p01"): ["drop"],                  # dropped connection, then fine
    ("gen", "p02"): ["slow"],                  # beyond the 0.5 s client timeout, then fine
    ("judge", "p03"): ["malformed"],           # judge asked again, fine the 2nd time
    ("judge", "p04"): ["malformed", "badids", "malformed"],  # 3 bad answers (judge_retries=2): failure
    ("gen", "p05"): ["500"] * 4,               # out of retries (max_retries=3): failure
    ("judge", "p06"): ["tie"],                 # all equal: dropped
    ("judge", "p07"): ["429", "fenced"],       # JSON inside a ```json fence is accepted
    ("gen", "p08"): ["400"],                   # not retryable: failure after one request
    ("judge", "p09"): ["slow", "drop"],        # judge timeout and dropped connection, then fine
    ("judge", "p10"): ["400"],                 # a judge request refused for good: failure, counted in usage
}


def test_faults_end_in_pairs_or_recorded_failures_and_reruns(tmp_path, fake_factory):
    fake = fake_factory(schedule=SCHEDULE)
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 12), tmp_path / "prefs"
    summary = run(config(fake, prompts, out, 12), env={})

    pairs, dropped, failures = ids(out, "pair"), ids(out, "dropped"), ids(out, "failure")
    assert pairs == ["p00", "p01", "p02", "p03", "p07", "p09", "p11"]  # in the prompts' order, not finishing order
    assert dropped == ["p06"] and sorted(failures) == ["p04", "p05", "p08", "p10"]
    assert len(pairs + dropped + failures) == len(set(pairs + dropped + failures)) == 12  # each id written once
    reasons = {r["id"]: (r["stage"], r["reason"]) for r in records(out, "failure")}
    assert reasons["p05"] == ("generate", "gave up after 4 attempts: HTTP 500: injected 500")
    assert reasons["p08"] == ("generate", "HTTP 400: injected 400")
    assert reasons["p04"][0] == "judge" and "(after 3 answers)" in reasons["p04"][1]
    assert records(out, "failure")[0]["settings"]["k_samples"] == 4
    attempts = {key: fake.requests_for(*key) for key in [("gen", "p00"), ("gen", "p05"), ("gen", "p08"),
                                                        ("judge", "p04"), ("judge", "p09")]}
    assert attempts == {("gen", "p00"): 3, ("gen", "p05"): 4, ("gen", "p08"): 1, ("judge", "p04"): 3,
                        ("judge", "p09"): 3}

    for record in records(out, "pair"):  # the judge's scores, given in shuffled order, land on the right replies
        truth = int(next(t for t in tasks(12) if t["id"] == record["id"])["answer"])
        assert record["samples"] == [f"The answer is {truth + i}." for i in range(4)]
        assert record["scores"] == [9.0, 7.0, 5.0, 3.0] and record["margin"] == 6.0
        assert record["chosen"] == [{"role": "assistant", "content": f"The answer is {truth}."}]
        assert record["rejected"] == [{"role": "assistant", "content": f"The answer is {truth + 3}."}]
        assert record["prompt"] == [{"role": "user", "content": f"[{record['id']}] What is "
                                     f"{int(record['id'][1:]) % 7 + 1}+{int(record['id'][1:]) % 5 + 2}?"}]
        assert record["models"] == {"generator": "gen", "judge": "judge"} and record["judge"] == "model"
    p00 = [entry["t"] for entry in fake.log if (entry["model"], entry["pid"]) == ("gen", "p00")]
    assert p00[1] - p00[0] >= 0.05  # Retry-After: 0.05 honoured (the jittered backoff alone is <= 0.01 s)
    assert fake.peak_in_flight <= 4  # --max_concurrency
    shown = [entry["shown"] for entry in fake.log if entry["shown"]]
    assert len({tuple(order) for order in shown}) > 3  # candidate order varies between judge requests
    assert summary["this_run"] == {"prompts": 12, "pairs": 7, "dropped": 1, "failures": 4,
                                   "model_judge_failures_decided_by_rule": 0}
    for role, model in [("generator", "gen"), ("judge", "judge")]:  # every request the server saw is counted
        assert summary["usage"][role]["requests"] == sum(entry["model"] == model for entry in fake.log)
    assert summary["usage"]["generator"]["failed"] == 2 and summary["usage"]["judge"]["failed"] == 1  # p05, p08; p10
    assert summary["usage"]["generator"]["retries"] >= 7 and json.loads((out / "summary.json").read_text()) == summary

    # --skip_failed: nothing left to do, not one request
    requests_before = len(fake.log)
    summary = run(config(fake, prompts, out, 12, skip_failed=True), env={})
    assert len(fake.log) == requests_before and summary["this_run"]["prompts"] == 0

    # a plain re-run retries only the failures (their schedules are used up now, so they succeed)
    summary = run(config(fake, prompts, out, 12), env={})
    assert summary["this_run"] == {"prompts": 4, "pairs": 4, "dropped": 0, "failures": 0,
                                   "model_judge_failures_decided_by_rule": 0}
    assert {entry["pid"] for entry in fake.log[requests_before:]} == {"p04", "p05", "p08", "p10"}
    assert ids(out, "pair") == sorted(pairs + ["p04", "p05", "p08", "p10"]) and ids(out, "failure") == []
    history = [json.loads(line)["id"] for line in (out / "failures_history.jsonl").read_text().splitlines()]
    assert sorted(history) == ["p04", "p05", "p08", "p10"]


def test_raising_n_prompts_extends_the_earlier_sample(tmp_path, fake_factory, capsys):
    fake = fake_factory()
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 40), tmp_path / "prefs"
    run(config(fake, prompts, out, 6), env={})
    trial, trial_requests = ids(out, "pair"), len(fake.log)
    summary = run(config(fake, prompts, out, 14), env={})
    assert f"prefs: 14 prompts from {prompts}, 6 already done, 8 to go;" in capsys.readouterr().err
    assert len(trial) == 6 and set(trial) < set(ids(out, "pair")) and len(records(out, "pair")) == 14
    assert not {entry["pid"] for entry in fake.log[trial_requests:]} & set(trial)  # the trial's work is reused
    assert summary["this_run"]["prompts"] == 8 and summary["files"]["pairs"] == 14


def test_prompts_done_with_other_models_or_settings_are_named_when_skipped(tmp_path, fake_factory, capsys):
    """An output directory of another run (here judged by the rule alone) is kept and its prompts are skipped; that
    was silent, so pairs of another judge or generator went on into the set as if made by this run's."""
    fake = fake_factory()
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 4), tmp_path / "prefs"
    run(config(fake, prompts, out, 2, judge="rule"), env={})
    run(config(fake, prompts, out, 2, judge="rule"), env={})
    assert "other models or settings" not in capsys.readouterr().err
    run(config(fake, prompts, out, 4, judge="auto"), env={})
    assert (f"prefs: warning: 2 of the prompts already done in {out} were made with other models or settings (models "
            "{'generator': 'gen', 'judge': None}); they are kept, not made again: to make them with these, use "
            "another --output_dir\n") in capsys.readouterr().err


def test_both_judges_model_orders_replies_that_are_all_right(tmp_path, fake_factory):
    """--judge auto with a judge endpoint is both; where every reply is right the model judge's scores make the pair,
    with its own margin (3 here, over --min_margin 1), and the rule still decides where it tells replies apart."""
    fake = fake_factory(permanent={("gen", "p01"): "allright"})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 2), tmp_path / "prefs"
    run(config(fake, prompts, out, 2, judge="auto"), env={})
    assert ids(out, "dropped") == [] and ids(out, "pair") == ["p00", "p01"]
    mixed, all_right = records(out, "pair")
    assert all_right["judge_scores"] == {"rule": [10.0] * 4, "model": [6.0, 7.0, 8.0, 9.0]}
    assert (all_right["judge"], all_right["chosen_index"], all_right["rejected_index"], all_right["margin"]) == \
        ("both", 3, 0, 3.0)
    assert all_right["chosen"] == [{"role": "assistant", "content": "The answer is 5."}]  # p01 asks 2+3
    assert mixed["judge_scores"] == {"rule": [10.0, 1.0, 1.0, 1.0], "model": [9.0, 7.0, 5.0, 3.0]}
    assert (mixed["chosen_index"], mixed["rejected_index"], mixed["margin"]) == (0, 3, pytest.approx(9.6))


def test_a_model_judge_failing_under_both_is_named_in_the_report(tmp_path, fake_factory, capsys):
    """The known answers still make the pairs, and the report says the model judge failed: it said nothing, so a
    judge answering garbage on every prompt looked like a working one."""
    fake = fake_factory(permanent={("judge", "p00"): "malformed", ("judge", "p01"): "malformed"})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 3), tmp_path / "prefs"
    summary = run(config(fake, prompts, out, 3, judge="both"), env={})
    assert summary["this_run"]["model_judge_failures_decided_by_rule"] == 2 and len(ids(out, "pair")) == 3
    assert "; the model judge failed on 2 (the known answers decided, its error is each record's judge_error)\n" in \
        capsys.readouterr().err


def test_reasoning_the_server_split_off_stays_in_the_pairs(tmp_path, fake_factory):
    """A generator reply's `reasoning_content` (our server's <think> block) is kept on the pair's replies, so stage 3
    trains DPO on the text the model wrote; the judges and the samples see the answers."""
    fake = fake_factory(permanent={("gen", "p00"): "thinks"})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 1), tmp_path / "prefs"
    run(config(fake, prompts, out, 1), env={})
    [pair] = records(out, "pair")  # p00 asks 1+2
    assert pair["chosen"] == [{"role": "assistant", "content": "The answer is 3.",
                               "reasoning_content": "1 and 2 make 3."}]
    assert pair["samples"][pair["chosen_index"]] == "The answer is 3."
    assert to_preference(pair)["chosen"][0]["content"] == "<think>\n1 and 2 make 3.\n</think>\n\nThe answer is 3."


def test_server_ignoring_n_gets_k_requests(tmp_path, fake_factory):
    fake = fake_factory(honour_n=False)
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 3), tmp_path / "prefs"
    run(config(fake, prompts, out, 3, k_samples=3, max_concurrency=1), env={})
    generator_requests = [entry for entry in fake.log if entry["model"] == "gen"]
    # the first prompt asks for n=3, gets 1 choice and asks twice more; later prompts ask 3 times without n
    assert [entry["n"] for entry in generator_requests] == [3, 1, 1] + [1] * 6
    assert len(records(out, "pair")) == 3
    assert all(len(set(record["samples"])) == 3 for record in records(out, "pair"))


def test_unreachable_endpoint_and_unknown_model_are_one_line_errors(tmp_path, fake_factory):
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 5), tmp_path / "prefs"
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    started = time.monotonic()
    with pytest.raises(SystemExit) as error:
        main(["--prompts_path", str(prompts), "--output_dir", str(out), "--generator_base_url", dead,
              "--generator_model", "gen", "--judge", "rule", "--no_progress"])
    message = str(error.value)
    assert message.startswith(f"prefs: generator endpoint {dead} is unreachable") and "\n" not in message
    assert time.monotonic() - started < 15 and ids(out, "failure") == []

    fake = fake_factory()
    with pytest.raises(SystemExit, match=r"^prefs: judge model 'gpt-9' is not served at .*; it serves: gen, judge$"):
        main(["--prompts_path", str(prompts), "--output_dir", str(out), "--generator_base_url", fake.url,
              "--generator_model", "gen", "--judge_base_url", fake.url, "--judge_model", "gpt-9", "--no_progress"])
    root = fake.url.removesuffix("/v1")  # a base URL without its /v1: every request would be a 404
    with pytest.raises(SystemExit, match=f"^prefs: generator endpoint {root} has no /models route, but {root}/v1 "
                                         f"has: use {root}/v1 as the base URL$"):
        main(["--prompts_path", str(prompts), "--output_dir", str(out), "--generator_base_url", root,
              "--generator_model", "gen", "--judge", "rule", "--no_progress"])
    with pytest.raises(SystemExit, match="^prefs: prompts file .*missing.jsonl not found"):
        main(["--prompts_path", str(tmp_path / "missing.jsonl"), "--generator_base_url", fake.url])
    (tmp_path / "a_file").write_text("")
    for output_dir, why in ((tmp_path / "a_file", "create the directory"), (Path("/proc"), "write in the directory")):
        with pytest.raises(SystemExit, match=f"^prefs: --output_dir: cannot {why} {output_dir} \\("):
            main(["--prompts_path", str(prompts), "--output_dir", str(output_dir), "--generator_base_url", fake.url,
                  "--generator_model", "gen", "--judge", "rule", "--no_progress"])
    assert fake.log == []


def test_sigkill_mid_run_then_resume_equals_uninterrupted_run(tmp_path, fake_factory):
    # Outcomes depend on the prompt only (not on attempt counts), so two runs must agree record for record.
    fake = fake_factory(permanent={("gen", "p03"): "400", ("judge", "p05"): "tie", ("judge", "p11"): "malformed"},
                        delay_s=0.05)
    prompts = write_tasks(tmp_path / "tasks.jsonl", 30)
    baseline, resumed = tmp_path / "baseline", tmp_path / "resumed"
    run(config(fake, prompts, baseline, 30, k_samples=2, max_concurrency=2), env={})
    assert fake.peak_in_flight == 2  # the limit is used, and never exceeded

    flags = ["--prompts_path", str(prompts), "--n_prompts", "30", "--output_dir", str(resumed),
             "--generator_base_url", fake.url, "--generator_model", "gen", "--judge_base_url", fake.url,
             "--judge_model", "judge", "--judge", "model", "--k_samples", "2", "--max_concurrency", "2",
             "--request_timeout", "5", "--backoff_base", "0.01", "--no_progress"]
    child = subprocess.Popen([sys.executable, str(ROOT / "7.gen_prefs_openai.py"), *flags], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while len(ids(resumed, "pair")) < 6 and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()
    finished_before_kill = set(ids(resumed, "pair") + ids(resumed, "dropped"))
    assert 6 <= len(finished_before_kill) < 30
    with (resumed / FILES["pair"]).open("a") as torn:  # what a kill in the middle of a write would leave
        torn.write('{"id": "p29", "prompt": [{"role"')

    log_before = len(fake.log)
    run(config(fake, prompts, resumed, 30, k_samples=2, max_concurrency=2, request_timeout=5), env={})
    assert not {entry["pid"] for entry in fake.log[log_before:]} & finished_before_kill  # done ids are skipped
    for kind in FILES:
        got, want = ids(resumed, kind), ids(baseline, kind)
        assert len(got) == len(set(got)) and sorted(got) == sorted(want), kind
        if kind != "failure":  # the same files, line for line, though half were written before the kill
            assert got == want, kind
        by_id = {record["id"]: record for record in records(resumed, kind)}
        for record in records(baseline, kind):
            if kind != "failure":
                assert by_id[record["id"]] == record
    assert sorted(ids(baseline, "failure")) == ["p03", "p11"] and ids(baseline, "dropped") == ["p05"]


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE  # nobody may reap a job its shell left behind
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM])
def test_kill_2_stops_a_background_job_of_a_script_and_the_same_command_resumes(tmp_path, fake_factory, sent):
    """A shell without job control (here `bash -c`) starts background jobs with SIGINT ignored; stage 7 sets its own
    handler, so `kill -2` stops it with the finished prompts kept, and the same command does the rest. `kill` says
    so in the same line (it ended the run without a word)."""
    fake = fake_factory(delay_s=0.3)
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 20), tmp_path / "prefs"
    (tmp_path / "logs").mkdir()
    command = (f"nohup {sys.executable} {ROOT / '7.gen_prefs_openai.py'} --prompts_path {prompts} --n_prompts 20 "
               f"--output_dir {out} --generator_base_url {fake.url} --generator_model gen --judge rule --k_samples 2 "
               "--max_concurrency 2 --no_progress")
    subprocess.run(["bash", "-c", f"{command} > logs/gen_prefs.log 2>&1 & echo $! > gen_prefs.pid"], cwd=tmp_path,
                   check=True)
    pid = int((tmp_path / "gen_prefs.pid").read_text())
    deadline = time.monotonic() + 60
    while len(ids(out, "pair")) < 2 and time.monotonic() < deadline and running(pid):
        time.sleep(0.02)
    os.kill(pid, sent)
    killed = time.monotonic()
    while running(pid) and time.monotonic() < killed + 30:
        time.sleep(0.05)
    log = (tmp_path / "logs" / "gen_prefs.log").read_text()
    kept = records(out, "pair")  # each line parses: nothing torn
    assert not running(pid) and 2 <= len(kept) < 20, log
    assert f"`kill -2 {pid}` or `kill {pid}`" in log
    assert log.splitlines()[-1] == "prefs: interrupted; finished prompts are saved, run again to resume"
    assert len({record["id"] for record in kept}) == len(kept) and ids(out, "failure") == []

    resumed = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{len(kept)} already done, {20 - len(kept)} to go" in resumed.stderr
    assert len(ids(out, "pair")) == 20 and all(record in records(out, "pair") for record in kept)


SIGTERM_IN_A_LOOP = """
import asyncio, gc, os, signal, warnings
from mateconv.terminal import signals_interrupt

saw = []

async def main():
    started_later = asyncio.sleep(0)  # a coroutine made and not yet awaited, as gather(...) makes them
    os.kill(os.getpid(), signal.SIGTERM)
    try:
        await started_later
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        saw.append("cancelled")
        raise

warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    try:
        with signals_interrupt():
            asyncio.run(main())
    except KeyboardInterrupt:
        saw.append("KeyboardInterrupt")
    gc.collect()
print(saw, [str(warning.message) for warning in caught])
"""


def test_kill_inside_an_event_loop_cancels_its_main_task_as_ctrl_c_does():
    """`kill` (SIGTERM) during stage 7's requests stops its event loop as Ctrl-C does: the main task is cancelled at
    its next await and asyncio.run raises KeyboardInterrupt. Before, the handler raised KeyboardInterrupt wherever the
    loop was, once between making a request's coroutine and awaiting it, and the run's last line was Python's
    'coroutine ... was never awaited' warning instead of 'prefs: interrupted'."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_A_LOOP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['cancelled', 'KeyboardInterrupt'] []", done.stdout + done.stderr


def test_progress_off_a_terminal_is_plain_lines(tmp_path, fake_factory, capsys):
    """Under nohup (pytest's captured stdout is not a terminal either) stage 7 prints a plain line at each tenth of
    its prompts, with the pairs, dropped prompts and failures so far, the rate and the ETA."""
    fake = fake_factory(permanent={("judge", "p03"): "tie"})
    prompts = write_tasks(tmp_path / "tasks.jsonl", 20)
    run(config(fake, prompts, tmp_path / "prefs", 20, k_samples=2, progress=True), env={})
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[prefs] ")]
    assert [line.split(" prompts ")[0] for line in lines] == [f"[prefs] {done}/20" for done in range(2, 21, 2)]
    assert lines[-1].startswith("[prefs] 20/20 prompts (100%) pairs 19 dropped 1 failed 0 ")
    assert lines[-1].endswith(" eta 0:00:00") and " prompts/s elapsed " in lines[-1]


def test_a_run_where_every_prompt_fails_is_an_error_and_not_done(tmp_path, fake_factory):
    """Every generator request refused (as a server refuses an n it cannot give): one line naming the first reason
    and exit 1, and no summary.json, which a pipeline takes as the stage's completion (before: exit 0 with 0 pairs).
    Fixed, the same command does the prompts. Where the generator is the local server, a --k_samples above what it
    gives per request is refused before it starts."""
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 3), tmp_path / "prefs"
    refusing = fake_factory(permanent={("gen", f"p{i:02d}"): "400" for i in range(3)})
    with pytest.raises(PrefsError, match=r"^all 3 prompts failed, e.g. at generate: HTTP 400: injected 400 \(every "
                                         r"one in .*failures.jsonl\)$"):
        run(config(refusing, prompts, out, 3, judge="rule"), env={})
    assert not (out / "summary.json").exists() and len(ids(out, "failure")) == 3
    summary = run(config(fake_factory(), prompts, out, 3, judge="rule"), env={})
    assert summary["this_run"]["prompts"] == 3 and (out / "summary.json").is_file()
    with pytest.raises(SystemExit, match=r"^prefs: --k_samples 32 is more replies per request than the local server "
                                         r"gives \(16\)$"):
        main(["--prompts_path", str(prompts), "--output_dir", str(tmp_path / "local"), "--k_samples", "32",
              "--judge", "rule", "--no_progress"])


def test_answers_that_are_no_chat_completion_fail_their_prompt_and_a_web_page_at_models_stops_the_run(
        tmp_path, fake_factory):
    """A web page (a proxy's, at status 200) or JSON of another shape where a chat completion belongs: that prompt is
    a recorded failure saying so and the others go on (the client's AttributeError/TypeError stopped the run with a
    traceback). A web page at GET /models (a base URL that is not the API's) stops the run at once, in one line."""
    fake = fake_factory(schedule={("gen", "p00"): ["webpage"], ("judge", "p01"): ["shapeless"]})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 3), tmp_path / "prefs"
    run(config(fake, prompts, out, 3), env={})
    failures = {record["id"]: record for record in records(out, "failure")}
    assert ids(out, "pair") == ["p02"] and sorted(failures) == ["p00", "p01"]
    assert failures["p00"]["stage"] == "generate" and failures["p01"]["stage"] == "judge"
    assert failures["p00"]["reason"] == "the answer is not a chat completion: '<html><body>Bad gateway</body></html>'"
    assert failures["p01"]["reason"].startswith("the answer is not a chat completion: ")

    web = fake_factory(web_page_models=True)
    with pytest.raises(SystemExit) as error:
        main(["--prompts_path", str(prompts), "--output_dir", str(tmp_path / "web"), "--generator_base_url",
              web.url, "--generator_model", "gen", "--judge", "rule", "--no_progress"])
    assert str(error.value) == (f"prefs: generator endpoint {web.url} answered GET /models with no JSON: not the base "
                                "URL of an OpenAI-compatible API (which usually ends in /v1)")


def test_a_run_that_never_reaches_its_endpoint_keeps_the_outstanding_failures(tmp_path, fake_factory):
    """A re-run whose endpoint is down stops at its health check; the failures of the run before stay outstanding
    (they were moved to the history before the check, so a later --skip_failed run retried them)."""
    import socket

    fake = fake_factory(permanent={("gen", "p00"): "400"})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 3), tmp_path / "prefs"
    run(config(fake, prompts, out, 3, judge="rule"), env={})
    assert ids(out, "failure") == ["p00"]
    asked = fake.requests_for("gen", "p00")
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    with pytest.raises(PrefsError, match="is unreachable"):
        run(config(fake, prompts, out, 3, judge="rule", generator_base_url=dead), env={})
    assert ids(out, "failure") == ["p00"] and not (out / "failures_history.jsonl").exists()
    run(config(fake, prompts, out, 3, judge="rule", skip_failed=True), env={})
    assert fake.requests_for("gen", "p00") == asked and ids(out, "failure") == ["p00"]


def test_a_429_for_an_account_out_of_credit_is_not_retried(tmp_path, fake_factory):
    """OpenAI answers 429 `insufficient_quota` to an account without credit: retrying cannot help, and with the
    default retries and backoff each prompt waited some 15 s for nothing (3000 prompts, 8 at a time: an hour and a
    half before the run failed). Each prompt now fails at its first request; a plain 429 is still retried."""
    fake = fake_factory(permanent={("gen", "p00"): "quota"}, schedule={("gen", "p01"): ["429"]})
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 2), tmp_path / "prefs"
    run(config(fake, prompts, out, 2, judge="rule", k_samples=2, max_concurrency=1), env={})
    assert [record["reason"] for record in records(out, "failure")] == ["HTTP 429: You exceeded your current quota"]
    assert ids(out, "pair") + ids(out, "dropped") == ["p01"] and fake.requests_for("gen", "p01") == 2
    assert fake.requests_for("gen", "p00") == 1


def test_a_full_disk_stops_the_requests_and_is_one_line(tmp_path, fake_factory, monkeypatch):
    """The disk fills after 3 records: the run stops asking (the requests in flight aside) and says so in one line.
    Before, the writer task died with an OSError while the workers went on generating and judging every prompt,
    paid for and never saved, and the run ended in a traceback."""
    import errno
    import types

    from mateconv.prefs import store as store_module

    written = []

    def write(descriptor, data):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(data)
        return os.write(descriptor, data)

    monkeypatch.setattr(store_module, "os", types.SimpleNamespace(**{**vars(os), "write": write}))
    fake = fake_factory()
    prompts, out = write_tasks(tmp_path / "tasks.jsonl", 40), tmp_path / "prefs"
    with pytest.raises(PrefsError, match=rf"^could not write {out / 'dpo_pairs.jsonl'}: No space left on device; the "
                                         "prompts written before are kept, the same command goes on from them$"):
        run(config(fake, prompts, out, 40, max_concurrency=2), env={})
    assert len(ids(out, "pair")) == 3
    assert sum(entry["model"] == "gen" for entry in fake.log) <= 3 + 2 + 2  # written, then at most two in flight
