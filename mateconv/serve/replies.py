"""A reply's text as clients read it: cut at stop strings, and split into reasoning, content and tool calls as
it streams."""
from __future__ import annotations

import json
import uuid
from typing import Any

THINK = ("<think>", "</think>")  # the chat format's reasoning and tool-call blocks (mateconv/data/formats.py)
TOOL_CALL = ("<tool_call>", "</tool_call>")


def held_tail(text: str, marker: str) -> int:
    """The length of the longest end of `text` that could be the start of `marker` (held back while streaming)."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


class StopScanner:
    """Cuts streamed text at the first stop string, holding back any tail that could still become one."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        self.pending += piece
        hits = [self.pending.find(stop) for stop in self.stops if stop in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[: min(hits)], "", True
            return out
        hold = max((held_tail(self.pending, stop) for stop in self.stops), default=0)
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextChannel:
    """Content or reasoning as it streams, a run of whitespace held back until more text follows: the whitespace the
    chat format puts around <think> and <tool_call> blocks goes with them."""

    def __init__(self):
        self.held = ""
        self.sent = False

    def add(self, text: str, trim: bool) -> str:
        text = self.held + text
        body = text.rstrip()
        if not body:
            self.held = text
            return ""
        self.held = text[len(body):]
        if trim and not self.sent:
            body = body.lstrip()
        self.sent = True
        return body

    def end(self, trim: bool) -> str:
        tail, self.held = ("" if trim else self.held), ""
        return tail


def parse_tool_call(block: str) -> dict[str, str] | None:
    """{"name", "arguments": JSON text} from the JSON inside a <tool_call> block; None when it is not a call."""
    try:
        call = json.loads(block)
    except json.JSONDecodeError:
        return None
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)
            and isinstance(call.get("arguments", {}), dict)):
        return None
    return {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}), ensure_ascii=False)}


class ReplyParser:
    """Splits a chat reply, fed in pieces as it is generated, into what OpenAI clients read: `reasoning` (a
    leading <think> block), `content`, and `tool_call`s (<tool_call>{"name", "arguments"}</tool_call> blocks, looked
    for only when the request lists tools; a block that is not such JSON stays text). `feed` and `finish` return
    events (kind, text or {"name", "arguments"}) in reply order; the whole reply fed at once gives the same ones."""

    def __init__(self, parse_calls: bool):
        self.parse_calls = parse_calls
        self.mode = "start"  # then "think", "content" or "call" (inside a <tool_call> block)
        self.pending = ""
        self.content, self.reasoning = TextChannel(), TextChannel()
        self.trim = False  # a <think> or call block was taken out: the content's outer whitespace goes too
        self.events: list[tuple[str, Any]] = []

    def feed(self, piece: str) -> list[tuple[str, Any]]:
        self.pending += piece
        while self._step():
            pass
        return self._take()

    def finish(self) -> list[tuple[str, Any]]:
        leftover, self.pending = self.pending, ""
        if self.mode == "think":
            self._say("reasoning", self.reasoning.add(leftover, trim=True))
        else:  # an unclosed <tool_call> block is text
            self._say("content", self.content.add((TOOL_CALL[0] if self.mode == "call" else "") + leftover, self.trim))
        self._say("content", self.content.end(self.trim))
        return self._take()

    def _step(self) -> bool:
        """One move through the pending text; False when it needs more."""
        if self.mode == "start":
            if self.pending.startswith(THINK[0]):
                self.pending, self.mode, self.trim = self.pending[len(THINK[0]):], "think", True
                return True
            if THINK[0].startswith(self.pending):
                return False
            self.mode = "content"
            return True
        if self.mode == "think":
            before, found = self._until(THINK[1])
            self._say("reasoning", self.reasoning.add(before, trim=True))
            self.mode = "content" if found else "think"
            return found
        if self.mode == "content":
            if self.parse_calls:
                before, found = self._until(TOOL_CALL[0])
            else:
                before, found, self.pending = self.pending, False, ""
            self._say("content", self.content.add(before, self.trim))
            self.mode = "call" if found else "content"
            return found
        end = self.pending.find(TOOL_CALL[1])
        if end < 0:
            return False
        block, self.pending, self.mode = self.pending[:end], self.pending[end + len(TOOL_CALL[1]):], "content"
        call = parse_tool_call(block)
        if call is None:
            self._say("content", self.content.add(TOOL_CALL[0] + block + TOOL_CALL[1], self.trim))
        else:
            self.trim = True
            self.events.append(("tool_call", call))
        return True

    def _until(self, marker: str) -> tuple[str, bool]:
        """(the pending text before `marker`, True), the marker taken out; while it has not come, (what cannot be
        its start, False)."""
        at = self.pending.find(marker)
        if at >= 0:
            before, self.pending = self.pending[:at], self.pending[at + len(marker):]
            return before, True
        cut = len(self.pending) - held_tail(self.pending, marker)
        before, self.pending = self.pending[:cut], self.pending[cut:]
        return before, False

    def _say(self, kind: str, text: str) -> None:
        if text:
            self.events.append((kind, text))

    def _take(self) -> list[tuple[str, Any]]:
        events, self.events = self.events, []
        return events


def tool_call_entry(call: dict[str, str]) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}


def chat_finish_reason(finish_reason: str, called: bool) -> str:
    """OpenAI's "tool_calls" for a reply that called tools and ended by itself."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def chat_message(text: str, parse_calls: bool) -> dict:
    """The assistant message of a whole reply: content (null when it only called tools, as OpenAI's), and
    `reasoning_content` and `tool_calls` when it has them."""
    parser = ReplyParser(parse_calls)
    events = parser.feed(text) + parser.finish()
    message = {"role": "assistant", "content": "".join(text for kind, text in events if kind == "content")}
    reasoning = "".join(text for kind, text in events if kind == "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    calls = [tool_call_entry(call) for kind, call in events if kind == "tool_call"]
    if calls:
        message["tool_calls"] = calls
        message["content"] = message["content"] or None
    return message
