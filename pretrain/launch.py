"""Entry point of a training process under any launcher.

The seam between orchestration and the ML core is a plain dict: the resolved config (every key, as
``pipelines.config.to_dict`` writes it, already validated) plus where to log. ``pipelines/train_job.py``
hands that dict to each Ray Train worker; Slurm users write it to a file and run::

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
from typing import Any, Optional

import yaml

from pretrain.errors import InputError

# Mappings that stay dicts (raw pass-through keys), not sections read by attribute.
RAW_KEYS = {"deepspeed"}


class Section:
    """A read-only view of a config mapping by attribute; a missing key is an InputError naming its path."""

    def __init__(self, data: dict, path: str = "", source: str = "config"):
        self._data, self._path, self._source = data, path, source

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        where = f"{self._path}.{name}" if self._path else name
        if name not in self._data:
            raise InputError(f"{self._source}: {where}: missing (pass the resolved config that "
                             "`python -m pipelines.train_job CONFIG --out FILE` writes)")
        value = self._data[name]
        if isinstance(value, dict) and name not in RAW_KEYS:
            return Section(value, where, self._source)
        return value


def run_job(spec: dict) -> dict:
    """Train on this process's rank: ``spec = {"config": dict, "run_id": str|None, "tracking_uri": str|None}``."""
    from pretrain.loop import train

    cfg = Section(spec["config"], source=spec.get("source", "config"))
    return train(cfg.model, cfg.pretrain, workdir=str(cfg.workdir), seed=int(cfg.seed),
                 run_id=spec.get("run_id"), tracking_uri=spec.get("tracking_uri"),
                 data_root=cfg.transfer.data_root)


def read_spec(path: str, run_id: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """The job spec from a resolved config file and the MLflow run to log to (None: no MLflow)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: config file not found")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as e:
        raise InputError(f"{file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{file}: the top level must be a mapping")
    return {"config": data, "source": str(file),
            "run_id": run_id or os.environ.get("MLFLOW_RUN_ID"),
            "tracking_uri": tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")}


def _lease(spec: dict) -> contextlib.AbstractContextManager:
    """Global rank 0 holds the checkpoint root's lease for the job (a second job on it is refused; the
    launcher then stops this job's other ranks). Under Ray Train the driver holds it instead."""
    from pretrain import storage
    from pretrain.lease import Lease

    if int(os.environ.get("RANK", 0)) != 0:
        return contextlib.nullcontext()
    return Lease(storage.join(str(spec["config"]["workdir"]), "checkpoints"), "pretrain.launch")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.launch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="resolved config YAML (every key)")
    ap.add_argument("--run-id", default=None, help="MLflow run to log to (default $MLFLOW_RUN_ID)")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = ap.parse_args(argv)
    try:
        spec = read_spec(args.config, args.run_id, args.tracking_uri)
        with _lease(spec):
            result = run_job(spec)
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
