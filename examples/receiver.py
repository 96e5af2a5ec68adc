#!/usr/bin/env python3
"""A webhook receiver that verifies both of courier's signatures.

    pip install standardwebhooks
    WEBHOOK_SECRET=whsec_... python3 examples/receiver.py --port 9000

It answers 204 to a webhook whose signatures are valid and 400 otherwise, and prints one
JSON line per request. Verify before you parse: the signatures cover the raw body bytes.
"""

import argparse
import hashlib
import hmac
import inspect
import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook, WebhookVerificationError

SECRET = os.environ.get("WEBHOOK_SECRET", "")
if not SECRET:
    sys.exit("receiver.py: set WEBHOOK_SECRET to the endpoint's secret (whsec_...)")
if "json_parse" not in inspect.signature(Webhook.verify).parameters:
    sys.exit("receiver.py: standardwebhooks is too old (verify() has no json_parse); pip install -U standardwebhooks")
standard = Webhook(SECRET)
print_lock = threading.Lock()  # requests are handled on several threads


def mr_signature_ok(secret: str, body: bytes, header: str) -> bool:
    """mr-signature: hex HMAC-SHA256 of the raw body, keyed with the whole secret text.

    With several secrets configured (rotation) the header holds one value per secret,
    comma-separated; any one matching is enough.
    """
    expected = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, v.strip()) for v in header.split(","))


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        result = {"webhook_id": headers.get("webhook-id"), "path": self.path}
        try:
            # Checks webhook-signature and that webhook-timestamp is within 5 minutes.
            # json_parse=False: only verify; the body need not be JSON (`POST
            # /v1/ingest/{endpoint}` delivers any bytes as they were sent).
            standard.verify(body, headers, json_parse=False)
            result["standard_webhooks"] = "valid"
        except WebhookVerificationError as e:
            result["standard_webhooks"] = f"invalid: {e}"
        except Exception as e:  # anything else is a rejection too, never a request left unanswered
            result["standard_webhooks"] = f"invalid: {type(e).__name__}: {e}"
        ok_mr = mr_signature_ok(SECRET, body, headers.get("mr-signature", ""))
        result["mr_signature"] = "valid" if ok_mr else "invalid"
        verified = result["standard_webhooks"] == "valid" and ok_mr
        result["verified"] = verified
        with print_lock:
            print(json.dumps(result), flush=True)
        # Dedupe on webhook-id in a real receiver: courier delivers at least once.
        self.send_response(204 if verified else 400)
        self.end_headers()

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    print(f"receiver listening on http://127.0.0.1:{server.server_port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        sys.exit(0)
