"""The seeded external shuffle of a shard plan: shards hold a uniform random sample of the index,
whatever the index's order.

Why at write time: shards are cut from the plan in order, and the commonest layouts are sorted (an
ImageFolder tree is walked one class at a time, a CSV exported sorted by label), so a 10,000-sample
shard of a sorted index holds a handful of classes, and a loader's shuffle window, filled from one
shard, yields near single-class batches. Shuffling the rows once when the shards are written makes
every shard (and so every window and batch) an i.i.d.-like draw, at the cost of one more pass over
the plan, with no cost at training time and no change to the loader's exact resume.

How, in bounded memory at 300M rows: pass 1 streams the plan in batches and sends each row to one of
``ceil(rows / BUCKET_ROWS)`` bucket files, chosen by a generator seeded by (seed, batch); pass 2 loads
one bucket at a time, permutes it with a generator seeded by (seed, bucket) and appends it to the
new plan. Each permutation of the rows is equally likely, and the same seed and index give the same
order, so a rerun writes byte-identical shards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import numpy as np

from pipelines.sources import PLAN_COLUMNS, Table, parquet_file, PlanWriter

BUCKET_ROWS = 1 << 19  # rows of one bucket: what pass 2 holds in memory (~150 MB with its Arrow copies)
BATCH_ROWS = 1 << 16
_PASS_1, _PASS_2 = 1, 2  # seed streams of the two passes, kept apart


def _generator(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, stream, index]))


def _as_strings(column: Any):
    """A plan column as strings: integers as digits (an integral float too), lists as JSON arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = column.type
    if pa.types.is_dictionary(kind):
        column, kind = column.cast(kind.value_type), kind.value_type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind):
        return column.cast(pa.string())
    if pa.types.is_floating(kind):
        integral = pc.fill_null(pc.equal(column, pc.floor(column)), False)
        as_int = pc.cast(pc.if_else(integral, column, pa.scalar(None, kind)), pa.int64()).cast(pa.string())
        return pc.if_else(integral, as_int, column.cast(pa.string()))
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.string())
    return pa.array([None if v is None else json.dumps(v) for v in column.to_pylist()], pa.string())


def _plan_batch(batch: Any, table: Table):
    import pyarrow as pa

    errors = batch.column(2).cast(pa.string()) if table.error_column else pa.nulls(batch.num_rows, pa.string())
    columns = [batch.column(0).cast(pa.string()), _as_strings(batch.column(1)), errors]
    return pa.table(dict(zip(PLAN_COLUMNS, columns)))


def shuffle_plan(table: Table, num_rows: int, seed: int, rows_per_group: int, out_path: str) -> Table:
    """Write ``table``'s rows to the plan parquet ``out_path`` in a seeded random order (one row group
    per ``rows_per_group`` rows, like every plan) and return its ``Table``."""
    buckets = max(1, -(-num_rows // BUCKET_ROWS))
    spill = out_path + ".buckets"
    shutil.rmtree(spill, ignore_errors=True)
    os.makedirs(spill)
    try:
        written = _scatter(table, seed, buckets, spill)
        writer = PlanWriter(out_path, rows_per_group)
        for b in sorted(written):
            _gather_bucket(writer, os.path.join(spill, f"{b}.parquet"), _generator(seed, _PASS_2, b))
        writer.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return dataclasses.replace(table, path=out_path, path_column="path", label_column="label", error_column="error")


def _scatter(table: Table, seed: int, buckets: int, spill: str) -> set[int]:
    """Pass 1: every row to a bucket file; returns the buckets that got rows."""
    import pyarrow.parquet as pq

    writers: dict[int, Any] = {}
    columns = [table.path_column, table.label_column] + ([table.error_column] if table.error_column else [])
    try:
        with parquet_file(table.path) as pf:
            for i, batch in enumerate(pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)):
                rows = _plan_batch(batch, table)
                which = _generator(seed, _PASS_1, i).integers(0, buckets, rows.num_rows)
                order = np.argsort(which, kind="stable")
                counts = np.bincount(which, minlength=buckets)
                rows, start = rows.take(order), 0
                for b in np.flatnonzero(counts):
                    if b not in writers:
                        writers[b] = pq.ParquetWriter(os.path.join(spill, f"{b}.parquet"), rows.schema)
                    writers[b].write_table(rows.slice(start, int(counts[b])))
                    start += int(counts[b])
    finally:
        for w in writers.values():
            w.close()
    return {int(b) for b in writers}


def _gather_bucket(writer: PlanWriter, path: str, rng: np.random.Generator) -> None:
    """Pass 2: one bucket, permuted, onto the end of the plan."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path)
    rows = rows.take(rng.permutation(rows.num_rows))
    writer.add_columns(*(rows.column(c).combine_chunks() for c in PLAN_COLUMNS))
