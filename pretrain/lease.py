"""A lease on an output root (shard folder, workdir, checkpoint root): one writer at a time.

Two runs writing one root undo each other: a shard run clears the other's temporaries and plan, a
pretraining job prunes the other's checkpoints and moves its ``latest``. So a run first creates
``{root}/.vitscale-lease.json`` (host, pid, start, heartbeat), atomically (``O_EXCL`` on a filesystem,
a conditional PUT on object storage), and refreshes the heartbeat while it works. A second run is
refused with an ``InputError`` (exit 2) that names the holder. A crashed run must never block its
rerun: a lease whose holder is gone (same host, pid no longer running) or whose heartbeat is older than
``stale_s`` is taken over, with a warning.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from pretrain import storage
from pretrain.errors import InputError

LEASE = ".vitscale-lease.json"
HEARTBEAT_S = 15.0
STALE_S = 120.0  # eight missed heartbeats: the holder is gone (or cut off from the root) for long enough

log = logging.getLogger(__name__)


class LeaseHeld(InputError):
    """Another live run holds the lease on this root."""


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host runs; a zombie (killed, not yet reaped) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (not Linux): signal 0 reached it
        return True


def describe(holder: dict, now: Optional[float] = None) -> str:
    now = time.time() if now is None else now
    return (f"{holder.get('what', 'a run')} on host {holder.get('host')} pid {holder.get('pid')}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('start', 0)))}, last heartbeat "
            f"{now - holder.get('heartbeat', 0):.0f} s ago")


class Lease:
    """``with Lease(root, "vitscale shard"):`` holds the lease on ``root`` for the block. Nested blocks
    on the same root in one process share the outer lease (a CLI takes it before its MLflow run, the
    stage it calls takes it again)."""

    _held: dict[str, "Lease"] = {}  # this process's leases by lease path
    _lock = threading.Lock()

    def __init__(self, root: str, what: str, *, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
        self.root, self.what = storage.absolute(root), what
        self.path = storage.join(self.root, LEASE)
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.start = time.time()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> bytes:
        return json.dumps({"what": self.what, "host": socket.gethostname(), "pid": os.getpid(),
                           "start": self.start, "heartbeat": time.time(), "token": self.token}).encode()

    def _gone(self, holder: dict) -> Optional[str]:
        """Why ``holder`` no longer holds the lease, or None when it does."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
            return f"its process {holder.get('pid')} is gone"
        if age > self.stale_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> None:
        """Take the lease, or raise ``LeaseHeld`` naming the live holder."""
        storage.makedirs(self.root)
        for _ in range(3):  # a holder may release between our create and our read
            if storage.create_exclusive(self.path, self._record()):
                return
            holder = storage.read_json_or_none(self.path)
            if holder is None:
                continue
            reason = self._gone(holder)
            if reason is None:
                raise LeaseHeld(f"{self.root}: in use by {describe(holder)} (lease {self.path}); wait for it "
                                "to finish or stop it, or write to another folder")
            log.warning("%s: taking over the lease of %s: %s", self.root, describe(holder), reason)
            storage.write_bytes(self.path, self._record())
            mine = storage.read_json_or_none(self.path)
            if mine and mine.get("token") == self.token:
                return
            if mine:
                raise LeaseHeld(f"{self.root}: taken over at the same time by {describe(mine)}")
        raise LeaseHeld(f"{self.root}: could not take the lease {self.path}")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = storage.read_json_or_none(self.path)
                if holder is not None and holder.get("token") != self.token:
                    log.error("%s: the lease was taken over by %s; this run no longer owns the folder",
                              self.root, describe(holder))
                    return
                storage.write_bytes(self.path, self._record())
            except OSError as e:  # the root unreachable for a moment: the next beat tries again
                log.warning("%s: lease heartbeat failed: %s", self.root, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = storage.read_json_or_none(self.path)
        if holder is not None and holder.get("token") == self.token:
            storage.remove(self.path)

    def __enter__(self) -> "Lease":
        with Lease._lock:
            if self.path in Lease._held:
                self._thread = None
                return self
            self.acquire()
            Lease._held[self.path] = self
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.root}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with Lease._lock:
            if Lease._held.get(self.path) is not self:
                return  # nested: the outer block releases
            del Lease._held[self.path]
        self.release()
