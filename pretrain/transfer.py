"""The paper's transfer protocol (Dosovitskiy et al. 2021, §3.2 and Appendix B.1.1) for one model.

Fine-tuning: the pretraining head (and pre-logits layer) is removed and replaced by a zero-initialised
linear layer with the downstream class count; the position embeddings are resampled (2-D bicubic) to
the fine-tuning resolution; SGD with momentum 0.9, no weight decay, linear warmup then cosine decay,
gradient clipping at global norm 1, a fixed global batch. The step runs through DeepSpeed exactly as
pretraining does (``pretrain.engine``: process group, ``train_step``; ``pretrain.ds_config``: the
config), so it works on one CPU process, under ``torchrun`` or on Ray Train workers, with any ZeRO stage.
The global batch is one optimisation whatever fits on a device: each rank runs ``batch / (micro_batch x
world size)`` micro-batches per step, cut from the same global batch (``GlobalBatchSampler``), so the
paper's batch 512 at 384 px on 8 GPUs x micro-batch 16 x 4 steps is the step of 1 GPU x 512.

Frozen evaluation (``run_probe``): linear probe and few-shot on the features of the model at its own
pretraining resolution (big_vision's few-shot setting), so they measure the checkpoint as it is.

Jobs are plain frozen dataclasses so that an orchestrator (``pipelines/transfer_job.py``) can send
them to remote workers; nothing here knows about Ray or MLflow.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from pretrain import storage
from pretrain.ds_config import accumulation, finetune_config, finetune_micro_batch
from pretrain.downstream import dataset_spec, load_dataset
from pretrain.errors import InputError
from pretrain.evaluate import PAPER_MEAN, PAPER_STD, features, fewshot_from_features, linear_probe, normalize
from pretrain.model import ViT, resample_pos_embed

MOMENTUM = 0.9


# --------------------------------------------------------------------------- the model


def resolve_checkpoint(checkpoint: str, workdir: str) -> str:
    """``"latest"`` = the pretraining export ``{workdir}/export``; else a folder (or URL) of such an export."""
    from pretrain.convert import CONFIG_FILE, WEIGHTS_FILE

    location = storage.join(workdir, "export") if checkpoint == "latest" else checkpoint
    location = storage.absolute(location)
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not storage.isfile(storage.join(location, name)):
            hint = " (run `vitscale pretrain` first)" if checkpoint == "latest" else ""
            raise InputError(f"transfer.checkpoint: {storage.join(location, name)} not found{hint}")
    return location


def local_export(export_dir: str, weights: bool = True) -> Path:
    """The export as a local folder: itself, or this node's cached copy of one on object storage."""
    from pretrain.convert import CONFIG_FILE, WEIGHTS_FILE

    return Path(storage.local_copy(export_dir, [WEIGHTS_FILE, CONFIG_FILE] if weights else [CONFIG_FILE]))


def export_normalization(export_dir: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean/std the checkpoint was pretrained with (recorded in its local ``config.json``)."""
    cfg = json.loads((Path(export_dir) / "config.json").read_text()).get("pretrained_cfg", {})
    return tuple(cfg.get("mean", PAPER_MEAN)), tuple(cfg.get("std", PAPER_STD))


def load_model(export_dir: Path, init: str, seed: int) -> ViT:
    """The exported model (``init="pretrained"``), or one of the same config freshly initialised (``"scratch"``)."""
    from pretrain.convert import load_safetensors, read_export_config

    if init == "pretrained":
        return load_safetensors(export_dir)[0]
    if init != "scratch":
        raise ValueError(f"init {init!r}: expected 'pretrained' or 'scratch'")
    torch.manual_seed(seed)
    return ViT(read_export_config(export_dir))


def prepare_for_transfer(model: ViT, num_classes: int, img_size: int) -> ViT:
    """The paper's fine-tuning model: same backbone, a zero-initialised ``num_classes`` head, no
    pre-logits layer, position embeddings resampled to ``img_size``'s patch grid."""
    cfg = dataclasses.replace(model.cfg, num_classes=num_classes, img_size=img_size, representation_size=None)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(("head.", "pre_logits."))}
    prefix = 1 if cfg.pool == "cls" else 0
    state["pos_embed"] = resample_pos_embed(state["pos_embed"], (cfg.grid, cfg.grid), num_prefix_tokens=prefix)
    new = ViT(cfg)  # its reset_parameters zero-initialises the head
    missing, unexpected = new.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"head.weight", "head.bias"}:
        raise ValueError(f"backbone mismatch: missing {missing}, unexpected {unexpected}")
    return new


# --------------------------------------------------------------------------- the jobs


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tuning run: train on ``train_split``, report accuracy on ``eval_split``."""

    dataset: str
    data_root: Optional[str]
    export_dir: str
    init: str  # "pretrained" | "scratch"
    lr: float
    steps: int
    warmup_steps: int
    batch: int  # global, over all workers and accumulation steps
    img_size: int
    train_split: str = "train"  # "train" to pick the LR (eval on "dev"); "trainval" for the final run
    eval_split: str = "dev"
    seed: int = 0
    precision: str = "fp32"  # bf16 | fp16 | fp32
    zero_stage: int = 0
    use_gpu: bool = False
    loader_workers: int = 0
    grad_clip: float = 1.0
    log_every: int = 50
    micro_batch: Optional[int] = None  # per rank and forward pass; None = batch / world size (no accumulation)
    act_checkpoint: bool = False  # recompute block activations in the backward (L/H at 384+ px)
    deepspeed: dict = field(default_factory=dict)  # the user's engine knobs (``ds_config.engine_knobs``)


@dataclass(frozen=True)
class ProbeJob:
    """Linear probe and few-shot of one model on one dataset (frozen features)."""

    dataset: str
    data_root: Optional[str]
    export_dir: str
    init: str
    shots: tuple[int, ...] = (1, 5, 10, 25)
    seed: int = 0
    batch: int = 256
    use_gpu: bool = False


def warmup_steps_for(steps: int, warmup: Optional[int]) -> int:
    """The configured warmup, or 5 % of the steps when unset (at least 1: DeepSpeed needs one)."""
    return max(1, round(0.05 * steps) if warmup is None else warmup)


# --------------------------------------------------------------------------- distributed plumbing


def ensure_process_group(use_gpu: bool):
    """Join the launcher's process group; with no launcher, become a world of one (env set here)."""
    from pretrain.engine import init_distributed

    if not dist.is_initialized() and "RANK" not in os.environ:
        with socket.socket() as s:  # a free port: several single-process jobs may share a machine
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
    return init_distributed(use_gpu)


class GlobalBatchSampler(Sampler[list[int]]):
    """An endless stream of seeded epochs cut into global batches; each rank takes its share of each
    batch, in ``micro_batch``-sized pieces (``batch / (micro_batch x world_size)`` per global batch).

    Rank r's share is the r-th contiguous slice of the global batch, cut in order, so the micro-batches
    of all ranks together, rank by rank, are the global batch whatever the split: 2 ranks x 1 piece
    and 1 rank x 2 pieces see the same images in the same step. Every rank computes the same stream
    without talking to the others; batches run across epoch boundaries (as big_vision's repeated
    datasets do), so a dataset smaller than a batch still works.
    """

    def __init__(self, n: int, batch: int, rank: int, world_size: int, seed: int, micro_batch: Optional[int] = None):
        self.micro = finetune_micro_batch(batch, micro_batch, world_size)
        accumulation(batch, self.micro, world_size, "transfer.batch", "transfer.micro_batch")  # whole, or InputError
        self.n, self.batch, self.rank, self.seed = n, batch, rank, seed
        self.share = batch // world_size

    def __iter__(self) -> Iterator[list[int]]:
        buf: list[int] = []
        epoch = 0
        while True:
            while len(buf) < self.batch:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                buf += torch.randperm(self.n, generator=g).tolist()
                epoch += 1
            batch, buf = buf[: self.batch], buf[self.batch :]
            share = batch[self.rank * self.share : (self.rank + 1) * self.share]
            for i in range(0, self.share, self.micro):
                yield share[i : i + self.micro]


@torch.no_grad()
def sharded_accuracy(module: torch.nn.Module, ds: Dataset, rank: int, world_size: int, batch: int,
                     mean: Sequence[float], std: Sequence[float]) -> float:
    """Top-1 accuracy over ``ds`` with every rank scoring a strided share. Collective: all ranks run
    the same number of forward passes (padded shares), as ZeRO-3's parameter gathering requires."""
    param = next(module.parameters())
    share = list(range(rank, len(ds), world_size))
    per_rank = math.ceil(len(ds) / world_size)
    valid = torch.zeros(per_rank, dtype=torch.bool)
    valid[: len(share)] = True
    share += [0] * (per_rank - len(share))
    was_training = module.training
    module.eval()
    counts = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(DataLoader(Subset(ds, share), batch_size=batch)):
        keep = valid[i * batch : i * batch + len(y)]
        pred = module(normalize(x, mean, std).to(param.device, param.dtype)).argmax(dim=-1).cpu()
        counts += torch.tensor([float(((pred == y) & keep).sum()), float(keep.sum())], dtype=torch.float64)
    module.train(was_training)
    if world_size > 1:
        counts = counts.to(param.device)
        dist.all_reduce(counts)
    return float(counts[0] / counts[1])


# --------------------------------------------------------------------------- fine-tuning


def finetune(model: ViT, train_ds: Dataset, eval_ds: Dataset, job: FinetuneJob,
             mean: Sequence[float] = PAPER_MEAN, std: Sequence[float] = PAPER_STD,
             on_log: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Fine-tune ``model`` (already prepared) with the protocol; returns on every rank
    ``{"accuracy", "loss", "loss_curve": [[step, loss], ...], "seconds", "world_size", "grad_accum"}``."""
    from pretrain.engine import train_step
    from pretrain.parallelize import parallelize

    info = ensure_process_group(job.use_gpu)
    torch.manual_seed(job.seed + info.rank)  # dropout / drop-path differ per rank, as in pretraining
    opt = torch.optim.SGD(model.parameters(), lr=job.lr, momentum=MOMENTUM, weight_decay=0.0)
    engine = parallelize(model, finetune_config(job, info.world_size), optimizer=opt,
                         act_checkpoint=job.act_checkpoint)
    micro = engine.train_micro_batch_size_per_gpu()
    sampler = GlobalBatchSampler(len(train_ds), job.batch, info.rank, info.world_size, job.seed, micro)
    loader = DataLoader(train_ds, batch_sampler=sampler, num_workers=job.loader_workers,
                        persistent_workers=job.loader_workers > 0)
    batches = ((normalize(x, mean, std), y) for x, y in loader)
    t0 = time.perf_counter()
    curve, window = [], []
    for step in range(1, job.steps + 1):
        loss = train_step(engine, batches).loss
        if info.world_size > 1:
            dist.all_reduce(loss)
            loss /= info.world_size
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"fine-tuning {job.dataset} at LR {job.lr} stopped: loss {value} at step {step}")
        window.append(value)
        if step % job.log_every == 0 or step == job.steps:
            curve.append([step, sum(window) / len(window)])
            window = []
            if on_log is not None and info.rank == 0:
                on_log(step, {"loss": curve[-1][1], "lr": float(engine.get_lr()[0])})
    acc = sharded_accuracy(engine.module, eval_ds, info.rank, info.world_size, micro, mean, std)
    return {"accuracy": acc, "loss": curve[-1][1], "loss_curve": curve, "seconds": time.perf_counter() - t0,
            "world_size": info.world_size, "grad_accum": engine.gradient_accumulation_steps()}


def run_finetune(job: FinetuneJob, on_log: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Load the data and the model a job names, prepare the model, fine-tune, score ``eval_split``."""
    export_dir = local_export(job.export_dir)
    spec = dataset_spec(job.dataset, job.data_root)
    train_ds = load_dataset(job.dataset, job.train_split, job.img_size, job.data_root, augment=True)
    eval_ds = load_dataset(job.dataset, job.eval_split, job.img_size, job.data_root)
    model = prepare_for_transfer(load_model(export_dir, job.init, job.seed), spec.num_classes, job.img_size)
    mean, std = export_normalization(export_dir)
    out = finetune(model, train_ds, eval_ds, job, mean, std, on_log)
    return {**out, "num_train": len(train_ds), "num_eval": len(eval_ds)}


# --------------------------------------------------------------------------- frozen evaluation


def run_probe(job: ProbeJob) -> dict:
    """Linear probe (L2 picked on dev, refit on train + dev, test once) and few-shot (sampled from
    train + dev, scored on test) on frozen features at the model's own resolution."""
    export_dir = local_export(job.export_dir)
    spec = dataset_spec(job.dataset, job.data_root)
    model = load_model(export_dir, job.init, job.seed)
    if job.use_gpu:
        model = model.cuda()
    mean, std = export_normalization(export_dir)
    feats = {}
    for split in ("train", "dev", "test"):
        ds = load_dataset(job.dataset, split, model.cfg.img_size, job.data_root)
        feats[split] = features(model, ds, job.batch, mean, std)
    (f_tr, y_tr), (f_dev, y_dev), (f_te, y_te) = feats["train"], feats["dev"], feats["test"]
    linear = linear_probe(f_tr, y_tr, f_dev, y_dev, f_te, y_te)
    fewshot = fewshot_from_features(torch.cat([f_tr, f_dev]), torch.cat([y_tr, y_dev]), f_te, y_te,
                                    job.shots, spec.num_classes, job.seed)
    return {"linear": linear["accuracy"], "linear_l2": linear["l2"], "linear_dev": linear["dev_accuracy"],
            "fewshot": fewshot}
