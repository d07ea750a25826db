"""The command package: one flag vocabulary (no other spellings), one ``--model-arg`` parser, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gspn._validate import parse_model_args
from gspn.commands import VOCABULARY, build_parser

ROOT = Path(__file__).resolve().parents[2]


def _parse(argv: list[str]):
    return build_parser().parse_args(argv)


def test_model_arg_parser_is_one_for_every_command():
    expected = {"depths": (1, 1), "drop": 0.1, "act": "gelu", "learn_sigma": False, "x": None, "n": [1, 2]}
    items = ["depths=(1,1)", "drop=0.1", "act=gelu", "learn_sigma=false", "x=null", "n=[1, 2]"]
    assert parse_model_args(items) == expected
    for argv in (["train"], ["train-dit"], ["sample", "--checkpoint", "x.pt"], ["convert", "a.pth", "b.st"]):
        args = _parse([*argv, *(a for item in items for a in ("--model-arg", item))])
        assert parse_model_args(args.model_arg) == expected
    definitions = [p for p in (ROOT / "src" / "gspn").rglob("*.py") if "def parse_model_args" in p.read_text()]
    assert [p.name for p in definitions] == ["_validate.py"]
    with pytest.raises(ValueError):
        parse_model_args(["novalue"])


def test_new_flag_names():
    a = _parse(
        [
            "train",
            "--output-dir",
            "o",
            "--clip-grad",
            "none",
            "--warmup-epochs",
            "2",
            "--image-size",
            "16",
            "--in-channels",
            "1",
            "--precision",
            "fp32",
        ]
    )
    assert (a.output_dir, a.clip_grad, a.warmup_epochs, a.image_size, a.in_channels, a.precision) == (
        "o",
        None,
        2.0,
        16,
        1,
        "fp32",
    )
    a = _parse(["train-dit", "--output-dir", "o", "--clip-grad", "0.5", "--warmup-steps", "3", "--in-channels", "3"])
    assert (a.output_dir, a.clip_grad, a.warmup_steps, a.in_channels) == ("o", 0.5, 3, 3)
    a = _parse(["sample", "--checkpoint", "c.pt", "--no-ema", "--image-size", "8", "12", "--output-dir", "s"])
    assert (a.checkpoint, a.ema, a.image_size, a.output_dir) == ("c.pt", False, [8, 12], "s")
    a = _parse(["eval", "--checkpoint", "c.pt", "--ema"])
    assert a.checkpoint == "c.pt" and a.ema
    a = _parse(
        [
            "distill",
            "--model",
            "m",
            "--captions",
            "c",
            "--image-size",
            "64",
            "--clip-grad",
            "0",
            "--precision",
            "bf16",
            "--warmup-steps",
            "5",
        ]
    )
    assert (a.image_size, a.clip_grad, a.precision, a.warmup_steps) == (64, None, "bf16", 5)
    a = _parse(["generate", "--prompt", "p", "--precision", "fp16", "--output-dir", "x"])
    assert (a.precision, a.output_dir) == ("fp16", "x")
    a = _parse(["bench", "--dim", "16", "--batch-size", "2", "--precision", "bf16", "--output-dir", "b"])
    assert (a.dim, a.batch_size, a.precision, str(a.output_dir)) == (16, 2, "bf16", "b")
    a = _parse(["extract-latents", "--vae", "v", "--output", "z.pt", "--in-channels", "1"])
    assert (a.output, a.in_channels) == ("z.pt", 1)
    a = _parse(["flops", "--image-size", "64", "--in-channels", "1", "--batch-size", "2"])
    assert (a.image_size, a.in_channels, a.batch_size) == ([64], 1, 2)


@pytest.mark.parametrize(
    ("argv", "dest", "value"),
    [
        (["train", "--output", "o"], "output_dir", "o"),
        (["train", "--img-size", "16"], "image_size", 16),
        (["train", "--in-chans", "1"], "in_channels", 1),
        (["train", "--amp", "off"], "precision", "fp32"),
        (["train-dit", "--out", "o"], "output_dir", "o"),
        (["train-dit", "--grad-clip", "0"], "clip_grad", None),
        (["train-dit", "--warmup", "7"], "warmup_steps", 7),
        (["train-dit", "--channels", "3"], "in_channels", 3),
        (["sample", "--ckpt", "c.pt"], "checkpoint", "c.pt"),
        (["sample", "--checkpoint", "c", "--size", "8", "8"], "image_size", [8, 8]),
        (["sample", "--checkpoint", "c", "--out", "s"], "output_dir", "s"),
        (["eval", "--ckpt", "c.pt"], "checkpoint", "c.pt"),
        (["extract-latents", "--vae", "v", "--out", "z.pt"], "output", "z.pt"),
        (["extract-latents", "--vae", "v", "--output", "z", "--channels", "1"], "in_channels", 1),
        (["distill", "--model", "m", "--captions", "c", "--resolution", "64"], "image_size", 64),
        (["distill", "--model", "m", "--captions", "c", "--max-grad-norm", "2"], "clip_grad", 2.0),
        (["distill", "--model", "m", "--captions", "c", "--mixed-precision", "no"], "precision", "fp32"),
        (["generate", "--prompt", "p", "--dtype", "bfloat16"], "precision", "bf16"),
        (["bench", "--channels", "16"], "dim", 16),
        (["bench", "--batch", "2"], "batch_size", 2),
        (["bench", "--dtype", "float32"], "precision", "fp32"),
        (["bench", "--out", "b"], "output_dir", Path("b")),
        (["flops", "--img-size", "64"], "image_size", 64),
        (["flops", "--in-chans", "1"], "in_channels", 1),
        (["flops", "--batch", "2"], "batch_size", 2),
    ],
)
def test_old_spellings_are_gone(argv, dest, value, capsys):
    # the package was never released: one spelling per concept, and no abbreviations of the new ones
    required = {"sample": ["--checkpoint", "x"], "eval": ["--checkpoint", "x"], "extract-latents": ["--output", "z"]}
    if argv[0] in required and required[argv[0]][0] not in argv:
        argv = [*argv, *required[argv[0]]]  # so that the old spelling is the only thing wrong
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_deprecated_spellings_are_not_in_help(capsys):
    with pytest.raises(SystemExit):
        _parse(["train-dit", "--help"])
    out = capsys.readouterr().out
    assert "--output-dir" in out and "--clip-grad" in out and "--warmup-steps" in out
    assert "--grad-clip" not in out and "--out " not in out and "--warmup " not in out


def test_required_options_are_named(capsys):
    from gspn.commands import main

    cases = ((["sample"], "required: --checkpoint"), (["extract-latents", "--vae", "v"], "required: --output"))
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:  # a usage error, as argparse exits: status 2 and one line
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "command",
    [
        ["train"],
        ["eval", "--checkpoint", "x.pt"],
        ["train-dit"],
        ["sample", "--checkpoint", "x.pt"],
        ["extract-latents", "--vae", "v", "--output", "z.pt"],
        ["distill", "--model", "m", "--captions", "c.txt"],
        ["generate", "--prompt", "p"],
        ["distill-encoder", "--teacher", "t"],
    ],
)
def test_device_is_checked_when_parsed(command, capsys):
    # an unknown --device was a torch RuntimeError traceback, found after loading the data and model
    from gspn.commands import main

    for ok in ("auto", "cpu", "cuda", "cuda:1", "cpu:0"):
        assert _parse([*command, "--device", ok]).device == ok
    for bad in ("bogus", "cuda:x", "gpu"):
        with pytest.raises(SystemExit) as exc:
            main([*command, "--device", bad])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1 and f"unknown device '{bad}'" in err, err


def test_bench_width_is_dim_not_channels():
    a = _parse(["bench", "--dim", "8"])
    assert a.dim == 8 and not hasattr(a, "in_channels")


def test_only_the_command_package_parses_arguments():
    src = ROOT / "src" / "gspn"
    importers = sorted(
        str(p.relative_to(src))
        for p in src.rglob("*.py")
        if re.search(r"^\s*(import argparse|from argparse import)", p.read_text(), re.M)
    )
    assert importers and all(p.startswith("commands/") for p in importers), importers


def test_docs_state_the_vocabulary():
    text = (ROOT / "docs" / "cli.md").read_text()
    for concept, flag in VOCABULARY.items():
        first = flag.split()[0]
        assert f"`{first}" in text, (concept, flag)


def test_readme_and_docs_use_only_the_new_names():
    old = re.compile(
        r"gspn [a-z-]+ [^\n`]*?(--out |--ckpt |--img-size|--in-chans|--grad-clip|--max-grad-norm|"
        r"--mixed-precision|--resolution )"
    )
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        if path.name in ("bench.md", "benchmarks.md", "operator.md"):
            continue  # owned by the operator work; their commands use the bench script's own flags
        for line in path.read_text().splitlines():
            assert not old.search(line), (path.name, line)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--mean", "0.5,0.5", "--in-channels", "3"], "--mean takes 1 or --in-channels (3)"),  # was a RuntimeError
        (["--std", "0"], "--std must be > 0"),  # was NaN training, found after the first epoch
        (["--crop-pct", "0"], "--crop-pct must be"),  # was a ZeroDivisionError
        (["--crop-scale", "2,1"], "--crop-scale"),
        (["--hflip", "2"], "--hflip must be a probability"),
        (["--model-arg", "bogus=1"], "'bogus': 1} for baseline_conv"),  # was a TypeError traceback
        (["--model-arg", "depths=oops"], "'depths': 'oops'} for baseline_conv"),
        (["--image-size", "0"], "--image-size must be"),  # named the deprecated --img-size
        (["--in-channels", "0"], "--in-channels must be"),  # named the deprecated --in-chans
    ],
)
def test_train_rejects_nonsense_with_one_line_naming_the_flag(tmp_path, capsys, args, needle):
    from gspn.commands import main

    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--model",
            "baseline_conv",
            "--model-arg",
            "width=4",
            "--epochs",
            "1",
            "--train-limit",
            "8",
            "--val-limit",
            "8",
            "--workers",
            "0",
            "--no-progress",
            "--no-plot",
            "--output-dir",
            str(out),
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err
    assert not (out / "last.pt").exists()


def test_errors_are_said_by_the_command_and_warnings_are_one_line(tmp_path, capsys):
    from gspn.commands import main

    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.startswith("gspn train: error: unrecognized arguments: --out x")
    assert "(see gspn train --help)" in err
    # every model name is checked before anything is printed
    assert main(["flops", "--model", "gspn_micro", "no_such_model"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "unknown model 'no_such_model'" in err
    import subprocess
    import sys

    argv = ["train", "--model", "baseline_conv", "--model-arg", "width=4", "--image-size", "16", "--epochs", "1"]
    argv += ["--train-limit", "32", "--val-limit", "16", "--workers", "0", "--precision", "fp16", "--quiet"]
    argv += ["--no-progress", "--no-plot", "--threads", "1", "--output-dir", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, "-m", "gspn", *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "gspn train: warning: fp16 mixed precision is only used on CUDA; running in float32\n"
