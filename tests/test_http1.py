"""The shard stage's HTTP/1.1 reading (``pipelines.http1`` under ``pipelines.fetch``) against a real TCP
server on 127.0.0.1 that answers with exactly the bytes each test gives: every body framing, interim
responses, repeated and folded headers, and what a broken or hostile server sends."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from pipelines import fetch, http1
from pipelines.config import DownloadConfig
from pipelines.fetch import Fetcher
from pipelines.images import Rejected

BODY = bytes(range(256)) * 40  # 10 KB that no framing bug leaves intact by chance


class CannedServer:
    """Accepts connections, reads each request's head, answers ``responses[path]`` (bytes) and closes;
    with ``keep_alive``, answers every request on a connection until the client closes it."""

    def __init__(self, responses: dict[str, bytes], keep_alive: bool = False):
        self.responses, self.keep_alive = responses, keep_alive
        self.requests: list[bytes] = []
        self.connections = 0
        self.ended = threading.Event()  # set when a client closes a kept-alive connection
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            if self.keep_alive:
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
            else:
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            while True:
                head = b""
                while b"\r\n\r\n" not in head:
                    piece = conn.recv(4096)
                    if not piece:
                        self.ended.set()
                        return
                    head += piece
                self.requests.append(head)
                path = head.split(b" ", 2)[1].decode()
                response = self.responses.get(path, b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                if isinstance(response, float):  # say nothing that long
                    time.sleep(response)
                    return
                conn.sendall(response)
                if not self.keep_alive:
                    return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve():
    servers = []

    def start(responses: dict[str, bytes], keep_alive: bool = False) -> CannedServer:
        servers.append(CannedServer(responses, keep_alive))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def get(server: CannedServer, path: str) -> bytes:
    return Fetcher(DownloadConfig(allow_private=True, timeout_s=2.0, retries=0)).fetch(server.url + path)


def reason(server: CannedServer, path: str) -> str:
    with pytest.raises(Rejected) as e:
        get(server, path)
    return e.value.reason


def chunked(body: bytes, size: int) -> bytes:
    pieces = [b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\nX-Trailer: t\r\n\r\n"


def test_every_framing_gives_the_body(serve):
    ok = b"HTTP/1.1 200 OK\r\n"
    server = serve({
        "/length": ok + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
        "/chunked": ok + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 3000),
        "/close": b"HTTP/1.0 200 OK\r\nContent-Type: image/jpeg\r\n\r\n" + BODY,
        "/bare-lf": b"HTTP/1.1 200 OK\nContent-Length: %d\n\n" % len(BODY) + BODY,
        "/interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                    + ok + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY,
        "/empty": b"HTTP/1.1 204 No Content\r\n\r\n",
    })
    for path in ("/length", "/chunked", "/close", "/bare-lf", "/interim"):
        assert get(server, path) == BODY, path
    assert get(server, "/empty") == b""  # which the image step refuses as "empty"


def test_the_request_is_one_plain_get(serve):
    server = serve({"/a%20b.jpg?x=1": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz"})
    assert get(server, "/a b.jpg?x=1") == b"z"
    head = server.requests[0].decode()
    port = server.url.rsplit(":", 1)[1]
    assert head.startswith(f"GET /a%20b.jpg?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n")
    assert "Connection:" not in head and f"User-Agent: {fetch.USER_AGENT}\r\n" in head  # HTTP/1.1: kept alive
    assert http1.request("::1", 80, 80, "/", {}) == b"GET / HTTP/1.1\r\nHost: [::1]\r\n\r\n"
    with pytest.raises(http1.InvalidURL):
        http1.request("a b", 80, 80, "/", {})


def test_repeated_and_folded_headers_are_read_as_one(serve):
    server = serve({
        "/repeated": b"HTTP/1.1 200 OK\r\nX-Robots-Tag: noindex\r\nX-Robots-Tag: noai\r\nContent-Length: 1\r\n\r\nz",
        "/folded": b"HTTP/1.1 200 OK\r\nX-Robots-Tag: noindex,\r\n noimageai\r\nContent-Length: 1\r\n\r\nz",
    })
    assert reason(server, "/repeated") == "noai"
    assert reason(server, "/folded") == "noai"


def test_broken_responses_are_connection_failures_never_short_images(serve):
    server = serve({
        "/short": b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY[:100],
        "/short-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 3000)[:5000],
        "/bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "/not-http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        "/bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 1\r\n\r\nz",
        "/no-head-end": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n",
        "/huge-head": b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * (http1.MAX_HEAD + 10) + b"\r\n\r\nz",
        "/many-headers": b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (http1.MAX_HEADERS + 1) + b"\r\n",
        "/nothing": b"",
    })
    for path in ("/short", "/short-chunk", "/bad-chunk", "/not-http", "/bad-status", "/no-head-end", "/huge-head",
                 "/many-headers", "/nothing"):
        assert reason(server, path) == "connection", path


def test_bodies_over_the_cap_are_refused_whatever_the_framing(serve, monkeypatch):
    monkeypatch.setattr(fetch, "MAX_BYTES", 5000)
    server = serve({
        "/declared": b"HTTP/1.1 200 OK\r\nContent-Length: 5001\r\n\r\n",  # refused before any body is read
        "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked(BODY, 3000),
        "/close": b"HTTP/1.0 200 OK\r\n\r\n" + BODY,
        "/fits": b"HTTP/1.0 200 OK\r\n\r\n" + BODY[:5000],
    })
    for path in ("/declared", "/chunked", "/close"):
        assert reason(server, path) == "too_large", path
    assert get(server, "/fits") == BODY[:5000]


def test_a_host_that_would_break_the_request_line_is_a_bad_url():
    fetcher = Fetcher(DownloadConfig(allow_private=True, timeout_s=2.0, retries=0))
    with pytest.raises(Rejected) as e:
        fetcher.fetch("http://exa mple.com/a.jpg")
    assert e.value.reason == "bad_url"


def test_a_server_that_says_nothing_is_a_timeout_at_the_deadline(serve):
    server = serve({"/silent": 6.0})
    start = time.monotonic()
    assert reason(server, "/silent") == "timeout"  # the receive waits in the kernel, bounded all the same
    assert time.monotonic() - start < 4


LENGTH = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY


def test_a_task_reuses_a_kept_alive_connection_and_closes_it_at_the_end(serve):
    server = serve({"/length": LENGTH, "/chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    + chunked(BODY, 3000)}, keep_alive=True)
    fetcher = Fetcher(DownloadConfig(allow_private=True, timeout_s=2.0, retries=0))
    for path in ("/length", "/chunked", "/length", "/chunked", "/length"):
        assert fetcher.fetch(server.url + path) == BODY, path
    assert (server.connections, len(server.requests)) == (1, 5)
    assert not server.ended.is_set()
    fetcher.close()
    assert server.ended.wait(5)


def test_a_connection_is_not_reused_when_the_response_says_or_leaves_it_unusable(serve):
    server = serve({
        "/close-header": b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
        "/http10": b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY,
        "/to-close": b"HTTP/1.1 200 OK\r\n\r\n" + BODY,
        "/missing": b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\n\r\nno!",
    }, keep_alive=True)
    fetcher = Fetcher(DownloadConfig(allow_private=True, timeout_s=2.0, retries=0))
    for path in ("/close-header", "/http10", "/close-header", "/http10"):
        assert fetcher.fetch(server.url + path) == BODY, path
    with pytest.raises(Rejected):
        fetcher.fetch(server.url + "/missing")
    with pytest.raises(Rejected):  # its body unread: a new connection
        fetcher.fetch(server.url + "/missing")
    assert server.connections == 6


def test_a_kept_connection_the_server_closed_is_replaced_without_using_a_retry(serve):
    # This server closes after each answer although its HTTP/1.1 responses allow another request: the
    # next request on the kept connection finds it closed and goes again on a new one (retries=0).
    server = serve({"/length": LENGTH})
    fetcher = Fetcher(DownloadConfig(allow_private=True, timeout_s=2.0, retries=0))
    for _ in range(4):
        assert fetcher.fetch(server.url + "/length") == BODY
    assert (server.connections, len(server.requests)) == (4, 4)
