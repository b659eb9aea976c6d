"""Fetching the bytes behind one image location, with a failure reason when that is not possible.

Locations are local paths (relative ones are taken from the index's folder), ``file://`` URLs, any
fsspec URL (``s3://``, ``gs://``, ...) and ``http(s)://``. HTTP gets a timeout per attempt (connect,
each read and the whole body), retries with exponential backoff on timeouts, dropped connections,
408/429/5xx, and refuses images whose response says ``X-Robots-Tag: noai`` or ``noimageai``.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, TypeVar
from urllib.parse import unquote, urlsplit

from pipelines.config import DownloadConfig
from pipelines.images import Rejected
from pretrain.storage import is_url

USER_AGENT = "vitscale/0.1 (+image pretraining dataset builder)"
MAX_BYTES = 64 << 20  # a response larger than any sane image is refused, not buffered
CHUNK = 1 << 16
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
NOAI = frozenset({"noai", "noimageai"})

T = TypeVar("T")
R = TypeVar("R")


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
        self._local = threading.local()

    def fetch(self, location: str) -> bytes:
        """The bytes at ``location``, or ``Rejected`` with the reason (missing, http_404, timeout, ...)."""
        target = resolve(location, self.base)
        scheme = urlsplit(target).scheme.lower() if is_url(target) else ""
        if scheme in ("http", "https"):
            return self._http(target)
        if scheme == "file":
            return _read_local(unquote(urlsplit(target).path))
        if scheme:
            return self._retrying(lambda: _read_fsspec(target))
        return _read_local(target)

    def _session(self):
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
        return session

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
        import requests

        def attempt() -> bytes:
            t = self.cfg.timeout_s
            deadline = time.monotonic() + t
            try:
                with self._session().get(url, timeout=(t, t), stream=True) as r:
                    if self.cfg.respect_noai and noai_directive(r.headers.get("X-Robots-Tag")):
                        raise Rejected("noai", f"X-Robots-Tag: {r.headers['X-Robots-Tag']}")
                    if r.status_code >= 400:
                        err = Rejected(f"http_{r.status_code}", url)
                        if r.status_code in RETRY_STATUS:
                            raise _Retryable(err)
                        raise err
                    return _read_body(r, deadline, url)
            except requests.Timeout:
                raise _Retryable(Rejected("timeout", f"no answer within {t:g} s: {url}")) from None
            except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as e:
                raise _Retryable(Rejected("connection", f"{type(e).__name__}: {url}")) from None
            except requests.RequestException as e:  # bad URL, too many redirects, ...
                raise Rejected("bad_url", f"{type(e).__name__}: {url}") from None

        return self._retrying(attempt)


class _Retryable(Exception):
    def __init__(self, rejected: Rejected):
        super().__init__(str(rejected))
        self.rejected = rejected


def _read_body(response, deadline: float, url: str) -> bytes:
    parts, size = [], 0
    for chunk in response.iter_content(CHUNK):
        parts.append(chunk)
        size += len(chunk)
        if size > MAX_BYTES:
            raise Rejected("too_large", f"response over {MAX_BYTES >> 20} MiB: {url}")
        if time.monotonic() > deadline:
            raise _Retryable(Rejected("timeout", f"body not complete in time: {url}"))
    return b"".join(parts)


def _read_local(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing", path) from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise Rejected("unreadable", f"{type(e).__name__}: {path}") from None


def _read_fsspec(url: str) -> bytes:
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise Rejected("missing", url) from None
    except (PermissionError, IsADirectoryError) as e:
        raise Rejected("unreadable", f"{type(e).__name__}: {url}") from None
    except OSError as e:  # network trouble of the object store: worth another try
        raise _Retryable(Rejected("connection", f"{type(e).__name__}: {url}")) from None


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[tuple[T, Future]]:
    """``(item, future)`` in input order, with at most ``window`` calls submitted ahead."""
    pending: deque[tuple[T, Future]] = deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            yield pending.popleft()
    while pending:
        yield pending.popleft()


class Deferred:
    """A call made when its result is asked for: the ``Future`` stand-in for sources that need no threads."""

    def __init__(self, fn: Callable[[T], R], item: T):
        self.fn, self.item = fn, item

    def result(self) -> R:
        return self.fn(self.item)


def fetch_in_order(fn: Callable[[T], R], items: list[T], threads: int,
                   remote: Callable[[T], bool]) -> Iterator[tuple[T, "Future | Deferred"]]:
    """``(item, future)`` in input order. Items on the network are fetched ``threads`` at a time ahead
    of use; when there are none (local files read in microseconds), no threads are started at all,
    since handing each read to a thread costs more than the read."""
    if not any(remote(item) for item in items):
        yield from ((item, Deferred(fn, item)) for item in items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="fetch") as pool:
        yield from ordered_map(pool, fn, items, window=2 * threads + 2)
