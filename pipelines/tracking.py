"""MLflow for the pipeline: where the store is, and one run per stage that always ends with a status.

The driver process owns a stage's run: it creates it, hands its id to whoever logs (Ray workers log
to it by id from rank 0 only), and ends it FINISHED, FAILED (an exception) or KILLED (SIGTERM or
Ctrl-C). Under ``vitscale run`` each stage's run is nested under one parent run.

An MLflow outage never stops a stage: everything after the run's creation goes through the queued
``pretrain.tracking.Tracker``; a run that cannot be created is skipped with a warning (the stage
runs untracked); ending it waits a bounded time for the server (``pretrain.tracking.end_run``), and a
stage that succeeded still exits 0 when that fails.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Iterator, Optional

from pipelines.config import Config, ConfigError, TrackingConfig
from pretrain import storage
from pretrain.redact import redact
from pretrain.tracking import Tracker, bound_mlflow_http, end_run

log = logging.getLogger(__name__)


class Terminated(BaseException):
    """Raised in the driver on SIGTERM so that runs end KILLED instead of vanishing RUNNING."""


def tracking_uri(tracking: TrackingConfig, workdir: str) -> str:
    """``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else a sqlite file in a local workdir."""
    if tracking.uri:
        return tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_remote(workdir):
        raise ConfigError(f"tracking.uri: null keeps MLflow in a sqlite file in the workdir, which must then be "
                          f"local, but workdir is {workdir!r}. Set tracking.uri to your MLflow server (in the "
                          f"config, or --set tracking.uri=http://HOST:5000, or export MLFLOW_TRACKING_URI=...); "
                          f"infra/mlflow starts one whose artifacts go to object storage")
    path = Path(storage.local_path(workdir)).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def _artifact_root(workdir: str) -> Optional[str]:
    if storage.is_remote(workdir):
        return storage.join(workdir, "mlartifacts")
    return (Path(storage.local_path(workdir)).resolve() / "mlartifacts").as_uri()


def experiment_id(client, tracking: TrackingConfig, workdir: str) -> str:
    exp = client.get_experiment_by_name(tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    try:
        # A local store gets its artifacts beside the sqlite file, not in ./mlruns of wherever we run.
        root = None if tracking.uri and tracking.uri.startswith("http") else _artifact_root(workdir)
        return client.create_experiment(tracking.experiment, artifact_location=root)
    except Exception:  # noqa: BLE001 - another process created it first
        return client.get_experiment_by_name(tracking.experiment).experiment_id


def client_for(cfg: Config):
    import mlflow

    bound_mlflow_http()
    uri = tracking_uri(cfg.tracking, cfg.workdir)
    if uri.startswith("sqlite:///"):
        _seed_sqlite(Path(uri[len("sqlite:///"):]))
    return mlflow.MlflowClient(tracking_uri=uri)


def _seed_sqlite(db: Path) -> None:
    """A new sqlite store starts as a copy of an empty one, made once per MLflow version in the user's
    cache: MLflow would otherwise run its schema migrations (about 1 s of CPU, while Ray starts beside
    it) in every new workdir. The copy is MLflow's own empty store (tables at the current revision,
    its Default experiment), so MLflow opens it as one it made. An existing store is left alone, and
    any failure here leaves the store to MLflow, as before."""
    if db.exists():
        return
    import mlflow

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vitscale"
    template = cache / f"mlflow-{mlflow.__version__}-empty.db"
    making = template.with_name(f"{template.name}.{os.getpid()}.tmp")
    copying = db.with_name(f".{db.name}.{os.getpid()}.tmp")
    try:
        if not template.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            cache.mkdir(parents=True, exist_ok=True)
            SqlAlchemyStore(f"sqlite:///{making}", (cache / "mlruns").as_uri()).engine.dispose()
            os.replace(making, template)  # whole or not at all, when two commands make it at once
        shutil.copyfile(template, copying)
        os.link(copying, db)  # never over a store that appeared meanwhile (FileExistsError)
    except Exception as e:  # noqa: BLE001 - only a shortcut: without it MLflow makes the store itself
        log.debug("no copy of a cached MLflow store (%s: %s); MLflow makes %s", type(e).__name__, e, db)
    finally:
        for leftover in (making, copying):
            with contextlib.suppress(OSError):
                leftover.unlink()


def tracker_for(cfg: Config, run_id: Optional[str]) -> Tracker:
    """The stage driver's queued, outage-tolerant logger for run ``run_id`` (a no-op without one)."""
    return Tracker(tracking_uri(cfg.tracking, cfg.workdir) if run_id else None, run_id, bound_http=True)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):  # noqa: ARG001
        raise Terminated(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def stage_run(cfg: Config, stage: str, parent_run_id: Optional[str] = None,
              tags: Optional[dict] = None) -> Iterator[str]:
    """Create an MLflow run for ``stage`` and yield its id; end it with the right status.

    ``parent_run_id`` nests it (``vitscale run``). The id is also exported as ``MLFLOW_RUN_ID`` so
    that ``mlflow.*`` calls in this process land in it.
    """
    client = client_for(cfg)
    run_id = _create_run(client, cfg, stage, parent_run_id, tags)
    previous = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        os.environ["MLFLOW_RUN_ID"] = run_id
    status = "FAILED"
    try:
        with _sigterm_raises():
            yield run_id
        status = "FINISHED"
    except (Terminated, KeyboardInterrupt):
        status = "KILLED"
        raise
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_RUN_ID", None)
        else:
            os.environ["MLFLOW_RUN_ID"] = previous
        end_run(client, run_id, status)


def _create_run(client, cfg: Config, stage: str, parent_run_id: Optional[str], tags: Optional[dict]) -> Optional[str]:
    """A new run's id; None (with a warning) when the server cannot be reached: the stage goes on."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    all_tags = {MLFLOW_RUN_NAME: f"{cfg.name}-{stage}", "vitscale.stage": stage, **(tags or {})}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    try:
        exp = experiment_id(client, cfg.tracking, cfg.workdir)
        return client.create_run(exp, tags=all_tags, run_name=f"{cfg.name}-{stage}").info.run_id
    except (MlflowException, OSError) as e:
        log.warning("MLflow unreachable at %s (%s: %s); the %s stage runs without an MLflow run",
                    redact(client.tracking_uri), type(e).__name__, redact(str(e)[:200]), stage)
        return None
