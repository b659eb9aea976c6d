"""Where every stage's files live: a local path, a ``file://`` URL, or any fsspec URL (``s3://``, ``gs://``).

One rule for "remote" (a scheme other than ``file://``), one way to join, list, read and write, and one
publish protocol that readers rely on:

- on a filesystem (local disk, NFS, Lustre) a file is written under a hidden temporary name in its
  final folder, fsynced, and renamed into place; the rename is atomic, so a reader never sees half;
- on object storage there is no rename, but a single PUT (multipart or not) is all-or-nothing: an
  object is written whole or not at all. A set of objects (a shard and its stats, a checkpoint) is
  made visible by a commit marker object written last, and readers look for the marker.

Endpoints and credentials come from the standard environment only (``AWS_*``, ``AWS_ENDPOINT_URL`` for
MinIO/Ceph/R2, ``GOOGLE_APPLICATION_CREDENTIALS``), never from the config.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from typing import IO, Any, Callable, Iterable, Optional

import fsspec
import fsspec.asyn
from fsspec.implementations.local import LocalFileSystem

TMP_SUFFIX = ".tmp"


# --------------------------------------------------------------------------- names


def is_url(location: str) -> bool:
    """Has a scheme (``file://`` included): not to be resolved against a local folder."""
    return "://" in str(location)


def is_remote(location: str) -> bool:
    """An fsspec URL other than ``file://``: no rename, no fsync, not reachable with ``open``."""
    location = str(location)
    return is_url(location) and not location.startswith("file://")


def local_path(location: str) -> str:
    """A local location as a plain path (``file://`` removed, ``~`` expanded); remote ones unchanged."""
    location = str(location)
    if is_remote(location):
        return location
    return os.path.expanduser(location.removeprefix("file://"))


def absolute(location: Optional[str]) -> Optional[str]:
    """Local paths made absolute (Ray workers may start elsewhere); URLs and None unchanged."""
    if location is None or is_remote(location) or str(location).startswith("pipe:"):
        return location
    return os.path.abspath(local_path(location))


def join(base: str, *parts: str) -> str:
    """``base/part/...``: ``/``-joined for URLs, ``os.path.join`` for local paths (never ``pathlib``,
    which turns ``s3://b/x`` into the local folder ``s3:/b/x``)."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(local_path(base), *parts)


def parent(location: str) -> str:
    if is_remote(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(local_path(location)))


def basename(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/"))


# --------------------------------------------------------------------------- filesystems


def filesystem(location: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(fsspec filesystem, path on it). Remote listings are never cached: other processes and nodes
    write the same prefixes (shard tasks, other ranks), and a cached listing would hide their objects."""
    location = str(location)
    if not is_remote(location):
        return LocalFileSystem(), local_path(location)
    fs, path = fsspec.core.url_to_fs(location, use_listings_cache=False)
    return fs, path.rstrip("/")


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.exists(path)


def isfile(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.isfile(path)


def listdir(location: str) -> list[str]:
    """Names (not paths) directly under ``location``, sorted; ``[]`` when it does not exist."""
    fs, path = filesystem(location)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(basename(e) for e in entries if basename(e) and e.rstrip("/") != path.rstrip("/"))


def makedirs(location: str) -> None:
    """A local folder; nothing on object storage (prefixes exist once an object does)."""
    if not is_remote(location):
        os.makedirs(local_path(location), exist_ok=True)


def size(location: str) -> int:
    fs, path = filesystem(location)
    return int(fs.size(path))


def identity(location: str) -> list:
    """What changes when the file is rewritten: size and mtime locally, size and ETag (or the
    store's equivalent) on object storage."""
    fs, path = filesystem(location)
    info = fs.info(path)
    if not is_remote(location):
        return [info["size"], os.stat(path).st_mtime_ns]
    tag = next((str(info[k]) for k in ("ETag", "etag", "md5Hash", "generation", "LastModified", "mtime")
                if info.get(k) is not None), "")
    return [info["size"], tag]


# --------------------------------------------------------------------------- reading


def open_file(location: str, mode: str = "rb") -> IO:
    """An open file object (close it, or use ``with``). Local paths are opened with ``open``."""
    if not is_remote(location):
        return open(local_path(location), mode)
    return fsspec.open(str(location), mode).open()


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    return fs.cat_file(path)


def read_text(location: str) -> str:
    return read_bytes(location).decode()


def read_json(location: str) -> Any:
    """The parsed JSON at ``location``; FileNotFoundError or ValueError otherwise."""
    return json.loads(read_bytes(location))


def read_json_or_none(location: str) -> Any:
    """The parsed JSON, or None when missing or unreadable (a marker that is not there yet)."""
    try:
        return read_json(location)
    except (OSError, ValueError):
        return None


def download(location: str, local_file: str) -> str:
    fs, path = filesystem(location)
    os.makedirs(os.path.dirname(os.path.abspath(local_file)), exist_ok=True)
    fs.get_file(path, local_file)
    return local_file


# --------------------------------------------------------------------------- writing and publishing


def temporary_name(location: str) -> str:
    """A hidden sibling of a local file to write before renaming: ``.NAME.XXXXXXXX.tmp``."""
    folder, name = os.path.split(local_path(location))
    return os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


def write_bytes(location: str, data: bytes) -> None:
    """Publish ``data`` at ``location`` atomically (see the module docstring)."""
    if is_remote(location):
        fs, path = filesystem(location)
        fs.pipe_file(path, data)
        return
    path = local_path(location)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str, data: Any, indent: Optional[int] = 1) -> None:
    """Atomic JSON (sorted keys: the same data gives the same bytes)."""
    write_bytes(location, (json.dumps(data, indent=indent, sort_keys=True) + "\n").encode())


def create_exclusive(location: str, data: bytes) -> bool:
    """Write ``data`` at ``location`` only if nothing is there; False when something is. Atomic: of two
    callers at once, exactly one gets True (``O_EXCL`` locally, a conditional PUT with ``If-None-Match``
    on S3 and S3-compatible stores; elsewhere a write that is read back, which narrows the race)."""
    if not is_remote(location):
        path = local_path(location)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = temporary_name(path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the name exists; the file appears whole, never half written
        except FileExistsError:
            return False
        finally:
            _unlink(tmp)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
        return True
    fs, path = filesystem(location)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" in protocols:
        try:
            fs.pipe_file(path, data, IfNoneMatch="*")
        except FileExistsError:
            return False
        return True
    if fs.exists(path):
        return False
    fs.pipe_file(path, data)
    return fs.cat_file(path) == data


def publish_file(local_file: str, location: str) -> None:
    """Move a finished local file to ``location`` atomically: a rename on a filesystem (the file is
    fsynced first; across devices it is copied to a temporary beside the target, then renamed), one
    upload on object storage. The local file is gone afterwards."""
    if is_remote(location):
        fs, path = filesystem(location)
        fs.put_file(local_file, path)
        _unlink(local_file)
        return
    path = local_path(location)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(local_file, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.replace(local_file, path)
    except OSError:  # another device (scratch on local disk, target on NFS)
        tmp = temporary_name(path)
        try:
            shutil.copyfile(local_file, tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        _unlink(local_file)
    fsync_dir(folder)


def upload_many(pairs: Iterable[tuple[str, str]]) -> None:
    """Upload (local file, remote location) pairs concurrently (each object whole or not at all);
    local targets are copied. Order of completion is not defined: write commit markers afterwards."""
    pairs = list(pairs)
    if not pairs:
        return
    if not is_remote(pairs[0][1]):
        for src, dst in pairs:
            os.makedirs(os.path.dirname(local_path(dst)), exist_ok=True)
            shutil.copyfile(src, local_path(dst))
        return
    fs, _ = filesystem(pairs[0][1])
    # Async filesystems (s3fs, gcsfs) run a list of puts concurrently; the others loop.
    fs.put([src for src, _ in pairs], [filesystem(dst)[1] for _, dst in pairs])


def remove(location: str, recursive: bool = False) -> None:
    """Delete a file or (``recursive``) a folder/prefix; nothing when it is not there."""
    fs, path = filesystem(location)
    try:
        if recursive:
            if fs.exists(path):
                fs.rm(path, recursive=True)
        else:
            fs.rm_file(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str) -> None:
    """Make a rename inside local folder ``path`` durable (POSIX: the entry is safe once the folder is)."""
    fd = os.open(local_path(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- local scratch and copies


def scratch_root() -> str:
    """Where this node keeps local copies and staging files: ``$VITSCALE_SCRATCH`` or the temp folder."""
    return os.environ.get("VITSCALE_SCRATCH") or os.path.join(tempfile.gettempdir(), "vitscale")


def scratch_dir(prefix: str) -> str:
    """A new private local folder under ``scratch_root()`` (the caller removes it)."""
    os.makedirs(scratch_root(), exist_ok=True)
    return tempfile.mkdtemp(prefix=f"{prefix}-", dir=scratch_root())


def local_copy(location: str, names: Iterable[str]) -> str:
    """A local folder holding ``names`` from folder ``location``: itself when local, else a copy in
    this node's scratch keyed by the URL and each object's identity (a rewritten object is fetched
    again; an unchanged one is not)."""
    if not is_remote(location):
        return local_path(location)
    names = list(names)
    ids = [identity(join(location, n)) for n in names]
    key = hashlib.sha256(json.dumps([str(location), names, ids]).encode()).hexdigest()[:16]
    folder = os.path.join(scratch_root(), "copies", key)
    if all(os.path.isfile(os.path.join(folder, n)) for n in names):
        return folder
    staging = scratch_dir("copy")
    try:
        for n in names:
            download(join(location, n), os.path.join(staging, n))
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        try:
            os.rename(staging, folder)
        except OSError:  # another process on this node got there first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# --------------------------------------------------------------------------- streaming reads
#
# One retry layer, ours. A GET through s3fs would be retried silently twice over: s3fs's
# ``_error_wrapper`` (``retries=5``, each retry re-reading the whole range from its start) around
# botocore's own retry handler (up to 5 attempts on resets, 5xx and throttling): up to 25 attempts
# per request, none of them counted or logged. So objects on ``s3://`` are read with a client whose
# botocore retries are off, called directly (no s3fs wrapper), and every transient error reaches
# ``_ResumingReader``: it counts it, warns, backs off and resumes with a ranged GET from the byte it
# had reached (pinned to the first response's ETag, so two versions of an object are never spliced),
# at most ``READ_RETRIES`` times per opened stream; then the error is raised for the caller to skip
# the object. Other fsspec backends (gs://, ...) keep their library's retries; what still gets
# through them is resumed and counted here the same way.

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
