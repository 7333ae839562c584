"""A stand-in for an OpenAI-compatible chat-completions server, on 127.0.0.1, for the MT-Bench judge.

`FakeJudge` serves POST /v1/chat/completions from a `ThreadingHTTPServer` (a free port, a daemon
thread). Every request's JSON body is recorded in `requests`. Its answers:

- `fail`: a list of HTTP statuses given, in order, to the first requests (e.g. [429, 500]); each
  failed request is recorded too;
- otherwise `reply(body) -> str`, the judgment text (the default rates every answer [[5]]).

`key`, when set, is the only Bearer token accepted (others get 401).
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional


class FakeJudge:
    def __init__(self, reply: Optional[Callable[[dict], str]] = None, fail=(), key: Optional[str] = None):
        self.reply = reply or (lambda body: "The answer is fine. Rating: [[5]]")
        self.fail, self.key = list(fail), key
        self.requests: list[dict] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with fake.lock:
                    fake.requests.append(body)
                    status = fake.fail.pop(0) if fake.fail else 200
                if fake.key and self.headers.get("Authorization") != f"Bearer {fake.key}":
                    status = 401
                if self.path.rstrip("/") != "/v1/chat/completions":
                    status = 404
                with fake.lock:
                    fake.statuses.append(status)
                if status != 200:
                    return self._send(status, {"error": {"message": f"stand-in error {status}", "type": "test",
                                                         "code": status}})
                text = fake.reply(body)
                self._send(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                                 "model": body.get("model"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
