"""gspn train-dit / sample / extract-latents on the command line (flags → the recipe configs of
gspn.recipes.diffusion), and train-dit under torchrun."""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gspn.commands import build_parser, main
from gspn.commands._flags import config_from_args
from gspn.models import create_model, save_checkpoint
from gspn.recipes.diffusion import latents as latents_module
from gspn.recipes.diffusion import sample as sample_module
from gspn.recipes.diffusion import train as train_module
from gspn.recipes.diffusion.latents import ExtractLatentsConfig
from gspn.recipes.diffusion.sample import SampleConfig, load_for_sampling
from gspn.recipes.diffusion.train import DiTTrainConfig, DiTTrainRecipe
from gspn.training_utils import load_state
from tiny import tiny_dit_argv

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers (pip install diffusers)"
)

SMALL = dict(hidden_size=32, depth=2, d_state=4, num_global_blocks=1)  # 3 blocks, fast on CPU


def _small_dit() -> torch.nn.Module:
    """A 3-block ``gspn_dit_tiny`` whose (zero-initialised) output layer has weights."""
    torch.manual_seed(0)
    model = create_model("gspn_dit_tiny", **SMALL)
    torch.manual_seed(1)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def _parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def test_cli_registers_the_diffusion_commands():
    parser = build_parser()
    args = parser.parse_args(["sample", "--checkpoint", "x.pt"])
    assert args.command == "sample" and args.steps == 100 and args.sampler == "ddpm"
    args = parser.parse_args(["train-dit", "--steps", "3"])
    assert args.steps == 3 and args.data == "digits"
    args = parser.parse_args(["extract-latents", "--vae", "v", "--output", "z.pt"])
    assert args.command == "extract-latents"


@pytest.mark.parametrize(
    ("cls", "argv"),
    [
        (DiTTrainConfig, ["train-dit"]),
        (SampleConfig, ["sample", "--checkpoint", "x.pt"]),
        (ExtractLatentsConfig, ["extract-latents", "--vae", "v", "--output", "z.pt"]),
    ],
)
def test_every_config_field_is_a_flag_of_the_same_name_with_the_same_default(cls, argv):
    import dataclasses

    args = _parse(argv)
    # jobs do not resume and print no log lines; extract-latents' product is the file --output
    unflagged = set() if cls is DiTTrainConfig else {"resume", "overwrite", "allow_changes", "quiet"}
    unflagged |= {"output_dir"} if cls is ExtractLatentsConfig else set()
    for f in dataclasses.fields(cls):
        name = "model_arg" if f.name == "model_args" else f.name
        assert hasattr(args, name) is (f.name not in unflagged), f.name
    config = config_from_args(cls, args)
    required = {k: getattr(config, k) for k in ("checkpoint", "vae", "output") if hasattr(config, k)}
    assert config == cls(**required)  # the flags' defaults are the config's


@pytest.mark.parametrize(
    "argv",
    [
        # hidden aliases of the flags, gone
        ["train-dit", "--out", "o"],
        ["train-dit", "--grad-clip", "0"],
        ["train-dit", "--warmup", "7"],
        ["train-dit", "--channels", "3"],
        ["sample", "--checkpoint", "x.pt", "--ckpt", "y.pt"],
        ["sample", "--checkpoint", "x.pt", "--size", "8"],
        ["sample", "--checkpoint", "x.pt", "--out", "o"],
        ["extract-latents", "--vae", "v", "--output", "z.pt", "--out", "y.pt"],
        ["extract-latents", "--vae", "v", "--output", "z.pt", "--channels", "1"],
    ],
)
def test_the_old_flag_aliases_are_gone(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(argv)
    assert exc.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_the_old_entry_points_and_modules_are_gone():
    assert not hasattr(train_module, "run_train") and not hasattr(train_module, "parse_model_args")
    assert not hasattr(sample_module, "run_sample") and not hasattr(latents_module, "run_extract_latents")
    assert importlib.util.find_spec("gspn.diffusion") is None  # and with it `python -m gspn.diffusion.train` etc.


@needs_diffusers
def test_train_dit_prints_one_header_line_and_one_closing_line(tmp_path, capfd):
    out = tmp_path / "run"
    assert main(tiny_dit_argv(out, "--steps", "2", "--sample-steps", "1")) == 0
    got = capfd.readouterr()
    lines = got.out.strip().splitlines()
    assert lines[0].startswith("train-dit: model gspn_dit_tiny") and lines[-1].startswith("train-dit: step 2/2")
    assert lines[1].startswith("sampling the final grid") and len(lines) == 3
    assert got.err == ""  # no warning, no bar (--no-progress)
    assert load_state(out / "last.pt")["command"] == "train-dit"


@needs_diffusers
def test_train_dit_errors_name_the_flag_and_leave_nothing_behind(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_dit_argv(out, "--steps", "1", "--image-size", "7")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gspn train-dit: error: --image-size (7×7) must be a multiple of gspn_dit_tiny's patch size 2"]
    assert not out.exists()
    assert main(tiny_dit_argv(out, "--steps", "1")) == 0  # the corrected command is not refused
    capsys.readouterr()
    assert main(tiny_dit_argv(out, "--steps", "2", "--resume")) == 2
    err = capsys.readouterr().err
    assert "--resume cannot continue" in err and "steps: 1 → 2" in err and "--allow-changes" in err
    assert main(tiny_dit_argv(out, "--steps", "2", "--resume", "--allow-changes")) == 0
    assert load_state(out / "last.pt")["step"] == 2


@needs_diffusers
def test_train_dit_ctrl_c_exits_130_and_says_how_to_continue(tmp_path, capsys, monkeypatch):
    run_unit = DiTTrainRecipe.run_unit

    def pressed_at_step_2(self, index, progress):
        if index == 1:
            progress.stop_requested = True  # as the runner's handler does on the first Ctrl-C
        return run_unit(self, index, progress)

    monkeypatch.setattr(DiTTrainRecipe, "run_unit", pressed_at_step_2)
    out = tmp_path / "run"
    assert main(tiny_dit_argv(out, "--steps", "5", "--ckpt-every", "100")) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"gspn train-dit: interrupted; {out / 'last.pt'} holds the state after step 2: continue it with --resume "
        "and the same settings"
    ]
    assert load_state(out / "last.pt")["step"] == 2


@needs_diffusers
def test_sample_command_batch_size_does_not_change_the_images(tmp_path):
    ckpt = save_checkpoint(_small_dit(), tmp_path / "ema.safetensors")
    grids = []
    for b in (1, 4):
        out = tmp_path / f"b{b}"
        main(
            [
                "sample",
                "--checkpoint",
                str(ckpt),
                "--labels",
                "0-2",
                "--per-label",
                "2",
                "--steps",
                "3",
                "--sampler",
                "ddpm",
                "--image-size",
                "8",
                "8",
                "--batch-size",
                str(b),
                "--seed",
                "3",
                "--output-dir",
                str(out),
                "--no-progress",
            ]
        )
        grids.append((out / "grid.png").read_bytes())
    assert grids[0] == grids[1]


def test_sample_refuses_a_classifier_checkpoint_with_one_error_line(tmp_path, capsys):
    # `gspn train`'s files (last.pt, model.safetensors) hold a classifier: sampling from them used to
    # die with a TypeError/AttributeError traceback deep inside the sampler.
    from gspn.training_utils import save_state

    weights = save_checkpoint(create_model("baseline_conv", width=4, depths=(1,)), tmp_path / "model.safetensors")
    state = tmp_path / "last.pt"
    save_state(
        state,
        {
            "format": "gspn-train-v1",
            "model_name": "baseline_conv",
            "model_args": {"width": 4},
            "model": {},
            "ema": None,
            "epoch": 0,
            "step": 1,
        },
    )
    for path in (weights, state):
        with pytest.raises(ValueError, match="'baseline_conv' model, not a GSPN-DiT"):
            load_for_sampling(path)
        for ema in ("--ema", "--no-ema"):
            code = main(
                [
                    "sample",
                    "--checkpoint",
                    str(path),
                    ema,
                    "--steps",
                    "2",
                    "--output-dir",
                    str(tmp_path / "out"),
                    "--no-progress",
                ]
            )
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and "not a GSPN-DiT" in err, err
    assert not (tmp_path / "out" / "grid.png").exists()
    assert not (tmp_path / "out").exists()  # checked before the folder is made


def test_extract_latents_train_and_decode_with_a_tiny_vae(tmp_path, capsys):
    from diffusers import AutoencoderKL

    from gspn.recipes.diffusion.latents import run
    from gspn.recipes.diffusion.sample import run as sample
    from gspn.recipes.diffusion.train import run as train_dit

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,
    )
    vae.save_pretrained(tmp_path / "vae")
    with pytest.raises(TypeError, match="ExtractLatentsConfig"):
        run(_parse(["extract-latents", "--vae", "v", "--output", str(tmp_path / "x.pt")]))
    config = config_from_args(
        ExtractLatentsConfig,
        _parse(
            [
                "extract-latents",
                "--vae",
                str(tmp_path / "vae"),
                "--data",
                "digits",
                "--image-size",
                "16",
                "--in-channels",
                "1",
                "--limit",
                "16",
                "--output",
                str(tmp_path / "z.pt"),
                "--no-progress",
            ]
        ),
    )
    assert config == ExtractLatentsConfig(
        vae=str(tmp_path / "vae"),
        output=str(tmp_path / "z.pt"),
        data="digits",
        image_size=16,
        in_channels=1,
        limit=16,
        progress=False,
    )
    capsys.readouterr()
    res = run(config)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[-1] == f"extract-latents: 16 latents of 4×8×8 → {tmp_path / 'z.pt'}"
    assert res["vae"] == os.path.abspath(tmp_path / "vae")  # an absolute VAE path is stored
    assert res["count"] == 16 and res["shape"] == [4, 8, 8] and res["scaling_factor"] == 0.5
    blob = torch.load(tmp_path / "z.pt", weights_only=False)
    assert blob["latents"].shape == (16, 4, 8, 8) and blob["labels"].shape == (16,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae", "z.pt"]  # the file only: no summary, no lock

    argv = tiny_dit_argv(tmp_path / "run", "--steps", "2", "--ckpt-every", "100", "--log-every", "1", "--lr", "1e-3")
    config = config_from_args(DiTTrainConfig, _parse(argv), data=f"latents:{tmp_path / 'z.pt'}")
    summary = train_dit(config)
    assert summary["step"] == 2

    out = sample(
        config_from_args(
            SampleConfig,
            _parse(
                [
                    "sample",
                    "--checkpoint",
                    str(tmp_path / "run" / "last.pt"),
                    "--labels",
                    "0,1",
                    "--steps",
                    "2",
                    "--output-dir",
                    str(tmp_path / "samples"),
                    "--no-progress",
                ]
            ),
        )
    )
    assert Path(out["grid"]).is_file()
    assert len(list((tmp_path / "samples").glob("000*_class*.png"))) == 2


@pytest.mark.skipif(not os.environ.get("GSPN_RUN_SLOW"), reason="torchrun DDP smoke test; set GSPN_RUN_SLOW=1")
@needs_diffusers
def test_torchrun_ddp_two_processes(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    cmd = [
        torchrun,
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gspn",
        "train-dit",
        "--model",
        "gspn_dit_tiny",
        "--image-size",
        "8",
        "--batch-size",
        "8",
        "--steps",
        "2",
        "--sample-steps",
        "0",
        "--no-progress",
        "--model-arg",
        "hidden_size=32",
        "--model-arg",
        "depth=2",
        "--output-dir",
        str(tmp_path / "ddp"),
    ]
    subprocess.run(cmd, check=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    ckpt = torch.load(tmp_path / "ddp" / "last.pt", weights_only=False)
    assert ckpt["step"] == 2
