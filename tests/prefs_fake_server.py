"""A loopback OpenAI-compatible server for the stage 7 tests, with faults injected on a deterministic schedule.

Prompts look like "[p03] What is 4+5?". The generator ("gen") answers choice i with "The answer is {4+5+i}."; the
judge ("judge") reads the replies from the rubric request and scores each 9 - 2 * |its number - the truth| - one per
FILLER sentence (at least 1; 1 for a reply without "The answer is N."), so the correct reply is always the best,
whatever order it is shown in.

Faults are chosen per (model, prompt id): `schedule[(model, pid)]` lists one action per attempt (then "ok"),
`permanent[(model, pid)]` applies to every attempt. Actions: ok, 429 (Retry-After 0.05 s), 500, 400, slow (answers
after `slow_s`, beyond the client's timeout), drop (closes the connection without an answer), malformed (judge:
prose), badids (judge: JSON scoring ids that were not shown), tie (judge: equal scores), fenced (judge: valid JSON
inside a ```json fence), webpage (status 200 with an HTML page, as a proxy may answer), shapeless (status 200 with JSON
that is no chat completion), cutshort (status 200 with a JSON body cut short), quota (OpenAI's 429 for an account out
of credit), allright (generator: every choice correct, choice i of n followed by n-1-i FILLERs), thinks (generator:
each choice with a `reasoning_content`, as our server splits off a <think> block).
"""
from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROMPT = re.compile(r"\[(p\d+)\] What is (\d+)\+(\d+)\?")
REPLY = re.compile(r'<reply id="(\d+)">\n(.*?)\n</reply>', re.DOTALL)
NUMBER = re.compile(r"The answer is (-?\d+)\.")
FILLER = " Let me say it again."


def task(pid: str, a: int, b: int) -> dict:
    return {"id": pid, "kind": "add", "messages": [{"role": "user", "content": f"[{pid}] What is {a}+{b}?"}],
            "answer": str(a + b)}


def tasks(n: int) -> list[dict]:
    return [task(f"p{i:02d}", i % 7 + 1, i % 5 + 2) for i in range(n)]


def judge_score(reply: str, truth: int) -> int:
    found = NUMBER.search(reply)
    return 1 if found is None else max(1, 9 - 2 * abs(int(found.group(1)) - truth) - reply.count(FILLER))


class FakeOpenAI:
    def __init__(self, schedule: dict | None = None, permanent: dict | None = None, honour_n: bool = True,
                 delay_s: float = 0.0, slow_s: float = 1.5, web_page_models: bool = False,
                 cut_short_models: bool = False):
        self.schedule, self.permanent = schedule or {}, permanent or {}
        self.web_page_models = web_page_models  # GET /models answers with a web page (a base URL not the API's)
        self.cut_short_models = cut_short_models  # GET /models answers with a JSON body cut short
        self.honour_n, self.delay_s, self.slow_s = honour_n, delay_s, slow_s
        self.attempts: Counter = Counter()  # (model, pid) -> requests seen
        self.answered: Counter = Counter()  # (model, pid) -> successful generator choices handed out
        self.log: list[dict] = []  # per request: model, pid, action, n, t (arrival), shown (judge: numbers in order)
        self.in_flight = self.peak_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def requests_for(self, model: str, pid: str) -> int:
        with self.lock:
            return self.attempts[(model, pid)]

    def _action(self, model: str, pid: str) -> str:
        with self.lock:
            attempt = self.attempts[(model, pid)]
            self.attempts[(model, pid)] += 1
        if (model, pid) in self.permanent:
            return self.permanent[(model, pid)]
        planned = self.schedule.get((model, pid), [])
        return planned[attempt] if attempt < len(planned) else "ok"

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                self._send_body(status, json.dumps(payload).encode(), "application/json", headers)

            def _send_body(self, status: int, body: bytes, content_type: str, headers: dict | None = None) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(body)))
                    for key, value in (headers or {}).items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def _error(self, status: int, message: str, headers: dict | None = None) -> None:
                self._send(status, {"error": {"message": message, "type": "test", "param": None, "code": None}},
                           headers)

            def do_GET(self):
                if fake.web_page_models:
                    self._send_body(200, b"<html><body>Sign in</body></html>", "text/html")
                elif fake.cut_short_models:
                    self._send_body(200, b'{"object": "list", "da', "application/json")
                elif self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "gen", "object": "model"},
                                                                {"id": "judge", "object": "model"}]})
                else:
                    self._error(404, "not found")

            def do_POST(self):
                with fake.lock:
                    fake.in_flight += 1
                    fake.peak_in_flight = max(fake.peak_in_flight, fake.in_flight)
                try:
                    self._chat()
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def _chat(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                model, n = request["model"], request.get("n") or 1
                text = "\n".join(m["content"] for m in request["messages"])
                pid, a, b = PROMPT.search(text).groups()
                action = fake._action(model, pid)
                entry = {"model": model, "pid": pid, "action": action, "n": n, "t": time.monotonic(), "shown": None}
                with fake.lock:
                    fake.log.append(entry)
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "slow":
                    time.sleep(fake.slow_s)
                elif action == "429":
                    return self._error(429, "rate limited", {"Retry-After": "0.05"})
                elif action == "quota":
                    return self._send(429, {"error": {"message": "You exceeded your current quota", "param": None,
                                                      "type": "insufficient_quota", "code": "insufficient_quota"}})
                elif action in ("500", "400"):
                    return self._error(int(action), f"injected {action}")
                elif action == "webpage":
                    return self._send_body(200, b"<html><body>Bad gateway</body></html>", "text/html")
                elif action == "shapeless":
                    return self._send(200, {"result": "ok"})
                elif action == "cutshort":
                    return self._send_body(200, b'{"id": "chatcmpl-test", "choi', "application/json")
                truth = int(a) + int(b)
                if model == "gen":
                    with fake.lock:
                        count = n if fake.honour_n else 1
                        first = fake.answered[pid]
                        fake.answered[pid] += count
                    if action == "allright":
                        contents = [f"The answer is {truth}." + FILLER * (count - 1 - i) for i in range(count)]
                    else:
                        contents = [f"The answer is {truth + (first + i if not fake.honour_n else i)}."
                                    for i in range(count)]
                else:
                    replies = REPLY.findall(request["messages"][-1]["content"])
                    entry["shown"] = [int(found.group(1)) - truth if (found := NUMBER.search(reply)) else None
                                      for _, reply in replies]
                    contents = [self._judgement(action, replies, truth)]
                thought = {"reasoning_content": f"{a} and {b} make {truth}."} if action == "thinks" else {}
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": content, **thought},
                                 "finish_reason": "stop"} for i, content in enumerate(contents)],
                    "usage": {"prompt_tokens": len(text) // 4, "completion_tokens": 5 * len(contents),
                              "total_tokens": len(text) // 4 + 5 * len(contents)},
                })

            @staticmethod
            def _judgement(action: str, replies: list[tuple[str, str]], truth: int) -> str:
                if action == "malformed":
                    return "Reply 1 looks best to me."
                shift = 1 if action == "badids" else 0
                scores = [{"id": str(int(label) + shift), "score": 5 if action == "tie" else judge_score(reply, truth),
                           "reason": "checked the sum"} for label, reply in replies]
                answer = json.dumps({"scores": scores})
                return f"Here you go:\n```json\n{answer}\n```" if action == "fenced" else answer

        return Handler
