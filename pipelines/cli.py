"""The ``vitscale`` command: parse arguments, load the config, hand over to a stage. No logic here.

Exit codes: 0 ok, 2 bad config or input (the message names the key or file), 1 anything else.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from typing import Callable

from pretrain.errors import InputError

# command -> "module:function". Each function takes (cfg, args) or, for commands without a config, (args).
HANDLERS = {
    "run": "pipelines.run:cli_main",
    "shard": "pipelines.shard:cli_main",
    "pretrain": "pipelines.train_job:cli_main",
    "transfer": "pipelines.transfer_job:cli_main",
    "submit": "pipelines.submit:submit_main",
    "jobs": "pipelines.submit:jobs_main",
    "plan": "pipelines.plan:cli_main",
    "bench": "pipelines.bench.{what}:main",
}
NEEDS_CONFIG = {"run", "shard", "pretrain", "transfer", "submit", "plan"}
WRITES_WORKDIR = {"run", "shard", "pretrain", "transfer", "submit"}


class NotBuilt(Exception):
    pass


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise NotBuilt(module) from None
        raise
    if not hasattr(mod, func):
        raise NotBuilt(f"{module}.{func}")
    return getattr(mod, func)


def _add_config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, help="YAML file or preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set pretrain.steps=100 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vitscale", description="Pretrain Vision Transformers at scale.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="the whole pipeline: shard, pretrain, transfer")
    _add_config_args(p, optional=True)

    p = sub.add_parser("shard", help="turn an image index into WebDataset shards")
    _add_config_args(p, optional=True)
    p.add_argument("--source", help="folder, .csv/.tsv/.parquet/.jsonl index, or builtin:NAME")
    p.add_argument("--out", help="shard directory (default {workdir}/shards)")

    p = sub.add_parser("pretrain", help="DeepSpeed ZeRO pretraining under Ray Train")
    _add_config_args(p)

    p = sub.add_parser("transfer", help="fine-tune / linear probe / few-shot on downstream datasets")
    _add_config_args(p)

    p = sub.add_parser("submit", help="submit the pipeline (or one stage) to a Ray cluster as a Ray Job")
    _add_config_args(p)
    p.add_argument("--address", default=None,
                   help="Ray dashboard address, e.g. http://HEAD:8265 (default $RAY_ADDRESS)")
    p.add_argument("--stage", choices=["run", "shard", "pretrain", "transfer"], default="run")
    p.add_argument("--no-wait", action="store_true", help="return after submission")
    p.add_argument("--dry-run", action="store_true",
                   help="list the files that would be shipped and their size; contact no cluster")
    p.add_argument("--insecure", action="store_true",
                   help="send credentials over plain http:// to a non-loopback address anyway")

    p = sub.add_parser("jobs", help="list / status / logs / stop Ray Jobs")
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", default=None, help="Ray dashboard address (default $RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="logs: stream until the job ends")

    p = sub.add_parser("presets", help="list the built-in configs, or print one")
    p.add_argument("name", nargs="?")

    p = sub.add_parser("bench", help="benchmarks, printed beside their baselines")
    p.add_argument("what", choices=["model", "shard", "loader", "train"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (see bench WHAT --help)")

    p = sub.add_parser("plan", help="capacity plan for a cluster run")
    _add_config_args(p)
    p.add_argument("--images", type=float, required=True, help="dataset size, e.g. 300e6")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100", help="h100 | h200 | a100")
    p.add_argument("--mfu", type=float, default=None, help="assumed MFU (default: measured if known)")
    p.add_argument("--epochs", type=float, default=1.0)
    return ap


def _presets(args: argparse.Namespace) -> None:
    from pipelines.config import list_presets, preset_path

    if args.name:
        print(preset_path(args.name).read_text(), end="")
        return
    for name in list_presets():
        first = preset_path(name).read_text().splitlines()[0].lstrip("# ")
        print(f"{name:16s} {first}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "presets":
            _presets(args)
            return 0
        target = HANDLERS[args.command].format(what=getattr(args, "what", ""))
        if args.command in NEEDS_CONFIG:
            from pipelines.config import check_workdir, load_config

            overrides = list(args.overrides)
            if args.command == "shard" and args.source:
                overrides.insert(0, f"shard.source={args.source}")
            cfg = load_config(args.config, overrides)  # bad config exits 2 before anything starts
            if args.command in WRITES_WORKDIR:
                check_workdir(cfg)
            rc = _resolve(target)(cfg, args)
        else:
            rc = _resolve(target)(args)
        return int(rc or 0)
    except InputError as e:
        print(f"vitscale {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NotBuilt as e:
        print(f"vitscale {args.command}: not built yet ({e} is missing)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vitscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - the one place that turns crashes into exit code 1
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
