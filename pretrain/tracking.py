"""MLflow logging that never gets in the way: rank 0 of a training job, and every stage's driver.

Calls queue work for a background thread that talks to MLflow through ``MlflowClient``. When the
server is unreachable the thread warns once, retries each item for at most ``retry_s`` seconds, then
drops it and tries the next item once; the caller never waits on the network, and ``close`` returns
within a bounded time. Ending a run (``end_run``) is the one call that waits, for a bounded time, for
a server that is down to come back, so that runs are not left RUNNING by a short outage.
"""
from __future__ import annotations

import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Optional

_STOP = object()
log = logging.getLogger(__name__)


class Tracker:
    """Logs metrics, params and artifacts to MLflow run ``run_id`` when ``rank == 0`` and both
    ``uri`` and ``run_id`` are given; otherwise every call is a no-op."""

    def __init__(self, uri: Optional[str], run_id: Optional[str], rank: int = 0, *,
                 retry_s: float = 30.0, max_queue: int = 10000, bound_http: bool = False):
        self.run_id = run_id
        self.enabled = rank == 0 and bool(uri) and bool(run_id)
        self.retry_s = retry_s
        self.dropped = 0
        self._down = False
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._abort = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if not self.enabled:
            return
        if bound_http:
            bound_mlflow_http()
        import mlflow

        self._client = mlflow.MlflowClient(tracking_uri=uri)
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public, non-blocking

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue numeric metrics at ``step`` (non-finite values are logged as MLflow stores them)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self._put(lambda c: c.log_batch(self.run_id, metrics=batch))

    def log_params(self, params: dict[str, Any]) -> None:
        """Queue params (values stringified; MLflow caps them at 6000 characters)."""
        if not self.enabled or not params:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            chunk = items[i:i + 100]
            self._put(lambda c, chunk=chunk: c.log_batch(self.run_id, params=chunk))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        """Queue a copy of the local file ``path`` (taken now: the caller may delete or rewrite it)."""
        if not self.enabled:
            return
        folder = tempfile.mkdtemp(prefix="vitscale-artifact-")
        copy = shutil.copy(path, folder)

        def upload(c) -> None:
            try:
                c.log_artifact(self.run_id, copy, artifact_path)
            finally:
                shutil.rmtree(folder, ignore_errors=True)

        self._put(upload)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Queue ``text`` as the artifact ``artifact_file`` (no local file needed: workdirs may be remote)."""
        if self.enabled:
            self._put(lambda c: c.log_text(self.run_id, text, artifact_file))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        if self.enabled:
            self._put(lambda c: c.log_dict(self.run_id, data, artifact_file))

    def call(self, op: Callable[[Any], Any]) -> None:
        """Queue any ``MlflowClient`` call, ``op(client)`` (e.g. on a nested run of this one)."""
        if self.enabled:
            self._put(op)

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._put(lambda c, k=k, v=v: c.set_tag(self.run_id, k, str(v)))

    def close(self, timeout_s: Optional[float] = None) -> None:
        """Flush what is queued, waiting at most ``timeout_s`` (default ``retry_s`` + 10 s); while the
        server is known to be down, drop the rest at once instead."""
        if self._thread is None:
            return
        try:
            self._queue.put(_STOP, timeout=1.0)
        except queue.Full:
            self._abort.set()
        if self._down:
            self._abort.set()
        self._thread.join(self.retry_s + 10.0 if timeout_s is None else timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            log.warning("MLflow tracker: gave up flushing; the rest of the queue is dropped")
        if self.dropped:
            log.warning("MLflow tracker: %d logging calls dropped while the server was unreachable", self.dropped)
        self._thread = None

    # ------------------------------------------------------------------ background thread

    def _put(self, op: Callable) -> None:
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self.dropped += 1

    def _work(self) -> None:
        while True:
            op = self._queue.get()
            if op is _STOP:
                return
            if self._abort.is_set():
                self.dropped += 1
                continue
            self._run(op)

    def _run(self, op: Callable) -> None:
        # While the server is known to be down, one attempt per item; otherwise retry for retry_s.
        deadline = time.monotonic() + (0.0 if self._down else self.retry_s)
        delay = 0.5
        while True:
            try:
                op(self._client)
            except Exception as e:  # noqa: BLE001 - any failure of the tracking server is not ours to raise
                if not self._down:
                    self._down = True
                    log.warning("MLflow tracking unreachable (%s: %s); training goes on, retrying for up "
                                "to %.0f s", type(e).__name__, str(e)[:200], self.retry_s)
                if time.monotonic() + delay > deadline or self._abort.wait(delay):
                    self.dropped += 1
                    return
                delay = min(delay * 2, 5.0)
                continue
            if self._down:
                self._down = False
                log.warning("MLflow tracking reachable again (%d items dropped)", self.dropped)
            return


def bound_mlflow_http() -> None:
    """MLflow's own HTTP retries back off for minutes; ours are bounded, so theirs go. Only set when the
    user did not choose, and only in vitscale's own processes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


END_WAIT_S = 60.0


def end_run(client, run_id: Optional[str], status: str, wait_s: float = END_WAIT_S) -> bool:
    """End ``run_id`` with ``status``, retrying for up to ``wait_s`` while the server is unreachable.
    Never raises: False (with a warning) when the run could not be ended."""
    if not run_id:
        return True
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            client.set_terminated(run_id, status)
            return True
        except Exception as e:  # noqa: BLE001 - the tracking server's failure is not the stage's
            if time.monotonic() + delay > deadline:
                log.warning("MLflow run %s could not be ended %s (%s: %s); it stays RUNNING in the UI",
                            run_id, status, type(e).__name__, str(e)[:200])
                return False
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
