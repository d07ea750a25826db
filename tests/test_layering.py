"""Layering of the application half: the training kit imports nothing above ``gspn.models``, and the
recipes (classification, DiT, distillation, encoder distillation) never import each other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

RECIPES = {
    "classification": "gspn.train",
    "dit": "gspn.diffusion",
    "distill": "gspn.distill",
    "encoder distillation": "gspn.distill_encoder",
}


def _loaded(module: str) -> set[str]:
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('gspn'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def _under(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


def test_training_kit_imports_nothing_above_models():
    loaded = _loaded("gspn.training_utils")
    above = {"gspn.integrations", "gspn.commands", "gspn.cli", *RECIPES.values()}
    assert not set().union(*(_under(loaded, p) for p in above)), sorted(loaded)


@pytest.mark.parametrize(
    ("module", "own"),
    [
        ("gspn.train.trainer", "gspn.train"),
        ("gspn.diffusion.train", "gspn.diffusion"),
        ("gspn.diffusion.sample", "gspn.diffusion"),
        ("gspn.distill.trainer", "gspn.distill"),
        ("gspn.distill_encoder.trainer", "gspn.distill_encoder"),
    ],
)
def test_recipes_never_import_each_other(module, own):
    if module.startswith("gspn.distill."):
        pytest.importorskip("diffusers")
    loaded = _loaded(module)
    others = [p for p in RECIPES.values() if p != own]
    assert not set().union(*(_under(loaded, p) for p in others)), sorted(loaded)
    assert not _under(loaded, "gspn.commands"), sorted(loaded)
