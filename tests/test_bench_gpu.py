"""infra/bench-gpu.sh, the one-lease GPU check, run whole on the CPU (``--dry-run-cpu``): its offline
wheel install, every default step (DeepSpeed ZeRO-1 with compiled blocks, plain PyTorch, the loader) on
a debug-size model, the time limits and the summary table. Figures are not asserted."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "bench-gpu.sh"


def _wheel(folder: Path, name: str = "vitscale_probe", version: str = "1.0") -> Path:
    """A real pure-Python wheel, for the script's ``pip install --no-index`` to install offline."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"VALUE = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    digest = lambda data: base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()  # noqa: E731
    record = [f"{path},sha256={digest(data)},{len(data)}" for path, data in files.items()] + [f"{info}/RECORD,,"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, data in files.items():
            z.writestr(member, data)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, LOGS=str(tmp_path / "logs"), WHEELS=str(tmp_path / "wheels"),
               SITE=str(tmp_path / "site"))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)


def test_dry_run_on_the_cpu_installs_the_wheels_runs_every_step_and_sums_up(tmp_path):
    _wheel(tmp_path / "wheels")
    run = _run(tmp_path, "--dry-run-cpu")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert (tmp_path / "site" / "vitscale_probe" / "__init__.py").exists()  # installed with --no-index

    summary = run.stdout[run.stdout.index("=== summary"):].splitlines()
    rows = {line.split()[0]: line for line in summary[2:] if line and not line.startswith((" ", "logs:"))}
    assert list(rows) == ["wheels", "ds-b16", "ds-l16", "torch", "loader"]
    assert rows["wheels"].split()[1:4] == ["ok", "(1", "wheels)"]
    assert all(rows[s].split()[1] == "ok" for s in ("ds-b16", "ds-l16", "torch", "loader"))
    assert "mu/4@16 compiled blocks" in rows["ds-b16"] and "mu/4@16 compiled blocks" in rows["torch"]
    assert sum(line.startswith(" ") and "compiled blocks" in line for line in summary) == 1  # torch's second case

    logs = tmp_path / "logs"
    (ds,) = json.loads((logs / "ds-l16.json").read_text())
    assert ds["engine"] == "deepspeed zero-1" and ds["batch"] == 4 and ds["img_per_s"] > 0
    assert [r["engine"] for r in json.loads((logs / "torch.json").read_text())] == ["torch", "torch"]
    assert all(rate > 0 for rate in json.loads((logs / "loader.json").read_text())["images_per_s_per_core"].values())


def test_bad_arguments_exit_2(tmp_path):
    run = _run(tmp_path, "--fast")
    assert run.returncode == 2 and "--fast" in run.stderr
    run = _run(tmp_path, "--dry-run-cpu", "ds-h14")
    assert run.returncode == 2 and "no step ds-h14" in run.stderr
