#!/usr/bin/env python3
"""A dependency-free client for the muxd IPC protocol (docs/ipc.md): proof that it needs
nothing but a Unix socket and a JSON parser.

    with MuxdClient.connect(default_socket_path(), app="demo") as c:
        print(c.request("status"))
        c.request("watch", interval_ms=500)
        for event in c.events():  # ends when the daemon closes the connection
            print(event)

    with MuxdClient.connect(default_socket_path(), app="bob") as c:
        message_id, state = c.send(queue_uri, b"hello")   # state "queued": stored durably
        print(c.message_status(message_id))               # {"state": "sent", ...} later

CLI: python3 muxd_client.py [--socket PATH] status|ping [-c N]|send URI TEXT [--wait]|
     message-status ID|export FILE
"""

import argparse
import base64
import collections
import json
import os
import socket
import struct
import sys
import tempfile
import time

PROTO_VERSION = 1
MAX_FRAME_LEN = 1 << 20  # bytes of JSON body; the header is 4 more


class NotRunning(Exception):
    """Nothing listens at the socket path (missing file or refused connection)."""


class ProtocolError(Exception):
    """The daemon sent something that is not a valid frame or not the expected message."""


class DaemonError(Exception):
    """The daemon answered with an error frame."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def default_socket_path():
    """$XDG_RUNTIME_DIR/muxd/muxd.sock, else <tmp>/muxd-<euid>/muxd.sock."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "muxd", "muxd.sock")
    return os.path.join(tempfile.gettempdir(), f"muxd-{os.geteuid()}", "muxd.sock")


class MuxdClient:
    """One connection; requests are answered in turn, events are queued in arrival order."""

    def __init__(self, sock, app):
        self._sock = sock
        self._next_id = 1
        self._events = collections.deque()
        self._send({"type": "hello", "proto_version": PROTO_VERSION, "app": app})
        hello = self._recv() or {}
        if hello.get("type") == "error":
            raise DaemonError(hello.get("code"), hello.get("message"))
        if hello.get("type") != "hello" or hello.get("proto_version") != PROTO_VERSION:
            raise ProtocolError(f"expected a version {PROTO_VERSION} hello, got {hello!r}")
        self.hello = hello

    @classmethod
    def connect(cls, path, app="python"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            sock.close()
            raise NotRunning(path) from e
        return cls(sock, app)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._sock.close()

    def request(self, op, **args):
        """Sends one request and returns the response object (its `reply` field names it)."""
        rid = self._next_id
        self._next_id += 1
        self._send({"type": "request", "id": rid, "op": op, **args})
        while True:
            msg = self._recv()
            if msg is None:
                raise ProtocolError("the daemon closed the connection before answering")
            kind = msg.get("type")
            if kind == "event":
                self._events.append(msg)
            elif kind == "error" and msg.get("id") in (rid, None):
                raise DaemonError(msg.get("code"), msg.get("message"))
            elif kind == "response" and msg.get("id") == rid:
                return msg
            # Anything else answers an id nobody waits for; skip it.

    def send(self, queue_uri, body, wait=False):
        """Sends `body` (bytes or str) to a queue URI; returns (message_id, state).

        By default the daemon answers as soon as the message is durably stored, with state
        "queued"; it goes out whenever the server is reachable. With wait=True the answer
        comes once the server accepted it, with state "sent".
        """
        if isinstance(body, str):
            body = body.encode()
        args = {"queue_uri": queue_uri, "body_b64": base64.b64encode(body).decode("ascii")}
        if wait:
            args["wait"] = True
        resp = self._expect(self.request("send", **args), "sent")
        return resp["message_id"], resp["state"]

    def message_status(self, message_id):
        """Where a sent message is: a dict with "state" (queued, sending, sent or failed) and,
        when there is one, "error"."""
        resp = self._expect(self.request("message_status", message_id=message_id), "message_status")
        return {k: v for k, v in resp.items() if k in ("message_id", "state", "error")}

    def export(self, path):
        """Asks the daemon to write a sealed backup of its store to `path` (a new file; made
        absolute here, since the daemon resolves paths against its own directory). Returns
        the path the daemon wrote."""
        resp = self._expect(self.request("export", path=os.path.abspath(path)), "exported")
        return resp["path"]

    @staticmethod
    def _expect(resp, reply):
        if resp.get("reply") != reply:
            raise ProtocolError(f"expected a {reply} reply, got {resp!r}")
        return resp

    def events(self):
        """Yields events (queued first) until the daemon closes the connection."""
        while True:
            if self._events:
                yield self._events.popleft()
                continue
            msg = self._recv()
            if msg is None:
                return
            if msg.get("type") == "event":
                yield msg
            elif msg.get("type") == "error" and "id" not in msg:
                raise DaemonError(msg.get("code"), msg.get("message"))

    def _send(self, obj):
        body = json.dumps(obj, separators=(",", ":")).encode()
        if len(body) > MAX_FRAME_LEN:
            raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_LEN}")
        self._sock.sendall(struct.pack(">I", len(body)) + body)

    def _recv(self):
        """The next frame as a dict, or None on a clean end of stream."""
        header = self._read_exact(4, eof_ok=True)
        if header is None:
            return None
        (length,) = struct.unpack(">I", header)
        if length > MAX_FRAME_LEN:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_LEN}")
        try:
            msg = json.loads(self._read_exact(length))
        except ValueError as e:
            raise ProtocolError(f"malformed frame: {e}") from e
        if not isinstance(msg, dict):
            raise ProtocolError("frame body is not a JSON object")
        return msg

    def _read_exact(self, n, eof_ok=False):
        buf = bytearray()
        while len(buf) < n:
            chunk = self._sock.recv(n - len(buf))
            if not chunk:
                if buf or not eof_ok:
                    raise ProtocolError("connection closed in the middle of a frame")
                return None
            buf += chunk
        return bytes(buf)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Minimal muxd client.")
    parser.add_argument("--socket", default=os.environ.get("MUXD_SOCKET") or default_socket_path())
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="print the daemon's status as JSON")
    ping = sub.add_parser("ping", help="measure IPC round trips")
    ping.add_argument("-c", "--count", type=int, default=1)
    send = sub.add_parser("send", help="send a message; prints 'queued <id>' or 'sent <id>'")
    send.add_argument("queue_uri")
    send.add_argument("text")
    send.add_argument("--wait", action="store_true", help="wait for the server to accept it")
    status = sub.add_parser("message-status", help="print where a sent message is, as JSON")
    status.add_argument("message_id")
    export = sub.add_parser("export", help="write a sealed backup of the daemon's store")
    export.add_argument("file")
    parser.add_argument("--app", default=os.environ.get("MUXD_APP") or "muxd_client.py")
    args = parser.parse_args(argv)
    try:
        with MuxdClient.connect(args.socket, app=args.app) as c:
            if args.command == "send":
                message_id, state = c.send(args.queue_uri, args.text, wait=args.wait)
                print(f"{state} {message_id}")
            elif args.command == "message-status":
                print(json.dumps(c.message_status(args.message_id), sort_keys=True))
            elif args.command == "export":
                print(f"exported the store to {c.export(args.file)}")
            elif args.command == "status":
                resp = c.request("status")
                report = {k: v for k, v in resp.items() if k not in ("type", "id", "reply")}
                print(json.dumps(report, sort_keys=True))
            else:
                for seq in range(1, args.count + 1):
                    start = time.perf_counter()
                    resp = c.request("ping", data=f"py{seq}")
                    ms = (time.perf_counter() - start) * 1e3
                    if resp.get("reply") != "pong" or resp.get("data") != f"py{seq}":
                        raise ProtocolError(f"bad pong {resp!r}")
                    print(f"seq={seq} time={ms:.3f} ms")
    except NotRunning as e:
        print(f"muxd_client.py: muxd is not running (no socket at {e}); start it with: muxd run",
              file=sys.stderr)
        return 1
    except (DaemonError, ProtocolError, OSError) as e:
        print(f"muxd_client.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
