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

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from typing import Any, Iterable, Optional

import fsspec
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
    """Upload (local file, object-storage location) pairs concurrently, each object whole or not at all.
    Order of completion is not defined: write commit markers afterwards."""
    pairs = list(pairs)
    if not pairs:
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
