"""GSPN-DiT and the DiT recipes (gspn.recipes.diffusion) on the runner: sizes, shapes, CFG, training, resume,
sampling, latents, FID, and the runner's contract as a train-dit user sees it. Tiny models, 8×8 digits."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
from pathlib import Path

import pytest
import torch

import gspn
from gspn.models import GSPNDiT, count_params, create_model, load_model
from gspn.models.gspn_dit import GSPNDiTBlock
from gspn.recipes.diffusion import diffusion_loss, make_train_scheduler
from gspn.recipes.diffusion.data import load_digits
from gspn.recipes.diffusion.fid import FeatureExtractor, fid_from_images, inception_score
from gspn.recipes.diffusion.sample import generate, load_for_sampling, parse_labels
from gspn.recipes.diffusion.train import DiTTrainConfig, DiTTrainRecipe
from gspn.recipes.diffusion.train import run as train_dit
from gspn.training_utils import ConfigError, RunInterrupted, load_state, read_metrics
from gspn.training_utils import run as run_recipe

# gspn.recipes.diffusion imports diffusers lazily; only the tests that build schedulers or a VAE need it.
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


def _dit_config(out: Path, **kw) -> DiTTrainConfig:
    """``gspn train-dit`` on 8×8 digits with a 3-block ``gspn_dit_tiny`` (``tiny_dit_argv`` of tests/tiny.py as a
    config), batch 8, one metrics record per step, no sample grid, no progress bar; ``kw`` replace fields."""
    fields = dict(
        model="gspn_dit_tiny",
        model_args=dict(SMALL),
        image_size=8,
        batch_size=8,
        output_dir=str(out),
        progress=False,
        sample_steps=0,
        log_every=1,
        lr=1e-3,
    )
    return DiTTrainConfig(**{**fields, **kw})


def _same_weights(a: Path, b: Path) -> None:
    sa, sb = load_state(a), load_state(b)
    for key in ("model", "ema"):
        for name, tensor in sa[key].items():
            assert torch.equal(tensor, sb[key][name]), (key, name)


@needs_diffusers
def test_resume_is_exact(tmp_path):
    train_dit(_dit_config(tmp_path / "straight", steps=4, ckpt_every=100))
    train_dit(_dit_config(tmp_path / "resumed", steps=2, ckpt_every=100))
    # extending the run is a change of its settings: accepted when asked for
    summary = train_dit(_dit_config(tmp_path / "resumed", steps=4, ckpt_every=100, resume="auto", allow_changes=True))
    assert summary["step"] == 4
    _same_weights(tmp_path / "straight" / "last.pt", tmp_path / "resumed" / "last.pt")
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
    # image_size 15 with patch 2 failed at the first step, after config.json was written, so the
    # corrected command was refused ("already holds a run"); a bad model override was a TypeError traceback
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"image_size \(15×15\) must be a multiple of gspn_dit_tiny's patch size 2"):
        train_dit(_dit_config(out, image_size=15, steps=1))
    with pytest.raises(ConfigError, match=r"model_args .*'bogus': 1.* for gspn_dit_tiny") as err:
        train_dit(_dit_config(out, model_args={**SMALL, "bogus": 1}, steps=1))
    assert err.value.field == "model_args"
    assert not (out / "config.json").exists() and not (out / "last.pt").exists()
    assert not out.exists()  # a run that fails while being built leaves no folder
    assert train_dit(_dit_config(out, steps=1))["step"] == 1  # the corrected command is not refused
    assert (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["config"]["steps"] == 1


@needs_diffusers
@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"lr": 0.0}, "lr"),
        ({"sampler": "euler"}, "sampler"),
        ({"model": "gspn_micro"}, "model"),
        ({"model": "no_such_model"}, "model"),
        ({"batch_size": 4096}, "batch_size"),
        ({"data": "imagefolder:/no/such"}, "data"),
    ],
)
def test_train_dit_settings_are_checked_before_anything_is_written(tmp_path, overrides, field):
    out = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        train_dit(_dit_config(out, **{"steps": 1, **overrides}))
    assert err.value.field == field and "--" not in str(err.value)  # the library names fields, not flags
    assert not out.exists()


class _CtrlCAt(DiTTrainRecipe):
    """Presses Ctrl-C (a real SIGINT to this process) during optimizer step ``at`` (1-based)."""

    def __init__(self, config: DiTTrainConfig, at: int) -> None:
        super().__init__(config)
        self.at = at

    def run_unit(self, index, progress):
        if index + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().run_unit(index, progress)


@needs_diffusers
def test_ctrl_c_before_the_first_checkpoint_saves_and_resume_continues_exactly(tmp_path, capsys):
    # train-dit used to save nothing on an interrupt before its first ckpt_every step, and resume then
    # restarted at step 0 without a word
    train_dit(_dit_config(tmp_path / "straight", steps=4, ckpt_every=100))
    out = tmp_path / "split"
    with pytest.raises(RunInterrupted, match=r"holds the state after step 2: continue it with `resume`"):
        run_recipe(_CtrlCAt(_dit_config(out, steps=4, ckpt_every=100), at=2))
    assert load_state(out / "last.pt")["step"] == 2 and (out / "config.json").is_file()
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]
    capsys.readouterr()
    summary = train_dit(_dit_config(out, steps=4, ckpt_every=100, resume="auto"))
    assert summary["step"] == 4
    assert f"resumed from {out / 'last.pt'} at step 3/4" in capsys.readouterr().out
    _same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3, 4]


@needs_diffusers
def test_a_resume_inside_a_log_window_logs_what_the_straight_run_logs(tmp_path):
    # the running loss sums of the window were not saved: the record spanning the interrupt differed
    train_dit(_dit_config(tmp_path / "straight", steps=6, log_every=3, ckpt_every=100))
    out = tmp_path / "split"
    with pytest.raises(RunInterrupted):
        run_recipe(_CtrlCAt(_dit_config(out, steps=6, log_every=3, ckpt_every=100), at=2))
    train_dit(_dit_config(out, steps=6, log_every=3, ckpt_every=100, resume="auto"))
    keys = ("step", "loss", "mse", "vb", "lr", "grad_norm")
    straight, split = (read_metrics(p / "metrics.jsonl") for p in (tmp_path / "straight", out))
    assert [{k: r[k] for k in keys} for r in split] == [{k: r[k] for k in keys} for r in straight]
    assert [r["step"] for r in split] == [3, 6]


@needs_diffusers
@pytest.mark.parametrize("marked", [True, False])
def test_a_last_pt_of_the_old_dit_format_resumes_exactly(tmp_path, marked):
    """A ``last.pt`` written before the runner (no ``command``/``unit``) and before the shared key names
    (``opt``, ``arch``, ``args``, one RNG dict; ``marked``: with the ``format`` entry) continues at its step
    and ends with the straight run's weights."""
    from gspn.training_utils import save_state

    train_dit(_dit_config(tmp_path / "straight", steps=4, ckpt_every=100))
    out = tmp_path / "split"
    with pytest.raises(RunInterrupted):
        run_recipe(_CtrlCAt(_dit_config(out, steps=4, ckpt_every=100), at=2))
    new = load_state(out / "last.pt")
    legacy_config = {k: v for k, v in new["config"].items() if k not in ("allow_changes", "quiet")}
    old = {
        "model": new["model"],
        "ema": new["ema"],
        "opt": new["optimizer"],
        "step": new["step"],
        "rng": new["rng"][0],
        "arch": new["model_name"],
        "model_args": new["model_args"],
        "schedule": new["schedule"],
        "data": new["data"],
        "args": {**legacy_config, "resume": "none"},
        **({"format": new["format"]} if marked else {}),
    }
    save_state(out / "last.pt", old)
    assert train_dit(_dit_config(out, steps=4, ckpt_every=100, resume="auto"))["step"] == 4
    _same_weights(tmp_path / "straight" / "last.pt", out / "last.pt")


@needs_diffusers
def test_resume_with_changed_settings_lists_them_and_refuses_unless_allowed(tmp_path, capsys):
    out = tmp_path / "run"
    train_dit(_dit_config(out, steps=2, ckpt_every=100))
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"batch_size: 8 → 4.*lr: 0\.001 → 0\.002.*allow_changes") as err:
        train_dit(_dit_config(out, steps=2, batch_size=4, lr=2e-3, resume="auto"))
    assert err.value.field == "resume"
    assert (out / "last.pt").read_bytes() == before
    with pytest.raises(ConfigError, match=r"is for model gspn_dit_tiny .*'hidden_size': 32.*'hidden_size': 48"):
        train_dit(_dit_config(out, steps=2, model_args={**SMALL, "hidden_size": 48}, resume="auto"))
    # how the run is carried out (checkpoint period, logging, time limit, the final grid) may change freely
    capsys.readouterr()
    train_dit(_dit_config(out, steps=2, ckpt_every=1, log_every=2, max_minutes=60.0, resume="auto"))
    assert "changed settings" not in capsys.readouterr().out
    train_dit(_dit_config(out, steps=3, lr=2e-3, resume="auto", allow_changes=True))
    said = capsys.readouterr().out
    assert "continuing with changed settings: lr: 0.001 → 0.002; steps: 2 → 3" in said
    assert "the learning rate follows this run's lr" in said and load_state(out / "last.pt")["step"] == 3


@needs_diffusers
def test_resume_without_a_state_says_it_starts_at_step_one(tmp_path, capsys):
    out = tmp_path / "fresh"
    assert train_dit(_dit_config(out, steps=1, resume="auto"))["step"] == 1
    assert f"nothing to resume in {out}: starting at step 1" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"resume names no checkpoint: .*missing\.pt does not exist"):
        train_dit(_dit_config(tmp_path / "other", steps=1, resume=str(tmp_path / "missing.pt")))
    assert not (tmp_path / "other").exists()


@needs_diffusers
def test_a_non_finite_stop_names_its_cause_and_only_files_that_exist(tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=r"non-finite .* in step \d: the training diverged") as err:
        train_dit(_dit_config(out, steps=3, lr=1e30, clip_grad=None))
    assert "no training state was saved yet" in str(err.value) and not (out / "last.pt").exists()
    train_dit(_dit_config(out, steps=1, overwrite=True))
    good = (out / "last.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"keeps the state after step 1"):
        train_dit(_dit_config(out, steps=4, lr=1e30, clip_grad=None, resume="auto", allow_changes=True))
    assert (out / "last.pt").read_bytes() == good
    # non-finite data: the message says so, not "diverged"
    bad = {"latents": torch.randn(16, 4, 4, 4), "labels": torch.arange(16) % 2, "meta": {"num_classes": 2}}
    bad["latents"][3, 0, 0, 0] = float("nan")
    torch.save(bad, tmp_path / "nan.pt")
    with pytest.raises(FloatingPointError, match=r"the data hold non-finite values \(1 of 16 samples\)"):
        train_dit(_dit_config(tmp_path / "nan_data", steps=2, data=f"latents:{tmp_path / 'nan.pt'}"))


@needs_diffusers
def test_one_header_line_a_reported_final_grid_and_one_closing_line(tmp_path, capfd, recwarn):
    # train-dit printed a UserWarning from its own loss logging and sampled its final grid silently
    out = tmp_path / "run"
    summary = train_dit(_dit_config(out, steps=3, ckpt_every=2, sample_steps=2, log_every=2, progress=True))
    got = capfd.readouterr()
    lines = got.out.strip().splitlines()
    assert lines[0].startswith("train-dit: model gspn_dit_tiny") and "3 steps × batch 8" in lines[0]
    assert lines[1] == f"sampling the final grid: 80 images × 2 ddpm steps → {out / 'samples.png'}"
    assert lines[2] == f"train-dit: step 3/3, loss {summary['loss']:.4f}; outputs in {out}"
    assert len(lines) == 3
    assert "sampling" in got.err  # the grid's progress bar
    assert "Warning" not in got.err and not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [2, 3]
    assert (out / "samples.png").is_file() and json.loads((out / "summary.json").read_text())["step"] == 3


@needs_diffusers
def test_max_minutes_stops_with_a_state_and_the_exports(tmp_path, capsys):
    out = tmp_path / "run"
    summary = train_dit(_dit_config(out, steps=50, ckpt_every=100, max_minutes=1e-9))
    assert summary["step"] == 1 and summary["stopped"].startswith("max_minutes")
    assert load_state(out / "last.pt")["step"] == 1 and (out / "ema.safetensors").is_file()
    assert "reached at step 1: continue it with resume" in capsys.readouterr().out.strip().splitlines()[-1]


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


def test_image_folder_dataset(tmp_path):
    from PIL import Image

    from gspn.recipes.diffusion.data import load_dataset

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


@needs_diffusers
def test_extract_latents_config_is_checked_before_any_work(tmp_path):
    from gspn.recipes.diffusion.data import load_dataset
    from gspn.recipes.diffusion.latents import ExtractLatentsConfig, run

    ok = {"vae": str(tmp_path / "no-such-vae"), "output": str(tmp_path / "z.pt")}
    for bad, field in (
        ({"vae": ""}, "vae"),
        ({"output": ""}, "output"),
        ({"image_size": 0}, "image_size"),
        ({"limit": -1}, "limit"),
        ({"in_channels": 2}, "in_channels"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
        ({"data": "latents:z.pt"}, "data"),
    ):
        with pytest.raises(ConfigError, match=f"^{field} ") as err:
            run(ExtractLatentsConfig(**{**ok, **bad}))
        assert err.value.field == field
    assert not (tmp_path / "z.pt").exists()
    # a missing local VAE folder or data folder is named with its field (it was diffusers' "check your
    # internet connection" and a bare "[Errno 2]"); a hub name ("org/name") is left to diffusers
    for bad, needle in (
        ({}, "vae .*no-such-vae: no such folder"),
        ({"vae": "./nope"}, "vae ./nope: no such"),
        ({"vae": "org/name", "data": "imagefolder:/no/such"}, "data imagefolder:/no/such: no such"),
    ):
        with pytest.raises(ConfigError, match=needle):
            run(ExtractLatentsConfig(**{**ok, **bad}))
    assert list(tmp_path.iterdir()) == []  # nothing written: no latents, no summary, no lock

    with pytest.raises(ConfigError, match=r"fid_ref latents:/no/such.pt: no such file"):
        load_dataset("latents:/no/such.pt", field="fid_ref")


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
def test_sample_writes_images_and_fid(tmp_path):
    from gspn.recipes.diffusion.sample import SampleConfig
    from gspn.recipes.diffusion.sample import run as sample

    train_dit(_dit_config(tmp_path / "run", steps=1, ckpt_every=100))
    ext = _export_stand_in(tmp_path / "ext.pt2")
    out = tmp_path / "samples"
    config = SampleConfig(
        checkpoint=str(tmp_path / "run" / "ema.safetensors"),
        labels="0-2",
        per_label=2,
        steps=2,
        output_dir=str(out),
        image_size=[8, 12],
        progress=False,
        fid_extractor=str(ext),
        fid_ref="digits",
        fid_input_size=16,
    )
    summary = sample(config)
    assert (out / "grid.png").is_file() and len(list(out.glob("0*_class*.png"))) == 6
    fid = json.loads((out / "fid.json").read_text())
    assert fid["fid"] >= 0 and fid["is_mean"] >= 1.0
    assert summary["fid"] == fid["fid"] and json.loads((out / "summary.json").read_text())["images"] == 6
    with pytest.raises(ConfigError, match="fid_ref is needed with `fid_extractor`"):  # checked before sampling
        sample(dataclasses.replace(config, fid_ref=None, output_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


@needs_diffusers
def test_sample_is_a_job_ctrl_c_stops_it_at_the_next_step(tmp_path, capsys):
    from gspn.recipes.diffusion.sample import SampleConfig, SampleRecipe

    train_dit(_dit_config(tmp_path / "run", steps=1, ckpt_every=100))
    config = SampleConfig(checkpoint=str(tmp_path / "run" / "last.pt"), labels="0,1", steps=3, progress=False)
    capsys.readouterr()
    done = run_recipe(SampleRecipe(dataclasses.replace(config, output_dir=str(tmp_path / "a"))))
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("sample: ") and lines[1] == f"sample: 2 images → {done['grid']}"

    class CtrlC(SampleRecipe):
        def run_unit(self, index, progress):
            progress.stop_requested = True  # as the runner's handler does on the first Ctrl-C
            return super().run_unit(index, progress)

    with pytest.raises(RunInterrupted, match="interrupted"):
        run_recipe(CtrlC(dataclasses.replace(config, output_dir=str(tmp_path / "b"))))
    assert not (tmp_path / "b" / "grid.png").exists()
