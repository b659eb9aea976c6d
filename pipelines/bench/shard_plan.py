"""Planning a JSONL index: seconds and the driver's peak memory, in a fresh process.

The index is generated: ``--rows`` lines of ``{"path": URL, "label": NAME}`` (1000 string labels), of
which 10 % fail: a tenth of the rows have a missing or empty label (``bad_label``), and one line in
10,000 more is cut off mid-object (``bad_row``, reported with its line number). Measured: ``plan_stage``
as the shard stage runs it (the plan written, then shuffled), with pyarrow's JSON reader (what the stage
does) and, beside it, line by line with ``json.loads`` (how the reader worked before; ``--no-baseline``
skips it).

    python -m pipelines.bench.shard_plan --rows 1e7
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

BAD_LABEL_EVERY = 10  # a tenth of the rows fail: their label is missing or empty ...
BAD_LINE_EVERY = 10_000  # ... or, for one line in 10,000, the line is not JSON
CLASSES = 1000
LIMIT_MB = 1024

PLAN_SCRIPT = r"""
import json, sys, time
import pipelines.shard as shard
from pipelines.config import load_config

def peak_mb():  # VmHWM: this process's peak RSS
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

index, out, rowwise = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
if rowwise:  # the reader as it was: every line through json.loads
    import pipelines.sources as sources
    sources._JsonlReader.piece = lambda self, data, line: self._add_lines(data, line)
reading = {}
plan_source = shard.plan_source
def timed(*args):  # the index read alone (the plan_stage figure adds the shuffle)
    t0, cpu0 = time.perf_counter(), time.process_time()
    plan = plan_source(*args)
    reading.update(read_s=time.perf_counter() - t0, read_cpu_s=time.process_time() - cpu0, read_peak_mb=peak_mb())
    return plan
shard.plan_source = timed
cfg = load_config(None, [f"shard.source={index}", "shard.samples_per_shard=10000", f"workdir={out}"])
before = peak_mb()
t0, cpu0 = time.perf_counter(), time.process_time()
plan, jobs = shard.plan_stage(cfg, out, shard.stage_hash(cfg))
seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
print(json.dumps({"seconds": seconds, "cpu_s": cpu, **reading, "rows": plan.num_rows, "shards": len(jobs),
                  "classes": len(plan.label_names), "peak_mb": peak_mb(), "before_mb": before}))
"""


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m pipelines.bench.shard_plan", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=float, default=10e6, help="lines of the generated index")
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "vitscale-bench-shard"),
                    help="where the index goes (reused between runs)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the line-by-line reader")
    return ap.parse_args(argv)


def make_jsonl_index(path: str, rows: int, batch: int = 1_000_000) -> None:
    """The index described above, built column-wise in batches (each line's bytes end in a newline,
    so an arrow string array's data buffer is the file's next part)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if os.path.isfile(path + ".rows") and open(path + ".rows").read() == str(rows):
        return
    with open(path + ".tmp", "wb") as f:
        for start in range(0, rows, batch):
            ids = np.arange(start, min(start + batch, rows))
            url = pc.utf8_lpad(pa.array(ids).cast(pa.string()), 10, "0")
            name = pc.utf8_lpad(pa.array(ids * 7919 % CLASSES).cast(pa.string()), 8, "0")
            label = pc.binary_join_element_wise('"n', name, '"', "")
            bad_label = pa.array(ids % BAD_LABEL_EVERY == 3)
            label = pc.if_else(bad_label, pa.array(np.where(ids % 2 == 0, "null", '""')), label)
            head = pc.binary_join_element_wise('{"path": "s3://bucket/images/', url, '.jpg", "label": ', "")
            line = pc.binary_join_element_wise(head, label, "}\n", "")
            cut = pa.array(ids % BAD_LINE_EVERY == 7)
            line = pc.if_else(cut, pc.binary_join_element_wise(head, "\n", ""), line)
            offsets = np.frombuffer(line.buffers()[1], np.int32, len(line) + 1, 4 * line.offset)
            f.write(memoryview(line.buffers()[2])[offsets[0]:offsets[-1]])
    os.replace(path + ".tmp", path)
    with open(path + ".rows", "w") as f:
        f.write(str(rows))


def planning(index: str, root: str, rowwise: bool) -> dict:
    out = os.path.join(root, "plan_out_jsonl")
    shutil.rmtree(out, ignore_errors=True)
    res = subprocess.run([sys.executable, "-c", PLAN_SCRIPT, index, out, "1" if rowwise else "0"],
                         capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode:
        raise RuntimeError(f"planning run failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def figures(root: str, rows: int, baseline: bool = True) -> list[str]:
    """The printed lines: the stage's reader, then (``baseline``) the line-by-line one."""
    os.makedirs(root, exist_ok=True)
    index = os.path.join(root, f"index_{rows}.jsonl")
    make_jsonl_index(index, rows)
    size = os.path.getsize(index)
    lines = [f"planning a {rows:,}-row JSONL index ({size / 1e6:.0f} MB, {CLASSES} string labels, 10 % failing "
             f"rows: {rows // BAD_LABEL_EVERY:,} bad labels, {rows // BAD_LINE_EVERY:,} lines not JSON; "
             f"{-(-rows // 10000)} shards), in a fresh process, then shuffled:"]
    for name, rowwise in [("pyarrow JSON reader (the stage)", False)] + [("line by line, json.loads", True)] * baseline:
        p = planning(index, root, rowwise)
        lines.append(f"  {name:32s} {p['seconds']:6.1f} s ({p['cpu_s']:.1f} CPU-s; reading the index "
                     f"{p['read_s']:.1f} s, {p['read_cpu_s']:.1f} CPU-s), peak driver memory {p['peak_mb']:.0f} MB "
                     f"({p['read_peak_mb']:.0f} MB while reading; "
                     f"after imports {p['before_mb']:.0f} MB; target <= {LIMIT_MB} MB)")
    return lines


def main(args: argparse.Namespace) -> int:
    opts = parse(getattr(args, "rest", None) or [])
    for line in figures(opts.dir, int(opts.rows), baseline=not opts.no_baseline):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(argparse.Namespace(rest=sys.argv[1:])))
