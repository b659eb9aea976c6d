"""One HTTP/1.1 GET over a connected socket: the request's bytes, then the response's head and body.

The shard stage's downloads, kept lean because every image pays for them. ``http.client`` made each
download cost 0.16 ms more CPU in a task, a fifth of what a shard task spends per image besides the
JPEG codec (its email-based header parser, a buffered file over the socket, a wait and a read per few
kilobytes, each a release and retake of the GIL the converting thread needs). Here the head is read and parsed
from large receives, and the body is de-framed as RFC 9112 says: ``Transfer-Encoding: chunked``, else
``Content-Length`` (a shorter body is an error, not a short image), else up to the close.

Policy (which hosts, redirects, status codes, size caps, deadlines) belongs to ``pipelines.fetch``;
this module only speaks the protocol, with hard bounds on what a hostile server can make it hold: a head
of at most ``MAX_HEAD`` bytes and ``MAX_HEADERS`` lines, a body of at most the caller's ``limit``.
Reads go through the socket's ``recv_into``, where ``pipelines.fetch`` enforces its deadline.
"""
from __future__ import annotations

import re
import threading
from http.client import BadStatusLine, HTTPException, IncompleteRead, InvalidURL, LineTooLong, RemoteDisconnected
from typing import Optional

RECV = 1 << 18  # one receive takes what the kernel holds (a loopback photo arrives in one or two)
MAX_HEAD = 1 << 16  # http.client's limit on one header line; here, on the whole head
MAX_HEADERS = 100  # http.client's
HEAD_END = re.compile(rb"\r?\n\r?\n")
NOT_IN_HOST = re.compile(r"[\x00-\x20\x7f/?#@\\]")  # what would end or split the Host line


_local = threading.local()


def _scratch() -> memoryview:
    """This thread's receive buffer (made once: a fresh one per response would be zeroed each time)."""
    view = getattr(_local, "view", None)
    if view is None:
        view = _local.view = memoryview(bytearray(RECV))
    return view


class TooLarge(Exception):
    """The body passes the caller's ``limit``: its ``str`` says how it showed (a header or the bytes)."""


def request(host: str, port: int, default_port: int, target: str, headers: dict[str, str]) -> bytes:
    """The bytes of ``GET target`` to ``host``, with ``headers`` after ``Host`` (as ``http.client``
    writes it: an IPv6 address in brackets, the port when not the scheme's). ``target`` must be
    percent-quoted already; a host with characters that would break the request is ``InvalidURL``."""
    if NOT_IN_HOST.search(host) or "\r" in target or "\n" in target or " " in target:
        raise InvalidURL(f"host or path not allowed in a request line: {host!r} {target!r}")
    name = f"[{host}]" if ":" in host else host
    lines = [f"GET {target} HTTP/1.1", f"Host: {name}" if port == default_port else f"Host: {name}:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class Response:
    """The response to a request sent on ``sock``: ``status`` and ``headers`` (lower-case names,
    repeated ones joined with ", ", as ``http.client``'s ``getheader`` gives them) once made; ``body``
    reads the rest. Interim 1xx responses (100 Continue, 103 Early Hints) are skipped. A connection
    that ends before the response's first byte is ``RemoteDisconnected`` (a kept-alive one the server
    has closed meanwhile shows so)."""

    def __init__(self, sock):
        self.sock = sock
        self._view = _scratch()
        self._buf = bytearray()
        self._eof = False
        self._framed = False  # the body ended where its framing said, not at the close
        self.status, self.headers = self._head()
        while 100 <= self.status < 200:
            self.status, self.headers = self._head()

    @property
    def reusable(self) -> bool:
        """After ``body``: the connection may carry another request (HTTP/1.1, not ``Connection:
        close``, the body read to its framed end and nothing after it)."""
        tokens = self.headers.get("connection", "").lower()
        return (self._framed and self.version == "HTTP/1.1" and "close" not in tokens
                and not self._buf and not self._eof)

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self.headers.get(name.lower(), default)

    def _fill(self) -> bool:
        """One receive appended to the buffer; False at the end of the stream."""
        n = self.sock.recv_into(self._view)
        if n == 0:
            self._eof = True
            return False
        self._buf += self._view[:n]
        return True

    def _head(self) -> tuple[int, dict[str, str]]:
        while (end := HEAD_END.search(self._buf)) is None:
            if len(self._buf) > MAX_HEAD:
                raise LineTooLong(f"a response head over {MAX_HEAD} bytes")
            if not self._fill():
                if not self._buf:
                    raise RemoteDisconnected("the connection closed before a response")
                raise BadStatusLine(bytes(self._buf[:80]).decode("latin-1"))
        if end.start() > MAX_HEAD:
            raise LineTooLong(f"a response head over {MAX_HEAD} bytes")
        raw = bytes(self._buf[:end.start()]).decode("latin-1")
        del self._buf[:end.end()]
        lines = [line.removesuffix("\r") for line in raw.split("\n")]  # only \n ends a line, as in http.client
        words = lines[0].split(None, 2)
        code = words[1] if len(words) > 1 else ""
        if not words[0].startswith("HTTP/") or len(code) != 3 or not code.isdigit() or int(code) < 100:
            raise BadStatusLine(lines[0][:80])
        self.version = words[0]
        if len(lines) - 1 > MAX_HEADERS:
            raise HTTPException(f"got more than {MAX_HEADERS} headers")
        headers: dict[str, str] = {}
        name = None
        for line in lines[1:]:
            if line[:1] in (" ", "\t") and name is not None:  # an obsolete folded continuation
                headers[name] += " " + line.strip()
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise HTTPException(f"not a header line: {line[:80]!r}")
            name, value = name.strip().lower(), value.strip()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return int(code), headers

    def body(self, limit: int) -> bytes:
        """The whole body, de-framed; ``TooLarge`` once past ``limit`` bytes, ``IncompleteRead`` when
        the connection ends before the framing says the body does."""
        if self.status in (204, 304):
            body = b""
        elif (coding := self.headers.get("transfer-encoding")) is not None:
            if coding.lower().rsplit(",", 1)[-1].strip() != "chunked":
                return self._to_close(limit)
            body = self._chunked(limit)
        elif (length := self.headers.get("content-length", "").strip()).isdigit():
            body = self._exactly(int(length), limit)
        else:
            return self._to_close(limit)  # none, or one http.client would not read either ("10, 10")
        self._framed = True
        return body

    def _exactly(self, length: int, limit: int) -> bytes:
        if length > limit:
            raise TooLarge(f"Content-Length {length} is")
        while len(self._buf) < length:
            if not self._fill():
                raise IncompleteRead(bytes(self._buf), length - len(self._buf))
        if length == len(self._buf):  # the usual case: one copy, not two
            body = bytes(self._buf)
            self._buf.clear()
            return body
        body = bytes(self._buf[:length])
        del self._buf[:length]
        return body

    def _to_close(self, limit: int) -> bytes:
        while True:
            if len(self._buf) > limit:
                raise TooLarge("the body is")
            if self._eof or not self._fill():
                return bytes(self._buf)

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise LineTooLong("a chunk-size line")
            if not self._fill():
                raise IncompleteRead(b"")
        line = bytes(self._buf[:end + 1])
        del self._buf[:end + 1]
        return line

    def _chunked(self, limit: int) -> bytes:
        parts, size = [], 0
        while True:
            field = self._line().split(b";", 1)[0].strip()
            try:
                chunk = int(field, 16)
            except ValueError:
                raise IncompleteRead(b"") from None
            if chunk < 0:
                raise IncompleteRead(b"")
            if chunk == 0:
                break
            size += chunk
            if size > limit:
                raise TooLarge("the body is")
            parts.append(self._exactly(chunk, limit))
            self._line()  # the CRLF after the chunk's data
        while not self._eof or self._buf:  # trailers, up to the blank line (or the close, as http.client)
            try:
                if self._line() in (b"\r\n", b"\n"):
                    break
            except IncompleteRead:
                break
        return b"".join(parts)
