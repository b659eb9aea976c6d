"""Data mixing at scale, shown small: a class-sorted folder (an ImageFolder tree) and a label-sorted CSV,
sharded with the cluster presets' shard size scaled down in proportion to the loader's shuffle buffer
(10,000 : 2,000), give training batches with as many distinct classes as i.i.d. sampling would, from
the first batch on; a rerun of the shard stage with the same seed writes the same bytes."""
from __future__ import annotations

import csv
import os

import pytest

from pipelines.config import AugmentConfig, load_config, replace
from pipelines.shard import run_shard_stage
from pretrain.data import make_train_loader, resolve_shards
from shard_inputs import jpeg

CLASSES, PER_CLASS = 20, 50
SHARD, BUFFER, BATCH = 250, 50, 32  # the presets' 10,000 : 2,000, scaled down
IID = CLASSES * (1 - (1 - 1 / CLASSES) ** BATCH)  # expected distinct classes in an i.i.d. batch: 16.1


@pytest.fixture(scope="module")
def sorted_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("sorted") / "images"
    for c in range(CLASSES):
        os.makedirs(root / f"class{c:02d}")
        for i in range(PER_CLASS):
            (root / f"class{c:02d}" / f"{i:03d}.jpg").write_bytes(jpeg(c * PER_CLASS + i, (20, 20), quality=50))
    return root


def _distinct_per_batch(shards: str, batches: int = 25) -> list[int]:
    urls, _ = resolve_shards(shards)
    loader = make_train_loader(urls, batch_size=BATCH, rank=0, world_size=1, seed=0, img_size=16,
                               augment=AugmentConfig(crop="center", flip=False), shuffle_buffer=BUFFER,
                               num_workers=0)
    return [len(set(labels.tolist())) for _, (_, labels) in zip(range(batches), loader)]


def _shard(tmp_path, source: str, out: str, **overrides) -> dict:
    cfg = replace(load_config(None), **{"workdir": str(tmp_path / "wd"), "shard.source": source,
                                        "shard.samples_per_shard": SHARD, "shard.image_size": 16,
                                        "shard.max_in_flight": 2, **overrides})
    return run_shard_stage(cfg, out_dir=out)


@pytest.mark.timeout(300)
def test_sorted_folder_and_sorted_csv_give_iid_like_batches(ray_local, tmp_path, sorted_folder):
    _shard(tmp_path, str(sorted_folder), str(tmp_path / "folder"))
    folder = _distinct_per_batch(str(tmp_path / "folder"))
    assert sum(folder) / len(folder) >= 0.9 * IID, (folder, IID)

    with open(tmp_path / "sorted.csv", "w", newline="") as f:
        rows = sorted((f"{sorted_folder}/class{c:02d}/{i:03d}.jpg", c) for c in range(CLASSES) for i in range(PER_CLASS))
        csv.writer(f).writerows([("path", "label"), *sorted(rows, key=lambda r: r[1])])
    _shard(tmp_path, str(tmp_path / "sorted.csv"), str(tmp_path / "csv"))
    table = _distinct_per_batch(str(tmp_path / "csv"))
    assert sum(table) / len(table) >= 0.9 * IID, (table, IID)

    # What the shuffle fixes: the same folder in index order gives a few classes per batch.
    _shard(tmp_path, str(sorted_folder), str(tmp_path / "ordered"), **{"shard.shuffle": False})
    ordered = _distinct_per_batch(str(tmp_path / "ordered"))
    assert sum(ordered) / len(ordered) < 0.5 * IID, ordered
    print(f"distinct classes per batch of {BATCH}: folder {sum(folder) / len(folder):.1f}, csv {sum(table) / len(table):.1f}, "
          f"unshuffled {sum(ordered) / len(ordered):.1f}, i.i.d. {IID:.1f}")


@pytest.mark.timeout(300)
def test_rerun_with_the_same_seed_is_byte_identical_and_another_seed_is_not(ray_local, tmp_path, sorted_folder):
    first = _shard(tmp_path, str(sorted_folder), str(tmp_path / "a"))
    again = _shard(tmp_path, str(sorted_folder), str(tmp_path / "b"))
    other = _shard(tmp_path, str(sorted_folder), str(tmp_path / "c"), seed=1)
    assert [s["sha256"] for s in first["shards"]] == [s["sha256"] for s in again["shards"]]
    assert [s["sha256"] for s in first["shards"]] != [s["sha256"] for s in other["shards"]]
    for name in ("000000.tar", "000003.tar"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def _samples(folder, names: list[str]) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset([str(folder / n) for n in names], shardshuffle=False))


@pytest.mark.timeout(300)
def test_held_out_samples_never_appear_in_training_shards(ray_local, tmp_path, sorted_folder):
    import hashlib

    manifest = _shard(tmp_path, str(sorted_folder), str(tmp_path / "out"), **{"shard.holdout": 0.2})
    held = _samples(tmp_path / "out", [s["name"] for s in manifest["holdout"]])
    train = _samples(tmp_path / "out", [s["name"] for s in manifest["shards"]])
    assert len(held) == 200 and len(train) == 800 and manifest["totals"]["ok"] == 1000
    assert not {s["__key__"] for s in held} & {s["__key__"] for s in train}
    digest = lambda s: hashlib.sha256(s["jpg"]).hexdigest()  # noqa: E731
    assert not {digest(s) for s in held} & {digest(s) for s in train}
    assert not {s["json"] for s in held} & {s["json"] for s in train}  # sources differ too
    assert len({s["cls"] for s in held}) == CLASSES  # a random sample of the index, not its first classes
    assert resolve_shards(str(tmp_path / "out"))[0] == [str(tmp_path / "out" / s["name"]) for s in manifest["shards"]]


@pytest.mark.timeout(300)
def test_multi_label_index_stores_label_lists(ray_local, tmp_path, sorted_folder):
    import json

    rows = [{"path": f"{sorted_folder}/class{c:02d}/000.jpg", "label": [f"tag{c}", f"tag{(c + 1) % 3}"]} for c in range(6)]
    rows.append({"path": f"{sorted_folder}/class07/000.jpg", "label": "tag2"})  # a lone label: a list of one
    (tmp_path / "multi.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = _shard(tmp_path, str(tmp_path / "multi.jsonl"), str(tmp_path / "out"))
    assert manifest["label_kind"] == "multi" and manifest["num_classes"] == 6
    names = manifest["label_names"]
    samples = _samples(tmp_path / "out", [s["name"] for s in manifest["shards"]])
    assert len(samples) == 7 and not any("cls" in s for s in samples)
    got = {json.loads(s["json"])["source"]: json.loads(s["json"])["labels"] for s in samples}
    for row in rows:
        tags = row["label"] if isinstance(row["label"], list) else [row["label"]]
        assert got[row["path"]] == sorted(names.index(t) for t in set(tags))
