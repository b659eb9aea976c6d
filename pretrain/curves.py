"""The pretraining curves as one picture: loss, learning rate, images/s and MFU over steps.

Drawn from ``{workdir}/logs/pretrain.jsonl`` (``pretrain.loop.MetricsLog``: one JSON object per logged
step) into a PNG beside it, so a run can be judged at a glance without an MLflow server: a loss that
stalls, a warmup that never ends, a loader that starves the GPUs (images/s and MFU sag together).
"""
from __future__ import annotations

import io
import json
from typing import Optional

from pretrain import storage

FIGSIZE, DPI = (10.0, 7.0), 100  # the PNG is FIGSIZE x DPI pixels: 1000 x 700
PANELS = (  # (title, [(metric, label, scale)], y label)
    ("loss", [("loss", "train", 1.0), ("val_loss", "held-out", 1.0)], "loss"),
    ("learning rate", [("lr", "lr", 1.0)], "lr"),
    ("throughput", [("img_per_s", "images/s", 1.0)], "images/s"),
    ("MFU", [("mfu", "MFU", 100.0), ("hfu", "HFU", 100.0)], "% of peak"),
)


def read_metrics(text: str) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step. A step logged twice (a resumed run repeats
    the steps after its last checkpoint) keeps its latest value; a torn last line is ignored."""
    latest: dict[str, dict[int, float]] = {}
    for line in text.splitlines():
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in record.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                latest.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in latest.items()}


def plot_curves(jsonl_path: str, png_path: Optional[str] = None) -> str:
    """Draw the curves of ``jsonl_path`` (a local path or an fsspec URL) into ``png_path`` (default:
    ``curves.png`` beside it), published atomically; returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png_path = png_path or storage.join(storage.parent(jsonl_path), "curves.png")
    metrics = read_metrics(storage.read_text(jsonl_path))
    fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI, sharex=True)
    for ax, (title, series, ylabel) in zip(axes.flat, PANELS):
        drawn = False
        for key, label, scale in series:
            points = metrics.get(key)
            if points:
                ax.plot([s for s, _ in points], [v * scale for _, v in points], label=label,
                        marker="o" if len(points) < 20 else None, markersize=3)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        elif len(ax.lines) > 1:
            ax.legend(fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.suptitle(f"pretraining: {storage.basename(jsonl_path)}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays FIGSIZE x DPI
    plt.close(fig)
    storage.write_bytes(png_path, buf.getvalue())
    return png_path
