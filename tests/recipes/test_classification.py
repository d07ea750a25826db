"""The classification recipe (gspn.recipes.classification) on the runner. Tiny models, 16×16 digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gspn.recipes.classification import build_model, evaluate_checkpoint
from gspn.recipes.classification import run as train
from gspn.training_utils import (
    load_state,
    read_metrics,
    weights_digest,
)
from tiny import TINY_CONV, TINY_VIT, assert_same_state, classification_config


@pytest.mark.parametrize(
    ("model", "model_args", "workers"),
    [("baseline_conv", TINY_CONV, 0), ("baseline_vit", TINY_VIT, 2)],  # ViT has dropout: RNG must resume too
)
def test_resume_is_exact(tmp_path: Path, model: str, model_args: dict, workers: int) -> None:
    kw = dict(model=model, model_args=dict(model_args), workers=workers, ema_decay=0.9)
    straight = train(classification_config(tmp_path, "straight", **kw))
    first = train(classification_config(tmp_path, "split", stop_after_epochs=1, **kw))  # as if the job were killed here
    assert first["steps"] == 5
    resumed = train(classification_config(tmp_path, "split", resume="auto", **kw))
    assert resumed["steps"] == straight["steps"] == 10
    a, b = load_state(tmp_path / "straight/last.pt"), load_state(tmp_path / "split/last.pt")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    assert a["scheduler"] == b["scheduler"]
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert_same_state(sa, sb)
    assert straight["rank_weight_digests"] == resumed["rank_weight_digests"]
    ma, mb = read_metrics(tmp_path / "straight/metrics.jsonl"), read_metrics(tmp_path / "split/metrics.jsonl")
    assert len(ma) == len(mb) == 2
    for ra, rb in zip(ma, mb, strict=True):
        for k in ("epoch", "step", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "ema_val_acc"):
            assert ra[k] == rb[k], k


def test_training_learns_and_writes_outputs(tmp_path: Path) -> None:
    cfg = classification_config(tmp_path, "run", epochs=3, train_limit=320, val_limit=120, lr=1e-2, plot=True)
    s = train(cfg)
    out = Path(cfg.output_dir)
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
    train(classification_config(tmp_path, "run", epochs=3, train_limit=320, val_limit=120, lr=1e-2, resume="auto"))
    assert len(read_metrics(out / "metrics.jsonl")) == 3


def test_divergence_stops_before_checkpointing(tmp_path: Path) -> None:
    cfg = classification_config(tmp_path, "nan", epochs=2, lr=1e30, clip_grad=None, weight_decay=0.0)
    with pytest.raises(FloatingPointError, match="non-finite weights"):
        train(cfg)
    assert not (tmp_path / "nan/last.pt").exists()


def test_resume_rejects_other_model(tmp_path: Path) -> None:
    train(classification_config(tmp_path, "r", epochs=1))
    with pytest.raises(ValueError, match="checkpoint is for model"):
        train(classification_config(tmp_path, "r", model_args={"width": 12}, resume="auto"))


def test_registry_model_trains(tmp_path: Path) -> None:
    """A model from the gspn.models registry goes through the same trainer (gspn_micro once merged)."""
    from gspn.models import list_models

    name = "gspn_micro" if "gspn_micro" in list_models() else list_models()[0]
    cfg = classification_config(
        tmp_path, "reg", model=name, model_args={}, image_size=32, epochs=1, train_limit=64, val_limit=32
    )
    s = train(cfg)
    assert s["steps"] == 2 and s["params"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_cuda_amp_training_and_resume(tmp_path: Path, amp: str) -> None:
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    kw = dict(device="cuda", amp=amp, ema_decay=0.9, workers=1)
    train(classification_config(tmp_path, "gpu", stop_after_epochs=1, **kw))
    ck = load_state(tmp_path / "gpu/last.pt")
    assert bool(ck["scaler"]) == (amp == "fp16")  # the grad scaler is used (and saved) for fp16 only
    s = train(classification_config(tmp_path, "gpu", resume="auto", **kw))
    assert s["steps"] == 10 and np.isfinite(s["final"]["val_loss"])
    res = evaluate_checkpoint(tmp_path / "gpu/last.pt", workers=0)
    assert res["val_acc"] == pytest.approx(s["final"]["val_acc"], abs=1 / 64)


def test_resume_with_other_settings_is_refused_unless_allowed(tmp_path: Path, capsys) -> None:
    train(classification_config(tmp_path, "r", epochs=1))
    before = (tmp_path / "r/last.pt").read_bytes()
    with pytest.raises(ValueError, match=r"other settings than its own \(batch_size: 32 → 16; train_limit: 160 → 96\)"):
        train(classification_config(tmp_path, "r", epochs=1, batch_size=16, train_limit=96, resume="auto"))
    assert (tmp_path / "r/last.pt").read_bytes() == before


def test_extending_a_finished_run_says_what_the_schedule_does(tmp_path: Path, capsys) -> None:
    train(classification_config(tmp_path, "r", epochs=1, warmup_epochs=0.0))
    assert load_state(tmp_path / "r/last.pt")["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    summary = train(
        classification_config(
            tmp_path, "r", epochs=2, warmup_epochs=0.0, resume="auto", allow_changes=True, quiet=False
        )
    )
    out = capsys.readouterr().out
    assert "continuing with changed settings: epochs: 1 → 2" in out
    assert "now spans 2 epochs instead of 1: it continues at 0.0015" in out  # cosine at step 5 of 10, not min_lr
    recs = read_metrics(tmp_path / "r/metrics.jsonl")
    assert [r["epoch"] for r in recs] == [0, 1] and summary["steps"] == 10
    assert recs[1]["lr"] == pytest.approx(1e-5)  # the longer schedule ends at min_lr


def test_ctrl_c_during_an_epoch_saves_that_epoch_and_resume_is_exact(tmp_path: Path, monkeypatch) -> None:
    import os
    import signal

    from gspn.training_utils import RunInterrupted

    straight = train(classification_config(tmp_path, "straight"))
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C in the middle of epoch 1
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    with pytest.raises(RunInterrupted, match=r"holds the state after epoch 1: continue it with `resume`"):
        train(classification_config(tmp_path, "split"))
    monkeypatch.undo()
    assert load_state(tmp_path / "split/last.pt")["epoch"] == 0
    resumed = train(classification_config(tmp_path, "split", resume="auto"))
    assert resumed["rank_weight_digests"] == straight["rank_weight_digests"]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"min_lr": 5.0}, r"min_lr \(5\) must not exceed `lr`"),  # the cosine would climb: was accepted
        ({"model_args": {"width": -3}}, r"model_args \{'width': -3\} for baseline_conv: .*negative dimension"),
        ({"model_args": {"width": 8.5}}, r"model_args \{'width': 8.5\} for baseline_conv: .*divisible"),
        ({"model_args": {"in_chans": 1}}, r"model_args cannot set in_chans: the run sets it"),
    ],
)
def test_settings_that_cannot_train_are_refused_before_anything_is_written(tmp_path, overrides, needle):
    from gspn.training_utils import ConfigError

    with pytest.raises(ConfigError, match=needle):
        train(classification_config(tmp_path, "bad", **overrides))
    assert not (tmp_path / "bad").exists()


def test_eval_takes_a_run_folder_and_names_a_missing_checkpoint(tmp_path):
    from gspn.training_utils import ConfigError

    train(classification_config(tmp_path, "e", epochs=1))
    by_folder = evaluate_checkpoint(tmp_path / "e", workers=0)
    by_file = evaluate_checkpoint(tmp_path / "e/best.pt", workers=0)
    assert by_folder == by_file and by_file["checkpoint"] == str(tmp_path / "e/best.pt")
    with pytest.raises(ConfigError, match="checkpoint names no file"):
        evaluate_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="batch_size must be a positive integer"):
        evaluate_checkpoint(tmp_path / "e", batch_size=0)
