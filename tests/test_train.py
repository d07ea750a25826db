"""Tests for gspn.train and the gspn CLI (train / eval / flops). Tiny models, 16×16 digits, few steps."""

from __future__ import annotations

import copy
import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn.cli import main
from gspn.train import (
    TrainConfig,
    build_data,
    build_model,
    count_params,
    evaluate_checkpoint,
    match_params,
    parse_model_args,
    train,
    weights_digest,
)
from gspn.train.checkpoint import capture_rng, load_state, restore_rng, save_state
from gspn.train.data import DigitsDataset, center_crop_resize, random_resized_crop
from gspn.train.ema import build_ema, load_ema_weights
from gspn.train.metrics import Panel, append_metrics, plot_metrics, read_metrics, truncate_metrics
from gspn.train.trainer import _cosine_with_warmup

TINY_CONV = {"width": 8}
TINY_VIT = {"embed_dim": 32, "depth": 1, "patch_size": 4, "pos_grid": 4, "drop": 0.1}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's spinning
    threads make them several times slower; the previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(
        model="baseline_conv",
        model_args=dict(TINY_CONV),
        data="digits",
        output=str(tmp_path / name),
        img_size=16,
        epochs=2,
        batch_size=32,
        lr=3e-3,
        warmup_epochs=0.5,
        train_limit=160,
        val_limit=64,
        workers=0,
        progress=False,
        plot=False,
        verbose=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------- data / pieces


def test_digits_split_is_fixed_stratified_and_disjoint() -> None:
    tr = DigitsDataset("train", 8, 1)
    va = DigitsDataset("val", 8, 1)
    assert len(tr) + len(va) == 1797 and 350 <= len(va) <= 370
    assert not set(tr.indices) & set(va.indices)
    assert torch.bincount(va.targets, minlength=10).min() >= 34  # every class in val
    assert torch.equal(DigitsDataset("val", 8, 1).targets, va.targets)  # deterministic


def test_build_data_shapes_and_channels() -> None:
    d = build_data("digits", img_size=24, in_chans=2)
    x, y = d.train[0]
    assert x.shape == (2, 24, 24) and isinstance(y, int) and d.num_classes == 10
    xv, _ = d.val[0]
    assert xv.shape == (2, 24, 24)
    assert abs(float(torch.stack([d.val[i][0] for i in range(100)]).mean())) < 0.5  # normalised


def test_transforms() -> None:
    torch.manual_seed(0)
    img = torch.rand(3, 40, 60)
    for _ in range(20):
        assert random_resized_crop(img, 16).shape == (3, 16, 16)
    assert random_resized_crop(img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0)).shape == (3, 16, 16)
    out = center_crop_resize(img, 32, crop_pct=0.875)
    assert out.shape == (3, 32, 32)
    # full-scale, identity-ratio crop of a square image is a plain resize
    sq = torch.rand(1, 8, 8)
    assert torch.allclose(random_resized_crop(sq, 8, scale=(1, 1), ratio=(1, 1)), sq)


def test_image_folder_training_and_eval(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, color in (("cat", 0), ("dog", 2)):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                arr = (rng.rand(20, 28, 3) * 60).astype(np.uint8)
                arr[..., color] += 150
                Image.fromarray(arr).save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            "baseline_conv",
            "--model-arg",
            "width=8",
            "--data",
            str(tmp_path / "imgs"),
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--output-dir",
            str(out),
            "--no-progress",
            "--no-plot",
            "--quiet",
        ]
    )
    assert rc == 0
    ck = load_state(out / "last.pt")
    assert ck["classes"] == ["cat", "dog"] and ck["img_size"] == 16 and ck["step"] == 3
    res = evaluate_checkpoint(out / "last.pt", workers=0)
    assert res["n"] == 6 and 0.0 <= res["val_acc"] <= 1.0


def test_schedule_warmup_then_cosine() -> None:
    f = _cosine_with_warmup(total=100, warmup=10, base_lr=1e-3, min_lr=1e-5)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == pytest.approx(0.01) and f(1000) == pytest.approx(0.01)
    vals = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(vals))


def test_parse_model_args() -> None:
    assert parse_model_args(["a=1", "b=(1, 2)", "c=gelu", "d=0.5"]) == {
        "a": 1,
        "b": (1, 2),
        "c": "gelu",
        "d": 0.5,
    }
    with pytest.raises(ValueError):
        parse_model_args(["novalue"])


def test_baselines_any_resolution_and_matched_size() -> None:
    for name, kw in (("baseline_vit", TINY_VIT), ("baseline_conv", TINY_CONV)):
        m = build_model(name, num_classes=7, in_chans=1, **kw).eval()
        for s in (16, 24):
            assert m(torch.randn(2, 1, s, s)).shape == (2, 7)
        assert m.default_cfg["num_classes"] == 7
    target = 200_000
    for name in ("baseline_vit", "baseline_conv"):
        kw = match_params(name, target, num_classes=10)
        n = count_params(build_model(name, num_classes=10, **kw))
        assert abs(n - target) / target < 0.15, (name, kw, n)


def _old_vit_baseline(
    num_classes: int, embed_dim: int, depth: int, heads: int, hidden: int, patch: int, grid: int
) -> torch.nn.Module:
    """The ViT baseline as it was before it became a VisionTransformer: the modules (hence the state-dict
    keys) of its ``nn.TransformerEncoderLayer`` era, with random values everywhere (norms included)."""
    layer = torch.nn.TransformerEncoderLayer(
        embed_dim, heads, dim_feedforward=hidden, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
    )
    old = torch.nn.Module()
    old.patch_embed = torch.nn.Conv2d(3, embed_dim, patch, stride=patch)
    old.pos_embed = torch.nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
    old.blocks = torch.nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
    old.norm = torch.nn.LayerNorm(embed_dim)
    old.head = torch.nn.Linear(embed_dim, num_classes)
    with torch.no_grad():
        for t in old.parameters():
            t.copy_(torch.randn_like(t) * 0.3 + (1.0 if t.ndim == 1 and t.shape[0] == embed_dim else 0.0))
    return old


def _old_vit_baseline_forward(
    sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int, patch: int
) -> torch.Tensor:
    """The old ViT baseline's computation in plain torch, from its (old-key) state dict ``sd``: unpadded
    patchify, bilinear position resize, pre-norm blocks (LN eps 1e-5, exact GELU), LN, token mean, Linear."""
    import math

    import torch.nn.functional as F

    x = F.conv2d(x, sd["patch_embed.weight"], sd["patch_embed.bias"], stride=patch)
    pos = sd["pos_embed"]
    if pos.shape[-2:] != x.shape[-2:]:
        pos = F.interpolate(pos, size=x.shape[-2:], mode="bilinear", align_corners=False)
    t = (x + pos).flatten(2).transpose(1, 2)  # (B, N, D)
    d = t.shape[-1]
    for i in range(depth):
        q = f"blocks.layers.{i}."
        h = F.layer_norm(t, (d,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], 1e-5)
        qkv = F.linear(h, sd[q + "self_attn.in_proj_weight"], sd[q + "self_attn.in_proj_bias"])
        qh, kh, vh = (z.unflatten(-1, (heads, d // heads)).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        a = torch.softmax(qh @ kh.transpose(-2, -1) / math.sqrt(d // heads), dim=-1) @ vh
        t = t + F.linear(
            a.transpose(1, 2).flatten(2), sd[q + "self_attn.out_proj.weight"], sd[q + "self_attn.out_proj.bias"]
        )
        h = F.layer_norm(t, (d,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], 1e-5)
        h = F.linear(
            F.gelu(F.linear(h, sd[q + "linear1.weight"], sd[q + "linear1.bias"])),
            sd[q + "linear2.weight"],
            sd[q + "linear2.bias"],
        )
        t = t + h
    t = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-5)
    return F.linear(t.mean(dim=1), sd["head.weight"], sd["head.bias"])


def test_vit_baseline_is_a_vision_transformer_and_loads_old_weights(tmp_path: Path) -> None:
    """The ViT baseline is a configuration of ``VisionTransformer``; weights with the key names of its
    ``nn.TransformerEncoderLayer`` era load (``load_state_dict``, ``load_model``, ``create_model``) and give
    the old computation's outputs; it then writes VisionTransformer's key names."""
    import gspn.models
    import gspn.models.baselines as baselines
    from gspn.models import create_model, get_default_cfg, list_models, load_model, save_checkpoint
    from gspn.models.vit import TransformerBlock, VisionTransformer

    torch.manual_seed(0)
    # embed_dim 32 → 2 heads by the default rule; mlp_ratio 1.99 → hidden int(63.68) = 63 (round() would give 64)
    args = dict(num_classes=5, in_chans=3, embed_dim=32, depth=2, mlp_ratio=1.99, pos_grid=4, drop=0.0)
    old = _old_vit_baseline(5, 32, depth=2, heads=2, hidden=63, patch=4, grid=4)
    old_sd = {k: v.detach().clone() for k, v in old.state_dict().items()}
    assert "blocks.layers.1.self_attn.in_proj_weight" in old_sd and "head.weight" in old_sd
    xs = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32), torch.randn(2, 3, 30, 27)]  # grid 4, 8, 7×6
    with torch.no_grad():  # the plain-torch reference is the old model's computation
        old.eval()
        for x in xs:
            t = old.patch_embed(x)
            t = t + torch.nn.functional.interpolate(old.pos_embed, size=t.shape[-2:], mode="bilinear")
            want = old.head(old.norm(old.blocks.train()(t.flatten(2).transpose(1, 2))).mean(dim=1))
            torch.testing.assert_close(_old_vit_baseline_forward(old_sd, x, 2, 2, 4), want, rtol=0, atol=1e-6)

    new = gspn.train.build_model("baseline_vit", **args)
    assert isinstance(new, baselines.ViTBaseline) and isinstance(new, VisionTransformer)
    assert all(type(b) is TransformerBlock for b in new.blocks) and new.blocks[0].attn.num_heads == 2
    assert new.blocks[0].mlp.fc1.out_features == 63 and new.pos_interp == "bilinear"
    new.load_state_dict(dict(old_sd))  # strict: every old key is renamed by the pre-hook
    assert "blocks.1.attn.qkv.weight" in new.state_dict()
    assert not any(k.startswith("blocks.layers.") or k in ("head.weight", "norm.weight") for k in new.state_dict())
    torch.testing.assert_close(
        new.state_dict()["blocks.1.attn.qkv.weight"], old_sd["blocks.layers.1.self_attn.in_proj_weight"], rtol=0, atol=0
    )
    for mode in (new.eval, new.train):  # drop=0.0: training mode computes the same
        mode()
        with torch.no_grad():
            for x in xs:
                torch.testing.assert_close(new(x), _old_vit_baseline_forward(old_sd, x, 2, 2, 4), rtol=0, atol=1e-6)
    # parameters in the old order, so an old last.pt's optimizer state (matched by position) resumes
    renames = baselines._old_key_names(2)
    assert [n for n, _ in new.named_parameters()] == [renames.get(n, n) for n, _ in old.named_parameters()]
    stepped = copy.deepcopy(old)  # an optimizer state written by the old layout
    opt_old = torch.optim.AdamW(stepped.parameters())
    for t in stepped.parameters():
        t.grad = torch.ones_like(t)
    opt_old.step()
    opt_new = torch.optim.AdamW(new.parameters())
    opt_new.load_state_dict(opt_old.state_dict())
    for p_new, (name, _) in zip(new.parameters(), old.named_parameters(), strict=True):
        assert opt_new.state[p_new]["exp_avg"].shape == p_new.shape, name
    new(xs[0]).sum().backward()
    opt_new.step()  # used to fail: "The size of tensor a (96) must match the size of tensor b (32)"
    new.load_state_dict(dict(old_sd))
    assert baselines.count_params is count_params is importlib.import_module("gspn.models").count_params
    assert count_params(new) == sum(p.numel() for p in old.parameters())

    # a weight file written with the old names (as save_checkpoint wrote them) loads by load_model and create_model
    old.default_cfg, old.model_args = {"architecture": "baseline_vit"}, dict(args)
    path = save_checkpoint(old, tmp_path / "old_vit.safetensors")
    for loaded in (load_model(path), create_model("baseline_vit", pretrained=path, **args)):
        assert isinstance(loaded, baselines.ViTBaseline) and loaded.default_cfg["architecture"] == "baseline_vit"
        with torch.no_grad():
            for x in xs:
                torch.testing.assert_close(
                    loaded.eval()(x), _old_vit_baseline_forward(old_sd, x, 2, 2, 4), rtol=0, atol=1e-6
                )
    fresh = gspn.train.build_model("baseline_vit", **args)
    gspn.models.load_checkpoint(fresh, path)  # strict, through upgrade_state_dict
    want0 = _old_vit_baseline_forward(old_sd, xs[0], 2, 2, 4)
    torch.testing.assert_close(fresh.eval()(xs[0]), want0, rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match=r"'head\.fc'.*5 classes.*3 classes"):  # the head rule sees the new names
        rehead = load_model(path, num_classes=3)
    torch.testing.assert_close(rehead.blocks[1].mlp.fc2.weight, old_sd["blocks.layers.1.linear2.weight"])
    # and what it writes now has VisionTransformer's names, and loads back
    new_path = save_checkpoint(load_model(path), tmp_path / "new_vit.safetensors")
    assert "blocks.0.attn.qkv.weight" in gspn.models.checkpoint.load_file(str(new_path))
    torch.testing.assert_close(load_model(new_path).eval()(xs[1]), new.eval()(xs[1]), rtol=0, atol=0)
    # the registry entry and task tag are unchanged
    assert "baseline_vit" in list_models(task="classification")
    assert get_default_cfg("baseline_vit")["task"] == "classification"


def test_vit_baseline_dropout_placement() -> None:
    """``drop`` is where ``nn.TransformerEncoderLayer`` put it: attention weights, after the attention's
    output projection, after the MLP activation and after its output; no stochastic depth, none before the
    classifier."""
    m = build_model("baseline_vit", num_classes=3, embed_dim=32, depth=2, drop=0.25)
    for b in m.blocks:
        assert b.attn.attn_drop == 0.25 and b.attn.proj_drop.p == 0.25
        assert b.mlp.drop.p == 0.25 and b.mlp_drop.p == 0.25
        assert isinstance(b.drop_path, torch.nn.Identity)
    assert m.head.drop.p == 0.0
    assert all(b.mlp_drop.p == 0.0 for b in build_model("vit_nano", num_classes=10).blocks)  # vit_* defaults: none


def test_rng_capture_restore_roundtrip(tmp_path: Path) -> None:
    import random

    g = torch.Generator().manual_seed(3)
    state = capture_rng(g)
    save_state(tmp_path / "rng.pt", {"rng": state})
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    restore_rng(load_state(tmp_path / "rng.pt")["rng"], g)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=g))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2] and torch.equal(a[3], b[3])


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ck.pt"
    save_state(path, {"w": torch.ones(3)})

    def crashing_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_state(path, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(load_state(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left behind


def test_plot_skipped_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "m.jsonl"
    log.write_text(json.dumps({"epoch": 0, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5, "val_acc": 0.4}))
    assert plot_metrics(log, tmp_path / "ok.png") and (tmp_path / "ok.png").stat().st_size > 1000
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib"):
        assert plot_metrics(log, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_metrics_truncate_by_key_and_plot_against_steps(tmp_path: Path) -> None:
    log = tmp_path / "m.jsonl"
    for step in (10, 20, 30):
        append_metrics(log, {"step": step, "epoch": step // 20, "loss": 1.0 / step})
    truncate_metrics(log, 20, key="step")  # resuming the DiT from its step-20 checkpoint
    assert [r["step"] for r in read_metrics(log)] == [10, 20]
    truncate_metrics(log, 0)  # the classifier's default: by epoch
    assert [r["step"] for r in read_metrics(log)] == [10]
    panel = Panel("loss", "", (("loss", "loss"),), log=True)
    assert plot_metrics(log, tmp_path / "loss.png", (panel,), x="step", x_offset=0)
    assert (tmp_path / "loss.png").stat().st_size > 1000


def test_ema_averages_parameters_and_buffers_and_reloads() -> None:
    torch.manual_seed(0)
    model = torch.nn.BatchNorm1d(3)
    ema = build_ema(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(4.0)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(6.0)
        model.running_mean.fill_(8.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, torch.full((3,), 3.0))  # 0.75·2 + 0.25·6
    assert torch.allclose(ema.module.running_mean, torch.full((3,), 5.0))
    assert model.weight[0] == 6.0  # the model itself is untouched
    fresh = load_ema_weights(torch.nn.BatchNorm1d(3), ema.state_dict())
    for name, t in ema.module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    with pytest.raises(ValueError, match="not an EMA state dict"):
        load_ema_weights(torch.nn.BatchNorm1d(3), model.state_dict())


# ----------------------------------------------------------------------------------------- training


@pytest.mark.parametrize(
    ("model", "model_args", "workers"),
    [("baseline_conv", TINY_CONV, 0), ("baseline_vit", TINY_VIT, 2)],  # ViT has dropout: RNG must resume too
)
def test_resume_is_exact(tmp_path: Path, model: str, model_args: dict, workers: int) -> None:
    kw = dict(model=model, model_args=dict(model_args), workers=workers, ema_decay=0.9)
    straight = train(_cfg(tmp_path, "straight", **kw))
    first = train(_cfg(tmp_path, "split", stop_after_epochs=1, **kw))  # as if the job were killed here
    assert first["steps"] == 5
    resumed = train(_cfg(tmp_path, "split", resume="auto", **kw))
    assert resumed["steps"] == straight["steps"] == 10
    a, b = load_state(tmp_path / "straight/last.pt"), load_state(tmp_path / "split/last.pt")
    _assert_same_state(a["model"], b["model"])
    _assert_same_state(a["ema"], b["ema"])
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        _assert_same_state(sa, sb)
    assert straight["rank_weight_digests"] == resumed["rank_weight_digests"]
    ma, mb = read_metrics(tmp_path / "straight/metrics.jsonl"), read_metrics(tmp_path / "split/metrics.jsonl")
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb, strict=True):
        for k in ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc"):
            assert ra[k] == rb[k], k


def test_training_learns_and_writes_outputs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "run", epochs=3, train_limit=320, val_limit=120, lr=1e-2, plot=True)
    s = train(cfg)
    out = Path(cfg.output)
    assert {"last.pt", "best.pt", "metrics.jsonl", "metrics.png", "summary.json", "model.safetensors"} <= {
        p.name for p in out.iterdir()
    }
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1, 2] and recs[-1]["step"] == 30
    assert recs[-1]["train_loss"] < recs[0]["train_loss"]
    assert s["best_acc"] > 0.5  # 10 classes: chance is 0.1
    # safetensors export loads into a fresh model
    from safetensors.torch import load_file

    m = build_model("baseline_conv", num_classes=10, **TINY_CONV)
    m.load_state_dict(load_file(out / "model.safetensors"))
    assert weights_digest(m) == s["rank_weight_digests"][0]
    # resuming a finished run is a no-op that keeps the log intact
    train(_cfg(tmp_path, "run", epochs=3, train_limit=320, val_limit=120, lr=1e-2, resume="auto"))
    assert len(read_metrics(out / "metrics.jsonl")) == 3


def test_divergence_stops_before_checkpointing(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "nan", epochs=2, lr=1e30, clip_grad=None, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        train(cfg)
    assert not (tmp_path / "nan/last.pt").exists()


def test_resume_rejects_other_model(tmp_path: Path) -> None:
    train(_cfg(tmp_path, "r", epochs=1))
    with pytest.raises(ValueError, match="checkpoint is for model"):
        train(_cfg(tmp_path, "r", model_args={"width": 12}, resume="auto"))


def test_cli_eval_matches_training_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(_cfg(tmp_path, "e", epochs=1, ema_decay=0.5))
    rec = read_metrics(tmp_path / "e/metrics.jsonl")[-1]
    assert main(["eval", "--checkpoint", str(tmp_path / "e/last.pt"), "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["val_acc"] == pytest.approx(rec["val_acc"]) and res["val_loss"] == pytest.approx(rec["val_loss"])
    assert main(["eval", "--checkpoint", str(tmp_path / "e/last.pt"), "--workers", "0", "--ema"]) == 0
    assert f"{100 * rec['ema_val_acc']:.2f}%" in capsys.readouterr().out


def test_registry_model_trains(tmp_path: Path) -> None:
    """A model from the gspn.models registry goes through the same trainer (gspn_micro once merged)."""
    from gspn.models import list_models

    name = "gspn_micro" if "gspn_micro" in list_models() else list_models()[0]
    cfg = _cfg(tmp_path, "reg", model=name, model_args={}, img_size=32, epochs=1, train_limit=64, val_limit=32)
    s = train(cfg)
    assert s["steps"] == 2 and s["params"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp_training_and_resume(tmp_path: Path, amp: str) -> None:
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    kw = dict(device="cuda", amp=amp, ema_decay=0.9, workers=1)
    train(_cfg(tmp_path, "gpu", stop_after_epochs=1, **kw))
    ck = load_state(tmp_path / "gpu/last.pt")
    assert bool(ck["scaler"]) == (amp == "fp16")  # the grad scaler is used (and saved) for fp16 only
    s = train(_cfg(tmp_path, "gpu", resume="auto", **kw))
    assert s["steps"] == 10 and np.isfinite(s["final"]["val_loss"])
    res = evaluate_checkpoint(tmp_path / "gpu/last.pt", workers=0)
    assert res["val_acc"] == pytest.approx(s["final"]["val_acc"], abs=1 / 64)


def test_benchmark_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/train_digits.py end to end (with a baseline standing in for gspn_micro)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("bench_train_digits", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = torch.get_num_threads()
    argv = ["--gspn-model", "baseline_conv", "--gspn-arg", "width=8", "--epochs", "1", "--img-size", "16"]
    argv += ["--vit-depth", "1", "--train-limit", "64", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    torch.set_num_threads(n)
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in res["results"]}
    assert len(res["results"]) == 3 and {"baseline_vit", "baseline_conv"} <= set(rows)
    target = res["results"][0]["params"]
    assert all(abs(r["params"] - target) / target < 0.5 for r in res["results"])
    assert "best val" in capsys.readouterr().out
    assert bench.main(["--gspn-model", "no_such_model", "--out", str(tmp_path)]) == 2


# ----------------------------------------------------------------------------------------- flops


def test_flops_cli_with_complexity(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls = []

    def complexity(model, input_size=(3, 224, 224), batch=1):
        calls.append((input_size, batch))
        return {"params": count_params(model), "macs": 123_000_000}

    monkeypatch.setattr(importlib.import_module("gspn.models.complexity"), "complexity", complexity)
    argv = ["flops", "--model", "baseline_conv", "--image-size", "64", "--num-classes", "10", "--json"]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["model"] == "baseline_conv" and row["macs"] == 123_000_000
    assert row["params"] == count_params(build_model("baseline_conv", num_classes=10))
    assert calls == [((3, 64, 64), 1)]
    assert main(["flops", "--model", "baseline_conv", "--image-size", "64"]) == 0
    assert "0.123" in capsys.readouterr().out


def test_flops_cli_classifiers_and_diffusion_models(capsys) -> None:
    """Each model at its own default input (a DiT takes latents), counted on the meta device."""
    from gspn.models import create_model

    assert main(["flops", "--model", "gspn_nano", "gspn_dit_tiny", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["task"], r["input_size"]) for r in rows] == [
        ("gspn_nano", "classification", [3, 32, 32]),
        ("gspn_dit_tiny", "diffusion", [1, 16, 16]),
    ]
    assert rows[1]["params"] == count_params(create_model("gspn_dit_tiny"))
    assert all(r["macs"] > 0 for r in rows)


def test_cli_reports_bad_models_without_traceback(capsys, tmp_path) -> None:
    assert main(["flops", "--model", "no_such_model"]) == 2
    assert "gspn flops: error: unknown model 'no_such_model'" in capsys.readouterr().err
    assert main(["flops", "--batch-size", "0"]) == 2
    assert "--batch-size must be a positive integer" in capsys.readouterr().err
    assert main(["train", "--model", "gspn_dit_tiny", "--output-dir", str(tmp_path)]) == 2
    assert "gspn train-dit" in capsys.readouterr().err
    assert main(["train-dit", "--model", "gspn_t", "--output-dir", str(tmp_path)]) == 2
    assert "'gspn_t' is not a diffusion model" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- DDP


DDP_ARGS = [
    "--model",
    "baseline_conv",
    "--model-arg",
    "width=8",
    "--image-size",
    "16",
    "--epochs",
    "2",
    "--batch-size",
    "16",
    "--train-limit",
    "128",
    "--val-limit",
    "50",
    "--device",
    "cpu",
    "--no-progress",
    "--no-plot",
]


def _torchrun(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "gspn.cli",
    ]
    cmd += ["train", *DDP_ARGS, "--output-dir", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_ddp_two_ranks_identical_weights(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    proc = _torchrun(out, "--workers", "0")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    ck = load_state(out / "last.pt")
    assert ck["step"] == 8 and len(ck["rng"]) == 2  # 128 images / (2 ranks × 16) = 4 steps per epoch
    m = build_model("baseline_conv", num_classes=10, **TINY_CONV)
    m.load_state_dict(ck["model"])
    assert weights_digest(m) == digests[0]
    # every validation image counted exactly once across the two ranks
    assert ck["config"]["val_limit"] == 50
    rec = read_metrics(out / "metrics.jsonl")[-1]
    assert round(rec["val_acc"] * 50) == pytest.approx(rec["val_acc"] * 50)
    assert proc.stdout.count("epoch 2/2") == 1  # rank 0 logs alone


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("GSPN_RUN_SLOW"), reason="three torchrun launches; GSPN_RUN_SLOW=1")
def test_torchrun_ddp_resume_is_exact(tmp_path: Path) -> None:
    extra = ("--workers", "1", "--ema-decay", "0.9")
    _torchrun(tmp_path / "straight", *extra)
    _torchrun(tmp_path / "split", *extra, "--stop-after-epochs", "1")
    _torchrun(tmp_path / "split", *extra, "--resume")
    a = json.loads((tmp_path / "straight/summary.json").read_text())["rank_weight_digests"]
    b = json.loads((tmp_path / "split/summary.json").read_text())["rank_weight_digests"]
    assert a == b and len(set(a)) == 1
