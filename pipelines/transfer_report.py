"""The transfer stage's report: a markdown table shaped like the paper's Table 2, a PNG plot, results.json.

Rows are datasets (one more row per dataset, "(from scratch)", when the stage compares with a
randomly initialised model); columns are fine-tuning top-1 on test with the LR the dev split chose,
the linear probe and the few-shot accuracies. Accuracies are percentages, as in the paper.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

DASH = "—"


def row_label(dataset: str, init: str) -> str:
    return dataset if init == "pretrained" else f"{dataset} (from scratch)"


def _pct(value: Optional[float]) -> str:
    return DASH if value is None else f"{100 * value:.2f}"


def markdown_table(rows: list[dict], shots: list[int]) -> str:
    """The Table-2-style markdown: one line per row dict (see ``pipelines.transfer_job.run_transfer``)."""
    head = ["Dataset", "Fine-tune", "LR (dev)", "Linear"] + [f"{k}-shot" for k in shots]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        lr = DASH if r.get("lr") is None else f"{r['lr']:g}"
        cells = [row_label(r["dataset"], r["init"]), _pct(r.get("finetune")), lr, _pct(r.get("linear"))]
        cells += [_pct(r.get("fewshot", {}).get(f"{k}shot")) for k in shots]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(rows: list[dict], shots: list[int], meta: dict[str, Any], plot_name: str = "plot.png") -> str:
    """The whole report.md: what was measured, how, the table, and the plot (``plot_name``, written beside
    it: a relative link, so the report shows it wherever the folder is copied or browsed)."""
    steps = ", ".join(f"{r['dataset']} {r['steps']}" for r in rows if r["init"] == "pretrained")
    dev = []
    for r in rows:
        if r.get("dev"):
            scores = ", ".join(f"{float(lr):g}: {_pct(acc)}" for lr, acc in sorted(r["dev"].items(), key=lambda kv: float(kv[0])))
            dev.append(f"- {row_label(r['dataset'], r['init'])}: {scores}")
    parts = [
        f"# Transfer: {meta['name']}",
        "",
        f"Checkpoint: `{meta['export_dir']}` ({meta['variant']}, pretrained at {meta['pretrain_size']} px), "
        f"fine-tuned at {meta['img_size']} px.",
        "",
        "Top-1 accuracy (%) on each dataset's test split. Fine-tune: the paper's protocol (zero-initialised "
        "head, SGD momentum 0.9, no weight decay, warmup + cosine, clip 1, batch "
        f"{meta['batch']}; steps: {steps}), LR picked on the dev split, then retrained on train + dev and "
        "tested once. Linear: logistic regression on frozen features. k-shot: closed-form regularised least "
        "squares on frozen features (big_vision's few-shot).",
        "",
        markdown_table(rows, shots),
    ]
    if dev:
        parts += ["Dev accuracy (%) per LR:", "", *dev, ""]
    parts += [f"![Test accuracy per dataset, and dev accuracy against the learning rate]({plot_name})", ""]
    return "\n".join(parts)


def plot(rows: list[dict], shots: list[int], path: Path) -> Path:
    """Grouped bars of every test accuracy per row, and dev accuracy against LR beside them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["Fine-tune", "Linear"] + [f"{k}-shot" for k in shots]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        values = [r.get("finetune"), r.get("linear")] + [r.get("fewshot", {}).get(f"{k}shot") for k in shots]
        xs = [j + i * width for j, v in enumerate(values) if v is not None]
        left.bar(xs, [100 * v for v in values if v is not None], width, label=row_label(r["dataset"], r["init"]))
        if r.get("dev"):
            pts = sorted((float(lr), 100 * acc) for lr, acc in r["dev"].items())
            right.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=row_label(r["dataset"], r["init"]))
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    left.set_ylabel("test top-1 (%)")
    left.set_ylim(0, 100)
    left.legend(fontsize=8)
    left.set_title("Transfer (Table 2 layout)")
    right.set_xscale("log")
    right.set_xlabel("learning rate")
    right.set_ylabel("dev top-1 (%)")
    right.set_title("LR selection on dev")
    if right.lines:
        right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: Path, data: dict) -> Path:
    """Atomic write: a reader (``transfer_complete``) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
