"""Connecting to Ray: the same call on a laptop (starts Ray in-process) and on a cluster (joins it)."""
from __future__ import annotations

from pipelines.config import RayConfig

_STARTED_HERE = False  # whether ensure_ray started a local instance in this process (stop_ray stops only that)


def ensure_ray(ray_cfg: RayConfig, dashboard: bool = True) -> None:
    """``ray.init`` once per process; a no-op when Ray is already up (tests share one instance).

    No runtime_env here: local workers inherit this process's environment, and a submitted job
    already carries the one ``vitscale submit`` gave it (Ray refuses to merge a second one).
    ``dashboard=False`` starts a local instance without the dashboard, a process that takes a few
    seconds of CPU to start; only Ray Train needs it, so the shard command alone goes without.
    Joining a running cluster (``ray.address: auto``) starts nothing. Ray must start from the main
    thread (from another one it waits for its GCS and gives up).
    """
    global _STARTED_HERE
    import ray

    if ray.is_initialized():
        return
    # null means a new local instance ("local"), never whatever /tmp/ray/ray_current_cluster or
    # $RAY_ADDRESS point at. Local Ray keeps its dashboard on 127.0.0.1 (Ray's default): Ray Train's
    # controller asks it for actor state, and a run without it logs tracebacks.
    address = ray_cfg.address or "local"
    if address == "local" and not dashboard:
        ray.init(address=address, include_dashboard=False)
    else:
        ray.init(address=address)
    _STARTED_HERE = address == "local"


def stop_ray() -> None:
    """Stop the local instance ``ensure_ray`` started in this process (nothing else: a joined cluster,
    or the one Ray a test session shares, stays up).

    Called by the command once its work is published, not left to Ray's exit hook, which first
    sleeps 0.5 s for log lines. Ray's shutdown sends SIGTERM to its processes one at a time and
    waits up to 1 s for each; the autoscaler monitor's SIGTERM handler reports to the GCS, which is
    already gone by then, so it always takes the whole second and then SIGKILL. A local instance
    has nothing to autoscale, so the monitor is killed first (with a guard: this reaches into
    ``ray._private``, pinned to one Ray minor version in pyproject.toml).
    """
    global _STARTED_HERE
    import ray

    if not (_STARTED_HERE and ray.is_initialized()):
        return
    from ray._private import worker

    processes = getattr(getattr(worker, "_global_node", None), "all_processes", None) or {}
    for info in processes.get("monitor", []):
        info.process.kill()
    ray.shutdown()
    _STARTED_HERE = False


def _import(modules: tuple[str, ...]) -> None:
    import importlib

    for name in modules:
        importlib.import_module(name)


def warm_workers(modules: tuple[str, ...]) -> list:
    """One task per CPU of the cluster that imports ``modules``: the workers Ray starts do their imports
    now (while the driver plans), not when the first real tasks reach them. Returns the tasks' refs."""
    import ray

    task = ray.remote(_import).options(num_cpus=1, scheduling_strategy="SPREAD")
    return [task.remote(modules) for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1))))]
