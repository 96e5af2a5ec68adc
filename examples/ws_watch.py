#!/usr/bin/env python3
"""A tiny WebSocket client (standard library only) that prints a courier channel's messages,
one JSON line each, until the final one:

    python3 examples/ws_watch.py ws://127.0.0.1:8080/v1/channels/<channel_id>/ws?token=<key>
    COURIER_TOKEN=<key> python3 examples/ws_watch.py wss://hooks.example.com/v1/channels/<channel_id>/ws

With COURIER_TOKEN set, the key goes in an Authorization header instead of the URL (so it
stays out of proxies' logs). wss:// URLs use TLS (port 443 unless the URL names one).

How courier ends the socket decides what happens next:
- 1000 (after the final message): exit 0.
- 1008 (the key no longer admits the socket, e.g. removed by a reload): exit 1, no retry.
- 1001 (courier is shutting down), 1011 (an internal error, or a ping left unanswered),
  1012/1013, or a connection that drops without a close: reconnect, after 0.5 s, 1 s, 2 s,
  ... (at most 8 attempts in a row). A socket that reconnects gets the channel's latest
  state first, so nothing is missed; a repeat of the message printed last is not printed
  again.
- A refused handshake: 429 and 5xx (courier restarting, or a proxy in front of it that
  cannot reach it yet) are retried the same way; any other status exits 1.
Once the final message has arrived the watcher exits 0 however the connection ends.
"""

import base64
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import time
from urllib.parse import urlsplit

# A channel's final message has one of these statuses ("pending" and "ai_generated" are not).
FINAL_STATUSES = {"success", "error"}
# Seconds to wait before each reconnect attempt in a row (about a minute in all).
RETRY_DELAYS = [0.5, 1, 2, 4, 8, 15, 15, 15]
# courier pings an idle socket every 20 s: this long without any frame means the connection
# is gone (a network that vanished sends no close).
READ_TIMEOUT = 60
CONNECT_TIMEOUT = 10
# Close codes worth reconnecting after: going away, internal error, service restart, try
# again later. (None: the connection ended without a close frame.)
RETRY_CODES = {1001, 1011, 1012, 1013, None}
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Refused(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status, detail):
        super().__init__(f"handshake refused: {status}{': ' + detail if detail else ''}")
        code = status.split(" ")[1] if status.count(" ") >= 1 else ""
        self.retryable = code == "429" or code.startswith("5")


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed without a close frame")
        data += chunk
    return data


def send_frame(sock, opcode, payload=b""):
    """One final, masked frame (a client must mask every frame it sends)."""
    mask = os.urandom(4)
    masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | opcode, 0x80 | n])
    elif n < 1 << 16:
        head = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
    sock.sendall(head + mask + masked)


def read_frame(sock):
    b1, b2 = recv_exact(sock, 2)
    fin, opcode, length = bool(b1 & 0x80), b1 & 0x0F, b2 & 0x7F
    if length == 126:
        length = struct.unpack(">H", recv_exact(sock, 2))[0]
    elif length == 127:
        length = struct.unpack(">Q", recv_exact(sock, 8))[0]
    mask = recv_exact(sock, 4) if b2 & 0x80 else None  # a server never masks, but may
    payload = recv_exact(sock, length)
    if mask:
        payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
    return fin, opcode, payload


def open_socket(url):
    """Connects and upgrades; the socket, or raises Refused / OSError."""
    u = urlsplit(url)
    if u.scheme not in ("ws", "wss"):
        sys.exit(f"ws_watch: not a ws:// or wss:// URL: {url}")
    tls = u.scheme == "wss"
    port = u.port or (443 if tls else 80)
    sock = socket.create_connection((u.hostname, port), timeout=CONNECT_TIMEOUT)
    try:
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=u.hostname)
        sock.settimeout(READ_TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        path = (u.path or "/") + ("?" + u.query if u.query else "")
        host = u.netloc.rpartition("@")[2]
        auth = ""
        if os.environ.get("COURIER_TOKEN"):
            auth = f"Authorization: Bearer {os.environ['COURIER_TOKEN']}\r\n"
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\n{auth}\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:  # byte by byte: no frame bytes are read past it
            head += recv_exact(sock, 1)
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if status.split(" ")[1:2] != ["101"]:
            detail = ""
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) <= 4096:
                detail = recv_exact(sock, int(length)).decode("utf-8", "replace").strip()
            raise Refused(status, detail)
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        if headers.get("sec-websocket-accept") != accept:
            raise Refused(status, "wrong Sec-WebSocket-Accept")
        return sock
    except BaseException:
        sock.close()
        raise


class Watch:
    def __init__(self):
        self.last = None  # the text printed last
        self.final = False  # whether the final message has been printed
        self.printed = 0  # messages printed so far

    def show(self, text):
        if text == self.last:
            return  # the latest state again, sent first to a socket that reconnected
        self.last = text
        self.printed += 1
        print(text, flush=True)
        try:
            self.final = json.loads(text).get("status") in FINAL_STATUSES
        except (ValueError, AttributeError):
            pass

    def run(self, sock):
        """Reads frames until a close; returns (code or None, reason)."""
        message, kind = b"", None
        while True:
            fin, opcode, payload = read_frame(sock)
            if opcode == 0x8:  # close: answer it with the same code, then hang up
                code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None
                reason = payload[2:].decode("utf-8", "replace")
                try:
                    send_frame(sock, 0x8, payload[:2])
                except OSError:
                    pass
                return code, reason
            if opcode == 0x9:  # ping: answer with a pong carrying the same data
                send_frame(sock, 0xA, payload)
            elif opcode in (0x1, 0x2, 0x0):  # text/binary, or a continuation of one
                if opcode != 0x0:
                    message, kind = b"", opcode
                message += payload
                if fin and kind == 0x1:  # one JSON message per text message
                    self.show(message.decode("utf-8", "replace"))


def main(url):
    watch = Watch()
    failures = 0
    while True:
        try:
            sock = open_socket(url)
        except Refused as e:
            if not e.retryable:
                sys.exit(f"ws_watch: {e}")
            why = str(e)
        except ssl.SSLCertVerificationError as e:  # retrying would not change the certificate
            sys.exit(f"ws_watch: {e}")
        except OSError as e:  # refused, unreachable, timed out, TLS failure
            why = f"cannot connect: {e}"
        else:
            printed = watch.printed
            try:
                code, reason = watch.run(sock)
            except OSError as e:  # includes a read timeout and a dropped connection
                code, reason = None, str(e)
            finally:
                sock.close()
            if watch.final or code == 1000:
                return
            if code == 1008:
                sys.exit(
                    f"ws_watch: courier closed the socket with 1008 ({reason}): the key no "
                    "longer admits this channel; not reconnecting"
                )
            if code not in RETRY_CODES:
                sys.exit(f"ws_watch: courier closed the socket with {code} ({reason})")
            why = f"closed with {code} ({reason})" if code else f"connection lost ({reason})"
            if watch.printed > printed:
                failures = 0  # the channel moved on: the next failure starts the delays over
        failures += 1
        if failures > len(RETRY_DELAYS):
            sys.exit(f"ws_watch: giving up after {len(RETRY_DELAYS)} reconnect attempts: {why}")
        delay = RETRY_DELAYS[failures - 1]
        print(
            f"ws_watch: {why}; reconnecting in {delay} s "
            f"(attempt {failures} of {len(RETRY_DELAYS)})",
            file=sys.stderr,
            flush=True,
        )
        time.sleep(delay)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        main(sys.argv[1])
    except KeyboardInterrupt:
        sys.exit(130)
