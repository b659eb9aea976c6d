"""``vitscale transfer``: the dataset x LR grid of the paper's transfer protocol as concurrent Ray work.

What runs, per dataset in ``transfer.datasets`` and per model (the checkpoint, plus a randomly
initialised model of the same config when ``transfer.compare_scratch``):

- ``mode: finetune``: one fine-tuning run per LR of the grid on ``train``, scored on ``dev``; as soon as
  a dataset's grid is in, the best LR on dev is retrained on ``train + dev`` and tested once on
  ``test``. A grid of one LR (or a protocol that fixes it, VTAB's 0.01) goes straight to the final run.
- always, whatever the mode: the linear probe and few-shot (``transfer.shots``) on frozen features,
  which are cheap. ``mode: linear`` or ``fewshot`` skips fine-tuning; the report then shows only those.

Every run (a cell of the grid) is its own Ray task with its resources (``pretrain.cpus_per_worker``
CPUs, a GPU with ``pretrain.use_gpu``); with ``transfer.workers > 1`` a task starts a Ray Train
``TorchTrainer`` of that many workers instead (the same DeepSpeed loop on each rank, ZeRO as
``pretrain.zero_stage``, ``transfer.batch / (transfer.micro_batch x workers)`` accumulation steps). As
many fine-tuning cells run at once as the cluster holds; the rest wait in the driver (``Grid``).
MLflow: a nested run per (dataset, model, LR) and phase under the stage's run, which gets the summary
metrics and the report (table, plot, results.json) as artifacts.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from pipelines.config import Config, flatten, to_dict
from pipelines.tracking import client_for, stage_run, tracker_for
from pipelines.transfer_report import markdown_report, markdown_table, plot, write_json
from pretrain.downstream import DatasetSpec, dataset_spec
from pretrain.ds_config import engine_knobs
from pretrain.errors import InputError
from pretrain import storage
from pretrain.lease import Lease
from pretrain.tracking import end_run
from pretrain.transfer import (FinetuneJob, ProbeJob, local_export, resolve_checkpoint, run_finetune, run_probe,
                               warmup_steps_for)

REPORT_DIR = "transfer"
log = logging.getLogger(__name__)
REPORT, PLOT, RESULTS = "report.md", "plot.png", "results.json"


def report_dir(cfg: Config) -> str:
    return storage.join(storage.absolute(cfg.workdir), REPORT_DIR)


# --------------------------------------------------------------------------- work on the cluster


def _stamped(fn, *args) -> dict:
    started = time.time()
    out = fn(*args)
    return {**out, "pid": os.getpid(), "started": started, "finished": time.time()}


def _train_loop(config: dict) -> dict:
    """Each Ray Train worker: the process group is up; the same fine-tuning as a single process."""
    return run_finetune(config["job"])


def finetune_cell(job: FinetuneJob, workers: int, cpus: int, use_gpu: bool, storage: str) -> dict:
    """One fine-tuning run: in this task's process, or on a ``TorchTrainer`` of ``workers`` ranks."""
    if workers == 1:
        def progress(step: int, m: dict) -> None:
            print(f"[transfer] {job.dataset} {job.init} lr={job.lr:g} step {step}/{job.steps} "
                  f"loss {m['loss']:.4f}", flush=True)

        return _stamped(run_finetune, job, progress)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus}),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"transfer-{Path(job.dataset).name}-{job.init}-lr{job.lr:g}-{job.train_split}",
                             storage_path=storage),
    )
    return _stamped(lambda: trainer.fit().return_value)


def probe_cell(job: ProbeJob) -> dict:
    return _stamped(run_probe, job)


# --------------------------------------------------------------------------- MLflow


class NestedRuns:
    """Nested MLflow runs under the stage's run (a no-op without one); the driver alone writes, through
    the stage's queued tracker, so an MLflow outage never stops the grid. Runs whose end was lost in an
    outage are ended in ``close`` once the server answers again (bounded wait)."""

    def __init__(self, cfg: Config, parent_run_id: Optional[str]):
        self.parent = parent_run_id
        self.tracker = tracker_for(cfg, parent_run_id)
        self.client = client_for(cfg) if parent_run_id else None
        self._experiment: Optional[str] = None
        self._ends: dict[str, str] = {}  # run id -> status, until the server confirms it
        self._unreachable = False

    def start(self, name: str, tags: dict[str, str], params: dict[str, Any]) -> Optional[str]:
        """A nested run's id, or None when MLflow cannot be reached (that cell runs untracked)."""
        if not self.parent:
            return None
        from mlflow.entities import Param
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        try:
            self._experiment = self._experiment or self.client.get_run(self.parent).info.experiment_id
            run_id = self.client.create_run(self._experiment, run_name=name, tags={
                MLFLOW_PARENT_RUN_ID: self.parent, MLFLOW_RUN_NAME: name, **tags}).info.run_id
        except Exception as e:  # noqa: BLE001 - the tracking server's failure is not the stage's
            if not self._unreachable:
                log.warning("MLflow unreachable (%s: %s): nested runs are skipped while it is down",
                            type(e).__name__, str(e)[:200])
            self._unreachable = True
            return None
        self._unreachable = False
        batch = [Param(k, str(v)[:6000]) for k, v in params.items()]
        self.tracker.call(lambda c: c.log_batch(run_id, params=batch))
        return run_id

    def log(self, run_id: Optional[str], metrics: dict[str, float], curve: Optional[list] = None) -> None:
        if not run_id:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        batch += [Metric("loss", float(loss), now, int(step)) for step, loss in (curve or [])]
        for i in range(0, len(batch), 1000):  # MLflow's log_batch limit
            chunk = batch[i : i + 1000]
            self.tracker.call(lambda c, chunk=chunk: c.log_batch(run_id, metrics=chunk))

    def end(self, run_id: Optional[str], status: str = "FINISHED") -> None:
        if not run_id:
            return
        self._ends[run_id] = status

        def terminate(c) -> None:
            c.set_terminated(run_id, status)
            self._ends.pop(run_id, None)

        self.tracker.call(terminate)

    def stage(self, metrics: dict[str, float], params: dict[str, Any], artifacts: list[Path]) -> None:
        """Summary metrics, the transfer config and the report files on the stage's own run."""
        self.tracker.log_metrics(metrics, step=0)
        self.tracker.log_params(params)
        for path in artifacts:
            self.tracker.log_artifact(str(path), artifact_path=REPORT_DIR)

    def close(self) -> None:
        self.tracker.close()
        for run_id, status in list(self._ends.items()):
            end_run(self.client, run_id, status)


# --------------------------------------------------------------------------- the stage


def fingerprint(cfg: Config, export_dir: str) -> str:
    """What the report depends on: the transfer settings, the seed, the engine settings and the checkpoint."""
    from pretrain.convert import CONFIG_FILE, WEIGHTS_FILE

    data = {"transfer": to_dict(cfg.transfer), "seed": cfg.seed, "precision": cfg.pretrain.precision,
            "zero_stage": cfg.pretrain.zero_stage,
            "export_config": storage.read_text(storage.join(export_dir, CONFIG_FILE)),
            "weights": storage.identity(storage.join(export_dir, WEIGHTS_FILE))}
    knobs = engine_knobs(cfg.pretrain.deepspeed)
    if knobs:  # only when set, so that reports made before fine-tuning inherited them stay complete
        data["deepspeed"] = knobs
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def transfer_complete(cfg: Config) -> bool:
    """True when ``{workdir}/transfer/results.json`` exists for these settings and this checkpoint."""
    try:
        export_dir = resolve_checkpoint(cfg.transfer.checkpoint, cfg.workdir)
        done = storage.read_json(storage.join(report_dir(cfg), RESULTS))
        return done.get("fingerprint") == fingerprint(cfg, export_dir)
    except (InputError, OSError, ValueError):
        return False


def _lr_grid(spec: DatasetSpec, lrs: list[float]) -> list[float]:
    return [spec.lr] if spec.lr is not None else list(lrs)


def cells_at_once(resources: dict, workers: int, cpus_per_worker: int, use_gpu: bool) -> int:
    """How many fine-tuning cells of ``workers`` ranks the cluster's resources hold side by side."""
    fits = int(resources.get("CPU", 0) // (workers * cpus_per_worker))
    if use_gpu:
        fits = min(fits, int(resources.get("GPU", 0) // workers))
    return fits


class Grid:
    """The stage's Ray work in flight and what has come back.

    Fine-tuning cells start only while the cluster can hold one more (``cells_at_once``); the others
    wait here, in the driver, and start as cells finish. Why not hand Ray every cell at once: a cell of
    several workers is a driver task (no resources of its own) that starts a ``TorchTrainer``, whose
    placement group asks for all its workers together. Ray never deadlocks on those (a group is
    reserved whole or not at all), but a grid larger than the cluster would park a driver process, a
    Train controller and a pending placement group per waiting cell, and Ray Train gives up on a
    worker group that waits longer than ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (60 s) and starts
    it again, over and over. Holding the queue here costs nothing, keeps the order of the grid, and
    leaves the probes (one CPU each) to Ray's own queue. The count is re-read from the cluster at each
    start, so nodes that join are used.
    """

    def __init__(self, cfg: Config, export_dir: str, specs: dict[str, DatasetSpec], runs: NestedRuns):
        import ray

        self.ray, self.cfg, self.t, self.runs = ray, cfg, cfg.transfer, runs
        self.export_dir, self.specs = str(export_dir), specs
        p = cfg.pretrain
        gpus = 1 if p.use_gpu else 0
        ray_storage = storage.join(report_dir(cfg), "ray_results")
        if self.t.workers == 1:
            self._finetune = ray.remote(finetune_cell).options(num_cpus=p.cpus_per_worker, num_gpus=gpus)
        else:  # the task only drives a TorchTrainer, whose workers hold the resources
            self._finetune = ray.remote(finetune_cell).options(num_cpus=0)
        self._ft_args = (self.t.workers, p.cpus_per_worker, p.use_gpu, ray_storage)
        self._probe = ray.remote(probe_cell).options(num_cpus=p.cpus_per_worker, num_gpus=gpus)
        self.pending: dict[Any, dict] = {}
        self.waiting: deque[dict] = deque()  # fine-tuning cells not started yet, in grid order
        self.running = 0  # fine-tuning cells started and not back
        self.dev: dict[tuple[str, str], dict[float, dict]] = {}
        self.rows: dict[tuple[str, str], dict] = {}
        self.timings: list[dict] = []
        self.total = self.done = 0  # cells of the whole grid (probes and finals included), cells back
        self._warned_small = False

    def _job(self, dataset: str, init: str, lr: float, final: bool) -> FinetuneJob:
        spec, t, p = self.specs[dataset], self.t, self.cfg.pretrain
        steps = t.steps or spec.steps
        return FinetuneJob(
            dataset=dataset, data_root=t.data_root, export_dir=self.export_dir, init=init, lr=lr, steps=steps,
            warmup_steps=warmup_steps_for(steps, t.warmup_steps), batch=t.batch, img_size=t.img_size,
            train_split="trainval" if final else "train", eval_split="test" if final else "dev",
            seed=self.cfg.seed, precision=p.precision, zero_stage=p.zero_stage, use_gpu=p.use_gpu,
            loader_workers=0 if spec.in_memory else p.loader_workers, log_every=max(1, min(50, steps // 10)),
            micro_batch=t.micro_batch, deepspeed=engine_knobs(p.deepspeed),
            # pretraining's memory setting for the same backbone (L/H at 384+ px need it more, not less)
            act_checkpoint=self.cfg.model.act_checkpoint)

    def submit_finetune(self, dataset: str, init: str, lr: float, final: bool) -> None:
        self.waiting.append({"kind": "final" if final else "dev", "dataset": dataset, "init": init, "lr": lr})
        self._start_cells()

    def _start_cells(self) -> None:
        """Start waiting fine-tuning cells while the cluster holds one more (always one at least)."""
        p = self.cfg.pretrain
        resources = self.ray.cluster_resources()
        fits = cells_at_once(resources, self.t.workers, p.cpus_per_worker, p.use_gpu)
        if fits < 1 and not self._warned_small:  # an autoscaler may still add nodes: wait, don't fail
            self._warned_small = True
            log.warning("the cluster (%s) cannot hold one fine-tuning cell of %d workers x %d CPUs%s now; "
                        "each cell waits for nodes to join", {k: resources.get(k, 0) for k in ("CPU", "GPU")},
                        self.t.workers, p.cpus_per_worker, " + 1 GPU" if p.use_gpu else "")
        while self.waiting and self.running < max(1, fits):
            info = self.waiting.popleft()
            dataset, init, lr, phase = info["dataset"], info["init"], info["lr"], info["kind"]
            job = self._job(dataset, init, lr, final=phase == "final")
            name = f"{Path(dataset).name}-{init}-lr{lr:g}-{phase}"
            info["run_id"] = self.runs.start(
                name, {"vitscale.stage": "transfer", "vitscale.dataset": dataset, "vitscale.init": init,
                       "vitscale.lr": f"{lr:g}", "vitscale.phase": phase},
                {k: v for k, v in dataclasses.asdict(job).items() if k != "data_root"})
            self.pending[self._finetune.remote(job, *self._ft_args)] = info
            self.running += 1

    def submit_probe(self, dataset: str, init: str) -> None:
        job = ProbeJob(dataset, self.t.data_root, self.export_dir, init, tuple(self.t.shots), self.cfg.seed,
                       use_gpu=self.cfg.pretrain.use_gpu)
        ref = self._probe.remote(job)
        self.pending[ref] = {"kind": "probe", "dataset": dataset, "init": init, "lr": None, "run_id": None}

    def start(self, inits: list[str]) -> None:
        for dataset, spec in self.specs.items():
            for init in inits:
                self.rows[(dataset, init)] = {"dataset": dataset, "init": init, "num_classes": spec.num_classes,
                                              "steps": self.t.steps or spec.steps, "finetune": None, "lr": None}
                grid = _lr_grid(spec, self.t.lrs)
                finetunes = 0 if self.t.mode != "finetune" else 1 if len(grid) == 1 else len(grid) + 1
                self.total += 1 + finetunes  # the probe, the dev runs, the final run
        for dataset, spec in self.specs.items():
            for init in inits:
                self.submit_probe(dataset, init)
                if self.t.mode != "finetune":
                    continue
                grid = _lr_grid(spec, self.t.lrs)
                if len(grid) == 1:
                    self.submit_finetune(dataset, init, grid[0], final=True)
                    continue
                self.dev[(dataset, init)] = {}
                for lr in grid:
                    self.submit_finetune(dataset, init, lr, final=False)

    def _take(self, info: dict, result: dict) -> None:
        key = (info["dataset"], info["init"])
        row = self.rows[key]
        self.done += 1
        done = f"[transfer] cell {self.done} of {self.total} done: {Path(info['dataset']).name} {info['init']}"
        if info["kind"] == "probe":
            row.update(linear=result["linear"], fewshot=result["fewshot"], linear_l2=result["linear_l2"])
            shots = ", ".join(f"{k} {v:.3f}" for k, v in result["fewshot"].items())
            print(f"{done} probe linear acc {result['linear']:.3f}, few-shot {shots}", flush=True)
            return
        metric = "dev_accuracy" if info["kind"] == "dev" else "test_accuracy"
        self.runs.log(info["run_id"], {metric: result["accuracy"], "seconds": result["seconds"]}, result["loss_curve"])
        self.runs.end(info["run_id"])
        print(f"{done} lr={info['lr']:g} {info['kind']} acc {result['accuracy']:.3f} ({result['seconds']:.0f} s, "
              f"{result['world_size']} workers x {result['grad_accum']} micro-batches)", flush=True)
        if info["kind"] == "final":
            row.update(finetune=result["accuracy"], lr=info["lr"], final_loss=result["loss"])
            return
        scores = self.dev[key]
        scores[info["lr"]] = result
        grid = _lr_grid(self.specs[info["dataset"]], self.t.lrs)
        if len(scores) == len(grid):
            best = max(grid, key=lambda lr: scores[lr]["accuracy"])  # first in grid order on ties
            row["dev"] = {f"{lr:g}": scores[lr]["accuracy"] for lr in grid}
            self.submit_finetune(info["dataset"], info["init"], best, final=True)

    def wait_all(self) -> list[dict]:
        """Collect results as they come; the first failure cancels the rest and is raised."""
        try:
            while self.pending:
                ready, _ = self.ray.wait(list(self.pending), num_returns=1)
                info = self.pending.pop(ready[0])
                try:
                    result = self.ray.get(ready[0])
                except BaseException:
                    self.runs.end(info["run_id"], "FAILED")
                    raise
                if info["kind"] != "probe":
                    self.running -= 1
                self.timings.append({k: info[k] for k in ("kind", "dataset", "init", "lr")} |
                                    {k: result[k] for k in ("pid", "started", "finished")})
                self._take(info, result)
                self._start_cells()
        except BaseException:
            for ref, info in self.pending.items():
                self.ray.cancel(ref, force=True)
                self.runs.end(info["run_id"], "KILLED")
            raise
        return [self.rows[k] for k in self.rows]


def _summary_metrics(rows: list[dict]) -> dict[str, float]:
    out = {}
    for r in rows:
        prefix = f"{Path(r['dataset']).name}{'' if r['init'] == 'pretrained' else '_scratch'}"
        if r.get("finetune") is not None:
            out[f"{prefix}/finetune"] = r["finetune"]
        if r.get("linear") is not None:
            out[f"{prefix}/linear"] = r["linear"]
        for k, v in r.get("fewshot", {}).items():
            out[f"{prefix}/{k}"] = v
    return out


def check_inputs(cfg: Config) -> tuple[dict[str, DatasetSpec], str, Any]:
    """The datasets' specs, the checkpoint directory and its ViTConfig; ``InputError`` naming the
    missing folder, file or key otherwise. Cheap: nothing is loaded."""
    from pretrain.convert import read_export_config

    t = cfg.transfer
    specs = {name: dataset_spec(name, t.data_root) for name in t.datasets}
    export_dir = resolve_checkpoint(t.checkpoint, cfg.workdir)
    vit = read_export_config(local_export(export_dir, weights=False))
    if t.img_size % vit.patch:
        raise InputError(f"transfer.img_size: {t.img_size} is not a multiple of the checkpoint's patch {vit.patch}")
    return specs, export_dir, vit


def run_transfer(cfg: Config, run_id: Optional[str] = None) -> dict:
    """Run the transfer grid for ``cfg.transfer`` and write ``{workdir}/transfer/{report.md,plot.png,results.json}``.

    Logs nested runs and the report to MLflow run ``run_id`` when given. Returns ``{"report", "plot",
    "results", "table", "rows", "timings"}``: paths, the markdown table, one dict per table row
    (``dataset``, ``init``, ``finetune``, ``lr``, ``dev``, ``linear``, ``fewshot``, ...) and when and
    where each Ray task ran. Bad input (a missing dataset folder or checkpoint) raises ``InputError``
    before any work starts.
    """
    with Lease(report_dir(cfg), "vitscale transfer"):
        return _run_grid(cfg, run_id)


def _run_grid(cfg: Config, run_id: Optional[str]) -> dict:
    from pipelines.cluster import ensure_ray

    specs, export_dir, vit = check_inputs(cfg)
    ensure_ray(cfg.ray)
    runs = NestedRuns(cfg, run_id)
    try:
        return _grid_and_report(cfg, specs, export_dir, vit, runs)
    finally:
        runs.close()


def _grid_and_report(cfg: Config, specs: dict[str, DatasetSpec], export_dir: str, vit: Any, runs: NestedRuns) -> dict:
    t = cfg.transfer
    grid = Grid(cfg, export_dir, specs, runs)
    grid.start(["pretrained", "scratch"] if t.compare_scratch else ["pretrained"])
    rows = grid.wait_all()

    shots = list(t.shots)
    meta = {"name": cfg.name, "export_dir": export_dir, "img_size": t.img_size, "batch": t.batch,
            "variant": f"ViT width {vit.width}, depth {vit.depth}, heads {vit.heads}, patch {vit.patch}",
            "pretrain_size": vit.img_size}
    results = {"fingerprint": fingerprint(cfg, export_dir), "meta": meta, "transfer": to_dict(t), "rows": rows,
               "timings": grid.timings}
    paths = _publish_report(report_dir(cfg), markdown_report(rows, shots, meta), rows, shots, results, runs)
    return {**paths, "table": markdown_table(rows, shots), "rows": rows, "timings": grid.timings}


def _publish_report(out: str, report: str, rows: list[dict], shots: list[int], results: dict,
                    runs: NestedRuns) -> dict[str, str]:
    """Report and plot, then ``results.json`` last (what ``transfer_complete`` looks for), under ``out``
    (a folder or a URL); the same files go to the stage's MLflow run."""
    local = Path(storage.scratch_dir("transfer-report"))
    try:
        files = {"report": local / REPORT, "plot": local / PLOT, "results": local / RESULTS}
        files["report"].write_text(report)
        plot(rows, shots, files["plot"])
        write_json(files["results"], results)
        runs.stage(_summary_metrics(rows), flatten(results["transfer"], "transfer."), list(files.values()))
        for path in files.values():  # results.json last
            storage.publish_file(str(path), storage.join(out, path.name))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    return {kind: storage.join(out, path.name) for kind, path in files.items()}


def cli_main(cfg: Config, args: argparse.Namespace) -> int:  # noqa: ARG001
    """``vitscale transfer CONFIG``: the stage in its own MLflow run; prints the table and where the report is."""
    check_inputs(cfg)  # bad input exits 2 before an MLflow run or Ray starts
    with Lease(report_dir(cfg), "vitscale transfer"), stage_run(cfg, "transfer") as run_id:
        result = run_transfer(cfg, run_id=run_id)
    print(result["table"], flush=True)
    print(f"[vitscale] transfer: report {result['report']}, plot {result['plot']}, MLflow run {run_id}", flush=True)
    return 0
