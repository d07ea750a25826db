"""The training kit's pieces: schedule, RNG capture, atomic states, metrics log and plot, EMA."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gspn.training_utils import (
    Panel,
    append_metrics,
    build_ema,
    capture_rng,
    load_ema_weights,
    load_state,
    plot_metrics,
    read_metrics,
    restore_rng,
    save_state,
    truncate_metrics,
)
from gspn.training_utils.schedule import schedule_fn


def test_schedule_warmup_then_cosine() -> None:
    f = schedule_fn("cosine", 100, 10, 1e-5 / 1e-3)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(100) == pytest.approx(0.01) and f(1000) == pytest.approx(0.01)
    vals = [f(s) for s in range(10, 100)]
    assert all(a >= b for a, b in itertools.pairwise(vals))


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
