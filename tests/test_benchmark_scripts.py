"""The scripts in benchmarks/ run end to end (tiny settings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def test_benchmark_script_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/train_digits.py end to end (with a baseline standing in for gspn_micro)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("bench_train_digits", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    n = torch.get_num_threads()
    argv = ["--gspn-model", "baseline_conv", "--gspn-arg", "width=8", "--epochs", "1", "--image-size", "16"]
    argv += ["--vit-depth", "1", "--train-limit", "64", "--output-dir", str(tmp_path)]
    assert bench.main(argv) == 0
    torch.set_num_threads(n)
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["model"]: r for r in res["results"]}
    assert len(res["results"]) == 3 and {"baseline_vit", "baseline_conv"} <= set(rows)
    target = res["results"][0]["params"]
    assert all(abs(r["params"] - target) / target < 0.5 for r in res["results"])
    assert "best val" in capsys.readouterr().out
    assert bench.main(["--gspn-model", "no_such_model", "--output-dir", str(tmp_path)]) == 2
