"""Stage 7 end to end over the project's own OpenAI-compatible server and the real `openai` client.

Generator: the test world's SFT model, served by `mateconv.serve` that the run starts itself on a free loopback port
(the default, on-policy case) and stops at the end. Judge: the test world's untrained MateConv model with a
1024-token context, served by a second `mateconv.serve`: its answers are not the JSON the
rubric asks for, so `--judge model` records every prompt as a failure, and `--judge both` still makes pairs from
the known answers (keeping the model judge's error in each record).
"""
from __future__ import annotations

import json

import psutil
import pytest

from mateconv.prefs.cli import main
from mateconv.serve import start_background, stop_background
from mateconv.tasks import check_answer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("single_thread")]


@pytest.fixture(scope="module")
def judge_server(tiny_untrained_model):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        url, process = start_background(tiny_untrained_model, served_model_name="random-judge")
    yield url
    stop_background(process)


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
    return {child.pid for child in psutil.Process().children(recursive=True)}


def test_local_generator_random_judge_failures_then_rule_pairs(tmp_path, judge_server, records, tiny_sft_model,
                                                               monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prompts, out = tmp_path / "tasks.jsonl", tmp_path / "prefs"
    prompts.write_text("".join(json.dumps(record) + "\n" for record in records))
    flags = ["--prompts_path", str(prompts), "--output_dir", str(out), "--generator_model_path", str(tiny_sft_model),
             "--k_samples", "4", "--temperature", "1.2", "--max_tokens", "8", "--judge_base_url", judge_server,
             "--judge_model", "random-judge", "--judge_max_tokens", "24", "--judge_retries", "1", "--no_progress"]
    before = children()

    summary = main(flags + ["--judge", "model"])
    assert children() == before  # the local generator server was stopped
    assert summary["models"]["generator_base_url"] == "local" and summary["models"]["generator"] == "mateconv"
    assert summary["this_run"]["failures"] == len(records) and summary["this_run"]["pairs"] == 0
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["id"] for f in failures) == sorted(r["id"] for r in records)
    for failure in failures:
        assert failure["stage"] == "judge" and failure["reason"].endswith("(after 2 answers)")
        assert "JSON" in failure["reason"] or "empty" in failure["reason"]  # malformed, not a transport error
        assert len(failure["samples"]) == 4  # what the generator produced is kept
    assert summary["usage"]["judge"]["requests"] == 2 * len(records)  # asked twice each, never guessed
    assert summary["usage"]["generator"]["requests"] == len(records)  # the server honours n: one request per prompt
    assert summary["usage"]["generator"]["completion_tokens"] > 0

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
