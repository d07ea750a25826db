"""``gspn distill-encoder`` on the command line: flags → config, one-line errors, a training state as teacher."""

from __future__ import annotations

import json

import pytest
import torch

from gspn.commands import _flags as F
from gspn.commands import build_parser, main
from gspn.models import create_model, save_checkpoint
from gspn.recipes.encoder_distillation import EncoderDistillationConfig
from gspn.training_utils import load_state, read_metrics, save_state, training_state


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required: --teacher"),
        (["--teacher", "{t}", "--epochs", "0"], "--epochs must be a positive integer"),
        (["--teacher", "{t}", "--stage1-epochs", "11"], "--stage1-epochs (11) must not exceed --epochs (10)"),
        (["--teacher", "{t}", "--kd-temperature", "0"], "--kd-temperature must be"),
        (["--teacher", "{d}/missing.safetensors"], "--teacher names no checkpoint:"),
        (["--teacher", "{junk}"], "is not a safetensors checkpoint"),
        (["--teacher", "{t}", "--stage1-inputs", "both"], "invalid choice: 'both'"),
        # the conv baseline has stage outputs (forward_intermediates), on other grids than the student's
        (["--teacher", "{conv}"], "token grid (64 tokens) differs from the teacher's (1024)"),
        # a training state of another command than `gspn train`
        (["--teacher", "{dit}"], "is a `gspn train-dit` training state"),
        (["--teacher", "{t}", "--kd-weight", "0", "--label-weight", "0", "--output-weight", "0"], "stage-2 loss term"),
    ],
)
def test_command_bad_arguments_one_line_exit_2(argv, message, tmp_path, capsys):
    conv = tmp_path / "conv.safetensors"
    save_checkpoint(create_model("baseline_conv", num_classes=10, width=4, depths=(1,)), conv)
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a checkpoint")
    dit = tmp_path / "dit.pt"
    save_state(dit, training_state(model={}, optimizer={}, step=1, rng=[], config={}, command="train-dit", unit=0))
    fmt = dict(t=tmp_path / "teacher.safetensors", d=tmp_path, conv=conv, junk=junk, dit=dit)
    args = [a.format(**fmt) for a in argv] + ["--output-dir", str(tmp_path / "o")]
    try:
        rc = main(["distill-encoder", *args])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()  # checked before anything is written


def test_command_builds_the_config():
    args = build_parser().parse_args(
        [
            "distill-encoder",
            "--teacher",
            "t.safetensors",
            "--model",
            "gspn_vit_nano",
            "--model-arg",
            "d_state=4",
            "--epochs",
            "6",
            "--stage1-epochs",
            "2",
            "--output-dir",
            "o",
            "--clip-grad",
            "none",
            "--no-init-from-teacher",
            "--stage1-inputs",
            "teacher",
            "--kd-weight",
            "0",
            "--precision",
            "fp32",
            "--resume",
            "--quiet",
        ]
    )
    cfg = F.config_from_args(EncoderDistillationConfig, args)
    assert (cfg.teacher, cfg.model_args, cfg.epochs, cfg.stage1_epochs, cfg.output_dir, cfg.clip_grad) == (
        "t.safetensors",
        {"d_state": 4},
        6,
        2,
        "o",
        None,
    )
    assert (cfg.init_from_teacher, cfg.stage1_inputs, cfg.kd_weight, cfg.precision, cfg.resume, cfg.quiet) == (
        False,
        "teacher",
        0.0,
        "fp32",
        "auto",
        True,
    )
    defaults = F.config_from_args(
        EncoderDistillationConfig, build_parser().parse_args(["distill-encoder", "--teacher", "t"])
    )
    assert defaults == EncoderDistillationConfig(teacher="t")  # every flag's default is its field's


def test_a_gspn_train_state_teaches_from_the_command_line(tmp_path, capsys):
    """``--teacher run/best.pt`` (a training state of ``gspn train``) runs, with the state's data setup."""
    torch.manual_seed(0)
    teacher = create_model("vit_nano", num_classes=10, in_chans=1)
    state = training_state(
        model=teacher.state_dict(),
        optimizer={},
        step=1,
        epoch=0,
        rng=[],
        config={"model": "vit_nano"},
        command="train",
        unit=0,
        model_name="vit_nano",
        model_args={},
        num_classes=10,
        in_chans=1,
        img_size=16,
        mean=(0.3,),
        std=(0.4,),
        classes=[str(c) for c in range(10)],
    )
    save_state(tmp_path / "best.pt", state)
    out = tmp_path / "run"
    argv = ["distill-encoder", "--teacher", str(tmp_path / "best.pt"), "--epochs", "1", "--stage1-epochs", "1"]
    argv += ["--train-limit", "32", "--val-limit", "16", "--batch-size", "16", "--workers", "0", "--no-progress"]
    argv += ["--no-plot", "--output-dir", str(out)]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and "16px" in lines[0] and lines[-1].startswith("student val acc"), lines
    assert [r["stage"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert json.loads((out / "summary.json").read_text())["teacher"] == str(tmp_path / "best.pt")
    assert load_state(out / "last.pt")["command"] == "distill-encoder"
    # the output folder now holds a run: a second start is refused in one line, a resume is a no-op
    assert main([*argv, "--quiet"]) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*argv, "--resume", "--quiet"]) == 0 and capsys.readouterr().out == ""
    assert len(read_metrics(out / "metrics.jsonl")) == 1
