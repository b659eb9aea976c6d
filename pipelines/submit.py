"""Ray Jobs: ``vitscale submit`` ships this checkout and the resolved config to a Ray cluster,
``vitscale jobs`` lists, inspects, tails and stops what runs there.

The job runs ``vitscale <stage> vitscale_job.yaml`` in a copy of the working tree (Ray puts that
copy first on the job's PYTHONPATH, so the cluster runs exactly the code that was submitted).
Credentials travel as environment variables taken from the submitter's shell, never in the config.
Anyone who can reach the dashboard can read a job's runtime_env, so the dashboard stays private
(see infra/README.md) and ``jobs status`` never prints the values.
"""
from __future__ import annotations

import asyncio
import fnmatch
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, Optional, TypeVar

import yaml

from pipelines.config import Config, replace, to_dict
from pretrain.errors import InputError

JOB_CONFIG = "vitscale_job.yaml"
STAGES = ("run", "shard", "pretrain", "transfer")
CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
CREDENTIAL_PREFIXES = ("AWS_",)
# AWS_* variables that point into the submitter's own files: meaningless (or harmful) on the cluster.
LOCAL_ONLY = ("AWS_CA_BUNDLE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
              "AWS_PROFILE")
# Never shipped: environments, outputs, VCS state, caches. Matched against each path component.
EXCLUDE = (".venv", "venv", "runs", ".git", "__pycache__", ".pytest_cache", "mlruns", "mlartifacts",
           "*.egg-info", "build", "dist", ".ipynb_checkpoints", "*.pyc", "*.tar", "*.safetensors", "*.pt")
MAX_FILE_BYTES = 8 * 2**20  # bigger files are data or weights, which belong on shared storage
CONNECT_TIMEOUT_S = 10.0
STOP_WAIT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after its own grace period
AGENT_WAIT_S = 120.0  # how long a just-started head may answer "No available agent ... try again later"
T = TypeVar("T")


# --------------------------------------------------------------------------- what is shipped


def credentials_from_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The credential variables set (and non-empty) in ``environ``: MLflow auth and ``AWS_*``
    (without those that name local files or profiles)."""
    return {k: v for k, v in environ.items()
            if v and k not in LOCAL_ONLY and (k in CREDENTIAL_VARS or k.startswith(CREDENTIAL_PREFIXES))}


def job_config(cfg: Config) -> Config:
    """The config as the job must see it: a null ``ray.address`` would start a second, private Ray
    inside the job, so it becomes ``auto`` (the cluster the job runs on)."""
    if cfg.ray.address is None:
        return replace(cfg, **{"ray.address": "auto"})
    return cfg


def source_root() -> Path:
    """The checkout vitscale runs from (when it has a pyproject.toml), else the current directory."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDE)


def stage_working_dir(src: Path, dest: Path, cfg: Config) -> list[str]:
    """Copy ``src`` into ``dest`` without environments, outputs and big files, then write the
    resolved config as ``dest/vitscale_job.yaml``. Returns the skipped big files (relative paths)."""
    skipped = []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d))
        rel = Path(dirpath).relative_to(src)
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if _excluded(name) or not path.is_file():
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped.append(str(rel / name))
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel / name)
    header = f"# resolved config shipped by `vitscale submit` ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
    (dest / JOB_CONFIG).write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return skipped


def entrypoint(stage: str) -> str:
    return shlex.join(["vitscale", stage, JOB_CONFIG])


# --------------------------------------------------------------------------- connecting


def normalise_address(address: str) -> str:
    """``HEAD:8265`` -> ``http://HEAD:8265``; the Ray Client (``ray://``) and GCS ports are refused."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise InputError(f"--address {address}: that is the Ray Client address; submit needs the "
                         "dashboard address, e.g. http://HEAD:8265")
    if "://" not in address:
        address = "http://" + address
    if not address.startswith(("http://", "https://")):
        raise InputError(f"--address {address}: expected http://HOST:PORT (the Ray dashboard)")
    return address


def connect(address: Optional[str]):
    """A ``JobSubmissionClient`` for the dashboard at ``address`` (or ``$RAY_ADDRESS``).

    Reachability is checked first with a bounded timeout: the Ray client itself waits as long as
    the operating system does, minutes for an address that drops packets.
    """
    import requests

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    address = normalise_address(address)
    try:
        requests.get(f"{address}/api/version", timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as e:
        raise InputError(
            f"cannot reach the Ray dashboard at {address} ({type(e).__name__}); is the head running, "
            "and is the port forwarded (e.g. kubectl port-forward svc/HEAD-svc 8265:8265)?"
        ) from None
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise InputError(f"the Ray cluster at {address} refused the request: {e}. It uses token "
                         "authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                         "~/.ray/auth_token) to the cluster's token") from None
    except (ConnectionError, RuntimeError) as e:
        raise InputError(f"{address} does not answer as a Ray dashboard: {e}") from None


# --------------------------------------------------------------------------- submit


def _via_agent(call: Callable[[], T]) -> T:
    """``call()``, retried while the head has no job agent yet. A head's dashboard answers seconds
    before the agent that starts jobs has registered (longer on a busy machine); meanwhile submit and
    stop fail with "No available agent to submit job, please try again later", which we do."""
    deadline, said = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            return call()
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            if not said:
                print("the cluster's job agent is not up yet; retrying for up to "
                      f"{AGENT_WAIT_S:.0f} s", file=sys.stderr, flush=True)
                said = True
            time.sleep(2.0)


def _stream_logs(client, job_id: str) -> None:
    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    asyncio.run(tail())


def _wait_status(client, job_id: str, timeout_s: float = float("inf")) -> str:
    """Poll until the job's status is terminal (or ``timeout_s`` passed); return the last status."""
    deadline = time.monotonic() + timeout_s
    status = client.get_job_status(job_id)
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return str(status)


def _wait(client, job_id: str) -> str:
    """Stream the job's logs until it ends; return its final status."""
    _stream_logs(client, job_id)
    return _wait_status(client, job_id)  # the log stream can close a moment before the status flips


def _hints(job_id: str, address: str) -> str:
    return (f"  follow: vitscale jobs logs {job_id} --follow --address {address}\n"
            f"  stop:   vitscale jobs stop {job_id} --address {address}")


def submit_main(cfg: Config, args) -> int:
    """``vitscale submit CONFIG --address URL [--stage NAME] [--no-wait]``: 0 when the job succeeds
    (or, with --no-wait, was accepted), 1 when it fails or is stopped."""
    stage = getattr(args, "stage", "run") or "run"
    if stage not in STAGES:
        raise InputError(f"--stage {stage}: must be one of {', '.join(STAGES)}")
    client = connect(args.address)
    address = normalise_address(args.address)
    cfg = job_config(cfg)
    if "://" not in cfg.workdir and not Path(cfg.workdir).is_absolute():
        print(f"warning: workdir {cfg.workdir!r} is relative: on the cluster it lands inside the job's "
              "temporary directory; use a shared absolute path or s3://...", file=sys.stderr)
    if cfg.tracking.uri is None:
        print("warning: tracking.uri is null: MLflow writes a sqlite file into the workdir on the cluster; "
              "set it to your MLflow server (infra/mlflow)", file=sys.stderr)
    env = credentials_from_env(os.environ)
    submission_id = f"vitscale-{cfg.name}-{stage}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="vitscale-submit-") as tmp:
        skipped = stage_working_dir(source_root(), Path(tmp), cfg)
        for rel in skipped:
            print(f"not shipped (over {MAX_FILE_BYTES // 2**20} MiB): {rel}", file=sys.stderr)
        runtime_env = {"working_dir": tmp, "env_vars": env}
        job_id = _via_agent(lambda: client.submit_job(
            entrypoint=entrypoint(stage), runtime_env=runtime_env, submission_id=submission_id,
            metadata={"vitscale.name": cfg.name, "vitscale.stage": stage},
        ))
    print(f"submitted {job_id}: {entrypoint(stage)} on {address}", flush=True)
    if env:
        print(f"credentials passed as environment variables: {', '.join(sorted(env))}", flush=True)
    if args.no_wait:
        print(_hints(job_id, address))
        return 0
    try:
        status = _wait(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped watching; {job_id} goes on running on the cluster\n{_hints(job_id, address)}",
              file=sys.stderr)
        raise
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


# --------------------------------------------------------------------------- jobs


def _when(ms: Optional[int]) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e):
            raise InputError(f"no job {job_id!r} on this cluster (see `vitscale jobs list`)") from None
        raise


def _print_list(client) -> None:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'JOB':40s} {'STATUS':10s} {'STARTED':19s}  ENTRYPOINT")
    for j in jobs:
        job = j.submission_id or j.job_id or "-"
        print(f"{job:40s} {str(j.status):10s} {_when(j.start_time):19s}  {j.entrypoint[:80]}")


def _print_status(info) -> None:
    env_names = sorted((info.runtime_env or {}).get("env_vars", {}) or {})
    print(f"job:        {info.submission_id or info.job_id}")
    print(f"status:     {info.status}")
    print(f"message:    {info.message or '-'}")
    print(f"entrypoint: {info.entrypoint}")
    print(f"started:    {_when(info.start_time)}")
    print(f"ended:      {_when(info.end_time)}")
    if info.metadata:
        print("metadata:   " + ", ".join(f"{k}={v}" for k, v in sorted(info.metadata.items())))
    if env_names:  # names only: the values are credentials
        print(f"env vars:   {', '.join(env_names)} (values hidden)")


def jobs_main(args) -> int:
    """``vitscale jobs list | status ID | logs ID [--follow] | stop ID`` against --address or $RAY_ADDRESS."""
    if args.action != "list" and not args.job_id:
        raise InputError(f"jobs {args.action}: give a job id (see `vitscale jobs list`)")
    client = connect(args.address)
    if args.action == "list":
        _print_list(client)
    elif args.action == "status":
        _print_status(_info(client, args.job_id))
    elif args.action == "logs":
        _info(client, args.job_id)
        if args.follow:
            _stream_logs(client, args.job_id)
        else:
            print(client.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        info = _info(client, args.job_id)
        if info.status.is_terminal():
            print(f"{args.job_id} already ended: {info.status}")
        else:
            _via_agent(lambda: client.stop_job(args.job_id))
            print(f"{args.job_id}: {_wait_status(client, args.job_id, STOP_WAIT_S)}")
    return 0
