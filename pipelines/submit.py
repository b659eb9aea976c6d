"""Ray Jobs: ``vitscale submit`` ships this checkout and the resolved config to a Ray cluster,
``vitscale jobs`` lists, inspects, tails and stops what runs there.

The job runs ``vitscale <stage> vitscale_job.yaml`` in a copy of the working tree (Ray puts that
copy first on the job's PYTHONPATH, so the cluster runs exactly the code that was submitted). The copy
holds what git would commit (tracked files and untracked ones it does not ignore; outside a git checkout,
what ``.gitignore`` lets through), never secrets or local databases (``DENY``), even tracked ones.
Credentials travel as environment variables taken from the submitter's shell, never in the config: a
credential inside a config URI (``http://user:pw@host``, a signed URL) is redacted in the shipped YAML and
handed to the job as a variable that the entrypoint sets back (``--set KEY="$VITSCALE_SECRET_0"``).
Sending them over plain http to another machine is refused unless ``--insecure``.
Anyone who can reach the dashboard can read a job's runtime_env, so the dashboard stays private
(see infra/README.md) and ``jobs status`` never prints the values.
"""
from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Optional, Sequence, TypeVar
from urllib.parse import urlsplit

import yaml

from pipelines.config import Config, leaves, replace, to_dict
from pretrain.errors import InputError
from pretrain.redact import redact

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
# Secrets and local databases: never shipped, even when git tracks them. Matched like EXCLUDE.
DENY = (".env*", "*.pem", "*.key", "id_*", ".netrc", "*.db", "mlruns")
SECRET_VAR = "VITSCALE_SECRET_{}"
MAX_FILE_BYTES = 8 * 2**20  # bigger files are data or weights, which belong on shared storage
CONNECT_TIMEOUT_S = 10.0
STOP_WAIT_S = 60.0  # Ray sends SIGTERM, then SIGKILL after its own grace period
AGENT_WAIT_S = 120.0  # how long a just-started head may answer "No available agent ... try again later"
T = TypeVar("T")
log = logging.getLogger(__name__)


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


def _denied(rel: str) -> Optional[str]:
    """``rel`` up to its first deny-listed component (``conf/.env`` of ``conf/.env/x``), else None."""
    parts = rel.split("/")
    for i, part in enumerate(parts):
        if any(fnmatch.fnmatch(part, pattern) for pattern in DENY):
            return "/".join(parts[: i + 1])
    return None


def _git_listing(src: Path) -> Optional[list[str]]:
    """Files under ``src`` that git tracks, plus untracked ones it does not ignore (a user expects the
    module they created but did not ``git add`` yet to run on the cluster); None outside a checkout."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=src, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return sorted({os.fsdecode(p) for p in out.split(b"\0") if p})  # a conflicted file is listed per stage


class _Rule(NamedTuple):
    base: str  # folder of the .gitignore that holds the rule, relative to the root ("" at the root)
    regex: re.Pattern
    negate: bool
    dir_only: bool


def _glob_regex(glob: str) -> str:
    """A gitignore glob as a regex: ``*``, ``?`` and ``[...]`` stay within one folder, ``**`` spans folders."""
    out, i = [], 0
    while i < len(glob):
        if glob.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif glob.startswith("**", i):
            out.append(".*")
            i += 2
        elif glob[i] in "*?":
            out.append("[^/]*" if glob[i] == "*" else "[^/]")
            i += 1
        elif glob[i] == "[" and (end := glob.find("]", i + 2)) > 0:
            body = glob[i + 1:end]
            out.append("[" + ("^" + body[1:] if body[0] in "!^" else body) + "]")
            i = end + 1
        else:
            if glob[i] == "\\" and i + 1 < len(glob):  # an escaped character is literal
                i += 1
            out.append(re.escape(glob[i]))
            i += 1
    return "".join(out)


def _rule(line: str, base: str) -> Optional[_Rule]:
    """One .gitignore line as a rule (None for blanks and comments), with git's anchoring: a pattern
    holding a ``/`` (other than a trailing one) is relative to its .gitignore, else matches at any depth."""
    line = line.rstrip()
    if not line or line.startswith("#"):
        return None
    negate = line.startswith("!")
    line = line[1:] if negate else line
    line = line[1:] if line.startswith(("\\#", "\\!")) else line
    dir_only = line.endswith("/")
    line = line.rstrip("/")
    if not line:
        return None
    anchor = "" if "/" in line else "(?:.*/)?"
    return _Rule(base, re.compile(anchor + _glob_regex(line.lstrip("/"))), negate, dir_only)


def _ignored(rel: str, is_dir: bool, rules: Sequence[_Rule]) -> bool:
    ignored = False
    for rule in rules:  # the last matching rule wins; deeper .gitignore files come later
        if (rule.base and not rel.startswith(rule.base + "/")) or (rule.dir_only and not is_dir):
            continue
        if rule.regex.fullmatch(rel[len(rule.base) + 1:] if rule.base else rel):
            ignored = not rule.negate
    return ignored


def _walk_listing(src: Path) -> list[str]:
    """Files under ``src`` that its .gitignore files (nested ones too) let through. An ignored folder is
    not entered, so, as in git, nothing inside it can be re-included."""
    rules: list[_Rule] = []
    files: list[str] = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src).as_posix()
        base = "" if rel == "." else rel
        gitignore = Path(dirpath) / ".gitignore"
        if gitignore.is_file():
            rules += filter(None, (_rule(line, base) for line in gitignore.read_text(errors="replace").splitlines()))
        prefix = f"{base}/" if base else ""
        dirnames[:] = sorted(d for d in dirnames if not _excluded(d) and not _ignored(prefix + d, True, rules))
        files += [prefix + f for f in sorted(filenames) if not _ignored(prefix + f, False, rules)]
    return files


class Skipped(NamedTuple):
    too_big: list[str]  # over MAX_FILE_BYTES: data or weights
    secret: list[str]  # deny-listed, or a link that leads out of the folder (e.g. to ~/.aws/credentials)


def stage_working_dir(src: Path, dest: Path, cfg: Config) -> Skipped:
    """Copy what ``src`` would ship into ``dest`` (git's view or .gitignore's, less EXCLUDE, DENY and big
    files), then write the config, URIs redacted, as ``dest/vitscale_job.yaml``. Returns what was held back."""
    listed = _git_listing(src)
    root, skipped = src.resolve(), Skipped([], [])
    for rel in listed if listed is not None else _walk_listing(src):
        path = src / rel
        if any(_excluded(part) for part in rel.split("/")) or not path.is_file():
            continue  # not a file: a deleted tracked file, a submodule, a link to a folder
        if (denied := _denied(rel)) or not path.resolve().is_relative_to(root):
            skipped.secret.append(denied or rel)
        elif path.stat().st_size > MAX_FILE_BYTES:
            skipped.too_big.append(rel)
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel)
    header = f"# resolved config shipped by `vitscale submit` ({time.strftime('%Y-%m-%d %H:%M:%S')})\n"
    (dest / JOB_CONFIG).write_text(header + yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
    return Skipped(skipped.too_big, sorted(set(skipped.secret)))


def secret_overrides(cfg: Config) -> tuple[list[str], dict[str, str]]:
    """For each config value whose URIs hold a credential (redacted in the shipped YAML): an entrypoint
    argument ``--set KEY="$VITSCALE_SECRET_i"`` and that variable's value (JSON, which ``--set`` reads
    as YAML). The job's shell expands the variable, so the entrypoint shown by the dashboard, ``jobs
    list`` and the job's log holds only its name, like the other credentials."""
    args, env = [], {}
    for key, value in leaves(cfg).items():
        if redact(value) != value:
            var = SECRET_VAR.format(len(env))
            args.append(f'--set {shlex.quote(key + "=")}"${var}"')
            env[var] = json.dumps(value)
    return args, env


def entrypoint(stage: str, overrides: Sequence[str] = ()) -> str:
    return " ".join([shlex.join(["vitscale", stage, JOB_CONFIG]), *overrides])


def _print_listing(root: Path) -> None:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in files:
        print(f"{path.stat().st_size:>12,d}  {path.relative_to(root).as_posix()}")
    total = sum(path.stat().st_size for path in files)
    print(f"{len(files)} files, {total / 2**20:.2f} MiB would be shipped (dry run: nothing was sent)")


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


def _is_loopback(address: str) -> bool:
    """Whether ``address`` names this machine (where a tunnel ends). No DNS lookup: that is a network call."""
    try:
        host = urlsplit(address).hostname or ""
        return host == "localhost" or host.endswith(".localhost") or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(address: str, env: Mapping[str, str], insecure: bool) -> None:
    """Refuse to send credentials unencrypted (``http://``) to another machine, unless ``insecure``:
    Ray puts the job's environment variables in the request body."""
    if not env or not address.startswith("http://") or _is_loopback(address):
        return
    names = ", ".join(sorted(env))
    if insecure:
        log.warning("--insecure: sending %s unencrypted to %s", names, address)
        return
    raise InputError(f"--address {address}: refusing to send credentials ({names}) unencrypted over http:// to "
                     "another machine. Use an https:// address (a TLS proxy in front of the dashboard), or a "
                     "tunnel that ends here (kubectl port-forward svc/HEAD-svc 8265:8265, or ssh -L "
                     "8265:localhost:8265 HEAD) with --address http://127.0.0.1:8265, or pass --insecure")


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
                log.info("the cluster's job agent is not up yet; retrying for up to %.0f s", AGENT_WAIT_S)
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
    """``vitscale submit CONFIG --address URL [--stage NAME] [--no-wait] [--dry-run] [--insecure]``: 0 when
    the job succeeds (or, with --no-wait, was accepted; with --dry-run, was staged), 1 when it fails or is
    stopped."""
    stage = getattr(args, "stage", "run") or "run"
    if stage not in STAGES:
        raise InputError(f"--stage {stage}: must be one of {', '.join(STAGES)}")
    dry_run = getattr(args, "dry_run", False)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address and not dry_run:
        raise InputError("no cluster address: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    address = address and normalise_address(address)
    cfg = job_config(cfg)
    overrides, secret_env = secret_overrides(cfg)
    env = {**credentials_from_env(os.environ), **secret_env}
    if address:  # before any network call: the check is about what the first request would carry
        check_transport(address, env, getattr(args, "insecure", False))
    client = None if dry_run else connect(address)
    if "://" not in cfg.workdir and not Path(cfg.workdir).is_absolute():
        log.warning("workdir %r is relative: on the cluster it lands inside the job's temporary directory; "
                    "use a shared absolute path or s3://...", cfg.workdir)
    if cfg.tracking.uri is None:
        log.warning("tracking.uri is null: MLflow writes a sqlite file into the workdir on the cluster; "
                    "set it to your MLflow server (infra/mlflow)")
    submission_id = f"vitscale-{cfg.name}-{stage}-{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="vitscale-submit-") as tmp:
        skipped = stage_working_dir(source_root(), Path(tmp), cfg)
        for rel in skipped.too_big:
            log.warning("not shipped (over %d MiB): %s", MAX_FILE_BYTES // 2**20, rel)
        for rel in skipped.secret:
            log.warning("not shipped (may hold secrets): %s", rel)
        if dry_run:
            _print_listing(Path(tmp))
            print(f"entrypoint: {entrypoint(stage, overrides)}")
            if env:
                print(f"credentials it would pass as environment variables: {', '.join(sorted(env))}")
            return 0
        runtime_env = {"working_dir": tmp, "env_vars": env}
        job_id = _via_agent(lambda: client.submit_job(
            entrypoint=entrypoint(stage, overrides), runtime_env=runtime_env, submission_id=submission_id,
            metadata={"vitscale.name": cfg.name, "vitscale.stage": stage},
        ))
    print(f"submitted {job_id}: {entrypoint(stage, overrides)} on {address}", flush=True)
    if env:
        log.info("credentials passed as environment variables: %s", ", ".join(sorted(env)))
    if args.no_wait:
        print(_hints(job_id, address))
        return 0
    try:
        status = _wait(client, job_id)
    except KeyboardInterrupt:
        log.warning("stopped watching; %s goes on running on the cluster\n%s", job_id, _hints(job_id, address))
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
