"""The pretraining loop: step, maybe log, maybe evaluate, maybe checkpoint; then export.

Runs on every rank under any launcher (Ray Train, ``torchrun``, ``deepspeed``), given the typed
``TrainJob`` the launcher built. Only rank 0 has side effects (console, metrics file, MLflow, export).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pretrain.config import AugmentConfig, PretrainConfig, TrainJob
from pretrain.engine import build_engine, full_state_dict, grad_norm, init_distributed, train_step, vit_config
from pretrain.fewshot_probe import FewshotProbe
from pretrain.metrics import (Meter, detect_peak_tflops, hardware_flops_per_image, memory_stats,
                              model_flops_per_image)
from pretrain.model import ViT, ViTConfig, num_params
from pretrain import storage
from pretrain.errors import InputError
from pretrain.losses import init_head_for, make_loss
from pretrain.tracking import Tracker
from pretrain.validation import HoldoutEval, holdout_shards

EXPORT_MARKER = "pretrain.json"  # beside the export: the step it was taken at


def train(job: TrainJob, *, run_id: Optional[str] = None, tracking_uri: Optional[str] = None) -> dict:
    """Pretrain to ``job.pretrain.steps`` optimizer steps, resuming from the latest complete checkpoint.

    Returns (on every rank) ``{"step", "metrics", "checkpoint_dir", "export_dir"}``; ``metrics`` are the
    last logged ones. A non-finite loss raises ``FloatingPointError`` naming the step.
    """
    from pretrain.checkpoint import Checkpointer, describe_resume, rng_state, set_rng_state
    from pretrain.data import make_train_loader, num_classes_of, resolve_shards

    model_cfg, cfg, workdir, seed = job.model, job.pretrain, job.workdir, job.seed
    info = init_distributed(cfg.use_gpu)
    rank, world = info.rank, info.world_size
    tracker = Tracker(tracking_uri, run_id, rank, bound_http=True)
    try:
        urls, manifest = resolve_shards(cfg.shards or storage.join(workdir, "shards"))
        num_classes = cfg.num_classes or num_classes_of(manifest)
        multi = multi_label(manifest, cfg)
        loss_fn = make_loss(cfg.loss, cfg.label_smoothing)
        vit = vit_config(model_cfg, num_classes)
        torch.manual_seed(seed)  # the same initial weights on every rank and under every launcher
        model = ViT(vit)
        init_head_for(model, cfg.loss)
        torch.manual_seed(seed + 1 + rank)  # but each rank its own dropout / drop-path draws
        log = MetricsLog(workdir, rank, tracker, cfg.steps)
        log.say(f"{num_params(model) / 1e6:.2f} M params, {num_classes} classes, {world} ranks, "
                f"ZeRO {cfg.zero_stage}, {cfg.precision}{', blocks compiled' if model_cfg.compile else ''}")
        engine = build_engine(model, cfg, world, act_checkpoint=model_cfg.act_checkpoint, compile=model_cfg.compile)
        ckpt = Checkpointer(root=storage.join(workdir, "checkpoints"), keep=cfg.keep_checkpoints, rank=rank, world_size=world)
        state = ckpt.resume(engine)
        log.say(describe_resume(state))
        step = state["step"] if state else 0
        log.start(step)
        if state and state.get("rng"):
            set_rng_state(state["rng"])
        elif state:  # world size changed: no RNG state maps to this rank, so seed from where we are
            torch.manual_seed((seed * 1_000_003 + step) * 1_000_003 + rank)
        loader = make_train_loader(
            urls, batch_size=cfg.micro_batch, rank=rank, world_size=world, seed=seed, img_size=model_cfg.img_size,
            augment=cfg.augment, label_key=cfg.label_key, shuffle_buffer=cfg.shuffle_buffer,
            num_workers=cfg.loader_workers, state=state.get("loader") if state else None,
            num_classes=num_classes, pin_memory=cfg.use_gpu, **({"multi_label": True} if multi else {}))
        batches = iter(loader)
        held = holdout_shards(manifest, urls)
        validation = HoldoutEval(*held, batch_size=cfg.micro_batch, rank=rank, world_size=world, img_size=model_cfg.img_size,
                                 label_key=cfg.label_key, augment=cfg.augment, num_classes=num_classes,
                                 multi_label=multi) if held[0] else None
        fewshot = FewshotProbe(cfg.fewshot, model_cfg.img_size, job.data_root, seed, cfg.augment) if cfg.fewshot.datasets else None
        meter = Meter(model_flops_per_image(vit), world, cfg.peak_tflops or detect_peak_tflops(info.device, cfg.precision),
                      hardware_flops_per_image(vit, model_cfg.act_checkpoint))
        metrics: dict[str, float] = {}
        losses: list[torch.Tensor] = []
        while step < cfg.steps:
            result = train_step(engine, batches, loss_fn)
            step += 1
            losses.append(_mean_over_ranks(result.loss))
            _check_finite(losses[-1], step)
            meter.add(result.images * world, result.data_s)
            if step % cfg.log_every == 0 or step == cfg.steps:
                metrics = _window_metrics(engine, result.lr, losses, meter, loader, info.device)
                log.write(step, metrics)
                losses = []
            if validation and (step % cfg.eval_every == 0 or step == cfg.steps):
                with meter.excluded():
                    log.write(step, validation.evaluate(engine, loss_fn))
            if fewshot and (step % cfg.fewshot.every == 0 or step == cfg.steps):
                with meter.excluded():
                    log.write(step, fewshot.evaluate(engine, rank))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with meter.excluded():
                    ckpt.save(engine, step, {"step": step, "loader": loader.state_dict(), "rng": rng_state()})
                    log.draw(final=step == cfg.steps)
        export_dir = _export(engine, vit, cfg.augment, workdir, step, rank)
        return {"step": step, "metrics": metrics, "checkpoint_dir": storage.join(workdir, "checkpoints"),
                "export_dir": export_dir, "resumed": state.get("resumed") if state else None}
    finally:
        tracker.close()


def multi_label(manifest: Optional[dict], cfg: PretrainConfig) -> bool:
    """Whether the shards are multi-label (their manifest says so); refuses a loss that cannot train them."""
    multi = bool(manifest) and manifest.get("label_kind") == "multi"
    if multi and cfg.loss == "softmax":
        raise InputError("pretrain.loss: softmax takes one label per image, but these shards are multi-label "
                         "(manifest label_kind: multi); set pretrain.loss: sigmoid and pretrain.label_key: json:labels")
    if multi and cfg.label_key != "json:labels":
        raise InputError(f"pretrain.label_key: the shards are multi-label, their labels are under json:labels, "
                         f"not {cfg.label_key!r}")
    return multi


def _mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def _check_finite(loss: torch.Tensor, step: int) -> None:
    value = float(loss)
    if not math.isfinite(value):
        raise FloatingPointError(f"pretraining stopped: the loss is {value} at step {step}")


def _window_metrics(engine, lr: float, losses: list[torch.Tensor], meter: Meter, loader,
                    device: torch.device) -> dict[str, float]:
    """What is logged every ``log_every`` steps. Collective: every rank calls it (loader counts are summed)."""
    counts: list[dict] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(counts, dict(loader.counts()))
    loader_counts: dict[str, float] = {}
    for rank_counts in counts:
        for key, value in rank_counts.items():
            loader_counts[f"loader_{key}"] = loader_counts.get(f"loader_{key}", 0) + value
    return {"loss": float(torch.stack(losses).mean()), "lr": lr, "grad_norm": grad_norm(engine),
            **meter.report(), **loader_counts, **memory_stats(device)}


def _export(engine, vit: ViTConfig, augment: AugmentConfig, workdir: str, step: int, rank: int) -> str:
    """Rank 0 writes ``{workdir}/export/{model.safetensors,config.json}`` from the gathered fp32 weights,
    then ``pretrain.json`` (the step) last: an export is complete exactly when that marker exists."""
    from pretrain.convert import CONFIG_FILE, WEIGHTS_FILE, save_safetensors

    out = storage.join(workdir, "export")
    state = full_state_dict(engine, rank)  # collective
    if rank == 0:
        remote = storage.is_remote(out)
        local = storage.scratch_dir("export") if remote else out
        storage.remove(storage.join(out, EXPORT_MARKER))
        save_safetensors(state, vit, local, drop_head=vit.representation_size is not None,
                         mean=tuple(augment.mean), std=tuple(augment.std))
        if remote:
            storage.upload_many((os.path.join(local, n), storage.join(out, n)) for n in (WEIGHTS_FILE, CONFIG_FILE))
            shutil.rmtree(local, ignore_errors=True)
        storage.write_json(storage.join(out, EXPORT_MARKER), {"step": step})
    dist.barrier()
    return out


class MetricsLog:
    """Rank 0's console lines, ``{workdir}/logs/pretrain.jsonl`` and MLflow metrics; a no-op elsewhere."""

    def __init__(self, workdir: str, rank: int, tracker: Tracker, total_steps: int):
        self.active = rank == 0
        self.tracker = tracker
        self.total = total_steps
        self.started, self.first_step = time.monotonic(), 0
        # The file is the record that survives an MLflow outage; object-store workdirs have only MLflow.
        self.path = None if storage.is_remote(workdir) else Path(workdir) / "logs" / "pretrain.jsonl"
        if self.active and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def start(self, step: int) -> None:
        """Training starts (or resumes) at ``step`` now: the ETA counts only the steps this run trained."""
        self.started, self.first_step = time.monotonic(), step

    def _clock(self, step: int) -> str:
        elapsed = time.monotonic() - self.started
        done = step - self.first_step
        eta = elapsed / done * (self.total - step) if done > 0 else float("nan")
        return f"elapsed {_hms(elapsed)} ETA {_hms(eta)}"

    def draw(self, final: bool = False) -> None:
        """Redraw ``curves.png`` beside the metrics file (a long run shows its progress at every
        checkpoint); the final picture also goes to MLflow."""
        if not self.active or not self.path or not self.path.exists():
            return
        from pretrain.curves import plot_curves

        png = plot_curves(str(self.path))
        if final:
            self.tracker.log_artifact(png)

    def say(self, text: str) -> None:
        if self.active:
            print(f"[pretrain] {text}", flush=True)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active or not metrics:
            return
        self.tracker.log_metrics(metrics, step)
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
        clock = f" {self._clock(step)}" if "loss" in metrics else ""
        self.say(f"step {step}/{self.total} " + _console(metrics) + clock)


def _console(metrics: dict[str, float]) -> str:
    if "loss" not in metrics:
        return " ".join(f"{k} {v:.4g}" for k, v in metrics.items())
    mfu = f"{metrics['mfu']:.1%} (HFU {metrics['hfu']:.1%})" if "mfu" in metrics else "-"
    mem = next((f"{v:.2f} GiB" for k, v in metrics.items() if k.startswith("mem_peak")), "-")
    return (f"loss {metrics['loss']:.4f} lr {metrics['lr']:.2e} gnorm {metrics['grad_norm']:.3f} "
            f"img/s {metrics['img_per_s']:.1f} TFLOP/s {metrics['tflops_per_device']:.3g} MFU {mfu} "
            f"data-wait {metrics['data_wait_frac']:.0%} skipped {metrics.get('loader_skipped_corrupt', 0):.0f} "
            f"mem {mem}")


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
