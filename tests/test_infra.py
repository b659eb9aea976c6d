"""infra/ files parse and agree with the code: the commands, presets, config keys and DeepSpeed keys
they name are the ones vitscale has, and the Ray / MLflow ports stay private."""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.cli import build_parser
from pipelines.config import list_presets, load_config, replace

INFRA = Path(__file__).resolve().parent.parent / "infra"
MLFLOW_URI = "http://mlflow.vitscale.svc.cluster.local:5000"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _by_kind(path: Path) -> dict[str, dict]:
    return {d["kind"]: d for d in _docs(path)}


def _commands() -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return set(sub.choices)


def _ray_groups(cluster_spec: dict) -> list[dict]:
    return [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _check_fabric(group: dict) -> None:
    """A GPU group reaches the other nodes over RDMA (EFA or InfiniBand), with the image that can."""
    c = _container(group)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    fabric = [k for k in limits if k == "vpc.amazonaws.com/efa" or k.startswith("rdma/")]
    assert fabric and all(requests[k] == limits[k] for k in fabric)
    assert c["image"].endswith("-efa") == (fabric == ["vpc.amazonaws.com/efa"])  # libfabric + OFI plugin
    assert "IPC_LOCK" in c["securityContext"]["capabilities"]["add"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["NCCL_SOCKET_IFNAME"] == "eth0" and env["NCCL_DEBUG"] in ("WARN", "INFO")


def _check_ray_cluster_spec(spec: dict, dashboard_host: str) -> None:
    assert spec["rayVersion"] == __import__("ray").__version__
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP"
    assert head["rayStartParams"]["dashboard-host"] == dashboard_host
    gpu_groups = [g for g in spec["workerGroupSpecs"] if "nvidia.com/gpu" in _container(g)["resources"]["limits"]]
    assert gpu_groups, "no GPU worker group"
    for group in gpu_groups:
        _check_fabric(group)
    for group in _ray_groups(spec):
        c = _container(group)
        env = {e["name"]: e for e in c["env"]}
        assert env["MLFLOW_TRACKING_URI"]["value"] == MLFLOW_URI
        for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert "secretKeyRef" in env[key]["valueFrom"]  # credentials from a Secret, never inline
        mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
        claims = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                  for v in group["template"]["spec"]["volumes"]}
        assert claims["workdir"] == "vitscale-workdir" and mounts["workdir"] == "/workdir"
        assert group["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "vitscale"


def test_raycluster_is_private_and_names_what_vitscale_needs():
    kinds = _by_kind(INFRA / "kuberay" / "raycluster.yaml")
    assert kinds["RayCluster"]["apiVersion"] == "ray.io/v1"
    _check_ray_cluster_spec(kinds["RayCluster"]["spec"], dashboard_host="127.0.0.1")
    pvc = kinds["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "vitscale-workdir" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/part-of": "vitscale"}
    assert all("ipBlock" not in src for rule in policy["ingress"] for src in rule["from"])


def test_rayjob_runs_vitscale_on_a_config_that_loads(tmp_path):
    kinds = _by_kind(INFRA / "kuberay" / "rayjob.yaml")
    job = kinds["RayJob"]["spec"]
    _check_ray_cluster_spec(job["rayClusterSpec"], dashboard_host="0.0.0.0")

    argv = shlex.split(job["entrypoint"])
    assert argv[0] == "vitscale" and argv[1] in _commands()
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in _container({"template": {"spec": head}})["volumeMounts"]}
    config_map = next(v["configMap"]["name"] for v in head["volumes"] if v["name"] == "config")
    assert config_map == kinds["ConfigMap"]["metadata"]["name"]
    key = Path(argv[2]).name
    assert argv[2] == f"{mounts['config']}/{key}"

    path = tmp_path / key
    path.write_text(kinds["ConfigMap"]["data"][key])
    overrides = [a.replace("$MLFLOW_TRACKING_URI", MLFLOW_URI) for a in argv[4::2]]
    assert argv[3::2] == ["--set"] * len(overrides)
    cfg = load_config(path, overrides)  # unknown or ill-typed keys would raise here
    assert cfg.tracking.uri == MLFLOW_URI
    assert cfg.workdir.startswith(mounts["workdir"] + "/")
    workers = job["rayClusterSpec"]["workerGroupSpecs"][0]
    gpus = int(_container(workers)["resources"]["limits"]["nvidia.com/gpu"]) * workers["replicas"]
    assert cfg.pretrain.workers == gpus and cfg.pretrain.use_gpu and cfg.ray.address == "auto"


def test_cluster_launcher_keeps_the_dashboard_local_and_uses_a_token():
    cfg = yaml.safe_load((INFRA / "launcher" / "aws-gpu.yaml").read_text())
    head_cmd = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_cmd and "RAY_AUTH_MODE=token ray start --head" in head_cmd
    assert all("RAY_AUTH_MODE=token ray start" in c for c in cfg["worker_start_ray_commands"] if "ray start" in c)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    gpu_types = [t for t in cfg["available_node_types"].values() if t.get("max_workers", 0) > 0]
    assert gpu_types and cfg["head_node_type"] in cfg["available_node_types"]
    # EFA on the GPU nodes only: the devices and pinned memory in their containers, the image with the
    # OFI plugin, the interfaces from a launch template, one placement group
    docker = cfg["docker"]
    assert "--device=/dev/infiniband" in docker["worker_run_options"]
    assert "--ulimit memlock=-1:-1" in docker["worker_run_options"]
    assert not any("infiniband" in o for o in docker["run_options"])  # the CPU head has no EFA device
    assert docker["worker_image"].endswith("-efa") and any("NCCL_SOCKET_IFNAME" in o for o in docker["run_options"])
    for t in gpu_types:
        assert t["node_config"]["LaunchTemplate"]["LaunchTemplateName"] and t["node_config"]["Placement"]["GroupName"]


def test_slurm_script_is_valid_bash_and_runs_vitscale():
    script = INFRA / "slurm" / "vitscale.sbatch"
    bash = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert bash.returncode == 0, bash.stderr
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", "-S", "warning", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout
    text = script.read_text().replace("\\\n", " ")  # join continued lines
    assert "ray start --head" in text and "--dashboard-host=127.0.0.1" in text
    assert "export RAY_AUTH_MODE=token" in text
    # NCCL's network is chosen before the first `ray start`, so every worker inherits it
    fabric = text.index('fabric="${VITSCALE_FABRIC:-auto}"')
    assert fabric < text.index("ray start --head")
    for setting in ("export NCCL_SOCKET_IFNAME=", "export NCCL_DEBUG=", "export FI_PROVIDER=efa", "/opt/amazon/ofi-nccl/lib",
                    "export NCCL_IB_DISABLE=1"):
        assert fabric < text.index(setting) < text.index("ray start --head"), setting
    run = re.search(r"^vitscale (\w+) \"\$config\"(.*)$", text, re.M)
    assert run and run.group(1) in _commands()
    # the --set overrides it adds are config keys (replace() re-validates and rejects unknown keys)
    sets = re.findall(r'--set "?([\w.]+)=', run.group(2))
    values = {"ray.address": "auto", "pretrain.workers": 8, "pretrain.use_gpu": True}
    assert sets and set(sets) <= set(values), sets
    usage = re.search(r"sbatch --nodes=\d+ infra/slurm/vitscale.sbatch (\w+)", text)
    assert usage.group(1) in list_presets()
    replace(load_config(usage.group(1)), **{k: values[k] for k in sets})


def test_mlflow_deployments_use_postgres_s3_and_basic_auth():
    start = INFRA / "mlflow" / "start.sh"
    assert subprocess.run(["bash", "-n", str(start)]).returncode == 0
    text = start.read_text()
    assert "--app-name basic-auth" in text and "--artifacts-destination" in text and "--serve-artifacts" in text
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"]
    env = compose["mlflow"]["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    for service in compose.values():  # published ports only on loopback
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", []))
    secrets = ["POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"]
    raw = (INFRA / "mlflow" / "docker-compose.yaml").read_text()
    assert all(f"${{{s}:?" in raw for s in secrets)  # from .env, refused when missing

    kinds = {}
    for d in _docs(INFRA / "mlflow" / "k8s.yaml"):
        kinds.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in kinds["Service"]}
    svc = services["mlflow"]
    assert svc["spec"]["type"] == "ClusterIP"
    port = svc["spec"]["ports"][0]["port"]
    assert MLFLOW_URI == f"http://{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc.cluster.local:{port}"
    deploy = kinds["Deployment"][0]["spec"]["template"]["spec"]["containers"][0]
    assert deploy["envFrom"][0]["secretRef"]["name"] == "mlflow-server"


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", (INFRA / "Dockerfile").read_text(), re.M))


def test_dockerfile_installs_vitscale_with_a_cuda_12_and_an_efa_variant():
    text = (INFRA / "Dockerfile").read_text()
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?$", text, re.M)
    assert [name for _, name in stages] == ["base", "efa", "plain"]  # a plain `docker build` is the last
    assert stages[1][0] == stages[2][0] == "base"
    assert "COPY pretrain" in text and "COPY pipelines" in text and "pip install --no-cache-dir ." in text
    assert "vitscale --help" in text  # the build fails if the command is missing
    assert "libibverbs1" in text and "ibverbs-providers" in text  # NCCL's InfiniBand transport
    efa = text[text.index("FROM base AS efa"):text.index("FROM base AS plain")]
    assert "efa_installer.sh -y --skip-kmod --skip-limit-conf --no-verify" in efa
    assert "/opt/amazon/ofi-nccl/lib" in efa and "FI_PROVIDER=efa" in efa
    assert '${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}' in text and _dockerfile_args()["TORCH_INDEX_URL"] == ""


def _requirements() -> dict:
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement

    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    return {Requirement(r).name: Requirement(r) for r in reqs}


def _ray_versions() -> dict[str, str]:
    """rayVersion wherever an infra YAML names one, and the Dockerfile's RAY_VERSION."""
    found = {}

    def walk(node, where):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "rayVersion":
                    found[where] = str(value)
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path in sorted(INFRA.rglob("*.yaml")):
        for doc in _docs(path):
            walk(doc, path.relative_to(INFRA).as_posix())
    found["Dockerfile RAY_VERSION"] = _dockerfile_args()["RAY_VERSION"]
    return found


def test_one_version_story():
    """pyproject.toml pins what infra/ deploys: Ray's minor is the rayVersion of every KubeRay YAML and
    the image's Ray; torch and torchvision are the Makefile's and the image's; every dependency that
    has broken its API before has an upper bound."""
    from packaging.version import Version

    reqs = _requirements()
    versions = _ray_versions()
    assert {"kuberay/raycluster.yaml", "kuberay/rayjob.yaml"} <= set(versions), versions
    assert len(set(versions.values())) == 1, versions
    ray = Version(versions["Dockerfile RAY_VERSION"])
    spec = reqs["ray"].specifier
    assert ray in spec, (str(spec), versions)
    assert Version(f"{ray.major}.{ray.minor}.99") in spec  # any patch of the deployed minor ...
    assert Version(f"{ray.major}.{ray.minor + 1}.0") not in spec  # ... and no other minor
    assert ray.minor == 0 or Version(f"{ray.major}.{ray.minor - 1}.99") not in spec

    make = dict(re.findall(r"(torch|torchvision)==([\d.]+)", (INFRA.parent / "Makefile").read_text()))
    args = _dockerfile_args()
    for name, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        assert args[arg] == make[name] and Version(args[arg]) in reqs[name].specifier, name
    for name in ("torch", "torchvision", "deepspeed", "ray", "mlflow", "webdataset", "timm", "moto"):
        assert any(s.operator in ("<", "<=", "==", "~=") for s in reqs[name].specifier), f"{name} has no upper bound"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_examples_are_what_the_engine_builds(stage):
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from pretrain.ds_config import deepspeed_config

    example = json.loads((INFRA / "deepspeed" / f"zero{stage}.json").read_text())
    assert example["zero_optimization"]["stage"] == stage
    DeepSpeedZeroConfig(**example["zero_optimization"])  # rejects misspelled ZeRO keys
    preset, world = ("vit_h14_jft", 512) if stage == 3 else ("vit_l16_jft", 256)
    cfg = replace(load_config(preset), **{"pretrain.zero_stage": stage,
                                          "pretrain.deepspeed": {"zero_optimization": example["zero_optimization"]}})
    built = deepspeed_config(cfg.pretrain, world)
    assert set(example) <= set(built), set(example) - set(built)
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "zero_optimization"):
        assert example[key] == built[key], key
    assert example["optimizer"]["type"] == built["optimizer"]["type"]
    # DeepSpeed's own parser accepts the whole file (batch re-expressed for the one process here)
    one_rank = dict(example, train_batch_size=example["train_micro_batch_size_per_gpu"]
                    * example["gradient_accumulation_steps"])
    parsed = DeepSpeedConfig(one_rank)
    assert parsed.zero_optimization_stage == stage and parsed.bfloat16_config.enabled


def test_readme_covers_every_infra_file_and_token_auth():
    readme = (INFRA / "README.md").read_text()
    files = [p.relative_to(INFRA).as_posix() for p in INFRA.rglob("*")
             if p.is_file() and p.name not in ("README.md", ".gitignore", ".env")]
    missing = [f for f in files if f"({f})" not in readme]
    assert not missing, f"infra/README.md does not link {missing}"
    assert "RAY_AUTH_MODE=token" in readme and "RAY_AUTH_TOKEN" in readme and "127.0.0.1" in readme
