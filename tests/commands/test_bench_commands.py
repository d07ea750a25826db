"""``gspn bench`` on the command line: flags → :class:`~gspn.recipes.bench.BenchConfig`, a tiny run, usage
errors, Ctrl-C, and the spellings that are gone. The benchmark itself: ``tests/recipes/test_bench.py``."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from gspn.commands import build_parser, main
from gspn.commands._flags import config_from_args
from gspn.recipes.bench import BenchConfig


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["bench", *argv])


def test_flags_set_the_config_fields_of_the_same_name():
    assert config_from_args(BenchConfig, _parse([])) == BenchConfig()
    args = _parse(
        [
            "--device",
            "cpu",
            "--precision",
            "bf16",
            "--dim",
            "16",
            "--heads",
            "4",
            "--batch-size",
            "2",
            "--resolutions",
            "8,16",
            "--budget-seconds",
            "3",
            "--repeats",
            "2",
            "--memory-limit-gb",
            "1.5",
            "--fit-skip",
            "0",
            "--no-memory",
            "--no-plot",
            "--threads",
            "1",
            "--output-dir",
            "b",
            "--quiet",
            "--methods",
            "gspn-local,linear-attention",
        ]
    )
    assert config_from_args(BenchConfig, args) == BenchConfig(
        device="cpu",
        precision="bf16",
        dim=16,
        heads=4,
        batch_size=2,
        resolutions=[8, 16],
        budget_seconds=3.0,
        repeats=2,
        memory_limit_gb=1.5,
        fit_skip=0,
        memory=False,
        plot=False,
        threads=1,
        output_dir="b",
        quiet=True,
        methods=["gspn-local", "linear-attention"],
    )


def test_cli_registers_bench():
    args = build_parser().parse_args(["bench", "--quick", "--methods", "gspn-local,linear-attention"])
    assert args.quick and args.methods == ["gspn-local", "linear-attention"]
    assert config_from_args(BenchConfig, args).methods == ["gspn-local", "linear-attention"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--methods", "transformer-xl"])


def test_tiny_run_on_the_command_line(tmp_path, capsys):
    argv = ["bench", "--device", "cpu", "--threads", "1", "--resolutions", "8,16", "--dim", "8", "--heads", "2"]
    argv += ["--repeats", "1", "--methods", "gspn-global,attention-math", "--no-plot", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("gspn bench: ") and "time ratio at the largest resolution both ran" in out
    assert out.rstrip().splitlines()[-1] == f"wrote {tmp_path / 'results.json'}, {tmp_path / 'table.md'}"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["settings"]["methods"] == ["gspn-global", "attention-math"]
    assert payload["settings"]["no_memory"] is False  # the results.json keys are unchanged


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--max-resolution", "32"], "--max-resolution"),  # below the default minimum of 64
        (["--dim", "10", "--heads", "3"], "--dim"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_options_exit_with_a_message(argv, flag, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--device", "cpu", "--output-dir", str(out), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"gspn bench: error: {flag} ") and len(captured.err.splitlines()) == 1
    assert captured.out == ""
    assert not (out / "results.json").exists() and not out.exists()


def test_messages_name_flags_not_fields(capsys):
    assert main(["bench", "--device", "cpu", "--dim", "10", "--heads", "3"]) == 2
    assert capsys.readouterr().err == "gspn bench: error: --dim 10 is not divisible by --heads (3)\n"


def test_unreadable_replot_file_is_one_line(tmp_path, capsys):
    assert main(["bench", "--replot", str(tmp_path / "nope.json"), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("gspn bench: error: ")
    (tmp_path / "other.json").write_text('{"loss": 1.0}')
    assert main(["bench", "--replot", str(tmp_path / "other.json"), "--output-dir", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("gspn bench: error: --replot ")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    from gspn.recipes.bench import job

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(job, "benchmark", interrupted)
    out = tmp_path / "out"
    assert main(["bench", "--device", "cpu", "--resolutions", "8", "--output-dir", str(out)]) == 130
    assert "gspn bench: interrupted" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--channels", "16"],  # was --dim
        ["--batch", "2"],  # was --batch-size
        ["--dtype", "float32"],  # was --precision
        ["--out", "b"],  # was --output-dir
        ["--no-mem"],  # no abbreviations either
    ],
)
def test_removed_aliases_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _parse(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_module_entry_point_help():
    proc = subprocess.run(
        [sys.executable, "-m", "gspn", "bench", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "--budget-seconds" in proc.stdout and "--quick" in proc.stdout
    # ``python -m gspn.bench`` (the old spelling) is gone: ``gspn bench`` and ``python -m gspn bench`` only.
    proc = subprocess.run([sys.executable, "-m", "gspn.bench", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "No module named gspn.bench" in proc.stderr
