"""Format conversion: every SFT/preference shape -> the internal formats, on the real shared files."""
from __future__ import annotations

from pathlib import Path

import pytest

from mateconv.data import DataError
from mateconv.data.formats import detect_format, to_preference, to_sft
from mateconv.data.readers import iter_records

FACTORY = "hiyouga__LLaMA-Factory/data"


def records(path: Path) -> list:
    return [record for _, _, record in iter_records(path)]


def test_alpaca_files_to_messages(shared_data):
    data = records(shared_data(f"{FACTORY}/alpaca_zh_demo.json"))
    assert len(data) == 1000 and {detect_format(r) for r in data} == {"alpaca"}
    with_input = next(r for r in data if r["input"])
    messages = to_sft(with_input)["messages"]
    assert messages == [{"role": "user", "content": f"{with_input['instruction']}\n\n{with_input['input']}"},
                        {"role": "assistant", "content": with_input["output"]}]
    identity = records(shared_data(f"{FACTORY}/identity.json"))
    assert all(to_sft(r)["messages"][-1]["content"] == r["output"] for r in identity)


def test_sharegpt_preference_with_dict_sides_and_system(shared_data):
    data = records(shared_data(f"{FACTORY}/dpo_zh_demo.json"))
    assert {detect_format(r) for r in data} == {"sharegpt_pref"}
    pairs = [to_preference(r) for r in data]
    with_system = [p for p in pairs if p["prompt"][0]["role"] == "system"]
    assert len(with_system) == 64  # the README's count of records with a system message
    for record, pair in zip(data, pairs):
        assert pair["chosen"] == [{"role": "assistant", "content": record["chosen"]["value"]}]
        assert pair["rejected"] == [{"role": "assistant", "content": record["rejected"]["value"]}]
        assert pair["prompt"][-1] == {"role": "user", "content": record["conversations"][-1]["value"]}


def test_sharegpt_preference_with_string_sides(shared_data):
    data = records(shared_data("shibing624__MedicalGPT/data/reward/dpo_zh_500.jsonl"))
    assert len(data) == 500
    pairs = [to_preference(r) for r in data]
    assert sum(p["prompt"][0]["role"] == "system" for p in pairs) == 84
    assert all(p["chosen"][0]["content"] == r["chosen"] and p["rejected"][0]["content"] == r["rejected"]
               for p, r in zip(pairs, data))


def test_hh_rlhf_split_at_last_assistant_turn(shared_data):
    data = records(shared_data("anthropics__hh-rlhf/harmless-base/test.first200.jsonl"))
    assert {detect_format(r) for r in data} == {"hh"}
    converted = 0
    for record in data:
        try:
            pair = to_preference(record)
        except DataError:
            continue
        converted += 1
        cut = record["chosen"].rfind("\n\nAssistant:")
        assert pair["chosen"][0]["content"] == record["chosen"][cut + len("\n\nAssistant:"):].strip()
        roles = [m["role"] for m in pair["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating turns
        assert record["chosen"].startswith("\n\nHuman: " + pair["prompt"][0]["content"])
    assert converted == len(data)
    multi = to_preference(next(r for r in data if r["chosen"].count("\n\nHuman:") > 2))
    assert len(multi["prompt"]) >= 5


def test_messages_sharegpt_prompt_and_implicit_shapes():
    sharegpt = {"system": "be nice", "conversations": [{"from": "human", "value": "q1"}, {"from": "gpt", "value": "a1"},
                                                       {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"}]}
    assert [m["role"] for m in to_sft(sharegpt)["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    messages = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    assert to_sft(messages) == messages
    assert to_sft({"instruction": "q", "output": "a", "history": [["q0", "a0"]]})["messages"][0]["content"] == "q0"
    strings = to_preference({"prompt": "q", "chosen": "good", "rejected": "bad"})
    assert strings == {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]}
    lists = to_preference({"prompt": [{"role": "user", "content": "q"}],
                           "chosen": [{"role": "assistant", "content": "good"}],
                           "rejected": [{"role": "assistant", "content": "bad"}]})
    assert lists == strings
    implicit = to_preference({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
                              "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]})
    assert implicit == strings


@pytest.mark.parametrize("record, message", [
    ({"foo": 1}, "unknown record shape"),
    ({"messages": [{"role": "user", "content": "q"}]}, "does not end with an assistant turn"),
    ({"messages": [{"role": "wizard", "content": "q"}]}, "unknown message role"),
    ({"messages": [{"role": "assistant", "content": "a"}]}, "alternate"),
    ({"conversations": "text"}, "must be a list"),
    ({"messages": [{"role": "user"}]}, "needs role/content"),
])
def test_bad_sft_shapes_raise(record, message):
    with pytest.raises(DataError, match=message):
        to_sft(record)


def test_bad_preference_shapes_raise():
    with pytest.raises(DataError, match="Assistant"):
        to_preference({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"})
    with pytest.raises(DataError, match="different prompts"):
        to_preference({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    with pytest.raises(DataError, match="end with a user turn"):
        to_preference({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "chosen": "x", "rejected": "y"})
    with pytest.raises(DataError, match="not an SFT"):
        to_sft({"prompt": "q", "chosen": "a", "rejected": "b"})
    assert to_preference({"prompt": "q", "chosen": {"from": "gpt", "value": "x"}, "rejected": "y"}) == {
        "prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "x"}],
        "rejected": [{"role": "assistant", "content": "y"}]}
