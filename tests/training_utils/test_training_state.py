"""The training kit's one training-state format: the same key names in every recipe, older files still
load."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings

import pytest
import torch

from gspn.training_utils import (
    STATE_FORMAT,
    STATE_KEYS,
    capture_rng,
    load_state,
    restore_rank_rng,
    save_state,
    training_state,
    upgrade_state,
)

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")
TINY_DIT = {"hidden_size": 32, "depth": 2, "d_state": 4, "num_global_blocks": 1}


def _state(**extra):
    return training_state(
        model={"w": torch.ones(2)},
        optimizer={"state": {}, "param_groups": []},
        step=3,
        rng=[capture_rng()],
        config={"lr": 0.1},
        **extra,
    )


def test_training_state_has_the_shared_keys_and_round_trips(tmp_path):
    state = _state(model_name="m")
    assert tuple(k for k in state if k in STATE_KEYS) == STATE_KEYS
    assert state["format"] == STATE_FORMAT == "gspn-train-v1"  # the classification format's value, kept
    assert state["scheduler"] is state["scaler"] is state["ema"] is state["epoch"] is None
    save_state(tmp_path / "last.pt", state)
    back = load_state(tmp_path / "last.pt")
    assert back.keys() == state.keys() and back["step"] == 3 and back["model_name"] == "m"
    assert torch.equal(back["model"]["w"], torch.ones(2))
    for clash in ({"format": "x"}, {"opt": {}}, {"arch": "x"}):  # shared or legacy names
        with pytest.raises(ValueError, match="shadow"):
            training_state(model={}, optimizer={}, step=0, rng=[], config={}, **clash)
    with pytest.raises(TypeError, match="rng"):
        training_state(model={}, optimizer={}, step=0, rng=capture_rng(), config={})


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # DiT states before the shared format
        (
            {"model": 1, "ema": 2, "opt": 3, "step": 4, "rng": {}, "arch": "gspn_dit_tiny", "args": {"lr": 1}},
            {
                "model": 1,
                "ema": 2,
                "optimizer": 3,
                "step": 4,
                "rng": {},
                "model_name": "gspn_dit_tiny",
                "config": {"lr": 1},
            },
        ),
        # distillation states before the shared format
        (
            {"step": 5, "trainable": 1, "optimizer": 2, "lr_scheduler": 3, "rng": {}, "config": {"a": 1}},
            {"step": 5, "model": 1, "optimizer": 2, "scheduler": 3, "rng": {}, "config": {"a": 1}},
        ),
    ],
)
def test_old_key_names_are_read_as_the_shared_ones(tmp_path, old, new):
    save_state(tmp_path / "old.pt", old)
    new = {**new, "format": STATE_FORMAT}  # they had no ``format``: an upgraded state is marked as today's
    assert load_state(tmp_path / "old.pt") == new
    assert upgrade_state(dict(new)) == new  # today's states are left alone


def test_rank_rng_restore_takes_this_ranks_entry_or_an_old_single_dict():
    a = capture_rng()
    x = torch.rand(3)
    b = capture_rng()
    torch.manual_seed(123)
    assert restore_rank_rng([b, a], rank=1, world_size=2)
    torch.testing.assert_close(torch.rand(3), x, rtol=0, atol=0)
    assert restore_rank_rng(a, rank=1, world_size=2)  # legacy: one dict, restored on every rank
    torch.testing.assert_close(torch.rand(3), x, rtol=0, atol=0)
    before = torch.get_rng_state()
    with pytest.warns(UserWarning, match="written by 1 processes, this run has 2; RNG streams are re-seeded"):
        assert not restore_rank_rng([a], rank=0, world_size=2)  # written by another number of processes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not restore_rank_rng([a], rank=0, world_size=2, warn=False)
    assert torch.equal(torch.get_rng_state(), before)


def _train_tiny_classifier(out, train_limit: int, val_limit: int) -> None:
    """One epoch of a one-stage baseline_conv on 16×16 digits into ``out`` (quiet, no plot)."""
    from gspn.recipes.classification import ClassificationConfig, run

    run(
        ClassificationConfig(
            model="baseline_conv",
            model_args={"width": 4, "depths": (1,)},
            data="digits",
            epochs=1,
            image_size=16,
            batch_size=32,
            train_limit=train_limit,
            val_limit=val_limit,
            workers=0,
            output_dir=str(out),
            plot=False,
            quiet=True,
            progress=False,
        )
    )


def test_classification_and_dit_states_use_the_shared_keys(tmp_path):
    from gspn.recipes.diffusion.train import DiTTrainConfig
    from gspn.recipes.diffusion.train import run as run_dit

    _train_tiny_classifier(tmp_path / "cls", train_limit=64, val_limit=32)
    run_dit(
        DiTTrainConfig(
            model="gspn_dit_tiny",
            data="digits",
            image_size=8,
            steps=2,
            batch_size=4,
            output_dir=str(tmp_path / "dit"),
            sample_steps=0,
            log_every=1,
            ckpt_every=2,
            model_args=dict(TINY_DIT),
            progress=False,
        )
    )
    cls, dit = load_state(tmp_path / "cls/last.pt"), load_state(tmp_path / "dit/last.pt")
    for state in (cls, dit):
        assert set(STATE_KEYS) <= state.keys() and state["format"] == STATE_FORMAT
        assert isinstance(state["rng"], list) and len(state["rng"]) == 1
    assert cls["epoch"] == 0 and cls["step"] == 2 and cls["model_name"] == "baseline_conv"
    assert cls["scaler"] is None and dit["scaler"] is None  # no fp16 grad scaler on CPU: None, not {}
    assert dit["epoch"] is None and dit["step"] == 2 and dit["model_name"] == "gspn_dit_tiny"
    assert dit["config"]["steps"] == 2 and "args" not in dit and "opt" not in dit
    assert dit["scheduler"]["last_epoch"] == 2
    assert json.loads((tmp_path / "dit/config.json").read_text())["model_name"] == "gspn_dit_tiny"


def test_a_state_of_one_recipe_is_refused_by_another_with_a_clear_error(tmp_path):
    """The shared format makes every recipe's ``last.pt`` look alike: ``gspn eval`` of a DiT state, and
    ``train-dit --resume`` of a classifier's state or of another DiT's, used to die with a ``KeyError``
    or a ``load_state_dict`` traceback listing every key."""
    from gspn.recipes.classification import evaluate_checkpoint
    from gspn.recipes.diffusion.train import DiTTrainConfig
    from gspn.recipes.diffusion.train import run as run_dit

    _train_tiny_classifier(tmp_path / "cls", train_limit=32, val_limit=16)

    def dit(out, resume=None, **args):
        return DiTTrainConfig(
            model="gspn_dit_tiny",
            data="digits",
            image_size=8,
            steps=2,
            batch_size=4,
            output_dir=str(tmp_path / out),
            sample_steps=0,
            log_every=1,
            ckpt_every=2,
            resume=resume,
            model_args={**TINY_DIT, **args},
            progress=False,
        )

    run_dit(dit("dit"))
    with pytest.raises(ValueError, match=r"not a classifier's training checkpoint.*'gspn_dit_tiny'"):
        evaluate_checkpoint(tmp_path / "dit/last.pt", workers=0)
    with pytest.raises(ValueError, match=r"not a `gspn train-dit` training state.*'baseline_conv'"):
        run_dit(dit("other", resume=str(tmp_path / "cls/last.pt")))
    with pytest.raises(ValueError, match=r"resume .*is for model gspn_dit_tiny .*'hidden_size': 32.*'hidden_size': 48"):
        run_dit(dit("other2", resume=str(tmp_path / "dit/last.pt"), hidden_size=48))
    assert not (tmp_path / "other/last.pt").exists() and not (tmp_path / "other2/last.pt").exists()


def test_dit_resumes_from_an_old_format_last_pt(tmp_path):
    """A ``last.pt`` with the DiT's former key names (``opt``, ``arch``, ``args``, one RNG dict) resumes
    exactly: the continued run ends with the weights of the uninterrupted one."""
    from gspn.recipes.diffusion.train import DiTTrainConfig
    from gspn.recipes.diffusion.train import run as run_dit

    def cfg(out, steps, resume=None):
        return DiTTrainConfig(
            model="gspn_dit_tiny",
            data="digits",
            image_size=8,
            steps=steps,
            batch_size=4,
            output_dir=str(tmp_path / out),
            sample_steps=0,
            log_every=1,
            ckpt_every=2,
            resume=resume,
            model_args=dict(TINY_DIT),
            progress=False,
        )

    run_dit(cfg("straight", 4))
    run_dit(cfg("split", 2))
    path = tmp_path / "split/last.pt"
    new = load_state(path)
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
        "args": new["config"],
    }
    save_state(path, old)
    run_dit(dataclasses.replace(cfg("split", 4, resume="auto"), allow_changes=True))  # 2 → 4 steps
    a, b = load_state(tmp_path / "straight/last.pt"), load_state(path)
    assert b["format"] == STATE_FORMAT and b["step"] == 4
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0, msg=k)
