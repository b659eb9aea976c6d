"""Entry point of a training process under any launcher.

The seam between orchestration and the ML core is a typed ``TrainJob`` (``pretrain/config.py``: the
``model`` and ``pretrain`` slices, workdir, seed) plus where to log. ``pipelines/train_job.py`` hands it
to each Ray Train worker; Slurm users write the resolved config to a file and run::

    torchrun --nnodes N --nproc_per_node 8 ... -m pretrain.launch --config runs/x/config.resolved.yaml
    deepspeed --num_gpus 8 pretrain/launch.py --config runs/x/config.resolved.yaml

``--run-id`` / ``--tracking-uri`` default to MLflow's own ``MLFLOW_RUN_ID`` / ``MLFLOW_TRACKING_URI``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from pretrain.config import ConfigError, ModelConfig, PretrainConfig, TrainJob, build
from pretrain.errors import InputError

def job_from_resolved(data: dict, source: str = "config") -> TrainJob:
    """The typed ``TrainJob`` from a resolved config mapping (every key, as ``vitscale`` writes it):
    its ``model`` and ``pretrain`` sections, ``workdir``, ``seed`` and ``transfer.data_root``."""
    missing = [key for key in ("workdir", "model", "pretrain") if key not in data]
    if missing:
        raise ConfigError(f"{source}: {missing[0]}: missing (pass the resolved config that "
                          "`python -m pipelines.train_job CONFIG --out FILE` writes)")
    try:
        return TrainJob(model=build(ModelConfig, data["model"], "model"),
                        pretrain=build(PretrainConfig, data["pretrain"], "pretrain"),
                        workdir=str(data["workdir"]), seed=int(data.get("seed", 0)),
                        data_root=(data.get("transfer") or {}).get("data_root"))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def run_job(job: TrainJob, run_id: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """Train on this process's rank; log to MLflow run ``run_id`` at ``tracking_uri`` (None: no MLflow)."""
    from pretrain.loop import train

    return train(job, run_id=run_id, tracking_uri=tracking_uri)


def read_job(path: str) -> TrainJob:
    """The ``TrainJob`` of a resolved config file."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: config file not found")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: the top level must be a mapping")
    return job_from_resolved(data, str(file))


def _lease(job: TrainJob) -> contextlib.AbstractContextManager:
    """Global rank 0 holds the checkpoint root's lease for the job (a second job on it is refused; the
    launcher then stops this job's other ranks). Under Ray Train the driver holds it instead."""
    from pretrain import storage
    from pretrain.lease import Lease

    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    return Lease(storage.join(job.workdir, "checkpoints"), "pretrain.launch")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="resolved config YAML (every key)")
    ap.add_argument("--run-id", default=None, help="MLflow run to log to (default $MLFLOW_RUN_ID)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    try:
        job = read_job(args.config)
        with _lease(job):
            result = run_job(job, args.run_id or os.environ.get("MLFLOW_RUN_ID"),
                             args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    except InputError as e:
        print(f"pretrain.launch: error: {e}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # this process's launcher owns nothing else: leave the group cleanly
            dist.destroy_process_group()
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"[pretrain] done at step {result['step']}; export in {result['export_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
