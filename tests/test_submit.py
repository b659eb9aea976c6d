"""``vitscale submit`` and ``vitscale jobs`` against a real Ray head started here with ``ray start``.

The head runs with token authentication on (what infra/README.md recommends), so the tests also
show that a client without the right token is turned away with exit code 2.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from pipelines.config import load_config
from pipelines.submit import (JOB_CONFIG, credentials_from_env, entrypoint, job_config, secret_overrides,
                              stage_working_dir)

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: all bound at once, so the OS cannot hand out one of them twice."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def _session_pids(sid: int) -> list[int]:
    """Live processes whose session id is ``sid`` (/proc/PID/stat: state and session follow the name)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _stop_head(proc: subprocess.Popen) -> None:
    """Stop exactly the Ray processes this test started.

    ``ray stop`` would kill every Ray process on the machine, including other test sessions'
    clusters, so the head was started in a session of its own (``start_new_session``) and only that
    session's processes are killed, Ray's workers included (they have their own process groups but
    stay in the session). Nothing of this throwaway cluster needs a graceful shutdown.
    """
    for _ in range(40):
        pids = _session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.25)
    if proc.poll() is None:
        proc.wait(timeout=5)


@dataclass
class Head:
    address: str
    temp_dir: Path
    env: dict  # a client environment that holds the cluster's token


@pytest.fixture(scope="module")
def ray_head():
    token = uuid.uuid4().hex
    # Short, unique temp dir: Ray's unix socket paths must stay under ~107 characters, and its own
    # ray_current_cluster file lands here, so no other session's ray.init() finds this head.
    temp_dir = Path(tempfile.mkdtemp(prefix="vs", dir="/tmp"))
    dash, gcs, client, agent, agent_grpc, runtime_env, metrics = _free_ports(7)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
               RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu")
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "2",
           "--temp-dir", str(temp_dir), "--port", str(gcs),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
           "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
           "--metrics-export-port", str(metrics)]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and asking for the token
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"ray head did not come up:\n{(temp_dir / 'head.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield Head(address, temp_dir, env)
    finally:
        _stop_head(proc)
        log.close()
        import shutil

        shutil.rmtree(temp_dir, ignore_errors=True)


def _head_logs(head: Head) -> str:
    """The ends of the head's job-agent and job-head logs, for a failure message."""
    logs = head.temp_dir / "session_latest" / "logs"
    return "".join(f"\n--- {name}:\n{(logs / name).read_text(errors='replace')[-1500:]}"
                   for name in ("dashboard_agent.log", "dashboard_JobHead.log") if (logs / name).is_file())


def _vitscale(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "vitscale"), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


_SESSION = """
import contextlib, io, json, sys
from pipelines import cli
out, job = [], None
for step in json.loads(sys.argv[1]):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        if isinstance(step, str):
            exec(step)
            rc = 0
        else:
            rc = cli.main([a.replace("{job}", job or "") for a in step])
    if isinstance(step, str):
        job = buf.getvalue().split()[-1]
    out.append((rc, buf.getvalue()))
print("@@" + json.dumps(out))
"""


def _cli_session(steps: list, env: dict, head: Head) -> list[tuple[int, str]]:
    """Run ``vitscale`` argument lists (or Python snippets) one after another in ONE fresh process,
    whose environment holds the token from the start; each gives (exit code, output). One process
    instead of one per command: each start imports Ray again, seconds on a busy 2-core machine."""
    res = subprocess.run([sys.executable, "-c", _SESSION, json.dumps(steps)], env=env, capture_output=True,
                         text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:] + _head_logs(head)
    result = next(line for line in res.stdout.splitlines() if line.startswith("@@"))
    return [tuple(step) for step in json.loads(result[2:])]


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = __import__("random").Random(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            color = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (48, 40), color).save(root / label / f"{i}.jpg", quality=90)
    return root


def _config(tmp_path: Path) -> Path:
    data = {
        "name": "subtest",
        "workdir": str(tmp_path / "work"),
        # 8 images in one shard: one Ray task, one worker process to start
        "shard": {"source": str(_image_folder(tmp_path / "images")), "samples_per_shard": 8, "image_size": 32},
        "model": {"variant": "mu/4", "img_size": 32},
        "transfer": {"img_size": 32, "datasets": ["digits"]},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_submit_shard_job_then_status_logs_list(ray_head, tmp_path):
    cfg_path = _config(tmp_path)
    secret = f"pw-{uuid.uuid4().hex}"
    env = dict(ray_head.env, MLFLOW_TRACKING_PASSWORD=secret, AWS_ACCESS_KEY_ID="AKIDTEST")
    # No --address: $RAY_ADDRESS, the Ray convention, names the head.
    res = _vitscale(["submit", str(cfg_path), "--stage", "shard"], dict(env, RAY_ADDRESS=ray_head.address))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:] + _head_logs(ray_head)
    job_id = next(w for w in res.stdout.split() if w.startswith("vitscale-subtest-shard-")).rstrip(":")
    assert f"job {job_id}: SUCCEEDED" in res.stdout

    # The stage ran on the cluster and wrote its shards where the config said.
    manifest = json.loads((tmp_path / "work" / "shards" / "manifest.json").read_text())
    assert sum(s["samples"] for s in manifest["shards"]) == 8

    # What was uploaded: the checkout without .venv/.git/runs, plus the resolved config.
    shipped = list(ray_head.temp_dir.glob(f"session_latest/runtime_resources/working_dir_files/*/{JOB_CONFIG}"))
    assert len(shipped) == 1
    updir = shipped[0].parent
    assert (updir / "pipelines" / "submit.py").is_file()
    assert not any((updir / d).exists() for d in (".venv", ".git", "runs"))
    assert secret not in shipped[0].read_text()
    assert load_config(shipped[0]) == job_config(load_config(cfg_path))

    status, logs, followed, listing = _cli_session([
        ["jobs", "status", job_id, "--address", ray_head.address],
        ["jobs", "logs", job_id, "--address", ray_head.address],
        ["jobs", "logs", job_id, "--follow", "--address", ray_head.address],
        ["jobs", "list", "--address", ray_head.address],
    ], env, ray_head)
    assert all(rc == 0 for rc, _ in (status, logs, followed, listing)), (status, logs, followed, listing)
    assert "status:     SUCCEEDED" in status[1]
    assert "MLFLOW_TRACKING_PASSWORD" in status[1] and "AWS_ACCESS_KEY_ID" in status[1]
    assert secret not in status[1]
    assert f"vitscale shard {JOB_CONFIG}" in logs[1]  # Ray's "Running entrypoint ..." line
    assert f"vitscale shard {JOB_CONFIG}" in followed[1]
    assert job_id in listing[1]


def test_no_wait_then_stop(ray_head):
    """A job that would run for minutes (``sleep``, sent through the real client) stops on request."""
    env = dict(ray_head.env, RAY_ADDRESS=ray_head.address)  # jobs takes $RAY_ADDRESS without --address
    (submitted, job_id), stop, status = _cli_session([
        # _via_agent: a head this young may not have its job agent yet (Ray: "try again later")
        "import os, ray.job_submission as j; from pipelines.submit import _via_agent; "
        "print(_via_agent(lambda: j.JobSubmissionClient(os.environ['RAY_ADDRESS']).submit_job(entrypoint='sleep 300')))",
        ["jobs", "stop", "{job}"],  # waits until the job has ended
        ["jobs", "status", "{job}"],
    ], env, ray_head)
    assert submitted == 0 and stop[0] == 0 and status[0] == 0, (job_id, stop, status)
    assert f"{job_id.strip()}: STOPPED" in stop[1]
    assert "status:     STOPPED" in status[1]


def test_wrong_token_exits_2(ray_head):
    env = dict(ray_head.env, RAY_AUTH_TOKEN="not-the-token")
    res = _vitscale(["jobs", "list", "--address", ray_head.address], env, timeout=60)
    assert res.returncode == 2
    assert "token" in res.stderr and ray_head.address in res.stderr


def test_unreachable_address_exits_2(tmp_path, capsys):
    cfg_path = _config(tmp_path)
    address = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    assert cli.main(["submit", str(cfg_path), "--address", address]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray dashboard" in err and address in err
    assert cli.main(["submit", str(cfg_path), "--address", "ray://127.0.0.1:10001"]) == 2
    assert "dashboard address" in capsys.readouterr().err


def test_silent_address_exits_2_after_the_timeout(monkeypatch, capsys):
    """A server that takes the connection and never answers (a dropped route, a hung head) must not
    hang the command: the reachability check gives up after CONNECT_TIMEOUT_S."""
    monkeypatch.setattr("pipelines.submit.CONNECT_TIMEOUT_S", 1.0)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes handshakes; nobody ever reads or answers
        address = f"http://127.0.0.1:{silent.getsockname()[1]}"
        assert cli.main(["jobs", "list", "--address", address]) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Ray dashboard" in err and address in err and "Timeout" in err


def test_jobs_without_address_exits_2(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cli.main(["jobs", "list"]) == 2
    assert "RAY_ADDRESS" in capsys.readouterr().err
    assert cli.main(["jobs", "status", "--address", "http://127.0.0.1:1"]) == 2  # no job id
    assert "give a job id" in capsys.readouterr().err


def test_staged_dir_and_credentials(tmp_path):
    src = tmp_path / "src"
    for rel, size in [("pkg/a.py", 10), (".venv/bin/python", 10), ("runs/x/y.txt", 10), (".git/HEAD", 10),
                      ("pkg/__pycache__/a.pyc", 10), ("data/big.bin", 9 * 2**20), ("README.md", 10)]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"x" * size)
    dest = tmp_path / "dest"
    dest.mkdir()
    cfg = load_config(None, ["workdir=/shared/w"])
    skipped = stage_working_dir(src, dest, job_config(cfg))
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == sorted(["README.md", JOB_CONFIG, "pkg/a.py"])
    assert skipped.too_big == ["data/big.bin"] and skipped.secret == []
    shipped = load_config(dest / JOB_CONFIG)
    assert shipped.ray.address == "auto" and shipped.workdir == "/shared/w"

    env = {"AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "u", "MLFLOW_TRACKING_TOKEN": "t",
           "MLFLOW_TRACKING_URI": "http://x", "HOME": "/root", "AWS_SESSION_TOKEN": "",
           "AWS_CA_BUNDLE": "/etc/ssl/cert.pem", "AWS_PROFILE": "dev"}
    assert credentials_from_env(env) == {"AWS_SECRET_ACCESS_KEY": "s", "AWS_ENDPOINT_URL": "u",
                                         "MLFLOW_TRACKING_TOKEN": "t"}


# --------------------------------------------------------------------------- what ships, and credentials

SECRETS = [".env", ".env.local", ".netrc", "id_rsa", "key.pem", "x.key", "runs.db", "mlruns/0/meta.yaml",
           "conf/.env", "deploy/id_ed25519"]


def _folder(root: Path, files: list[str]) -> Path:
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"content of {rel}\n")
    return root


def _dry_run(monkeypatch, capsys, src: Path, tmp_path: Path) -> tuple[set[str], str]:
    """``vitscale submit --dry-run`` from ``src``: (the paths it lists, its stderr)."""
    monkeypatch.setattr("pipelines.submit.source_root", lambda: src)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = tmp_path / "dry.yaml"
    cfg.write_text(yaml.safe_dump({"name": "dry", "workdir": "/shared/dry"}))
    assert cli.main(["submit", str(cfg), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    listing = [line.split() for line in out.splitlines() if line[:12].strip().replace(",", "").isdigit()]
    assert "would be shipped (dry run: nothing was sent)" in out
    return {parts[1] for parts in listing}, err


def test_dry_run_outside_git_applies_gitignore_and_the_deny_list(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "proj", ["pkg/a.py", "README.md", "data/raw.bin", "notes.log", "keep.log",
                                      "pkg/sub/.gitignore", "pkg/sub/b.py", "pkg/sub/gen.py", *SECRETS])
    (src / ".gitignore").write_text("# data stays local\n/data/\n*.log\n!keep.log\n")
    (src / "pkg/sub/.gitignore").write_text("gen.py\n")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # never the repo of a folder above
    shipped, err = _dry_run(monkeypatch, capsys, src, tmp_path)
    assert shipped == {".gitignore", "README.md", "keep.log", "pkg/a.py", "pkg/sub/.gitignore", "pkg/sub/b.py",
                       JOB_CONFIG}
    for rel in [".env", ".env.local", ".netrc", "id_rsa", "key.pem", "x.key", "runs.db", "conf/.env",
                "deploy/id_ed25519"]:
        assert f"not shipped (may hold secrets): {rel}\n" in err


def test_dry_run_in_a_git_checkout_ships_what_git_would_commit_less_secrets(tmp_path, monkeypatch, capsys):
    src = _folder(tmp_path / "repo", ["pkg/a.py", "pkg/new.py", "scratch/big.txt", *SECRETS])
    (src / ".gitignore").write_text("scratch/\n.netrc\n")
    git = ["git", "-C", str(src)]
    subprocess.run([*git, "init", "-q"], check=True)
    # Tracked on purpose (a tracked .env is still a secret); pkg/new.py stays untracked, not ignored.
    subprocess.run([*git, "add", "-f", "pkg/a.py", ".gitignore", ".env", "id_rsa", "key.pem", "runs.db",
                    "mlruns/0/meta.yaml"], check=True)
    (src / "link").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("aws_secret_access_key = x\n")
    shipped, err = _dry_run(monkeypatch, capsys, src, tmp_path)
    assert shipped == {".gitignore", "pkg/a.py", "pkg/new.py", JOB_CONFIG}
    assert not any(name in line for line in shipped for name in ("scratch", ".netrc"))
    assert "not shipped (may hold secrets): link\n" in err  # it leads out of the checkout
    assert "not shipped (may hold secrets): .env\n" in err and "not shipped (may hold secrets): id_rsa\n" in err


def test_staged_files_are_the_listed_ones(tmp_path, monkeypatch):
    """What --dry-run lists is what the real submit stages: both come from stage_working_dir."""
    src = _folder(tmp_path / "proj", ["pkg/a.py", *SECRETS])
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    dest = tmp_path / "dest"
    dest.mkdir()
    skipped = stage_working_dir(src, dest, load_config(None, ["workdir=/shared/w"]))
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == ["pkg/a.py", JOB_CONFIG]
    assert skipped.secret == [".env", ".env.local", ".netrc", "conf/.env", "deploy/id_ed25519", "id_rsa",
                              "key.pem", "runs.db", "x.key"]  # mlruns is EXCLUDEd: an output, not reported


def test_uri_credentials_leave_the_job_yaml_and_come_back_through_the_environment(tmp_path):
    password, signature = f"pw-{uuid.uuid4().hex}", "X-Amz-Signature=abc123"
    source = f"https://bucket.s3.amazonaws.com/i.csv?X-Amz-Credential=AK%2F1&{signature}"
    cfg = job_config(load_config(None, ["workdir=/shared/w", f"tracking.uri=http://u:{password}@mlflow:5000",
                                        f"shard.source={source}"]))
    dest = tmp_path / "dest"
    dest.mkdir()
    stage_working_dir(tmp_path / "empty", dest, cfg)
    text = (dest / JOB_CONFIG).read_text()
    assert password not in text and signature not in text

    overrides, env = secret_overrides(cfg)
    command = entrypoint("shard", overrides)
    assert password not in command and signature not in command and sorted(env) == ["VITSCALE_SECRET_0",
                                                                                    "VITSCALE_SECRET_1"]
    # The job's shell expands the variables; `vitscale shard` then reads exactly the submitted config.
    echo = f"{shlex.quote(sys.executable)} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
    res = subprocess.run(command.replace("vitscale", echo, 1), shell=True, env=env, cwd=dest, capture_output=True,
                         text=True, check=True)
    args = cli.build_parser().parse_args(json.loads(res.stdout))
    assert args.command == "shard" and load_config(dest / args.config, args.overrides) == cfg


@pytest.fixture
def network_calls(monkeypatch):
    """The addresses the reachability check (the first network call of submit) was asked for; each fails."""
    import requests

    calls = []

    def get(url, **kwargs):
        calls.append(url)
        raise requests.ConnectionError("no network in this test")

    monkeypatch.setattr(requests, "get", get)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


@pytest.mark.parametrize("address", ["http://10.1.2.3:8265", "HEAD:8265"])
def test_plain_http_to_another_machine_with_credentials_exits_2_before_any_network_call(
        tmp_path, monkeypatch, capsys, network_calls, address):
    cfg_path = _config(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    assert cli.main(["submit", str(cfg_path), "--address", address]) == 2
    err = capsys.readouterr().err
    assert "unencrypted" in err and "AWS_SECRET_ACCESS_KEY" in err and "secret\n" not in err
    assert "https://" in err and "tunnel" in err and "--insecure" in err
    assert cli.main(["submit", str(cfg_path), "--address", address, "--dry-run"]) == 2  # what submit would do
    assert network_calls == []

    assert cli.main(["submit", str(cfg_path), "--address", address, "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "warning: --insecure" in err and "cannot reach the Ray dashboard" in err  # past the check
    assert len(network_calls) == 1


@pytest.mark.parametrize("address", ["http://127.0.0.1:8265", "http://localhost:8265", "http://[::1]:8265",
                                     "https://10.1.2.3:8265"])
def test_loopback_or_https_with_credentials_is_allowed(tmp_path, monkeypatch, capsys, network_calls, address):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    assert cli.main(["submit", str(_config(tmp_path)), "--address", address]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
    assert network_calls == [f"{address}/api/version"]


def test_plain_http_without_credentials_is_allowed(tmp_path, monkeypatch, capsys, network_calls):
    for name in [k for k in os.environ if credentials_from_env({k: os.environ[k]})]:
        monkeypatch.delenv(name)
    assert cli.main(["submit", str(_config(tmp_path)), "--address", "http://10.1.2.3:8265"]) == 2
    assert "cannot reach the Ray dashboard" in capsys.readouterr().err
    assert len(network_calls) == 1
