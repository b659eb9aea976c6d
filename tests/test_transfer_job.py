"""The transfer stage end to end: the Ray grid on real digits, the report, MLflow nested runs, exit codes."""
from __future__ import annotations

import json

import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.config import load_config, replace
from pipelines.tracking import client_for, stage_run
from pipelines.transfer_job import run_transfer, transfer_complete
from pretrain.convert import save_safetensors
from pretrain.model import ViT, ViTConfig


def _export(path, variant: str, img_size: int) -> str:
    torch.manual_seed(1234)  # not the run's seed: the scratch model (seed 0) must differ from the export
    cfg = ViTConfig.from_variant(variant, num_classes=10, img_size=img_size)
    save_safetensors(ViT(cfg), cfg, path)
    return str(path)


def _config(tmp_path, export: str, **transfer):
    overrides = {"workdir": str(tmp_path / "work"), "transfer.checkpoint": export, "transfer.datasets": ["digits"],
                 "transfer.img_size": 16, "transfer.workers": 1, "pretrain.cpus_per_worker": 1,
                 "pretrain.precision": "fp32", "pretrain.zero_stage": 0}
    overrides.update({f"transfer.{k}": v for k, v in transfer.items()})
    return replace(load_config("local"), **overrides)


def _nested(cfg, parent: str) -> list:
    client = client_for(cfg)
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")


def test_missing_dataset_folder_exits_2_naming_it(tmp_path, capsys):
    rc = cli_main(["transfer", "local", "--set", f"workdir={tmp_path}", "--set", "transfer.datasets=[cifar10]",
                   "--set", f"transfer.data_root={tmp_path / 'data'}"])
    assert rc == 2
    assert str(tmp_path / "data" / "cifar-10-batches-py") in capsys.readouterr().err


@pytest.mark.timeout(600)
def test_grid_fine_tunes_digits_to_90_and_reports_everything(tmp_path, ray_local):
    """A randomly initialised tiny ViT (width 96, depth 4, patch 4) put through the whole protocol on
    scikit-learn's real digits at 16 px: two LRs on dev at once, the best retrained on train + dev."""
    cfg = _config(tmp_path, _export(tmp_path / "export", "tiny/4", 16), lrs=[0.01, 0.1], steps=200,
                  warmup_steps=10, batch=64, shots=[1, 5, 10], compare_scratch=False)
    assert not transfer_complete(cfg)
    with stage_run(cfg, "transfer") as run_id:
        result = run_transfer(cfg, run_id=run_id)

    (row,) = result["rows"]
    assert row["finetune"] >= 0.90
    dev = {float(lr): acc for lr, acc in row["dev"].items()}
    assert set(dev) == {0.01, 0.1} and row["lr"] == max(dev, key=dev.get)
    assert 0 < row["linear"] <= 1 and set(row["fewshot"]) == {"1shot", "5shot", "10shot"}

    report = open(result["report"]).read()
    line = next(ln for ln in report.splitlines() if ln.startswith("| digits "))
    assert f"{100 * row['finetune']:.2f}" in line and f"{100 * row['linear']:.2f}" in line
    assert f"{100 * row['fewshot']['10shot']:.2f}" in line and "10-shot" in report
    assert open(result["plot"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.loads(open(result["results"]).read())["rows"][0]["lr"] == row["lr"]

    # The two dev runs ran at the same time, in different processes.
    devs = [t for t in result["timings"] if t["kind"] == "dev"]
    assert len(devs) == 2 and devs[0]["pid"] != devs[1]["pid"]
    assert max(t["started"] for t in devs) < min(t["finished"] for t in devs)

    nested = _nested(cfg, run_id)
    by_phase = {(r.data.tags["vitscale.phase"], float(r.data.tags["vitscale.lr"])): r for r in nested}
    assert set(by_phase) == {("dev", 0.01), ("dev", 0.1), ("final", row["lr"])}
    for lr, acc in dev.items():
        assert by_phase[("dev", lr)].data.metrics["dev_accuracy"] == pytest.approx(acc)
        assert by_phase[("dev", lr)].info.status == "FINISHED"
    assert by_phase[("final", row["lr"])].data.metrics["test_accuracy"] == pytest.approx(row["finetune"])
    client = client_for(cfg)
    assert client.get_run(run_id).data.metrics["digits/finetune"] == pytest.approx(row["finetune"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "transfer")}
    assert {"transfer/report.md", "transfer/plot.png", "transfer/results.json"} <= artifacts

    assert transfer_complete(cfg)
    assert not transfer_complete(replace(cfg, **{"transfer.lrs": [0.1]}))


@pytest.mark.timeout(600)
def test_compare_scratch_adds_rows_and_a_single_lr_skips_selection(tmp_path, ray_local):
    cfg = _config(tmp_path, _export(tmp_path / "export", "mu/4", 16), lrs=[0.05], steps=6, warmup_steps=2,
                  batch=32, shots=[1, 5], compare_scratch=True)
    with stage_run(cfg, "transfer") as run_id:
        result = run_transfer(cfg, run_id=run_id)
    rows = {r["init"]: r for r in result["rows"]}
    assert set(rows) == {"pretrained", "scratch"}
    for r in rows.values():
        assert r["lr"] == 0.05 and "dev" not in r and r["finetune"] is not None and r["linear"] is not None
    assert rows["pretrained"]["fewshot"] != rows["scratch"]["fewshot"]  # two different models were measured
    assert "| digits (from scratch) |" in result["table"] and "| digits |" in result["table"]
    nested = _nested(cfg, run_id)
    assert sorted((r.data.tags["vitscale.init"], r.data.tags["vitscale.phase"]) for r in nested) == [
        ("pretrained", "final"), ("scratch", "final")]


@pytest.mark.timeout(300)
def test_frozen_modes_skip_fine_tuning(tmp_path, ray_local):
    cfg = _config(tmp_path, _export(tmp_path / "export", "mu/4", 16), mode="fewshot", shots=[2],
                  compare_scratch=False)
    result = run_transfer(cfg)  # no MLflow run given: nothing is logged, the report is still written
    (row,) = result["rows"]
    assert row["finetune"] is None and row["linear"] is not None and set(row["fewshot"]) == {"2shot"}
    assert [t["kind"] for t in result["timings"]] == ["probe"]
    assert "| digits | — | — |" in open(result["report"]).read()


@pytest.mark.timeout(600)
def test_two_worker_cells_take_turns_on_a_two_node_cluster_smaller_than_the_grid(tmp_path, capsys):
    """Two fine-tuning cells of 2 workers (ZeRO 2, 2 micro-batches each) on 2 nodes of 1 CPU: the cluster
    holds one cell at a time, so the second starts when the first is back, and the grid completes."""
    import ray
    from ray.cluster_utils import Cluster

    cfg = _config(tmp_path, _export(tmp_path / "export", "mu/4", 16), lrs=[0.05], steps=4, warmup_steps=1,
                  batch=16, shots=[1], compare_scratch=True, workers=2, micro_batch=4)
    ray.shutdown()  # the session's local Ray; the next test that needs it starts it again
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        result = run_transfer(replace(cfg, **{"ray.address": cluster.address, "pretrain.zero_stage": 2}))
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert {r["init"]: r["finetune"] is not None for r in result["rows"]} == {"pretrained": True, "scratch": True}
    first, second = sorted((t for t in result["timings"] if t["kind"] == "final"), key=lambda t: t["started"])
    assert second["started"] >= first["finished"]
    out = capsys.readouterr().out
    assert "[transfer] cell 4 of 4 done: digits " in out
    assert out.count("lr=0.05 final acc") == 2 and "2 workers x 2 micro-batches" in out
