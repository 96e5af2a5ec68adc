#!/usr/bin/env python3
"""A tiny WebSocket client (standard library only) that prints a courier channel's messages
until the final one:

    python3 examples/ws_watch.py ws://127.0.0.1:8080/v1/channels/<channel_id>/ws?token=<key>
"""

import base64
import os
import socket
import struct
import sys
from urllib.parse import urlsplit


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def main(url):
    u = urlsplit(url)
    sock = socket.create_connection((u.hostname, u.port or 80))
    key = base64.b64encode(os.urandom(16)).decode()
    path = u.path + ("?" + u.query if u.query else "")
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += recv_exact(sock, 1)
    status = head.split(b"\r\n", 1)[0].decode()
    if " 101 " not in status:
        sys.exit(f"handshake refused: {status}")
    while True:
        b1, b2 = recv_exact(sock, 2)
        opcode, length = b1 & 0x0F, b2 & 0x7F
        if length == 126:
            length = struct.unpack(">H", recv_exact(sock, 2))[0]
        elif length == 127:
            length = struct.unpack(">Q", recv_exact(sock, 8))[0]
        payload = recv_exact(sock, length)
        if opcode == 0x1:  # text: one JSON message per frame
            print(payload.decode(), flush=True)
        elif opcode == 0x8:  # close: the channel reached its final state
            return
        elif opcode == 0x9:  # ping: answer with a (masked) pong
            mask = os.urandom(4)
            masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            sock.sendall(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
