"""torchrun entry point for the checkpoint tests, and the helpers that launch it (no tests here).

``python -m torch.distributed.run --standalone --nproc_per_node N tests/test_checkpoint_worker.py ...``
builds a tiny ViT under DeepSpeed (CPU, gloo), resumes through ``Checkpointer``, trains on a fixed
set of generated images, saves every ``--every`` steps, and writes what the test checks to ``--out``:
the resume report (written right after the resume, so a run killed later still tells what it
resumed, and again at the end), the losses, and (rank 0) the full fp32 parameters and Adam moments
after each save and right after the resume. ``--kill-at`` makes rank ``--kill-rank`` SIGKILL itself
halfway through writing its optimizer file of that step's save; ``--kill-upload-at`` makes it
SIGKILL itself after uploading half of its files of that step's save to object storage.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterable

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve()


def torchrun(nproc: int, root: str | Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the worker on ``nproc`` CPU processes; returns the finished process (output captured).
    ``s3://`` roots reach the test S3 server through the ``AWS_*`` variables the ranks inherit."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), "--root", str(root), "--out", str(out), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("report_rank*.json"))]


def assert_same_state(a: dict, b: dict) -> None:
    """Every fp32 parameter and Adam moment bitwise equal."""
    import torch

    assert a.keys() == b.keys()
    assert any(k.startswith("exp_avg_sq/") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--every", type=int, default=2)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--kill-at", type=int, default=None)
    ap.add_argument("--kill-upload-at", type=int, default=None)
    ap.add_argument("--kill-rank", type=int, default=1)
    return ap.parse_args(argv)


def full_state(engine) -> dict:
    """Every parameter and Adam moment, assembled from the ZeRO partitions (collective), the LR and step."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and opt.optimizer.state:
        # DeepSpeed links the moments to the parameters lazily, after the first group's first step
        # (so a second group's links stay empty), and after a non-universal load only at the next
        # step: link them again before reading.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    import torch

    out = {"lr": torch.tensor(engine.get_lr()), "global_steps": torch.tensor(engine.global_steps)}
    for name, p in engine.module.named_parameters():
        out[f"param/{name}"] = safe_get_full_fp32_param(p).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key).detach().clone()
    return out


def batch(step: int, rank: int, world_size: int, micro: int = 4):
    """A slice of 32 fixed generated images (the model memorises them, so the loss falls)."""
    import torch

    g = torch.Generator().manual_seed(1234)
    images = torch.randn(32, 3, 16, 16, generator=g)
    labels = torch.randint(0, 4, (32,), generator=g)
    idx = [(step * micro * world_size + rank * micro + i) % 32 for i in range(micro)]
    return images[idx], labels[idx]


def eval_loss(engine) -> float:
    """Loss on all 32 images: the curve the world-size tests check keeps falling."""
    import torch
    import torch.nn.functional as F

    images, labels = batch(0, 0, 1, micro=32)
    with torch.no_grad():
        return F.cross_entropy(engine(images.to(engine.module.pos_embed.dtype)).float(), labels).item()


def kill_halfway(engine, step_box: list, kill_at: int) -> None:
    """Wrap DeepSpeed's writer: at save ``kill_at`` write half of the optimizer file, then SIGKILL."""
    import torch

    real = engine.checkpoint_engine.save

    def save(state_dict, path):
        if step_box[0] == kill_at and path.endswith("optim_states.pt"):
            buf = io.BytesIO()
            torch.save(state_dict, buf)
            with open(path, "wb") as f:
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return real(state_dict, path)

    engine.checkpoint_engine.save = save


def kill_uploading(step_box: list, kill_at: int) -> None:
    """Wrap the Checkpointer's concurrent upload: at save ``kill_at`` upload the first half of this
    rank's files (sorted), then SIGKILL."""
    from pretrain import storage

    real = storage.upload_many

    def upload_many(pairs: Iterable[tuple[str, str]]) -> None:
        pairs = sorted(pairs)
        if step_box[0] == kill_at:
            real(pairs[: len(pairs) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(pairs)

    storage.upload_many = upload_many


def write_report(out: str, rank: int, report: dict) -> None:
    with open(os.path.join(out, f"report_rank{rank}.json"), "w") as f:
        json.dump(report, f)


def main(argv=None) -> None:
    args = parse(argv)
    import torch
    import torch.nn.functional as F

    from pretrain.checkpoint import Checkpointer, rng_state, set_rng_state
    from pretrain.parallelize import import_deepspeed
    from pretrain.model import ViT, ViTConfig

    deepspeed = import_deepspeed()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = ViT(ViTConfig.from_variant("mu/4", img_size=16, num_classes=4))
    # As the pretraining engine builds it: DeepSpeed's AdamW (torch's) and LR schedule, two groups.
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": args.zero}, "steps_per_print": 10**9, "bf16": {"enabled": args.bf16},
              "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.05, "torch_adam": True}},
              "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 20, "warmup_num_steps": 2}}}
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1]},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=groups, config=config)

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    ckpt = Checkpointer(args.root, keep=args.keep, rank=rank, world_size=world)
    state = ckpt.resume(engine)
    report: dict = {"resumed": None, "losses": {}, "eval": {}}
    os.makedirs(args.out, exist_ok=True)
    start = 0
    if state is not None:
        start = state["step"]
        report["resumed"] = state["resumed"]
        report["client_keys"] = sorted(state)
        report["loader"] = state["loader"]
        report["rng_restored"] = state["rng"] is not None
        if state["rng"] is not None:
            set_rng_state(state["rng"])
        resumed = full_state(engine)
        if rank == 0:
            torch.save(resumed, os.path.join(args.out, f"resumed_{start}.pt"))

    report["eval"][start] = eval_loss(engine)
    write_report(args.out, rank, report)
    step_box = [start]
    if args.kill_at is not None and rank == args.kill_rank:
        kill_halfway(engine, step_box, args.kill_at)
    if args.kill_upload_at is not None and rank == args.kill_rank:
        kill_uploading(step_box, args.kill_upload_at)
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank, world)
        loss = F.cross_entropy(engine(x.to(dtype)).float(), y)
        engine.backward(loss)
        engine.step()
        report["losses"][step] = loss.item()
        if step % args.every == 0:
            step_box[0] = step
            ckpt.save(engine, step, {"loader": {"position": step, "rank": rank}, "rng": rng_state(),
                                     "config": {"zero": args.zero}})
            saved = full_state(engine)
            if rank == 0:
                torch.save(saved, os.path.join(args.out, f"saved_{step}.pt"))
    report["eval"][args.steps] = eval_loss(engine)
    write_report(args.out, rank, report)


if __name__ == "__main__":
    try:
        main()
    finally:
        import torch.distributed as dist

        # As pretrain.launch does: a gloo group left to the interpreter's exit can abort the
        # process ("terminate called without an active exception") after the run has succeeded.
        if dist.is_initialized():
            dist.destroy_process_group()
