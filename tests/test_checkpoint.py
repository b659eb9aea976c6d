"""Checkpoints: atomic publish, a process killed while writing, a flipped byte, keep-N, safe
state, and resume on another number of workers (2 -> 1 -> 2) with model and Adam moments equal.

The multi-process tests run ``tests/test_checkpoint_worker.py`` under ``torchrun`` with 1 or 2 CPU
processes (gloo, real DeepSpeed ZeRO-2, a tiny ViT) against one checkpoint folder; see ``runs``.
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pretrain.checkpoint import (MANIFEST, MARKER, UNIVERSAL, Checkpointer, _check_safe, describe_resume, rng_state,
                                 set_rng_state, step_name)
from test_checkpoint_worker import assert_same_state, ok, reports, torchrun

OBJSTORE = "objstore://checkpoints"  # the torchrun workers map it onto the runs' folder


# --------------------------------------------------------------------------- no processes needed


def test_rng_state_round_trip_survives_weights_only(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_unsafe_client_state_is_refused_at_save_naming_the_key():
    _check_safe({"loader": {"pos": [1, torch.zeros(2)]}, "rng": rng_state(), "config": {"lr": 1e-3}})
    with pytest.raises(TypeError, match=r"client_state\['loader'\]\['order'\]: a ndarray"):
        _check_safe({"loader": {"order": np.arange(3)}})


def test_only_marked_checkpoints_count_and_keep_must_be_positive(tmp_path):
    for step, marked in ((2, True), (4, False), (6, True)):
        d = tmp_path / step_name(step)
        d.mkdir()
        if marked:
            (d / MARKER).write_text("x")
    (tmp_path / "step_8").mkdir()  # not our name pattern
    assert Checkpointer(str(tmp_path), keep=2, rank=0, world_size=1).complete_steps() == [2, 6]
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(str(tmp_path), keep=0, rank=0, world_size=1)
    assert describe_resume(None).startswith("no checkpoint")


# --------------------------------------------------------------------------- torchrun, 1 and 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four runs on one checkpoint folder (keep 2), each resuming what the one before left:

    kill: 2 ranks save steps 2, 4, 6; rank 1 is SIGKILLed halfway through writing step 8.
    same: 2 ranks resume and train to step 8.
    down: a byte of step 8 is flipped; 1 rank resumes (refusing step 8) and trains to step 10.
    up:   2 ranks resume the 1-rank checkpoint and train to step 12.

    ``down`` and ``up`` reach the same folder as ``objstore://checkpoints``, an fsspec filesystem
    with object-store semantics, so they take the object-storage path (upload, marker, download);
    before ``down``, a ``step_00000010/`` without its marker stands for an object-store save that a
    crash cut off.
    """
    base = tmp_path_factory.mktemp("ckpt")
    root = base / "checkpoints"
    r = {"base": base, "root": root}
    r["kill"] = torchrun(2, root, base / "kill", "--steps", "8", "--kill-at", "8")
    r["after_kill"] = {
        "dirs": sorted(p.name for p in root.iterdir()),
        "partial": sorted(str(p.relative_to(root / ".partial")) for p in (root / ".partial").rglob("*") if p.is_file()),
        "latest": (root / "latest").read_text(),
    }
    r["same"] = torchrun(2, root, base / "same", "--steps", "8")
    r["after_same"] = {"dirs": sorted(p.name for p in root.iterdir()), "latest": (root / "latest").read_text()}
    bad = root / step_name(8) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    if bad.exists():
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0x01
        bad.write_bytes(bytes(data))
        r["bad"], r["bad_bytes"] = bad, bytes(data)
    (root / step_name(10)).mkdir()
    (root / step_name(10) / "mp_rank_00_model_states.pt").write_bytes(b"cut off")
    r["down"] = torchrun(1, OBJSTORE, base / "down", "--steps", "10", objstore=base)
    r["up"] = torchrun(2, OBJSTORE, base / "up", "--steps", "12", objstore=base)
    return r


def test_killed_while_writing_resumes_from_previous_complete(runs):
    root, base = runs["root"], runs["base"]
    assert runs["kill"].returncode != 0  # the SIGKILL took the job down
    # The half-written step 8 exists only under the staging name; keep=2 removed step 2.
    assert runs["after_kill"]["dirs"] == [".partial", "latest", step_name(4), step_name(6)]
    assert "step_00000008/zero_pp_rank_1_mp_rank_00_optim_states.pt" in runs["after_kill"]["partial"]
    assert runs["after_kill"]["latest"] == step_name(6)

    ok(runs["same"])
    for rank, rep in enumerate(reports(base / "same")):
        assert rep["loader"] == {"position": 6, "rank": rank} and rep["rng_restored"] is True
        assert rep["resumed"]["step"] == 6
        assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (2, 2)
        assert rep["resumed"]["rejected"] == [] and rep["resumed"]["universal"] is False
        assert "loader" in rep["client_keys"] and "rng" in rep["client_keys"]
    assert_same_state(torch.load(base / "kill" / "saved_6.pt"), torch.load(base / "same" / "resumed_6.pt"))
    assert runs["after_same"] == {"dirs": ["latest", step_name(6), step_name(8)], "latest": step_name(8)}


def test_manifest_lists_every_file_and_client_state_loads_safely(runs):
    ok(runs["up"])
    step = runs["root"] / step_name(12)
    meta = json.loads((step / MANIFEST).read_text())
    assert meta["step"] == 12 and meta["world_size"] == 2
    assert set(meta["files"]) == {p.name for p in step.iterdir()} - {MANIFEST, MARKER}
    assert {"client_rank0.pt", "client_rank1.pt", "mp_rank_00_model_states.pt"} <= set(meta["files"])
    client = torch.load(step / "client_rank1.pt", weights_only=True)
    assert client["loader"] == {"position": 12, "rank": 1} and client["world_size"] == 2


def test_flipped_byte_is_refused_and_previous_checkpoint_used(runs):
    root, base, down = runs["root"], runs["base"], runs["down"]
    ok(runs["same"])
    bad = runs["bad"]
    ok(down)
    bad_url = f"{OBJSTORE}/{step_name(8)}/{bad.name}"
    assert f"refusing checkpoint {OBJSTORE}/{step_name(8)}" in down.stderr
    assert f"{bad_url}: sha256" in down.stderr and "does not match the manifest" in down.stderr
    (rep,) = reports(base / "down")
    assert rep["resumed"]["step"] == 6  # not 10 (no marker), not 8 (refused)
    assert [x["step"] for x in rep["resumed"]["rejected"]] == [8]
    assert bad_url in rep["resumed"]["rejected"][0]["problems"][0]
    # The refused checkpoint is kept aside for inspection.
    assert (root / "rejected" / step_name(8) / bad.name).read_bytes() == runs["bad_bytes"]


def test_two_workers_to_one_keeps_model_and_adam_moments(runs):
    base, down = runs["base"], runs["down"]
    ok(down)
    (rep,) = reports(base / "down")
    assert rep["resumed"]["universal"] is True
    assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (2, 1)
    assert "world size changed: converting" in down.stderr
    assert_same_state(torch.load(base / "kill" / "saved_6.pt"), torch.load(base / "down" / "resumed_6.pt"))
    # Per-rank state cannot map 1:1: the loader gets old rank 0's (it starts fresh streams from it).
    assert rep["loader"] == {"position": 6, "rank": 0} and rep["rng_restored"] is False


def test_one_worker_to_two_keeps_model_and_adam_moments(runs):
    root, base = runs["root"], runs["base"]
    ok(runs["up"])
    for rep in reports(base / "up"):
        assert rep["resumed"]["step"] == 10 and rep["resumed"]["universal"] is True
        assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (1, 2)
    assert_same_state(torch.load(base / "down" / "saved_10.pt"), torch.load(base / "up" / "resumed_10.pt"))
    assert [rep["loader"] for rep in reports(base / "up")] == [{"position": 10, "rank": 0}] * 2
    # keep=2: the universal form of a pruned checkpoint goes with it.
    assert sorted(p.name for p in (root / UNIVERSAL).iterdir()) == [step_name(10)]
    assert sorted(p.name for p in root.glob("step_*")) == [step_name(10), step_name(12)]


def test_loss_keeps_falling_across_world_size_changes(runs):
    for name in ("same", "down", "up"):
        ok(runs[name])
    same, (down,), up = (reports(runs["base"] / n) for n in ("same", "down", "up"))
    same = same[0]
    up = up[0]
    # The same weights give the same loss whether loaded directly or through the universal form.
    assert down["eval"]["6"] == same["eval"]["6"]
    assert up["eval"]["10"] == down["eval"]["10"]
    curve = [same["eval"]["6"], same["eval"]["8"], down["eval"]["10"], up["eval"]["12"]]
    assert curve == sorted(curve, reverse=True) and len(set(curve)) == 4, curve
