"""Atomic, checksummed DeepSpeed checkpoints; automatic resume, also on another number of workers.

Layout under ``root`` (``{workdir}/checkpoints``, a local or shared path, or an fsspec URL)::

    step_00000400/                 one checkpoint, visible only once complete
        mp_rank_00_model_states.pt     DeepSpeed's files (model, scheduler; optimizer shards below)
        zero_pp_rank_R_mp_rank_00_optim_states.pt
        client_rank{R}.pt              our state per rank: step, world size, format, loader, RNG (weights_only)
        manifest.json                  sha256 and size of every file above, world size, step
        COMPLETE                       the sha256 of manifest.json; written last
    universal/step_00000400/       DeepSpeed universal form of it, made when the world size changed
    latest                         the name of the newest published checkpoint, written last
    rejected/step_...              checkpoints refused on resume (corrupt), kept for inspection

Publishing: on a local or shared filesystem every rank writes into ``.partial/step_N`` and rank 0
renames it to ``step_N`` after all ranks are done, so a checkpoint cut off by a crash is never
under its final name. On object storage (no rename; DeepSpeed writes only local files) each rank
writes into a private folder in this node's scratch (``pretrain.storage.scratch_root``) and uploads
its files concurrently to ``step_N/``, each object whole or not at all; rank 0 then writes the
manifest and the ``COMPLETE`` marker. A folder without the marker is never chosen (the next save of
that step, or pruning, deletes it). On resume each rank downloads (concurrently, into its scratch)
and verifies only the files it loads: its own optimizer shard, not the other ranks'.

Another world size: the checkpoint is converted once (rank 0, which reads all of it,
``ds_to_universal --inject_missing_state``), published under ``universal/`` like a save (uploaded,
on object storage), and loaded by every rank, which reads all of it, with DeepSpeed's
``load_universal``: parameters and optimizer moments are exact. Per-rank loader state cannot map
1:1; see ``Checkpointer._client_state``.

Trust: our own files are read with ``torch.load(weights_only=True)`` or as JSON. DeepSpeed's
files need full unpickling; each rank unpickles only files whose sha256 matches the manifest, and
refuses a checkpoint with any file the manifest does not list (DeepSpeed globs its folders).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from argparse import Namespace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from pretrain import storage

log = logging.getLogger("vitscale.checkpoint")

MANIFEST = "manifest.json"
MARKER = "COMPLETE"
LATEST = "latest"
PARTIAL = ".partial"
UNIVERSAL = "universal"
REJECTED = "rejected"
FORMAT = 1
_STEP_DIR = re.compile(r"step_(\d{8})")
_RANK_FILE = re.compile(r"(?:zero_pp_rank_|client_rank)(\d+)[_.]")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or none of the present ones can be loaded."""


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def sha256_file(path: str, fsync: bool = False) -> str:
    """The file's sha256, read in chunks; ``fsync`` also flushes it to disk (before publishing)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) generator states as tensors and lists (weights_only-safe)."""
    version, words, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": {"version": version, "state": list(words), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_safe(value: Any, path: str = "client_state") -> None:
    """Fail at save time, not at resume, on anything ``torch.load(weights_only=True)`` would refuse."""
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.Tensor)):
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{path}: key {k!r} is a {type(k).__name__}; use str or int keys")
            _check_safe(v, f"{path}[{k!r}]")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_safe(v, f"{path}[{i}]")
        return
    raise TypeError(f"{path}: a {type(value).__name__} cannot be loaded with weights_only=True; "
                    "store tensors, numbers, strings, lists and dicts")


# --------------------------------------------------------------------------- collectives


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _gather(obj: Any, world_size: int) -> list:
    if not _dist():
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _needed(files: list[str], rank: int) -> list[str]:
    """All files but other ranks' shards: each rank checks what it loads itself."""
    out = []
    for name in files:
        m = _RANK_FILE.search(os.path.basename(name))
        if m is None or int(m.group(1)) == rank:
            out.append(name)
    return out


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves and resumes one run's checkpoints under ``root``. ``save`` and ``resume`` are collective."""

    def __init__(self, root: str, keep: int, rank: int, world_size: int, *, cache_dir: Optional[str] = None):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = str(root).rstrip("/")
        self.keep = keep
        self.rank = rank
        self.world_size = world_size
        # Absolute locally: listings (``find``) return absolute paths that are matched against it.
        self.fs, self.path = storage.filesystem(storage.absolute(self.root))
        # A local or shared filesystem has rename; object storage has not, and DeepSpeed writes only
        # local files, so there each rank stages in a private local folder and uploads.
        self.local = not storage.is_remote(self.root)
        self._cache_base = cache_dir
        self._cache_dir: Optional[str] = None

    # ------------------------------------------------------------------ paths and listing

    def _join(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def url(self, *parts: str) -> str:
        """A location under the root as the user wrote it (a path, or a URL with its protocol)."""
        return "/".join([self.path if self.local else self.root, *parts])

    def _step_dirs(self) -> list[str]:
        return [name for name in storage.listdir(self.url()) if _STEP_DIR.fullmatch(name)]

    def complete_steps(self) -> list[int]:
        """Steps of the checkpoints that carry a completion marker, oldest first (not re-verified)."""
        return sorted(int(_STEP_DIR.fullmatch(name).group(1)) for name in self._step_dirs()
                      if storage.exists(self.url(name, MARKER)))

    def _cache(self, *parts: str) -> str:
        """This process's local scratch folder for object storage (made on first use)."""
        if self._cache_dir is None:
            prefix = f"ckpt-rank{self.rank}"
            self._cache_dir = (tempfile.mkdtemp(prefix=f"{prefix}-", dir=self._cache_base) if self._cache_base
                               else storage.scratch_dir(prefix))
        return os.path.join(self._cache_dir, *parts)

    def _drop_cache(self) -> None:
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    # ------------------------------------------------------------------ save

    def save(self, engine, step: int, client_state: dict) -> str:
        """Write checkpoint ``step`` (DeepSpeed state + this rank's ``client_state``) and publish it.

        Every rank calls this. Returns the published location. Older checkpoints beyond ``keep``
        are removed after the new one is published.
        """
        state = dict(client_state, step=step, world_size=self.world_size, format=FORMAT)
        _check_safe(state)
        name = step_name(step)
        if self.local:
            stage_root = self._join(PARTIAL)
            if self.rank == 0:
                shutil.rmtree(stage_root, ignore_errors=True)  # leftovers of a crashed save
                os.makedirs(stage_root, exist_ok=True)
        else:
            stage_root = self._cache(PARTIAL)
            shutil.rmtree(stage_root, ignore_errors=True)
            if self.rank == 0:
                self._remove(name)  # an incomplete or refused one of this step
        _barrier()
        engine.save_checkpoint(stage_root, tag=name, client_state={"vitscale_step": step}, save_latest=False)
        stage = os.path.join(stage_root, name)
        torch.save(state, os.path.join(stage, f"client_rank{self.rank}.pt"))
        _barrier()

        entries = self._hash_and_upload(stage, name)
        gathered = _gather(entries, self.world_size)
        if self.rank == 0:
            files = {k: v for part in gathered for k, v in part.items()}
            meta = {"format": FORMAT, "step": step, "world_size": self.world_size,
                    "zero_stage": int(engine.zero_optimization_stage()), "created": time.time(),
                    "files": dict(sorted(files.items()))}
            self._publish(stage, name, meta)
            self._prune(step)
        _barrier()
        if self.local and self.rank == 0:
            shutil.rmtree(stage_root, ignore_errors=True)
        self._drop_cache()
        return self.url(name)

    def _hash_and_upload(self, stage: str, name: str) -> dict:
        """This rank's share of the manifest: {relative path: {sha256, bytes}}; on object storage
        this rank's files are uploaded too, concurrently."""
        files = sorted(str(p.relative_to(stage)) for p in Path(stage).rglob("*") if p.is_file())
        mine = files
        if self.local:
            # One shared folder: each file is hashed by one of the ranks that list it (a rank always
            # lists what it wrote, even where a network filesystem's listings lag behind).
            seen = _gather(files, self.world_size)
            union = sorted(set().union(*map(set, seen)))
            owners = [[r for r in range(self.world_size) if rel in set(seen[r])] for rel in union]
            mine = [rel for i, (rel, who) in enumerate(zip(union, owners)) if who[i % len(who)] == self.rank]
        out = {rel: {"sha256": sha256_file(os.path.join(stage, rel), fsync=self.local),
                     "bytes": os.path.getsize(os.path.join(stage, rel))} for rel in mine}
        if not self.local:
            storage.upload_many((os.path.join(stage, rel), self.url(name, rel)) for rel in mine)
        return out

    def _publish(self, stage: str, name: str, meta: dict) -> None:
        if self.local:
            unseen = [rel for rel in meta["files"] if not os.path.exists(os.path.join(stage, rel))]
            if unseen:
                raise CheckpointError(f"{self.root}: rank 0 cannot see {unseen[:3]} written by other ranks; the "
                                      "checkpoint root must be a filesystem all ranks share, or an object store")
            if os.path.exists(self._join(name)):  # a refused or incomplete checkpoint of the same step
                self._reject(name, "replaced by a new save of the same step")
        self._seal(stage, name, meta)
        storage.write_bytes(self.url(LATEST), name.encode())

    def _seal(self, stage: str, sub: str, meta: dict) -> None:
        """Make checkpoint ``sub`` (a path under the root) complete: its manifest, then the marker that
        holds the manifest's sha256. Locally both go into the staging folder ``stage``, which is then
        renamed to ``sub``; on object storage, where every file is already uploaded, under ``sub``."""
        manifest = json.dumps(meta, indent=1).encode()
        folder = stage if self.local else self.url(sub)
        storage.write_bytes(storage.join(folder, MANIFEST), manifest)
        storage.write_bytes(storage.join(folder, MARKER), hashlib.sha256(manifest).hexdigest().encode())
        if self.local:
            final = self._join(sub)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            os.rename(stage, final)
            storage.fsync_dir(os.path.dirname(final))

    def _prune(self, newest: int) -> None:
        """Keep the newest ``keep`` complete checkpoints; drop older ones, their universal forms, and
        incomplete ones (object storage: cut off by a crash)."""
        complete = self.complete_steps()
        steps = [s for s in complete if s <= newest]
        drop = set(steps[: max(0, len(steps) - self.keep)])
        drop |= {int(_STEP_DIR.fullmatch(name).group(1)) for name in self._step_dirs()} - set(complete)
        for step in sorted(drop):
            self._remove(step_name(step))
            self._remove(f"{UNIVERSAL}/{step_name(step)}")

    def _remove(self, sub: str) -> None:
        """Delete checkpoint ``sub``, its marker first: one cut off half-deleted is never complete."""
        storage.remove(self.url(sub, MARKER))
        storage.remove(self.url(sub), recursive=True)

    def _reject(self, name: str, reason: str) -> None:
        self._remove(f"{REJECTED}/{name}")
        self._move(name, f"{REJECTED}/{name}")
        log.warning("checkpoint %s moved to %s (%s)", self.url(name), self.url(REJECTED, name), reason)

    def _move(self, sub: str, to: str) -> None:
        """Rename checkpoint ``sub`` to ``to`` (absent). Object storage has no rename: each object is
        copied server-side (concurrently; s3fs's recursive ``mv`` fails on the implied folders), the
        marker dropped first so that a move cut off halfway never leaves a complete checkpoint."""
        if self.local:
            os.makedirs(os.path.dirname(self._join(to)), exist_ok=True)
            os.rename(self._join(sub), self._join(to))
            return
        storage.remove(self.url(sub, MARKER))
        src = self._join(sub)
        objects = self.fs.find(src)
        if objects:
            self.fs.copy(objects, [self._join(to) + p[len(src):] for p in objects])
        self._remove(sub)

    # ------------------------------------------------------------------ resume

    def resume(self, engine) -> Optional[dict]:
        """Load the newest complete checkpoint whose checksums verify into ``engine``.

        Every rank calls this. Returns this rank's client state with ``resumed`` added
        (step, world size then and now, path, whether a universal conversion was used, refused
        checkpoints), or None when there is no checkpoint. On a world-size change see
        ``_client_state`` for what becomes of the per-rank ``loader`` and ``rng`` entries.
        """
        candidates = _broadcast(sorted(self.complete_steps(), reverse=True) if self.rank == 0 else None)
        rejected = []
        for step in candidates:
            name = step_name(step)
            meta, problems = self._read_manifest(name)
            if meta is not None:
                problems += self._verify(name, meta["files"], self._reads(meta, engine.zero_elastic_checkpoint()))
            problems = sorted({p for part in _gather(problems, self.world_size) for p in part})
            if problems:
                for p in problems:
                    log.warning("refusing checkpoint %s: %s; trying the previous one", self.url(name), p)
                rejected.append({"step": step, "problems": problems})
                _barrier()
                if self.rank == 0:
                    self._reject(name, "; ".join(problems))
                _barrier()
                continue
            return self._load(engine, name, meta, rejected)
        if rejected:
            raise CheckpointError(f"{self.root}: every checkpoint was refused: {rejected}")
        return None

    def _changed(self, meta: dict) -> tuple[bool, bool]:
        """(world size changed, DeepSpeed's universal conversion needed: optimizer state is sharded)."""
        changed = meta["world_size"] != self.world_size
        return changed, changed and any(f.endswith("optim_states.pt") for f in meta["files"])

    def _reads(self, meta: dict, all_shards: bool) -> list[str]:
        """The files of a checkpoint this rank will unpickle (and so must verify, and on object storage
        download); ``all_shards``: DeepSpeed's elastic ZeRO checkpoints make every rank read every
        optimizer shard."""
        files = sorted(meta["files"])
        changed, universal = self._changed(meta)
        if not changed:
            return files if all_shards else _needed(files, self.rank)
        ours = sorted({"client_rank0.pt", f"client_rank{self.rank % meta['world_size']}.pt"})
        if universal:  # rank 0 converts (reads everything); the others read the conversion
            return files if self.rank == 0 else ours
        return sorted(set(_needed(files, 0)) | set(ours))  # unsharded optimizer: all read rank 0's files

    def _read_manifest(self, name: str) -> tuple[Optional[dict], list[str]]:
        try:
            manifest = storage.read_bytes(self.url(name, MANIFEST))
            marker = storage.read_text(self.url(name, MARKER)).strip()
        except FileNotFoundError as e:
            return None, [f"missing {e.filename or e}"]
        if hashlib.sha256(manifest).hexdigest() != marker:
            return None, [f"{self.url(name, MANIFEST)}: sha256 does not match the {MARKER} marker"]
        try:
            meta = json.loads(manifest)
        except ValueError as e:
            return None, [f"{self.url(name, MANIFEST)}: not JSON ({e})"]
        if meta.get("format") != FORMAT:
            return None, [f"{self.url(name, MANIFEST)}: format {meta.get('format')!r}, expected {FORMAT}"]
        return meta, []

    def _local_dir(self, *parts: str) -> str:
        """Where DeepSpeed reads the checkpoint: in place, or this rank's download cache."""
        return self._join(*parts) if self.local else self._cache(*parts)

    def _verify(self, name: str, files: dict, wanted: list[str]) -> list[str]:
        """Check the files in ``wanted`` against the manifest (downloading them first from object
        storage); any file present but not listed is refused too, as DeepSpeed globs folders."""
        remote = self._join(name)
        listed = {p[len(remote) + 1:] for p in self.fs.find(remote)} - {MANIFEST, MARKER}
        problems = [f"{self.url(name, p)}: not in the manifest" for p in sorted(listed - set(files))]
        if self.local:  # by name: a listing may lag on network filesystems
            present = [rel for rel in wanted if os.path.exists(self._join(name, rel))]
        else:  # object stores list consistently (and listings are not cached)
            present = [rel for rel in wanted if rel in listed]
            self._download(name, present)
        problems += [f"{self.url(name, rel)}: missing" for rel in wanted if rel not in present]
        for rel in present:
            digest = sha256_file(os.path.join(self._local_dir(name), rel))
            if digest != files[rel]["sha256"]:
                problems.append(f"{self.url(name, rel)}: sha256 {digest[:16]}... does not match the "
                                f"manifest's {files[rel]['sha256'][:16]}... (corrupted or modified)")
        return problems

    def _download(self, name: str, rels: list[str]) -> None:
        """Fetch files of ``name`` into this rank's cache, concurrently (async filesystems such as
        s3fs run a list of gets at once)."""
        targets = [os.path.join(self._cache(name), rel) for rel in rels]
        for target in targets:
            os.makedirs(os.path.dirname(target), exist_ok=True)
        if rels:
            self.fs.get([self._join(name, rel) for rel in rels], targets)

    def _load(self, engine, name: str, meta: dict, rejected: list) -> dict:
        step = meta["step"]
        changed, universal = self._changed(meta)
        if universal:
            load_root = self._universal(name)
            flag = engine._config.load_universal_checkpoint
            # The engine reads this switch only inside load_checkpoint; the world-size change is known
            # only now, after the engine was built, so it is set for this one load.
            engine._config.load_universal_checkpoint = True
            try:
                path, _ = engine.load_checkpoint(load_root, tag=name)
            finally:
                engine._config.load_universal_checkpoint = flag
        else:
            path, _ = engine.load_checkpoint(self._local_dir(), tag=name)
        if path is None:
            raise CheckpointError(f"DeepSpeed found no model states in {self.url(name)}")
        state = self._client_state(name, meta["world_size"])
        state["resumed"] = {"step": step, "path": self.url(name),
                            "world_size_then": meta["world_size"], "world_size_now": self.world_size,
                            "universal": universal, "rejected": rejected}
        _barrier()
        self._drop_cache()
        return state

    def _client_state(self, name: str, then: int) -> dict:
        """This rank's saved state. On a world-size change the per-rank parts cannot map 1:1: rank r
        takes the loader state of old rank ``r % then`` (the loader sees the other layout and starts
        fresh streams seeded from that state's seed and batch count, so no data order is replayed),
        and ``rng`` is None (the caller reseeds); everything else comes from old rank 0."""
        def load(r: int) -> dict:
            path = os.path.join(self._local_dir(name), f"client_rank{r}.pt")
            return torch.load(path, weights_only=True, map_location="cpu")

        if then == self.world_size:
            return load(self.rank)
        state = load(0)
        state["loader"] = load(self.rank % then).get("loader")
        state["rng"] = None
        return state

    def _universal(self, name: str) -> str:
        """DeepSpeed's universal form of checkpoint ``name`` (made once by rank 0), verified; returns
        the folder to pass to ``load_checkpoint`` with tag ``name``."""
        sub = f"{UNIVERSAL}/{name}"
        if self.rank == 0:
            meta, _ = self._read_manifest(sub)
            if meta is None or self._verify(sub, meta["files"], sorted(meta["files"])):
                self._convert(name, sub)
        _barrier()
        meta, problems = self._read_manifest(sub)
        if meta is not None:
            problems += self._verify(sub, meta["files"], sorted(meta["files"]))
        problems = sorted({p for part in _gather(problems, self.world_size) for p in part})
        if problems:
            raise CheckpointError(f"universal checkpoint {self.url(sub)} failed verification: {problems}")
        return self._local_dir(UNIVERSAL)

    def _convert(self, name: str, sub: str) -> None:
        """Rank 0: DeepSpeed's ds_to_universal on the (verified) checkpoint, published like a save."""
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        stage_root = self._join(PARTIAL) if self.local else self._cache(PARTIAL)
        shutil.rmtree(stage_root, ignore_errors=True)
        out = os.path.join(stage_root, UNIVERSAL, name)
        log.warning("world size changed: converting %s to a universal checkpoint", self.url(name))
        # One worker: the converter then runs in this process instead of forking a pool from a
        # process that holds communicator threads (and maybe a CUDA context).
        ds_to_universal(Namespace(input_folder=self._local_dir(name), output_folder=out,
                                  num_extract_workers=1, num_merge_workers=1,
                                  keep_temp_folder=False, strict=True, inject_missing_state=True))
        files = {str(p.relative_to(out)): {"sha256": sha256_file(str(p), fsync=self.local), "bytes": p.stat().st_size}
                 for p in sorted(Path(out).rglob("*")) if p.is_file()}
        meta = {"format": FORMAT, "step": int(_STEP_DIR.fullmatch(name).group(1)), "source": name,
                "world_size": None, "created": time.time(), "files": files}
        self._remove(sub)
        if not self.local:
            storage.upload_many((os.path.join(out, rel), self.url(sub, rel)) for rel in files)
        self._seal(out, sub, meta)
        shutil.rmtree(stage_root, ignore_errors=True)


def describe_resume(state: Optional[dict]) -> str:
    """One line for the log: what a run resumed from."""
    if not state:
        return "no checkpoint found: starting from step 0"
    r = state["resumed"]
    text = (f"resumed from step {r['step']} ({r['path']}); world size then {r['world_size_then']}, "
            f"now {r['world_size_now']}")
    if r["world_size_then"] != r["world_size_now"]:
        text += ("; model and optimizer via DeepSpeed's universal checkpoint" if r["universal"] else "")
        text += "; loader streams restarted for the new world size"
    if r["rejected"]:
        text += f"; refused {len(r['rejected'])} newer checkpoint(s): " + ", ".join(
            f"step {x['step']}: {x['problems'][0]}" for x in r["rejected"])
    return text
