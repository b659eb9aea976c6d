"""The streaming WebDataset loader on real tar shards written with webdataset's TarWriter.

Every sample's label is its unique id, so coverage and exactly-once can be checked from labels alone.
"""
from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipelines.config import AugmentConfig
from pretrain import augment as augment_mod
from pretrain.augment import TrainTransform, _draft_factor, _open, seeded
from pretrain.data import make_eval_loader, make_train_loader, num_classes_of, resolve_shards
from pretrain.errors import InputError

SIZES = (7, 12, 5)  # three uneven shards, fewer than ranks x workers = 4
IMG = 16


def _jpeg(rng: np.random.Generator, w: int = 40, h: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_shards(root: Path, sizes=SIZES, layout: str = "vitscale", garbage_key: str | None = None) -> list[int]:
    """Shards {root}/00000N.tar + manifest.json; returns the labels written (label = unique sample id)."""
    root.mkdir(parents=True, exist_ok=True)
    rng, labels, shards, uid = np.random.default_rng(len(sizes)), [], [], 0
    for s, n in enumerate(sizes):
        name = f"{s:06d}.tar"
        with wds.TarWriter(str(root / name)) as tw:
            for i in range(n):
                key = f"{s:06d}_{i:06d}"
                jpg = b"\xff\xd8 not a jpeg at all" if key == garbage_key else _jpeg(rng)
                if layout == "vitscale":
                    tw.write({"__key__": key, "jpg": jpg, "cls": str(uid).encode(),
                              "json": json.dumps({"source": key, "label": f"c{uid}"}).encode()})
                else:  # img2dataset-style: jpg + json holding the label, no cls
                    tw.write({"__key__": key, "jpg": jpg, "json": json.dumps({"label": uid, "url": key}).encode()})
                if key != garbage_key:
                    labels.append(uid)
                uid += 1
        shards.append({"name": name, "samples": n, "bytes": (root / name).stat().st_size, "sha256": ""})
    manifest = {"shards": shards, "label_names": [f"c{i}" for i in range(uid)], "total": uid}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return labels


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[list[str], dict]:
    root = tmp_path_factory.mktemp("shards")
    _write_shards(root)
    return resolve_shards(str(root / "manifest.json"))


def _train(urls, rank=0, world_size=1, seed=0, num_workers=2, state=None, augment=None, **kw):
    return make_train_loader(urls, batch_size=4, rank=rank, world_size=world_size, seed=seed, img_size=IMG,
                             augment=augment or AugmentConfig(), shuffle_buffer=5, num_workers=num_workers,
                             state=state, **kw)


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def test_resolve_shards_manifest_dir_and_pattern(shards, tmp_path):
    urls, manifest = shards
    root = Path(urls[0]).parent
    assert num_classes_of(manifest) == sum(SIZES)
    assert resolve_shards(str(root)) == (urls, manifest)
    assert resolve_shards(f"{root}/{{000000..000002}}.tar") == (urls, None)
    with pytest.raises(InputError, match="000003.tar"):
        resolve_shards(f"{root}/{{000000..000003}}.tar")
    with pytest.raises(InputError, match="no such shard directory"):
        resolve_shards(str(tmp_path / "nowhere"))


def test_two_ranks_two_workers_equal_batches_and_full_coverage(shards):
    urls, _ = shards
    seen, per_rank = Counter(), []
    for rank in range(2):
        loader = _train(urls, rank=rank, world_size=2)
        batches = _take(loader, 30)
        per_rank.append(len(batches))
        for images, labels in batches:
            assert images.shape == (4, 3, IMG, IMG) and images.dtype == torch.float32
            assert labels.dtype == torch.long
            seen.update(labels.tolist())
        assert loader.state_dict()["batches"] == 30
        loader.close()
    assert per_rank == [30, 30]
    assert set(seen) == set(range(sum(SIZES)))


@pytest.mark.parametrize("with_sizes", [True, False])
def test_eval_sees_every_sample_exactly_once(shards, with_sizes):
    urls, manifest = shards
    sizes = [s["samples"] for s in manifest["shards"]] if with_sizes else None
    seen, samples, partial = Counter(), 0, False
    for rank in range(2):
        loader = make_eval_loader(urls, batch_size=4, rank=rank, world_size=2, img_size=IMG, num_workers=2,
                                  shard_sizes=sizes)
        for images, labels in loader:
            assert images.shape[1:] == (3, IMG, IMG) and 1 <= len(labels) <= 4
            partial |= len(labels) < 4
            seen.update(labels.tolist())
        samples += loader.counts()["samples"]
        if with_sizes:
            assert loader.num_samples == loader.counts()["samples"]
    assert seen == Counter(range(sum(SIZES)))
    assert samples == sum(SIZES) and partial


def test_same_seed_same_batches_other_rank_other_batches(shards):
    urls, _ = shards
    a = _take(_train(urls, rank=0, world_size=2), 6)
    b = _take(_train(urls, rank=0, world_size=2), 6)
    c = _take(_train(urls, rank=1, world_size=2), 6)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert not any(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    assert [x[1].tolist() for x in a] != [y[1].tolist() for y in c]


def test_resume_is_bitwise_exact(shards):
    urls, _ = shards
    augment = AugmentConfig(randaugment=(2, 9), mixup=0.8, cutmix=1.0)
    full = _take(_train(urls, augment=augment, num_classes=sum(SIZES)), 12)
    first = _train(urls, augment=augment, num_classes=sum(SIZES))
    _take(first, 7)
    state = json.loads(json.dumps(first.state_dict()))  # it goes into checkpoints: must survive JSON
    first.close()
    resumed = _take(_train(urls, augment=augment, num_classes=sum(SIZES), state=state), 5)
    for (x, y), (rx, ry) in zip(full[7:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert full[0][1].shape == (4, sum(SIZES)) and full[0][1].dtype == torch.float32  # soft targets
    assert torch.allclose(full[0][1].sum(1), torch.ones(4))


def test_resume_skips_without_decoding(shards):
    urls, _ = shards
    loader = _train(urls, num_workers=0)
    _take(loader, 7)
    resumed = _train(urls, num_workers=0, state=loader.state_dict())
    transform, decoded = resumed.dataset.transform, []
    real = transform.sample
    transform.sample = lambda data: decoded.append(1) or real(data)
    _, labels = next(resumed)
    _, expected = next(loader)
    assert torch.equal(labels, expected)
    assert len(decoded) == 4  # the 28 samples before it were skipped as raw bytes


def test_layout_change_starts_fresh_streams_with_a_warning(shards, caplog):
    urls, _ = shards
    loader = _train(urls, num_workers=1)
    _take(loader, 3)
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        moved = _train(urls, num_workers=2, state=loader.state_dict())
    assert "num_workers" in caplog.text
    assert len(_take(moved, 2)) == 2 and moved.counts()["samples"] == 3 * 4 + 2 * 4


def test_corrupt_image_and_truncated_shard_are_skipped_and_counted(tmp_path, caplog):
    good = _write_shards(tmp_path, sizes=(6, 8), garbage_key="000000_000002")
    tar = tmp_path / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # cut mid-shard
    urls, _ = resolve_shards(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        loader = make_eval_loader(urls, batch_size=4, rank=0, world_size=1, img_size=IMG, num_workers=0)
        seen = [label for _, labels in loader for label in labels.tolist()]
    counts = loader.counts()
    assert counts["skipped_corrupt"] == 1 and counts["bad_shards"] == 1
    assert counts["samples"] == len(seen) and 5 <= len(seen) < len(good)
    assert set(seen) <= set(good) and set(range(6)) - {2} <= set(seen)
    assert "000000_000002" in caplog.text and "000001.tar" in caplog.text
    train = _train(urls, num_workers=2)
    assert len(_take(train, 10)) == 10
    assert train.counts()["skipped_corrupt"] >= 1 and train.counts()["bad_shards"] >= 1


def test_other_tools_layout_json_label_and_missing_label_error(tmp_path):
    labels = _write_shards(tmp_path, sizes=(5, 4), layout="img2dataset")
    (tmp_path / "manifest.json").unlink()
    urls, manifest = resolve_shards(str(tmp_path))
    assert manifest is None and len(urls) == 2
    with pytest.raises(InputError, match="pretrain.num_classes"):
        num_classes_of(manifest)
    loader = make_eval_loader(urls, batch_size=3, rank=0, world_size=1, img_size=IMG, label_key="json:label")
    assert sorted(y for _, ys in loader for y in ys.tolist()) == labels
    assert len(_take(_train(urls, label_key="json:label"), 3)) == 3
    with pytest.raises(InputError, match=r"unlabelled samples in a row .* the wrong pretrain.label_key \('cls'\)"):
        _take(_train(urls, label_key="cls", num_workers=0), 1)  # each sample skipped, then a long run stops it
    with pytest.raises(InputError, match="json:FIELD"):
        _train(urls, label_key="label")


def test_large_jpeg_decoded_in_draft_mode_when_the_crop_allows():
    big = _open(_jpeg(np.random.default_rng(0), w=1024, h=768))
    assert _draft_factor(big, 1000, 700, 224, 224) == 2
    assert _draft_factor(big, 300, 300, 224, 224) == 1
    assert _draft_factor(big, 1000, 760, 64, 64) == 8
    transform = TrainTransform(AugmentConfig(crop_scale=(0.9, 1.0)), 64)
    assert transform.sample(_jpeg(np.random.default_rng(1), w=1024, h=768)).shape == (3, 64, 64)


def test_draft_decode_gives_the_same_crop_as_a_full_decode(monkeypatch):
    yy, xx = np.mgrid[0:768, 0:1024]  # smooth gradients: a misplaced box would shift the colours a lot
    pixels = np.stack([xx * 255 // 1023, yy * 255 // 767, (xx + yy) * 255 // 1790], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    transform = TrainTransform(AugmentConfig(crop_scale=(0.5, 1.0), flip=False), 64)  # crops >= 4x the output
    with seeded(7):
        drafted = transform.sample(buf.getvalue()).float()
    monkeypatch.setattr(augment_mod, "_draft_factor", lambda *args: 1)
    with seeded(7):
        full = transform.sample(buf.getvalue()).float()
    assert (drafted - full).abs().mean() < 2.0


def test_a_sample_without_label_or_with_a_non_integer_one_is_skipped_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(3)
    with wds.TarWriter(str(tmp_path / "000000.tar")) as tw:
        for i in range(8):
            sample = {"__key__": f"000000_{i:06d}", "jpg": _jpeg(rng), "cls": str(i % 2).encode()}
            if i == 2:
                del sample["cls"]
            if i == 5:
                sample["cls"] = b"seven"
            tw.write(sample)
    loader = make_eval_loader([str(tmp_path / "000000.tar")], batch_size=4, rank=0, world_size=1, img_size=IMG,
                              num_workers=0)  # in this process: its warnings reach caplog
    with caplog.at_level(logging.WARNING, logger="pretrain.data"):
        labels = [y for _, ys in loader for y in ys.tolist()]
    assert len(labels) == 6 and loader.counts()["skipped_bad_label"] == 2
    assert "000000_000002" in caplog.text and "'seven'" in caplog.text
    train = _train([str(tmp_path / "000000.tar")], num_workers=0)
    _take(train, 6)  # 24 samples: three passes over the shard
    assert train.counts()["skipped_bad_label"] >= 4 and train.counts()["samples"] == 24


def test_multi_label_samples_batch_as_multi_hot(tmp_path):
    rng = np.random.default_rng(4)
    lists = [[0, 3], [1], [2, 3, 4], [4]]
    with wds.TarWriter(str(tmp_path / "000000.tar")) as tw:
        for i, ids in enumerate(lists):
            tw.write({"__key__": f"000000_{i:06d}", "jpg": _jpeg(rng), "json": json.dumps({"labels": ids}).encode()})
    loader = make_eval_loader([str(tmp_path / "000000.tar")], batch_size=4, rank=0, world_size=1, img_size=IMG,
                              label_key="json:labels", multi_label=True, num_classes=5)
    (_, y), = list(loader)
    assert y.dtype == torch.float32 and y.shape == (4, 5)
    assert [torch.nonzero(row).flatten().tolist() for row in y] == lists
    train = _train([str(tmp_path / "000000.tar")], num_workers=0, label_key="json:labels", multi_label=True,
                   num_classes=5)
    images, targets = next(train)
    assert targets.shape == (4, 5) and all(torch.nonzero(row).flatten().tolist() in lists for row in targets)


def test_an_oversized_tar_member_is_skipped_unread(tmp_path, monkeypatch):
    from pretrain import data

    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 64 << 10)  # the cap, made small: the member itself is real
    rng = np.random.default_rng(5)
    with wds.TarWriter(str(tmp_path / "000000.tar")) as tw:
        for i in range(4):
            jpg = _jpeg(rng) if i != 1 else _jpeg(rng, w=1200, h=1200) + b"\0" * (80 << 10)
            tw.write({"__key__": f"000000_{i:06d}", "jpg": jpg, "cls": b"0"})
    loader = make_eval_loader([str(tmp_path / "000000.tar")], batch_size=8, rank=0, world_size=1, img_size=IMG,
                              num_workers=0)
    assert sum(len(ys) for _, ys in loader) == 3
    counts = loader.counts()
    assert counts["skipped_oversized"] == 1 and counts["skipped_corrupt"] == 1  # its sample has no image left


@pytest.mark.parametrize("shards_n", [8, 9, 3])  # more shards than the 4 streams, uneven, and fewer
def test_every_shard_is_read_once_per_epoch_across_all_ranks_and_workers(shards_n):
    from pretrain.data import _Draws, epoch_shards

    streams = 2 * 2  # 2 ranks x 2 loader workers
    for epoch in range(3):
        read = sorted(s for g in range(streams) for s in epoch_shards(shards_n, streams, g, epoch, seed=7))
        if shards_n >= streams:
            assert read == list(range(shards_n))  # exactly once
        else:
            assert set(read) == set(range(shards_n)) and len(read) == streams  # at least once
    assert epoch_shards(9, streams, 0, 0, seed=7) != epoch_shards(9, streams, 0, 1, seed=7)  # reshuffled per epoch
    draws = _Draws(shards_n, streams, 1, seed=7)  # a stream's draws walk its epochs, forever
    per_epoch = len(epoch_shards(shards_n, streams, 1, 0, seed=7))
    assert [draws(k) for k in range(3 * per_epoch)] == [s for e in range(3) for s in epoch_shards(shards_n, streams, 1, e, 7)]

