"""``vitscale pretrain``: the pretraining loop on Ray Train workers, one MLflow run owned by the driver.

The driver resolves the config (absolute workdir, MLflow URI), logs it to the run (params + the file
as an artifact), and starts a ``TorchTrainer`` whose workers each call ``pretrain.launch.run_job``
with the typed ``TrainJob`` of that config: the same entry ``torchrun``/``deepspeed`` users reach
through ``python -m pretrain.launch --config FILE``. Rank 0 logs metrics to the run by id.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import yaml

from pipelines.config import Config, ConfigError, flatten, load_config, to_dict
from pipelines.tracking import stage_run, tracker_for, tracking_uri
from pretrain import storage
from pretrain.launch import job_from_resolved
from pretrain.lease import Lease
from pretrain.loop import EXPORT_MARKER
from pretrain.redact import redact

RESOLVED_CONFIG = "config.resolved.yaml"
log = logging.getLogger(__name__)


def resolved_config(cfg: Config) -> dict:
    """The whole config as a dict with local paths made absolute (Ray workers may run elsewhere) and
    credentials stripped from every URI. The same dict is written to the workdir, logged as an
    artifact and handed to the workers, so it must hold no secret; the workers need none from it:
    they get the real MLflow URI as ``loop_config["tracking_uri"]`` (or ``$MLFLOW_TRACKING_URI``) and
    storage credentials from ``AWS_*``."""
    data = to_dict(cfg)
    data["workdir"] = storage.absolute(cfg.workdir)
    data["pretrain"]["shards"] = storage.absolute(cfg.pretrain.shards)
    data["transfer"]["data_root"] = storage.absolute(cfg.transfer.data_root)
    # A location the workers read from this dict must not need its credential: it would reach them stripped.
    for key, value in (("workdir", data["workdir"]), ("pretrain.shards", data["pretrain"]["shards"])):
        if value and redact(value) != value:
            raise ConfigError(f"{key}: {redact(value)!r} carries a credential in its URL (user:password@ or a "
                              "?query, e.g. a signed URL); this config is written to the workdir and logged to "
                              "MLflow, so give storage credentials as AWS_* environment variables instead")
    return redact(data)


def write_resolved_config(cfg: Config, path: Optional[str] = None) -> str:
    """Write the resolved config YAML (default ``{workdir}/config.resolved.yaml``); returns its path."""
    data = resolved_config(cfg)
    path = path or storage.join(data["workdir"], RESOLVED_CONFIG)
    storage.write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def _train_worker(loop_config: dict) -> dict:
    """Runs in each Ray Train worker (process group already up): train, then say where each rank ran."""
    import ray
    import torch.distributed as dist

    from pretrain.launch import run_job

    result = run_job(loop_config["job"], loop_config["run_id"], loop_config["tracking_uri"])
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return {**result, "nodes": nodes}


def run_pretrain(cfg: Config, run_id: Optional[str] = None) -> dict:
    """Pretrain with ``cfg.pretrain.workers`` Ray Train workers; log to MLflow run ``run_id`` if given.

    Returns ``{"step", "metrics", "checkpoint_dir", "export_dir", "nodes"}`` (rank 0's view; ``nodes``
    is the Ray node id of each rank). A failure in the workers raises after ``max_failures`` restarts.
    """
    from pipelines.cluster import ensure_ray

    with Lease(checkpoint_root(cfg), "vitscale pretrain"):
        check_labels(cfg)  # before Ray and its workers: a wrong loss for the shards is exit 2, not a retried crash
        ensure_ray(cfg.ray)
        return _fit(cfg, run_id)


def check_labels(cfg: Config) -> None:
    """The loss and label key fit the shards (their manifest's ``label_kind``); InputError otherwise."""
    from pretrain.data import resolve_shards
    from pretrain.loop import multi_label

    _, manifest = resolve_shards(cfg.pretrain.shards or storage.join(cfg.workdir, "shards"))
    multi_label(manifest, cfg.pretrain)


def checkpoint_root(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.workdir), "checkpoints")


def _fit(cfg: Config, run_id: Optional[str]) -> dict:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pretrain.checkpoint import describe_resume

    p = cfg.pretrain
    resolved = resolved_config(cfg)
    write_resolved_config(cfg)
    uri = tracking_uri(cfg.tracking, cfg.workdir) if run_id else None
    loop_config = {"job": job_from_resolved(resolved), "run_id": run_id, "tracking_uri": uri}
    driver = tracker_for(cfg, run_id)  # tolerant: an unreachable server must not stop the job
    driver.log_params(flatten(cfg))
    driver.log_text(yaml.safe_dump(resolved, sort_keys=False), RESOLVED_CONFIG)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=p.workers, use_gpu=p.use_gpu,
                                     resources_per_worker={"CPU": p.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if p.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{cfg.name}-pretrain", storage_path=storage.join(resolved["workdir"], "ray_results"),
                             failure_config=FailureConfig(max_failures=p.max_failures)),
    )
    try:
        result = trainer.fit().return_value
        resumed = describe_resume({"resumed": result["resumed"]} if result.get("resumed") else None)
        driver.set_tags({"vitscale.pretrain.nodes": ",".join(result["nodes"]),
                         "vitscale.pretrain.step": result["step"], "vitscale.pretrain.resumed": resumed})
        log.info("[vitscale] pretrain: %s", resumed)
    finally:
        driver.close(timeout_s=10.0)  # the params went out long ago; only the final tags may wait
    return result


def pretrain_complete(cfg: Config) -> bool:
    """True when an export taken at step >= ``pretrain.steps`` exists (the pipeline then skips pretraining)."""
    out = storage.join(cfg.workdir, "export")
    marker = storage.read_json_or_none(storage.join(out, EXPORT_MARKER))
    return bool(marker) and int(marker.get("step", 0)) >= cfg.pretrain.steps


def cli_main(cfg: Config, args: argparse.Namespace) -> int:  # noqa: ARG001
    with Lease(checkpoint_root(cfg), "vitscale pretrain"):
        check_labels(cfg)  # exit 2 before an MLflow run exists
        with stage_run(cfg, "pretrain") as run_id:
            result = run_pretrain(cfg, run_id=run_id)
    loss = result["metrics"].get("loss")
    log.info(f"[vitscale] pretrain: step {result['step']}, loss {loss if loss is None else round(loss, 4)}, "
             f"export {result['export_dir']}, MLflow run {run_id}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m pipelines.train_job CONFIG --out FILE``: write the resolved config for torchrun/Slurm."""
    ap = argparse.ArgumentParser(prog="python -m pipelines.train_job")
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", default=None, help=f"where to write it (default {{workdir}}/{RESOLVED_CONFIG})")
    args = ap.parse_args(argv)
    path = write_resolved_config(load_config(args.config, args.overrides), args.out)
    print(path)
    print(f"run it with: torchrun --nproc_per_node N -m pretrain.launch --config {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
