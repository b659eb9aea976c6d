"""Connecting to Ray: the same call on a laptop (starts Ray in-process) and on a cluster (joins it)."""
from __future__ import annotations

from pipelines.config import RayConfig


def ensure_ray(ray_cfg: RayConfig) -> None:
    """``ray.init`` once per process; a no-op when Ray is already up (tests share one instance).

    No runtime_env here: local workers inherit this process's environment, and a submitted job
    already carries the one ``vitscale submit`` gave it (Ray refuses to merge a second one).
    """
    import ray

    if ray.is_initialized():
        return
    if ray_cfg.address is None:
        ray.init(include_dashboard=False)  # a laptop run needs no dashboard port open
    else:
        ray.init(address=ray_cfg.address)
