"""``gspn distill`` and ``gspn generate`` on the command line (flags → config, removed spellings, tiny real runs),
and ``gspn distill`` under torchrun, with the tiny SD pipeline of ``tests/tiny_diffusers.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from gspn.commands import _flags as F
from gspn.commands import build_parser, main
from gspn.recipes.text_to_image import GenerateConfig
from gspn.recipes.unet_distillation import UNetDistillationConfig


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_diffusers import save_tiny_pipe

    return save_tiny_pipe(tmp_path_factory.mktemp("pipe"))


def test_every_flag_default_is_its_fields():
    parse = build_parser().parse_args
    distill = F.config_from_args(UNetDistillationConfig, parse(["distill", "--model", "m", "--captions", "c"]))
    assert distill == UNetDistillationConfig(model="m", captions="c")
    generate = F.config_from_args(GenerateConfig, parse(["generate", "--prompt", "p"]))
    assert generate == GenerateConfig(prompt="p")
    # every field is a flag of its command (a job has nothing to resume and no log lines to quiet)
    for argv, cls, not_flags in (
        (["distill", "--model", "m", "--captions", "c"], UNetDistillationConfig, set()),
        (["generate", "--prompt", "p"], GenerateConfig, {"resume", "allow_changes", "quiet"}),
    ):
        missing = set(cls.__dataclass_fields__) - set(vars(parse(argv)))
        assert missing == not_flags, (argv[0], missing)


def test_flags_map_to_the_fields_of_their_name():
    parse = build_parser().parse_args
    argv = ["distill", "--model", "m", "--captions", "c", "--chunk-size", "none", "--gate-channels", "4"]
    argv += ["--clip-grad", "0", "--resume", "--allow-changes", "--no-progress", "--device", "cpu"]
    cfg = F.config_from_args(UNetDistillationConfig, parse(argv))
    assert (cfg.chunk_size, cfg.gate_channels, cfg.clip_grad, cfg.resume, cfg.allow_changes) == (
        None,
        4,
        None,
        "auto",
        True,
    )
    assert (cfg.progress, cfg.device) == (False, "cpu")
    argv = ["generate", "--prompt", "p", "--upscale-from", "16x24", "32*48", "--no-vae-tiling", "--device", "auto"]
    cfg = F.config_from_args(GenerateConfig, parse([*argv, "--output-dir", "o", "--precision", "fp16"]))
    assert (cfg.upscale_from, cfg.vae_tiling, cfg.device) == ([(16, 24), (32, 48)], False, "auto")
    assert (cfg.output_dir, cfg.precision) == ("o", "fp16")


@pytest.mark.parametrize(
    "argv",
    [
        ["distill", "--model", "m", "--captions", "c", "--no-resume"],  # resume is the shared --resume [CHECKPOINT]
        ["distill", "--model", "m", "--captions", "c", "--resolution", "64"],
        ["distill", "--model", "m", "--captions", "c", "--max-grad-norm", "2"],
        ["distill", "--model", "m", "--captions", "c", "--mixed-precision", "no"],
        ["generate", "--prompt", "p", "--output", "x.png"],  # a job writes into --output-dir
        ["generate", "--prompt", "p", "--dtype", "bfloat16"],
    ],
)
def test_old_spellings_are_gone(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_a_bad_setting_is_one_line_naming_the_flag(tmp_path, capsys):
    caps = tmp_path / "c.txt"
    caps.write_text("a cat\n")
    out = tmp_path / "run"
    assert main(["distill", "--model", "m", "--captions", str(caps), "--output-dir", str(out), "--lr", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr" in err and not out.exists()
    assert main(["generate", "--prompt", "p", "--strength", "2", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--strength" in err and not out.exists()


def test_distill_cli_on_image_folder(saved_pipe, tmp_path):
    from PIL import Image

    from gspn.integrations.diffusers import GSPNAdapter

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate(["red", "blue"]):
        Image.new("RGB", (20, 24), color=color).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"a {color} square")
    out = tmp_path / "run"
    rc = main(
        [
            "distill",
            "--model",
            str(saved_pipe),
            "--captions",
            str(folder),
            "--output-dir",
            str(out),
            "--image-size",
            "16",
            "--steps",
            "2",
            "--d-state",
            "4",
            "--chunk-size",
            "2",
            "--gradient-checkpointing",
            "--caption-dropout",
            "0.5",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 2 and summary["noise"] > 0  # images: the ground-truth noise term is on
    adapter = GSPNAdapter.from_pretrained(out / "adapter")
    assert adapter.config.chunk_size == 2
    # continue from the saved adapter in a new run
    rc = main(
        [
            "distill",
            "--model",
            str(saved_pipe),
            "--captions",
            str(folder),
            "--output-dir",
            str(tmp_path / "run2"),
            "--init-adapter",
            str(out / "adapter"),
            "--image-size",
            "16",
            "--steps",
            "1",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0 and GSPNAdapter.from_pretrained(tmp_path / "run2" / "adapter").config.chunk_size == 2
    state = torch.load(out / "last.pt", weights_only=False)
    assert state["config"]["gradient_checkpointing"] and state["config"]["captions"] == str(folder)
    assert state["step"] == 2 and {"optimizer", "scheduler", "rng", "model", "format"} <= state.keys()


def test_generate_cli(saved_pipe, tmp_path):
    from diffusers import UNet2DConditionModel
    from PIL import Image

    from gspn.integrations.diffusers import GSPNAdapter

    unet = UNet2DConditionModel.from_pretrained(saved_pipe, subfolder="unet")
    GSPNAdapter.from_unet(unet, d_state=4).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "images"
    rc = main(
        [
            "generate",
            "--prompt",
            "a blue dog",
            "--height",
            "40",
            "--width",
            "72",
            "--steps",
            "2",
            "--model",
            str(saved_pipe),
            "--adapter",
            str(tmp_path / "adapter"),
            "--output-dir",
            str(out),
            "--upscale-from",
            "16x32",
            "--strength",
            "0.5",
            "--skip-residual",
            "3",
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert rc == 0
    with Image.open(out / "image.png") as im:
        assert im.size == (72, 40)
    assert json.loads((out / "summary.json").read_text())["adapter"] == str(tmp_path / "adapter")


def test_distill_under_torchrun_two_processes(saved_pipe, tmp_path):
    """Two CPU processes (gloo): gradients averaged by DDP, rank 0 writes the training state."""
    caps = tmp_path / "captions.txt"
    caps.write_text("a red cat\na blue dog\n")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gspn",
        "distill",
        "--model",
        str(saved_pipe),
        "--captions",
        str(caps),
        "--output-dir",
        str(out),
        "--image-size",
        "16",
        "--steps",
        "2",
        "--d-state",
        "4",
        "--device",
        "cpu",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 2
