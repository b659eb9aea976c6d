"""Index readers and planning: every source kind gives the same (location, label) rows, read by row
range, with a stable label id map; plus the formula-driven fractal source."""
from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.config import BuiltinSourceConfig, ShardConfig
from pipelines.fractal import generate
from pipelines.images import Rejected
from pipelines.sources import Labels, fingerprint, plan_source, read_rows, source_kind
from pretrain.errors import InputError

ROWS = [(f"img/{i:03d}.jpg", ["cat", "dog", "eel"][i % 3]) for i in range(23)]


def all_rows(plan):
    return read_rows(plan.table, 0, plan.num_rows)


def test_csv_tsv_jsonl_parquet_folder_agree(tmp_path):
    shard = ShardConfig(samples_per_shard=5)
    with open(tmp_path / "i.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *ROWS])
    with open(tmp_path / "i.tsv", "w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([("path", "label"), *ROWS])
    with open(tmp_path / "i.jsonl", "w") as f:
        f.writelines(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in ROWS)
    pq.write_table(pa.table({"path": [p for p, _ in ROWS], "label": [lab for _, lab in ROWS]}),
                   tmp_path / "i.parquet", row_group_size=7)
    for cls in ("cat", "dog", "eel"):
        os.makedirs(tmp_path / "folder" / cls)
    for p, lab in ROWS:
        (tmp_path / "folder" / lab / os.path.basename(p)).write_bytes(b"x")
    (tmp_path / "folder" / "cat" / "notes.txt").write_text("not an image: skipped")
    (tmp_path / "folder" / ".hidden").mkdir()

    expected = [(p, lab, None) for p, lab in ROWS]
    for name in ("i.csv", "i.tsv", "i.jsonl", "i.parquet"):
        plan = plan_source(str(tmp_path / name), shard, str(tmp_path / f"plan-{name}"))
        assert plan.num_rows == len(ROWS), name
        assert plan.label_names == ["cat", "dog", "eel"], name
        assert plan.table.label_kind == "str"
        assert all_rows(plan) == expected, name
        assert plan.table.base == str(tmp_path)
    plan = plan_source(str(tmp_path / "folder"), shard, str(tmp_path / "plan-folder"))
    assert plan.label_names == ["cat", "dog", "eel"]
    folder_rows = all_rows(plan)
    assert sorted(folder_rows) == sorted((f"{lab}/{os.path.basename(p)}", lab, None) for p, lab in ROWS)
    assert folder_rows == sorted(folder_rows, key=lambda r: (r[1], r[0]))  # class by class, sorted


def test_row_ranges_cross_row_groups(tmp_path):
    n = 50
    pq.write_table(pa.table({"path": [f"{i}.jpg" for i in range(n)], "label": list(range(n))}),
                   tmp_path / "i.parquet", row_group_size=7)
    plan = plan_source(str(tmp_path / "i.parquet"), ShardConfig(samples_per_shard=10), str(tmp_path / "p"))
    assert plan.table.label_kind == "int" and plan.label_names == [str(i) for i in range(n)]
    for start, stop in [(0, 10), (5, 16), (13, 14), (40, 50), (45, 60)]:
        rows = read_rows(plan.table, start, stop)
        assert [r[0] for r in rows] == [f"{i}.jpg" for i in range(start, min(stop, n))]


def test_plan_files_have_one_row_group_per_shard(tmp_path):
    with open(tmp_path / "i.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label"), *ROWS])
    plan = plan_source(str(tmp_path / "i.csv"), ShardConfig(samples_per_shard=5), str(tmp_path / "p"))
    md = pq.ParquetFile(plan.table.path).metadata
    assert [md.row_group(g).num_rows for g in range(md.num_row_groups)] == [5, 5, 5, 5, 3]


def test_integer_labels_in_csv_and_name_order(tmp_path):
    with open(tmp_path / "ints.csv", "w") as f:
        f.write("path,label\na.jpg,2\nb.jpg,0\nc.jpg,\nd.jpg,10\n")
    plan = plan_source(str(tmp_path / "ints.csv"), ShardConfig(), str(tmp_path / "p1"))
    assert plan.table.label_kind == "int" and plan.label_names == [str(i) for i in range(11)]
    rows = all_rows(plan)
    assert rows[2] == ("c.jpg", None, "bad_label: missing label")
    labels = Labels(plan.table.label_kind, plan.label_names)
    assert labels.resolve(rows[0][1]) == (2, "2") and labels.resolve(rows[3][1]) == (10, "10")
    # one non-number turns the column into names, sorted as text
    with open(tmp_path / "mixed.csv", "w") as f:
        f.write("path,label\na.jpg,2\nb.jpg,zebra\nc.jpg,10\n")
    plan = plan_source(str(tmp_path / "mixed.csv"), ShardConfig(), str(tmp_path / "p2"))
    assert plan.table.label_kind == "str" and plan.label_names == ["10", "2", "zebra"]


def test_jsonl_wrong_label_types_are_row_errors(tmp_path):
    lines = [{"path": "a.jpg", "label": 1}, {"path": "b.jpg", "label": "seven"}, {"path": "c.jpg", "label": 2.5},
             {"path": "d.jpg", "label": [1]}, {"path": "e.jpg", "label": True}, {"path": "f.jpg", "label": -3},
             {"path": "g.jpg"}, {"path": "h.jpg", "label": 4.0}]
    with open(tmp_path / "i.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)
        f.write("{not json\n")
    plan = plan_source(str(tmp_path / "i.jsonl"), ShardConfig(), str(tmp_path / "p"))
    assert plan.num_rows == 9 and plan.table.label_kind == "int" and plan.label_names == ["0", "1", "2", "3", "4"]
    errors = [r[2] for r in all_rows(plan)]
    assert errors[0] is None and errors[7] is None
    assert errors[3] is None and plan.table.multi  # a list is a multi-label row: the index is multi-label
    for i in (1, 2, 4, 5, 6):
        assert errors[i].startswith("bad_label: "), (i, errors[i])
    assert errors[8].startswith("bad_row: line 9")


def test_parquet_labels_checked_per_row(tmp_path):
    pq.write_table(pa.table({"path": ["a", "b", "c", "d"], "label": [1.0, 2.5, None, -1.0]}), tmp_path / "f.parquet")
    plan = plan_source(str(tmp_path / "f.parquet"), ShardConfig(), str(tmp_path / "p"))
    labels = Labels(plan.table.label_kind, plan.label_names)
    raws = [r[1] for r in all_rows(plan)]
    assert labels.resolve(raws[0]) == (1, "1")
    for raw in raws[1:]:
        with pytest.raises(Rejected) as err:
            labels.resolve(raw)
        assert err.value.reason == "bad_label"


def test_bad_sources_name_the_problem(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        source_kind(str(tmp_path / "nope"))
    (tmp_path / "x.txt").write_text("?")
    with pytest.raises(InputError, match="unknown index kind"):
        source_kind(str(tmp_path / "x.txt"))
    pq.write_table(pa.table({"url": ["a"], "label": [1]}), tmp_path / "i.parquet")
    with pytest.raises(InputError, match="no column 'path'"):
        plan_source(str(tmp_path / "i.parquet"), ShardConfig(), str(tmp_path / "p"))
    (tmp_path / "i.csv").write_text("url,label\na,1\n")
    with pytest.raises(InputError, match="i.csv"):
        plan_source(str(tmp_path / "i.csv"), ShardConfig(), str(tmp_path / "p2"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no class subfolders"):
        plan_source(str(tmp_path / "empty"), ShardConfig(), str(tmp_path / "p3"))


def test_fingerprint_follows_the_index(tmp_path):
    index = tmp_path / "i.csv"
    index.write_text("path,label\na.jpg,1\n")
    first = fingerprint(str(index))
    assert fingerprint(str(index)) == first
    index.write_text("path,label\na.jpg,1\nb.jpg,2\n")
    assert fingerprint(str(index)) != first


def _digest(folder) -> str:
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(folder)):
        for name in sorted(files):
            h.update(name.encode() + open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


def test_fractal_source_is_deterministic_and_learnable(tmp_path):
    settings = BuiltinSourceConfig(classes=6, images_per_class=12, image_size=32)
    index = generate(str(tmp_path / "a"), settings, seed=3)
    generate(str(tmp_path / "b"), settings, seed=3)
    generate(str(tmp_path / "c"), settings, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    mtime = os.path.getmtime(index)
    assert generate(str(tmp_path / "a"), settings, seed=3) == index and os.path.getmtime(index) == mtime  # reused

    plan = plan_source(index, ShardConfig(samples_per_shard=10), str(tmp_path / "plan"))
    assert plan.num_rows == 72 and plan.label_names == [f"fractal_{c:03d}" for c in range(6)]
    rows = all_rows(plan)
    assert len({r[1] for r in rows[:12]}) >= 3  # index order mixes the classes within a shard
    # The classes are different pictures: nearest class mean on half the images classifies the other half.
    x = np.stack([np.asarray(Image.open(tmp_path / "a" / r[0]).convert("L").resize((16, 16)), np.float32).ravel()
                  for r in rows])
    y = np.array([plan.label_names.index(r[1]) for r in rows])
    train = np.zeros(len(y), bool)
    for c in range(6):
        train[np.flatnonzero(y == c)[:6]] = True
    means = np.stack([x[train & (y == c)].mean(0) for c in range(6)])
    pred = np.argmin(((x[~train][:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == y[~train]).mean() > 0.5  # chance is 1/6


def test_label_lists_in_csv_and_parquet_make_a_multi_label_index(tmp_path):

    from pipelines.sources import Labels

    (tmp_path / "m.csv").write_text('path,label\na.jpg,"[1, 3]"\nb.jpg,2\nc.jpg,"[0]"\n')
    plan = plan_source(str(tmp_path / "m.csv"), ShardConfig(), str(tmp_path / "p"))
    assert plan.table.multi and plan.table.label_kind == "int" and plan.label_names == ["0", "1", "2", "3"]
    labels = Labels(plan.table.label_kind, plan.label_names, multi=True)
    assert [labels.resolve_all(r[1]) for r in all_rows(plan)] == [([1, 3], ["1", "3"]), ([2], ["2"]), ([0], ["0"])]

    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "label": pa.array([["cat", "dog"], ["dog"]])}),
                   tmp_path / "m.parquet")
    plan = plan_source(str(tmp_path / "m.parquet"), ShardConfig(), str(tmp_path / "q"))
    assert plan.table.multi and plan.table.label_kind == "str" and plan.label_names == ["cat", "dog"]
    labels = Labels(plan.table.label_kind, plan.label_names, multi=True)
    assert [labels.resolve_all(r[1])[0] for r in all_rows(plan)] == [[0, 1], [1]]


ODD_LINES = ["{not json", "", "  \t", "null", "[1, 2]", "{}", '{"path": "a.jpg", "label": 1, "label": 3}',
             json.dumps({"path": 12, "label": 1}), json.dumps({"path": 'é"\\q.jpg', "label": {"id": 1}}),
             json.dumps({"path": "o.jpg", "label": 1}) + json.dumps({"path": "p.jpg", "label": 2}),
             json.dumps({"path": "r.jpg", "label": 1}) + "\r", json.dumps({"path": "s.jpg", "label": True}),
             json.dumps({"path": "t.jpg", "label": None}), json.dumps({"path": "u.jpg", "label": -3}),
             json.dumps({"path": "v.jpg", "label": 4.0}), json.dumps({"path": "w.jpg", "label": 2.5}),
             json.dumps({"path": "x.jpg", "label": "seven"}), json.dumps({"path": "y.jpg", "label": [1, 2]}),
             json.dumps({"path": "z.jpg", "label": ""})]


def _odd_jsonl_lines(rng, n: int, every: int = 0) -> list[str]:
    """Rows with integer labels and, at random (or every ``every`` lines), lines or labels of every kind
    the row-wise rules have a reason for. The first valid label makes the index's ids integers."""
    lines = [json.dumps({"path": "first.jpg", "label": 0})]
    for i in range(1, n):
        odd = i % every == 0 if every else rng.random() < 0.3
        lines.append(rng.choice(ODD_LINES) if odd else
                     json.dumps({"path": f"img/{i}.jpg", "label": rng.randrange(40), "x": rng.choice([1, "y"])}))
    return lines


def _multi_jsonl_lines(rng, n: int) -> list[str]:
    names = ["cat", "dog", 'q"uote', "back\\slash", "é", "x y"]
    cells = [[], ["cat", None], ["cat", ""], None, "dog", ["cat", 3], ["ctl\x01"]]
    return [json.dumps({"path": f"m/{i}.jpg", "label": rng.sample(names, rng.randrange(1, 4)) if rng.random() < 0.85
                        else rng.choice(cells)}, ensure_ascii=i % 2 == 0) for i in range(n)]


def _plan_jsonl(monkeypatch, tmp_path, name: str, chunk: int, row_wise: bool = False):
    """(rows with label lists parsed, label names, kind, multi) and how many rows took the row-wise rules."""
    import pipelines.sources as sources

    calls = []
    add_row = sources._JsonlReader._add_row
    with monkeypatch.context() as m:
        m.setattr(sources, "JSONL_CHUNK", chunk)
        m.setattr(sources._JsonlReader, "_add_row", lambda self, *a: calls.append(1) or add_row(self, *a))
        if row_wise:
            m.setattr(sources._JsonlReader, "piece", lambda self, data, line: self._add_lines(data, line))
        plan = plan_source(str(tmp_path / "i.jsonl"), ShardConfig(samples_per_shard=97), str(tmp_path / name))
    rows = [(path, json.loads(label) if label and label.startswith("[") else label, error)
            for path, label, error in all_rows(plan)]
    return (rows, plan.label_names, plan.table.label_kind, plan.table.multi), len(calls)


@pytest.mark.parametrize("make", [_odd_jsonl_lines, _multi_jsonl_lines])
def test_jsonl_read_by_pyarrow_equals_the_row_wise_rules(tmp_path, monkeypatch, make):
    """The chunked, column-wise JSONL reader gives the rows, reasons, line numbers and label names that
    reading line by line with json.loads gives, however the lines fall into chunks."""
    import random

    (tmp_path / "i.jsonl").write_text("\n".join(make(random.Random(0), 3000)) + "\n\n", encoding="utf-8")
    expected, _ = _plan_jsonl(monkeypatch, tmp_path, "rowwise", 1 << 20, row_wise=True)
    assert any(e and e.startswith("bad_row: line ") for _, _, e in expected[0]) or make is _multi_jsonl_lines
    for chunk in (1 << 20, 4096, 200):  # one chunk; many; lines longer than a chunk
        assert _plan_jsonl(monkeypatch, tmp_path, f"chunk{chunk}", chunk)[0] == expected, chunk


def test_jsonl_rows_take_the_row_wise_rules_only_near_a_bad_line(tmp_path, monkeypatch):
    import random

    lines = _odd_jsonl_lines(random.Random(1), 6000, every=500)
    (tmp_path / "i.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    expected, _ = _plan_jsonl(monkeypatch, tmp_path, "rowwise", 1 << 20, row_wise=True)
    got, row_wise = _plan_jsonl(monkeypatch, tmp_path, "chunked", 1 << 20)
    assert got == expected
    assert row_wise <= 11 * 64, row_wise  # at most a few dozen lines around each of the 11 odd ones


def test_compressed_jsonl(tmp_path):
    import gzip

    with gzip.open(tmp_path / "i.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in ROWS)
    plan = plan_source(str(tmp_path / "i.jsonl.gz"), ShardConfig(samples_per_shard=5), str(tmp_path / "p"))
    assert all_rows(plan) == [(p, lab, None) for p, lab in ROWS] and plan.label_names == ["cat", "dog", "eel"]


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    (tmp_path / "i.jsonl").write_bytes(b'{"path": "a.jpg", "label": 1}\n{"path": "b\xff.jpg", "label": 1}\n')
    with pytest.raises(InputError, match="line 2 is not UTF-8"):
        plan_source(str(tmp_path / "i.jsonl"), ShardConfig(), str(tmp_path / "p"))
