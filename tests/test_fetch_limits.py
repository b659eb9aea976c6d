"""Hard limits on what one index row can make the shard stage do, against real servers on 127.0.0.1:
a wall-clock deadline during the read, schemes allow-listed, local reads of regular files only, no
requests to loopback, private or link-local addresses (redirect hops included), and each refusal a
per-image failure with its reason."""
from __future__ import annotations

import csv
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from typing import Callable
from urllib.parse import quote

import fsspec
import pytest

from pipelines import fetch
from pipelines.config import ConfigError, DownloadConfig, load_config, replace
from pipelines.fetch import MAX_BYTES, Fetcher
from pipelines.images import Rejected
from pipelines.ordered import fetch_and_convert
from shard_inputs import ImageServer, bomb_png, jpeg

IMAGE = jpeg(1, (64, 48))  # 3.5 KB: dripped at 4 bytes a second it would take a quarter of an hour
LOOPBACK = ipaddress.ip_address("127.0.0.1")


def fetcher(**download) -> Fetcher:
    return Fetcher(DownloadConfig(**{"timeout_s": 2.0, "retries": 0, **download}))


def reason_of(call: Callable[[], bytes], within_s: float = 5.0) -> tuple[str, str]:
    """``(reason, message)`` of the ``Rejected`` that ``call`` raises, asserting that it comes within
    ``within_s`` (in a daemon thread, so that a call that blocks fails the test instead of hanging it)."""
    out: dict = {}

    def run() -> None:
        try:
            out["value"] = call()
        except Rejected as e:
            out["rejected"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(within_s)
    assert not thread.is_alive(), f"still running after {within_s} s"
    assert "rejected" in out, f"accepted: {len(out['value'])} bytes"
    return out["rejected"].reason, str(out["rejected"])


@pytest.fixture
def server():
    with ImageServer({"a.jpg": IMAGE}) as s:
        yield s


@pytest.fixture
def trust_the_test_server(monkeypatch):
    """127.0.0.1, where the test server listens, counts as public (and nothing else): private
    addresses stay refused, so a redirect from the server to another one is checked for real."""
    real = fetch._public
    monkeypatch.setattr(fetch, "_public", lambda ip: ip == LOOPBACK or real(ip))


# --------------------------------------------------------------------------- deadline


def _tls_pair(tmp_path) -> tuple[ssl.SSLContext, str]:
    """A server context with a fresh self-signed certificate for 127.0.0.1, and the certificate's path."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, str(cert)


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.timeout(60)
def test_a_server_dripping_one_byte_at_a_time_is_cut_at_the_deadline(tmp_path, monkeypatch, scheme):
    tls = None
    if scheme == "https":
        tls, cert = _tls_pair(tmp_path)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)  # trusted like a corporate CA would be
    with ImageServer({"a.jpg": IMAGE}, drip_s=0.25, tls=tls) as server:
        get = fetcher(allow_private=True).fetch
        assert get(f"{server.url}/img/a.jpg") == IMAGE  # the server (and TLS) work when not dripping

        start = time.monotonic()
        reason, message = reason_of(lambda: get(f"{server.url}/drip/a.jpg"), within_s=30)
        took = time.monotonic() - start
        assert reason == "timeout" and "within 2 s" in message
        assert 1.9 < took < 2.0 + 2.0, took  # the deadline holds while bytes keep coming
        # Closed, the server's next write is answered with a reset and the one after fails, so its count
        # stops within two drips; one left open (read or not) would take a byte every 0.25 s.
        time.sleep(0.6)
        settled = server.drips
        time.sleep(1.0)
        assert server.drips == settled  # the connection was closed, not left reading
        assert 0 < settled < len(IMAGE)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_kept_alive_connections_are_reused_tls_included(tmp_path, monkeypatch, scheme):
    tls = None
    if scheme == "https":
        tls, cert = _tls_pair(tmp_path)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", cert)
    with ImageServer({"a.jpg": IMAGE}, tls=tls, protocol="HTTP/1.1") as server:
        with fetcher(allow_private=True) as get:
            for _ in range(4):
                assert get.fetch(f"{server.url}/img/a.jpg") == IMAGE
            assert server.connections == 1  # one connect and one handshake for the four
            assert get.fetch(f"{server.url}/redirect/a.jpg") == IMAGE  # a redirect's connection is not kept
            assert get.fetch(f"{server.url}/img/a.jpg") == IMAGE
        assert server.connections == 2


# --------------------------------------------------------------------------- schemes


@pytest.mark.parametrize("template,refused", [
    ("simplecache::{url}/img/a.jpg", "simplecache"),  # fsspec's http reader: no cap, no deadline, no noai
    ("blockcache::{url}/img/a.jpg", "blockcache"),
    ("ftp://{host}/a.jpg", "ftp"),
    ("memory://a.jpg", "memory"),
    ("simplecache::s3://bucket/a.jpg", "simplecache"),  # s3 is allowed, the link in front is not
])
def test_unlisted_schemes_and_fsspec_chains_are_refused(server, template, refused):
    url = template.format(url=server.url, host=server.url.split("://")[1])
    reason, message = reason_of(lambda: fetcher(allow_private=True).fetch(url))
    assert reason == "scheme" and f"{refused}://" in message and "allowed_schemes" in message
    assert server.paths == []  # refused before any request


def test_a_chain_is_refused_with_http_inside_even_when_its_links_are_listed(server):
    get = fetcher(allow_private=True, allowed_schemes=("simplecache",)).fetch
    reason, message = reason_of(lambda: get(f"simplecache::{server.url}/img/a.jpg"))
    assert reason == "scheme" and "http:// inside an fsspec chain" in message
    assert server.paths == []


def test_listed_schemes_are_read():
    fsspec.filesystem("memory").pipe("/limits/a.jpg", IMAGE)
    assert fetcher(allowed_schemes=("memory",)).fetch("memory://limits/a.jpg") == IMAGE


# --------------------------------------------------------------------------- local files


def test_fifos_devices_and_folders_are_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would wait for a writer forever
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    os.makedirs(tmp_path / "folder.jpg")
    get = Fetcher(DownloadConfig(), base=str(tmp_path)).fetch
    for location, kind in [("pipe.jpg", "a FIFO"), ("/dev/zero", "a character device"),
                           ("file:///dev/zero", "a character device"), ("zero.jpg", "a character device"),
                           ("folder.jpg", "a directory")]:
        reason, message = reason_of(lambda: get(location), within_s=2)
        assert (reason, kind) == ("not_a_file", message.split(": ")[1]), message


def test_local_files_are_capped_like_downloads(tmp_path):
    with open(tmp_path / "huge.jpg", "wb") as f:
        f.truncate(MAX_BYTES + 1)  # sparse: refused by its size, never read
    (tmp_path / "ok.jpg").write_bytes(IMAGE)
    get = Fetcher(DownloadConfig(), base=str(tmp_path)).fetch
    assert reason_of(lambda: get("huge.jpg"), within_s=2)[0] == "too_large"
    assert get("ok.jpg") == IMAGE and get(f"file://{tmp_path}/ok.jpg") == IMAGE


# --------------------------------------------------------------------------- private addresses


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1",
                                  "192.168.1.1", "[::ffff:127.0.0.1]", "0.0.0.0"])
def test_hosts_at_private_addresses_are_refused(server, host):
    port = server.url.rsplit(":", 1)[1]
    reason, message = reason_of(lambda: fetcher().fetch(f"http://{host}:{port}/img/a.jpg"))
    assert reason == "private_address" and "allow_private" in message
    assert server.paths == []  # nothing was sent


def test_a_name_with_any_private_address_is_refused(server, monkeypatch):
    """Every address of the name is checked: one private answer among public ones is enough."""
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):
        if host != "images.example":
            return real(host, *args, **kwargs)
        port = args[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.216.34", "127.0.0.1")]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    reason, message = reason_of(lambda: fetcher().fetch("http://images.example/a.jpg"))
    assert reason == "private_address" and "127.0.0.1" in message


@pytest.mark.timeout(60)
def test_redirects_to_private_addresses_are_refused(server, trust_the_test_server):
    with ImageServer({"a.jpg": IMAGE}, host="127.0.0.2") as inside:  # a service only the node can reach
        targets = {f"{inside.url}/img/a.jpg": "private_address",
                   "http://169.254.169.254/latest/meta-data/": "private_address",  # cloud credentials
                   "http://10.1.2.3/admin": "private_address",
                   "http://[::1]/": "private_address",
                   "file:///etc/passwd": "scheme"}
        for target, expected in targets.items():
            hop = f"{server.url}/goto/{quote(target, safe='')}"
            reason, message = reason_of(lambda: fetcher().fetch(hop))
            assert reason == expected, message
        assert inside.paths == []

        # The same hop is taken when private addresses are allowed: it was the check that stopped it.
        hop = f"{server.url}/goto/{quote(f'{inside.url}/img/a.jpg', safe='')}"
        assert fetcher(allow_private=True).fetch(hop) == IMAGE
        assert inside.paths == ["/img/a.jpg"]
    assert fetcher().fetch(f"{server.url}/redirect/a.jpg") == IMAGE  # a redirect within allowed hosts


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,message", [
    ({"shard.download.allowed_schemes": ["http"]}, "always read"),
    ({"shard.download.allowed_schemes": ["S3://"]}, "not an fsspec scheme"),
    ({"shard.download.allowed_schemes": [], "workdir": "s3://bucket/run"}, "add 's3'"),
    ({"shard.max_decoded_mb": 0}, "shard.max_decoded_mb: must be >= 1"),
])
def test_config_checks(overrides, message):
    with pytest.raises(ConfigError, match=message):
        replace(load_config(None), **overrides)


def test_defaults_read_object_storage_and_refuse_private_addresses():
    download = load_config(None).shard.download
    assert "s3" in download.allowed_schemes and "gs" in download.allowed_schemes
    assert not download.allow_private


# --------------------------------------------------------------------------- in the stage


@pytest.mark.timeout(180)
def test_refusals_are_per_image_failures_of_the_stage(ray_local, tmp_path, server):
    from pipelines.shard import run_shard_stage

    (tmp_path / "good.jpg").write_bytes(IMAGE)
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    os.mkfifo(tmp_path / "pipe.jpg")
    rows = [("good.jpg", "x"), ("pipe.jpg", "x"), ("/dev/zero", "x"), ("bomb.png", "x"),
            (f"{server.url}/img/a.jpg", "x"), (f"simplecache::{server.url}/img/a.jpg", "x")]
    with open(tmp_path / "index.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *rows])
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": str(tmp_path / "index.csv"),
                                        "shard.samples_per_shard": 3, "shard.max_in_flight": 2})
    manifest = run_shard_stage(cfg)
    assert manifest["totals"]["ok"] == 1
    assert manifest["failed_by_reason"] == {"not_a_file": 2, "private_address": 1, "scheme": 1, "too_large": 1}
    assert server.paths == []


# --------------------------------------------------------------------------- results in order, stalls aside


def _ordered(fn, n: int, threads: int = 4, held_bytes: int = 1 << 20, size=lambda r: 1, convert=lambda r: r):
    return [(item, result) for item, result, _ in
            fetch_and_convert(fn, convert, list(range(n)), threads, held_bytes=held_bytes, size=size)]


def test_results_come_in_input_order_whatever_the_timing():
    import random

    delays = [random.Random(i).random() * 0.01 for i in range(200)]
    assert _ordered(lambda i: (time.sleep(delays[i]), i * i)[1], 200) == [(i, i * i) for i in range(200)]


def test_a_stalled_first_download_does_not_stop_the_others():
    """Item 0 hangs until every other item has been fetched: with a window of a few items this would
    never happen (the old behaviour), here the rest all finish behind it and then come out in order."""
    others_done = threading.Event()
    count = [0]
    lock = threading.Lock()

    def fn(i):
        if i == 0:
            assert others_done.wait(30), "the other items stopped behind the stalled first one"
            return i
        with lock:
            count[0] += 1
            if count[0] == 99:
                others_done.set()
        return i

    converted = []
    caller = threading.get_ident()
    assert _ordered(fn, 100, convert=lambda r: (converted.append((r, threading.get_ident())), r)[1]) == \
        [(i, i) for i in range(100)]
    assert converted[-1] == (0, caller)  # the others were converted while it stalled, on the calling thread
    assert sorted(converted) == [(i, caller) for i in range(100)]


def test_results_held_behind_a_stall_stay_within_the_byte_budget():
    """While item 0 hangs, finished results pile up only to the budget (10 results of 100 bytes here),
    plus the calls already running; then the stall is waited out and nothing is lost."""
    release = threading.Event()
    finished = []

    def fn(i):
        if i == 0:
            release.wait(30)
        finished.append(i)
        return i

    got = []
    consumer = threading.Thread(target=lambda: got.extend(_ordered(fn, 100, held_bytes=1000, size=lambda r: 100)))
    consumer.start()
    deadline = time.monotonic() + 10
    while len(finished) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # any call that was going to start has started by now
    assert 10 <= len(finished) <= 10 + 8, len(finished)  # the budget, plus the calls running (2 x 4 threads)
    release.set()
    consumer.join(30)
    assert got == [(i, i) for i in range(100)]


def test_a_failure_comes_out_in_its_place():
    def fn(i):
        if i == 3:
            raise Rejected("http_404", "x")
        return i

    def convert(i):
        if i == 4:
            raise ValueError("a decoder tripped")
        return i

    got = [result if error is None else type(error).__name__ for _, result, error in
           fetch_and_convert(fn, convert, list(range(6)), 2, held_bytes=1 << 20, size=lambda r: 1)]
    assert got == [0, 1, 2, "Rejected", "ValueError", 5]
    got = [result if error is None else type(error).__name__ for _, result, error in
           fetch_and_convert(fn, convert, list(range(6)), 0, held_bytes=1 << 20, size=lambda r: 1)]
    assert got == [0, 1, 2, "Rejected", "ValueError", 5]  # the same without threads


def test_a_consumer_that_stops_leaves_the_downloads_not_begun_undone():
    """Items 0 to 3 are handed out at once (2 threads x 2); item 1 holds its thread, so item 3 is still
    queued when the consumer stops after item 0, and is never fetched."""
    release = threading.Event()
    called = []

    def fn(i):
        called.append(i)
        if i >= 1:
            release.wait(10)
        return i

    results = fetch_and_convert(fn, lambda r: r, list(range(10)), 2, held_bytes=1 << 20, size=lambda r: 1)
    assert next(results)[:2] == (0, 0)
    threading.Timer(0.3, release.set).start()
    results.close()  # waits for the downloads in progress
    assert 3 not in called and set(called) <= {0, 1, 2}


@pytest.mark.parametrize("protocol", ["HTTP/1.0", "HTTP/1.1"])
@pytest.mark.parametrize("per_host,most", [(2, 2), (0, 8)])
def test_connections_to_one_host_are_capped_per_task(per_host, most, protocol):
    """``per_host`` connections to one host at a time, however many threads fetch; 0 lifts the cap.
    A server that keeps connections alive (``http.server`` speaking HTTP/1.1, Nagle's algorithm on)
    sees no more connections than that: each is reused by the next request."""
    from concurrent.futures import ThreadPoolExecutor
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = {"now": 0, "most": 0, "connections": 0}
    lock = threading.Lock()
    arrived = threading.Barrier(most, timeout=10)  # with no cap, all 8 must be in at once to pass

    class Handler(BaseHTTPRequestHandler):
        protocol_version = protocol

        def setup(self):
            super().setup()
            with lock:
                seen["connections"] += 1

        def do_GET(self):
            with lock:
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            if per_host == 0:
                arrived.wait()
            time.sleep(0.2)
            with lock:
                seen["now"] -= 1
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fetcher = Fetcher(DownloadConfig(allow_private=True, per_host=per_host))
        url = f"http://127.0.0.1:{server.server_address[1]}/x"
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(fetcher.fetch, [url] * 16)) == [b"ok"] * 16
    finally:
        server.shutdown()
        server.server_close()
    assert seen["most"] == most
    assert seen["connections"] == (16 if protocol == "HTTP/1.0" else most)
