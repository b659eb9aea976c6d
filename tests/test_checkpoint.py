"""Checkpoints: atomic publish, a process killed while writing, a flipped byte, keep-N, safe state.

The multi-process tests run ``tests/test_checkpoint_worker.py`` under ``torchrun`` with 2 CPU
processes (gloo, real DeepSpeed ZeRO-2, a tiny ViT) against a checkpoint folder in tmp_path.
"""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from pretrain.checkpoint import (MANIFEST, MARKER, Checkpointer, _check_safe, describe_resume, rng_state,
                                 set_rng_state, step_name)
from test_checkpoint_worker import assert_same_state, ok, reports, torchrun


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


# --------------------------------------------------------------------------- torchrun, 2 processes


@pytest.fixture(scope="module")
def crashed_then_resumed(tmp_path_factory):
    """Run 1 saves steps 2, 4, 6 (keep 2) and rank 1 is SIGKILLed halfway through writing step 8;
    run 2 resumes and trains to step 8."""
    base = tmp_path_factory.mktemp("crash")
    root = base / "checkpoints"
    first = torchrun(2, root, base / "run1", "--steps", "8", "--every", "2", "--keep", "2", "--kill-at", "8")
    after_crash = {
        "dirs": sorted(p.name for p in root.iterdir()),
        "partial": sorted(str(p.relative_to(root / ".partial")) for p in (root / ".partial").rglob("*") if p.is_file()),
        "latest": (root / "latest").read_text(),
    }
    second = torchrun(2, root, base / "run2", "--steps", "8", "--every", "2", "--keep", "2")
    return dict(base=base, root=root, first=first, second=second, after_crash=after_crash)


def test_killed_while_writing_resumes_from_previous_complete(crashed_then_resumed):
    r = crashed_then_resumed
    root, base = r["root"], r["base"]
    assert r["first"].returncode != 0  # the SIGKILL took the job down
    # The half-written step 8 exists only under the staging name; keep=2 removed step 2.
    assert r["after_crash"]["dirs"] == [".partial", "latest", step_name(4), step_name(6)]
    assert "step_00000008/zero_pp_rank_1_mp_rank_00_optim_states.pt" in r["after_crash"]["partial"]
    assert r["after_crash"]["latest"] == step_name(6)

    ok(r["second"])
    for rank, rep in enumerate(reports(base / "run2")):
        assert rep["resumed"]["step"] == 6
        assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (2, 2)
        assert rep["resumed"]["rejected"] == []
        assert "loader" in rep["client_keys"] and "rng" in rep["client_keys"]
    assert_same_state(torch.load(base / "run1" / "saved_6.pt"), torch.load(base / "run2" / "resumed_6.pt"))
    assert sorted(p.name for p in root.iterdir()) == ["latest", step_name(6), step_name(8)]
    assert (root / "latest").read_text() == step_name(8)
    meta = json.loads((root / step_name(8) / MANIFEST).read_text())
    assert set(meta["files"]) == {p.name for p in (root / step_name(8)).iterdir()} - {MANIFEST, MARKER}
    assert {"client_rank0.pt", "client_rank1.pt", "mp_rank_00_model_states.pt"} <= set(meta["files"])
    # Our own per-rank state: the loader position of that rank, loadable without unpickling code.
    client = torch.load(root / step_name(8) / "client_rank1.pt", weights_only=True)
    assert client["loader"] == {"position": 8, "rank": 1} and client["world_size"] == 2


def test_flipped_byte_is_refused_and_previous_checkpoint_used(crashed_then_resumed, tmp_path):
    r = crashed_then_resumed
    ok(r["second"])
    root = tmp_path / "checkpoints"
    shutil.copytree(r["root"], root)
    bad = root / step_name(8) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad.write_bytes(bytes(data))

    third = torchrun(2, root, tmp_path / "run3", "--steps", "8", "--every", "2", "--keep", "2")
    ok(third)
    assert f"refusing checkpoint {root / step_name(8)}" in third.stderr
    assert f"{bad}: sha256" in third.stderr and "does not match the manifest" in third.stderr
    for rep in reports(tmp_path / "run3"):
        assert rep["resumed"]["step"] == 6
        assert rep["resumed"]["rejected"][0]["step"] == 8
        assert str(bad) in rep["resumed"]["rejected"][0]["problems"][0]
    # The refused checkpoint is kept aside for inspection; step 8 was trained and saved again.
    assert (root / "rejected" / step_name(8) / bad.name).read_bytes() == bytes(data)
    assert (root / step_name(8) / MARKER).exists()
    assert_same_state(torch.load(r["base"] / "run1" / "saved_6.pt"), torch.load(tmp_path / "run3" / "resumed_6.pt"))
    # Same data, same restored RNG: steps 7 and 8 redo exactly what run 2 computed.
    for before, again in zip(reports(r["base"] / "run2"), reports(tmp_path / "run3")):
        assert again["losses"] == before["losses"]
