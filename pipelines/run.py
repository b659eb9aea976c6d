"""``vitscale run``: shard, then pretrain, then transfer, under one MLflow parent run.

A stage whose output is already complete is skipped, so rerunning the same command resumes where
the last one stopped (and a finished pipeline only prints its summary again).
"""
from __future__ import annotations

import argparse
import logging
import time
from typing import Callable, Optional

import yaml

from pipelines.config import Config, flatten, to_dict
from pipelines.tracking import stage_run, tracker_for, tracking_uri
from pretrain import storage
from pretrain.lease import Lease
from pretrain.redact import redact

log = logging.getLogger(__name__)


def _stages() -> list[tuple[str, Callable[[Config], bool], Callable[..., dict]]]:
    # Imported here so that `vitscale run --help` and a config error stay instant.
    from pipelines.shard import run_shard_stage, shards_complete
    from pipelines.train_job import pretrain_complete, run_pretrain
    from pipelines.transfer_job import run_transfer, transfer_complete

    return [
        ("shard", shards_complete, run_shard_stage),
        ("pretrain", pretrain_complete, run_pretrain),
        ("transfer", transfer_complete, run_transfer),
    ]


def run_pipeline(cfg: Config, parent_run_id: Optional[str] = None) -> dict:
    """Run every unfinished stage; returns {stage: result or "skipped"} plus the summary text (not printed)."""
    from pipelines.cluster import ensure_ray

    results: dict[str, object] = {}
    with Lease(cfg.workdir, "vitscale run"):
        ensure_ray(cfg.ray)
        return _run_stages(cfg, parent_run_id, results)


def _run_stages(cfg: Config, parent_run_id: Optional[str], results: dict) -> dict:
    with stage_run(cfg, "pipeline", parent_run_id=parent_run_id) as run_id:
        tracker = tracker_for(cfg, run_id)
        try:
            tracker.log_params(flatten(cfg))
            tracker.log_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), "config.yaml")
            for name, complete, run_stage in _stages():
                if complete(cfg):
                    log.info("[vitscale] %s: output complete, skipped", name)
                    results[name] = "skipped"
                    tracker.set_tags({f"vitscale.{name}": "skipped"})
                    continue
                log.info("[vitscale] %s: starting", name)
                t0 = time.time()
                with stage_run(cfg, name, parent_run_id=run_id) as stage_run_id:
                    results[name] = run_stage(cfg, run_id=stage_run_id)
                seconds = time.time() - t0
                tracker.log_metrics({f"{name}_seconds": seconds}, step=0)
                tracker.set_tags({f"vitscale.{name}": "done"})
                log.info("[vitscale] %s: done in %.0f s", name, seconds)
        finally:
            tracker.close()
        results["summary"] = summary(cfg)
        results["run_id"] = run_id
    return results


def summary(cfg: Config) -> str:
    """Where everything is, the transfer table, and how to look at the runs."""
    from pipelines.transfer_job import REPORT, report_dir

    work = cfg.workdir.rstrip("/")
    report = storage.join(report_dir(cfg), REPORT)
    lines = [
        "",
        f"vitscale run '{cfg.name}' finished.",
        f"  shards:      {work}/shards (manifest.json)",
        f"  checkpoints: {work}/checkpoints (export: {work}/export/model.safetensors)",
        f"  report:      {report}",
        "",
    ]
    if storage.isfile(report):
        lines += [storage.read_text(report).rstrip(), ""]
    uri = tracking_uri(cfg.tracking, cfg.workdir)
    if uri.startswith("sqlite"):
        lines.append(f"  MLflow UI:   mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        lines.append(f"  MLflow:      {redact(uri)} (experiment '{cfg.tracking.experiment}')")
    return "\n".join(lines)


def cli_main(cfg: Config, args: argparse.Namespace) -> int:  # noqa: ARG001
    print(run_pipeline(cfg)["summary"], flush=True)  # the command's product: where everything is, the table
    return 0
