"""Connecting to Ray: the same call on a laptop (starts Ray in-process) and on a cluster (joins it)."""
from __future__ import annotations

import os

from pipelines.config import RayConfig


def ensure_ray(ray_cfg: RayConfig) -> None:
    """``ray.init`` once per process; a no-op when Ray is already up (tests share one instance)."""
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in ("DS_ACCELERATOR", "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID",
                                      "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL") if k in os.environ}
    kwargs = dict(address=ray_cfg.address, log_to_driver=True, runtime_env={"env_vars": env} if env else None)
    if ray_cfg.address is None:
        kwargs["include_dashboard"] = False  # a laptop run needs no dashboard port open
    ray.init(**kwargs)
