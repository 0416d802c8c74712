"""Servers for the remote-reward tests: a reward server and an OpenAI-compatible chat endpoint, on 127.0.0.1 in
a daemon thread of the test process (stdlib ``http.server``), with faults to inject. Each stops when its
``with`` block ends (and with the process: daemon threads), so no test leaves one behind."""

from __future__ import annotations

import json
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from reward_models.rules import arithmetic_exact


def arithmetic_scores(batch: dict[str, Any]) -> list[float | None]:
    """The quickstart's reward (``arithmetic_exact``), computed by the server from the posted batch."""
    columns = {k: v for k, v in batch.items() if k not in ("prompts", "completions")}
    return arithmetic_exact(batch["prompts"], batch["completions"], **columns)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # handler threads never keep the process alive


class FaultyServer:
    """Answers POSTs with ``reply(payload) -> (status, body, headers)`` after the faults drawn for the request.

    ``script``: the first requests' answers, in order, as ``(status, body)`` or ``(status, body, headers)`` or
    ``"slow"`` (sleep ``slow_s`` then answer normally) or ``"drop"`` (close the connection without an answer);
    then each request fails with 503 with probability ``fail_rate`` and is slow with probability ``slow_rate``
    (drawn from a generator seeded with ``seed``, in arrival order). ``down_after``: after that many requests the
    server closes its socket (connections are refused from then on). ``requests`` records each request's
    payload and headers and what it got.
    """

    def __init__(self, reply: Callable[[dict], tuple[int, Any, dict]], port: int = 0, script=(), fail_rate: float = 0.0,
                 slow_rate: float = 0.0, slow_s: float = 0.0, seed: int = 0, down_after: int | None = None):
        self.reply, self.script, self.port = reply, list(script), port
        self.fail_rate, self.slow_rate, self.slow_s, self.down_after = fail_rate, slow_rate, slow_s, down_after
        self.random = random.Random(seed)
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: _Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultyServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with owner.lock:
                    index = len(owner.requests)
                    record = {"payload": json.loads(body or b"null"), "headers": dict(self.headers),
                              "path": self.path, "time": time.monotonic()}
                    owner.requests.append(record)
                    action = owner.script[index] if index < len(owner.script) else None
                    if action is None:
                        draw = owner.random.random()
                        action = 503 if draw < owner.fail_rate else "slow" if draw < owner.fail_rate + owner.slow_rate else "ok"
                    down = owner.down_after is not None and index >= owner.down_after
                record["action"] = action if not down else "down"
                if down:  # close the socket (refused from now on) and drop this connection
                    threading.Thread(target=owner.stop, daemon=True).start()
                    self.close_connection = True
                    return
                if action == "drop":
                    self.close_connection = True
                    return
                if action == "slow":
                    time.sleep(owner.slow_s)
                if action == 503:
                    self._answer(503, {"error": "overloaded"}, {})
                elif isinstance(action, tuple):
                    status, content, *headers = action
                    self._answer(status, content, headers[0] if headers else {})
                else:
                    self._answer(*owner.reply(record["payload"]))

            def _answer(self, status: int, content: Any, headers: dict):
                data = content.encode() if isinstance(content, str) else json.dumps(content).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in headers.items():
                        self.send_header(key, str(value))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout)

        self.server = _Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __exit__(self, *exc):
        self.stop()
        return False

    def statuses(self) -> list[Any]:
        return [request["action"] for request in self.requests]


def reward_server(score: Callable[[dict], list] = arithmetic_scores, **faults) -> FaultyServer:
    """A reward server: ``{"rewards": score(payload)}``."""
    return FaultyServer(lambda payload: (200, {"rewards": score(payload)}, {}), **faults)


def chat_server(answer: Callable[[str], str], **faults) -> FaultyServer:
    """An OpenAI-compatible ``/v1/chat/completions``: the reply is ``answer(the user message)``."""

    def reply(payload):
        content = answer(payload["messages"][-1]["content"])
        return 200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": payload["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, {}

    return FaultyServer(reply, **faults)
