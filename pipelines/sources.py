"""Index readers of the shard stage: any source becomes a parquet table of (location, label) rows that
shard tasks read by row range, plus the label names (the id map).

- ``.parquet`` is read where it is: a row range maps to row groups, and only the label column is
  scanned once, in batches, for the label names.
- ``.csv`` / ``.tsv`` / ``.jsonl`` (optionally compressed) and a folder of class subfolders are
  streamed once into a *plan* parquet with one row group per shard, so a task reads just its own.
  CSV and JSONL are parsed by pyarrow, a block at a time, and checked column-wise: the driver does no
  Python work per row (but for the few lines pyarrow refuses, read line by line for their reasons).

Nothing here holds more than one batch of rows (or one shard's rows) at a time; what grows with the
index is only the set of distinct labels, capped at ``MAX_CLASSES``.

Labels: integers are ids as they are (names ``"0".."max"``); strings get ids by sorted name. In a CSV
(no types) a label column of digits only is integers. A row whose label is missing, negative, or of
the other kind than the index's first valid label fails with reason ``bad_label`` in its shard.

Multi-label indexes (JFT-style): a label cell holding a list (a JSON array in CSV or JSONL, a list
column in parquet) makes the index multi-label; each element is an id or a name as above, and a
single label is a list of one. Such samples store ``{"labels": [ids]}`` in their ``.json``.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from pipelines.config import ShardConfig
from pretrain.storage import is_url
from pipelines.images import Rejected
from pretrain.errors import InputError
from pretrain.redact import redact

MAX_CLASSES = 1_000_000
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .png .gif .bmp .webp .tif .tiff .ppm .pgm .pbm .pnm .ico .avif".split())
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
TABLE_SUFFIXES = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".pq": "parquet",
                  ".jsonl": "jsonl", ".ndjson": "jsonl"}
PLAN_COLUMNS = ("path", "label", "error")
JSONL_CHUNK = 8 << 20  # bytes of whole lines read by pyarrow at a time
JSONL_LINES = 64  # a piece pyarrow refuses with at most this many lines is read line by line
_INT = re.compile(r"-?[0-9]+")
_BLANK_LINE = re.compile(rb"\n[ \t\r]*(?=\n)")  # these start with a literal: quick to search
_BLANK_FIRST = re.compile(rb"[ \t\r]*\n")
_NULL_LINE = re.compile(rb"\n[ \t\r]*null[ \t\r]*(?:\n|$)")
_NULL_FIRST = re.compile(rb"[ \t\r]*null[ \t\r]*(?:\n|$)")
_ROW = re.compile(r" in row ([0-9]+)$")  # where pyarrow's JSON reader stopped


@dataclass(frozen=True)
class Table:
    """Where a shard task reads its rows: a parquet file, its columns, and how to read the labels."""

    path: str
    path_column: str
    label_column: str
    error_column: Optional[str]  # plan files carry row errors found while streaming the index
    base: Optional[str]  # folder that relative image paths in the index are relative to
    label_kind: str  # "int" | "str": of the labels, or of a multi-label row's elements
    multi: bool = False  # label cells hold lists (JSON arrays in text)


@dataclass(frozen=True)
class Plan:
    table: Table
    num_rows: int
    label_names: list[str]


# --------------------------------------------------------------------------- what the source is


def source_kind(source: str) -> str:
    """``builtin``, ``folder``, ``parquet``, ``csv``, ``tsv`` or ``jsonl``; InputError if none fits."""
    if source.startswith("builtin:"):
        return "builtin"
    name = source.rstrip("/").lower()
    for comp in COMPRESSIONS:
        name = name.removesuffix(comp)
    suffix = os.path.splitext(name)[1]
    if suffix in TABLE_SUFFIXES:
        return TABLE_SUFFIXES[suffix]
    fs, path = _fs(source)
    if fs.isdir(path):
        return "folder"
    if not fs.exists(path):
        raise InputError(f"shard.source: {source} does not exist")
    raise InputError(f"shard.source: {source}: unknown index kind (use a folder, .csv, .tsv, .parquet or .jsonl)")


def _fs(location: str):
    import fsspec

    return fsspec.core.url_to_fs(location)


def _base_of(source: str) -> str:
    if is_url(source):
        return source.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(source))


def fingerprint(source: str) -> dict:
    """A cheap identity of the source's content: file size and modification stamp, or for a folder a
    digest of its listing. Changes when the index changes, so finished shards are not reused."""
    import hashlib

    kind = source_kind(source)
    fs, path = _fs(source)
    if kind != "folder":
        if not fs.exists(path):
            raise InputError(f"shard.source: {source} does not exist")
        info = fs.info(path)
        stamp = {k: str(info[k]) for k in ("mtime", "LastModified", "ETag", "etag", "md5Hash") if k in info}
        return {"kind": kind, "path": _canonical(source), "size": info.get("size"), **stamp}
    digest = hashlib.sha256()
    count = 0
    for rel, label, info in _walk_folder(fs, path):
        digest.update(f"{rel}\0{label}\0{info.get('size')}\0{info.get('mtime', '')}\n".encode())
        count += 1
    return {"kind": kind, "path": _canonical(source), "files": count, "listing": digest.hexdigest()}


def _canonical(source: str) -> str:
    """Without credentials: a signed URL signed again (a new expiry) is the same index."""
    return redact(source) if is_url(source) else os.path.abspath(source)


# --------------------------------------------------------------------------- planning


def plan_source(source: str, shard: ShardConfig, plan_dir: str) -> Plan:
    """Read the index once (streaming) and return what the shard tasks need. Writes a plan parquet
    under ``plan_dir`` for every kind but parquet."""
    kind = source_kind(source)
    if kind == "parquet":
        return _plan_parquet(source, shard)
    os.makedirs(plan_dir, exist_ok=True)
    plan_path = os.path.join(plan_dir, "index.parquet")
    tmp = plan_path + ".tmp"
    writer = PlanWriter(tmp, shard.samples_per_shard)
    labels = _LabelCollector(shard.label_column, source, text=kind in ("csv", "tsv"))
    if kind == "folder":
        fs, path = _fs(source)
        base = source.rstrip("/") if is_url(source) else os.path.abspath(source)
        for rel, label, _ in _walk_folder(fs, path):
            writer.add(rel, label, None)
            labels.add_str(label)
        if not labels.names:
            raise InputError(f"shard.source: {source} has no class subfolders with images in them")
    elif kind in ("csv", "tsv"):
        base = _base_of(source)
        _stream_csv(source, shard, "\t" if kind == "tsv" else ",", writer, labels)
    else:
        base = _base_of(source)
        _stream_jsonl(source, shard, writer, labels)
    num_rows = writer.close()
    os.replace(tmp, plan_path)
    table = Table(plan_path, "path", "label", "error", base, labels.kind(), labels.multi)
    return Plan(table, num_rows, labels.label_names())


def parse_label_list(text: str) -> Optional[list]:
    """A JSON array of ids or names as a list, or None when ``text`` is not one."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, list) or not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in value):
        return None
    return value


class _LabelCollector:
    """Distinct labels seen while streaming: a capped set of names, and the largest integer id.

    ``text`` mode (CSV) collects every label as a name and decides at the end: if all of them are
    integers the index has integer ids, otherwise names.
    """

    def __init__(self, column: str, source: str, text: bool = False):
        self.column, self.source, self.text = column, source, text
        self.names: set[str] = set()
        self.all_ints = True
        self.max_int = -1
        self.multi = False

    def add_str(self, label: str) -> None:
        if label not in self.names:
            self.names.add(label)
            if len(self.names) > MAX_CLASSES:
                raise InputError(f"shard.label_column: {self.column!r} in {self.source} has over "
                                 f"{MAX_CLASSES} distinct labels; is it the right column?")

    def add_int(self, value: int) -> None:
        if value > self.max_int:
            self.max_int = value
            if value >= MAX_CLASSES:
                raise InputError(f"shard.label_column: {self.column!r} in {self.source} has label id "
                                 f"{value}; at most {MAX_CLASSES} classes are supported")

    def add_text(self, label: str) -> None:
        if label.startswith("["):  # a JSON array: a multi-label row
            values = parse_label_list(label)
            if values is not None:
                self.multi = True
                for value in values:
                    self.add_text(str(value))
                return
        self.add_str(label)
        if self.all_ints:
            if _INT.fullmatch(label):
                self.add_int(int(label))
            else:
                self.all_ints = False

    def kind(self) -> str:
        if self.text:
            return "int" if self.all_ints else "str"
        return "str" if self.names else "int"

    def label_names(self) -> list[str]:
        if self.kind() == "int":
            return [str(i) for i in range(self.max_int + 1)]
        return sorted(self.names)


class PlanWriter:
    """Rows into a parquet file whose row groups are exactly one shard each. Rows come one by one
    (``add``) or as arrow columns (``add_columns``); at most about one shard's rows are buffered."""

    def __init__(self, path: str, rows_per_group: int):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.schema = pa.schema([(c, pa.string()) for c in PLAN_COLUMNS])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self.group = rows_per_group
        self.cols: tuple[list, list, list] = ([], [], [])
        self.pending: list = []  # arrow tables not yet written
        self.buffered = 0
        self.rows = 0

    def add(self, path: Optional[str], label: Optional[str], error: Optional[str]) -> None:
        self.cols[0].append(path)
        self.cols[1].append(label)
        self.cols[2].append(error)
        if len(self.cols[0]) == self.group:
            self._take_rows()

    def add_columns(self, paths, labels, errors) -> None:
        import pyarrow as pa

        self._take_rows()
        self._take(pa.table([paths, labels, errors], schema=self.schema))

    def _take_rows(self) -> None:
        import pyarrow as pa

        if self.cols[0]:
            self._take(pa.table(dict(zip(PLAN_COLUMNS, self.cols)), schema=self.schema))
            self.cols = ([], [], [])

    def _take(self, table) -> None:
        self.pending.append(table)
        self.buffered += table.num_rows
        if self.buffered >= self.group:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        import pyarrow as pa

        table = pa.concat_tables(self.pending) if self.pending else None
        self.pending, self.buffered = [], 0
        if table is None:
            return
        whole = table.num_rows if final else table.num_rows - table.num_rows % self.group
        if whole:
            self.writer.write_table(table.slice(0, whole), row_group_size=self.group)
            self.rows += whole
        if whole < table.num_rows:
            self.pending, self.buffered = [table.slice(whole)], table.num_rows - whole

    def close(self) -> int:
        self._take_rows()
        self._write(final=True)
        self.writer.close()
        return self.rows


def _walk_folder(fs, root: str) -> Iterator[tuple[str, str, dict]]:
    """(path relative to the folder, class name, file info) in sorted order, one class at a time."""
    root = root.rstrip("/")
    classes = sorted(
        os.path.basename(e["name"].rstrip("/")) for e in fs.ls(root, detail=True)
        if e["type"] == "directory" and not os.path.basename(e["name"].rstrip("/")).startswith("."))
    for label in classes:
        found = fs.find(f"{root}/{label}", detail=True)
        for name in sorted(found):
            rel = name[len(root) + 1:]
            if any(part.startswith(".") for part in rel.split("/")):
                continue
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield rel, label, found[name]


def _stream_csv(source: str, shard: ShardConfig, delimiter: str, writer: PlanWriter,
                labels: _LabelCollector) -> None:
    """Column-wise, batch by batch: no Python work per row, only per distinct label of a batch. A row
    with too few or too many cells is recorded as ``bad_row`` with its line number, not fatal."""
    import fsspec
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    cols = [shard.path_column, shard.label_column]
    missing_label = pa.scalar(_MISSING, pa.string())
    no_text = pa.scalar(None, pa.string())
    ragged: list[str] = []

    def skip_ragged(row) -> str:
        ragged.append(f"bad_row: line {row.number} has {row.actual_columns} cells, the header "
                      f"{row.expected_columns}: {row.text[:120]!r}")
        return "skip"

    with fsspec.open(source, "rb", compression="infer") as f:
        try:
            reader = pacsv.open_csv(
                # One thread: ragged rows are reported in file order, so plans (and shards) are reproducible.
                f, read_options=pacsv.ReadOptions(block_size=1 << 22, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                 invalid_row_handler=skip_ragged),
                convert_options=pacsv.ConvertOptions(include_columns=cols, strings_can_be_null=True,
                                                     column_types={c: pa.string() for c in cols}))
            for batch in reader:
                paths, label_col = batch.column(0), batch.column(1)
                missing = pc.fill_null(pc.equal(label_col, ""), True)
                label_col = pc.if_else(missing, no_text, label_col)
                writer.add_columns(paths, label_col, pc.if_else(missing, missing_label, no_text))
                for name in pc.unique(label_col.drop_null()).to_pylist():
                    labels.add_text(name)
                for error in ragged:
                    writer.add(None, None, error)
                ragged.clear()
        except (pa.ArrowInvalid, KeyError) as e:
            raise InputError(f"shard.source: cannot read {source} as CSV ({_columns_hint(shard)}): {e}") from None


def _stream_jsonl(source: str, shard: ShardConfig, writer: PlanWriter, labels: _LabelCollector) -> None:
    """Chunk by chunk through pyarrow's JSON reader: no Python work per row, only per distinct label of
    a chunk (as for CSV). Where pyarrow refuses a line (not JSON, a label of another type than its
    neighbours'), the rows around it are still read by pyarrow; only such lines (and, where they come
    thick, the lines near them) are read one by one, with their line number, by the same rules."""
    import fsspec

    import pyarrow as pa

    reader = _JsonlReader(source, shard, writer, labels)
    with fsspec.open(source, "rb", compression="infer") as f:
        for data, line in _line_chunks(f, JSONL_CHUNK):
            reader.piece(data, line)
    pa.default_memory_pool().release_unused()  # the parser's buffers: the shuffle next needs the room


def _line_chunks(f, size: int) -> Iterator[tuple[bytes, int]]:
    """(whole lines of about ``size`` bytes, the number of their first line) from a binary file."""
    line, rest = 1, b""
    while True:
        data = f.read(size)
        buf = rest + data if rest else data
        cut = buf.rfind(b"\n") + 1 if data else len(buf)  # a line longer than size waits for the next read
        if cut:
            yield buf[:cut], line
            line += buf.count(b"\n", 0, cut)
        rest = buf[cut:]
        if not data:
            return


class _JsonlReader:
    """The rows of a JSONL index into a plan. A line is an object; its path cell a string (else the row
    has no path); its label cell an id, a name or a list of them (then the index is multi-label), of the
    kind of the index's first valid label. A row breaking these rules keeps its path and gets the reason."""

    def __init__(self, source: str, shard: ShardConfig, writer: PlanWriter, labels: _LabelCollector):
        self.source, self.path_column, self.label_column = source, shard.path_column, shard.label_column
        self.writer, self.labels = writer, labels
        self.kind: Optional[type] = None  # int or str, from the index's first valid label
        self.label_type = None  # arrow type of the labels so far: read as that, the other fields skipped

    def piece(self, data: bytes, line: int) -> None:
        """Add the rows of ``data``, whole lines of which the first is line ``line``."""
        if _NULL_FIRST.match(data) or _NULL_LINE.search(data):
            # json.loads refuses a null row; pyarrow reads it as an empty one, or crashes (pyarrow 25)
            self._bisect(data, line)
            return
        table, _ = self._parse(data, self.label_type)
        if table is None and self.label_type is not None:
            table, _ = self._parse(data, None)  # the labels may have another type from here on
        if table is not None and self._add_table(table):
            return
        if _blank_lines(data):
            self._bisect(data, line)  # pyarrow's row numbers skip blank lines: halve instead
        else:
            self._scan(data, line)

    def _bisect(self, data: bytes, line: int) -> None:
        """Each half as a piece of its own, down to ``JSONL_LINES`` lines, read line by line."""
        if data.count(b"\n") <= JSONL_LINES:
            self._add_lines(data, line)
            return
        half = len(data) // 2
        cut = (data.find(b"\n", half, len(data) - 1) + 1) or (data.rfind(b"\n", 0, half) + 1)
        self.piece(data[:cut], line)
        self.piece(data[cut:], line + data.count(b"\n", 0, cut))

    def _scan(self, data: bytes, line: int) -> None:
        """A piece with lines pyarrow refuses, left to right: read in one block, pyarrow stops at the
        first of them and names its row; the rows before it are added, then it (and, where it is not
        alone, the next few) by the row-wise rules. Each part is read about twice in all."""
        import numpy as np

        ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n")) + 1  # where each line ends
        if not data.endswith(b"\n"):
            ends = np.append(ends, len(data))
        row = 0
        while row < len(ends):
            start = int(ends[row - 1]) if row else 0
            label_type = self.label_type
            table, stop = self._parse(data[start:], label_type, one_block=True)
            if table is None and label_type is not None and not stop:
                label_type = None
                table, stop = self._parse(data[start:], None, one_block=True)
            if table is not None:
                if not self._add_table(table):
                    self._bisect(data[start:], line + row)
                return
            if stop is not None and stop >= len(ends) - row:
                stop = None  # a row past the lines: a line held two objects
            if stop is None:  # refused, but not at a row: halve what is left
                self._bisect(data[start:], line + row)
                return
            if stop:
                head = data[start:int(ends[row + stop - 1])]
                table, _ = self._parse(head, label_type)
                if table is None or not self._add_table(table):
                    self._bisect(head, line + row)
                row += stop
            start = int(ends[row - 1]) if row else 0
            take = 1 if stop else min(JSONL_LINES, len(ends) - row)  # refused at its first row twice
            self._add_lines(data[start:int(ends[row + take - 1])], line + row)
            row += take

    def _parse(self, data: bytes, label_type, one_block: bool = False) -> tuple[Any, Optional[int]]:
        """(the lines as an arrow table, None), or (None, the row pyarrow stopped at when it says) when
        pyarrow refuses them or reads them otherwise than ``json.loads`` line by line (two objects on a
        line, text that is not UTF-8). ``label_type`` None: inferred, with the other fields."""
        import pyarrow as pa
        import pyarrow.json as pajson

        fields = [(self.path_column, pa.string())] + ([(self.label_column, label_type)] if label_type else [])
        options = pajson.ParseOptions(explicit_schema=pa.schema(fields),
                                      unexpected_field_behavior="ignore" if label_type else "infer")
        # One block: pyarrow stops at the first refused line, and its row number counts from the start.
        reading = pajson.ReadOptions(block_size=len(data) + 1) if one_block else pajson.ReadOptions()
        try:
            table = pajson.read_json(pa.BufferReader(data), read_options=reading, parse_options=options)
            for name in (self.path_column, self.label_column):
                if name in table.column_names:
                    table.column(name).validate(full=True)  # UTF-8
        except pa.ArrowInvalid as e:
            where = _ROW.search(str(e)) if one_block else None
            return None, int(where.group(1)) if where else None
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if table.num_rows != lines - _blank_lines(data):
            return None, None
        return table, None

    def _add_table(self, table) -> bool:
        """Write a piece's rows, checked column-wise by the rules of ``_add_row``. False, with nothing
        written, when the row-wise messages are needed: labels of the other kind than the index's, floats
        that are not whole, booleans or objects as labels."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        n = table.num_rows
        paths = table.column(self.path_column).combine_chunks()
        cells = (table.column(self.label_column).combine_chunks() if self.label_column in table.column_names
                 else pa.nulls(n))
        multi = pa.types.is_list(cells.type)
        values = cells.flatten() if multi else cells
        if pa.types.is_floating(values.type):
            if not pc.all(pc.fill_null(pc.equal(values, pc.floor(values)), True)).as_py():
                return False
            try:
                values = values.cast(pa.int64())
            except pa.ArrowInvalid:
                return False
        kind = int if pa.types.is_integer(values.type) else str if pa.types.is_string(values.type) else None
        if kind is None and not pa.types.is_null(values.type):
            return False
        if multi and kind is str and pc.any(pc.match_substring_regex(values, r"[\x00-\x1f]")).as_py():
            return False  # the label text below quotes names without escaping control characters

        none = pa.scalar(None, pa.string())
        if kind is int:
            negative = pc.binary_join_element_wise("bad_label: negative label ", values.cast(pa.string()), "")
            problem = pc.if_else(pc.less(values, 0), negative, none)
        elif kind is str:
            problem = pc.if_else(pc.equal(values, ""), _EMPTY_NAME, none)
        else:
            problem = pa.nulls(len(values), pa.string())
        problem = pc.if_else(pc.is_null(values), _MISSING, problem)
        if multi:  # a row's reason is that of its first bad element
            rows = pc.list_parent_indices(cells).to_numpy()
            bad = np.flatnonzero(problem.is_valid().to_numpy(zero_copy_only=False))
            first_rows, first = np.unique(rows[bad], return_index=True)
            pick = np.full(n, -1, np.int64)
            pick[first_rows] = bad[first]
            reason = problem.take(pa.array(pick, mask=pick < 0))
            empty = pc.fill_null(pc.equal(pc.list_value_length(cells), 0), False)
            reason = pc.if_else(pc.is_null(cells), _MISSING, pc.if_else(empty, _EMPTY_LIST, reason))
        else:
            reason = problem
        valid = pc.is_null(reason)
        any_valid = pc.any(valid).as_py()
        if any_valid and self.kind not in (None, kind):
            return False

        if multi:
            valid_values = pc.array_take(valid, pa.array(rows))
            if kind is str:
                escaped = pc.replace_substring(pc.replace_substring(values, "\\", "\\\\"), '"', '\\"')
                texts = pc.binary_join_element_wise('"', escaped, '"', "")
            else:
                texts = values.cast(pa.string())
            offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int32)
            joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), texts), ", ")
            label_text = pc.binary_join_element_wise("[", joined, "]", "")  # as json.dumps writes a list
        else:
            valid_values = valid
            label_text = values.cast(pa.string())
        self.writer.add_columns(paths, pc.if_else(valid, label_text, none), reason)
        if not any_valid:
            return True
        self.kind = kind
        self.labels.multi = self.labels.multi or multi
        if cells.type in (pa.int64(), pa.string(), pa.list_(pa.int64()), pa.list_(pa.string())):
            self.label_type = cells.type
        names = pc.filter(values, valid_values)
        if kind is int:
            self.labels.add_int(pc.max(names).as_py())
        else:
            for name in pc.unique(names).to_pylist():
                self.labels.add_str(name)
        return True

    def _add_lines(self, data: bytes, line: int) -> None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = line + data.count(b"\n", 0, e.start)
            raise InputError(f"shard.source: {self.source}: line {bad} is not UTF-8 text") from None
        for lineno, row in enumerate(text.split("\n"), line):
            if row.strip():
                self._add_row(row, lineno)

    def _add_row(self, line: str, lineno: int) -> None:
        writer, labels = self.writer, self.labels
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            writer.add(None, None, f"bad_row: line {lineno} is not JSON ({e.msg})")
            return
        if not isinstance(row, dict):
            writer.add(None, None, f"bad_row: line {lineno} is not an object")
            return
        path = row.get(self.path_column)
        path = path if isinstance(path, str) else None
        cell = row.get(self.label_column)
        values = [_json_label(v) for v in cell] if isinstance(cell, list) and cell else [_json_label(cell)]
        bad = next((v for v in values if isinstance(v, Rejected)), None)
        if bad is not None:
            writer.add(path, None, str(bad))
            return
        self.kind = self.kind or type(values[0])
        odd = next((v for v in values if type(v) is not self.kind), None)
        if odd is not None:
            writer.add(path, None, f"bad_label: expected {_kind_name(self.kind)} like the index's other labels, "
                                   f"got {_kind_name(type(odd))} {odd!r}")
            return
        labels.multi = labels.multi or isinstance(cell, list)
        writer.add(path, json.dumps(values) if isinstance(cell, list) else str(values[0]), None)
        for value in values:
            labels.add_int(value) if self.kind is int else labels.add_str(value)


def _blank_lines(data: bytes) -> int:
    """Lines of ``data`` holding only whitespace (pyarrow and this reader skip them)."""
    tail = data[data.rfind(b"\n") + 1:]
    return len(_BLANK_LINE.findall(data)) + bool(_BLANK_FIRST.match(data)) + (bool(tail) and not tail.strip())


def _json_label(value: Any) -> "int | str | Rejected":
    if isinstance(value, bool) or value is None:
        return Rejected("bad_label", "missing label" if value is None else f"got a boolean {value!r}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return value if value >= 0 else Rejected("bad_label", f"negative label {value}")
    if isinstance(value, str) and value:
        return value
    return Rejected("bad_label", f"expected an integer or a string, got {type(value).__name__} {value!r}")


# The reasons of the column-wise checks, as the row-wise ones (``_json_label``) word them.
_MISSING, _EMPTY_NAME, _EMPTY_LIST = (str(_json_label(v)) for v in (None, "", []))


def _kind_name(kind: type) -> str:
    return "an integer" if kind is int else "a string"


def _columns_hint(shard: ShardConfig) -> str:
    return f"shard.path_column={shard.path_column!r}, shard.label_column={shard.label_column!r}"


def _plan_parquet(source: str, shard: ShardConfig) -> Plan:
    """Parquet is read in place; one pass over the label column finds the label kind and names."""
    with parquet_file(source) as pf:
        return _plan_open_parquet(pf, source, shard)


def _plan_open_parquet(pf, source: str, shard: ShardConfig) -> Plan:
    import pyarrow as pa
    import pyarrow.compute as pc

    names = pf.schema_arrow.names
    for col in (shard.path_column, shard.label_column):
        if col not in names:
            raise InputError(f"shard.source: {source} has no column {col!r} (columns: {', '.join(names)}; "
                             f"set {_columns_hint(shard)})")
    ptype = pf.schema_arrow.field(shard.path_column).type
    ptype = ptype.value_type if pa.types.is_dictionary(ptype) else ptype
    if not (pa.types.is_string(ptype) or pa.types.is_large_string(ptype)):
        raise InputError(f"shard.path_column: {shard.path_column!r} in {source} has type {ptype}; image paths "
                         "and URLs must be strings (is it the right column?)")
    ltype = pf.schema_arrow.field(shard.label_column).type
    if pa.types.is_dictionary(ltype):
        ltype = ltype.value_type
    multi = pa.types.is_list(ltype) or pa.types.is_large_list(ltype)
    if multi:
        ltype = ltype.value_type
    labels = _LabelCollector(shard.label_column, source)
    if pa.types.is_integer(ltype) or pa.types.is_floating(ltype):
        kind = "int"
        for batch in pf.iter_batches(batch_size=1 << 18, columns=[shard.label_column]):
            col = pc.list_flatten(batch.column(0)) if multi else batch.column(0)
            if pa.types.is_floating(ltype):
                col = pc.filter(col, pc.equal(col, pc.floor(col)))
            top = pc.max(col).as_py()
            if top is not None and top >= 0:
                labels.add_int(int(top))
    elif pa.types.is_string(ltype) or pa.types.is_large_string(ltype):
        kind = "str"
        for batch in pf.iter_batches(batch_size=1 << 18, columns=[shard.label_column]):
            col = pc.list_flatten(batch.column(0)) if multi else batch.column(0)
            if pa.types.is_dictionary(col.type):
                col = col.cast(ltype)
            for name in pc.unique(col).to_pylist():
                if name:
                    labels.add_str(name)
    else:
        raise InputError(f"shard.label_column: {shard.label_column!r} in {source} has type {ltype}; "
                         "labels must be integers or strings")
    table = Table(source, shard.path_column, shard.label_column, None, _base_of(source), kind, multi)
    return Plan(table, pf.metadata.num_rows, labels.label_names())


@contextlib.contextmanager
def parquet_file(path: str) -> Iterator[Any]:
    """A ``pyarrow.parquet.ParquetFile`` on a local or remote file, closed afterwards."""
    import fsspec
    import pyarrow.parquet as pq

    try:
        f = fsspec.open(path, "rb").open()
    except FileNotFoundError:
        raise InputError(f"shard.source: {path} does not exist") from None
    with f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
            raise InputError(f"shard.source: {path} is not a readable parquet file: {e}") from None
        yield pf


# --------------------------------------------------------------------------- reading in the tasks


def read_rows(table: Table, start: int, stop: int) -> list[tuple[Optional[str], Any, Optional[str]]]:
    """Rows ``[start, stop)`` as (location, raw label, error or None); reads only the row groups that
    overlap the range."""
    with parquet_file(table.path) as pf:
        return _read_open_rows(pf, table, start, stop)


def _read_open_rows(pf, table: Table, start: int, stop: int) -> list[tuple[Optional[str], Any, Optional[str]]]:
    md = pf.metadata
    groups, first, pos = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos < stop and pos + n > start:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if not groups:
        return []
    cols = [table.path_column, table.label_column] + ([table.error_column] if table.error_column else [])
    rows: list[tuple[Optional[str], Any, Optional[str]]] = []
    pos = first
    for batch in pf.iter_batches(batch_size=1 << 16, row_groups=groups, columns=cols):
        lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
        if lo < hi:
            part = batch.slice(lo, hi - lo)
            lists = [part.column(i).to_pylist() for i in range(len(cols))]
            errors = lists[2] if table.error_column else [None] * len(lists[0])
            rows.extend(zip(lists[0], lists[1], errors))
        pos += batch.num_rows
        if pos >= stop:
            break
    return rows


class Labels:
    """Raw label -> (id, name) for one index; ``Rejected('bad_label')`` when it cannot be one."""

    def __init__(self, kind: str, names: list[str], multi: bool = False):
        self.kind = kind
        self.names = names
        self.multi = multi
        self.ids = {n: i for i, n in enumerate(names)} if kind == "str" else None

    def resolve_all(self, raw: Any) -> tuple[list[int], list[str]]:
        """A multi-label cell (a list, or its JSON text; a lone label is a list of one) -> (ids, names)."""
        values = raw
        if isinstance(raw, str):
            values = parse_label_list(raw) if raw.startswith("[") else [raw]
            if values is None:
                raise Rejected("bad_label", f"not a JSON array of labels: {raw[:80]!r}")
        elif not isinstance(raw, list):
            values = [raw]
        if not values:
            raise Rejected("bad_label", "empty label list")
        ids = sorted({self.resolve(v)[0] for v in values})
        return ids, [self.names[i] for i in ids]

    def resolve(self, raw: Any) -> tuple[int, str]:
        if raw is None or raw == "":
            raise Rejected("bad_label", "missing label")
        if self.ids is not None:
            if isinstance(raw, str) and raw in self.ids:
                return self.ids[raw], raw
            raise Rejected("bad_label", f"{raw!r} is not one of the index's label names")
        value = raw
        if isinstance(raw, str) and _INT.fullmatch(raw):
            value = int(raw)
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Rejected("bad_label", f"expected an integer label, got {type(raw).__name__} {raw!r}")
        if not 0 <= value < len(self.names):
            raise Rejected("bad_label", f"label {value} is out of range 0..{len(self.names) - 1}")
        return value, self.names[value]
