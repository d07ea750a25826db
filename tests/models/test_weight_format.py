"""One weight format: every trainer's exported weights load with ``load_model`` and ``create_model(pretrained=)``;
baselines are registered models with a task tag."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import gspn
from gspn.models import create_model, list_models, load_model, read_metadata
from gspn.recipes.classification import ClassificationConfig
from gspn.recipes.classification import run as train
from gspn.training_utils import weights_digest
from tiny import tiny_dit_argv


@pytest.mark.parametrize(("model", "model_args"), [("baseline_conv", {"width": 8}), ("gspn_micro", {})])
def test_gspn_train_exports_load_with_load_model(tmp_path: Path, model: str, model_args: dict, one_thread) -> None:
    out = tmp_path / "run"
    s = train(
        ClassificationConfig(
            model=model,
            model_args=model_args,
            data="digits",
            output_dir=str(out),
            image_size=16,
            epochs=1,
            batch_size=32,
            train_limit=32,
            val_limit=32,
            workers=0,
            ema_decay=0.5,
            progress=False,
            plot=False,
            quiet=True,
        )
    )
    for name in ("model.safetensors", "model_ema.safetensors"):
        m = load_model(out / name)
        assert m.default_cfg["architecture"] == model and m.num_classes == 10
        assert read_metadata(out / name)["gspn.train.img_size"] == "16"
    assert weights_digest(load_model(out / "model.safetensors")) == s["rank_weight_digests"][0]
    again = create_model(model, pretrained=str(out / "model.safetensors"), num_classes=10, **model_args)
    assert weights_digest(again) == s["rank_weight_digests"][0]


@pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
def test_train_dit_exports_load_with_load_model(tmp_path: Path) -> None:
    from gspn.commands import main

    out = tmp_path / "dit"
    assert main(tiny_dit_argv(out, "--steps", "1")) == 0
    m = load_model(out / "ema.safetensors")
    again = create_model("gspn_dit_tiny", pretrained=str(out / "ema.safetensors"), **m.model_args)
    assert weights_digest(m) == weights_digest(again)


def test_baselines_are_registered_with_a_task_tag() -> None:
    classifiers = list_models(task="classification")
    assert {"baseline_vit", "baseline_conv", "gspn_micro", "gspn_t"} <= set(classifiers)
    assert not set(classifiers) & set(list_models(task="diffusion"))
    assert "gspn_dit_tiny" in list_models(task="diffusion")
    assert gspn.models.get_default_cfg("baseline_vit")["task"] == "classification"
    m = create_model("baseline_vit", num_classes=3, embed_dim=32, depth=1)
    assert m.default_cfg["architecture"] == "baseline_vit" and m.model_args["embed_dim"] == 32
    with pytest.raises(ValueError, match="no published weights"):
        create_model("baseline_conv", pretrained=True)


def test_one_save_checkpoint_name_for_weights() -> None:
    import gspn.training_utils.state as state

    assert not hasattr(state, "save_checkpoint") and not hasattr(state, "load_checkpoint")
    assert callable(state.save_state) and callable(state.load_state)
