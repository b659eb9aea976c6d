"""The fine-tuning protocol of pretrain/transfer.py: loading, head swap, pos-embed resampling, the
DeepSpeed loop on one process and on two Ray Train workers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain.convert import save_safetensors
from pretrain.model import ViT, ViTConfig, resample_pos_embed
from pretrain.transfer import FinetuneJob, GlobalBatchSampler, load_model, prepare_for_transfer


def _trained_looking(cfg: ViTConfig, seed: int = 0) -> ViT:
    """A model whose head and embeddings are not at their init values (as after pretraining)."""
    torch.manual_seed(seed)
    model = ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_pretrained_at_32_fine_tunes_at_48_and_loading_keeps_outputs(tmp_path):
    cfg = ViTConfig.from_variant("mu/4", num_classes=5, img_size=32)
    original = _trained_looking(cfg)
    save_safetensors(original, cfg, tmp_path)
    loaded = load_model(tmp_path, "pretrained", seed=0).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), original(x))  # loading changes nothing at the old size

        ft = prepare_for_transfer(loaded, num_classes=7, img_size=48).eval()
        assert ft.cfg.img_size == 48 and ft.pos_embed.shape == (1, 1 + 12 * 12, cfg.width)
        torch.testing.assert_close(ft.pos_embed, resample_pos_embed(original.pos_embed, (12, 12)))
        assert ft.head.weight.shape == (7, cfg.width)
        assert not ft.head.weight.any() and not ft.head.bias.any()  # zero-initialised head
        assert not ft(torch.randn(2, 3, 48, 48)).any()
        backbone = {k: v for k, v in original.state_dict().items() if not k.startswith(("head.", "pos_embed"))}
        for k, v in backbone.items():
            assert torch.equal(ft.state_dict()[k], v), k

        same_size = prepare_for_transfer(loaded, num_classes=7, img_size=32).eval()
        assert torch.equal(same_size.forward_features(x), original.forward_features(x))
        assert torch.equal(loaded(x), original(x))  # preparing did not touch the loaded model


def test_pre_logits_export_gets_a_single_linear_head(tmp_path):
    cfg = ViTConfig.from_variant("mu/4", num_classes=5, img_size=16, representation_size=24)
    save_safetensors(_trained_looking(cfg), cfg, tmp_path, drop_head=True)
    ft = prepare_for_transfer(load_model(tmp_path, "pretrained", seed=0), num_classes=3, img_size=16)
    assert ft.pre_logits is None and ft.head.weight.shape == (3, cfg.width)


def test_scratch_model_has_the_same_config_and_fresh_weights(tmp_path):
    cfg = ViTConfig.from_variant("mu/4", num_classes=5, img_size=16)
    original = _trained_looking(cfg)
    save_safetensors(original, cfg, tmp_path)
    scratch = load_model(tmp_path, "scratch", seed=3)
    assert scratch.cfg == original.cfg
    assert not torch.equal(scratch.pos_embed, original.pos_embed)
    assert torch.equal(scratch.pos_embed, load_model(tmp_path, "scratch", seed=3).pos_embed)


def test_global_batches_split_over_ranks_and_cycle_small_datasets():
    per_rank = [iter(GlobalBatchSampler(n=10, batch=8, rank=r, world_size=2, seed=0)) for r in range(2)]
    seen = []
    for _ in range(5):  # 40 draws from 10 examples: whole seeded epochs, in order, cut into global batches
        a, b = next(per_rank[0]), next(per_rank[1])
        assert len(a) == len(b) == 4
        seen += a + b  # rank 0 holds the first half of each global batch, rank 1 the second
    for epoch in range(4):
        assert sorted(seen[10 * epoch : 10 * epoch + 10]) == list(range(10))
    assert seen[:10] != seen[10:20]  # each epoch reshuffled
    tiny = next(iter(GlobalBatchSampler(n=3, batch=8, rank=0, world_size=1, seed=0)))
    assert len(tiny) == 8 and set(tiny) == {0, 1, 2}


@pytest.mark.timeout(300)
def test_two_ray_train_workers_match_one_process(tmp_path, ray_local):
    """The same job on one process (a Ray task) and on a 2-worker TorchTrainer: the same global batches,
    so the same losses and the same dev accuracy, up to float summation order."""
    from pipelines.transfer_job import finetune_cell

    cfg = ViTConfig.from_variant("mu/4", num_classes=10, img_size=16)
    save_safetensors(_trained_looking(cfg), cfg, tmp_path / "export")
    job = FinetuneJob(dataset="digits", data_root=None, export_dir=str(tmp_path / "export"), init="pretrained",
                      lr=0.05, steps=8, warmup_steps=2, batch=32, img_size=16, log_every=1)
    cell = ray_local.remote(finetune_cell)
    one = cell.options(num_cpus=1).remote(job, 1, 1, False, str(tmp_path / "ray"))
    two = cell.options(num_cpus=0).remote(dataclasses.replace(job), 2, 1, False, str(tmp_path / "ray"))
    one, two = ray_local.get([one, two])
    assert one["world_size"] == 1 and two["world_size"] == 2
    losses_one = torch.tensor([loss for _, loss in one["loss_curve"]])
    losses_two = torch.tensor([loss for _, loss in two["loss_curve"]])
    assert len(losses_one) == 8 and losses_one[-1] < losses_one[0]
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-4, atol=1e-5)
    assert abs(one["accuracy"] - two["accuracy"]) <= 1 / one["num_eval"]
