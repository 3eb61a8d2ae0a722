"""Stage 7's pieces on their own: judge answer validation and mapping back from the shuffled order, pair choice,
endpoint resolution from flags and environment, Retry-After, prices, prompt sampling and torn-line repair."""
from __future__ import annotations

import email.utils
import json
import random
import time

import httpx
import pytest

from mateconv.prefs.cli import main
from mateconv.prefs.endpoints import (OPENAI_URL, PrefsError, RetryPolicy, Usage, cost_usd, parse_prices,
                                      resolve_generator, resolve_judge, retry_after_s)
from mateconv.prefs.judge import (JudgeMalformed, choose_pair, combine, judge_messages, parse_judgement, pick_pair,
                                  shuffled_order)
from mateconv.prefs.pipeline import judges_for, stable_seed
from mateconv.prefs.store import ResultStore, repair_torn_tail, sample_prompts


# ---------------------------------------------------------------- judge

def answer(*entries) -> str:
    return json.dumps({"scores": [{"id": i, "score": s, "reason": f"r{i}"} for i, s in entries]})


def test_judge_scores_map_back_from_the_shown_order():
    order = [2, 0, 3, 1]  # position 1 shows candidate 2, position 2 candidate 0, ...
    messages = judge_messages([{"role": "user", "content": "Q?"}], ["c0", "c1", "c2", "c3"], order)
    shown = messages[1]["content"]
    assert shown.index('<reply id="1">\nc2') < shown.index('<reply id="2">\nc0') < shown.index('<reply id="4">\nc1')
    assert '"scores"' in messages[0]["content"]
    scores, reasons = parse_judgement(answer(("1", 8), ("2", 3), ("3", 10), ("4", 1)), order)
    assert scores == [3.0, 1.0, 8.0, 10.0] and reasons == ["r2", "r4", "r1", "r3"]
    # integer ids, fenced or wrapped JSON and extra keys are fine
    assert parse_judgement(answer((1, 5), (2, 6), (3, 7), (4, 9)), order)[0] == [6.0, 9.0, 5.0, 7.0]
    fenced = f"Sure.\n```json\n{answer(('1', 2), ('2', 4))}\n```"
    assert parse_judgement(fenced, [1, 0])[0] == [4.0, 2.0]
    wrapped = 'My verdict: {"scores": [{"id": "2", "score": 9.5}, {"id": "1", "score": 1}], "best": "2"} done'
    assert parse_judgement(wrapped, [0, 1]) == ([1.0, 9.5], ["", ""])


def test_a_reasoning_judges_thoughts_are_not_taken_for_its_answer():
    """A reasoning model served without a reasoning parser thinks aloud first, drafts and braces included."""
    final = answer(("1", 3), ("2", 8))
    thinking = f"<think>Reply 1 misses {{x}}. Draft: {answer(('1', 9), ('2', 1))} no, reply 2 is right.</think>\n"
    assert parse_judgement(thinking + final, [0, 1])[0] == [3.0, 8.0]
    # without think tags, the last complete object is the answer
    assert parse_judgement(f"Draft {answer(('1', 9), ('2', 1))}. Final: {final} Thanks!", [0, 1])[0] == [3.0, 8.0]


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    (None, "empty"),
    ("Reply 2 is best.", "no JSON object"),
    ('["1", "2"]', "JSON invalid at top level"),
    ('{"best": "1"}', "JSON invalid at scores"),
    (answer(("1", 7)), "expected each of ['1', '2'] once"),
    (answer(("1", 7), ("1", 5)), "expected each of ['1', '2'] once"),
    (answer(("1", 7), ("3", 5)), "expected each of ['1', '2'] once"),
    (answer(("1", 11), ("2", 5)), "scores.0.score"),
    (answer(("1", 0), ("2", 5)), "scores.0.score"),
    ('{"scores": [{"id": "1", "score": "7"}, {"id": "2", "score": 5}]}', "scores.0.score"),
    ('{"scores": [{"id": "1", "score": true}, {"id": "2", "score": 5}]}', "scores.0.score"),
    ('{"scores": [{"id": "1"}, {"id": "2", "score": 5}]}', "scores.0.score"),
])
def test_malformed_judge_answers_are_rejected_not_guessed(text, message):
    with pytest.raises(JudgeMalformed, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_judgement(text, [0, 1])


def test_shuffle_is_seeded_and_covers_orders():
    assert shuffled_order(4, 7) == shuffled_order(4, 7)
    orders = {tuple(shuffled_order(4, seed)) for seed in range(200)}
    assert len(orders) == 24 and all(sorted(order) == [0, 1, 2, 3] for order in orders)
    assert stable_seed(42, "p1", 0) == stable_seed(42, "p1", 0) != stable_seed(42, "p1", 1)


def test_pick_pair_and_combine():
    texts = ["a", "b", "c", "d"]
    verdict = pick_pair([3.0, 9.0, 1.0, 9.0], texts, 1.0)
    assert (verdict.chosen, verdict.rejected, verdict.margin, verdict.dropped) == (1, 2, 8.0, None)
    assert pick_pair([5.0, 5.0, 5.0, 5.0], texts, 0.0).dropped == "tie"
    assert pick_pair([5.0, 5.5, 5.0, 5.0], texts, 1.0).dropped == "margin"
    assert pick_pair([5.0, 5.5, 5.0, 5.0], texts, 0.5).chosen == 1
    assert pick_pair([9.0, 1.0], ["same ", "same"], 1.0).dropped == "identical"
    assert pick_pair([9.0, 1.0, 5.0], ["x", "  ", "y"], 1.0).rejected == 2  # empty replies never enter a pair
    assert pick_pair([9.0, 1.0], ["x", ""], 1.0).dropped == "empty"
    assert combine([10.0, 1.0], None) == [10.0, 1.0] and combine(None, [4.0, 6.0]) == [4.0, 6.0]
    assert combine([10.0, 1.0, 10.0], [2.0, 10.0, 8.0]) == pytest.approx([10.2, 2.0, 10.8])


def test_both_judges_the_rule_first_then_the_model_on_its_own_scale():
    texts = ["a", "b", "c", "d"]
    scores, verdict = choose_pair([1.0] * 4, [7.0, 7.0, 8.0, 9.0], texts, 1.0)  # all wrong: the model decides
    assert scores == pytest.approx([1.7, 1.7, 1.8, 1.9])
    assert (verdict.chosen, verdict.rejected, verdict.margin, verdict.dropped) == (3, 0, 2.0, None)
    assert choose_pair([1.0] * 4, [7.0, 7.0, 8.0, 9.0], texts, 2.5)[1].dropped == "margin"
    assert choose_pair([10.0] * 4, [6.0] * 4, texts, 0.0)[1].dropped == "tie"
    # the rule first: a right reply beats a wrong one the model likes better, on the combined scale
    verdict = choose_pair([10.0, 1.0, 10.0, 1.0], [2.0, 10.0, 8.0, 9.0], texts, 1.0)[1]
    assert (verdict.chosen, verdict.rejected, verdict.margin) == (2, 3, pytest.approx(8.9))
    # an empty reply does not count: the rule ties among the others, so the model decides
    verdict = choose_pair([10.0, 1.0, 10.0, 10.0], [5.0, 1.0, 9.0, 6.0], ["a", " ", "c", "d"], 1.0)[1]
    assert (verdict.chosen, verdict.rejected, verdict.margin) == (2, 0, 4.0)
    assert choose_pair(None, [4.0, 6.0], texts[:2], 1.0)[1].chosen == 1
    assert choose_pair([10.0, 10.0], None, texts[:2], 0.0)[1].dropped == "tie"


# ---------------------------------------------------------------- endpoints

def test_endpoint_resolution_from_flags_and_environment():
    local = resolve_generator(None, None, {})
    assert local.local and local.model == "mateconv"
    assert resolve_judge(None, None, {}, local) is None  # no judge endpoint: the known answers judge
    openai_env = {"OPENAI_API_KEY": "sk-x"}
    judge = resolve_judge(None, None, openai_env, local)
    assert (judge.base_url, judge.model, judge.api_key) == (OPENAI_URL, "gpt-4o-mini", "sk-x")
    remote = resolve_generator(None, "gpt-4o", {**openai_env, "GENERATOR_API_KEY": "sk-g"})
    assert (remote.base_url, remote.model, remote.api_key) == (OPENAI_URL, "gpt-4o", "sk-g")
    env = {"OPENAI_BASE_URL": "http://host:9/v1/", "JUDGE_API_KEY": "sk-j"}
    generator = resolve_generator(None, None, env)
    assert (generator.base_url, generator.model, generator.api_key) == ("http://host:9/v1", "gpt-4o", "unused")
    assert resolve_judge(None, None, env, generator).api_key == "sk-j"
    assert resolve_generator("local", None, env).local
    same = resolve_judge("generator", None, {}, local)
    assert same.local and same.model == "mateconv"
    assert resolve_judge("openai", "gpt-4.1", openai_env, local).base_url == OPENAI_URL
    with pytest.raises(PrefsError, match="no key is set: export OPENAI_API_KEY"):
        resolve_generator("openai", None, {})


def test_empty_endpoint_variables_count_as_unset():
    """`OPENAI_BASE_URL= OPENAI_API_KEY= cmd` (or an env file with empty values) means no judge, as for the generator,
    not a judge at the URL ''."""
    empty = {"OPENAI_BASE_URL": "", "OPENAI_API_KEY": "", "JUDGE_API_KEY": ""}
    generator = resolve_generator(None, None, empty)
    assert generator.local
    assert resolve_judge(None, None, empty, generator) is None


def test_retry_after_and_backoff():
    def headers(**values) -> httpx.Response:
        return httpx.Response(429, headers={k.replace("_", "-"): v for k, v in values.items()})

    assert retry_after_s(headers(retry_after="3")) == 3.0
    assert retry_after_s(headers(retry_after="0.25")) == 0.25
    assert retry_after_s(headers(retry_after_ms="1500", retry_after="9")) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < retry_after_s(headers(retry_after=date)) <= 30
    assert retry_after_s(headers(retry_after="soon")) is None and retry_after_s(headers()) is None
    policy, rng = RetryPolicy(backoff_base_s=1.0, backoff_max_s=5.0), random.Random(0)
    assert policy.delay(0, 2.5, rng) == 2.5 and policy.delay(0, 100.0, rng) == 5.0
    delays = [policy.delay(attempt, None, rng) for attempt in range(10) for _ in range(20)]
    assert all(0 <= d <= 5.0 for d in delays) and max(delays[:20]) <= 1.0 and len(set(delays)) > 100


def test_prices_and_cost():
    usage = Usage(prompt_tokens=2_000_000, completion_tokens=500_000)
    prices = parse_prices(["my-model=1,2", "gpt-4o=3,12"])
    assert cost_usd("gpt-4o-mini", usage, prices) == pytest.approx(0.6)
    assert cost_usd("gpt-4o", usage, prices) == pytest.approx(12.0)
    assert cost_usd("my-model", usage, prices) == pytest.approx(3.0)
    assert cost_usd("unknown", usage, prices) is None
    with pytest.raises(PrefsError, match="--price 'gpt-4o=2'"):
        parse_prices(["gpt-4o=2"])


# ---------------------------------------------------------------- prompts and files

def write_lines(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def test_prompt_sampling_is_seeded_and_reads_every_shape(tmp_path):
    rows = [{"id": i, "messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(50)]
    path = write_lines(tmp_path / "sft.jsonl", rows)
    first, again = sample_prompts(path, 10, seed=1), sample_prompts(path, 10, seed=1)
    assert first == again and len(first) == 10 and first != sample_prompts(path, 10, seed=2)
    assert [int(p["id"]) for p in first] == sorted(int(p["id"]) for p in first)  # file order
    assert first[0]["prompt"] == [{"role": "user", "content": f"q{first[0]['id']}"}]  # the reply is cut off
    assert len(sample_prompts(path, 500, seed=1)) == 50
    counts = [0] * 50
    for seed in range(300):
        for prompt in sample_prompts(path, 10, seed):
            counts[int(prompt["id"])] += 1
    assert min(counts) > 25 and max(counts) < 100  # about uniform (expected 60 each)

    shapes = write_lines(tmp_path / "shapes.jsonl", [
        {"id": "t", "kind": "add", "messages": [{"role": "user", "content": "1+1?"}], "answer": "2"},
        {"id": "p", "prompt": "plain string", "chosen": "x", "rejected": "y"},
        "", {"id": "s", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
    ])
    prompts = {p["id"]: p for p in sample_prompts(shapes, 10, seed=0)}
    assert prompts["p"]["prompt"] == [{"role": "user", "content": "plain string"}]
    assert prompts["t"]["source"]["answer"] == "2" and len(prompts["s"]["prompt"]) == 2


def test_a_prompts_file_saved_with_a_byte_order_mark_is_read(tmp_path):
    """As the data readers of stages 2, 3 and 9 read it; stage 7 refused its line 1 as not valid JSON."""
    path = tmp_path / "bom.jsonl"
    path.write_text("\ufeff" + json.dumps({"id": "w", "prompt": "hi"}) + "\n", encoding="utf-8")
    assert [prompt["id"] for prompt in sample_prompts(path, 5, seed=0)] == ["w"]


def test_a_prompts_file_not_in_utf8_is_one_line_naming_the_line(tmp_path):
    """A GBK-saved line was a UnicodeDecodeError traceback."""
    path = tmp_path / "gbk.jsonl"
    good = "".join(json.dumps({"id": f"u{i}", "prompt": f"q{i}"}) + "\n" for i in range(20))
    path.write_bytes(good.encode() + json.dumps({"id": "g", "prompt": "你好"}, ensure_ascii=False).encode("gbk"))
    with pytest.raises(PrefsError, match=r"gbk\.jsonl:21: not UTF-8 text"):
        sample_prompts(path, 100, seed=0)


def test_a_directory_as_prompts_file_is_named_so(tmp_path):
    """--prompts_path out/data said 'not found' and to run stage 2, which had run."""
    with pytest.raises(PrefsError, match=f"^prompts file {tmp_path} is a directory: pass a JSONL file in it"):
        sample_prompts(tmp_path, 10, seed=0)


def test_a_larger_sample_contains_the_smaller_one(tmp_path):
    path = write_lines(tmp_path / "prompts.jsonl", [{"id": i, "prompt": f"q{i}"} for i in range(5000)])
    small, large, other_seed = ({p["id"] for p in sample_prompts(path, n, seed)} for n, seed in
                                ((300, 7), (3000, 7), (3000, 8)))
    assert len(small) == 300 and len(large) == 3000 and small < large
    assert not small < other_seed  # the order is the seed's


@pytest.mark.parametrize("line,message", [
    ('{"id": 1, "messages": [', r"bad\.jsonl:2: not valid JSON"),
    ('{"messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:2: needs an 'id'"),
    ('{"id": "a", "messages": [{"role": "user", "content": "x"}]}', r"bad\.jsonl:2: duplicate id 'a'"),
    ('{"id": 2, "messages": [{"role": "assistant", "content": "x"}]}', "must end with a user message"),
    ('{"id": 2, "messages": [{"role": "robot", "content": "x"}]}', "each message needs a role"),
    ('{"id": 2, "text": "x"}', "needs 'messages' or 'prompt'"),
])
def test_bad_prompt_lines_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", ['{"id": "a", "messages": [{"role": "user", "content": "x"}]}', line])
    with pytest.raises(PrefsError, match=message):
        sample_prompts(path, 10, seed=0)


def test_torn_last_line_is_cut_and_whole_lines_kept(tmp_path):
    path = tmp_path / "dpo_pairs.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n{"id": "c", "pro')
    assert repair_torn_tail(path) == len(b'{"id": "c", "pro')
    assert path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n' and repair_torn_tail(path) == 0
    path.write_bytes(b'{"id": "a"}\n' + b"x" * 200_000)  # a torn line longer than the 64 KiB scan block
    assert repair_torn_tail(path) == 200_000 and path.read_bytes() == b'{"id": "a"}\n'
    path.write_bytes(b'{"id": "only", "half')
    assert repair_torn_tail(path) == len(b'{"id": "only", "half') and path.read_bytes() == b""
    (tmp_path / "failures.jsonl").write_text('{"id": "x"}\n{"id": "y", "torn')
    store = ResultStore(tmp_path)
    assert store.ids("failure") == {"x"}
    store.append("pair", {"id": "d", "text": "é"})
    store.close()
    assert json.loads(path.read_text(encoding="utf-8").splitlines()[-1]) == {"id": "d", "text": "é"}
    (tmp_path / "dropped.jsonl").write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(PrefsError, match=r"dropped\.jsonl:2: corrupt line"):
        ResultStore(tmp_path).ids("dropped")


def test_judge_choice_per_prompt():
    verifiable = {"id": "t", "source": {"answer": "2"}}
    open_ended = {"id": "o", "source": {}}
    assert judges_for(verifiable, "auto", have_endpoint=False) == (True, False)
    assert judges_for(verifiable, "auto", have_endpoint=True) == (True, True)
    assert judges_for(open_ended, "auto", have_endpoint=True) == (False, True)
    assert judges_for(verifiable, "model", have_endpoint=True) == (False, True)
    with pytest.raises(PrefsError, match="no judge endpoint is configured"):
        judges_for(open_ended, "auto", have_endpoint=False)
    with pytest.raises(PrefsError, match="has no 'answer', so --judge both"):
        judges_for(open_ended, "both", have_endpoint=True)


def test_cli_errors_are_one_line(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [{"id": 1, "messages": [{"role": "user", "content": "1+1?"}],
                                                "answer": "2"}])
    with pytest.raises(SystemExit, match="^prefs: --k_samples must be >= 2"):
        main(["--prompts_path", path, "--k_samples", "1"])
    with pytest.raises(SystemExit, match="^prefs: generator model .*nowhere not found: train stage 5 first"):
        main(["--prompts_path", path, "--output_dir", str(tmp_path / "o"), "--generator_model_path",
              str(tmp_path / "nowhere"), "--no_progress"])
    with pytest.raises(SystemExit, match="^prefs: prompt '1' needs a judge model but no judge endpoint"):
        main(["--prompts_path", path, "--judge", "model", "--generator_base_url", "http://127.0.0.1:9/v1"])
