"""Stage 6 on held-out data: val_bpb in the summaries, samples on held-out prompts, and SFT-vs-pretrain win rates
judged by a real loopback OpenAI-compatible server (tests/prefs_fake_server.py) through the real openai client."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mateconv.chat import load_model
from mateconv.evaluate.cli import main
from mateconv.logprobs import bits_per_byte
from mateconv.procs import free_port
from tests.prefs_fake_server import FakeOpenAI, judge_score, task

pytestmark = pytest.mark.usefixtures("single_thread")
N_PROMPTS = 12
NEW_TOKENS = 12


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def heldout(tmp_path_factory, tiny_embedded_data) -> dict:
    """Held-out conversations the fake judge can grade ("[pNN] What is a+b?" with the answer) and held-out texts."""
    root = tmp_path_factory.mktemp("heldout")
    # sums around 14, the tiny SFT model's favourite answer, so that some replies score above the pretrain model's 1
    records = [task(f"p{i:02d}", 6 + i % 7, 7 + i % 5) for i in range(N_PROMPTS)]
    conversations = [{"id": r["id"], "messages": r["messages"] + [{"role": "assistant",
                                                                   "content": f"The answer is {r['answer']}."}]}
                     for r in records]
    texts = [json.loads(line) for line in (tiny_embedded_data / "pretrain_val.jsonl").read_text().splitlines()[:6]]
    return {"records": records, "sft_val": write_jsonl(root / "sft_val.jsonl", conversations),
            "texts": write_jsonl(root / "pretrain_val.jsonl", texts), "text_list": [t["text"] for t in texts]}


def test_win_rates_bpb_and_samples(tiny_pretrain_model, tiny_sft_model, heldout, greedy_reply, tmp_path):
    # p03: the judge fails for good (HTTP 500, no retries); p05: it answers a tie; p07: prose instead of JSON; p09: a
    # body cut short, which says it is JSON
    fake = FakeOpenAI(permanent={("judge", "p03"): "500", ("judge", "p05"): "tie", ("judge", "p07"): "malformed",
                                 ("judge", "p09"): "cutshort"})
    out = tmp_path / "eval"
    try:
        main(["--models", str(tiny_pretrain_model), str(tiny_sft_model), "--val", "none", "--tasks", "none",
              "--bpb_texts", heldout["texts"], "--heldout", heldout["sft_val"], "--n_samples", "2",
              "--judge_base_url", fake.url, "--judge_model", "judge", "--judge_retries", "0",
              "--max_new_tokens", str(NEW_TOKENS), "--out_dir", str(out)])
    finally:
        fake.close()
    summary = json.loads((out / "summary.json").read_text())

    # the judge's verdicts, recomputed from each model's own greedy replies
    expected = {"wins": 0, "losses": 0, "ties": 1, "failed": 3}
    for record in heldout["records"]:
        if record["id"] in ("p03", "p05", "p07", "p09"):
            continue
        question, truth = record["messages"][0]["content"], int(record["answer"])
        sft, pretrain = (judge_score(greedy_reply(model, question, NEW_TOKENS)[0], truth)
                         for model in (tiny_sft_model, tiny_pretrain_model))
        expected["wins" if sft > pretrain else "losses" if sft < pretrain else "ties"] += 1
    [win] = summary["win_rates"]
    assert (win["model"], win["baseline"], win["judge"]) == ("sft/final", "pretrain/final", "judge")
    assert {key: win[key] for key in expected} == expected and win["judged"] == N_PROMPTS - 3
    assert expected["wins"] >= 3  # the SFT model answers in the judged form; the 6-step pretrain model cannot
    assert win["win_rate"] == pytest.approx((win["wins"] + win["ties"] / 2) / win["judged"])
    assert any("HTTP 500" in reason for reason in win["failures"])
    assert any("no JSON object" in reason for reason in win["failures"])
    assert any("body is not valid JSON" in reason for reason in win["failures"])
    # the shuffle reached the judge: where only the SFT reply has a number, it was shown first on some prompts only
    firsts = [entry["shown"][0] is not None for entry in fake.log if entry["shown"] and entry["shown"].count(None) == 1]
    assert len(set(firsts)) == 2 and 0 < win["first_shown"] < N_PROMPTS

    # bits per byte on the held-out documents, per model, the same number bits_per_byte gives directly
    pretrain_row, sft_row = summary["models"]
    model, tokenizer = load_model(tiny_pretrain_model, device="cpu")
    direct = bits_per_byte(model, tokenizer, heldout["text_list"], seq_len=96)
    assert pretrain_row["val_bpb"] == pytest.approx(direct.bpb, abs=1e-4)
    assert pretrain_row["bpb"] == {"tokens": direct.tokens, "bytes": direct.bytes, "documents": 6, "start": "eos"}
    assert sft_row["val_bpb"] > 0 and sft_row["win_rate:pretrain/final"] == pytest.approx(win["win_rate"], abs=1e-4)
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert float(rows[0]["val_bpb"]) == pretrain_row["val_bpb"] and rows[0]["win_rate:pretrain/final"] == ""
    # samples answer the first held-out prompts
    first = heldout["records"][0]["messages"][0]["content"]
    assert list(sft_row["samples"]) == [r["messages"][0]["content"] for r in heldout["records"][:2]]
    assert sft_row["samples"][first] == greedy_reply(tiny_sft_model, first, NEW_TOKENS)[0]
    markdown = (out / "summary.md").read_text()
    assert "## Win rates" in markdown and "| sft/final | pretrain/final |" in markdown and "val_bpb" in markdown



def test_judge_and_heldout_errors_are_one_line(tiny_pretrain_model, tiny_untrained_model, heldout, tmp_path):
    untrained = f"{tiny_untrained_model.parent.name}/{tiny_untrained_model.name}"  # its label
    base = ["--models", str(tiny_pretrain_model), str(tiny_untrained_model), "--val", "none", "--tasks", "none",
            "--bpb_texts", "none", "--heldout", heldout["sft_val"], "--out_dir", str(tmp_path)]
    cases = [
        (["--compare", "sft:pretrain", "--judge_base_url", "none"], "--compare needs a judge endpoint"),
        (["--judge_base_url", f"http://127.0.0.1:{free_port()}/v1", "--compare", f"pretrain:{untrained}"],
         "judge endpoint http://127.0.0.1:.* is unreachable"),
        (["--judge_base_url", "http://127.0.0.1:1/v1", "--compare", "sft:pretrain"],
         r"--compare 'sft:pretrain': expected MODEL:BASELINE, two different model labels or stages among "
         r"pretrain/final"),
        (["--judge_base_url", "http://127.0.0.1:1/v1", "--compare", "pretrain:pretrain/final"],
         "two different model labels"),
        (["--judge_base_url", "generator"], "stage 6 has no generator endpoint"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit, match=message):
            main(base + flags)
    cut_short = FakeOpenAI(cut_short_models=True)
    try:
        with pytest.raises(SystemExit) as stopped:
            main(base + ["--judge_base_url", cut_short.url, "--judge_model", "judge", "--compare",
                         f"pretrain:{untrained}"])
    finally:
        cut_short.close()
    assert str(stopped.value) == (f"evaluate: judge endpoint {cut_short.url} answered GET /models with a body that is "
                                  "not valid JSON (Unterminated string starting at)")
    texts_without_text = write_jsonl(tmp_path / "bad.jsonl", [{"messages": []}])
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: no text field in record with keys \['messages'\]$"):
        main(base + ["--bpb_texts", texts_without_text])
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: unknown record shape with keys \['text'\]"):
        main(base + ["--heldout", write_jsonl(tmp_path / "bad.jsonl", [{"text": "x"}])])

def verdicts(path) -> dict[int, str]:
    """The judged prompts kept in a comparison's file (its first line is its key; a line being written is left)."""
    return {entry["prompt"]: entry["verdict"] for entry in map(json.loads, path.read_text().split("\n")[1:-1])}


def test_an_interrupted_evaluation_keeps_its_work_and_the_rerun_reuses_it(tiny_pretrain_model, tiny_sft_model,
                                                                          heldout, tmp_path, capsys):
    """SIGINT while the judge is being asked: the summaries hold both finished models, every verdict given so far is
    kept, and the same command goes on from them, asking the judge only about the other prompts and evaluating no
    model again; a checkpoint whose files changed is evaluated again."""
    out = tmp_path / "eval"
    kept = out / "parts" / "winrate_sft_final_vs_pretrain_final.jsonl"

    def flags(url: str) -> list[str]:
        return ["--models", str(tiny_pretrain_model), str(tiny_sft_model), "--val", "none", "--tasks", "none",
                "--bpb_texts", heldout["texts"], "--heldout", heldout["sft_val"], "--judge_base_url", url,
                "--judge_model", "judge", "--judge_concurrency", "1", "--max_new_tokens", str(NEW_TOKENS),
                "--out_dir", str(out)]

    slow = FakeOpenAI(delay_s=0.3)
    try:
        run = subprocess.Popen([sys.executable, "-m", "mateconv.evaluate", *flags(slow.url)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        while not (kept.exists() and len(verdicts(kept)) >= 2) and run.poll() is None:
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _, stderr = run.communicate(timeout=120)
    finally:
        slow.close()
    assert run.returncode == 130, stderr[-2000:]  # told to stop, not failed: the pipeline tells them apart
    assert stderr.strip().splitlines()[-1] == (
        f"evaluate: interrupted: 2 of 2 models and 0 of 1 win rates finished, summarized in {out}; {out / 'parts'} "
        "keeps every finished model and judged prompt, and the same command goes on from them")
    summary = json.loads((out / "summary.json").read_text())
    assert [m["model"] for m in summary["models"]] == ["pretrain/final", "sft/final"] and summary["win_rates"] == []
    before = verdicts(kept)
    assert len(before) >= 2 and all(v in ("win", "loss", "tie") for v in before.values())

    # a result that only the kept file holds shows whether the rerun reused it or evaluated the model again
    kept_model = out / "parts" / "model_pretrain_final.json"
    part = json.loads(kept_model.read_text())
    part["report"]["bpb"]["bpb"] = 42.0
    kept_model.write_text(json.dumps(part))
    capsys.readouterr()
    fake = FakeOpenAI()
    try:
        main(flags(fake.url))
    finally:
        fake.close()
    printed = capsys.readouterr().out
    assert printed.count("reused the results an earlier run kept") == 2
    assert f"{len(before)} of {N_PROMPTS} prompts judged by an earlier run reused" in printed
    after = verdicts(kept)
    asked_again = {int(entry["pid"][1:]) for entry in fake.log}
    assert asked_again == set(after) - set(before) and len(fake.log) == len(asked_again)
    assert {i: after[i] for i in before} == before
    summary = json.loads((out / "summary.json").read_text())
    assert summary["models"][0]["val_bpb"] == 42.0
    [win] = summary["win_rates"]
    assert win["judged"] == N_PROMPTS and win["wins"] == list(after.values()).count("win")

    # a checkpoint whose files changed is evaluated again; the verdicts on its same replies still stand
    config = tiny_pretrain_model / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    fake = FakeOpenAI()
    try:
        main(flags(fake.url))
    finally:
        fake.close()
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert capsys.readouterr().out.count("reused the results an earlier run kept") == 1 and fake.log == []
    assert json.loads((out / "summary.json").read_text())["models"][0]["val_bpb"] != 42.0


@pytest.mark.parametrize("prompts", [20, 7])
def test_position_bias_cancels_and_identical_replies_tie_unasked(prompts, monkeypatch):
    """A judge that always prefers the reply shown first wins each model half of the prompts it is asked about: each
    model is shown first on half of them (the odd one out to either); identical replies are ties, never sent."""
    import asyncio

    from mateconv import winrate

    asked = []

    async def first_shown_wins(caller, prompt, replies, order, seed, json_mode):
        asked.append(prompt)
        return "win" if order[0] == 0 else "loss"

    monkeypatch.setattr(winrate, "_judge_one", first_shown_wins)
    same = {1, 4}  # prompts whose two replies are the same text
    model = [f"model reply {i}" for i in range(prompts)]
    baseline = [model[i] if i in same else f"baseline reply {i}" for i in range(prompts)]
    results = []
    for seed in range(4):
        result = winrate.WinRate("sft/final", "pretrain/final", "judge")
        asyncio.run(winrate._compare(None, result, list(range(prompts)), model, baseline, seed, True))
        results.append(result)
    assert sorted(asked) == sorted([i for i in range(prompts) if i not in same] * 4)
    for result in results:
        assert result.ties == 2 and result.judged == prompts and result.failed == 0
        assert result.wins == result.first_shown and abs(result.wins - result.losses) <= 1
    if prompts % 2 == 0:
        assert all(r.win_rate == 0.5 for r in results)
    else:  # the odd prompt goes to either model, by the seed
        assert {r.wins for r in results} == {2, 3}
