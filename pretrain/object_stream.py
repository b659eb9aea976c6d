"""Reading an object on object storage as a stream that survives a broken connection (the loader's
shards).

One retry layer, ours. A GET through s3fs would be retried silently twice over: s3fs's
``_error_wrapper`` (``retries=5``, each retry re-reading the whole range from its start) around
botocore's own retry handler (up to 5 attempts on resets, 5xx and throttling): up to 25 attempts
per request, none of them counted or logged. So objects on ``s3://`` are read with a client whose
botocore retries are off, called directly (no s3fs wrapper), and every transient error reaches
``_ResumingReader``: it counts it, warns, backs off and resumes with a ranged GET from the byte it
had reached (pinned to the first response's ETag, so two versions of an object are never spliced),
at most ``READ_RETRIES`` times per opened stream; then the error is raised for the caller to skip
the object. Other fsspec backends (gs://, ...) keep their library's retries; what still gets
through them is resumed and counted here the same way.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import logging
import random
import time
from typing import IO, Any, Callable, Optional

import fsspec
import fsspec.asyn

from pretrain.storage import filesystem, is_remote, local_path

READ_RETRIES = 8  # per opened stream: a few resets per object are weather, more is a dead object or link
RETRY_BACKOFF_S = 0.25  # the first wait; doubled per retry without new bytes in between
RETRY_BACKOFF_MAX_S = 8.0
STREAM_BUFFER = 1 << 20  # the most one read takes from the event loop's thread: few thread hops per object
# Throttling and "try again" answers S3-compatible stores give with a 4xx (or any) status.
RETRYABLE_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException",
                             "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException",
                             "InternalError", "ServiceUnavailable"})
NO_CLIENT_RETRIES = {"retries": {"total_max_attempts": 1}}  # botocore Config: one attempt per request

_log = logging.getLogger(__name__)
_jitter = random.Random()  # private: the loader's seeded generators must not see these draws


def open_stream(location: str, on_retry: Optional[Callable[[BaseException], None]] = None) -> IO[bytes]:
    """A forward-only binary stream of the object at ``location``, read from the network as it is consumed
    (no download of the whole object first) and resumed at the byte where it broke after a transient
    error (see above).
    ``on_retry(error)`` is called for each retry. A local path is a plain ``open``.

    On ``s3://`` the first request is sent now and answered in the background, so a caller can open
    the next object while it reads this one and not wait for its first byte; errors (a missing object
    too) are raised by the first read."""
    if not is_remote(location):
        return open(local_path(location), "rb")
    source = _S3Object(location) if str(location).startswith(("s3://", "s3a://")) else _SeekingObject(location)
    return io.BufferedReader(_ResumingReader(str(location), source, on_retry), STREAM_BUFFER)


def is_transient(error: BaseException) -> bool:
    """Worth another try: the connection broke or timed out, or the store answered 429/5xx/slow down."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status == 429 or status >= 500 or response["Error"].get("Code") in RETRYABLE_CODES
    return isinstance(error, _transient_types())


@functools.cache
def _transient_types() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors of the standard library and, when installed, of the HTTP stack
    under s3fs/gcsfs (aiohttp) and of botocore (which has its own ``ConnectionError``)."""
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    with contextlib.suppress(ImportError):
        from botocore import exceptions as boto

        types += [boto.ConnectionError, boto.HTTPClientError, boto.IncompleteReadError]
    return tuple(types)


class _ResumingReader(io.RawIOBase):
    """The bytes of ``source`` (``open_at(offset)`` -> a file read forward, ``close()``): after a
    transient error it is reopened at the byte reached, so the consumer sees one unbroken stream."""

    def __init__(self, location: str, source: Any, on_retry: Optional[Callable[[BaseException], None]]):
        super().__init__()
        self.location, self._source, self._on_retry = location, source, on_retry
        self.offset, self.retries, self._idle_retries = 0, 0, 0
        self._file: Optional[IO[bytes]] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._retrying(lambda: self._file.read(len(buffer)))
        buffer[:len(data)] = data
        self.offset += len(data)
        if data:
            self._idle_retries = 0
        return len(data)

    def close(self) -> None:
        self._close_file()
        self._source.close()
        super().close()

    def _retrying(self, read: Callable[[], bytes]) -> bytes:
        while True:
            try:
                if self._file is None:
                    self._file = self._source.open_at(self.offset)
                return read()
            except Exception as error:  # noqa: BLE001 - classified by is_transient
                self._close_file()
                self._before_retry(error)

    def _before_retry(self, error: Exception) -> None:
        """Count, warn and wait; or raise when the error is not transient or the retries are spent."""
        if not is_transient(error):
            raise error
        if self.retries >= READ_RETRIES:
            raise OSError(f"{self.location}: gave up at byte {self.offset} after {self.retries} retries "
                          f"({type(error).__name__}: {error})") from error
        self.retries += 1
        wait = min(RETRY_BACKOFF_MAX_S, RETRY_BACKOFF_S * 2 ** self._idle_retries) * _jitter.uniform(0.5, 1.0)
        self._idle_retries += 1
        _log.warning("%s: %s at byte %d, retry %d/%d in %.2f s: %s", self.location, type(error).__name__,
                     self.offset, self.retries, READ_RETRIES, wait, error)
        if self._on_retry is not None:
            self._on_retry(error)
        time.sleep(wait)

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            with contextlib.suppress(Exception):  # a broken connection may fail to close too
                file.close()


class _S3Object:
    """Streaming GETs of one object from a given byte on, with a client that does not retry. The
    first GET is sent at once (see ``open_stream``)."""

    def __init__(self, location: str):
        self.fs, path = fsspec.core.url_to_fs(location, use_listings_cache=False, config_kwargs=NO_CLIENT_RETRIES)
        self.bucket, self.key, self.version = self.fs.split_path(path)
        self.etag: Optional[str] = None
        self.size: Optional[int] = None
        self._first: Optional[concurrent.futures.Future] = asyncio.run_coroutine_threadsafe(
            self._get(self._request(0)), self.fs.loop)

    def open_at(self, offset: int) -> IO[bytes]:
        if self.size is not None and offset >= self.size:
            return io.BytesIO(b"")  # broke after the last byte: a ranged GET there would be a 416
        first, self._first = self._first, None
        if first is not None:
            response = first.result()
        else:
            response = fsspec.asyn.sync(self.fs.loop, self._get, self._request(offset))
        if self.etag is None:
            self.etag, self.size = response["ETag"], offset + int(response["ContentLength"])
        return _AsyncBody(self.fs.loop, response["Body"])

    def close(self) -> None:
        """Let go of a first response never read (``cancel`` fails only once it has come)."""
        first, self._first = self._first, None
        if first is not None and not first.cancel() and first.exception() is None:
            _AsyncBody(self.fs.loop, first.result()["Body"]).close()

    def _request(self, offset: int) -> dict:
        request = {"Bucket": self.bucket, "Key": self.key}
        if self.version:
            request["VersionId"] = self.version
        if offset:
            request["Range"] = f"bytes={offset}-"
        if self.etag:
            request["IfMatch"] = self.etag
        return request

    async def _get(self, request: dict) -> dict:
        await self.fs.set_session()
        client = await self.fs.get_s3(self.bucket)
        return await client.get_object(**request)


class _AsyncBody:
    """An aiobotocore response body read from this thread, chunk by chunk as the bytes arrive."""

    def __init__(self, loop: Any, body: Any):
        self._loop, self._body = loop, body

    def read(self, size: int) -> bytes:
        return fsspec.asyn.sync(self._loop, self._body.read, size)

    def close(self) -> None:
        # Sent, not awaited: a process that exits with a stream open collects it after the loop's
        # thread has stopped, and waiting there would hang the exit.
        asyncio.run_coroutine_threadsafe(self._body.aclose(), self._loop)


class _SeekingObject:
    """Any other fsspec object: opened with its library and moved to the byte reached."""

    def __init__(self, location: str):
        self.fs, self.path = filesystem(location)

    def open_at(self, offset: int) -> IO[bytes]:
        f = self.fs.open(self.path, "rb")
        f.seek(offset)
        return f

    def close(self) -> None:
        pass
