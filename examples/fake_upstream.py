#!/usr/bin/env python3
"""A fake AI upstream for trying courier's workflows: answers every POST with a canned,
chat-completion-like JSON after a delay.

    python3 examples/fake_upstream.py --port 9100 --delay 1.0
"""

import argparse
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def answer(request: dict) -> dict:
    messages = request.get("messages") or []
    question = messages[-1].get("content", "") if messages else ""
    return {
        "id": f"chatcmpl-{int(time.time() * 1000)}",
        "object": "chat.completion",
        "model": "fake-movie-model",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "You might enjoy Arrival (2016)."},
            "finish_reason": "stop",
        }],
        "suggestion": {"title": "Arrival", "year": 2016},
        "prompt_echo": question,
    }


class Handler(BaseHTTPRequestHandler):
    delay = 1.0

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            self.send_response(400)
            self.end_headers()
            return
        time.sleep(self.delay)
        out = json.dumps(answer(request)).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--delay", type=float, default=1.0, help="seconds before answering")
    args = ap.parse_args()
    Handler.delay = args.delay
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"fake upstream listening on http://127.0.0.1:{server.server_port}", flush=True)
    server.serve_forever()
