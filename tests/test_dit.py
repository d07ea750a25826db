"""Tests of GSPN-DiT and gspn.diffusion: sizes, shapes, CFG, training, resume, sampling, latents, FID."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gspn
from cli_runs import tiny_dit_argv
from gspn.cli import build_parser
from gspn.diffusion import diffusion_loss, make_train_scheduler
from gspn.diffusion.data import load_digits
from gspn.diffusion.fid import FeatureExtractor, fid_from_images, inception_score
from gspn.diffusion.sample import generate, load_for_sampling, parse_labels
from gspn.models import GSPNDiT, count_params, create_model, load_model
from gspn.models.gspn_dit import GSPNDiTBlock

# gspn.diffusion imports diffusers lazily; only the tests that build schedulers or a VAE need it.
needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None, reason="needs diffusers (pip install diffusers)"
)

# Reference parameter counts on a 32×32×4 latent with 1000 classes (research notes §5.2).
REFERENCE = {"gspn_dit_b_2": 144_016_356, "gspn_dit_l_2": 465_230_660, "gspn_dit_xl_2": 723_513_260}
SMALL = dict(hidden_size=32, depth=2, d_state=4, num_global_blocks=1)  # 3 blocks, fast on CPU


def _small(**kwargs) -> GSPNDiT:
    torch.manual_seed(0)
    return create_model("gspn_dit_tiny", **{**SMALL, **kwargs})


def _randomize_head(model: GSPNDiT) -> GSPNDiT:
    """The output layer starts at zero; give it weights so outputs depend on the input."""
    torch.manual_seed(1)
    for p in model.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


# --- architecture ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_param_counts(name):
    with torch.device("meta"):
        model = gspn.create_model(name, input_size=32, in_channels=4, num_classes=1000)
    n = count_params(model)
    assert abs(n - REFERENCE[name]) / REFERENCE[name] < 0.01
    assert n == REFERENCE[name]  # in fact exact


def test_registry_and_layout():
    names = gspn.list_models("gspn_dit_*")
    for size in ("b", "l", "xl"):
        assert {f"gspn_dit_{size}_2", f"gspn_dit_{size}_4"} <= set(names)
    with torch.device("meta"):
        model = create_model("gspn_dit_b_2")
    assert len(model.blocks) == 31 and model.d_state == 900 // 16
    chunks = [b.gspn.chunk_size for b in model.blocks]
    assert chunks[-2:] == [None, None]  # the last two out-blocks scan globally (for real)
    assert all(c == 2 for c in chunks[:-2])
    assert all(b.skip_linear is None for b in [*model.in_blocks, model.mid_block])
    assert all(b.skip_linear is not None for b in model.out_blocks)
    assert not hasattr(model, "pos_embed")


def test_global_block_reaches_the_whole_grid_and_local_does_not():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 12, 16, dtype=torch.float64)
    bumped = x.clone()
    bumped[0, 0, 0] += 3.0 * torch.randn(16, dtype=torch.float64)  # not a constant: LayerNorm removes those
    for chunk, far_changes in ((None, True), (2, False)):
        blk = GSPNDiTBlock(16, d_state=4, chunk_size=chunk).double().eval()
        with torch.no_grad():
            diff = (blk.branch(blk.norm(bumped)) - blk.branch(blk.norm(x))).abs()  # the residual branch
        assert diff[0, 0, 0].max() > 0
        assert bool(diff[0, 11, 11].max() > 0) is far_changes  # exactly zero outside a local block's reach


@pytest.mark.parametrize("hw", [(16, 16), (8, 20)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_forward_shapes(hw, learn_sigma):
    model = _small(learn_sigma=learn_sigma, in_channels=3)
    x = torch.randn(2, 3, *hw)
    out = model(x, torch.tensor([0, 999]), torch.tensor([1, 10]))
    assert out.shape == (2, 6 if learn_sigma else 3, *hw)
    with pytest.raises(ValueError, match="patch"):
        model(torch.randn(1, 3, 9, 16))


def test_patch4_and_non_square_unpatchify_roundtrip():
    model = _small(patch_size=4, learn_sigma=False)
    h, w, p = 3, 5, 4
    tokens = torch.arange(2 * h * w * p * p, dtype=torch.float32).view(2, h, w, p * p)
    img = model.unpatchify(tokens)
    assert img.shape == (2, 1, h * p, w * p)
    # the patch at token (1, 2) lands at rows 4..7, cols 8..11 in row-major order
    assert torch.equal(img[0, 0, 4:8, 8:12].reshape(-1), tokens[0, 1, 2])


def test_classifier_free_guidance():
    model = _randomize_head(_small()).eval()
    x, t, y = torch.randn(3, 1, 8, 12), torch.tensor([5, 50, 500]), torch.tensor([0, 3, 9])
    null = torch.full_like(y, model.null_label)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        guided = model.forward_with_cfg(x, t, y, 3.0)
        assert torch.allclose(model.forward_with_cfg(x, t, y, 1.0), cond)
    c = model.in_channels
    assert torch.allclose(guided[:, :c], uncond[:, :c] + 3.0 * (cond[:, :c] - uncond[:, :c]), atol=1e-5)
    assert torch.allclose(guided[:, c:], cond[:, c:], atol=1e-6)
    assert not torch.allclose(cond, uncond)


@pytest.mark.parametrize("form", ["int", "0-d", "(1,)", "float"])
def test_scalar_timestep_and_label_are_broadcast_to_the_batch(form):
    """diffusers loops pass one timestep for the whole batch, as a 0-d tensor or a number."""
    model = _randomize_head(_small()).eval()
    x, y = torch.randn(3, 1, 8, 12), torch.tensor([0, 3, 9])
    value = {"int": 250, "0-d": torch.tensor(250), "(1,)": torch.tensor([250]), "float": 250.0}[form]
    with torch.no_grad():
        ref = model(x, torch.full((3,), 250), y)
        torch.testing.assert_close(model(x, value, y), ref, rtol=0, atol=0)
        torch.testing.assert_close(
            model.forward_with_cfg(x, value, y, 2.0),
            model.forward_with_cfg(x, torch.full((3,), 250), y, 2.0),
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(model(x, value, 3), model(x, value, torch.full((3,), 3)), rtol=0, atol=0)
        torch.testing.assert_close(model(x, value), model(x, value, torch.full((3,), model.null_label)))


def test_timestep_of_another_batch_size_is_a_clear_error():
    model = _small().eval()
    with pytest.raises(ValueError, match=r"t \(timestep\) .*\(B,\) = \(3,\).*got shape \(2,\)"):
        model(torch.randn(3, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"y \(label\).*got shape \(3, 1\)"):
        model(torch.randn(3, 1, 8, 8), 5, torch.zeros(3, 1, dtype=torch.long))


def test_label_dropout_uses_the_null_class():
    model = _small(class_dropout_prob=0.999999)
    emb = model.y_embedder
    y = torch.arange(10)
    model.train()
    assert torch.equal(emb(y), emb.embedding_table.weight[model.null_label].expand(10, -1))
    model.eval()
    assert torch.equal(emb(y), emb.embedding_table.weight[:10])


# --- diffusion ---------------------------------------------------------------------------------------


@needs_diffusers
def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = _small()
    x, y = load_digits(8, 1).tensors
    x, y = x[:32], y[:32]
    sched = make_train_scheduler(learn_sigma=True)

    def evaluate() -> float:
        with torch.no_grad():
            return float(diffusion_loss(model, sched, x, y, True, torch.Generator().manual_seed(123))["loss"])

    before = evaluate()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(25):
        loss = diffusion_loss(model, sched, x, y, True, gen)
        opt.zero_grad()
        loss["loss"].backward()
        opt.step()
        assert loss["vb"] >= 0
    after = evaluate()
    assert after < 0.8 * before, (before, after)


def _train_args(out: Path, **kw):
    """The ``DiTTrainConfig`` the command builds from these flags."""
    from gspn.commands.diffusion import train_dit_config

    argv = tiny_dit_argv(out, "--log-every", "1", "--lr", "1e-3")
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    return train_dit_config(build_parser().parse_args(argv))


@needs_diffusers
def test_resume_is_exact(tmp_path):
    from gspn.diffusion.train import run_train

    run_train(_train_args(tmp_path / "straight", steps=4, ckpt_every=100))
    run_train(_train_args(tmp_path / "resumed", steps=2, ckpt_every=100))
    summary = run_train(_train_args(tmp_path / "resumed", steps=4, ckpt_every=100, resume="auto"))
    assert summary["step"] == 4
    a = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), (key, name)
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # one record per step, none duplicated by the resume
    assert (tmp_path / "straight" / "loss.png").is_file()
    ema = load_model(tmp_path / "straight" / "ema.safetensors")
    assert isinstance(ema, GSPNDiT) and ema.hidden_size == 32
    sampled, _, _ = load_for_sampling(tmp_path / "straight" / "last.pt")  # the checkpoint's EMA entry
    for name, tensor in ema.state_dict().items():
        assert torch.equal(sampled.state_dict()[name], tensor), name


@needs_diffusers
def test_train_dit_checks_the_patch_size_and_model_args_before_writing(tmp_path):
    # --image-size 15 with patch 2 failed at the first step, after config.json was written, so the
    # corrected command was refused ("already holds a run"); a bad --model-arg was a TypeError traceback
    from gspn.diffusion.train import run_train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"--image-size \(15×15\) must be a multiple of gspn_dit_tiny's patch size 2"):
        run_train(_train_args(out, image_size=15, steps=1))
    with pytest.raises(ValueError, match=r"--model-arg .*'bogus': 1.* for gspn_dit_tiny"):
        run_train(_train_args(out, model_arg="bogus=1", steps=1))
    assert not (out / "config.json").exists() and not (out / "last.pt").exists()
    assert run_train(_train_args(out, steps=1))["step"] == 1  # the corrected command is not refused


@needs_diffusers
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_sampling_is_deterministic_per_seed(sampler):
    model = _randomize_head(_small())
    schedule = {"learn_sigma": True, "clip_sample": True}
    run = lambda seed: generate(model, schedule, [0, 1, 10], (1, 8, 8), 4, sampler, 2.0, seed=seed)  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@needs_diffusers
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm"])
def test_samples_do_not_depend_on_the_batch_size(sampler):
    """Each sample draws its initial and per-step noise from its own generator (seed, index)."""
    model = _randomize_head(_small())
    schedule = {"learn_sigma": True, "clip_sample": True}
    labels = [0, 1, 10, 3, 3]
    runs = {
        b: generate(model, schedule, labels, (1, 8, 8), 4, sampler, 2.0, seed=7, batch_size=b)
        for b in (1, 3, len(labels))
    }
    # Same noise whatever the batch size; the model's numbers may differ in the last bits (BLAS picks
    # other kernels for other batch sizes: MKL's GEMV for a batch of 1 in the timestep MLP, seen here).
    for b in (3, len(labels)):
        torch.testing.assert_close(runs[b], runs[1], rtol=1e-4, atol=1e-4, msg=lambda m, b=b: f"batch {b}: {m}")
    assert (runs[1][3] - runs[1][4]).abs().max() > 0.1  # same label, different noise


@needs_diffusers
def test_sample_command_batch_size_does_not_change_the_images(tmp_path):
    from gspn.cli import main as cli_main
    from gspn.models import save_checkpoint

    ckpt = save_checkpoint(_randomize_head(_small()), tmp_path / "ema.safetensors")
    grids = []
    for b in (1, 4):
        out = tmp_path / f"b{b}"
        cli_main(
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
    from gspn.cli import main as cli_main
    from gspn.models import save_checkpoint
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
            code = cli_main(
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


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    from gspn.diffusion.data import load_dataset

    rng = torch.Generator().manual_seed(0)
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            arr = (torch.rand(10, 14, 3, generator=rng) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    ds, meta = load_dataset(f"imagefolder:{tmp_path}", image_size=8, channels=3)
    x, y = ds.tensors
    assert x.shape == (6, 3, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and meta["classes"] == ["cat", "dog"] and meta["num_classes"] == 2


def test_cond_every_block_option_keeps_shapes_and_params():
    a, b = _small(), _small(cond_every_block=True)
    assert count_params(a) == count_params(b)
    x = torch.randn(2, 1, 8, 8)
    assert b(x, torch.tensor([1, 2]), torch.tensor([3, 4])).shape == (2, 2, 8, 8)


def test_parse_labels():
    assert parse_labels("0-2,7", 10) == [0, 1, 2, 7]
    assert parse_labels("all", 3) == [0, 1, 2]
    assert parse_labels("null", 10) == [10]
    with pytest.raises(ValueError):
        parse_labels("11", 10)


def test_cli_registers_the_diffusion_commands():
    parser = build_parser()
    args = parser.parse_args(["sample", "--checkpoint", "x.pt"])
    assert args.command == "sample" and args.steps == 100 and args.sampler == "ddpm"
    args = parser.parse_args(["train-dit", "--steps", "3"])
    assert args.steps == 3 and args.data == "digits"
    args = parser.parse_args(["extract-latents", "--vae", "v", "--output", "z.pt"])
    assert args.command == "extract-latents"


@needs_diffusers
def test_extract_latents_config_is_checked_before_any_work(tmp_path):
    from gspn.diffusion.latents import ExtractLatentsConfig, run

    ok = {"vae": str(tmp_path / "no-such-vae"), "output": str(tmp_path / "z.pt")}
    for bad, needle in (
        ({"vae": ""}, "--vae"),
        ({"output": ""}, "--output"),
        ({"image_size": 0}, "--image-size"),
        ({"limit": -1}, "--limit"),
        ({"in_channels": 2}, "--in-channels"),
        ({"scaling_factor": 0.0}, "--scaling-factor"),
        ({"data": "latents:z.pt"}, "pixel data"),
    ):
        with pytest.raises(ValueError, match=needle):
            run(ExtractLatentsConfig(**{**ok, **bad}))
    assert not (tmp_path / "z.pt").exists()
    # a missing local VAE folder or data folder is named with its flag (it was diffusers' "check your
    # internet connection" and a bare "[Errno 2]"); a hub name ("org/name") is left to diffusers
    for bad, needle in (
        ({}, "--vae .*no-such-vae: no such folder"),
        ({"vae": "./nope"}, "--vae ./nope: no such"),
        ({"vae": "org/name", "data": "imagefolder:/no/such"}, "--data imagefolder:/no/such: no such"),
    ):
        with pytest.raises(FileNotFoundError, match=needle):
            run(ExtractLatentsConfig(**{**ok, **bad}))
    from gspn.diffusion.data import load_dataset

    with pytest.raises(FileNotFoundError, match=r"--fid-ref latents:/no/such.pt: no such file"):
        load_dataset("latents:/no/such.pt", flag="--fid-ref")


def test_extract_latents_train_and_decode_with_a_tiny_vae(tmp_path):
    from diffusers import AutoencoderKL

    from gspn.commands.diffusion import extract_latents_config
    from gspn.diffusion.latents import ExtractLatentsConfig, run, run_extract_latents
    from gspn.diffusion.sample import run_sample
    from gspn.diffusion.train import run_train

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
    assert run_extract_latents is run
    with pytest.raises(TypeError, match="ExtractLatentsConfig"):
        run(build_parser().parse_args(["extract-latents", "--vae", "v", "--output", str(tmp_path / "x.pt")]))
    config = extract_latents_config(
        build_parser().parse_args(
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
        )
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
    res = run(config)
    assert res["vae"] == os.path.abspath(tmp_path / "vae")  # an absolute VAE path is stored
    assert res["count"] == 16 and res["shape"] == [4, 8, 8] and res["scaling_factor"] == 0.5
    blob = torch.load(tmp_path / "z.pt", weights_only=False)
    assert blob["latents"].shape == (16, 4, 8, 8) and blob["labels"].shape == (16,)

    args = _train_args(tmp_path / "run", steps=2, ckpt_every=100)
    args.data = f"latents:{tmp_path / 'z.pt'}"
    summary = run_train(args)
    assert summary["step"] == 2
    from gspn.commands.diffusion import sample_config

    out = run_sample(
        sample_config(
            build_parser().parse_args(
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
            )
        )
    )
    assert Path(out["grid"]).is_file()
    assert len(list((tmp_path / "samples").glob("000*_class*.png"))) == 2


class _StandInExtractor(torch.nn.Module):
    """A tiny stand-in for Inception: images → (pooled features, logits)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 3, stride=2)
        self.fc = torch.nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.conv(x).relu().mean(dim=(2, 3))
        return f, self.fc(f)


def _export_stand_in(path: Path) -> Path:
    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(_StandInExtractor().eval(), (torch.rand(4, 3, 16, 16),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))
    return path


def test_fid_plumbing_with_a_stand_in_extractor(tmp_path):
    ext = FeatureExtractor.load(_export_stand_in(tmp_path / "ext.pt2"), input_size=16)
    real = load_digits(8, 1).tensors[0][:64]
    noise = torch.rand(64, 1, 8, 8) * 2 - 1
    same = fid_from_images(ext, real, real)
    other = fid_from_images(ext, noise, real)
    assert abs(same["fid"]) < 1e-9 and other["fid"] > 1e-5
    assert other["is_mean"] >= 1.0
    assert inception_score(torch.zeros(8, 5), splits=2)[0] == pytest.approx(1.0)
    with pytest.raises(FileNotFoundError):
        FeatureExtractor.load(tmp_path / "missing.pt")


@needs_diffusers
def test_sample_command_writes_images_and_fid(tmp_path):
    from gspn.cli import main as cli_main
    from gspn.diffusion.train import run_train

    run_train(_train_args(tmp_path / "run", steps=1, ckpt_every=100))
    ext = _export_stand_in(tmp_path / "ext.pt2")
    out = tmp_path / "samples"
    cli_main(
        [
            "sample",
            "--checkpoint",
            str(tmp_path / "run" / "ema.safetensors"),
            "--labels",
            "0-2",
            "--per-label",
            "2",
            "--steps",
            "2",
            "--output-dir",
            str(out),
            "--image-size",
            "8",
            "12",
            "--no-progress",
            "--fid-extractor",
            str(ext),
            "--fid-ref",
            "digits",
            "--fid-input-size",
            "16",
        ]
    )
    assert (out / "grid.png").is_file() and len(list(out.glob("0*_class*.png"))) == 6
    fid = __import__("json").loads((out / "fid.json").read_text())
    assert fid["fid"] >= 0 and fid["is_mean"] >= 1.0


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
