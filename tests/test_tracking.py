"""MLflow from training: a real ``mlflow server`` on 127.0.0.1 gets exactly one run with params, the
config artifact and rank 0's metrics; killing it mid-run does not stop training. The run is ZeRO-3
with few-shot evaluation on real digits, beside a ``torchrun`` twin that must give the same curve."""
from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pipelines.config import flatten, replace
from pipelines.tracking import stage_run
from pipelines.train_job import run_pretrain
from pretrain.tracking import Tracker
from servers import MlflowServer, free_port
from test_train_job import check_trained, logged, run_twins, train_config, write_shards

STEPS = 12


@pytest.mark.timeout(500)
def test_one_run_gets_params_artifact_metrics_and_a_dead_server_does_not_stop_training(ray_local, tmp_path):
    """The stage's run as `vitscale pretrain` makes it; the server is killed mid-run and started again on
    the same store and port: training goes to the end and the run ends FINISHED."""
    import mlflow

    server = MlflowServer(tmp_path, str(tmp_path / "server-artifacts")).start()
    uri = server.uri
    shards = write_shards(tmp_path / "shards")
    fewshot = {"steps": STEPS, "fewshot": {"datasets": ["digits"], "shots": [1, 5], "every": STEPS // 2}}
    cfg_ray = replace(train_config(tmp_path / "ray", shards, stage=3, **fewshot),
                      **{"tracking.uri": uri, "tracking.experiment": "server-test"})
    cfg_torchrun = train_config(tmp_path / "torchrun", shards, stage=3, **fewshot)
    client = mlflow.MlflowClient(uri)
    seen: dict = {}

    def stage(cfg, out: dict) -> None:
        with stage_run(cfg, "pretrain") as run_id:
            out["run_id"] = run_id
            out.update(_call(run_pretrain, cfg, run_id))

    def train_and_kill_the_server(cfg):
        out: dict = {}
        worker = threading.Thread(target=stage, args=(cfg, out))
        worker.start()
        while worker.is_alive():
            losses = client.get_metric_history(out["run_id"], "loss") if "run_id" in out else []
            if losses:  # metrics flow: look at the run, then pull the plug
                exp = client.get_experiment_by_name("server-test").experiment_id
                seen["runs"] = client.search_runs([exp])
                seen["artifacts"] = [f.path for f in client.list_artifacts(out["run_id"])]
                seen["losses"] = len(losses)
                server.kill()
                server.start()  # back, while training goes on without it
                break
            time.sleep(0.2)
        worker.join()
        if "error" in out:
            raise out["error"]
        return {**out["result"], "run_id": out["run_id"]}

    try:
        result = run_twins(cfg_ray, cfg_torchrun, train_and_kill_the_server, tmp_path / "torchrun.log")
        final = client.get_run(result["run_id"])
    finally:
        server.kill()

    assert "runs" in seen, "training ended before its first metric reached the server"
    assert [r.info.run_id for r in seen["runs"]] == [result["run_id"]]  # one run per job, not one per rank
    params = seen["runs"][0].data.params
    assert params["pretrain.zero_stage"] == "3" and len(params) == len(flatten(cfg_ray))
    assert "config.resolved.yaml" in seen["artifacts"]
    assert 1 <= seen["losses"] < STEPS  # killed mid-run ...
    check_trained(cfg_ray, cfg_torchrun, result)  # ... and training went on to the end
    assert final.info.status == "FINISHED" and final.info.end_time  # ended once the server was back
    keys = ("step", "fewshot_digits_1shot", "fewshot_digits_5shot")
    shots, twin = ([tuple(r[k] for k in keys) for r in logged(c.workdir) if keys[-1] in r] for c in (cfg_ray, cfg_torchrun))
    assert [s[0] for s in shots] == [STEPS // 2, STEPS]
    assert all(0.0 <= acc <= 1.0 for s in shots for acc in s[1:])
    assert shots == twin


def _call(fn, *args) -> dict:
    try:
        return {"result": fn(*args)}
    except Exception as e:  # noqa: BLE001 - handed back to the test thread
        return {"error": e}


def test_unreachable_server_warns_and_never_blocks(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "0" * 32, rank=0, retry_s=1.0)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        for step in range(50):
            tracker.log_metrics({"loss": 1.0 / (step + 1)}, step)  # queued: returns at once
        tracker.log_params({"a": 1})
        tracker.close()
    assert tracker.dropped >= 1
    assert "MLflow tracking unreachable" in caplog.text
    # Only rank 0 with a run logs; elsewhere every call is a no-op without a thread.
    for quiet in (Tracker("http://127.0.0.1:1", "x", rank=1), Tracker(None, None, rank=0)):
        quiet.log_metrics({"loss": 1.0}, 0)
        quiet.close()
        assert not quiet.enabled and quiet.dropped == 0


def test_a_new_workdirs_sqlite_store_is_a_copy_of_mlflows_own_empty_store(tmp_path, monkeypatch):
    """Made once per MLflow version in the cache, then copied: MLflow opens the copy as its own store
    (no migrations), a run goes in, and an existing store is never replaced."""
    import mlflow

    from pipelines.config import load_config
    from pipelines.tracking import client_for, experiment_id

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    template = tmp_path / "cache" / "vitscale" / f"mlflow-{mlflow.__version__}-empty.db"
    runs = {}
    for name in ("a", "b"):
        cfg = load_config(None, [f"workdir={tmp_path / name}"])
        client = client_for(cfg)
        if name == "a":
            made = template.stat().st_mtime_ns
        assert template.stat().st_mtime_ns == made  # b copied the one a made
        assert (tmp_path / name / "mlflow.db").read_bytes() == template.read_bytes()  # nothing written yet
        run = client.create_run(experiment_id(client, cfg.tracking, cfg.workdir))
        client.log_metric(run.info.run_id, "x", 1.0)
        runs[name] = run.info.run_id
    again = client_for(load_config(None, [f"workdir={tmp_path / 'a'}"]))  # an existing store stays
    assert again.get_metric_history(runs["a"], "x")[0].value == 1.0
    assert (tmp_path / "a" / "mlflow.db").read_bytes() != template.read_bytes()

    # A cache that cannot be made (here a file where its folder would be): MLflow makes the store itself.
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-folder"))
    client = client_for(load_config(None, [f"workdir={tmp_path / 'c'}"]))
    assert client.search_experiments()[0].name == "Default"
    assert os.listdir(tmp_path / "c") == ["mlflow.db"]  # no temporaries left behind
