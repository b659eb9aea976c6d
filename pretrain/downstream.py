"""Downstream datasets for transfer: a registry of the paper's benchmarks, plus folders, shards and digits.

Every dataset exposes the same four splits, as uint8 images (3, S, S) and int labels:

- ``trainval``: the whole training set used by the protocol (the official train split, or train + val
  where the benchmark has both; for VTAB-1k the 1,000-example subset);
- ``dev``: a fixed, seeded ``dev_fraction`` of ``trainval``, held out to pick the learning rate;
- ``train``: ``trainval`` minus ``dev``;
- ``test``: the official test split (or, where a dataset has none, a fixed seeded ``test_fraction``
  of all its examples that never enters ``trainval``).

The splits depend on a constant seed, never on the run's seed, so every LR of a grid sees the same dev
set. torchvision datasets load with ``download=False`` from ``transfer.data_root``; a missing folder
is an ``InputError`` naming it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch.utils.data import ConcatDataset, Dataset
from torchvision import datasets as tvd
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2

from pretrain.errors import InputError

SPLIT_SEED = 1234  # fixed: the dev and test carve-outs must not move between runs or LRs
SPLITS = ("train", "dev", "trainval", "test")
BIG_VISION_CROP = (0.05, 1.0)  # inception_crop's default area range, used by the paper's fine-tuning
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# (data_root, part) -> the official split as a Dataset of (PIL image or uint8 tensor, int label);
# part is "train" / "test", or "all" for datasets without an official test split.
Builder = Callable[[Path, str], Dataset]


@dataclass(frozen=True)
class DatasetSpec:
    """What the transfer protocol needs to know about one downstream dataset."""

    name: str
    num_classes: int
    steps: int  # the paper's fine-tuning steps
    dev_fraction: float  # of trainval, held out to pick the LR
    folder: Optional[str]  # what must exist under data_root (None: needs no data_root)
    build: Builder = field(repr=False)
    lr: Optional[float] = None  # a protocol that fixes the LR (VTAB: 0.01) instead of a grid
    train_size: Optional[int] = None  # VTAB-1k: 1,000 training examples
    test_fraction: Optional[float] = None  # datasets without an official test split
    flip: bool = True  # random horizontal flips while fine-tuning (not for digits, text, counts)
    crop_scale: Optional[tuple[float, float]] = BIG_VISION_CROP  # None: resize only
    in_memory: bool = False  # small enough that a loader needs no worker processes


# --------------------------------------------------------------------------- torchvision builders


def _concat(*parts: Dataset) -> Dataset:
    return ConcatDataset(parts) if len(parts) > 1 else parts[0]


def _cifar10(root: Path, part: str) -> Dataset:
    return tvd.CIFAR10(str(root), train=part == "train", download=False)


def _cifar100(root: Path, part: str) -> Dataset:
    return tvd.CIFAR100(str(root), train=part == "train", download=False)


def _pets(root: Path, part: str) -> Dataset:
    return tvd.OxfordIIITPet(str(root), split="trainval" if part == "train" else "test", download=False)


def _flowers(root: Path, part: str) -> Dataset:
    if part == "train":  # the paper trains on train + val (2,040 images) and tests on test
        return _concat(*(tvd.Flowers102(str(root), split=s, download=False) for s in ("train", "val")))
    return tvd.Flowers102(str(root), split="test", download=False)


def _dtd(root: Path, part: str) -> Dataset:
    if part == "train":
        return _concat(*(tvd.DTD(str(root), split=s, download=False) for s in ("train", "val")))
    return tvd.DTD(str(root), split="test", download=False)


def _svhn(root: Path, part: str) -> Dataset:
    return tvd.SVHN(str(root / "svhn"), split="train" if part == "train" else "test", download=False)


def _eurosat(root: Path, part: str) -> Dataset:
    return tvd.EuroSAT(str(root), download=False)


def _caltech101(root: Path, part: str) -> Dataset:
    return tvd.Caltech101(str(root), download=False)


def _sun397(root: Path, part: str) -> Dataset:
    return tvd.SUN397(str(root), download=False)


def _pcam(root: Path, part: str) -> Dataset:
    return tvd.PCAM(str(root), split="train" if part == "train" else "test", download=False)


def _clevr_count(root: Path, part: str) -> Dataset:
    # The labelled CLEVR splits are train and val; VTAB counts 3..10 objects as classes 0..7.
    return tvd.CLEVRClassification(str(root), split="train" if part == "train" else "val", download=False,
                                   target_transform=_minus_three)


def _minus_three(label: int) -> int:
    return label - 3


@functools.lru_cache(maxsize=1)
def _digits_data() -> "DigitsDataset":
    return DigitsDataset()


def _digits(root: Path, part: str) -> Dataset:  # noqa: ARG001 - bundled with scikit-learn; read-only, so shared
    return _digits_data()


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 real 8x8 handwritten digits as uint8 (3, 8, 8) images (grey repeated)."""

    def __init__(self):
        from sklearn.datasets import load_digits

        d = load_digits()
        pixels = torch.as_tensor(d.images).mul(255.0 / 16.0).round().to(torch.uint8)  # 0..16 -> 0..255
        self.images = pixels[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, 8, 8)
        self.labels = torch.as_tensor(d.target, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def _vtab(name: str, num_classes: int, folder: str, build: Builder, **kw) -> DatasetSpec:
    """A VTAB-1k task: 800 train + 200 dev examples, 2,500 steps at LR 0.01 (the paper's Appendix B.1.1)."""
    return DatasetSpec(name, num_classes, steps=2500, dev_fraction=0.2, folder=folder, build=build, lr=0.01,
                       train_size=1000, **kw)


# The paper's Table 2 datasets with its protocol (Appendix B.1.1), then the VTAB-1k tasks that
# torchvision can load, then digits (real data bundled with scikit-learn, for runs without downloads).
REGISTRY: dict[str, DatasetSpec] = {
    "cifar10": DatasetSpec("cifar10", 10, 10000, 0.02, "cifar-10-batches-py", _cifar10),
    "cifar100": DatasetSpec("cifar100", 100, 10000, 0.02, "cifar-100-python", _cifar100),
    "pets": DatasetSpec("pets", 37, 500, 0.1, "oxford-iiit-pet", _pets),
    "flowers102": DatasetSpec("flowers102", 102, 500, 0.1, "flowers-102", _flowers),
    "vtab_cifar100": _vtab("vtab_cifar100", 100, "cifar-100-python", _cifar100),
    "vtab_pets": _vtab("vtab_pets", 37, "oxford-iiit-pet", _pets),
    "vtab_flowers102": _vtab("vtab_flowers102", 102, "flowers-102", _flowers),
    "caltech101": _vtab("caltech101", 101, "caltech101", _caltech101, test_fraction=0.2),
    "dtd": _vtab("dtd", 47, "dtd", _dtd),
    "sun397": _vtab("sun397", 397, "SUN397", _sun397, test_fraction=0.2),
    "svhn": _vtab("svhn", 10, "svhn", _svhn, flip=False),
    "eurosat": _vtab("eurosat", 10, "eurosat", _eurosat, test_fraction=0.2),
    "pcam": _vtab("pcam", 2, "pcam", _pcam),
    "clevr_count": _vtab("clevr_count", 8, "clevr", _clevr_count, flip=False),
    "digits": DatasetSpec("digits", 10, 500, 0.1, None, _digits, test_fraction=0.2, flip=False,
                          crop_scale=None, in_memory=True),
}


# --------------------------------------------------------------------------- folders and shards


class FileImages(Dataset):
    """Image files (or encoded image bytes) with integer labels, decoded on access."""

    def __init__(self, items: Sequence[Path | bytes], labels: Sequence[int]):
        self.items, self.labels = list(items), [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        item = self.items[i]
        data = item if isinstance(item, bytes) else Path(item).read_bytes()
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB), self.labels[i]


def _class_folder(path: Path, classes: Optional[list[str]] = None) -> tuple[FileImages, list[str]]:
    classes = classes or sorted(p.name for p in path.iterdir() if p.is_dir())
    files, labels = [], []
    for label, name in enumerate(classes):
        for f in sorted((path / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                labels.append(label)
    return FileImages(files, labels), classes


def _folder_spec(path: Path) -> DatasetSpec:
    """``path/{train,test}/CLASS/*`` (official splits), or ``path/CLASS/*`` (a seeded 20 % test split)."""
    split = (path / "train").is_dir() and (path / "test").is_dir()
    classes = sorted(p.name for p in (path / "train" if split else path).iterdir() if p.is_dir())
    if not classes:
        raise InputError(f"{path}: no class subfolders (expected {path}/CLASS/IMAGE or {path}/train/CLASS/IMAGE)")

    def build(root: Path, part: str) -> Dataset:  # noqa: ARG001 - the path is the dataset
        return _class_folder(path / part if split else path, classes)[0]

    return DatasetSpec(path.name, len(classes), 500, 0.1, str(path), build,
                       test_fraction=None if split else 0.2)


@functools.lru_cache(maxsize=4)  # a job loads several splits of the same shards; read them once
def _read_shards(tars: tuple[str, ...]) -> FileImages:
    import webdataset as wds

    items, labels = [], []
    for sample in wds.WebDataset(list(tars), shardshuffle=False, empty_check=False):
        image = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if image is None or "cls" not in sample:
            raise InputError(f"{sample.get('__url__', tars[0])}: sample {sample['__key__']} lacks an image or .cls")
        items.append(bytes(image))
        labels.append(int(sample["cls"]))
    return FileImages(items, labels)


def _shard_spec(path: Path) -> DatasetSpec:
    """Shards of the shard stage (``*.tar`` with ``KEY.jpg`` + ``KEY.cls``), in ``path`` or ``path/{train,test}``."""
    split = any((path / "train").glob("*.tar")) and any((path / "test").glob("*.tar"))

    def build(root: Path, part: str) -> Dataset:  # noqa: ARG001 - the path is the dataset
        return _read_shards(tuple(sorted(str(t) for t in (path / part if split else path).glob("*.tar"))))

    num_classes = None
    manifest = path / "manifest.json"
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        names = meta.get("label_names")
        num_classes = meta.get("num_classes") or (len(names) if isinstance(names, list) and names else None)
    if num_classes is None:  # labels are 0..C-1: the largest one seen fixes C
        num_classes = 1 + max(max(build(path, p).labels, default=0) for p in (("train", "test") if split else ("all",)))
    return DatasetSpec(path.name, num_classes, 500, 0.1, str(path), build, test_fraction=None if split else 0.2)


# --------------------------------------------------------------------------- resolving and splitting


def dataset_spec(name: str, data_root: Optional[str] = None) -> DatasetSpec:
    """The spec of a registry name, an image-folder path or a shard directory; checks the data is there.

    Raises ``InputError`` naming the missing folder (or the unknown name) before anything heavy starts.
    """
    if name in REGISTRY:
        spec = REGISTRY[name]
        if spec.folder is not None:
            if not data_root:
                raise InputError(f"transfer.data_root: not set, and dataset {name!r} loads from "
                                 f"DATA_ROOT/{spec.folder} (torchvision's layout)")
            folder = Path(data_root).expanduser() / spec.folder
            if not folder.is_dir():
                raise InputError(f"dataset {name!r}: folder {folder} does not exist (transfer.data_root = "
                                 f"{data_root}; put torchvision's {spec.folder} there; nothing is downloaded)")
        return spec
    path = Path(name).expanduser()
    if path.is_dir():
        if any(path.glob("*.tar")) or any(path.glob("*/*.tar")):
            return _shard_spec(path)
        return _folder_spec(path)
    raise InputError(f"transfer.datasets: {name!r} is neither a known dataset ({', '.join(REGISTRY)}) "
                     f"nor an existing folder")


def _official(spec: DatasetSpec, data_root: Optional[str], part: str) -> Dataset:
    root = Path(data_root).expanduser() if data_root else Path(".")
    try:
        return spec.build(root, part)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted" (or h5py missing)
        raise InputError(f"dataset {spec.name!r}: cannot load from {root / (spec.folder or '')}: {e}") from None


def _permutation(n: int, salt: str) -> list[int]:
    g = torch.Generator().manual_seed(SPLIT_SEED + int(hashlib.sha256(salt.encode()).hexdigest()[:8], 16))
    return torch.randperm(n, generator=g).tolist()


def official_part(spec: DatasetSpec, split: str) -> str:
    """The official part a split is drawn from: ``all`` (no official test split), ``train`` or ``test``."""
    if split not in SPLITS:
        raise InputError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    if spec.test_fraction is not None:
        return "all"
    return "test" if split == "test" else "train"


def split_indices(spec: DatasetSpec, split: str, n: int) -> list[int]:
    """The indices of ``split`` within its official part (of ``n`` examples), sorted."""
    if spec.test_fraction is not None:  # carve test out of everything first, so it never enters trainval
        order = _permutation(n, f"{spec.name}/test")
        n_test = max(1, math.ceil(spec.test_fraction * n))
        if split == "test":
            return sorted(order[:n_test])
        pool = order[n_test:]
    elif split == "test":
        return list(range(n))
    else:
        pool = _permutation(n, f"{spec.name}/train")
    if spec.train_size is not None:
        pool = pool[: spec.train_size]
    n_dev = max(1, math.ceil(spec.dev_fraction * len(pool)))
    return sorted({"dev": pool[:n_dev], "train": pool[n_dev:], "trainval": pool}[split])


class SplitDataset(Dataset):
    """A subset of an official split, yielding ``(uint8 image (3, S, S), label)`` after ``transform``."""

    def __init__(self, base: Dataset, indices: list[int], transform: Callable, num_classes: int):
        self.base, self.indices, self.transform, self.num_classes = base, indices, transform, num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image, label = self.base[self.indices[i]]
        return self.transform(image), int(label)


def _to_rgb_uint8(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        image = v2.functional.pil_to_tensor(image.convert("RGB"))
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image


def image_transform(spec: DatasetSpec, img_size: int, augment: bool) -> Callable:
    """Eval: resize to (S, S). Train: big_vision's fine-tuning ``inception_crop(S)|flip_lr`` where the
    dataset allows it (a random-resized crop, then a horizontal flip)."""
    steps: list[Callable] = [_to_rgb_uint8]
    if augment and spec.crop_scale is not None:
        steps.append(v2.RandomResizedCrop(img_size, scale=spec.crop_scale, antialias=True))
    else:
        steps.append(v2.Resize((img_size, img_size), antialias=True))
    if augment and spec.flip:
        steps.append(v2.RandomHorizontalFlip())
    return v2.Compose(steps)


def load_dataset(name: str, split: str, img_size: int, data_root: Optional[str] = None,
                 augment: bool = False) -> SplitDataset:
    """One split (``train`` | ``dev`` | ``trainval`` | ``test``) of a downstream dataset at ``img_size``.

    Returns a Dataset of ``(uint8 tensor (3, img_size, img_size), int label)`` with ``num_classes``;
    ``augment`` applies the fine-tuning augmentation instead of a plain resize.
    """
    spec = dataset_spec(name, data_root)
    base = _official(spec, data_root, official_part(spec, split))
    indices = split_indices(spec, split, len(base))
    return SplitDataset(base, indices, image_transform(spec, img_size, augment), spec.num_classes)


def content_hash(image: torch.Tensor) -> str:
    """A digest of an image's pixels (to check that splits share no example)."""
    return hashlib.sha256(image.contiguous().numpy().tobytes()).hexdigest()
