"""The attention ViT teachers (``vit_*``) and the encoder-distillation recipe (gspn.recipes.encoder_distillation,
C-GSPN's two stages) on the runner: tiny runs on 32×32 digits."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gspn.datasets import build_data
from gspn.models import GSPNViT, create_model, load_model, save_checkpoint
from gspn.recipes.encoder_distillation import (
    EncoderDistillationConfig,
    EncoderDistillationRecipe,
    kd_loss,
    layer_map,
    nmse,
    run,
)
from gspn.training_utils import STATE_FORMAT, ConfigError, RunInterrupted, load_state, save_state, training_state

# --------------------------------------------------------------------------------------------- the recipe


def test_losses_and_layer_map():
    t = torch.randn(2, 16, 8)
    assert nmse(t, t).item() == 0.0
    assert nmse(torch.zeros_like(t), t).item() == pytest.approx(1.0, rel=1e-5)
    assert nmse(torch.zeros_like(t), t, normalise=False).item() == pytest.approx(t.pow(2).mean().item())
    z = torch.randn(4, 10)
    assert kd_loss(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    p, q = F.log_softmax(z.flip(-1) / 2, -1), F.log_softmax(z / 2, -1)
    expected = 4 * (q.exp() * (q - p)).sum(-1).mean()
    assert kd_loss(z.flip(-1), z, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)
    assert layer_map(4, 4) == [0, 1, 2, 3] and layer_map(2, 4) == [1, 3] and layer_map(3, 12) == [3, 7, 11]


def test_data_is_gspn_trains():
    """The recipe builds its data with gspn train's own function: a teacher sees the same split and transforms."""
    from gspn import datasets
    from gspn.recipes.classification import train as classification
    from gspn.recipes.encoder_distillation import train as encoder_distillation

    assert encoder_distillation.build_data is datasets.build_data is classification.build_data
    data = build_data("digits", 24, 2, train_limit=40, val_limit=20)
    assert len(data.train) == 40 and len(data.val) == 20 and data.classes == [str(c) for c in range(10)]


_TEACHER_SETUP = {"img_size": 32, "in_chans": 1, "mean": [0.3053], "std": [0.376], "num_classes": 10}


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    return create_model("vit_nano", num_classes=10, in_chans=1)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A vit_nano with the data setup ``gspn train`` records (random weights: the tests check the machinery)."""
    meta = {f"gspn.train.{k}": json.dumps(v) for k, v in _TEACHER_SETUP.items()}
    path = tmp_path_factory.mktemp("teacher") / "model.safetensors"
    save_checkpoint(_teacher(), path, metadata=meta)
    return path


def _cfg(out, teacher, **kw):
    base = dict(
        teacher=str(teacher) if teacher else None,
        output_dir=str(out),
        epochs=2,
        stage1_epochs=1,
        batch_size=32,
        train_limit=64,
        val_limit=32,
        workers=0,
        progress=False,
        plot=False,
        quiet=True,
        warmup_epochs=0.0,
    )
    return EncoderDistillationConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def straight(tmp_path_factory, teacher_file):
    """The uninterrupted runs the resumed ones are compared with: ``straight(epochs)`` → ``(folder, summary)``
    (2 epochs: 1 + 1; 3 epochs: 1 + 2), each run once per module, on one thread as every test here."""
    runs: dict[int, tuple[Path, dict[str, Any]]] = {}

    def get(epochs: int) -> tuple[Path, dict[str, Any]]:
        if epochs not in runs:
            out = tmp_path_factory.mktemp("straight") / f"e{epochs}"
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                runs[epochs] = out, run(_cfg(out, teacher_file, epochs=epochs))
            finally:
                torch.set_num_threads(threads)
        return runs[epochs]

    return get


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_model(a / "model.safetensors"), load_model(b / "model.safetensors")
    for (k, v), w in zip(wa.state_dict().items(), wb.state_dict().values(), strict=True):
        assert torch.equal(v, w), k


_STRIP = ("epoch_s", "train_imgs_per_s", "elapsed_s")


def _numbers(out: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in _STRIP} for r in _records(out)]


def test_tiny_run_two_stages_and_exported_student(straight):
    out, summary = straight(2)
    recs = _records(out)
    assert [r["stage"] for r in recs] == [1, 2]
    assert "train_layer_loss" in recs[0] and "train_output_loss" not in recs[0]
    assert {"train_output_loss", "train_kd_loss", "train_label_loss"} <= set(recs[1])
    assert recs[1]["train_loss"] == pytest.approx(
        recs[1]["train_output_loss"] + recs[1]["train_kd_loss"] + recs[1]["train_label_loss"], rel=1e-6
    )
    student = load_model(out / "model.safetensors")
    assert isinstance(student, GSPNViT) and student.patch_embed.proj.in_channels == 1
    data = build_data("digits", 32, 1, (0.3053,), (0.376,), val_limit=32)
    x, y = zip(*(data.val[i] for i in range(len(data.val))), strict=True)
    acc = (student.eval()(torch.stack(x)).argmax(-1) == torch.tensor(y)).float().mean().item()
    assert acc == pytest.approx(recs[-1]["val_acc"]) and summary["final"]["val_acc"] == recs[-1]["val_acc"]
    # the student started from the teacher's patch embedding and head (then trained)
    assert summary["teacher_val_acc"] is not None and summary["epochs_done"] == 2
    # the kit's one training-state format, marked with its command and unit
    state = load_state(out / "last.pt")
    assert (state["format"], state["command"], state["unit"], state["epoch"], state["stage"]) == (
        STATE_FORMAT,
        "distill-encoder",
        1,
        1,
        2,
    )
    assert "distiller" not in state and any(k.startswith("student.") for k in state["model"])


def test_exact_resume_across_and_within_stages(tmp_path, teacher_file, straight):
    full, parts = straight(3)[0], tmp_path / "parts"
    run(_cfg(parts, teacher_file, epochs=3, stop_after_epochs=1))  # ends stage 1
    run(_cfg(parts, teacher_file, epochs=3, stop_after_epochs=1, resume="auto"))  # first epoch of stage 2
    run(_cfg(parts, teacher_file, epochs=3, resume="auto"))  # resumes inside stage 2 (optimizer state)
    _same_weights(full, parts)
    ra, rb = _numbers(full), _numbers(parts)
    assert ra == rb and [r["stage"] for r in ra] == [1, 2, 2]


def _as_legacy(path: Path) -> None:
    """Rewrite a ``last.pt`` as the recipe wrote it before the runner (its own format, key ``distiller``)."""
    state = load_state(path)
    legacy = {k: v for k, v in state.items() if k not in ("format", "model", "command", "unit", "ema")}
    legacy.update(format="gspn-distill-encoder-v1", distiller=state["model"], scaler={})
    legacy["model_args_requested"] = state["config"]["model_args"]
    config = dict(state["config"])
    for k in ("quiet", "allow_changes", "threads"):
        config.pop(k)
    legacy["config"] = {**config, "verbose": False}
    save_state(path, legacy)


def test_legacy_state_resumes_exactly(tmp_path, teacher_file, straight):
    """A last.pt of the recipe's own format (before the runner) resumes, bit-exactly, in the kit's format;
    here inside stage 2, so the legacy optimizer, schedule and (disabled) scaler states are read too."""
    full, out = straight(3)[0], tmp_path / "parts"
    run(_cfg(out, teacher_file, epochs=3, stop_after_epochs=2))
    _as_legacy(out / "last.pt")
    assert "distiller" in torch.load(out / "last.pt", weights_only=True)
    run(_cfg(out, teacher_file, epochs=3, resume="auto"))
    _same_weights(full, out)
    assert _numbers(full) == _numbers(out)
    state = load_state(out / "last.pt")
    assert state["format"] == STATE_FORMAT and state["command"] == "distill-encoder" and "distiller" not in state


def test_teacher_may_be_a_training_state_of_gspn_train(tmp_path, straight):
    """``last.pt`` / ``best.pt`` of ``gspn train`` hold the teacher's weights and data setup: the same run."""
    state = training_state(
        model=_teacher().state_dict(),
        optimizer={},
        step=2,
        epoch=0,
        rng=[],
        config={"model": "vit_nano"},
        command="train",
        unit=0,
        model_name="vit_nano",
        model_args={},
        classes=[str(c) for c in range(10)],
        **{**_TEACHER_SETUP, "mean": (0.3053,), "std": (0.376,)},  # tuples, as the classification recipe saves them
    )
    save_state(tmp_path / "best.pt", state)
    from_weights, a = straight(2)
    b = run(_cfg(tmp_path / "from_state", tmp_path / "best.pt"))
    _same_weights(from_weights, tmp_path / "from_state")
    assert _numbers(from_weights) == _numbers(tmp_path / "from_state")
    assert a["teacher_val_acc"] == b["teacher_val_acc"]
    # a training state of another command is refused, naming it
    save_state(tmp_path / "dit.pt", {**state, "command": "train-dit"})
    with pytest.raises(ConfigError, match=r"teacher .*dit.pt is a `gspn train-dit` training state"):
        run(_cfg(tmp_path / "dit", tmp_path / "dit.pt"))
    assert not (tmp_path / "dit").exists()


def test_stage1_loss_decreases_both_input_modes(tmp_path, teacher_file):
    for mode in ("student", "teacher"):
        out = tmp_path / mode
        run(_cfg(out, teacher_file, epochs=3, stage1_epochs=3, stage1_inputs=mode, init_from_teacher=False, lr=3e-3))
        losses = [r["train_layer_loss"] for r in _records(out)]
        assert losses[-1] < 0.7 * losses[0], (mode, losses)


def test_teacher_without_per_block_outputs_is_a_clear_error(tmp_path):
    teacher = nn.Sequential(nn.Conv2d(1, 8, 4, 4), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    cfg = _cfg(tmp_path / "run", None)
    with pytest.raises(ConfigError, match="teacher Sequential has no per-block outputs"):
        run(cfg, teacher=teacher)
    assert not (tmp_path / "run").exists()


def test_mismatched_token_grid_and_bad_settings(tmp_path, teacher_file):
    with pytest.raises(ConfigError, match="model gspn_vit_nano: the student's token grid"):
        run(_cfg(tmp_path / "a", teacher_file, model_args={"patch_size": 8}))
    with pytest.raises(ConfigError, match="stage1_inputs teacher needs a student of the teacher's depth"):
        run(_cfg(tmp_path / "b", teacher_file, stage1_inputs="teacher", model_args={"depth": 2}))
    with pytest.raises(ConfigError, match=r"stage1_epochs \(3\) must not exceed `epochs` \(2\)"):
        run(_cfg(tmp_path / "c", teacher_file, stage1_epochs=3))
    with pytest.raises(ConfigError, match="teacher is required"):
        run(_cfg(tmp_path / "d", None))
    # everything is checked before anything is written: a failed check or build leaves no folder
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_student_narrower_than_teacher_uses_adapters(tmp_path, teacher_file):
    out = tmp_path / "narrow"
    run(
        _cfg(
            out,
            teacher_file,
            epochs=1,
            stage1_epochs=1,
            model_args={"embed_dim": 32, "depth": 2, "propagation_channels": 8},
        )
    )
    state = torch.load(out / "last.pt", weights_only=True)["model"]
    assert state["adapters.0.weight"].shape == (64, 32) and "adapters.1.weight" in state


# --------------------------------------------------------------------------------------------- the runner's contract


def test_one_header_line_per_epoch_lines_and_one_closing_line(tmp_path, teacher_file, capsys):
    run(_cfg(tmp_path / "run", teacher_file, quiet=False))
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4, out
    assert out[0].startswith("student gspn_vit_nano: ") and "stage 1: 1 epochs (student inputs)" in out[0]
    assert out[1].startswith("stage 1 epoch 1/2 | layer ") and out[2].startswith("stage 2 epoch 2/2 | ")
    assert out[3].startswith("student val acc ") and out[3].endswith(f"outputs in {tmp_path / 'run'}")


class _InterruptedRecipe(EncoderDistillationRecipe):
    """Ctrl-C (SIGINT) arrives during the first epoch of this invocation."""

    def run_unit(self, index, progress):
        if not getattr(self, "_sent", False):
            self._sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().run_unit(index, progress)


def test_ctrl_c_saves_the_epoch_and_says_how_to_continue(tmp_path, teacher_file, straight):
    from gspn.training_utils import run as run_recipe

    full, out = straight(2)[0], tmp_path / "run"
    with pytest.raises(RunInterrupted, match="holds the state after epoch 1: continue"):
        run_recipe(_InterruptedRecipe(_cfg(out, teacher_file)))
    assert load_state(out / "last.pt")["unit"] == 0 and len(_records(out)) == 1
    run(_cfg(out, teacher_file, resume="auto"))
    _same_weights(full, out)
    assert _numbers(full) == _numbers(out)


def test_resume_with_changed_settings_is_listed_and_refused_unless_allowed(tmp_path, teacher_file, capsys):
    out = tmp_path / "run"
    run(_cfg(out, teacher_file, epochs=3, stop_after_epochs=1))
    with pytest.raises(
        ConfigError,
        match=r"resume cannot continue .* other settings than its own \(batch_size: 32 → 16; epochs: 3 → 4\)",
    ):
        run(_cfg(out, teacher_file, epochs=4, batch_size=16, resume="auto"))
    assert len(_records(out)) == 1
    capsys.readouterr()
    run(_cfg(out, teacher_file, epochs=4, resume="auto", allow_changes=True, quiet=False))
    lines = capsys.readouterr().out.splitlines()
    assert (
        "continuing with changed settings: epochs: 3 → 4; stage 1 now spans epochs 1-1, stage 2 epochs 2-4; "
        in (lines[2])
    ), lines
    assert [r["stage"] for r in _records(out)] == [1, 2, 2, 2]
    # another student or another teacher is refused even then
    with pytest.raises(ConfigError, match=r"resume .* is for student gspn_vit_nano \{\}, not"):
        run(_cfg(out, teacher_file, epochs=4, resume="auto", allow_changes=True, model_args={"depth": 2}))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_checkpoint(create_model("vit_nano", num_classes=10, in_chans=1), other)
    with pytest.raises(ConfigError, match=r"resume .* was distilled from another teacher"):
        run(_cfg(out, other, epochs=4, resume="auto", allow_changes=True, in_channels=1))


def test_divergence_stops_before_writing_and_names_the_cause(tmp_path, teacher_file):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match=r"non-finite .* epoch 1: the training diverged .* no training state"):
        run(_cfg(out, teacher_file, lr=1e30, clip_grad=None, weight_decay=0.0))
    assert not (out / "last.pt").exists()
