"""Conversion of the SFT and preference shapes users bring into the two internal formats (docs/design.md).

Internal SFT record:        {"messages": [{"role": "system"|"user"|"assistant", "content": str, "weight"?: 0}, ...]}
Internal preference record: {"prompt": [messages], "chosen": [{"role": "assistant", "content"}], "rejected": [...]}

Accepted shapes, detected per record by `detect_format`:
- "messages":      {"messages": [{"role", "content"}]}   (OpenAI / TRL conversational)
- "sharegpt":      {"conversations": [{"from", "value"}], "system"?}
- "alpaca":        {"instruction", "input"?, "output", "system"?, "history"?: [[query, answer], ...]}
- "alpaca_pref":   the same with "chosen" and "rejected" instead of "output", or "output": [chosen, rejected]
                   (LLaMA-Factory ranking data)
- "prompt_completion": {"prompt", "completion"}, each a string or a message list (TRL), "system"?
- "prompt_pref":   {"prompt", "chosen", "rejected"}, each a string or a message list (TRL; sides that repeat the
                   prompt's turns first, as UltraFeedback binarized's, are cut to the reply; a prompt that is an
                   hh-rlhf transcript up to its last "\\n\\nAssistant:", as Dahoas/full-hh-rlhf's, is split into
                   turns); "question" for "prompt" and a "system" (Intel/orca_dpo_pairs)
- "sharegpt_pref": {"conversations", "chosen", "rejected"}, chosen/rejected a {"from", "value"} dict or a string
- "hh":            {"chosen", "rejected"} Anthropic full transcripts "\\n\\nHuman: ... \\n\\nAssistant: ..."
- "implicit_pref": {"chosen", "rejected"} full message lists (MiniMind / TRL) that differ only in the last reply

KTO feedback (one reply rated by LLaMA-Factory's `kto_tag` or TRL's boolean `label`) and multimodal records
(`MEDIA_KEYS`) are refused by `detect_format`.

Tool use and reasoning become text in the three ChatML roles, as MiniMind's (Qwen's) template writes them, so that
rendering and the loss mask (only assistant turns train) need nothing new:
- `tools` (a list, or LLaMA-Factory's JSON text of one; OpenAI's legacy `functions`; MiniMind: `tools`/`functions` on
  the system message) are appended to the system prompt;
- a call (LLaMA-Factory `function_call` turn, OpenAI `tool_calls` or legacy `function_call` on an assistant turn) is
  an assistant turn holding `<tool_call>\n{"name", "arguments"}\n</tool_call>` blocks, and so is trained;
- tool results (`observation`, `tool`, OpenAI's legacy `function` turns) in a row are one user turn of
  `<tool_response>\n...\n</tool_response>` blocks, not trained;
- an assistant turn's `reasoning_content` is written before its content as `<think>\n...\n</think>\n\n`.

An assistant message with OpenAI's fine-tuning `"weight": 0` keeps it: the turn is context, not trained (`render_chat`).

`to_preference` (with `check_pair`) alone decides what a valid preference pair is: stage 2 and the tokenizer of
stages 3 and 9 (`9.train_dpo.py --pairs_path FILE`) skip the records it refuses, with its reason.
"""
from __future__ import annotations

import json
from itertools import groupby
from typing import Any

from mateconv.data import DataError, json_type

ROLE_NAMES = {
    "system": "system", "developer": "system",  # OpenAI's newer name for the system role
    "user": "user", "human": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "chatgpt": "assistant", "model": "assistant",
}
TOOL_RESULT_ROLES = ("tool", "observation", "function")  # OpenAI / MiniMind, LLaMA-Factory, OpenAI's legacy
TOOL_CALL_ROLE = "function_call"  # LLaMA-Factory
TOOLS_PROMPT = ("# Tools\n\nYou may call these functions, described as JSON schemas:\n<tools>\n{tools}\n</tools>\n\n"
                "To call one, reply with <tool_call>\n{{\"name\": <function name>, \"arguments\": <JSON object>}}\n"
                "</tool_call>; its result comes back between <tool_response> and </tool_response>.")
MEDIA_KEYS = ("images", "videos", "audios", "image")  # LLaMA-Factory's multimodal columns, LLaVA's image
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Messages = list[dict[str, str]]


def _refuse_kto(record: dict) -> None:
    key = "kto_tag" if "kto_tag" in record else "label" if isinstance(record.get("label"), bool) else None
    if key:
        raise DataError(f"KTO feedback ('{key}': {json.dumps(record[key])}) is not supported: one rated reply is not "
                        "an SFT example (an undesirable reply must not be imitated) nor a DPO chosen/rejected pair; "
                        "for SFT keep only the desirable records, without the label")


def _refuse_media(record: dict) -> None:
    key = next((key for key in MEDIA_KEYS if record.get(key)), None)
    if key:
        raise DataError(f"'{key}' holds media: a text-only model would train on its placeholders (<image>, <video>, "
                        "<audio>) as words; keep the records without media")


def detect_format(record: Any) -> str:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {json_type(record)}")
    _refuse_kto(record)
    _refuse_media(record)
    keys = record.keys()
    if "chosen" in keys and "rejected" in keys:
        if "prompt" in keys or "question" in keys:  # question: Intel/orca_dpo_pairs
            return "prompt_pref"
        if "conversations" in keys:
            return "sharegpt_pref"
        if "instruction" in keys:
            return "alpaca_pref"
        if isinstance(record["chosen"], str):
            return "hh"
        return "implicit_pref"
    if "chosen" in keys or "rejected" in keys:
        missing = "rejected" if "chosen" in keys else "chosen"
        raise DataError(f"a preference record needs both chosen and rejected, '{missing}' is missing")
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca_pref" if isinstance(record["output"], list) else "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    raise DataError(f"unknown record shape with keys {sorted(keys)} (expected messages, conversations, "
                    "instruction/output, prompt/completion, prompt/chosen/rejected, or chosen/rejected as in "
                    "MiniMind/TRL and hh-rlhf)")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{what} must be a string, got {json_type(value)}")
    return value


def _json(value: Any, what: str) -> Any:
    """`value`, parsed first when it is JSON text (LLaMA-Factory and OpenAI store tools and arguments so)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise DataError(f"{what} is not valid JSON: {error.msg}") from None


def _tool_calls_text(calls: Any) -> str:
    """One call or a list of calls ({"name", "arguments"}, or OpenAI's {"function": {...}}) as <tool_call> blocks."""
    calls = _json(calls, "tool call")
    blocks = []
    for call in calls if isinstance(calls, list) else [calls]:
        call = call.get("function", call) if isinstance(call, dict) else call
        if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
            raise DataError("a tool call must be an object with a string 'name'")
        arguments = _json(call.get("arguments", {}), f"the arguments of tool call {call['name']!r}")
        blocks.append(f"<tool_call>\n{json.dumps({'name': call['name'], 'arguments': arguments}, ensure_ascii=False)}"
                      "\n</tool_call>")
    return "\n".join(blocks)


def _system_text(system: str, tools: Any) -> str:
    """The system prompt with the tool definitions, if any, after it."""
    tools = _json(tools, "tools")
    if not tools:
        return system
    tools = tools if isinstance(tools, list) else [tools]
    if not all(isinstance(tool, dict) for tool in tools):
        raise DataError("tools must be a list of JSON objects")
    listed = TOOLS_PROMPT.format(tools="\n".join(json.dumps(_as_listed(tool), ensure_ascii=False) for tool in tools))
    return f"{system}\n\n{listed}" if system else listed


def _as_listed(tool: dict) -> dict:
    """A tool as the model sees it: OpenAI's `strict` tells the server how to decode calls, not the model anything."""
    function = tool.get("function")
    if isinstance(function, dict) and "strict" in function:
        return {**tool, "function": {key: value for key, value in function.items() if key != "strict"}}
    return tool


def _calls(turn: dict) -> Any:
    """An assistant turn's tool calls: OpenAI's `tool_calls`, or its legacy single `function_call`."""
    return turn.get("tool_calls") or turn.get("function_call")


def _assistant_text(turn: dict, content: Any, content_key: str) -> str:
    """What the model is trained to write: reasoning in <think>, the reply, then its tool calls."""
    calls = _calls(turn)
    reply = "" if content is None and calls else _text(content, f"message {content_key}")
    text = "\n".join(part for part in (reply, _tool_calls_text(calls) if calls else "") if part)
    reasoning = turn.get("reasoning_content")
    if reasoning in (None, ""):
        return text
    thought, text = _text(reasoning, "reasoning_content").strip("\n"), text.lstrip("\n")
    return f"<think>\n{thought}\n</think>\n\n{text}"


def _joined_parts(content: Any, content_key: str) -> Any:
    """OpenAI's list of content parts as one string, its text parts joined by newlines as vLLM joins them for a chat
    template that takes text (and so our server); other content as it is."""
    if not isinstance(content, list):
        return content
    kinds = {part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content} - {"text"}
    if kinds:
        raise DataError(f"message {content_key} has {', '.join(sorted(map(str, kinds)))} parts: only text parts are "
                        "supported")
    return "\n".join(_text(part.get("text"), f"a text part of message {content_key}") for part in content)


def _message(turn: Any) -> dict[str, str]:
    """One turn in either {role, content} or {from, value} form, role names normalised, calls and reasoning written
    into the content; a tool result keeps the role "tool" until `_messages` merges it into a user turn."""
    if not isinstance(turn, dict):
        raise DataError(f"a message must be an object, got {json_type(turn)}")
    role_key = "role" if "role" in turn else "from"
    content_key = "content" if "content" in turn else "value"
    if role_key not in turn or (content_key not in turn and not _calls(turn)):
        raise DataError(f"a message needs role/content or from/value, got keys {sorted(turn)}")
    role, content = str(turn[role_key]).lower(), _joined_parts(turn.get(content_key), content_key)
    if role in TOOL_RESULT_ROLES:
        return {"role": "tool", "content": _text(content, f"message {content_key}")}
    if role == TOOL_CALL_ROLE:
        return {"role": "assistant", "content": _tool_calls_text(_text(content, f"message {content_key}"))}
    if role not in ROLE_NAMES:
        raise DataError(f"unknown message role {turn[role_key]!r}")
    role = ROLE_NAMES[role]
    if role == "assistant":
        message = {"role": role, "content": _assistant_text(turn, content, content_key)}
        weight = turn.get("weight", 1)
        if weight not in (0, 1) or isinstance(weight, bool):
            raise DataError(f"an assistant message's weight must be 0 (not trained) or 1, got {json.dumps(weight)}")
        return {**message, "weight": 0} if weight == 0 else message
    content = _text(content, f"message {content_key}")
    if role == "system":
        content = _system_text(content, turn.get("tools") or turn.get("functions"))
    return {"role": role, "content": content}


def _merge_tool_results(messages: Messages) -> Messages:
    """Each run of tool results -> one user turn of <tool_response> blocks (ChatML here has no tool role)."""
    merged: Messages = []
    for is_result, run in groupby(messages, key=lambda message: message["role"] == "tool"):
        if is_result:
            blocks = [f"<tool_response>\n{message['content']}\n</tool_response>" for message in run]
            merged.append({"role": "user", "content": "\n".join(blocks)})
        else:
            merged += run
    return merged


def _with_system(messages: Messages, record: dict) -> Messages:
    """The record's `system` (unless the conversation opens with its own) and `tools` in the first, system, turn."""
    if record.get("system") and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": _text(record["system"], "system")})
    tools = record.get("tools") or record.get("functions")  # functions: OpenAI's legacy name
    if tools:
        opens_with_system = bool(messages) and messages[0]["role"] == "system"
        system = _system_text(messages[0]["content"] if opens_with_system else "", tools)
        if opens_with_system:
            messages[0]["content"] = system
        elif system:
            messages.insert(0, {"role": "system", "content": system})
    return messages


def _messages(turns: Any, record: dict | None = None, what: str = "a conversation") -> Messages:
    """A conversation's turns; with `record`, its `system` and `tools` fields too."""
    if not isinstance(turns, list):
        raise DataError(f"{what} must be a list of messages, got {json_type(turns)}")
    messages = _merge_tool_results([_message(turn) for turn in turns])
    return _with_system(messages, record) if record else messages


def chat_messages(turns: Any, tools: Any = None) -> Messages:
    """An OpenAI chat request's messages (assistant `tool_calls` and `reasoning_content`, `tool` turns) and `tools`
    in the three ChatML roles, converted as an SFT record's are: the server's prompt is the text SFT trained on."""
    return _messages(turns, {"tools": tools})


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


def _alpaca_prompt(record: dict) -> Messages:
    """System, history and the user turn (instruction and input joined) of an Alpaca record."""
    messages: Messages = []
    for pair in record.get("history") or []:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError("alpaca history must be a list of [query, answer] pairs")
        messages += [{"role": "user", "content": _text(pair[0], "alpaca history query")},
                     {"role": "assistant", "content": _text(pair[1], "alpaca history answer")}]
    parts = [] if record.get("input") is None else [_text(record["input"], "alpaca input")]
    if record["instruction"] is not None or not any(parts):  # LLaMA-Factory takes the input alone as the prompt
        parts.insert(0, _text(record["instruction"], "alpaca instruction"))
    messages.append({"role": "user", "content": "\n".join(part for part in parts if part)})
    return _with_system(messages, record)


def _alpaca_replies(record: dict) -> tuple[Messages, Messages]:
    """The chosen and rejected replies of LLaMA-Factory ranking data: its chosen/rejected columns, or the older
    "output": [chosen, rejected]."""
    replies = (record["chosen"], record["rejected"]) if "chosen" in record else record["output"]
    if len(replies) != 2:
        raise DataError(f"alpaca ranking output must be [chosen, rejected], got a list of {len(replies)}")
    return tuple([{"role": "assistant", "content": _text(reply, f"alpaca {side}")}]
                 for reply, side in zip(replies, ("chosen", "rejected")))


def _turns(value: Any, role: str, what: str) -> Messages:
    """A TRL field: a string (one turn of `role`) or a message list."""
    return [{"role": role, "content": _text(value, what)}] if not isinstance(value, list) else _messages(value)


def to_sft(record: Any) -> dict[str, Messages]:
    """Any supported SFT shape -> {"messages": [...]} ending with an assistant turn."""
    return {"messages": check_turns(_check_conversation(sft_messages(record), ends_with_assistant=True))}


def sft_messages(record: Any) -> Messages:
    """Any supported SFT shape's messages, unchecked: a held-out prompt may end with its user turn."""
    shape = detect_format(record)
    if shape == "messages":
        messages = _messages(record["messages"], record)
    elif shape == "sharegpt":
        messages = _messages(record["conversations"], record)
    elif shape == "alpaca":
        messages = _alpaca_prompt(record) + [{"role": "assistant", "content": _text(record["output"], "alpaca output")}]
    elif shape == "prompt_completion":
        messages = _with_system(_turns(record["prompt"], "user", "prompt") +
                                _turns(record["completion"], "assistant", "completion"), record)
    else:
        raise DataError(f"a {shape} preference record is not an SFT conversation")
    return messages


def check_turns(messages: Messages) -> Messages:
    """No empty user or assistant turn (an empty reply would teach answering with nothing); stage 2 applies it again
    to its normalised text."""
    empty = next((i for i, m in enumerate(messages, 1) if m["role"] != "system" and not m["content"].strip()), None)
    if empty:
        raise DataError(f"empty {messages[empty - 1]['role']} message (turn {empty} of {len(messages)})")
    return messages


def _response(value: Any, side: str) -> Messages:
    """A chosen/rejected side given apart from the prompt: a string, one message, or a one-message list."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    messages = _messages([value] if isinstance(value, dict) else value)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{side} must be one assistant message, got roles {[m['role'] for m in messages]}")
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


def _prompt_and_reply(value: Any, side: str) -> tuple[Messages, Messages]:
    """A chosen/rejected side given as a whole conversation (hh-rlhf transcript, message list) -> (prompt, [reply])."""
    if isinstance(value, str):
        prompt, reply = split_hh(value)
        return prompt, [{"role": "assistant", "content": reply}]
    messages = _messages(value, what=side)
    if not messages or messages[-1]["role"] != "assistant":
        raise DataError(f"{side} does not end with an assistant reply")
    return messages[:-1], messages[-1:]


def _preference_prompt(value: Any) -> Messages:
    """A prompt/chosen/rejected record's prompt: a string (one user turn), a message list, or an hh-rlhf transcript
    up to the "\n\nAssistant:" the replies follow (Dahoas/full-hh-rlhf, rm-static), split into its turns."""
    if isinstance(value, str) and value.startswith(HH_HUMAN) and value.rstrip().endswith(HH_ASSISTANT):
        return split_hh(value)[0]
    return _turns(value, "user", "prompt")


def _reply_after(prompt: Messages, value: Any, side: str) -> Messages:
    """A side of a prompt/chosen/rejected record: the reply alone, or the whole conversation with the prompt's turns
    first (UltraFeedback binarized), which must then be the prompt's."""
    if not (isinstance(value, list) and len(value) > 1):
        return _response(value, side)
    head, reply = _prompt_and_reply(value, side)
    if [m for m in head if m["role"] != "system"] != [m for m in prompt if m["role"] != "system"]:
        raise DataError(f"{side} is a conversation whose turns before the reply are not the prompt")
    return reply


def check_pair(pair: dict[str, Messages]) -> dict[str, Messages]:
    """The rules on the replies of a converted pair; stage 2 applies them again to its normalised text."""
    for side in ("chosen", "rejected"):
        if not pair[side][0]["content"].strip():
            raise DataError(f"empty {side} response")
    if pair["chosen"][0]["content"].strip() == pair["rejected"][0]["content"].strip():
        raise DataError("chosen and rejected are the same")
    return pair


def to_preference(record: Any) -> dict[str, Messages]:
    """Any supported preference shape -> {"prompt": [...], "chosen": [assistant], "rejected": [assistant]}."""
    shape = detect_format(record)
    if shape == "prompt_pref":
        prompt = _with_system(_preference_prompt(record["prompt" if "prompt" in record else "question"]), record)
        chosen, rejected = (_reply_after(prompt, record[side], side) for side in ("chosen", "rejected"))
    elif shape == "sharegpt_pref":
        prompt = _messages(record["conversations"], record)
        chosen, rejected = _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    elif shape == "alpaca_pref":
        prompt = _alpaca_prompt(record)
        chosen, rejected = _alpaca_replies(record)
    elif shape in ("hh", "implicit_pref"):
        prompt, chosen = _prompt_and_reply(record["chosen"], "chosen")
        rejected_prompt, rejected = _prompt_and_reply(record["rejected"], "rejected")
        if rejected_prompt != prompt:
            raise DataError("chosen and rejected have different prompts (the conversation before the last assistant "
                            "reply differs)")
    else:
        raise DataError(f"a {shape} record has no chosen/rejected pair")
    _check_conversation(prompt, ends_with_assistant=False)
    return check_pair({"prompt": prompt, "chosen": chosen, "rejected": rejected})
