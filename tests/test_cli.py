"""The ``vitscale`` command: exit codes 0 / 1 / 2, messages that name the key or file, no tracebacks.

A few runs go through the installed console script in a subprocess (what a user types); the rest call
``pipelines.cli.main`` in-process, with stand-in stage functions put behind a command where the exit
codes themselves are tested.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines import cli
from pipelines.config import Config, list_presets, load_config, preset_path
from pretrain.errors import InputError

VITSCALE = Path(sys.executable).with_name("vitscale")
COMMANDS = ["run", "shard", "pretrain", "transfer", "submit", "jobs", "presets", "bench", "plan"]


def _vitscale(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VITSCALE), *args], capture_output=True, text=True, timeout=120)


def test_console_script_presets_and_bad_config(tmp_path):
    ok = _vitscale("presets")
    assert ok.returncode == 0, ok.stderr
    for name in list_presets():
        assert name in ok.stdout
    missing = tmp_path / "missing.yaml"
    bad = _vitscale("pretrain", str(missing))
    assert bad.returncode == 2
    assert f"{missing}: config file not found" in bad.stderr and "Traceback" not in bad.stderr


def test_console_script_bad_set_exits_2_naming_the_key():
    bad = _vitscale("transfer", "local", "--set", "pretrain.zero_stage=4")
    assert bad.returncode == 2
    assert "pretrain.zero_stage" in bad.stderr and "Traceback" not in bad.stderr


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


@pytest.mark.parametrize("name", ["local", "vit_b16_i21k", "vit_l16_jft", "vit_h14_jft"])
def test_presets_print(capsys, name):
    assert cli.main(["presets", name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# {name}:") and f"name: {name}" in out


def test_unknown_preset_exits_2(capsys):
    assert cli.main(["presets", "nope"]) == 2
    assert "preset 'nope' does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("argv,expected", [
    (["pretrain", "no_such_preset"], "preset 'no_such_preset' does not exist"),
    (["run", "local", "--set", "pretrain.bogus=1"], "pretrain.bogus: unknown key"),
    (["shard", "local", "--set", "shard.quality=0"], "shard.quality"),
    (["plan", "local", "--images", "1e6", "--nodes", "1", "--set", "model.variant=X/1"], "model.variant"),
    (["submit", "local", "--address", "http://127.0.0.1:1", "--set", "pretrain.lr=-1"], "pretrain.lr"),
    (["transfer", "local", "--set", "pretrain.steps"], "expected key=value"),
])
def test_bad_config_exits_2_before_any_stage(capsys, argv, expected):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert err.startswith(f"vitscale {argv[0]}: error:")


def test_bad_bench_case_exits_2(capsys):
    assert cli.main(["bench", "model", "Q/16@224"]) == 2
    assert "bench case 'Q/16@224'" in capsys.readouterr().err


def test_argparse_errors_exit_2():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "nothing"])
    assert e.value.code == 2


# --------------------------------------------------------------------------- handlers


def test_every_command_has_a_plain_function_handler():
    """A reader (or a tool) follows a command to its code: each handler is a function of cli.py."""
    assert set(cli.HANDLERS) == set(COMMANDS) | {"config"}
    assert all(callable(h) and h.__module__ == "pipelines.cli" for h in cli.HANDLERS.values())


@pytest.fixture
def fake_stage(monkeypatch):
    """Put a stage function (one that succeeds, fails on input, crashes or logs) behind ``vitscale plan``."""
    return lambda handler: monkeypatch.setitem(cli.HANDLERS, "plan", handler)


PLAN = ["plan", "local", "--images", "1e6", "--nodes", "1"]


def _ok(cfg, args):
    print("ran", cfg.name)
    return 0


def _bad_input(cfg, args):
    raise InputError("data/index.csv: no such file")


def _crash(cfg, args):
    raise RuntimeError("boom")


def test_exit_codes_of_a_stage(fake_stage, capsys):
    fake_stage(_ok)
    assert cli.main(PLAN) == 0
    assert "ran local" in capsys.readouterr().out

    fake_stage(_bad_input)
    assert cli.main(PLAN) == 2
    err = capsys.readouterr().err
    assert "vitscale plan: error: data/index.csv: no such file" in err and "Traceback" not in err

    fake_stage(_crash)
    assert cli.main(PLAN) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err  # a bug: the traceback is what helps


def _logs(cfg, args):
    log = logging.getLogger("pipelines.some_stage")
    log.debug("detail line")
    log.info("[vitscale] progress line")
    log.warning("something to act on")
    return 0


@pytest.mark.parametrize("flags,shown,hidden", [
    ([], ["[vitscale] progress line", "warning: something to act on"], ["detail line"]),
    (["-q"], ["warning: something to act on"], ["progress line", "detail line"]),
    (["-v"], ["debug: detail line", "[vitscale] progress line", "warning: something to act on"], []),
])
def test_logging_levels_from_q_and_v(fake_stage, capsys, flags, shown, hidden):
    fake_stage(_logs)
    try:
        assert cli.main(PLAN + flags) == 0
        out, err = capsys.readouterr()
        assert all(line in err for line in shown) and not any(line in err for line in hidden), err
        assert out == ""  # logs never mix into what a command prints
        assert cli.main(["-q", *PLAN]) == 0  # before the command too
        assert "progress line" not in capsys.readouterr().err
    finally:
        cli.main(["presets"])  # back to the default level for the tests that follow
        capsys.readouterr()


# --------------------------------------------------------------------------- front door


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"vitscale {importlib.metadata.version('vitscale')}"


@pytest.mark.parametrize("command", COMMANDS + ["config"])
def test_every_command_help_has_a_description_defaults_and_examples(capsys, command):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    usage, description = out.split("\n\n")[:2]
    assert usage.startswith(f"usage: vitscale {command}") and len(description.split()) >= 5
    assert f"  vitscale {command} " in out.split("\nexamples:\n")[1]
    if command in ("submit", "plan", "shard", "run"):
        assert "(default: " in out


def test_mistyped_command_suggests_the_close_one(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["pretrian", "local"])
    assert e.value.code == 2
    assert "did you mean 'pretrain'?" in capsys.readouterr().err


def test_unknown_preset_suggests_the_close_one(capsys):
    assert cli.main(["presets", "vit_l16"]) == 2
    assert "preset 'vit_l16' does not exist (did you mean 'vit_l16_jft'?" in capsys.readouterr().err
    assert cli.main(["run", "lokal"]) == 2
    assert "did you mean 'local'?" in capsys.readouterr().err


def test_presets_list_shows_each_first_full_sentence(capsys):
    assert cli.main(["presets"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo the wrapping
    for name in list_presets():
        sentence = " ".join(cli.first_sentence(preset_path(name).read_text(), name).split())
        assert sentence.endswith(".") and len(sentence) > 30
        assert f"{name} {sentence}" in out
    assert "(Table 3: Adam 0.9/0.999, batch 4096, LR 1e-3, weight decay 0.03, dropout 0.1, 10k warmup steps " \
           "then linear decay, 90 epochs at 224 px)." in out


@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_config_show_round_trips(tmp_path, capsys, fmt):
    overrides = ["--set", "pretrain.steps=7", "--set", "transfer.lrs=[0.5]", "--set", "pretrain.betas=[0.8, 0.9]"]
    assert cli.main(["config", "show", "vit_b16_i21k", *overrides] + (["--json"] if fmt == "json" else [])) == 0
    out = capsys.readouterr().out
    path = tmp_path / f"shown.{fmt}.yaml"  # JSON is YAML: the same loader reads both
    path.write_text(out)
    expected = load_config("vit_b16_i21k", [overrides[i] for i in range(1, len(overrides), 2)])
    assert load_config(path) == expected and expected.pretrain.steps == 7
    if fmt == "json":
        assert json.loads(out)["pretrain"]["betas"] == [0.8, 0.9]


def test_config_show_reports_every_bad_key_at_once(capsys):
    assert cli.main(["config", "show", "local", "--set", "pretrain.stepz=3", "--set", "model.varaint=B/16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitscale config: error: 2 problems in ")
    assert "pretrain.stepz: unknown key, did you mean pretrain.steps?" in err
    assert "model.varaint: unknown key, did you mean model.variant?" in err


def test_config_schema_is_json_schema_that_refuses_unknown_keys(capsys):
    assert cli.main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    pretrain = schema["$defs"]["PretrainConfig"]
    assert pretrain["additionalProperties"] is False and schema["additionalProperties"] is False
    assert pretrain["properties"]["zero_stage"]["enum"] == [0, 1, 2, 3]
    assert set(schema["properties"]) == {f.name for f in dataclasses.fields(Config)}


def test_bench_model_prints_ours_beside_timm(capsys):
    """The benchmark's plumbing on a debug-size model (its figures are not asserted: no timed tests)."""
    base = ["bench", "model", "mu/4@16", "--batch", "2", "--warmup", "0", "--precision", "fp32"]
    for extra, iterations in ((["--rounds", "1"], "1"), (["--budget", "0"], "4")):
        assert cli.main(base + extra) == 0
        out = capsys.readouterr().out
        assert "ours img/s" in out and "timm img/s" in out and "ours/timm" in out
        row = next(line for line in out.splitlines() if line.startswith("mu/4@16"))
        ours, theirs, ratio, rounds = row.split()[1:]
        assert float(ours) > 0 and float(theirs) > 0 and ratio.endswith("x") and rounds == iterations


def test_bench_train_gpu_mode_plumbing_on_the_cpu(capsys):
    """The ``--gpu`` table's code path, run on the CPU with a debug-size model (figures not asserted)."""
    base = ["bench", "train", "--gpu", "--device", "cpu", "--engine", "torch", "--img", "16", "--seconds", "0.2",
            "--warmup", "1", "--peak-tflops", "1"]
    assert cli.main(base + ["--cases", "mu/4:2", "--attention", "math", "--profile", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("mu/4@16"))
    batch, img_s = lines[row].split()[1:3]
    assert batch == "2" and float(img_s) > 0
    # --profile: the time by kind under the row, then the top operators, matrix products among them
    assert lines[row + 1].startswith("  CPU operator time per step") and "matmul" in lines[row + 1]
    assert any(line.split()[3:5] == ["matmul", "aten::mm"] for line in lines[row + 2:row + 14])
    assert cli.main(base + ["--cases", "Q/4:2"]) == 2
    assert "--cases 'Q/4:2'" in capsys.readouterr().err
