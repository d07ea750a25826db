"""gspn train / eval / flops on the command line, and gspn train under torchrun."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gspn._validate import parse_model_args
from gspn.commands import main
from gspn.models.baselines import count_params
from gspn.recipes.classification import build_model, evaluate_checkpoint
from gspn.recipes.classification import run as train
from gspn.training_utils import (
    load_state,
    read_metrics,
    weights_digest,
)
from tiny import TINY_CONV, classification_config


def test_parse_model_args() -> None:
    assert parse_model_args(["a=1", "b=(1, 2)", "c=gelu", "d=0.5"]) == {
        "a": 1,
        "b": (1, 2),
        "c": "gelu",
        "d": 0.5,
    }
    with pytest.raises(ValueError):
        parse_model_args(["novalue"])


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


def test_cli_eval_matches_training_log(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train(classification_config(tmp_path, "e", epochs=1, ema_decay=0.5))
    rec = read_metrics(tmp_path / "e/metrics.jsonl")[-1]
    assert main(["eval", "--checkpoint", str(tmp_path / "e/last.pt"), "--workers", "0", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["val_acc"] == pytest.approx(rec["val_acc"]) and res["val_loss"] == pytest.approx(rec["val_loss"])
    assert main(["eval", "--checkpoint", str(tmp_path / "e/last.pt"), "--workers", "0", "--ema"]) == 0
    assert f"{100 * rec['ema_val_acc']:.2f}%" in capsys.readouterr().out


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
        "gspn",
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
