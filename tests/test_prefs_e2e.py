"""Stage 7 end to end over the project's own OpenAI-compatible server and the real `openai` client.

Generator: the test world's SFT model, served by `mateconv.serve` that the run starts itself on a free loopback port
(the default, on-policy case) and stops at the end. Judge: the test world's untrained MateConv model with a
1024-token context, served by a second `mateconv.serve`: its answers are not the JSON the
rubric asks for, so `--judge model` records every prompt as a failure, and `--judge both` still makes pairs from
the known answers (keeping the model judge's error in each record). A foreign generator: `transformers serve` over
the Llama export of the same model.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from conftest import served

from mateconv.prefs.cli import main
from mateconv.procs import free_port
from mateconv.tasks import check_answer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def judge_server(tiny_untrained_model):
    with served(tiny_untrained_model, "random-judge") as (url, _):
        yield url


@pytest.fixture(scope="module")
def records(tiny_sft_model, tiny_embedded_data, greedy_reply) -> list[dict]:
    """Six training tasks the generator answers correctly when greedy: sampled hot, it answers them both right and
    wrong, which is what preference pairs are made of."""
    tasks = [json.loads(line) for line in (tiny_embedded_data / "tasks_train.jsonl").read_text().splitlines()]
    known = [task for task in tasks
             if check_answer(task, greedy_reply(tiny_sft_model, task["messages"][0]["content"])[0])]
    assert len(known) >= 6, len(known)
    return known[:6]


def children() -> set[int]:
    """The model servers running under this test process (other processes here come and go: W&B's service, ...)."""
    def is_server(process: psutil.Process) -> bool:
        try:
            return "mateconv.serve" in process.cmdline()
        except psutil.Error:  # ended meanwhile
            return False

    return {child.pid for child in psutil.Process().children(recursive=True) if is_server(child)}


def test_local_generator_random_judge_failures_then_rule_pairs(tmp_path, judge_server, records, tiny_sft_model,
                                                               monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompts, out = tmp_path / "tasks.jsonl", tmp_path / "prefs"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    flags = ["--prompts_path", str(prompts), "--output_dir", str(out), "--generator_model_path", str(tiny_sft_model),
             "--k_samples", "4", "--temperature", "1.2", "--max_tokens", "8", "--judge_base_url", judge_server,
             "--judge_model", "random-judge", "--judge_max_tokens", "24", "--judge_retries", "1", "--no_progress"]
    before = children()

    # every prompt fails: an error, and no summary.json (a pipeline would take the stage as done)
    with pytest.raises(SystemExit, match=rf"^prefs: all {len(records)} prompts failed, e.g. at judge: "):
        main(flags + ["--judge", "model"])
    assert children() == before  # the local generator server was stopped
    assert not (out / "summary.json").exists()
    report = capsys.readouterr().err
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == sorted(r["id"] for r in records)
    for failure in failures:
        assert failure["stage"] == "judge" and failure["reason"].endswith("(after 2 answers)")
        assert "JSON" in failure["reason"] or "empty" in failure["reason"]  # malformed, not a transport error
        assert len(failure["samples"]) == 4  # what the generator produced is kept
    assert f"judge random-judge: {2 * len(records)} requests" in report  # asked twice each, never guessed
    generated = re.search(rf"generator mateconv: {len(records)} requests .* ([\d,]+) completion tokens", report)
    assert generated and int(generated[1].replace(",", "")) > 0  # the server honours n: one request per prompt

    summary = main(flags + ["--judge", "both"])  # retries the failures; the known answers decide
    assert children() == before
    pairs = [json.loads(line) for line in (out / "dpo_pairs.jsonl").read_text().splitlines()]
    dropped = [json.loads(line)["id"] for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert pairs, "no prompt had both a correct and an incorrect sample"
    assert sorted([p["id"] for p in pairs] + dropped) == sorted(r["id"] for r in records)
    assert (out / "failures.jsonl").read_text() == ""
    by_id = {record["id"]: record for record in records}
    for pair in pairs:
        assert pair["judge"] == "rule" and pair["judge_scores"]["model"] is None and pair["judge_error"]
        assert check_answer(by_id[pair["id"]], pair["chosen"][0]["content"])
        assert not check_answer(by_id[pair["id"]], pair["rejected"][0]["content"])
        assert pair["prompt"] == by_id[pair["id"]]["messages"]
    assert summary["files"] == {"pairs": len(pairs), "dropped": len(dropped), "failures_outstanding": 0}


@pytest.fixture(scope="module")
def transformers_server(tiny_sft_model, tmp_path_factory):
    """`transformers serve` (Hugging Face's own OpenAI-compatible server) over the Llama export of the SFT model:
    (base URL, the name /v1/models lists, the server's log file)."""
    root = tmp_path_factory.mktemp("foreign")
    export = subprocess.run([sys.executable, "-m", "mateconv.export", str(tiny_sft_model), "--to", "llama", "--out",
                             str(root / "llama")], capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    port, log = free_port(), root / "serve.log"
    with log.open("w") as sink:
        process = subprocess.Popen([str(Path(sys.executable).parent / "transformers"), "serve", str(root / "llama"),
                                    "--host", "127.0.0.1", "--port", str(port)], stdout=sink, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while process.poll() is None:  # loading may take a while on a busy machine; a crash ends the wait
            try:
                served = httpx.get(f"{url}/models", timeout=2.0).json()["data"]
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert process.poll() is None, log.read_text()[-2000:]
        yield url, served[0]["id"], log
    finally:
        process.terminate()
        process.wait(30)


def test_transformers_serve_as_generator(tmp_path, transformers_server, records):
    url, served_name, log = transformers_server
    prompts, out = tmp_path / "tasks.jsonl", tmp_path / "prefs"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    stage7 = [sys.executable, str(ROOT / "7.gen_prefs_openai.py"), "--prompts_path", str(prompts), "--output_dir",
              str(out), "--generator_base_url", url, "--k_samples", "4", "--temperature", "1.2", "--max_tokens", "8",
              "--judge", "rule", "--no_progress"]

    wrong = subprocess.run(stage7 + ["--generator_model", "mateconv"], capture_output=True, text=True, timeout=300)
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert f"it serves: {served_name}" in wrong.stderr.strip().splitlines()[-1]  # the name to use, in one line

    run = subprocess.run(stage7 + ["--generator_model", served_name], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    generated = log.read_text().count('"POST /v1/chat/completions HTTP/1.1" 200')
    assert summary["usage"]["generator"]["requests"] == generated and summary["usage"]["generator"]["failed"] == 0
    assert generated >= 4 * len(records)  # transformers serve answers one choice per request: n is asked for apart
    pairs = [json.loads(line) for line in (out / "dpo_pairs.jsonl").read_text().splitlines()]
    assert pairs, "no prompt had both a correct and an incorrect sample"  # the export's generation_config samples
    by_id = {record["id"]: record for record in records}
    for pair in pairs:
        assert pair["models"]["generator"] == served_name
        assert check_answer(by_id[pair["id"]], pair["chosen"][0]["content"])
        assert not check_answer(by_id[pair["id"]], pair["rejected"][0]["content"])


def test_a_stop_while_the_local_generator_starts_is_an_interrupt(tmp_path, records, tiny_sft_model):
    """`bash scripts/stop.sh prefs` (SIGINT to the stage's process group) while stage 7 starts its local generator
    server reaches the server as well: stage 7 stops as interrupted, not with 'could not start the local generator
    server: server exited with code -2'."""
    prompts = tmp_path / "tasks.jsonl"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    stage = subprocess.Popen([sys.executable, str(ROOT / "7.gen_prefs_openai.py"), "--prompts_path", str(prompts),
                              "--output_dir", str(tmp_path / "prefs"), "--generator_model_path", str(tiny_sft_model),
                              "--judge", "rule", "--no_progress"],
                             start_new_session=True, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not any("mateconv.serve" in child.cmdline() for child in psutil.Process(stage.pid).children()):
        assert time.monotonic() < deadline and stage.poll() is None
        time.sleep(0.02)
    os.killpg(stage.pid, signal.SIGINT)
    printed = stage.communicate(timeout=60)[1]
    assert printed.splitlines()[-1] == "prefs: interrupted; finished prompts are saved, run again to resume", printed


def test_the_health_check_takes_a_name_the_server_serves_but_does_not_list(tiny_untrained_model):
    """mateconv.serve's default names are the model path (listed in /v1/models) and 'mateconv' (not listed): the
    check refused 'mateconv', which the server answers to, as docs/prefs.md's own command passes it."""
    from mateconv.prefs.endpoints import Endpoint, health_problem

    with served(tiny_untrained_model, None) as (url, _):
        assert health_problem(Endpoint("generator", url, "mateconv"), 10) is None
        assert health_problem(Endpoint("generator", url, "gpt-9"), 10) == \
            f"generator model 'gpt-9' is not served at {url}; it serves: {tiny_untrained_model}"
