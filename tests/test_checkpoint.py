"""Checkpoints: atomic publish, a process killed while writing or while uploading, a flipped
byte, keep-N, safe state, and resume on another number of workers (2 -> 1 -> 2) with model and
Adam moments equal, on a local folder and on S3 (the session's moto server, reached through s3fs).

The multi-process tests run ``tests/test_checkpoint_worker.py`` under ``torchrun`` with 1 or 2 CPU
processes (gloo, real DeepSpeed ZeRO-2, a tiny ViT) against one checkpoint folder, then against a
bucket holding its copy; see ``runs``.
"""
from __future__ import annotations

import hashlib
import json
import random
import uuid

import fsspec
import numpy as np
import pytest
import torch

from pretrain import storage
from pretrain.checkpoint import (MANIFEST, MARKER, UNIVERSAL, Checkpointer, _check_safe, describe_resume, rng_state,
                                 set_rng_state, step_name)
from test_checkpoint_worker import assert_same_state, ok, reports, torchrun

OPTIM_1 = "zero_pp_rank_1_mp_rank_00_optim_states.pt"  # rank 1's optimizer shard in a 2-rank save


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


@pytest.fixture(params=["local", "s3"])
def ckpt_root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    return request.getfixturevalue("s3_bucket") + "/checkpoints"


def test_only_marked_checkpoints_count_and_unmarked_ones_are_pruned(ckpt_root):
    # Written through a client of its own, as other ranks and processes write the same prefix.
    fs, base = fsspec.core.url_to_fs(ckpt_root, skip_instance_cache=True)

    def put(rel: str) -> None:
        fs.makedirs(f"{base}/{rel.rsplit('/', 1)[0]}", exist_ok=True)
        fs.pipe_file(f"{base}/{rel}", b"x")

    for rel in (f"{step_name(2)}/{MARKER}", f"{step_name(4)}/mp_rank_00_model_states.pt",  # 4: cut off
                f"{step_name(6)}/{MARKER}", f"step_8/{MARKER}"):  # step_8: not our name pattern
        put(rel)
    ckpt = Checkpointer(ckpt_root, keep=2, rank=0, world_size=1)
    assert ckpt.complete_steps() == [2, 6]
    put(f"{step_name(10)}/{MARKER}")  # after the listing above: seen only if listings are not cached
    assert ckpt.complete_steps() == [2, 6, 10]
    ckpt._prune(10)
    assert storage.listdir(ckpt_root) == [step_name(6), step_name(10), "step_8"]
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(ckpt_root, keep=0, rank=0, world_size=1)
    assert describe_resume(None).startswith("no checkpoint")


# --------------------------------------------------------------------------- torchrun, 1 and 2 processes


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server):
    """Five runs (keep 2), each resuming what the one before left. On a local folder:

    kill:    2 ranks save steps 2, 4, 6; rank 1 is SIGKILLed halfway through writing step 8.
    same:    2 ranks resume and train to step 8.

    Then the folder is copied to a new bucket, a byte of the uploaded step 8 is flipped, and on
    ``s3://BUCKET/checkpoints``:

    down:    1 rank resumes (refusing step 8) and trains to step 10.
    up:      2 ranks resume the 1-rank checkpoint and train to step 12; rank 1 is SIGKILLed after
             uploading half of its files of step 12 (rank 0 is taken down with it).
    restart: 1 rank resumes (step 10: the cut-off 12 has no marker) and trains to step 12 again.
    """
    import s3fs

    base = tmp_path_factory.mktemp("ckpt")
    root = base / "checkpoints"
    bucket = f"vitscale-ckpt-{uuid.uuid4().hex[:12]}"
    s3 = s3fs.S3FileSystem(skip_instance_cache=True)
    s3.mkdir(bucket)
    url = f"s3://{bucket}/checkpoints"
    r = {"base": base, "root": root, "url": url}
    r["kill"] = torchrun(2, root, base / "kill", "--steps", "8", "--kill-at", "8")
    r["after_kill"] = {
        "dirs": sorted(p.name for p in root.iterdir()),
        "partial": sorted(str(p.relative_to(root / ".partial")) for p in (root / ".partial").rglob("*") if p.is_file()),
        "latest": (root / "latest").read_text(),
    }
    r["same"] = torchrun(2, root, base / "same", "--steps", "8")
    r["after_same"] = {"dirs": sorted(p.name for p in root.iterdir()), "latest": (root / "latest").read_text()}

    s3.put(str(root), f"{bucket}/checkpoints", recursive=True)
    bad = f"{url}/{step_name(8)}/{OPTIM_1}"
    if storage.exists(bad):
        data = bytearray(storage.read_bytes(bad))
        data[len(data) // 2] ^= 0x01
        storage.write_bytes(bad, bytes(data))
        r["bad_bytes"] = bytes(data)
    r["down"] = torchrun(1, url, base / "down", "--steps", "10")
    r["up"] = torchrun(2, url, base / "up", "--steps", "12", "--kill-upload-at", "12")
    r["cut"] = storage.listdir(f"{url}/{step_name(12)}")
    r["restart"] = torchrun(1, url, base / "restart", "--steps", "12")
    return r


def test_killed_while_writing_resumes_from_previous_complete(runs):
    base = runs["base"]
    assert runs["kill"].returncode != 0  # the SIGKILL took the job down
    # The half-written step 8 exists only under the staging name; keep=2 removed step 2.
    assert runs["after_kill"]["dirs"] == [".partial", "latest", step_name(4), step_name(6)]
    assert f"{step_name(8)}/{OPTIM_1}" in runs["after_kill"]["partial"]
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


def test_killed_while_uploading_resumes_from_previous_complete(runs):
    base, url = runs["base"], runs["url"]
    assert runs["up"].returncode != 0
    # Rank 1 uploaded the first of its two files and died: no manifest, no marker.
    assert "client_rank1.pt" in runs["cut"] and OPTIM_1 not in runs["cut"]
    assert MANIFEST not in runs["cut"] and MARKER not in runs["cut"]

    ok(runs["restart"])
    (rep,) = reports(base / "restart")
    # The cut-off step 12 was never a candidate (trying it would have refused it).
    assert rep["resumed"]["step"] == 10 and rep["resumed"]["rejected"] == []
    assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (1, 1)
    assert_same_state(torch.load(base / "down" / "saved_10.pt"), torch.load(base / "restart" / "resumed_10.pt"))
    # Saving step 12 again (on 1 rank) removed the cut-off one first: none of its 2-rank objects is
    # left beside the new files, and every object matches the new manifest.
    step = f"{url}/{step_name(12)}"
    meta = storage.read_json(f"{step}/{MANIFEST}")
    assert meta["world_size"] == 1
    assert storage.listdir(step) == sorted([*meta["files"], MANIFEST, MARKER])
    for rel, entry in meta["files"].items():
        assert hashlib.sha256(storage.read_bytes(f"{step}/{rel}")).hexdigest() == entry["sha256"], rel


def test_manifest_lists_every_file_and_client_state_loads_safely(runs):
    ok(runs["same"])
    step = runs["root"] / step_name(8)
    meta = json.loads((step / MANIFEST).read_text())
    assert meta["step"] == 8 and meta["world_size"] == 2
    assert set(meta["files"]) == {p.name for p in step.iterdir()} - {MANIFEST, MARKER}
    assert {"client_rank0.pt", "client_rank1.pt", "mp_rank_00_model_states.pt", OPTIM_1} <= set(meta["files"])
    client = torch.load(step / "client_rank1.pt", weights_only=True)
    assert client["loader"] == {"position": 8, "rank": 1} and client["world_size"] == 2


def test_flipped_byte_in_the_bucket_is_refused_and_previous_checkpoint_used(runs):
    base, url, down = runs["base"], runs["url"], runs["down"]
    ok(runs["same"])
    ok(down)
    bad_url = f"{url}/{step_name(8)}/{OPTIM_1}"
    assert f"refusing checkpoint {url}/{step_name(8)}" in down.stderr
    assert f"{bad_url}: sha256" in down.stderr and "does not match the manifest" in down.stderr
    (rep,) = reports(base / "down")
    assert rep["resumed"]["step"] == 6
    assert [x["step"] for x in rep["resumed"]["rejected"]] == [8]
    assert bad_url in rep["resumed"]["rejected"][0]["problems"][0]
    # The refused checkpoint is kept aside for inspection.
    assert storage.read_bytes(f"{url}/rejected/{step_name(8)}/{OPTIM_1}") == runs["bad_bytes"]


def test_two_workers_to_one_keeps_model_and_adam_moments(runs):
    base, down = runs["base"], runs["down"]
    ok(down)
    (rep,) = reports(base / "down")
    assert rep["resumed"]["universal"] is True
    assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (2, 1)
    assert f"converting {runs['url']}/{step_name(6)} to a universal checkpoint" in down.stderr
    assert_same_state(torch.load(base / "kill" / "saved_6.pt"), torch.load(base / "down" / "resumed_6.pt"))
    # Per-rank state cannot map 1:1: the loader gets old rank 0's (it starts fresh streams from it).
    assert rep["loader"] == {"position": 6, "rank": 0} and rep["rng_restored"] is False


def test_one_worker_to_two_keeps_model_and_adam_moments(runs):
    base, url = runs["base"], runs["url"]
    reps = reports(base / "up")  # written right after the resume (the run was killed later)
    assert len(reps) == 2
    for rep in reps:
        assert rep["resumed"]["step"] == 10 and rep["resumed"]["universal"] is True
        assert (rep["resumed"]["world_size_then"], rep["resumed"]["world_size_now"]) == (1, 2)
    assert f"converting {url}/{step_name(10)} to a universal checkpoint" in runs["up"].stderr
    assert_same_state(torch.load(base / "down" / "saved_10.pt"), torch.load(base / "up" / "resumed_10.pt"))
    assert [rep["loader"] for rep in reps] == [{"position": 10, "rank": 0}] * 2
    # The universal form is stored on the bucket, complete (rank 1 loaded it from there); keep=2:
    # the one of step 6 went when step 6 was pruned.
    ok(runs["restart"])
    assert storage.listdir(f"{url}/{UNIVERSAL}") == [step_name(10)]
    universal = f"{url}/{UNIVERSAL}/{step_name(10)}"
    meta = storage.read_json(f"{universal}/{MANIFEST}")
    assert meta["source"] == step_name(10) and any(rel.startswith("zero/") for rel in meta["files"])
    assert storage.exists(f"{universal}/{MARKER}")
    assert [n for n in storage.listdir(url) if n.startswith("step_")] == [step_name(10), step_name(12)]


def test_loss_keeps_falling_across_world_size_changes(runs):
    for name in ("same", "down", "restart"):
        ok(runs[name])
    (same, _), (down,), (up, _), (restart,) = (reports(runs["base"] / n) for n in ("same", "down", "up", "restart"))
    # The same weights give the same loss whether loaded directly or through the universal form.
    assert down["eval"]["6"] == same["eval"]["6"]
    assert up["eval"]["10"] == down["eval"]["10"] == restart["eval"]["10"]
    curve = [same["eval"]["6"], same["eval"]["8"], down["eval"]["10"], restart["eval"]["12"]]
    assert curve == sorted(curve, reverse=True) and len(set(curve)) == 4, curve
