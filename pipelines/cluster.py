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
    # null means a new local instance ("local"), never whatever /tmp/ray/ray_current_cluster or
    # $RAY_ADDRESS point at. Local Ray keeps its dashboard on 127.0.0.1 (Ray's default): Ray Train's
    # controller asks it for actor state, and a run without it logs tracebacks.
    ray.init(address=ray_cfg.address or "local")
