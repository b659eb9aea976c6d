"""Resume on another number of workers: 2 -> 1 -> 2 under torchrun (CPU, gloo, DeepSpeed ZeRO-2).

The checkpoint written by 2 ranks is converted to DeepSpeed's universal form when 1 rank resumes
it, and back again when 2 ranks resume the 1-rank checkpoint. Every fp32 parameter and both Adam
moments must be bitwise equal before the save and after the resume, and training must go on
lowering the loss on the fixed image set.
"""
from __future__ import annotations

import torch

from pretrain.checkpoint import MARKER, UNIVERSAL, step_name
from test_checkpoint_worker import assert_same_state, ok, reports, torchrun


def test_two_to_one_to_two_workers_keeps_model_and_adam_moments(tmp_path):
    root = tmp_path / "checkpoints"
    ok(torchrun(2, root, tmp_path / "a", "--steps", "3", "--every", "3", "--keep", "3"))
    b = torchrun(1, root, tmp_path / "b", "--steps", "6", "--every", "3", "--keep", "3")
    ok(b)
    ok(torchrun(2, root, tmp_path / "c", "--steps", "9", "--every", "3", "--keep", "3"))

    (rb,) = reports(tmp_path / "b")
    assert rb["resumed"]["step"] == 3 and rb["resumed"]["universal"] is True
    assert (rb["resumed"]["world_size_then"], rb["resumed"]["world_size_now"]) == (2, 1)
    assert "world size changed: converting" in b.stderr
    assert_same_state(torch.load(tmp_path / "a" / "saved_3.pt"), torch.load(tmp_path / "b" / "resumed_3.pt"))
    assert (root / UNIVERSAL / step_name(3) / MARKER).exists()

    for rc in reports(tmp_path / "c"):
        assert rc["resumed"]["step"] == 6 and rc["resumed"]["universal"] is True
        assert (rc["resumed"]["world_size_then"], rc["resumed"]["world_size_now"]) == (1, 2)
    assert_same_state(torch.load(tmp_path / "b" / "saved_6.pt"), torch.load(tmp_path / "c" / "resumed_6.pt"))

    # The loss on the whole fixed set keeps falling across both changes of world size.
    ra = reports(tmp_path / "a")[0]
    curve = [ra["eval"]["0"], ra["eval"]["3"], rb["eval"]["3"], rb["eval"]["6"], reports(tmp_path / "c")[0]["eval"]["9"]]
    assert curve[1] == curve[2]  # the same weights evaluated after the resume
    assert curve[0] > curve[1] > curve[3] > curve[4], curve
