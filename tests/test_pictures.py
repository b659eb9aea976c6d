"""The pictures: pretraining curves from pretrain.jsonl, the transfer report's embedded plot, and the
shards' contact sheet. Each is checked as a real PNG of the expected size with the expected content
where content can be checked cheaply (the tile colours of the contact sheet follow the labels).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import cli
from pipelines.config import load_config
from pipelines.preview import CAPTION, HEADER, TILE, sheet_size, write_preview
from pipelines.transfer_report import markdown_report
from pretrain.curves import DPI, FIGSIZE, plot_curves, read_metrics
from pretrain.errors import InputError
from pretrain.shard_format import FORMAT, MANIFEST

# --------------------------------------------------------------------------- pretraining curves


def _jsonl(path: Path) -> Path:
    lines = []
    for step in range(10, 110, 10):
        lines.append({"step": step, "time": 1e9 + step, "loss": 5.0 - step / 50, "lr": 1e-3 * min(1, step / 40),
                      "img_per_s": 100.0 + step, "mfu": 0.3, "hfu": 0.4, "grad_norm": 1.0})
    lines.append({"step": 50, "time": 2e9, "val_loss": 4.5, "val_top1": 0.1})
    lines.append({"step": 60, "time": 3e9, "loss": 1.5, "lr": 1e-3, "img_per_s": 90.0, "mfu": 0.2, "hfu": 0.3})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"step": 110, "lo')  # a torn last line
    return path


def test_curves_png_beside_the_jsonl(tmp_path):
    jsonl = _jsonl(tmp_path / "work" / "logs" / "pretrain.jsonl")
    png = plot_curves(str(jsonl))
    assert png == str(jsonl.parent / "curves.png")
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))

    metrics = read_metrics(jsonl.read_text())
    assert dict(metrics["loss"])[60] == 1.5  # a step logged again after a resume: the latest value wins
    assert [s for s, _ in metrics["loss"]] == list(range(10, 110, 10)) and metrics["val_loss"] == [(50, 4.5)]


def test_curves_to_another_location(tmp_path):
    """The PNG goes where asked (the loop passes a URL on object storage the same way)."""
    jsonl = _jsonl(tmp_path / "pretrain.jsonl")
    out = tmp_path / "elsewhere" / "c.png"
    assert plot_curves(str(jsonl), str(out)) == str(out)
    assert Image.open(out).size == (1000, 700)


# --------------------------------------------------------------------------- transfer report


def test_report_embeds_its_plot():
    rows = [{"dataset": "digits", "init": "pretrained", "finetune": 0.5, "lr": 0.1, "linear": 0.6,
             "fewshot": {"1shot": 0.2}, "steps": 10, "dev": {"0.1": 0.5}}]
    meta = {"name": "t", "export_dir": "/x", "variant": "mu/4", "pretrain_size": 32, "img_size": 32, "batch": 8}
    report = markdown_report(rows, [1], meta)
    last = report.rstrip().splitlines()[-1]
    assert last.startswith("![") and last.endswith("](plot.png)")  # relative: beside report.md


# --------------------------------------------------------------------------- contact sheet

COLORS = [(220, 30, 30), (30, 200, 30), (30, 30, 220)]  # class i: a solid colour, so a tile shows its class
NAMES = ["red", "green", "blue"]


def _shards(out: Path, per_class: int = 5, multi: bool = False) -> Path:
    """Shards as the shard stage writes them (jpg + cls + json, a manifest with label_names), made here."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    samples = [(i, label) for i in range(per_class) for label in range(len(NAMES))]  # mixed, as the stage writes
    entries = []
    for shard, part in enumerate((samples[: len(samples) // 2], samples[len(samples) // 2:])):
        name = f"{shard:06d}.tar"
        with wds.TarWriter(str(out / name)) as w:
            for k, (i, label) in enumerate(part):
                buf = io.BytesIO()
                Image.new("RGB", (64, 48), COLORS[label]).save(buf, format="JPEG", quality=95)
                members = {"json": json.dumps({"labels": [label], "label": [NAMES[label]]}).encode()} if multi \
                    else {"cls": str(label).encode(), "json": json.dumps({"label": NAMES[label]}).encode()}
                w.write({"__key__": f"{shard:06d}_{k:06d}", "jpg": buf.getvalue(), **members})
        entries.append({"name": name, "samples": len(part)})
    manifest = {"format": FORMAT, "label_names": NAMES, "num_classes": len(NAMES), "shards": entries}
    (out / MANIFEST).write_text(json.dumps(manifest))
    return out


def _tile_color(sheet: Image.Image, row: int, col: int) -> tuple[int, ...]:
    return sheet.getpixel((col * TILE + TILE // 2, HEADER + row * (TILE + CAPTION) + TILE // 2))


@pytest.mark.parametrize("multi", [False, True])
def test_contact_sheet_rows_are_classes_with_their_samples(tmp_path, multi):
    out = _shards(tmp_path / "shards", multi=multi)
    png = write_preview(str(out), per_class=4)
    assert png == str(out / "preview.png")
    with Image.open(png) as sheet:
        assert sheet.format == "PNG" and sheet.size == sheet_size(3, 4) == (4 * TILE, HEADER + 3 * (TILE + CAPTION))
        sheet = sheet.convert("RGB")
        for row, color in enumerate(COLORS):  # row i holds class i's samples, all four of them
            for col in range(4):
                assert all(abs(a - b) < 40 for a, b in zip(_tile_color(sheet, row, col), color)), (row, col)


def test_contact_sheet_without_labels_is_an_input_error(tmp_path):
    import webdataset as wds

    out = tmp_path / "unlabelled"
    out.mkdir()
    with wds.TarWriter(str(out / "000000.tar")) as w:
        w.write({"__key__": "a", "jpg": b"not an image"})
    with pytest.raises(InputError, match="no labelled image"):
        write_preview(str(out))


def test_shard_preview_flag_on_complete_shards(tmp_path, capsys):
    """``vitscale shard ... --preview`` draws the sheet after the stage (here: the shards are complete,
    so the stage only checks them and needs no Ray)."""
    from pipelines.shard import shard_dir, stage_hash

    source = tmp_path / "images"
    for name in NAMES:
        (source / name).mkdir(parents=True)
    argv_cfg = [f"workdir={tmp_path / 'wd'}", f"shard.source={source}"]
    cfg = load_config(None, argv_cfg)
    out = _shards(Path(shard_dir(cfg)))
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "hash": stage_hash(cfg), "totals": {"ok": 15, "shards": 2}}))
    assert cli.main(["shard", "--set", argv_cfg[0], "--set", argv_cfg[1], "--preview"]) == 0
    assert f"contact sheet {out / 'preview.png'}" in capsys.readouterr().err
    assert Image.open(out / "preview.png").size == sheet_size(3, 4)
