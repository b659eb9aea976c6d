"""The fine-tuning protocol of pretrain/transfer.py: loading, head swap, pos-embed resampling, the
micro-batches of each rank, the DeepSpeed loop on one process and on two Ray Train workers."""
from __future__ import annotations

import pytest
import torch

from pretrain.convert import save_safetensors
from pretrain.errors import InputError
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


def test_micro_batches_of_any_split_are_the_same_global_batches_in_the_same_order():
    """What each step sees, rank by rank and micro-batch by micro-batch, whatever the workers x accumulation."""
    def steps(world: int, micro: int, n_steps: int = 4) -> list[list[int]]:
        ranks = [iter(GlobalBatchSampler(n=50, batch=16, rank=r, world_size=world, seed=3, micro_batch=micro))
                 for r in range(world)]
        accum = 16 // (world * micro)
        return [[i for it in ranks for _ in range(accum) for i in next(it)] for _ in range(n_steps)]

    reference = steps(world=1, micro=16)  # the whole batch at once
    for world, micro in [(1, 8), (2, 8), (2, 4), (4, 2), (1, 2)]:
        assert steps(world, micro) == reference, (world, micro)
    with pytest.raises(InputError, match="transfer.batch: 16 is not transfer.micro_batch"):
        GlobalBatchSampler(n=50, batch=16, rank=0, world_size=2, seed=0, micro_batch=3)


@pytest.mark.timeout(300)
def test_two_workers_zero2_with_accumulation_match_one_worker_with_twice_the_accumulation(tmp_path, ray_local):
    """Batch 32 as 1 worker x 4 micro-batches of 8 (a Ray task) and as 2 Ray Train workers x 2 micro-batches
    of 8 (ZeRO 2, gloo): the same global batches, so the same losses and the same dev accuracy, up to
    float summation order."""
    from pipelines.transfer_job import finetune_cell

    cfg = ViTConfig.from_variant("mu/4", num_classes=10, img_size=16)
    save_safetensors(_trained_looking(cfg), cfg, tmp_path / "export")
    job = FinetuneJob(dataset="digits", data_root=None, export_dir=str(tmp_path / "export"), init="pretrained",
                      lr=0.05, steps=6, warmup_steps=2, batch=32, img_size=16, log_every=1, zero_stage=2,
                      micro_batch=8)
    cell = ray_local.remote(finetune_cell)
    one = cell.options(num_cpus=1).remote(job, 1, 1, False, str(tmp_path / "ray"))
    two = cell.options(num_cpus=0).remote(job, 2, 1, False, str(tmp_path / "ray"))
    one, two = ray_local.get([one, two])
    assert (one["world_size"], one["grad_accum"]) == (1, 4) and (two["world_size"], two["grad_accum"]) == (2, 2)
    losses_one = torch.tensor([loss for _, loss in one["loss_curve"]])
    losses_two = torch.tensor([loss for _, loss in two["loss_curve"]])
    assert len(losses_one) == 6 and losses_one[-1] < losses_one[0]
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-4, atol=1e-5)
    assert abs(one["accuracy"] - two["accuracy"]) <= 1 / one["num_eval"]
