"""Format conversion: every SFT/preference shape -> the internal formats, on the real shared files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mateconv.data import DataError
from mateconv.chat_format import render_chat
from mateconv.data.formats import TOOLS_PROMPT, detect_format, to_preference, to_sft
from mateconv.data.readers import iter_records

FACTORY = "hiyouga__LLaMA-Factory/data"


def turn(role: str, content) -> dict:
    return {"role": role, "content": content}


def minimind(user: str, reply, rejected_user: str, rejected_reply) -> dict:
    """A MiniMind dpo.jsonl pair: each side the whole conversation, user turn included."""
    return {"chosen": [turn("user", user), turn("assistant", reply)],
            "rejected": [turn("user", rejected_user), turn("assistant", rejected_reply)]}


DIFFERENT_PROMPTS = ("chosen and rejected have different prompts (the conversation before the last assistant reply "
                     "differs)")
# A user's preference file: good pairs of each shape between the bad records users sent, each with its one-line reason.
PAIRS_FILE = [
    minimind("Hi", "Hello!", "Hi", "What?"),
    (minimind("Hi", "Hello!", "Hi", "Hello!"), "chosen and rejected are the same"),
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    ({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Blue.\n"}, "chosen and rejected are the same"),
    (minimind("Hi", "Hello!", "Hey", "What?"), DIFFERENT_PROMPTS),
    {"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"},
    (minimind("Hi", None, "Hi", "What?"), "message content must be a string, got null"),
    ({"chosen": [turn("user", "Hi"), turn("assistant", "Hello!")]},
     "a preference record needs both chosen and rejected, 'rejected' is missing"),
    {"conversations": [{"from": "human", "value": "Capital of France?"}], "chosen": {"from": "gpt", "value": "Paris."},
     "rejected": {"from": "gpt", "value": "Rome."}},
    ({"prompt": "Say something.", "chosen": "Something.", "rejected": " "}, "empty rejected response"),
]
GOOD_PAIRS = [line for line in PAIRS_FILE if isinstance(line, dict)]


def write_pairs_file(path: Path) -> list[str]:
    """PAIRS_FILE as jsonl at path; returns the `file:line: reason` lines every reader must report for it."""
    records = [line if isinstance(line, dict) else line[0] for line in PAIRS_FILE]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return [f"{path}:{number}: {line[1]}" for number, line in enumerate(PAIRS_FILE, 1) if isinstance(line, tuple)]


def records(path: Path) -> list:
    return [record for _, _, record in iter_records(path)]


def test_alpaca_files_to_messages(shared_data):
    data = records(shared_data(f"{FACTORY}/alpaca_zh_demo.json"))
    assert len(data) == 1000 and {detect_format(r) for r in data} == {"alpaca"}
    with_input = next(r for r in data if r["input"])
    messages = to_sft(with_input)["messages"]
    assert messages == [{"role": "user", "content": f"{with_input['instruction']}\n{with_input['input']}"},
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
    skipped = []
    for number, record in enumerate(data, 1):
        try:
            pair = to_preference(record)
        except DataError as error:
            skipped.append(f"{number}: {error}")
            continue
        cut = record["chosen"].rfind("\n\nAssistant:")
        assert pair["chosen"][0]["content"] == record["chosen"][cut + len("\n\nAssistant:"):].strip()
        roles = [m["role"] for m in pair["prompt"]]
        assert roles[0] == "user" and roles[-1] == "user"
        assert all(a != b for a, b in zip(roles, roles[1:]))  # alternating turns
        assert record["chosen"].startswith("\n\nHuman: " + pair["prompt"][0]["content"])
    assert skipped == ["87: empty chosen response"]  # the one bad record stage 2 skips too
    multi = to_preference(next(r for r in data if r["chosen"].count("\n\nHuman:") > 2))
    assert len(multi["prompt"]) >= 5


def test_hh_rlhf_prompt_apart_from_its_replies_is_split_into_turns():
    """Dahoas/full-hh-rlhf and rm-static (DeepSpeed-Chat's, OpenRLHF's) keep the transcript up to the last
    "\n\nAssistant:" as `prompt`, the replies apart: the prompt was one user turn holding "Human:" and "Assistant:"."""
    record = {"prompt": "\n\nHuman: Hi there\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:",
              "response": " Fine, thanks.", "chosen": " Fine, thanks.", "rejected": " Go away."}
    pair = to_preference(record)
    assert pair["prompt"] == [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello."},
                              {"role": "user", "content": "How are you?"}]
    assert [pair[side][0]["content"].strip() for side in ("chosen", "rejected")] == ["Fine, thanks.", "Go away."]
    plain = to_preference({"prompt": "Human: a word I use", "chosen": "Yes", "rejected": "No"})  # not a transcript
    assert plain["prompt"] == [{"role": "user", "content": "Human: a word I use"}]


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
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                   {"role": "assistant", "content": "A cat."}]}, "message content has image_url parts: only text"),
])
def test_bad_sft_shapes_raise(record, message):
    with pytest.raises(DataError, match=message):
        to_sft(record)


def test_openai_text_parts_are_joined_as_the_server_joins_them():
    """By newlines, as vLLM joins them (and so our server, tests/test_serve_openai.py)."""
    parts = [{"type": "text", "text": "Translate:"}, {"type": "text", "text": "cat"}]
    record = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [
        {"type": "text", "text": "chat"}]}]}
    assert to_sft(record)["messages"] == [{"role": "user", "content": "Translate:\ncat"},
                                          {"role": "assistant", "content": "chat"}]
    pair = to_preference({"prompt": [{"role": "user", "content": parts}], "chosen": "chat", "rejected": "dog"})
    assert pair["prompt"] == [{"role": "user", "content": "Translate:\ncat"}]


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


def test_trl_prompt_completion_is_an_sft_conversation():
    assert to_sft({"prompt": "Capital of France?", "completion": "Paris."}) == {
        "messages": [turn("user", "Capital of France?"), turn("assistant", "Paris.")]}
    conversational = {"prompt": [turn("system", "Be brief."), turn("user", "Hi")],
                      "completion": [turn("assistant", "Hello!")]}
    assert to_sft(conversational)["messages"] == conversational["prompt"] + conversational["completion"]
    with pytest.raises(DataError, match="KTO feedback"):
        to_sft({"prompt": "Hi", "completion": "Go away.", "label": False})


def test_orca_dpo_pairs_question_and_system_are_the_prompt():
    record = {"system": "Be brief.", "question": "Capital of France?", "chosen": "Paris.", "rejected": "Rome."}
    assert to_preference(record) == {"prompt": [turn("system", "Be brief."), turn("user", "Capital of France?")],
                                     "chosen": [turn("assistant", "Paris.")], "rejected": [turn("assistant", "Rome.")]}


def test_ultrafeedback_sides_repeating_the_prompt_are_its_replies():
    """HuggingFaceH4/ultrafeedback_binarized: a prompt string, and chosen/rejected as the whole conversation."""
    question = "What is 2 plus 2?"
    record = {"prompt": question, "prompt_id": "p1", "chosen": [turn("user", question), turn("assistant", "4")],
              "rejected": [turn("user", question), turn("assistant", "5")], "messages": [turn("user", question)],
              "score_chosen": 8.0, "score_rejected": 3.0}
    assert detect_format(record) == "prompt_pref"
    assert to_preference(record) == {"prompt": [turn("user", question)], "chosen": [turn("assistant", "4")],
                                     "rejected": [turn("assistant", "5")]}


@pytest.mark.parametrize("record, reason", [line for line in PAIRS_FILE if isinstance(line, tuple)] + [
    ({"chosen": [turn("user", "Hi"), turn("assistant", "a"), turn("user", "more"), turn("assistant", "b")],
      "rejected": [turn("user", "Hi"), turn("assistant", "x"), turn("user", "more"), turn("assistant", "y")]},
     DIFFERENT_PROMPTS),
    ({"rejected": "no"}, "a preference record needs both chosen and rejected, 'chosen' is missing"),
    ({"prompt": "q", "chosen": [turn("assistant", "a"), turn("assistant", "b")], "rejected": "c"},
     "chosen is a conversation whose turns before the reply are not the prompt"),
    ({"prompt": "q", "chosen": [turn("user", "q"), turn("assistant", "a")],
      "rejected": [turn("user", "another question"), turn("assistant", "b")]},
     "rejected is a conversation whose turns before the reply are not the prompt"),
    ({"chosen": [turn("user", "Hi")], "rejected": [turn("user", "Hi"), turn("assistant", "x")]},
     "chosen does not end with an assistant reply"),
])
def test_bad_preference_records_name_the_problem(record, reason):
    with pytest.raises(DataError) as error:
        to_preference(record)
    assert str(error.value) == reason


def test_unknown_shape_lists_the_preference_shapes():
    with pytest.raises(DataError) as error:
        detect_format({"foo": 1})
    assert str(error.value) == ("unknown record shape with keys ['foo'] (expected messages, conversations, "
                                "instruction/output, prompt/completion, prompt/chosen/rejected, or chosen/rejected "
                                "as in MiniMind/TRL and hh-rlhf)")
    with pytest.raises(DataError, match="^message value must be a string, got null$"):
        to_sft({"conversations": [{"from": "human", "value": None}]})


KTO_REASON = ("is not supported: one rated reply is not an SFT example (an undesirable reply must not be imitated) "
              "nor a DPO chosen/rejected pair; for SFT keep only the desirable records, without the label")


@pytest.mark.parametrize("record, key", [
    ({"messages": [turn("user", "Hi"), turn("assistant", "Go away.")], "label": False}, "'label': false"),
    ({"messages": [turn("user", "Hi"), turn("assistant", "Hello!")], "label": True}, "'label': true"),
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away."}], "kto_tag": False},
     "'kto_tag': false"),
    ({"instruction": "Greet me.", "input": "", "output": "Go away.", "kto_tag": False}, "'kto_tag': false"),
    ({"prompt": "Hi", "completion": "Go away.", "label": False}, "'label': false"),
])
def test_kto_feedback_is_refused_not_imitated(record, key):
    for convert in (detect_format, to_sft, to_preference):
        with pytest.raises(DataError) as error:
            convert(record)
        assert str(error.value) == f"KTO feedback ({key}) {KTO_REASON}"


def test_a_label_that_is_not_kto_feedback_is_kept():
    record = {"messages": [turn("user", "Hi"), turn("assistant", "Hello!")], "label": "greeting"}
    assert to_sft(record)["messages"] == record["messages"]


def test_alpaca_preference_is_a_pair_with_system_and_history():
    record = {"system": "Be brief.", "history": [["Hi", "Hello!"]], "instruction": "Translate to French",
              "input": "cat", "chosen": "chat", "rejected": "cat"}
    assert detect_format(record) == "alpaca_pref"
    assert to_preference(record) == {
        "prompt": [turn("system", "Be brief."), turn("user", "Hi"), turn("assistant", "Hello!"),
                   turn("user", "Translate to French\ncat")],
        "chosen": [turn("assistant", "chat")], "rejected": [turn("assistant", "cat")]}
    older = {"instruction": "Translate to French", "input": "cat", "output": ["chat", "cat"]}
    assert detect_format(older) == "alpaca_pref"
    assert to_preference(older) == {"prompt": [turn("user", "Translate to French\ncat")],
                                    "chosen": [turn("assistant", "chat")], "rejected": [turn("assistant", "cat")]}
    with pytest.raises(DataError, match="not an SFT"):
        to_sft(older)


@pytest.mark.parametrize("record, convert, reason", [
    ({"instruction": "q", "output": None}, to_sft, "alpaca output must be a string, got null"),
    ({"instruction": None, "input": "", "output": "a"}, to_sft, "alpaca instruction must be a string, got null"),
    ({"instruction": None, "output": "a"}, to_sft, "alpaca instruction must be a string, got null"),
    ({"instruction": None, "chosen": "a", "rejected": "b"}, to_preference,
     "alpaca instruction must be a string, got null"),
    ({"instruction": "q", "output": {"text": "a"}}, to_sft, "alpaca output must be a string, got dict"),
    ({"instruction": "q", "output": "a", "history": [["q0", None]]}, to_sft,
     "alpaca history answer must be a string, got null"),
    ({"instruction": "q", "output": "a", "history": [[1, "a0"]]}, to_sft,
     "alpaca history query must be a string, got int"),
    ({"instruction": "q", "input": 5, "output": "a"}, to_sft, "alpaca input must be a string, got int"),
    ({"instruction": "q", "output": "a", "system": ["be nice"]}, to_sft, "system must be a string, got list"),
    ({"instruction": "q", "output": ["a", "b", "c"]}, to_preference,
     "alpaca ranking output must be [chosen, rejected], got a list of 3"),
    ({"instruction": "q", "output": ["a", None]}, to_preference, "alpaca rejected must be a string, got null"),
    ({"instruction": "q", "chosen": "a", "rejected": "a"}, to_preference, "chosen and rejected are the same"),
])
def test_bad_alpaca_values_name_the_problem(record, convert, reason):
    with pytest.raises(DataError) as error:
        convert(record)
    assert str(error.value) == reason


def test_alpaca_null_instruction_with_the_prompt_in_input_is_kept():
    """As LLaMA-Factory reads it: a null instruction leaves the input as the user turn (with no input, the record
    names its null instruction, not an "empty user message")."""
    record = {"instruction": None, "input": "Capital of France?", "output": "Paris."}
    assert to_sft(record)["messages"][0] == {"role": "user", "content": "Capital of France?"}


WEATHER_TOOL = {"name": "weather", "description": "Today's weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}
CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def tools_system(system: str) -> str:
    return f"{system}\n\n{TOOLS_PROMPT.format(tools=json.dumps(WEATHER_TOOL))}" if system else \
        TOOLS_PROMPT.format(tools=json.dumps(WEATHER_TOOL))


def test_llama_factory_function_call_and_observation_turns():
    record = {"system": "Be brief.", "tools": json.dumps([WEATHER_TOOL]), "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"sky": "sunny"}'},
        {"from": "gpt", "value": "Sunny."}]}
    assert to_sft(record)["messages"] == [
        turn("system", tools_system("Be brief.")), turn("user", "Weather in Paris?"), turn("assistant", CALL),
        turn("user", '<tool_response>\n{"sky": "sunny"}\n</tool_response>'), turn("assistant", "Sunny.")]


def test_openai_tool_calls_tool_turns_and_reasoning():
    call = {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    record = {"tools": [{"type": "function", "function": WEATHER_TOOL}], "messages": [
        turn("user", "Weather in Paris and Rome?"),
        {"role": "assistant", "content": None, "reasoning_content": "\nTwo cities: two calls.\n",
         "tool_calls": [call, {**call, "function": {"name": "weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "Both came back."}]}
    messages = to_sft(record)["messages"]
    assert messages[0]["content"].startswith("# Tools\n") and json.dumps(record["tools"][0]) in messages[0]["content"]
    assert messages[1:] == [
        turn("user", "Weather in Paris and Rome?"),
        turn("assistant", f"<think>\nTwo cities: two calls.\n</think>\n\n{CALL}\n{CALL.replace('Paris', 'Rome')}"),
        turn("user", "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"),
        turn("assistant", "<think>\nBoth came back.\n</think>\n\nParis sunny, Rome rain.")]
    assert to_sft({"messages": messages}) == {"messages": messages}  # stage 3 converts stage 2's output again
    text, spans = render_chat(messages)
    trained = "".join(text[start:end] for start, end in spans)
    assert CALL in trained and "Both came back." in trained and "sunny\n</tool_response>" not in trained


def test_openai_developer_role_and_legacy_function_calling():
    """OpenAI's fine-tuning data: `developer` is the system role; legacy records carry `functions`, an assistant
    `function_call` and `function` results; an assistant turn with calls may leave `content` out."""
    call = {"name": "weather", "arguments": '{"city": "Paris"}'}
    legacy = {"functions": [WEATHER_TOOL], "messages": [
        turn("developer", "Be brief."), turn("user", "Weather in Paris?"), {"role": "assistant", "function_call": call},
        {"role": "function", "name": "weather", "content": "sunny"}, turn("assistant", "Sunny.")]}
    tools = {"messages": [turn("user", "Weather in Paris?"),
                          {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": call}]},
                          {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, turn("assistant", "Sunny.")]}
    after_system = [turn("user", "Weather in Paris?"), turn("assistant", CALL),
                    turn("user", "<tool_response>\nsunny\n</tool_response>"), turn("assistant", "Sunny.")]
    assert to_sft(legacy)["messages"] == [turn("system", tools_system("Be brief."))] + after_system
    assert to_sft(tools)["messages"] == after_system


def test_minimind_tools_on_the_system_message_and_a_pair_after_a_tool_result():
    record = {"conversations": [{"role": "system", "content": "", "functions": [WEATHER_TOOL]},
                                turn("user", "Weather in Paris?"), turn("assistant", CALL), turn("tool", "sunny"),
                                turn("assistant", "Sunny.")]}
    assert to_sft(record)["messages"][0] == turn("system", tools_system(""))
    pair = to_preference({"conversations": record["conversations"][:4], "chosen": {"from": "gpt", "value": "Sunny."},
                          "rejected": {"from": "gpt", "value": "Snow."}})
    assert pair["prompt"][-1] == turn("user", "<tool_response>\nsunny\n</tool_response>")


@pytest.mark.parametrize("record, reason", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "weather(Paris)"}]},
     "tool call is not valid JSON: Expecting value"),
    ({"messages": [turn("user", "q"), {"role": "assistant", "content": None, "tool_calls": [{"arguments": "{}"}]}]},
     "a tool call must be an object with a string 'name'"),
    ({"messages": [turn("user", "q"), turn("assistant", "a")], "tools": "not json"},
     "tools is not valid JSON: Expecting value"),
    ({"messages": [turn("user", "q"), {"role": "assistant", "content": "a", "reasoning_content": 3}]},
     "reasoning_content must be a string, got int"),
    ({"messages": [turn("user", "q"), turn("assistant", None)]}, "message content must be a string, got null"),
    ({"messages": [turn("user", "q"), turn("tool", "sunny"), turn("assistant", "a")]},
     "turns must alternate user/assistant"),
])
def test_bad_tool_turns_name_the_problem(record, reason):
    with pytest.raises(DataError) as error:
        to_sft(record)
    assert str(error.value).startswith(reason)


def test_openai_weight_zero_assistant_turns_are_context_not_trained(tmp_path):
    """OpenAI's fine-tuning format marks an assistant message not to train with `"weight": 0`: stage 3 trained it
    like every other reply, so a conversation's bad earlier answers were imitated."""
    from mateconv.data.prepare import prepare

    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "weight": 0},
                           {"role": "user", "content": "Are you sure?"}, {"role": "assistant", "content": "4, sorry."}]}
    (tmp_path / "sft.jsonl").write_text(json.dumps(record) + "\n")
    prepare({"sft": [tmp_path / "sft.jsonl"]}, tmp_path / "out", val_frac=0, progress=False)
    [prepared] = [json.loads(line) for line in (tmp_path / "out" / "sft_train.jsonl").open()]
    text, spans = render_chat(prepared["messages"])
    assert [text[start:end] for start, end in spans] == ["4, sorry.<|im_end|>"]
    assert "5<|im_end|>" in text
    with pytest.raises(DataError, match=r"^an assistant message's weight must be 0 \(not trained\) or 1, got 0.5$"):
        to_sft({"messages": [record["messages"][0], {**record["messages"][1], "weight": 0.5}]})


def test_tool_conversations_render_alike_in_the_chat_template(tiny_tokenizer):
    from transformers import AutoTokenizer

    record = {"tools": [WEATHER_TOOL], "conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": json.dumps(
            {"name": "weather", "arguments": {"city": "Paris"}})}, {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "Sunny."}]}
    messages = to_sft(record)["messages"]
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert tokenizer.apply_chat_template(messages, tokenize=False) == render_chat(messages)[0]
    prompt = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(messages[:2], add_generation_prompt=True)[0]
