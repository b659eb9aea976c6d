"""One shard: read its row range of the index, fetch and convert each image, write the tar.

Crash safety: the tar is written to a temporary file (a hidden name beside the target on a
filesystem; this node's scratch when the output is on object storage), fsynced, and published
(renamed into place, or uploaded as one object); only then is ``{N}.stats.json`` written, as the
commit marker. A shard is complete exactly when its stats file exists: a worker killed at any point
leaves at most a temporary (removed by the next attempt) or a tar without stats (redone, never
read). Tar members carry fixed metadata, so the same rows give byte-identical tars.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import tarfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from pipelines.config import DownloadConfig
from pipelines.fetch import Fetcher, resolve
from pipelines.images import Encoded, ImageSettings, Rejected, process
from pipelines.ordered import fetch_and_convert
from pipelines.sources import Labels, Table, read_rows
from pretrain import storage

TAR_MTIME = 0  # fixed member metadata: reruns and other machines give the same bytes
TAR_USER = "vitscale"
HELD_BYTES = 64 << 20  # downloaded images that may wait behind a stalled download, per task
WRITE_BUFFER = 1 << 20  # tens of samples per write call, not one (each call lets go of the GIL)
_META_JSON = json.JSONEncoder(sort_keys=True)  # json.dumps(meta, sort_keys=True), without an encoder per call


@dataclass(frozen=True)
class ShardJob:
    index: int
    start: int  # first row of the (shuffled) plan
    stop: int  # one past the last row
    split: str = "train"  # or "holdout": validation shards, listed apart in the manifest


@dataclass(frozen=True)
class TaskContext:
    """What every shard task of one stage run shares (sent to the cluster once)."""

    table: Table
    label_names: list[str]
    settings: ImageSettings
    download: DownloadConfig
    out_dir: str


def shard_name(index: int) -> str:
    return f"{index:06d}"


def stats_name(index: int) -> str:
    return f"{shard_name(index)}.stats.json"


def stats_path(out_dir: str, index: int) -> str:
    return storage.join(out_dir, stats_name(index))


def tar_path(out_dir: str, index: int) -> str:
    return storage.join(out_dir, f"{shard_name(index)}.tar")


def _staging_dir(out_dir: str) -> str:
    """Where a task writes its tar before publishing: beside the target on a filesystem (a rename
    then publishes it), this node's scratch for object storage (one per output, so that the next
    attempt on this node finds and removes a killed attempt's file)."""
    if not storage.is_remote(out_dir):
        return storage.local_path(out_dir)
    key = hashlib.sha256(out_dir.encode()).hexdigest()[:16]
    folder = os.path.join(storage.scratch_root(), "shards", key)
    os.makedirs(folder, exist_ok=True)
    return folder


def temporaries(out_dir: str, index: Optional[int] = None) -> list[str]:
    """Leftovers of interrupted writes on this node (all of them, or one shard's)."""
    name = shard_name(index) if index is not None else "*"
    return glob.glob(os.path.join(_staging_dir(out_dir), f".{name}.*{storage.TMP_SUFFIX}"))


class _SampleTar:
    """WebDataset's tar layout, as ``webdataset.TarWriter`` writes it (a member ``KEY.EXT`` per field,
    in sorted order, a stream-mode tar with fixed metadata), without webdataset: importing it imports
    torch, seconds of every worker's start. Headers are ``tarfile``'s (its default format, as a stream
    opened with ``tarfile.open(mode="w|")`` writes them, see ``_member_header``); a sample then goes out
    as one write of its headers, data and padding, and the end as tarfile's closing blocks and record
    padding. tarfile's own member path (a header object copied per member, a write per piece) cost a
    third more per sample, each write a release and retake of the GIL the fetch threads wait on."""

    def __init__(self, f):
        self.f = f
        self.offset = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(fields):
            data = fields[ext]
            parts += (_member_header(f"{key}.{ext}", len(data)), data, bytes(-len(data) % tarfile.BLOCKSIZE))
        sample = b"".join(parts)
        self.f.write(sample)
        self.offset += len(sample)

    def close(self) -> None:
        end = 2 * tarfile.BLOCKSIZE  # two zero blocks, then zeros to a whole record, as tarfile ends
        self.f.write(bytes(end + (-(self.offset + end) % tarfile.RECORDSIZE)))


def _tarfile_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, TAR_MTIME, 0o444
    info.uname = info.gname = TAR_USER
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


_TEMPLATE = _tarfile_header("", 0)
# The template's checksum without its name and size fields (empty, zeros) and with its own field as the
# spaces a checksum counts it as: a header's checksum is this plus its name's and size field's bytes.
_TEMPLATE_SUM = sum(_TEMPLATE[100:124]) + 8 * ord(" ") + sum(_TEMPLATE[156:]) + sum(_TEMPLATE[136:148])


def _member_header(name: str, size: int) -> bytes:
    """``_tarfile_header(name, size)``: for a short ASCII name, the cached header of an empty member
    with the name, size and checksum fields filled in as tarfile fills them (a tenth of its time per
    header, three headers a sample); anything else from tarfile itself (long names need its extension
    headers)."""
    if len(name) >= tarfile.LENGTH_NAME or not name.isascii() or size >= 8 ** 11:
        return _tarfile_header(name, size)
    encoded = name.encode("ascii")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_TEMPLATE_SUM + sum(encoded) + sum(size_field))
    return b"".join((encoded, bytes(tarfile.LENGTH_NAME - len(encoded)), _TEMPLATE[100:124], size_field,
                     _TEMPLATE[136:148], checksum, _TEMPLATE[156:]))


class _HashingSink:
    """A write-only file wrapper that hashes and counts what passes through (tar streams only write)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.bytes = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.bytes += len(data)
        return self.f.write(data)


def _label_members(labels: Labels, raw: object) -> dict:
    """The label's tar members and ``.json`` fields: ``cls`` (the id) and the name for one label;
    ``{"labels": [ids]}`` and the names for a multi-label index (read with ``label_key: json:labels``)."""
    if labels.multi:
        ids, names = labels.resolve_all(raw)
        return {"meta": {"labels": ids, "label": names}}
    label, name = labels.resolve(raw)
    return {"cls": str(label).encode(), "meta": {"label": name}}


def write_shard(ctx: TaskContext, job: ShardJob, node_id: Optional[str] = None) -> dict:
    """Write shard ``job.index`` and its stats file; return the stats."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    for stale in temporaries(ctx.out_dir, job.index):  # from an attempt whose worker died
        os.remove(stale)
    rows = read_rows(ctx.table, job.start, job.stop)
    labels = Labels(ctx.table.label_kind, ctx.label_names, ctx.table.multi)
    fetcher = Fetcher(ctx.download, ctx.table.base)
    final = tar_path(ctx.out_dir, job.index)
    tmp = storage.temporary_name(os.path.join(_staging_dir(ctx.out_dir), os.path.basename(final)))
    failures: list[dict] = []
    kept = 0
    threaded = any(storage.is_remote(resolve(row[0], ctx.table.base)) for row in rows if row[0] and not row[2])

    def fetch(row: tuple) -> tuple[dict, bytes]:
        """The label's members and the image's bytes (on a fetch thread when the rows are on the network)."""
        location, raw_label, error = row
        if error:
            raise Rejected(*error.split(": ", 1))
        if not location:
            raise Rejected("bad_row", "no path in this row")
        return _label_members(labels, raw_label), fetcher.fetch(location)

    def convert(fetched: tuple[dict, bytes]) -> tuple[dict, Encoded]:
        members, data = fetched
        return members, process(data, ctx.settings)

    with fetcher, open(tmp, "wb", buffering=WRITE_BUFFER) as raw:
        sink = _HashingSink(raw)
        writer = _SampleTar(sink)
        # Waiting on a lagging download, what is written so far goes to disk (a killed task leaves it).
        results = fetch_and_convert(fetch, convert, rows, ctx.download.threads if threaded else 0,
                                    held_bytes=HELD_BYTES, size=lambda fetched: len(fetched[1]), waiting=raw.flush)
        for i, (row, result, error) in enumerate(results):
            location = row[0]
            key = f"{shard_name(job.index)}_{i:06d}"
            if isinstance(error, Rejected):
                failures.append({"key": key, "source": location, "reason": error.reason, "detail": str(error)})
                continue
            if error is not None:  # one image that trips a decoder must not sink its shard
                failures.append({"key": key, "source": location, "reason": "error",
                                 "detail": f"error: {type(error).__name__}: {error}"})
                continue
            members, image = result
            meta = {"source": location, "original_size": list(image.original_size),
                    "size": list(image.size), **members.pop("meta")}
            writer.write(key, {"jpg": image.data, **members, "json": _META_JSON.encode(meta).encode()})
            kept += image.kept_original
        writer.close()
        raw.flush()
    storage.publish_file(tmp, final)
    total = len(rows)
    stats = {
        "shard": shard_name(job.index), "name": storage.basename(final), "rows": [job.start, job.stop],
        "total": total, "ok": total - len(failures), "failed": len(failures),
        "failed_by_reason": dict(sorted(Counter(f["reason"] for f in failures).items())),
        "failures": failures, "kept_original": kept, "bytes": sink.bytes, "sha256": sink.sha.hexdigest(),
        "seconds": round(time.perf_counter() - t0, 3), "cpu_seconds": round(time.process_time() - cpu0, 3),
        "node_id": node_id, "pid": os.getpid(),
    }
    storage.write_json(stats_path(ctx.out_dir, job.index), stats)  # the commit marker, last
    return stats
