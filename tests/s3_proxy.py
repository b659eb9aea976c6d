"""A TCP proxy on 127.0.0.1 in front of the test S3 server that breaks requests by fixed rules, so a
client reaching S3 through it (``AWS_ENDPOINT_URL`` = ``proxy.endpoint``) meets the faults of a real
network and store, the same ones on every run:

- ``cut=PREDICATE, cut_after=K``: the response to request number n (1, 2, ... over all connections) is
  cut by a reset (RST, SO_LINGER 0) once K bytes of it have been forwarded when ``PREDICATE(n)``; with
  ``hold`` (an Event) the reset waits until it is set, so a test can read first. The rule counts
  requests, not connections, because a client reuses pooled connections as it likes; and it should
  spare some requests: bytes still unread by the client when the RST arrives are lost to it, so a
  client whose every response is cut at K bytes may never get a byte further;
- ``throttle=(PATH, ...)``: a request whose line names one of the paths is answered
  ``503 SlowDown`` (S3's throttling answer) and never reaches the server;
- ``hold_upload=PATH``: a PUT whose path contains PATH is stopped after its first read from the client
  (the headers, maybe some body) reached the server: the rest is never forwarded, ``upload_held`` is
  set, and the upload hangs mid-way until the client goes away (a test kills it there).

A request is recognised by its method at the start of a read from the client: HTTP clients send a
request without a body (all this proxy is for) in one write. Counters: ``connections``, ``requests``,
``resets``, ``throttled``; ``ranges``: the first byte of each ``Range: bytes=N-`` request, in order.
"""
from __future__ import annotations

import re
import select
import socket
import struct
import threading
from typing import Callable, Iterable, Optional
from urllib.parse import urlsplit

CHUNK = 64 * 1024
METHODS = (b"GET ", b"HEAD ", b"PUT ", b"POST ", b"DELETE ")
RANGE = re.compile(rb"\r\nrange: *bytes=(\d+)-", re.IGNORECASE)
SLOW_DOWN_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
                  b"<Message>Please reduce your request rate.</Message></Error>")
SLOW_DOWN = (b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
             b"Content-Length: %d\r\n\r\n" % len(SLOW_DOWN_BODY)) + SLOW_DOWN_BODY


class FaultyProxy:
    """Use as a context manager: listening on ``endpoint`` inside the ``with``."""

    def __init__(self, upstream: str, *, cut: Callable[[int], bool] = lambda n: False, cut_after: int = 0,
                 hold: Optional[threading.Event] = None, throttle: Iterable[str] = (),
                 hold_upload: Optional[str] = None):
        parts = urlsplit(upstream)
        self._upstream = (parts.hostname, parts.port)
        self._cut, self._cut_after, self._hold = cut, cut_after, hold
        self._throttle = [p.encode() for p in throttle]
        self._hold_upload = hold_upload.encode() if hold_upload else None
        self.upload_held = threading.Event()
        self.connections = self.requests = self.resets = self.throttled = 0
        self.ranges: list[int] = []
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept() wakes to see ``_stop`` (closing does not wake it)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> "FaultyProxy":
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in list(self._threads):
            t.join(5)
        self._listener.close()

    def _spawn(self, target, *args) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _count(self, name: str) -> int:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)
            return getattr(self, name)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            self._count("connections")
            self._spawn(self._serve, client)

    def _serve(self, client: socket.socket) -> None:
        """One connection, both directions in this thread, so a reset is sent at once (a socket closed
        while another thread blocks in recv() on it is not released, and sends nothing)."""
        with client, socket.create_connection(self._upstream) as upstream:
            cut, carried = False, 0  # whether the current response is to be cut, and its bytes so far
            holding = False  # an upload stopped half-way: nothing more is read from the client
            while not self._stop.is_set():
                readable, _, _ = select.select([upstream] if holding else [client, upstream], [], [], 0.1)
                if client in readable:
                    data = client.recv(CHUNK)
                    if not data:
                        return
                    if data.startswith(METHODS):
                        cut, carried = self._cut(self._count("requests")), 0
                        if m := RANGE.search(data):
                            self.ranges.append(int(m.group(1)))
                        if any(data.split(b" ", 2)[1].startswith(p) for p in self._throttle):
                            self._count("throttled")
                            client.sendall(SLOW_DOWN)
                            return
                        holding = (self._hold_upload is not None and data.startswith(b"PUT ")
                                   and self._hold_upload in data.split(b" ", 2)[1])
                    upstream.sendall(data)
                    if holding:
                        self.upload_held.set()
                if upstream in readable:
                    data = upstream.recv(CHUNK)
                    if not data:
                        return
                    if cut and carried + len(data) >= self._cut_after:
                        client.sendall(data[: self._cut_after - carried])
                        if self._hold is not None:
                            self._hold.wait()
                        self._reset(client)
                        return
                    client.sendall(data)
                    carried += len(data)

    def _reset(self, client: socket.socket) -> None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        self._count("resets")
