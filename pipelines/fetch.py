"""Fetching the bytes behind one image location, with a failure reason when that is not possible.

Index rows come from outside, so every read has hard limits, and each refusal is a ``Rejected`` with its
reason (one failed image, never a failed stage):

- ``http(s)://``: at most ``timeout_s`` per attempt from connect to the last byte, enforced on every
  receive (a server that drips a byte at a time is cut at the deadline), at most ``MAX_BYTES``; the host
  and every redirect hop are resolved and refused when any address is not global (loopback, private,
  link-local: a node's cloud metadata endpoint) unless ``allow_private``, and the connection goes to the
  address checked, so a second DNS answer cannot swap it. At most ``per_host`` connections to one host
  at a time per task (a crawler's politeness; a list over many hosts keeps every thread busy), kept
  alive between requests where the server allows it and counted while kept.
  Retries with exponential backoff on timeouts, dropped connections, 408/429/5xx; refuses images
  whose response says ``X-Robots-Tag: noai`` or ``noimageai``.
- local paths (relative ones are taken from the index's folder) and ``file://``: regular files only
  (FIFOs, devices, directories are refused without opening them), at most ``MAX_BYTES``.
- other schemes go through fsspec, and only those in ``allowed_schemes`` (every link of a ``::`` chain):
  at most ``MAX_BYTES``, the deadline checked between pieces (the store's client bounds each request).
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import ipaddress
import math
import os
import socket
import ssl
import stat
import struct
import threading
import time
from typing import Callable, Optional
from urllib.parse import quote, unquote, urljoin, urlsplit

from pipelines import http1
from pipelines.config import DownloadConfig
from pipelines.images import Rejected
from pretrain.storage import is_url

USER_AGENT = "vitscale/0.1 (+image pretraining dataset builder)"
HEADERS = {"User-Agent": USER_AGENT, "Accept": "*/*", "Accept-Encoding": "identity"}
MAX_BYTES = 64 << 20  # a response larger than any sane image is refused, not buffered
CHUNK = 1 << 16
MAX_REDIRECTS = 5
QUICK_ACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only
IDLE_S = 4.0  # a kept connection idle longer is closed, not reused (servers drop idle ones after 5 s or more)
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
REDIRECT_STATUS = frozenset({301, 302, 303, 307, 308})
NOAI = frozenset({"noai", "noimageai"})
GUARDED = frozenset({"http", "https", "file"})  # read here with the limits, never handed to fsspec
URL_SAFE = "!#$%&'()*+,/:;=?@[]~"  # kept as written when quoting a path, as requests does
FILE_KINDS = {"d": "a directory", "p": "a FIFO", "c": "a character device", "b": "a block device",
              "s": "a socket"}  # stat.filemode's first letter


def resolve(location: str, base: Optional[str]) -> str:
    """A location as written in the index, made absolute against the index's folder ``base``."""
    if is_url(location) or os.path.isabs(location) or not base:
        return location
    if is_url(base):
        return base.rstrip("/") + "/" + location
    return os.path.join(base, location)


def noai_directive(header: Optional[str], agent: str = "vitscale") -> bool:
    """True when an ``X-Robots-Tag`` value forbids AI use for every crawler or for ``agent``.

    Directives may be scoped to one crawler (``otherbot: noai``); those for other crawlers do not apply.
    """
    if not header:
        return False
    scope = None
    for part in header.split(","):
        part = part.strip().lower()
        if ":" in part:
            scope, part = (s.strip() for s in part.split(":", 1))
        if part in NOAI and scope in (None, agent):
            return True
    return False


class Fetcher:
    """Reads image bytes for one shard task; safe to call from many threads at once."""

    def __init__(self, download: DownloadConfig, base: Optional[str] = None):
        self.cfg = download
        self.base = base
        self._hosts: dict[tuple[str, int], threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()  # guards _hosts, _idle and _closed
        self._idle: dict[tuple[str, str, int], list[tuple[float, socket.socket]]] = {}
        self._closed = False

    def __enter__(self) -> "Fetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections kept for reuse, and any a download still running would keep."""
        with self._lock:
            kept, self._idle, self._closed = self._idle, {}, True
        for conns in kept.values():
            for _, sock in conns:
                sock.close()

    def _take_idle(self, key: tuple[str, str, int]) -> Optional[socket.socket]:
        """The most recently used kept connection to ``key`` (scheme, host, port), if one is fresh enough."""
        with self._lock:
            conns = self._idle.get(key)
            while conns:
                since, sock = conns.pop()
                if time.monotonic() - since < IDLE_S:
                    return sock
                sock.close()
        return None

    def _keep(self, key: tuple[str, str, int], sock: socket.socket) -> None:
        with self._lock:
            if not self._closed:
                self._idle.setdefault(key, []).append((time.monotonic(), sock))
                return
        sock.close()

    def _host_slot(self, host: str, port: int) -> "threading.BoundedSemaphore | contextlib.nullcontext":
        """What a request to ``host:port`` holds while it runs: one of ``per_host`` slots (waiting for a
        slot is not part of the request's deadline), or nothing when unlimited."""
        if self.cfg.per_host <= 0:
            return contextlib.nullcontext()
        with self._lock:
            slot = self._hosts.get((host, port))
            if slot is None:
                slot = self._hosts[(host, port)] = threading.BoundedSemaphore(self.cfg.per_host)
        return slot

    def fetch(self, location: str) -> bytes:
        """The bytes at ``location``, or ``Rejected`` with the reason (missing, http_404, timeout, ...)."""
        target = resolve(location, self.base)
        if not is_url(target):
            return _read_local(target)
        scheme = self._scheme(target)
        if scheme == "file":
            return _read_local(unquote(urlsplit(target).path))
        if scheme in ("http", "https"):
            return self._retrying(lambda: self._http(target))
        return self._retrying(lambda: _read_fsspec(target, time.monotonic() + self.cfg.timeout_s))

    def _scheme(self, target: str) -> str:
        """The scheme of ``target`` (a ``::`` chain's first link), or ``Rejected`` when one is not allowed."""
        scheme = urlsplit(target).scheme.lower()
        if scheme in GUARDED:  # read here, where "::" is just characters (http://[::1]/), never a chain
            return scheme
        links = [part.split("://", 1)[0].lower() for part in target.split("::")]  # as fsspec splits it
        for link in links:
            if link in GUARDED:  # fsspec's own http or file reader would skip every limit here
                raise Rejected("scheme", f"{link}:// inside an fsspec chain is not read: {target}")
            if link not in self.cfg.allowed_schemes:
                raise Rejected("scheme", f"{link}:// is not in shard.download.allowed_schemes "
                                         f"{list(self.cfg.allowed_schemes)}: {target}")
        return links[0]

    def _retrying(self, attempt: Callable[[], bytes]) -> bytes:
        """Run ``attempt`` up to 1 + retries times; only ``Rejected`` marked retryable is retried."""
        for i in range(self.cfg.retries + 1):
            try:
                return attempt()
            except _Retryable as e:
                last = e.rejected
            if i < self.cfg.retries:
                time.sleep(self.cfg.backoff_s * (2 ** i))
        raise last

    def _http(self, url: str) -> bytes:
        """One attempt at ``url``, its errors turned into reasons."""
        try:
            return self._follow(url)
        except TimeoutError:
            raise _Retryable(Rejected("timeout", f"not complete within {self.cfg.timeout_s:g} s: {url}")) from None
        except ssl.SSLCertVerificationError as e:
            raise Rejected("tls", f"{e.verify_message}: {url}") from None
        except http.client.InvalidURL as e:
            raise Rejected("bad_url", f"{e}: {url}") from None
        except (OSError, http.client.HTTPException) as e:  # refused, reset, DNS failure, not HTTP at all
            raise _Retryable(Rejected("connection", f"{type(e).__name__}: {url}")) from None

    def _follow(self, url: str) -> bytes:
        """GET ``url``, following redirects ourselves so that every hop's scheme and address is checked.
        The attempt's ``timeout_s`` runs from its first connect (not while waiting for a host slot)."""
        deadline = None
        for _ in range(MAX_REDIRECTS + 1):
            parts = _split(url)
            with self._host_slot(parts[1], parts[2]):
                deadline = deadline or time.monotonic() + self.cfg.timeout_s
                sock, response = self._exchange(parts, deadline)
                keep = False
                try:
                    location = response.header("Location") if response.status in REDIRECT_STATUS else None
                    if location is None:
                        body = self._body(response, url)
                        keep = response.reusable
                        return body
                finally:
                    if keep:
                        self._keep(parts[:3], sock)
                    else:
                        sock.close()
            url = _redirect(url, location)
        raise Rejected("redirects", f"more than {MAX_REDIRECTS}: {url}")

    def _exchange(self, parts: tuple[str, str, int, str], deadline: float) -> tuple[socket.socket, http1.Response]:
        """The GET of ``parts`` (``_split``'s) sent and its response's head read, on a kept connection to
        the host when there is one (no new connect, no TLS handshake), else on a new one. A kept
        connection the server closed meanwhile fails before the response's first byte; the request
        then goes once more on a new connection, as urllib3 does, without counting as a retry."""
        scheme, host, port, target = parts
        request = http1.request(host, port, 443 if scheme == "https" else 80, target, HEADERS)
        sock = self._take_idle(parts[:3])
        if sock is not None:
            try:
                return sock, _ask(sock, request, deadline)
            except BaseException as e:
                sock.close()
                if not isinstance(e, (ConnectionError, ssl.SSLEOFError, ssl.SSLZeroReturnError)):
                    raise
        sock = self._open(scheme, host, port, deadline)
        try:
            return sock, _ask(sock, request, deadline)
        except BaseException:
            sock.close()
            raise

    def _open(self, scheme: str, host: str, port: int, deadline: float) -> socket.socket:
        """A new connection to a checked address of ``host`` (TLS for https)."""
        sock = _connect(self._addresses(host, port), deadline)  # the checked addresses only
        if scheme == "https":
            try:
                return _tls_context(_ca_bundle()).wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        sock.settimeout(None)  # receives end by the deadline through the kernel (_DeadlineSocket)
        return sock

    def _addresses(self, host: str, port: int) -> list[tuple[int, tuple]]:
        """``(family, sockaddr)`` for each address of ``host``; ``Rejected`` when any one is not global
        and private addresses are not allowed (one bad answer among good ones is enough to refuse)."""
        found = [(family, sockaddr) for family, _, _, _, sockaddr in
                 socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
        if not self.cfg.allow_private:
            for _, sockaddr in found:
                ip = ipaddress.ip_address(sockaddr[0])
                if not _public(ip):
                    raise Rejected("private_address", f"{ip} is not a public address (host {host}; "
                                                      "shard.download.allow_private is off)")
        return found

    def _body(self, response: http1.Response, url: str) -> bytes:
        if self.cfg.respect_noai and noai_directive(response.header("X-Robots-Tag")):
            raise Rejected("noai", f"X-Robots-Tag: {response.header('X-Robots-Tag')}")
        if response.status >= 300:
            err = Rejected(f"http_{response.status}", url)
            raise _Retryable(err) if response.status in RETRY_STATUS else err
        try:
            return response.body(MAX_BYTES)
        except http1.TooLarge as e:
            raise Rejected("too_large", f"{e} over {MAX_BYTES >> 20} MiB: {url}") from None


class _Retryable(Exception):
    def __init__(self, rejected: Rejected):
        super().__init__(str(rejected))
        self.rejected = rejected


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Routable on the internet: not loopback, private, link-local, shared (CGNAT), reserved or multicast."""
    return ip.is_global and not ip.is_multicast


def _split(url: str) -> tuple[str, str, int, str]:
    """Scheme, host (IDNA-encoded), port and request target of an http(s) URL, or ``Rejected('bad_url')``."""
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").encode("idna").decode("ascii")
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:  # a port that is no number, a host IDNA cannot encode
        raise Rejected("bad_url", url) from None
    if not host:
        raise Rejected("bad_url", f"no host: {url}")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port, quote(target, safe=URL_SAFE)


def _redirect(url: str, location: str) -> str:
    """The next hop of a redirect, or ``Rejected`` when it leaves http(s) (``file://``, ``gopher://``...)."""
    hop = urljoin(url, location)
    if urlsplit(hop).scheme.lower() not in ("http", "https"):
        raise Rejected("scheme", f"redirect to {hop} from {url}: only http and https are followed")
    return hop


class _DeadlineRecv:
    """Every receive waits only until ``deadline`` (set once connected). A response head, a body or a
    TLS record takes as many receives as the server makes it, so a timeout per receive alone lets a
    server that sends one byte now and then hold a read forever."""

    deadline: float

    def recv_into(self, *args, **kwargs) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.settimeout(left)
        _quick_ack(self)
        return super().recv_into(*args, **kwargs)


class _DeadlineSocket(socket.socket):
    """A TCP connection whose every receive ends by ``deadline`` (as ``_DeadlineRecv``), blocking with the
    kernel's receive timeout: one system call per receive, where Python's own timeout makes two (a
    poll, then the read), each a release and retake of the GIL. TLS keeps Python's (its records are
    read through OpenSSL, which a kernel timeout would leave mid-record)."""

    deadline: float

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(left))
        _quick_ack(self)
        try:
            return super().recv_into(buffer, nbytes, flags)
        except BlockingIOError:  # what the kernel's timeout gives a blocking socket
            raise TimeoutError("deadline passed") from None


def _quick_ack(sock: socket.socket) -> None:
    """Acknowledge what arrives at once (Linux; its quick-ack mode ends by itself, so before every
    receive). On a kept-alive connection a server that writes the head and the body apart and leaves
    Nagle's algorithm on (Python's http.server does) holds the body's last piece until the head is
    acknowledged, and a delayed acknowledgement waits up to 40 ms: 61 s for 6,000 loopback images
    instead of 11 to 13 on a connection per image."""
    if QUICK_ACK is not None:
        sock.setsockopt(socket.IPPROTO_TCP, QUICK_ACK, 1)


def _ask(sock: socket.socket, request: bytes, deadline: float) -> http1.Response:
    """``request`` sent on ``sock`` and its response's head read, every send and receive ending by
    ``deadline``."""
    sock.deadline = deadline
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(max(1e-3, deadline - time.monotonic()))  # the send's; each receive sets its own
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(deadline - time.monotonic()))
    sock.sendall(request)
    return http1.Response(sock)


def _timeval(seconds: float) -> bytes:
    """``struct timeval`` for a socket timeout: at least a microsecond (zero would mean none)."""
    micro = max(1, round(seconds * 1e6))
    return struct.pack("ll", micro // 1_000_000, micro % 1_000_000)


class _DeadlineSSLSocket(_DeadlineRecv, ssl.SSLSocket):
    pass


def _connect(addresses: list[tuple[int, tuple]], deadline: float) -> socket.socket:
    """A TCP connection to the first of ``addresses`` that answers before ``deadline``."""
    error: OSError = TimeoutError("deadline passed")
    for family, sockaddr in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = _DeadlineSocket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(left)
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def _ca_bundle() -> str:
    """The CA bundle requests would use (its variables, then certifi's): nodes without system CAs verify."""
    from requests.certs import where

    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or where()


@functools.lru_cache(maxsize=None)
def _tls_context(cafile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.sslsocket_class = _DeadlineSSLSocket  # the deadline holds inside TLS too
    return context


def _read_capped(read: Callable[[int], bytes], where: str, deadline: float = math.inf) -> bytes:
    """Everything ``read`` gives, refused once past ``MAX_BYTES`` or ``deadline`` rather than buffered on."""
    parts, size = [], 0
    while chunk := read(CHUNK):
        size += len(chunk)
        if size > MAX_BYTES:
            raise Rejected("too_large", f"over {MAX_BYTES >> 20} MiB: {where}")
        if time.monotonic() > deadline:
            raise _Retryable(Rejected("timeout", f"not complete in time: {where}"))
        parts.append(chunk)
    return b"".join(parts)


def _check_regular(st: os.stat_result, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = FILE_KINDS.get(stat.filemode(st.st_mode)[0], "not a regular file")
        raise Rejected("not_a_file", f"{kind}: {path}")
    if st.st_size > MAX_BYTES:
        raise Rejected("too_large", f"{st.st_size} bytes, over {MAX_BYTES >> 20} MiB: {path}")


def _read_local(path: str) -> bytes:
    """A regular file's bytes. Checked before opening, since opening a FIFO waits for a writer and a
    device like ``/dev/zero`` never ends; opened non-blocking in case it was swapped since the check."""
    try:
        _check_regular(os.stat(path), path)
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
            _check_regular(os.fstat(f.fileno()), path)
            return _read_capped(f.read, path)
    except FileNotFoundError:
        raise Rejected("missing", path) from None
    except OSError as e:  # no permission, an I/O error
        raise Rejected("unreadable", f"{type(e).__name__}: {path}") from None


def _read_fsspec(url: str, deadline: float) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            if (getattr(f, "size", None) or 0) > MAX_BYTES:
                raise Rejected("too_large", f"{f.size} bytes, over {MAX_BYTES >> 20} MiB: {url}")
            return _read_capped(f.read, url, deadline)
    except FileNotFoundError:
        raise Rejected("missing", url) from None
    except (PermissionError, IsADirectoryError) as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {url}") from None
    except OSError as e:  # network trouble of the object store: worth another try
        raise _Retryable(Rejected("connection", f"{type(e).__name__}: {url}")) from None
