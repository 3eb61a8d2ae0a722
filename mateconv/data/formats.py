"""Conversion of the SFT and preference shapes users bring into the two internal formats (docs/design.md).

Internal SFT record:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
Internal preference record: {"prompt": [messages], "chosen": [{"role": "assistant", "content"}], "rejected": [...]}

Accepted shapes, detected per record by `detect_format`:
- "messages":      {"messages": [{"role", "content"}]}   (OpenAI / TRL conversational)
- "sharegpt":      {"conversations": [{"from", "value"}], "system"?}
- "alpaca":        {"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}
- "prompt_pref":   {"prompt", "chosen", "rejected"}, each a string or a message list (TRL)
- "sharegpt_pref": {"conversations", "chosen", "rejected"}, chosen/rejected a {"from", "value"} dict or a string
- "hh":            {"chosen", "rejected"} Anthropic full transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."
- "implicit_pref": {"chosen", "rejected"} full message lists sharing the prompt as their common prefix
"""
from __future__ import annotations

from typing import Any

from mateconv.data import DataError

ROLE_NAMES = {
    "system": "system",
    "user": "user", "human": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
}
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Messages = list[dict[str, str]]


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    keys = record.keys()
    if "chosen" in keys and "rejected" in keys:
        if "prompt" in keys:
            return "prompt_pref"
        if "conversations" in keys:
            return "sharegpt_pref"
        if isinstance(record["chosen"], str):
            return "hh"
        return "implicit_pref"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    raise DataError(f"unknown record shape with keys {sorted(keys)} (expected messages, conversations, "
                    "instruction/output, or prompt/chosen/rejected)")


def _message(turn: Any) -> dict[str, str]:
    """One turn in either {role, content} or {from, value} form, role names normalised."""
    if not isinstance(turn, dict):
        raise DataError(f"a message must be an object, got {type(turn).__name__}")
    role = turn.get("role", turn.get("from"))
    content = turn.get("content", turn.get("value"))
    if role is None or content is None:
        raise DataError(f"a message needs role/content or from/value, got keys {sorted(turn)}")
    if str(role).lower() not in ROLE_NAMES:
        raise DataError(f"unknown message role {role!r}")
    if not isinstance(content, str):
        raise DataError(f"message content must be a string, got {type(content).__name__}")
    return {"role": ROLE_NAMES[str(role).lower()], "content": content}


def _messages(turns: Any, system: Any = None) -> Messages:
    if not isinstance(turns, list):
        raise DataError(f"a conversation must be a list of messages, got {type(turns).__name__}")
    messages = [_message(turn) for turn in turns]
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": str(system)})
    return messages


def _check_conversation(messages: Messages, ends_with_assistant: bool) -> Messages:
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not body:
        raise DataError("conversation has no user/assistant turns")
    if any(m["role"] == "system" for m in body):
        raise DataError("a system message may only come first")
    expected = "user"
    for message in body:
        if message["role"] != expected:
            raise DataError(f"turns must alternate user/assistant starting with user, found {message['role']!r}")
        expected = "assistant" if expected == "user" else "user"
    last = body[-1]["role"]
    if ends_with_assistant and last != "assistant":
        raise DataError("conversation does not end with an assistant turn")
    if not ends_with_assistant and last != "user":
        raise DataError("preference prompt must end with a user turn")
    return messages


def _alpaca(record: dict) -> Messages:
    messages: Messages = []
    if record.get("system"):
        messages.append({"role": "system", "content": str(record["system"])})
    for pair in record.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError("alpaca history must be a list of [query, answer] pairs")
        messages += [{"role": "user", "content": str(pair[0])}, {"role": "assistant", "content": str(pair[1])}]
    instruction, extra = str(record["instruction"]), str(record.get("input") or "")
    user = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": str(record["output"])}]
    return messages


def to_sft(record: Any) -> dict[str, Messages]:
    """Any supported SFT shape -> {"messages": [...]} ending with an assistant turn."""
    shape = detect_format(record)
    if shape == "messages":
        messages = _messages(record["messages"], record.get("system"))
    elif shape == "sharegpt":
        messages = _messages(record["conversations"], record.get("system"))
    elif shape == "alpaca":
        messages = _alpaca(record)
    else:
        raise DataError(f"a {shape} preference record is not an SFT conversation")
    return {"messages": _check_conversation(messages, ends_with_assistant=True)}


def _response(value: Any) -> Messages:
    """A chosen/rejected side: a string, one message, or a message list -> [assistant message(s)]."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        value = [value]
    messages = _messages(value)
    if not messages or any(m["role"] != "assistant" for m in messages):
        raise DataError("chosen/rejected must hold assistant messages only")
    return messages


def split_hh(transcript: str) -> tuple[Messages, str]:
    """Anthropic transcript -> (prompt messages, final assistant reply), split at the last "\\n\\nAssistant:"."""
    cut = transcript.rfind(HH_ASSISTANT)
    if cut < 0:
        raise DataError("hh-rlhf transcript has no '\\n\\nAssistant:' turn")
    head, reply = transcript[:cut], transcript[cut + len(HH_ASSISTANT):]
    messages: Messages = []
    for i, part in enumerate(head.split(HH_HUMAN)):
        if i == 0:
            if part.strip():
                raise DataError("hh-rlhf transcript must start with '\\n\\nHuman:'")
            continue
        user, *answers = part.split(HH_ASSISTANT)
        messages.append({"role": "user", "content": user.strip()})
        for answer in answers:
            messages.append({"role": "assistant", "content": answer.strip()})
    return messages, reply.strip()


def to_preference(record: Any) -> dict[str, Messages]:
    """Any supported preference shape -> {"prompt": [...], "chosen": [...], "rejected": [...]}."""
    shape = detect_format(record)
    if shape == "prompt_pref":
        prompt = record["prompt"]
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _messages(prompt)
        if record.get("system") and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": str(record["system"])})
        chosen, rejected = _response(record["chosen"]), _response(record["rejected"])
    elif shape == "sharegpt_pref":
        prompt = _messages(record["conversations"], record.get("system"))
        chosen, rejected = _response(record["chosen"]), _response(record["rejected"])
    elif shape == "hh":
        if not isinstance(record["rejected"], str):
            raise DataError("hh-rlhf chosen and rejected must both be transcripts")
        prompt, chosen_text = split_hh(record["chosen"])
        rejected_prompt, rejected_text = split_hh(record["rejected"])
        if rejected_prompt != prompt:
            raise DataError("hh-rlhf chosen and rejected transcripts have different prompts")
        chosen, rejected = _response(chosen_text), _response(rejected_text)
    elif shape == "implicit_pref":
        full_chosen, full_rejected = _messages(record["chosen"]), _messages(record["rejected"])
        common = 0
        while (common < min(len(full_chosen), len(full_rejected)) - 1
               and full_chosen[common] == full_rejected[common]):
            common += 1
        prompt, chosen, rejected = full_chosen[:common], full_chosen[common:], full_rejected[common:]
        chosen, rejected = _response(chosen), _response(rejected)
    else:
        raise DataError(f"a {shape} record has no chosen/rejected pair")
    _check_conversation(prompt, ends_with_assistant=False)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
