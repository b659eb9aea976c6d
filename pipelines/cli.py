"""The ``vitscale`` command: parse arguments, set up logging, load the config, hand over to a stage.
No logic here.

Exit codes: 0 ok, 2 bad config or input (the message names the key or file), 1 anything else.
Each command's handler is a plain function below that imports its stage when called, so
``vitscale --help`` and a config error stay instant and a reader can follow a command to its code.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import textwrap
import traceback
from typing import Callable

from pretrain.errors import InputError

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- handlers
# Each takes (cfg, args) when the command is in NEEDS_CONFIG, else (args); returns the exit code.


def _run(cfg, args) -> int:
    from pipelines.run import cli_main

    return cli_main(cfg, args)


def _shard(cfg, args) -> int:
    from pipelines.shard import cli_main, shard_dir

    rc = cli_main(cfg, args)
    if not rc and args.preview:
        from pipelines.preview import write_preview

        path = write_preview(shard_dir(cfg, args.out))
        log.info("[vitscale] shard: contact sheet %s", path)
    return rc


def _pretrain(cfg, args) -> int:
    from pipelines.train_job import cli_main

    return cli_main(cfg, args)


def _transfer(cfg, args) -> int:
    from pipelines.transfer_job import cli_main

    return cli_main(cfg, args)


def _submit(cfg, args) -> int:
    from pipelines.submit import submit_main

    return submit_main(cfg, args)


def _plan(cfg, args) -> int:
    from pipelines.plan import cli_main

    return cli_main(cfg, args)


def _jobs(args) -> int:
    from pipelines.submit import jobs_main

    return jobs_main(args)


def _bench(args) -> int:
    if args.what == "model":
        from pipelines.bench.model import main
    elif args.what == "shard":
        from pipelines.bench.shard import main
    elif args.what == "loader":
        from pipelines.bench.loader import main
    else:
        from pipelines.bench.train import main
    return main(args)


def _presets(args) -> int:
    from pipelines.config import list_presets, preset_path

    if args.name:
        print(preset_path(args.name).read_text(), end="")
        return 0
    for name in list_presets():
        text = first_sentence(preset_path(name).read_text(), name)
        print(textwrap.fill(text, 100, initial_indent=f"{name:16s} ", subsequent_indent=" " * 17))
    return 0


def _config(args) -> int:
    from pipelines.config import load_config, to_dict

    if args.action == "schema":
        print(json.dumps(json_schema(), indent=2))
        return 0
    data = to_dict(load_config(args.config, args.overrides))
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        import yaml

        print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


HANDLERS: dict[str, Callable[..., int]] = {
    "run": _run, "shard": _shard, "pretrain": _pretrain, "transfer": _transfer, "submit": _submit,
    "plan": _plan, "jobs": _jobs, "bench": _bench, "presets": _presets, "config": _config,
}
NEEDS_CONFIG = {"run", "shard", "pretrain", "transfer", "submit", "plan"}
WRITES_WORKDIR = {"run", "shard", "pretrain", "transfer", "submit"}


def first_sentence(preset_text: str, name: str) -> str:
    """The first full sentence of a preset's leading comment, without its ``# name:`` label."""
    comment = []
    for line in preset_text.splitlines():
        if not line.startswith("#"):
            break
        comment.append(line.lstrip("#").strip())
    text = " ".join(comment)
    text = text[len(name) + 1:].strip() if text.startswith(f"{name}:") else text
    depth = 0
    for i, ch in enumerate(text):  # a full stop outside brackets, then a space or the end: "0.9" is not one
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if ch == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
            return text[: i + 1]
    return text


def json_schema() -> dict:
    """A JSON Schema of the config for editors (YAML language servers): types, choices, defaults; an
    unknown key is flagged, as ``vitscale`` would refuse it."""
    import pydantic

    from pipelines.config import Config

    schema = pydantic.TypeAdapter(Config).json_schema()
    for node in [schema, *schema.get("$defs", {}).values()]:
        if node.get("type") == "object" and "properties" in node:
            node["additionalProperties"] = False
    schema["title"] = "vitscale config"
    return schema


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("vitscale")
    except PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "unknown (not installed)"


# --------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    """argparse, plus "did you mean" when a command or choice is mistyped."""

    def error(self, message: str) -> None:  # type: ignore[override]
        from pretrain.config import did_you_mean

        m = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if m:
            guess = did_you_mean(m.group(1), re.findall(r"'([^']*)'", m.group(2)))
            if guess:
                message += f"; did you mean {guess!r}?"
        super().error(message)


class _Help(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; an option's default shown when it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _add_command(sub, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    description = textwrap.dedent(description).strip()
    if name in NEEDS_CONFIG or name == "config":
        description += "\n\n" + CONFIG_TEXT
    p = sub.add_parser(name, help=summary, description=f"{summary}.\n\n{description}",
                       epilog="examples:\n" + textwrap.indent(textwrap.dedent(examples).strip(), "  "),
                       formatter_class=_Help)
    _add_verbosity(p, argparse.SUPPRESS)
    return p


def _add_verbosity(p: argparse.ArgumentParser, default) -> None:
    # On the subcommands too (default SUPPRESS, so they do not reset the top level's): `vitscale run -v`.
    p.add_argument("-v", "--verbose", action="count", default=default,
                   help="more output: -v this project's debug lines, -vv other libraries' info too")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None,
                   help="YAML file or preset name" + (" (default: the local preset)" if optional else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.steps=100 (repeatable; values are YAML)")


CONFIG_TEXT = "CONFIG is a YAML file or a preset name (`vitscale presets`); --set KEY=VALUE overrides one key."


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="vitscale", formatter_class=_Help,
                 description="Pretrain Vision Transformers at scale, then measure how they transfer.",
                 epilog="exit codes: 0 ok, 2 bad config or input (the message names the key or file), 1 anything "
                        "else.\nsee `vitscale COMMAND --help` for each command's options and examples.")
    ap.add_argument("--version", action="version", version=f"vitscale {version()}")
    _add_verbosity(ap, 0)
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _add_command(sub, "run", "the whole pipeline: shard, pretrain, transfer", """
        Runs the three stages under one MLflow parent run; a stage whose output is complete is skipped,
        so running the same command again resumes.""", """
        vitscale run                                   # the local preset: CPU, a few minutes
        vitscale run my.yaml --set pretrain.steps=200""")
    _add_config_args(p, optional=True)

    p = _add_command(sub, "shard", "turn an image index into WebDataset shards", """
        The index is a folder of class subfolders, a .csv/.tsv/.parquet/.jsonl file of paths or URLs, or
        builtin:fractal. Shards go to {workdir}/shards unless --out says otherwise; a rerun redoes only
        missing shards.""", """
        vitscale shard local --preview                 # then look at {workdir}/shards/preview.png
        vitscale shard --source data/images --out /shared/shards --set shard.image_size=256""")
    _add_config_args(p, optional=True)
    p.add_argument("--source", help="folder, .csv/.tsv/.parquet/.jsonl index, or builtin:NAME (sets shard.source)")
    p.add_argument("--out", help="shard directory (default {workdir}/shards)")
    p.add_argument("--preview", action="store_true",
                   help="then save preview.png in the shard directory: a few samples per class with their labels")

    p = _add_command(sub, "pretrain", "DeepSpeed ZeRO pretraining under Ray Train", """
        Reads {workdir}/shards (or pretrain.shards), checkpoints to {workdir}/checkpoints and resumes from
        there by itself, exports {workdir}/export. Curves: {workdir}/logs/pretrain.jsonl.""", """
        vitscale pretrain local --set pretrain.steps=50
        vitscale pretrain vit_b16_i21k --set workdir=s3://my-bucket/b16""")
    _add_config_args(p)

    p = _add_command(sub, "transfer", "fine-tune / linear probe / few-shot on downstream datasets", """
        The paper's fine-tuning protocol over a dataset x LR grid, a linear probe and few-shot least
        squares; writes {workdir}/transfer/report.md, plot.png and results.json.""", """
        vitscale transfer local
        vitscale transfer my.yaml --set 'transfer.datasets=[cifar10, cifar100]'""")
    _add_config_args(p)

    p = _add_command(sub, "submit", "submit the pipeline (or one stage) to a Ray cluster as a Ray Job", """
        Ships what git would commit (never secrets) and the resolved config; credentials travel as
        environment variables from this shell. The address is --address or $RAY_ADDRESS.""", """
        export RAY_ADDRESS=http://127.0.0.1:8265       # e.g. kubectl port-forward svc/HEAD-svc 8265:8265
        vitscale submit vit_l16_jft --set workdir=s3://my-bucket/l16 --stage shard
        vitscale submit my.yaml --address https://ray.internal:8265 --dry-run""")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="Ray dashboard address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    p.add_argument("--stage", choices=["run", "shard", "pretrain", "transfer"], default="run",
                   help="what the job runs")
    p.add_argument("--no-wait", action="store_true", help="return after submission")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files that would be shipped and their size; contact no cluster")
    p.add_argument("--insecure", action="store_true",
                   help="send credentials over plain http:// to a non-loopback address anyway")

    p = _add_command(sub, "jobs", "list / status / logs / stop Ray Jobs", """
        Against the dashboard at --address or $RAY_ADDRESS. `jobs stop` waits until the job has ended.""", """
        vitscale jobs list
        vitscale jobs logs vitscale-local-run-1a2b3c4d --follow
        vitscale jobs stop vitscale-local-run-1a2b3c4d --address http://127.0.0.1:8265""")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", help="the job (see `vitscale jobs list`)")
    p.add_argument("--address", default=None, help="Ray dashboard address (default $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    p = _add_command(sub, "presets", "list the built-in configs, or print one", """
        Without NAME: each preset with the first sentence of its comment. With NAME: the whole file,
        which can be copied and edited.""", """
        vitscale presets
        vitscale presets vit_l16_jft > my.yaml""")
    p.add_argument("name", nargs="?", help="a preset to print")

    p = _add_command(sub, "config", "print the resolved config, or its JSON Schema", """
        show: the config after the file or preset, --set overrides and defaults, as YAML (or --json); what it
        prints loads back to the same config. schema: a JSON Schema for editors.""", """
        vitscale config show vit_b16_i21k --set pretrain.steps=10 > my.yaml
        vitscale config show local --json
        vitscale config schema > vitscale.schema.json""")
    cfg_sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = cfg_sub.add_parser("show", help="the resolved config", formatter_class=_Help,
                           description="The resolved config as YAML (or JSON). " + CONFIG_TEXT)
    _add_config_args(q, optional=True)
    q.add_argument("--json", action="store_true", help="JSON instead of YAML")
    q = cfg_sub.add_parser("schema", help="the config's JSON Schema", formatter_class=_Help,
                           description="A JSON Schema of the config file, for editors.")
    for q in cfg_sub.choices.values():
        _add_verbosity(q, argparse.SUPPRESS)

    p = _add_command(sub, "bench", "benchmarks, printed beside their baselines", """
        model: ours against timm; shard: the shard stage's images/s; loader: the loader against
        webdataset's; train: the train step (add --gpu on a GPU). Figures are printed, never asserted.""", """
        vitscale bench model B/16@224 --batch 8
        vitscale bench train --help""")
    p.add_argument("what", choices=["model", "shard", "loader", "train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see bench WHAT --help)")

    p = _add_command(sub, "plan", "capacity plan for a cluster run", """
        Time per epoch, GPU-hours, loader cores, shard count, storage and bandwidth, and the memory per
        GPU, before any GPU is rented. MFU is measured (bench train) when known, else assumed.
       """, """
        vitscale plan vit_l16_jft --images 300e6 --nodes 32 --gpus-per-node 8 --gpu h100""")
    _add_config_args(p)
    p.add_argument("--images", type=float, required=True, help="dataset size, e.g. 300e6")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help="h100 | h200 | h100-pcie | a100")
    p.add_argument("--interconnect", default=None,
                   help="network between nodes: GB/s per GPU, or ib-ndr | ib-hdr | roce-400g | efa-p5 | efa-p4d | "
                        "tcp-100g | tcp-25g (default: ib-ndr, assumed)")
    p.add_argument("--mfu", type=float, default=None, help="assumed MFU (default: measured if known)")
    p.add_argument("--epochs", type=float, default=1.0)
    return ap


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.log import setup

    setup(-1 if args.quiet else args.verbose)
    try:
        handler = HANDLERS[args.command]
        if args.command not in NEEDS_CONFIG:
            return int(handler(args) or 0)
        from pipelines.config import check_workdir, load_config

        overrides = list(args.overrides)
        if args.command == "shard" and args.source:
            overrides.insert(0, f"shard.source={args.source}")
        cfg = load_config(args.config, overrides)  # bad config exits 2 before anything starts
        if args.command in WRITES_WORKDIR:
            check_workdir(cfg)
        return int(handler(cfg, args) or 0)
    except InputError as e:
        print(f"vitscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vitscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the one place that turns crashes into exit code 1
        traceback.print_exc()
        return 1


def entry() -> None:
    """The ``vitscale`` console script: ``main``, then a local Ray it started is stopped, the exit hooks
    run and the process ends without the interpreter's teardown: freeing the objects of the thousands
    of modules MLflow and Ray import is a noticeable part of a short command (the README has the
    figure) and changes nothing a command wrote. Threads and exit hooks finish as in a normal exit."""
    import atexit
    import os
    import threading

    code = main()
    from pipelines.cluster import stop_ray

    stop_ray()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
