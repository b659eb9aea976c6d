"""Downstream datasets: registry, splits that never overlap (by content), folders, shards, missing data."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from pretrain.downstream import REGISTRY, SPLITS, content_hash, dataset_spec, load_dataset
from pretrain.errors import InputError


def _hashes(ds) -> list[str]:
    return [content_hash(ds[i][0]) for i in range(len(ds))]


def _png(seed: int, size: int = 12) -> bytes:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (size, size, 3), dtype=torch.uint8, generator=g).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_digits_splits_are_disjoint_by_content_and_cover_the_data():
    splits = {s: load_dataset("digits", s, 16) for s in SPLITS}
    hashes = {s: _hashes(ds) for s, ds in splits.items()}
    for s, h in hashes.items():
        assert len(set(h)) == len(h), f"{s} holds duplicate images"
    assert not set(hashes["dev"]) & set(hashes["test"])
    assert not set(hashes["train"]) & set(hashes["dev"])
    assert not set(hashes["trainval"]) & set(hashes["test"])
    assert set(hashes["train"]) | set(hashes["dev"]) == set(hashes["trainval"])
    assert len(hashes["trainval"]) + len(hashes["test"]) == 1797  # every digit scikit-learn ships
    x, y = splits["test"][0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8 and 0 <= y < 10
    assert splits["train"].num_classes == 10
    again = load_dataset("digits", "dev", 16)
    assert again.indices == splits["dev"].indices  # fixed, whatever the run


def test_registry_carries_the_papers_protocol():
    assert REGISTRY["cifar10"].steps == REGISTRY["cifar100"].steps == 10000
    assert REGISTRY["pets"].steps == REGISTRY["flowers102"].steps == 500
    assert REGISTRY["cifar10"].dev_fraction == 0.02 and REGISTRY["pets"].dev_fraction == 0.1
    vtab = [s for s in REGISTRY.values() if s.train_size == 1000]
    assert {"dtd", "svhn", "eurosat"} <= {s.name for s in vtab}
    assert all(s.steps == 2500 and s.lr == 0.01 for s in vtab)


def test_image_folder_with_official_splits(tmp_path):
    for split, n in (("train", 20), ("test", 6)):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / c / f"{i}.png").write_bytes(_png(hash((split, c, i)) % 10**6))
    spec = dataset_spec(str(tmp_path))
    assert spec.num_classes == 2 and spec.test_fraction is None
    test = load_dataset(str(tmp_path), "test", 8)
    dev = load_dataset(str(tmp_path), "dev", 8)
    train = load_dataset(str(tmp_path), "train", 8)
    assert len(test) == 12 and len(dev) + len(train) == 40
    assert not set(_hashes(dev)) & set(_hashes(test))
    assert sorted(test[i][1] for i in range(len(test))) == [0] * 6 + [1] * 6
    aug = load_dataset(str(tmp_path), "train", 8, augment=True)
    assert aug[0][0].shape == (3, 8, 8)


def test_flat_class_folder_carves_a_test_split(tmp_path):
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(10):
            (tmp_path / f"c{c}" / f"{i}.png").write_bytes(_png(100 * c + i))
    test = load_dataset(str(tmp_path), "test", 8)
    trainval = load_dataset(str(tmp_path), "trainval", 8)
    assert len(test) == 6 and len(trainval) == 24
    assert not set(_hashes(test)) & set(_hashes(trainval))


def test_shard_directory(tmp_path):
    import webdataset as wds

    for split, n in (("train", 12), ("test", 4)):
        (tmp_path / split).mkdir()
        with wds.TarWriter(str(tmp_path / split / "000000.tar")) as sink:
            for i in range(n):
                sink.write({"__key__": f"000000_{i:06d}", "png": _png(1000 * len(split) + i), "cls": str(i % 3)})
    assert dataset_spec(str(tmp_path)).num_classes == 3  # no manifest: the largest label + 1
    (tmp_path / "manifest.json").write_text(json.dumps({"num_classes": 4, "label_names": ["a", "b", "c", "d"]}))
    assert dataset_spec(str(tmp_path)).num_classes == 4  # the shard stage's manifest knows unused classes
    test = load_dataset(str(tmp_path), "test", 8)
    assert len(test) == 4 and [test[i][1] for i in range(4)] == [0, 1, 2, 0]
    dev, test_h = load_dataset(str(tmp_path), "dev", 8), _hashes(test)
    assert len(dev) == 2 and not set(_hashes(dev)) & set(test_h)


def test_missing_dataset_folder_names_it(tmp_path):
    with pytest.raises(InputError, match=str(tmp_path / "cifar-10-batches-py")):
        dataset_spec("cifar10", str(tmp_path))
    with pytest.raises(InputError, match="transfer.data_root"):
        dataset_spec("pets", None)
    with pytest.raises(InputError, match="neither a known dataset"):
        dataset_spec("no-such-set", str(tmp_path))
    (tmp_path / "dtd").mkdir()  # present but empty: torchvision's own check fails, still named
    with pytest.raises(InputError, match=str(tmp_path / "dtd")):
        load_dataset("dtd", "train", 32, str(tmp_path))
