"""An OpenAI-compatible chat-completions server on 127.0.0.1, for tests, benchmarks and dry runs.

It answers ``POST /v1/chat/completions`` with grades in the JSON form that
``evals/resources/judge_prompt_v1.txt`` asks for, so ``linreg judge --base-url URL`` can run end to
end without a real API. Behaviour is steered by directives written anywhere in the request's
messages (e.g. inside a completion), which keeps it deterministic under concurrency:

- ``[[grades G C S P AGE]]``: grammar, creativity, consistency, plot and age group to return
  (default: derived from a hash of the conversation, all in 1..10);
- ``[[malformed once]]``: an unparsable reply, unless the conversation already holds an assistant
  turn (the client's parse retry), then a good one; ``[[malformed always]]``: always unparsable;
- ``[[429 xN]]`` / ``[[500 xN]]``: the first N requests with these exact messages get that status
  (429 with a ``retry-after-ms`` header);
- ``[[slow SECONDS xN]]``: the first N such requests sleep that long before answering.

Every request also waits ``latency`` seconds (threads, so concurrent requests overlap). The server
counts requests, statuses and tokens; it refuses (503) after ``max_requests`` requests so a broken
client loop stays bounded. With ``api_key`` set it returns 401 to other keys, and with
``echo_auth_in_errors`` its 500 bodies quote the Authorization header (to test that clients redact).

Only for loopback use: it binds 127.0.0.1 and is not a grader of anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_DIRECTIVE = re.compile(r"\[\[\s*([a-z0-9]+)((?:\s+[^\]\s]+)*)\s*\]\]", re.I)
AGE_GROUPS = "ABCDEF"


class GradingServer:
    """Threaded loopback server. Use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, *, latency: float = 0.0, max_requests: int = 10_000, api_key: str | None = None,
                 echo_auth_in_errors: bool = False, model_name: str = "loopback-grader"):
        self.latency = float(latency)
        self.max_requests = int(max_requests)
        self.api_key = api_key
        self.echo_auth_in_errors = echo_auth_in_errors
        self.model_name = model_name
        self.lock = threading.Lock()
        self.n_requests = 0
        self.statuses: Counter = Counter()
        self.seen: Counter = Counter()  # (directive, messages hash) -> times applied
        self.usage = Counter()
        self.log: list[dict] = []  # one entry per request: {"status", "n_messages", "key"}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL for the openai client (``http://127.0.0.1:PORT/v1``)."""
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def start(self) -> "GradingServer":
        server = self

        class Handler(_Handler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._httpd.request_queue_size = 128
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-grader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "GradingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ----------------------------------------------------------------------------------------
    def respond(self, body: dict, auth: str | None) -> tuple[int, dict, dict, float]:
        """Decide (status, headers, JSON body, seconds to sleep) for one request."""
        with self.lock:
            self.n_requests += 1
            over_budget = self.n_requests > self.max_requests
        if over_budget:
            return 503, {}, _error("request budget of this loopback server exhausted", "server_error"), 0.0
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            return 401, {}, _error("invalid api key", "invalid_request_error"), 0.0
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return 400, {}, _error("messages must be a non-empty list", "invalid_request_error"), 0.0
        text = "\n".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        mhash = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
        has_assistant = any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages)
        directives = [(d.group(1).lower(), d.group(2).split()) for d in _DIRECTIVE.finditer(text)]
        sleep = self.latency
        grades = None
        malformed = False
        for name, args in directives:
            if name in ("429", "500", "slow"):
                times = _times(args)
                with self.lock:
                    self.seen[(name, mhash)] += 1
                    hit = self.seen[(name, mhash)] <= times
                if not hit:
                    continue
                if name == "429":
                    return 429, {"retry-after-ms": "10"}, _error("rate limit reached (loopback)", "rate_limit"), sleep
                if name == "500":
                    msg = "internal error (loopback)"
                    if self.echo_auth_in_errors:
                        msg += f"; request had Authorization: {auth}"
                    return 500, {}, _error(msg, "server_error"), sleep
                sleep += float(args[0]) if args else 1.0
            elif name == "malformed":
                always = bool(args) and args[0].lower() == "always"
                malformed = always or not has_assistant
            elif name == "grades" and len(args) >= 4:
                grades = [float(a) for a in args[:4]] + [args[4].upper() if len(args) > 4 else "C"]
        if malformed:
            content = "I liked this story a lot, the child did a good job! Grades follow soon."
        else:
            if grades is None:
                h = int(mhash, 16)
                grades = [1 + (h >> (4 * k)) % 10 for k in range(4)] + [AGE_GROUPS[(h >> 20) % 6]]
            g = [int(x) if float(x).is_integer() else x for x in grades[:4]]
            content = json.dumps({"assessment": "A loopback grade.", "grammar": g[0], "creativity": g[1],
                                  "consistency": g[2], "plot": g[3], "age_group": grades[4]})
        prompt_tokens = len(text.split())
        completion_tokens = len(content.split())
        with self.lock:
            self.usage["prompt_tokens"] += prompt_tokens
            self.usage["completion_tokens"] += completion_tokens
        return 200, {}, {
            "id": f"chatcmpl-{mhash}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", self.model_name),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }, sleep


def _times(args: list[str]) -> int:
    for a in args:
        if a.lower().startswith("x") and a[1:].isdigit():
            return int(a[1:])
    return 1


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    owner: GradingServer

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, headers: dict, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout)
            pass

    def do_GET(self):  # noqa: N802
        if self.path.rstrip("/").endswith("/stats"):
            o = self.owner
            with o.lock:
                body = {"n_requests": o.n_requests, "statuses": {str(k): v for k, v in o.statuses.items()},
                        "usage": dict(o.usage)}
            self._send(200, {}, body)
        elif self.path.rstrip("/").endswith("/models"):
            self._send(200, {}, {"object": "list", "data": [{"id": self.owner.model_name, "object": "model"}]})
        else:
            self._send(404, {}, _error("not found", "invalid_request_error"))

    def do_POST(self):  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {}, _error(f"no route {self.path}", "invalid_request_error"))
            return
        try:
            body = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send(400, {}, _error("body is not JSON", "invalid_request_error"))
            return
        status, headers, payload, sleep = self.owner.respond(body, self.headers.get("Authorization"))
        if sleep > 0:
            time.sleep(sleep)
        with self.owner.lock:
            self.owner.statuses[status] += 1
            self.owner.log.append({"status": status, "n_messages": len(body.get("messages") or [])})
        self._send(status, headers, payload)


def main(argv: list[str] | None = None) -> int:
    """Serve on 127.0.0.1 until --duration passes or the process is stopped (prints the base URL)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m evals.loopback",
                                description="OpenAI-compatible loopback grading server (tests, benchmarks, dry runs). "
                                            "GET /v1/stats returns request counts.")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every request (default: 0)")
    p.add_argument("--max-requests", type=int, default=100_000, help="answer 503 after this many requests")
    p.add_argument("--duration", type=float, default=600.0, help="stop after this many seconds (default: 600)")
    p.add_argument("--api-key", default=None, help="accept only this key (default: any)")
    args = p.parse_args(argv)
    with GradingServer(latency=args.latency, max_requests=args.max_requests, api_key=args.api_key) as srv:
        print(srv.url, flush=True)
        try:
            time.sleep(args.duration)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["GradingServer", "main"]
