"""The shard stage: an image index becomes WebDataset shards, one Ray task per shard.

Flow (the driver never holds index rows, nor per-sample failures: it keeps counts): hash the source
and settings -> make the source's plan (parquet is read in place; other kinds are streamed into a plan
parquet) -> cut rows into shards of ``samples_per_shard`` in index order -> run one task per missing
shard, a bounded number in flight, each handed only its row range -> each task publishes ``{N}.tar``,
then ``{N}.stats.json`` as its commit marker -> ``failures.parquet``, merged from the stats files ->
the manifest, last. A rerun skips shards whose stats exist and clears temporaries; a finished directory
(its manifest's hash matches) is returned as it is. The output may be a local folder or an
object-storage prefix (``s3://...``): ``pretrain.storage`` publishes either way.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Optional, Union

from pipelines.config import Config, ShardConfig
from pipelines.images import ImageSettings
from pipelines.shard_task import ShardJob, TaskContext, stats_name, stats_path, tar_path, temporaries, write_shard
from pipelines.shuffle import shuffle_plan
from pipelines.sources import Plan, Table, fingerprint, plan_source, source_kind
from pipelines.tracking import tracker_for
from pretrain import storage
from pretrain.errors import InputError
from pretrain.lease import Lease
from pretrain.shard_format import FAILURES, FORMAT, MANIFEST, PREVIEW, STAGE_MARKER
from pretrain.redact import redact
from pretrain.tracking import Tracker

PLAN_DIR = ".plan"
LOG_EVERY_S = 10.0
RunId = Union[str, None, Callable[[], Optional[str]]]  # an MLflow run's id, or a call that waits for it
TASK_MODULES = ("pipelines.shard",)  # what a shard task imports (warmed ahead of the tasks)
WARM_WAIT_S = 60.0  # past this, the shard tasks go out with some workers still importing


# --------------------------------------------------------------------------- identity of a stage run


def shard_dir(cfg: Config, out_dir: Optional[str] = None) -> str:
    return storage.absolute(out_dir or storage.join(cfg.workdir, "shards"))


def builtin_root(cfg: Config, name: str) -> str:
    return storage.join(cfg.workdir, "source", name)


def settings_dict(shard: ShardConfig) -> dict:
    """The settings that change the shards' bytes (download threads and timeouts do not)."""
    return {"path_column": shard.path_column, "label_column": shard.label_column,
            "samples_per_shard": shard.samples_per_shard, "image_size": shard.image_size,
            "resize_mode": shard.resize_mode, "quality": shard.quality, "min_size": shard.min_size,
            "max_pixels": shard.max_pixels, "max_decoded_mb": shard.max_decoded_mb,
            "respect_noai": shard.download.respect_noai, "allowed_schemes": sorted(shard.download.allowed_schemes),
            "allow_private": shard.download.allow_private, "shuffle": shard.shuffle, "holdout": shard.holdout}


def _builtin_name(source: str) -> str:
    name = source.split(":", 1)[1]
    if name != "fractal":
        raise InputError(f"shard.source: unknown built-in source {source!r} (known: builtin:fractal)")
    return name


def source_fingerprint(cfg: Config) -> dict:
    """Identity of the source without reading it whole (the fractal set is not generated for this)."""
    source = cfg.shard.source
    if source_kind(source) == "builtin":
        from pipelines.fractal import builtin_fingerprint

        _builtin_name(source)
        return builtin_fingerprint(cfg.shard.builtin, cfg.seed)
    return fingerprint(source)


def stage_hash(cfg: Config) -> str:
    blob = {"format": FORMAT, "source": source_fingerprint(cfg), "settings": settings_dict(cfg.shard),
            "shuffle_seed": cfg.seed if cfg.shard.shuffle else None}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def shards_complete(cfg: Config, out_dir: Optional[str] = None) -> bool:
    """True when the manifest exists, matches this config's source and settings, and its shards are there."""
    out = shard_dir(cfg, out_dir)
    return _complete(out, storage.read_json_or_none(storage.join(out, MANIFEST)), stage_hash(cfg))


def _complete(out: str, manifest: Optional[dict], digest: str) -> bool:
    if not manifest or manifest.get("hash") != digest:
        return False
    present = set(storage.listdir(out))  # one listing, not a request per shard
    return all(s["name"] in present for s in manifest["shards"])


# --------------------------------------------------------------------------- the stage


def run_shard_stage(cfg: Config, out_dir: Optional[str] = None, run_id: RunId = None) -> dict:
    """Make (or finish) the shards of ``cfg.shard.source`` under ``out_dir`` (default ``{workdir}/shards``)
    and return the manifest. Stage metrics go to the MLflow run ``run_id`` when given: its id, or a call
    that returns it, made once Ray is up and the plan made (MLflow's set-up can go on meanwhile)."""
    out = shard_dir(cfg, out_dir)
    storage.makedirs(out)
    digest = stage_hash(cfg)
    manifest = storage.read_json_or_none(storage.join(out, MANIFEST))
    if _complete(out, manifest, digest):  # the hash walks a folder source's listing: computed once
        _say(f"shard: {out} is complete ({manifest['totals']['ok']} images in "
             f"{manifest['totals']['shards']} shards); nothing to do")
        return manifest
    with Lease(out, "vitscale shard"):
        return _make_shards(cfg, out, digest, run_id)


def _make_shards(cfg: Config, out: str, digest: str, run_id: RunId) -> dict:
    workers_ready = _workers_up(cfg)  # before planning, so that the workers start and import meanwhile
    plan, jobs = plan_stage(cfg, out, digest)
    present = set(storage.listdir(out))
    todo = [j for j in jobs if stats_name(j.index) not in present]
    _say(f"shard: {cfg.shard.source} -> {out}: {plan.num_rows} rows, {len(jobs)} shards "
         f"({len(jobs) - len(todo)} already done), {len(plan.label_names)} classes")
    ctx = TaskContext(plan.table, plan.label_names, ImageSettings.from_config(cfg.shard), cfg.shard.download, out)
    workers_ready()
    tracker = tracker_for(cfg, run_id() if callable(run_id) else run_id)
    try:
        t0 = time.perf_counter()
        tally, errors = _run_tasks(cfg, ctx, todo, len(jobs), tracker)
        seconds = time.perf_counter() - t0
        if errors:
            _log_metrics(tracker, tally, seconds, len(jobs) - len(todo))
            raise RuntimeError(failure_report(out, errors, len(todo)))
        manifest = build_manifest(cfg, out, plan, jobs, digest)  # also publishes failures.parquet
        storage.write_json(storage.join(out, MANIFEST), manifest)  # last: the dataset is complete
        storage.remove(storage.join(out, PLAN_DIR), recursive=True)
        _log_metrics(tracker, tally, seconds, len(jobs) - len(todo), manifest)
        tracker.log_dict(manifest, MANIFEST)
    finally:
        tracker.close()
    t = manifest["totals"]
    _say(f"shard: done: {t['ok']} images ok, {t['failed']} failed, {t['shards']} shards, "
         f"{t['bytes'] / 1e6:.1f} MB in {out}")
    return manifest


def plan_stage(cfg: Config, out: str, digest: str) -> tuple[Plan, list[ShardJob]]:
    """Everything before the tasks, in the driver: claim ``out``, clear temporaries, make the source's
    plan and cut it into shard row ranges. Holds no rows, only the label names and the shard list."""
    _claim(out, digest)
    for stale in temporaries(out):
        os.remove(stale)
    index = _prepare_source(cfg)
    plan = _load_or_make_plan(index, cfg.shard, storage.join(out, PLAN_DIR), digest, cfg.seed)
    return plan, _jobs(plan.num_rows, cfg.shard.samples_per_shard, holdout_rows(cfg.shard, plan.num_rows))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _claim(out: str, digest: str) -> None:
    """Mark ``out`` as holding this run's shards; shards made from another source or other settings
    (an earlier marker with another hash) are removed first, since their stats would read as done."""
    storage.makedirs(out)
    marker = storage.join(out, STAGE_MARKER)  # written first: whose shards these are (the stage hash)
    previous = storage.read_json_or_none(marker)
    names = storage.listdir(out)
    if previous and previous.get("hash") != digest:
        _say(f"shard: {out} holds shards of another source or settings; replacing them")
        storage.remove(storage.join(out, MANIFEST))  # first: the folder stops reading as a dataset
        for name in names:
            stem = name.split(".", 1)[0]
            if stem.isdigit() and name.endswith(".stats.json"):
                storage.remove(storage.join(out, name))
        for name in names:
            stem = name.split(".", 1)[0]
            if stem.isdigit() and name.endswith(".tar"):
                storage.remove(storage.join(out, name))
        storage.remove(storage.join(out, PLAN_DIR), recursive=True)
        storage.remove(storage.join(out, FAILURES))
        storage.remove(storage.join(out, PREVIEW))
    elif previous is None and any(n.endswith(".stats.json") for n in names):
        raise InputError(f"shard output {out}: holds shard files this stage did not write; use another folder")
    storage.write_json(marker, {"hash": digest, "format": FORMAT})


def _prepare_source(cfg: Config) -> str:
    """The index to read: the source itself, or for ``builtin:fractal`` the generated set's index."""
    source = cfg.shard.source
    if source_kind(source) != "builtin":
        return source
    from pipelines.fractal import generate

    name = _builtin_name(source)
    root = builtin_root(cfg, name)
    t0 = time.perf_counter()
    if storage.is_remote(root):
        index = _generate_remote(root, cfg)
    else:
        index = generate(root, cfg.shard.builtin, cfg.seed)
    _say(f"shard: {source}: {cfg.shard.builtin.classes} classes x {cfg.shard.builtin.images_per_class} "
         f"images at {root} ({time.perf_counter() - t0:.1f} s)")
    return index


def _generate_remote(root: str, cfg: Config) -> str:
    """The built-in set on object storage, where every node's shard tasks can read it: generated in
    local scratch, uploaded, its marker last (an upload cut off is redone, never used)."""
    from pipelines.fractal import INDEX, MARKER as DONE, builtin_fingerprint, generate

    want = builtin_fingerprint(cfg.shard.builtin, cfg.seed)
    index = storage.join(root, INDEX)
    if storage.read_json_or_none(storage.join(root, DONE)) == want and storage.exists(index):
        return index
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:16]
    local = os.path.join(storage.scratch_root(), "builtin", key)
    generate(local, cfg.shard.builtin, cfg.seed)
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, fs in os.walk(local) for f in fs)
    storage.upload_many((os.path.join(local, rel), storage.join(root, *rel.split(os.sep)))
                        for rel in files if rel != DONE)
    storage.write_json(storage.join(root, DONE), want)
    return index


def _load_or_make_plan(index: str, shard: ShardConfig, plan_dir: str, digest: str, seed: int) -> Plan:
    """The plan of an interrupted run with the same hash is reused, so a rerun does not re-read the index.

    It lives beside the shards (``.plan/``), where every node's tasks can read it; on object storage
    it is made in local scratch and uploaded."""
    meta_path = storage.join(plan_dir, "plan.json")
    meta = storage.read_json_or_none(meta_path)
    if meta and meta.get("hash") == digest and storage.isfile(meta["table"]["path"]):
        return Plan(Table(**meta["table"]), meta["num_rows"], meta["label_names"])
    storage.remove(plan_dir, recursive=True)
    remote = storage.is_remote(plan_dir)
    local_dir = storage.scratch_dir("plan") if remote else plan_dir
    try:
        plan = plan_source(index, shard, local_dir)
        if shard.shuffle:
            shuffled = os.path.join(local_dir, "shuffled.parquet")
            plan = dataclasses.replace(plan, table=shuffle_plan(plan.table, plan.num_rows, seed,
                                                                 shard.samples_per_shard, shuffled))
        if remote and plan.table.path.startswith(local_dir):
            table_url = storage.join(plan_dir, os.path.basename(plan.table.path))
            storage.publish_file(plan.table.path, table_url)
            plan = dataclasses.replace(plan, table=dataclasses.replace(plan.table, path=table_url))
    finally:
        if remote:
            shutil.rmtree(local_dir, ignore_errors=True)
    storage.makedirs(plan_dir)
    storage.write_json(meta_path, {"hash": digest, "table": plan.table.__dict__, "num_rows": plan.num_rows,
                                   "label_names": plan.label_names})
    return plan


def holdout_rows(shard: ShardConfig, num_rows: int) -> int:
    """Rows held out for validation: the first ones of the (shuffled) plan."""
    wanted = int(shard.holdout) if shard.holdout >= 1 else round(shard.holdout * num_rows)
    return min(num_rows, wanted)


def _jobs(num_rows: int, per_shard: int, holdout: int = 0) -> list[ShardJob]:
    """Training shards over rows ``[holdout, num_rows)``, then the holdout's over ``[0, holdout)``."""
    train = [(start, min(start + per_shard, num_rows)) for start in range(holdout, num_rows, per_shard)]
    held = [(start, min(start + per_shard, holdout)) for start in range(0, holdout, per_shard)]
    return ([ShardJob(i, a, b) for i, (a, b) in enumerate(train)] +
            [ShardJob(len(train) + i, a, b, "holdout") for i, (a, b) in enumerate(held)])


def _workers_up(cfg: Config) -> Callable[[], object]:
    """Ray up (started, or joined), and one import task per CPU, so that the first shard tasks find
    warm workers: a worker's first task would otherwise spend its first seconds importing. Returns a
    call that waits for those imports (at most ``WARM_WAIT_S``): shard tasks sent after them are spread
    over every node, where sent earlier they would crowd onto the nodes that happened to be ready."""
    import ray

    from pipelines.cluster import ensure_ray, warm_workers

    ensure_ray(cfg.ray)
    refs = warm_workers(TASK_MODULES)
    return lambda: ray.wait(refs, num_returns=len(refs), timeout=WARM_WAIT_S)


def _shard_task(ctx: TaskContext, job: ShardJob) -> dict:
    import ray

    stats = write_shard(ctx, job, node_id=ray.get_runtime_context().get_node_id())
    # The per-sample failures stay in the stats file: sent to the driver, they would pile up there.
    return {k: v for k, v in stats.items() if k != "failures"}


def _run_tasks(cfg: Config, ctx: TaskContext, todo: list[ShardJob], total_shards: int,
               tracker: Tracker) -> tuple["Tally", list[tuple[ShardJob, Exception]]]:
    """Run the shard tasks, at most ``max_in_flight`` at a time; return their counts and the failures."""
    import ray

    if not todo:
        return Tally(), []
    limit = cfg.shard.max_in_flight or max(1, 2 * int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(_shard_task).options(num_cpus=1, max_retries=cfg.shard.task_retries,
                                           retry_exceptions=False, scheduling_strategy="SPREAD")
    ctx_ref = ray.put(ctx)
    progress = Progress(total_shards, total_shards - len(todo), tracker)
    pending: dict = {}
    queue = iter(todo)
    errors: list[tuple[ShardJob, Exception]] = []
    try:
        while True:
            while len(pending) < limit and (job := next(queue, None)) is not None:
                pending[task.remote(ctx_ref, job)] = job
            if not pending:
                break
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                job = pending.pop(ref)
                try:
                    stats = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died more than task_retries times, or a bug
                    errors.append((job, e))
                    progress.fail(job)
                    continue
                progress.update(stats)
    except BaseException:
        for ref in pending:  # stop the rest; their temporaries are cleared by the next run
            ray.cancel(ref, force=True)
        raise
    finally:
        progress.close()
    return progress.tally, errors


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised, not Ray's wrapper (whose first line names only the task)."""
    import ray

    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(getattr(error, "cause", None), BaseException):
        return error.cause
    return error


def failure_report(out: str, errors: list[tuple[ShardJob, BaseException]], attempted: int) -> str:
    """What failed, with each task's own exception and message, and advice that fits the cause."""
    import errno

    import ray

    causes = [(job, _cause(e)) for job, e in errors]
    lines = "; ".join(f"{tar_path(out, job.index)}: {type(c).__name__}: {(str(c).splitlines() or [''])[0]}"
                      for job, c in causes[:5])
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for _, c in causes):
        advice = (f"a disk is full (No space left on device): free space where the shards are written ({out}) or "
                  f"in the workers' scratch ({storage.scratch_root()}; set $VITSCALE_SCRATCH), then rerun to redo "
                  "just those shards")
    elif any(isinstance(c, (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError)) for _, c in causes):
        advice = ("a worker process died (killed, or out of memory: fewer tasks in flight with "
                  "shard.max_in_flight, or smaller shard.max_pixels); rerun to redo just those shards")
    else:
        advice = "rerun the stage to redo just those shards"
    return f"shard: {len(errors)} of {attempted} shards failed ({lines}); {advice}"


class Progress:
    """A progress bar on a terminal, a log line every ``LOG_EVERY_S`` otherwise; the running counts
    also go to MLflow as step metrics when a run is given."""

    def __init__(self, total: int, done: int, tracker: Tracker):
        self.total, self.done, self.tracker = total, done, tracker
        self.tally = Tally()  # this run's shards, as they arrive: what the driver keeps of them
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="shard", desc="shard", file=sys.stderr)

    def rate(self) -> float:
        return (self.tally.ok + self.tally.failed) / max(time.perf_counter() - self.t0, 1e-9)

    def update(self, stats: dict) -> None:
        self.done += 1
        self.tally.add(stats)
        ok, failed = self.tally.ok, self.tally.failed
        if self.bar is not None:
            self.bar.set_postfix(ok=ok, failed=failed, img_s=f"{self.rate():.0f}", refresh=False)
            self.bar.update(1)
        now = time.perf_counter()
        if now - self.last >= LOG_EVERY_S or self.done == self.total:
            self.last = now
            if self.bar is None:
                _say(f"shard: {self.done}/{self.total} shards, {ok} images ok, {failed} failed, "
                     f"{self.rate():.0f} images/s")
            self.tracker.log_metrics({"shard.progress_shards": self.done,
                                      "shard.progress_images_per_s": self.rate()}, step=ok + failed)

    def fail(self, job: ShardJob) -> None:
        _say(f"shard: shard {job.index:06d} failed")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- manifest and metrics


class Tally:
    """Finished shards folded into counts: bounded by the number of distinct failure reasons, whatever
    the number of rows or failures."""

    def __init__(self):
        self.shards = self.ok = self.failed = self.bytes = 0
        self.reasons: Counter = Counter()

    def add(self, stats: dict) -> None:
        self.shards += 1
        self.ok += stats["ok"]
        self.failed += stats["failed"]
        self.bytes += stats["bytes"]
        self.reasons.update(stats["failed_by_reason"])


class FailureLog:
    """Every shard's per-sample failures, in shard order, merged into one parquet file for people who
    want to look (the stats files stay the record). Rows are written in groups of ``GROUP``, so at most
    one group and one shard's stats are in memory. Written beside the target (local scratch for object
    storage) and published whole when the block exits without an error."""

    COLUMNS = ("key", "source", "reason", "detail")
    GROUP = 1 << 14

    def __init__(self, location: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.location = location
        self.scratch = storage.scratch_dir("failures") if storage.is_remote(location) else None
        self.tmp = (os.path.join(self.scratch, FAILURES) if self.scratch else storage.temporary_name(location))
        self.schema = pa.schema([(c, pa.string()) for c in self.COLUMNS])
        self.writer = pq.ParquetWriter(self.tmp, self.schema, compression="zstd")
        self.pending: list = []
        self.buffered = 0

    def add(self, failures: list[dict]) -> None:
        import pyarrow as pa

        if failures:
            self.pending.append(pa.Table.from_pylist(failures, schema=self.schema))
            self.buffered += len(failures)
        if self.buffered >= self.GROUP:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.GROUP)
        self.pending, self.buffered = [], 0

    def __enter__(self) -> "FailureLog":
        return self

    def __exit__(self, kind, *_) -> None:
        try:
            if kind is None:
                self._flush()
            self.writer.close()
            if kind is None:
                storage.publish_file(self.tmp, self.location)
        finally:
            if os.path.exists(self.tmp):
                os.remove(self.tmp)
            if self.scratch:
                shutil.rmtree(self.scratch, ignore_errors=True)


def build_manifest(cfg: Config, out: str, plan: Plan, jobs: Iterable[ShardJob], digest: str) -> dict:
    """The dataset's manifest from the stats files (deterministic: no timings, no hosts). ``shards``
    lists the training shards (what the loader reads), ``holdout`` the validation shards; ``totals``
    count them all. On the way, each shard's failures go to ``failures.parquet`` (published before
    the caller writes the manifest); one stats file is read at a time."""
    listed: dict[str, list] = {"train": [], "holdout": []}
    totals, reasons = Counter(), Counter()
    with FailureLog(storage.join(out, FAILURES)) as failures:
        for job in jobs:
            stats = storage.read_json_or_none(stats_path(out, job.index))
            if stats is None:
                raise RuntimeError(f"shard: {stats_path(out, job.index)} is missing or unreadable")
            listed[job.split].append({"name": stats["name"], "samples": stats["ok"], "total": stats["total"],
                                      "failed": stats["failed"], "bytes": stats["bytes"], "sha256": stats["sha256"]})
            for k in ("total", "ok", "failed", "bytes", "kept_original"):
                totals[k] += stats[k]
            reasons.update(stats["failed_by_reason"])
            failures.add(stats["failures"])
    return {
        "format": FORMAT,
        "source": redact(cfg.shard.source),
        "hash": digest,
        "settings": settings_dict(cfg.shard),
        "seed": cfg.seed if cfg.shard.shuffle else None,
        "label_names": plan.label_names,
        "label_kind": "multi" if plan.table.multi else "single",  # multi: read with label_key json:labels
        "num_classes": len(plan.label_names),
        "shards": listed["train"],
        "holdout": listed["holdout"],
        "totals": {"shards": len(listed["train"]) + len(listed["holdout"]),
                   **{k: totals[k] for k in ("total", "ok", "failed", "bytes", "kept_original")}},
        "failed_by_reason": dict(sorted(reasons.items())),
    }


def _log_metrics(tracker: Tracker, tally: Tally, seconds: float, skipped: int,
                 manifest: Optional[dict] = None) -> None:
    """This run's work (images/s counts only what it did) and, when finished, the dataset's totals."""
    values = {"shard.images_ok": tally.ok, "shard.images_failed": tally.failed, "shard.seconds": seconds,
              "shard.images_per_s": (tally.ok + tally.failed) / seconds if seconds > 0 else 0.0,
              "shard.bytes": tally.bytes, "shard.shards_written": tally.shards, "shard.shards_skipped": skipped,
              **{f"shard.failed.{r}": n for r, n in tally.reasons.items()}}
    if manifest:
        values.update({f"shard.dataset_{k}": v for k, v in manifest["totals"].items()})
        values["shard.num_classes"] = manifest["num_classes"]
    tracker.log_metrics(values, step=0)


# --------------------------------------------------------------------------- command line


@contextlib.contextmanager
def _entered_aside(manager) -> Iterator[Callable[[], object]]:
    """Enter ``manager`` in a thread; yield a call that waits for its value. It is exited here, with
    this block's outcome, once entered (a block that fails first still waits for the entry)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="stage-setup")
    entering = pool.submit(manager.__enter__)
    pool.shutdown(wait=False)
    try:
        yield entering.result
    except BaseException as e:
        if entering.exception() is None and manager.__exit__(type(e), e, e.__traceback__):
            return
        raise
    if entering.exception() is None:
        manager.__exit__(None, None, None)


def cli_main(cfg: Config, args) -> int:
    """``vitscale shard CONFIG`` / ``vitscale shard --source SRC --out DIR`` (the source is already in cfg)."""
    from pipelines.cluster import ensure_ray
    from pipelines.tracking import _sigterm_raises, stage_run, tracking_uri

    tracking_uri(cfg.tracking, cfg.workdir)  # no MLflow for a remote workdir: a config error, before any work
    out = shard_dir(cfg, getattr(args, "out", None))
    # MLflow's set-up (its import, the store, the run) takes seconds: it runs in a thread while Ray
    # starts here (Ray only starts from the main thread) and the plan is made, so they overlap instead
    # of adding up. The SIGTERM handler is set here, since stage_run cannot set one from a thread.
    with Lease(out, "vitscale shard"), _sigterm_raises(), _entered_aside(stage_run(cfg, "shard")) as run_id:
        if storage.read_json_or_none(storage.join(out, MANIFEST)) is None:  # else maybe done: Ray when needed
            ensure_ray(cfg.ray, dashboard=False)
        manifest = run_shard_stage(cfg, out, run_id=run_id)
    print(f"{manifest['totals']['ok']} images in {manifest['totals']['shards']} shards, "
          f"{manifest['num_classes']} classes: {storage.join(out, MANIFEST)}")
    return 0
