"""The streaming WebDataset loader: infinite, deterministic, exactly resumable training streams and an
exactly-once evaluation pass.

One training stream per (rank, loader worker), read top to bottom:

    shard draws    per epoch one seeded permutation of all shards, split across every stream of every rank:
                   each shard read exactly once per epoch (at least once with fewer shards than streams)
    raw samples    tar members grouped by key (``group_by_keys``; a member over 32 MiB skipped unread); bytes only
    shuffle        a shuffle buffer refilled one whole window of ``shuffle_buffer`` raw samples at a time and
                   emitted in an order seeded by (seed, rank, worker, window)
    label          ``cls``, ``txt`` or ``json:FIELD`` (``json:labels``: a multi-label list, batched multi-hot);
                   a sample without one, or not a class id, is skipped and counted (``skipped_bad_label``)
    decode/augment ``pretrain.augment.TrainTransform``, torch's generator seeded by (seed, rank, worker, batch)
    batch          normalize (+ mixup/cutmix) -> (float [B, 3, S, S], long [B] or float [B, C] soft/multi-hot)

Why a windowed shuffle buffer instead of webdataset's sliding one: a sliding buffer's contents depend on the
whole history of the stream, so an exact resume would have to replay every sample read so far. Here the
position of a stream is (shard draw and raw index where the current window starts, window number, samples of
it taken, batches): resuming re-reads at most one shard prefix and one window of raw bytes and decodes nothing
it skips. The stream is infinite, so every rank yields as many batches as the caller asks for, whatever the
number of shards (even fewer than ranks x workers): the caller counts steps.

Shards on object storage are streamed (``pretrain.object_stream.open_stream``): read as the tar is consumed, the
next shard's first request sent while the current one is read, and after a transient error (connection reset,
timeout, 5xx, throttling) resumed at the byte where the read broke, a bounded number of times per shard; each
retry is logged and counted (``read_retries``). The bytes seen are those of an unbroken read, so batches and
exact resume do not depend on the faults.

Corrupt data never stops a run: an undecodable or missing image is skipped (``skipped_corrupt``), a tar that
cannot be opened or read to its end (truncated, bad member header, retries spent) ends that shard
(``bad_shards``); both are logged as warnings and counted (``TrainLoader.counts()``). Only data with no
decodable, labelled image for a long run raises, since that is a wrong path, format or label key, not a
bad sample.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import posixpath
import random
import re
import tarfile
from collections import Counter
from itertools import islice
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys

from pretrain import storage
from pretrain.augment import EVAL_CROP_RATIO, CorruptImage, EvalTransform, TrainTransform, seeded
from pretrain.config import AugmentConfig, check_label_key
from pretrain.errors import InputError
from pretrain.object_stream import open_stream
from pretrain.shard_format import FORMAT, MANIFEST, STAGE_MARKER

log = logging.getLogger(__name__)

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
MAX_MEMBER_BYTES = 32 << 20  # a tar member larger than this is not one of our samples (a 256-px JPEG is ~50 KB)
SKIP_META = r"__[^/]*__($|/)"  # webdataset's: members such as __META__ are not samples
MAX_CORRUPT_RUN = 1000  # this many undecodable samples in a row is a wrong path or format, not bad luck
STATE_VERSION = 1


# --------------------------------------------------------------------------- shard lists


def _read_manifest(path: str) -> tuple[list[str], dict]:
    try:
        manifest = storage.read_json(path)
    except FileNotFoundError:
        raise InputError(f"{path}: manifest not found") from None
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON: {e}") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    if shards is not None and manifest.get("format", FORMAT) != FORMAT:  # other tools' manifests carry none
        raise InputError(f"{path}: format {manifest['format']!r}, this loader reads {FORMAT!r}")
    if not shards or not all(isinstance(s, dict) and "name" in s for s in shards):
        raise InputError(f"{path}: needs a non-empty 'shards' list of {{name, samples, ...}}")
    base = storage.parent(path)
    return [storage.join(base, s["name"]) for s in shards], manifest


def resolve_shards(location: str) -> tuple[list[str], Optional[dict]]:
    """A manifest.json path, a shard directory or a brace pattern -> (shard urls, manifest or None).

    A directory with a ``manifest.json`` uses it; one the shard stage has not finished is refused; any
    other lists its ``*.tar`` files. Patterns such as
    ``dir/{000000..000009}.tar`` or ``s3://bucket/{000000..041455}.tar`` are expanded as webdataset does.
    Local paths are checked here, so a typo fails before any worker starts.
    """
    location = str(location)
    if location.endswith(".json"):
        urls, manifest = _read_manifest(location)
    elif "{" in location or location.endswith((".tar", ".tar.gz", ".tgz")) or location.startswith("pipe:"):
        urls, manifest = expand_urls(location), None
    else:
        fs, root = storage.filesystem(location)
        if storage.exists(storage.join(location, MANIFEST)):
            urls, manifest = _read_manifest(storage.join(location, MANIFEST))
        elif storage.exists(storage.join(location, STAGE_MARKER)):
            raise InputError(f"{location}: the shard stage has not finished here (no {MANIFEST} yet), so its shards "
                             "are incomplete; run `vitscale shard` again to finish them")
        elif fs.isdir(root):
            urls, manifest = [storage.join(location, n) for n in storage.listdir(location) if n.endswith(".tar")], None
        else:
            raise InputError(f"{location}: no such shard directory, manifest or pattern")
    if not urls:
        raise InputError(f"{location}: no shards found")
    missing = [u for u in urls if not storage.is_remote(u) and not u.startswith("pipe:")
               and not os.path.isfile(storage.local_path(u))]
    if missing:
        raise InputError(f"{location}: {len(missing)} shard(s) missing, first {missing[0]}")
    return urls, manifest


def num_classes_of(manifest: Optional[dict]) -> int:
    """The number of classes a manifest declares (its ``label_names``, or ``num_classes``).

    ``None`` (shards given by a pattern, without a manifest) is an InputError asking for the count."""
    if manifest is None:
        raise InputError("the shards have no manifest.json to count classes from; set pretrain.num_classes")
    if manifest.get("label_names"):
        return len(manifest["label_names"])
    if manifest.get("num_classes"):
        return int(manifest["num_classes"])
    raise InputError("manifest.json: has neither 'label_names' nor 'num_classes'; set pretrain.num_classes")


# --------------------------------------------------------------------------- raw samples


def open_url(url: str, counts: Counter) -> IO[bytes]:
    """A local path or ``file://`` (plain ``open``), ``pipe:CMD`` (webdataset's handler) or any fsspec URL
    (s3://, gs://, ...: streamed and resumed after transient errors, each retry counted in ``read_retries``)."""
    if url.startswith("pipe:"):
        return gopen(url, "rb")

    def retried(_: BaseException) -> None:
        counts["read_retries"] += 1

    return open_stream(url, on_retry=retried)


def read_shard(url: str, counts: Counter, stream: Optional[IO[bytes]] = None) -> Iterator[dict]:
    """Raw samples of one tar (``{"__key__", "jpg": bytes, ...}``), nothing decoded. A tar that cannot be
    opened or read to its end is cut there with a warning and counted in ``counts["bad_shards"]``.
    ``stream``: the shard opened already (``opened_ahead``), else it is opened here."""
    try:
        with stream if stream is not None else open_url(url, counts) as f:
            yield from group_by_keys(_tar_members(f, url, counts))
    except Exception as e:  # noqa: BLE001 - tarfile, gzip, zlib and fsspec each raise their own types
        counts["bad_shards"] += 1
        log.warning("shard %s: read error, rest of the shard skipped (%s: %s)", url, type(e).__name__, e)


def _tar_members(stream: IO[bytes], url: str, counts: Counter) -> Iterator[dict]:
    """webdataset's ``tar_file_iterator``, but a member over ``MAX_MEMBER_BYTES`` is skipped unread
    (counted in ``skipped_oversized``): a 400 MiB member must not be read whole into memory."""
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isreg() or re.match(SKIP_META, info.name):
                continue
            if info.size > MAX_MEMBER_BYTES:
                counts["skipped_oversized"] += 1
                log.warning("shard %s: member %s of %d MiB skipped (over %d MiB)", url, info.name,
                            info.size >> 20, MAX_MEMBER_BYTES >> 20)
                continue
            yield {"fname": info.name, "data": tar.extractfile(info).read(), "__url__": url}
            tar.members = []  # streaming: keep no index of what was read


def opened_ahead(urls: Iterable[str], counts: Counter) -> Iterator[tuple[str, Optional[IO[bytes]]]]:
    """(url, stream) for each url in turn, the next shard on object storage opened while the caller
    reads this one: its first request then waits on the store (tens of ms on S3, per shard) in the
    background. A local shard is opened when read (stream None): a plain open costs nothing."""
    ahead = ((url, open_url(url, counts) if storage.is_remote(url) else None) for url in urls)
    upcoming = next(ahead, None)
    try:
        while upcoming is not None:
            current, upcoming = upcoming, next(ahead, None)
            yield current
    finally:
        if upcoming is not None and upcoming[1] is not None:
            upcoming[1].close()


class BadLabel(ValueError):
    """A sample whose label is missing or not a class id: skipped and counted, like a corrupt image."""


class LabelReader:
    """Where a sample's label is (``cls``, ``txt`` or ``json:FIELD``) and what it is: one class id, or
    with ``multi`` a list of them (``json:labels`` of a multi-label index) that batches as multi-hot
    float [B, num_classes]."""

    def __init__(self, key: str, multi: bool = False, num_classes: Optional[int] = None):
        check_label_key(key)
        if multi and not num_classes:
            raise InputError("multi-label targets need num_classes (they are multi-hot [B, num_classes])")
        self.key, self.multi, self.num_classes = key, multi, num_classes

    def of(self, sample: dict) -> "int | list[int]":
        where = f"{sample.get('__url__')}: sample {sample.get('__key__')!r}"
        value = self._raw(sample)
        if value is None:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise BadLabel(f"{where} has no label under label_key {self.key!r} (its members: {', '.join(members)})")
        if not self.multi:
            return self._class_id(value, where)
        ids = [self._class_id(v, where) for v in (value if isinstance(value, list) else [value])]
        if not ids or max(ids) >= self.num_classes:
            raise BadLabel(f"{where}: labels {ids} under label_key {self.key!r} are not ids below {self.num_classes}")
        return ids

    def targets(self, labels: list) -> torch.Tensor:
        """long [B] class ids, or float [B, num_classes] multi-hot."""
        if not self.multi:
            return torch.tensor(labels)
        out = torch.zeros(len(labels), self.num_classes)
        for i, ids in enumerate(labels):
            out[i, ids] = 1.0
        return out

    def _raw(self, sample: dict) -> Any:
        if self.key.startswith("json:"):
            try:
                return json.loads(sample["json"]).get(self.key[5:]) if "json" in sample else None
            except (json.JSONDecodeError, AttributeError):
                return None
        raw = sample.get(self.key)
        return raw.decode("utf-8", "replace").strip() if raw is not None else None

    def _class_id(self, value: Any, where: str) -> int:
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if int(value) < 0:
                raise ValueError
            return int(value)
        except (TypeError, ValueError):
            raise BadLabel(f"{where}: label {value!r} under label_key {self.key!r} is not a class id") from None


def _decode(sample: dict, transform: "TrainTransform | EvalTransform", labels: LabelReader, counts: Counter) -> Optional[tuple[torch.Tensor, Any]]:
    """(uint8 image, label), or None for a sample skipped as corrupt or unlabelled (warned and counted)."""
    try:
        label = labels.of(sample)
    except BadLabel as e:
        counts["skipped_bad_label"] += 1
        log.warning("sample skipped: %s", e)
        return None
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    try:
        if data is None:
            raise CorruptImage(f"no image member ({', '.join(IMAGE_KEYS)})")
        return transform.sample(data), label
    except CorruptImage as e:
        counts["skipped_corrupt"] += 1
        log.warning("%s: sample %r skipped: %s", sample.get("__url__"), sample.get("__key__"), e)
        return None


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from any tuple of ints and strings (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little") >> 1


# --------------------------------------------------------------------------- one training stream


def epoch_shards(n: int, streams: int, g: int, epoch: int, seed: int) -> list[int]:
    """The shards stream ``g`` of ``streams`` (all ranks' workers together) reads in ``epoch``: its share
    of one seeded permutation of all ``n`` shards, so each shard is read exactly once per epoch; with
    fewer shards than streams, each stream reads one and every shard at least once."""
    order = list(range(n))
    random.Random(_seed(seed, "shards", epoch)).shuffle(order)
    return order[g::streams] if n >= streams else [order[g % n]]


class _Draws:
    """Shard indices of one stream, epoch after epoch (``epoch_shards``); draw ``k`` is deterministic,
    which is what a resume position records."""

    def __init__(self, n: int, streams: int, g: int, seed: int):
        self.n, self.streams, self.g, self.seed = n, streams, g, seed
        self.per_epoch = len(epoch_shards(n, streams, g, 0, seed))  # the same every epoch
        self.epoch, self.order = -1, []

    def __call__(self, k: int) -> int:
        epoch, i = divmod(k, self.per_epoch)
        if epoch != self.epoch:
            self.epoch, self.order = epoch, epoch_shards(self.n, self.streams, self.g, epoch, self.seed)
        return self.order[i]


def _raw_stream(urls: Sequence[str], draws: _Draws, draw: int, skip: int, counts: Counter) -> Iterator[tuple]:
    """(draw, raw index in its shard, sample) forever, from raw sample ``skip`` of draw ``draw`` on."""
    empty = 0
    shards = opened_ahead((urls[draws(k)] for k in itertools.count(draw)), counts)
    for k, (url, stream) in zip(itertools.count(draw), shards):
        n = 0
        for i, sample in enumerate(read_shard(url, counts, stream)):
            n += 1
            if k == draw and i < skip:
                continue  # resume: skipped as raw bytes, never decoded
            yield k, i, sample
        empty = 0 if n else empty + 1
        if empty > max(20, 3 * len(urls)):
            raise InputError(f"no samples could be read from {empty} shard draws in a row (last: {url})")


class _Window:
    """The shuffle buffer of one stream, refilled a whole window at a time (see the module docstring)."""

    def __init__(self, raw_from: Callable[..., Iterator[tuple]], pos: dict, size: int, seed_parts: tuple):
        self.size, self.seed_parts = size, seed_parts
        self.start, self.index, self.taken = (pos["draw"], pos["skip"]), pos["window"], pos["taken"]
        self._raw = raw_from(*self.start)
        self._fill()

    def _fill(self) -> None:
        entries = list(islice(self._raw, self.size))
        self._next_start = (entries[-1][0], entries[-1][1] + 1)
        order = list(range(len(entries)))
        random.Random(_seed(*self.seed_parts, self.index)).shuffle(order)
        self._items = [entries[j][2] for j in order]

    def next(self) -> dict:
        if self.taken == len(self._items):
            self.start, self.index, self.taken = self._next_start, self.index + 1, 0
            self._fill()
        item, self._items[self.taken] = self._items[self.taken], None  # free the bytes as they go
        self.taken += 1
        return item

    def position(self) -> dict:
        if self.taken == len(self._items):
            return {"draw": self._next_start[0], "skip": self._next_start[1], "window": self.index + 1, "taken": 0}
        return {"draw": self.start[0], "skip": self.start[1], "window": self.index, "taken": self.taken}


def _fresh_position() -> dict:
    return {"draw": 0, "skip": 0, "window": 0, "taken": 0, "batches": 0, "counts": {}}


class _TrainStreams(IterableDataset):
    """The ``num_streams`` training streams of one rank; DataLoader worker j runs stream (j + rotation) % n."""

    def __init__(self, urls: list[str], positions: list[dict], rotation: int, *, seed: int, rank: int,
                 world_size: int, batch_size: int, shuffle_buffer: int, labels: LabelReader,
                 transform: TrainTransform):
        super().__init__()
        self.urls, self.positions, self.rotation = urls, positions, rotation
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.window_size, self.labels, self.transform = max(1, shuffle_buffer), labels, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        return self.stream(((info.id if info else 0) + self.rotation) % len(self.positions))

    def stream(self, w: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """Batches of stream ``w`` from its saved position, each with the position after it."""
        pos, counts = self.positions[w], Counter(self.positions[w]["counts"])
        streams = len(self.positions)
        draws = _Draws(len(self.urls), self.world_size * streams, self.rank * streams + w, self.seed)
        window = _Window(lambda draw, skip: _raw_stream(self.urls, draws, draw, skip, counts), pos,
                         self.window_size, (self.seed, "window", self.rank, w))
        batches = pos["batches"]
        while True:
            with seeded(_seed(self.seed, "augment", self.rank, w, batches)):
                images, labels = self._batch(window, counts)
            batches += 1
            yield images, labels, {"stream": w, "pos": {**window.position(), "batches": batches,
                                                        "counts": dict(counts)}}

    def _batch(self, window: _Window, counts: Counter) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels, bad = [], [], 0
        while len(images) < self.batch_size:
            item = _decode(window.next(), self.transform, self.labels, counts)
            if item is None:
                bad += 1
                if bad >= MAX_CORRUPT_RUN:
                    raise InputError(f"{bad} undecodable or unlabelled samples in a row in {self.urls[0]} ...: not "
                                     f"image shards, or the wrong pretrain.label_key ({self.labels.key!r})?")
                continue
            bad = 0
            images.append(item[0])
            labels.append(item[1])
        counts["samples"] += len(images)
        return self.transform.batch(images, self.labels.targets(labels))


# --------------------------------------------------------------------------- loaders


def _sum_counts(dicts: Sequence[dict]) -> dict:
    total: Counter = Counter({"samples": 0, "skipped_corrupt": 0, "skipped_bad_label": 0, "skipped_oversized": 0,
                              "bad_shards": 0, "read_retries": 0})
    for d in dicts:
        total.update(d)
    return dict(total)


def _shards_id(urls: Sequence[str]) -> str:
    return hashlib.blake2b("\n".join(posixpath.basename(u) for u in urls).encode(), digest_size=8).hexdigest()


class TrainLoader:
    """Infinite iterator of (images float [B, 3, S, S], labels) for one rank.

    Labels are long [B] class ids, or float [B, num_classes] soft targets when mixup/cutmix is on.
    Batches come from the rank's streams in a fixed round robin; ``state_dict()`` records each stream's
    position after the last batch *returned* (prefetched batches are not counted), so a loader built with
    ``state=`` returns exactly the batches an uninterrupted one would have returned next.
    """

    def __init__(self, dataset: _TrainStreams, identity: dict, batches: int, carried: dict, loader_kwargs: dict):
        self.dataset, self.identity, self.batches, self.carried = dataset, identity, batches, carried
        self.positions = [dict(p) for p in dataset.positions]
        self._loader_kwargs, self._it = loader_kwargs, None

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._it is None:
            self._it = iter(DataLoader(self.dataset, batch_size=None, **self._loader_kwargs))
        images, labels, meta = next(self._it)
        self.positions[meta["stream"]] = meta["pos"]
        self.batches += 1
        return images, labels

    def state_dict(self) -> dict:
        """Small and JSON-able: the stream identity plus, per stream, its position, batch count and counts."""
        return {"version": STATE_VERSION, **self.identity, "batches": self.batches, "carried": self.carried,
                "streams": [dict(p) for p in self.positions]}

    def counts(self) -> dict:
        """Cumulative ``samples``, ``skipped_corrupt``, ``bad_shards`` and ``read_retries`` of this rank's
        streams (for metrics)."""
        return _sum_counts([self.carried] + [p["counts"] for p in self.positions])

    def close(self) -> None:
        """Stop the loader workers now (they also stop when the loader is garbage collected)."""
        self._it = None


def make_train_loader(urls: Sequence[str], *, batch_size: int, rank: int, world_size: int, seed: int,
                      img_size: int, augment: AugmentConfig, label_key: str = "cls", shuffle_buffer: int = 1000,
                      num_workers: int = 2, state: Optional[dict] = None, num_classes: Optional[int] = None,
                      pin_memory: bool = False, multi_label: bool = False) -> TrainLoader:
    """The training loader of one rank: ``max(1, num_workers)`` independent infinite streams.

    ``augment`` is duck-typed like ``pipelines.config.AugmentConfig`` (crop, flip, crop_scale, randaugment,
    mixup, cutmix, mean, std); mixup/cutmix need ``num_classes``. ``multi_label``: labels are lists of ids
    (``label_key: json:labels`` of a multi-label index), batched as multi-hot float [B, num_classes]. ``state`` is a ``state_dict()`` of an
    earlier loader: with the same seed, rank, world size, workers, batch size, buffer and shards it continues
    exactly; otherwise (e.g. a world-size change) it starts fresh streams seeded by the batches already
    taken, so the restarted run does not replay the data order it has seen, and says so in a warning.
    """
    urls = list(urls)
    if not urls:
        raise InputError("make_train_loader: no shard urls")
    if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
        raise InputError(f"make_train_loader: bad rank/world_size/batch_size/num_workers "
                         f"{rank}/{world_size}/{batch_size}/{num_workers}")
    labels = LabelReader(label_key, multi_label, num_classes)
    if multi_label and (augment.mixup > 0 or augment.cutmix > 0):
        raise InputError("pretrain.augment.mixup / cutmix: not with multi-label targets")
    streams = max(1, num_workers)
    identity = {"seed": seed, "rank": rank, "world_size": world_size, "num_workers": streams,
                "batch_size": batch_size, "shuffle_buffer": shuffle_buffer, "shards": _shards_id(urls)}
    stream_seed, positions, batches, carried = seed, [_fresh_position() for _ in range(streams)], 0, {}
    if state is not None:
        if state.get("version") != STATE_VERSION:
            raise InputError(f"loader state: version {state.get('version')!r}, expected {STATE_VERSION}")
        changed = [k for k, v in identity.items() if state.get(k) != v]
        if not changed:
            stream_seed, positions, batches = state["stream_seed"], state["streams"], state["batches"]
            carried = dict(state.get("carried", {}))
        else:
            carried = _sum_counts([state.get("carried", {})] + [p["counts"] for p in state["streams"]])
            stream_seed = _seed(seed, "restart", state.get("stream_seed"), state.get("batches"))
            log.warning("loader state for another layout (%s changed): fresh streams, not an exact resume",
                        ", ".join(changed))
    identity["stream_seed"] = stream_seed
    dataset = _TrainStreams(urls, positions, batches % streams, seed=stream_seed, rank=rank, world_size=world_size,
                            batch_size=batch_size, shuffle_buffer=shuffle_buffer, labels=labels,
                            transform=TrainTransform(augment, img_size, num_classes))
    kwargs = {"num_workers": num_workers, "pin_memory": pin_memory}
    if num_workers:
        kwargs["prefetch_factor"] = 2
    return TrainLoader(dataset, identity, batches, carried, kwargs)


# --------------------------------------------------------------------------- evaluation


def _eval_plan(n_urls: int, sizes: Optional[Sequence[int]], g: int, n_streams: int) -> list[tuple]:
    """What stream ``g`` of ``n_streams`` reads: (shard index, first, stop, modulo).

    With the shard sizes known (manifest) every stream takes one contiguous slice of the global sample order,
    so it opens only the shards it needs. Without them every stream reads every shard and keeps the samples
    with (shard index + raw index) % n_streams == g. Either way each sample goes to exactly one stream.
    """
    if sizes is None:
        return [(j, 0, None, (g - j) % n_streams) for j in range(n_urls)]
    total = sum(sizes)
    lo, hi = g * total // n_streams, (g + 1) * total // n_streams
    plan, offset = [], 0
    for j, n in enumerate(sizes):
        first, stop = max(lo - offset, 0), min(hi - offset, n)
        if first < stop:
            plan.append((j, first, stop, None))
        offset += n
    return plan


class _EvalStreams(IterableDataset):
    """The evaluation streams of one rank: DataLoader worker j reads stream rank * workers + j, once."""

    def __init__(self, urls: list[str], sizes: Optional[Sequence[int]], *, rank: int, world_size: int,
                 streams: int, batch_size: int, labels: LabelReader, transform: EvalTransform):
        super().__init__()
        self.urls, self.sizes, self.rank, self.world_size, self.streams = urls, sizes, rank, world_size, streams
        self.batch_size, self.labels, self.transform = batch_size, labels, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        info = get_worker_info()
        g = self.rank * self.streams + (info.id if info else 0)
        counts: Counter = Counter()
        images, labels = [], []
        plan = _eval_plan(len(self.urls), self.sizes, g, self.world_size * self.streams)
        shards = opened_ahead((self.urls[j] for j, *_ in plan), counts)
        for (_, first, stop, modulo), (url, stream) in zip(plan, shards):
            for i, sample in enumerate(read_shard(url, counts, stream)):
                if stop is not None and i >= stop:
                    break
                if i < first or (modulo is not None and i % (self.world_size * self.streams) != modulo):
                    continue  # another stream's sample: skipped as raw bytes
                item = _decode(sample, self.transform, self.labels, counts)
                if item is None:
                    continue
                images.append(item[0])
                labels.append(item[1])
                if len(images) == self.batch_size:
                    yield self._emit(images, labels, counts, g)
                    images, labels = [], []
        if images:
            yield self._emit(images, labels, counts, g)  # the last partial batch is kept
        elif counts:
            yield None, None, {"stream": g, "counts": dict(counts)}  # nothing to emit, but counts to report

    def _emit(self, images: list, labels: list, counts: Counter, g: int) -> tuple:
        counts["samples"] += len(images)
        x, y = self.transform.batch(images, self.labels.targets(labels))
        return x, y, {"stream": g, "counts": dict(counts)}


class EvalLoader:
    """One pass per ``iter()``: every sample exactly once across ranks and workers, last partial batch kept."""

    def __init__(self, dataset: _EvalStreams, num_samples: Optional[int], loader_kwargs: dict):
        self.dataset, self.num_samples, self._loader_kwargs = dataset, num_samples, loader_kwargs
        self._counts: dict[int, dict] = {}

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._counts = {}
        for images, labels, meta in DataLoader(self.dataset, batch_size=None, **self._loader_kwargs):
            self._counts[meta["stream"]] = meta["counts"]
            if images is not None:
                yield images, labels

    def counts(self) -> dict:
        """``samples``, ``skipped_corrupt``, ``bad_shards``, ``read_retries`` of this rank in the current or
        last pass."""
        return _sum_counts(list(self._counts.values()))


def make_eval_loader(urls: Sequence[str], *, batch_size: int, rank: int, world_size: int, img_size: int,
                     label_key: str = "cls", num_workers: int = 1, mean: Sequence[float] = (0.5, 0.5, 0.5),
                     std: Sequence[float] = (0.5, 0.5, 0.5), shard_sizes: Optional[Sequence[int]] = None,
                     crop_ratio: float = EVAL_CROP_RATIO, pin_memory: bool = False, multi_label: bool = False,
                     num_classes: Optional[int] = None) -> EvalLoader:
    """The evaluation loader of one rank: resize to ``img_size / crop_ratio``, center crop, normalize.

    ``shard_sizes`` (the manifest's per-shard ``samples``) lets each stream open only its own slice of
    the data and gives ``EvalLoader.num_samples``; without it every stream reads all shards (raw) and
    decodes its share. Ranks may get batch counts that differ by one or two (the split is by sample).
    """
    urls = list(urls)
    if not urls:
        raise InputError("make_eval_loader: no shard urls")
    if not 0 <= rank < world_size or batch_size < 1 or num_workers < 0:
        raise InputError(f"make_eval_loader: bad rank/world_size/batch_size/num_workers "
                         f"{rank}/{world_size}/{batch_size}/{num_workers}")
    if shard_sizes is not None and len(shard_sizes) != len(urls):
        raise InputError(f"make_eval_loader: {len(shard_sizes)} shard sizes for {len(urls)} shards")
    labels = LabelReader(label_key, multi_label, num_classes)
    streams = max(1, num_workers)
    num_samples = None
    if shard_sizes is not None:
        plans = [_eval_plan(len(urls), shard_sizes, rank * streams + j, world_size * streams) for j in range(streams)]
        num_samples = sum(stop - first for plan in plans for _, first, stop, _ in plan)
    dataset = _EvalStreams(urls, shard_sizes, rank=rank, world_size=world_size, streams=streams,
                           batch_size=batch_size, labels=labels,
                           transform=EvalTransform(img_size, mean, std, crop_ratio))
    return EvalLoader(dataset, num_samples, {"num_workers": num_workers, "pin_memory": pin_memory})
