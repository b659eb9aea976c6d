"""An MLflow server killed mid-stage, with real processes (a real `mlflow server` on 127.0.0.1, real
Ray): the shard and transfer stages go on, exit 0, and their runs end FINISHED once the server is
back (restarted on the same store and port). The pretraining stage's case is in test_tracking.py."""
from __future__ import annotations

import csv
import threading
import time

import mlflow
import pytest

from pipelines.cli import main as cli
from servers import MlflowServer
from shard_inputs import ImageServer, jpeg
from test_transfer_job import _export


def _in_thread(args: list[str]) -> tuple[threading.Thread, dict]:
    out: dict = {}
    thread = threading.Thread(target=lambda: out.update(rc=cli(args)))
    thread.start()
    return thread, out


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.timeout(300)
def test_server_killed_mid_shard_stage_exits_0_and_the_run_ends_finished(ray_local, tmp_path):
    files = {f"{i}.jpg": jpeg(i) for i in range(8)}
    with ImageServer(files, hold_s=120) as images:
        with open(tmp_path / "urls.csv", "w", newline="") as f:
            rows = [(f"{images.url}/img/{i}.jpg", i % 2) for i in range(8)]
            rows[5] = (f"{images.url}/hold/5.jpg", 1)  # the stage stops here until the server is dead
            csv.writer(f).writerows([("path", "label"), *rows])
        with MlflowServer(tmp_path, str(tmp_path / "artifacts")) as server:
            thread, out = _in_thread(["shard", "--source", str(tmp_path / "urls.csv"), "--set", f"workdir={tmp_path}/wd",
                                      "--set", f"tracking.uri={server.uri}", "--set", "tracking.experiment=outage",
                                      "--set", "shard.samples_per_shard=2", "--set", "shard.max_in_flight=1",
                                      "--set", "shard.download.allow_private=true"])
            assert images.held.wait(120)
            server.kill()
            images.release()  # the remaining shards, their progress metrics and the end go to a dead server
            time.sleep(3)
            server.start()
            thread.join(180)
            assert out.get("rc") == 0
            (run,) = _runs(server.uri, "outage")
    assert run.info.status == "FINISHED" and run.info.end_time


@pytest.mark.timeout(400)
def test_server_killed_mid_transfer_exits_0_and_the_runs_end_finished(ray_local, tmp_path):
    export = _export(tmp_path / "export", "mu/8", 16)
    args = ["transfer", "local", "--set", f"workdir={tmp_path / 'work'}", "--set", f"transfer.checkpoint={export}",
            "--set", "transfer.datasets=[digits]", "--set", "transfer.img_size=16", "--set", "transfer.steps=40",
            "--set", "transfer.lrs=[0.01,0.1]", "--set", "transfer.batch=32", "--set", "transfer.shots=[1]",
            "--set", "transfer.compare_scratch=false", "--set", "pretrain.cpus_per_worker=1",
            "--set", "pretrain.precision=fp32", "--set", "pretrain.zero_stage=0",
            "--set", "tracking.experiment=outage"]
    with MlflowServer(tmp_path, str(tmp_path / "artifacts")) as server:
        thread, out = _in_thread([*args, "--set", f"tracking.uri={server.uri}"])
        deadline = time.monotonic() + 120
        while len(_runs(server.uri, "outage")) < 3:  # the stage's run and its two dev runs: the grid is going
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.2)
        server.kill()
        time.sleep(8)  # cells finish and their results, the final run and the report meet a dead server
        server.start()
        thread.join(240)
        assert out.get("rc") == 0
        runs = _runs(server.uri, "outage")
    assert (tmp_path / "work" / "transfer" / "results.json").is_file()
    stage = [r for r in runs if r.data.tags.get("vitscale.stage") == "transfer" and "mlflow.parentRunId" not in r.data.tags]
    assert len(stage) == 1 and stage[0].info.status == "FINISHED"
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
