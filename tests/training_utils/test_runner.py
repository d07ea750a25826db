"""The runner's contract (gspn.training_utils.run), on a toy recipe: a linear model fitted by SGD.

Checked before anything is written; Ctrl-C saves and says how to continue; a resume with changed
settings lists them and is refused unless allowed; a non-finite stop names its cause and only the files
that exist; one header line, one closing line.
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from gspn._files import RunDirError
from gspn.training_utils import ConfigError, Progress, Recipe, RunConfig, RunInterrupted, load_state, read_metrics, run


@dataclass
class ToyConfig(RunConfig):
    steps: int = 6
    lr: float = 0.1
    batch_size: int = 4
    nan_at: int | None = None  # the step whose batch holds a NaN
    fail_build: bool = False
    interrupt_at: int | None = None  # the step during which SIGINT arrives
    ckpt_every: int = 1
    progress: bool = False


class Toy(Recipe):
    command: ClassVar[str] = "toy"
    stateful: ClassVar[bool] = True
    unit: ClassVar[str] = "step"
    free_fields: ClassVar[frozenset[str]] = frozenset({"nan_at", "fail_build", "interrupt_at", "ckpt_every"})

    config: ToyConfig

    def check(self) -> None:
        if self.config.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.config.steps}")

    def build(self, ctx: Any) -> None:
        if self.config.fail_build:
            raise ValueError("no data")
        torch.manual_seed(self.config.seed)
        self.model = nn.Linear(3, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.config.lr)
        self.x = torch.randn(64, 3)
        self.y = self.x @ torch.tensor([[1.0], [-2.0], [0.5]])
        self.step = 0
        self.last_x = self.x[:0]

    def num_units(self) -> int:
        return self.config.steps

    def header(self) -> str:
        return f"toy: {self.config.steps} steps"

    def run_unit(self, index: int, progress: Progress) -> dict[str, Any]:
        cfg = self.config
        if index == cfg.interrupt_at:
            os.kill(os.getpid(), signal.SIGINT)
        g = torch.Generator().manual_seed(index)
        idx = torch.randint(0, 64, (cfg.batch_size,), generator=g)
        x = self.x[idx].clone()
        if index == cfg.nan_at:
            x[0, 0] = float("nan")
        self.last_x = x
        loss = ((self.model(x) - self.y[idx]) ** 2).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        progress.update(1, loss=loss.item())
        return {"step": self.step, "loss": loss.item()}

    def save_due(self, index: int, last: bool) -> bool:
        return last or (index + 1) % self.config.ckpt_every == 0

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]

    def checked_modules(self) -> dict[str, nn.Module]:
        return {"weights": self.model}

    def nonfinite_cause(self) -> str:
        if not bool(torch.isfinite(self.last_x).all()):
            return "the batch held non-finite inputs"
        return "the training diverged"

    def export(self, out: Path, finished: bool) -> dict[str, Any]:
        return {"weight": self.model.weight.detach().flatten().tolist()}

    def closing(self, summary: dict[str, Any]) -> str:
        return f"toy: done after {self.step} steps"


def _run(tmp_path: Path, name: str = "run", **kw: Any) -> dict[str, Any]:
    return run(Toy(ToyConfig(output_dir=str(tmp_path / name), **kw)))


def test_one_header_and_one_closing_line_and_the_run_files(tmp_path, capsys):
    summary = _run(tmp_path)
    out = capsys.readouterr().out.splitlines()
    assert out == ["toy: 6 steps", "toy: done after 6 steps"]
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"last.pt", "metrics.jsonl", "summary.json"} <= files
    assert summary["finished"]
    assert json.loads((tmp_path / "run/summary.json").read_text())["weight"] == summary["weight"]
    state = load_state(tmp_path / "run/last.pt")
    assert state["command"] == "toy" and state["unit"] == 5 and state["step"] == 6
    assert [r["step"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_quiet_prints_nothing(tmp_path, capsys):
    _run(tmp_path, quiet=True)
    assert capsys.readouterr().out == ""


def test_bad_settings_and_failed_builds_write_nothing(tmp_path):
    with pytest.raises(ConfigError, match="steps must be >= 1"):
        _run(tmp_path, "bad", steps=0)
    assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="no data"):
        _run(tmp_path, "nodata", fail_build=True)
    assert not (tmp_path / "nodata").exists()
    # so the corrected rerun is not refused as "already holds a run"
    _run(tmp_path, "nodata")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="no data"):
        _run(tmp_path, "mine", fail_build=True)
    assert {p.name for p in (tmp_path / "mine").iterdir()} == {"notes.txt"}


def test_a_folder_holding_a_run_is_refused_before_building(tmp_path):
    _run(tmp_path)
    with pytest.raises(RunDirError, match="already holds a run"):
        _run(tmp_path, fail_build=True)  # refused first: the build error is never reached
    with pytest.raises(ConfigError, match="resume and `overwrite` exclude each other"):
        _run(tmp_path, resume="auto", overwrite=True)
    _run(tmp_path, overwrite=True)


def test_ctrl_c_saves_the_state_and_resume_is_exact(tmp_path, capsys):
    straight = _run(tmp_path, "straight", ckpt_every=100)
    with pytest.raises(RunInterrupted, match=r"holds the state after step 3: continue it with `resume`"):
        _run(tmp_path, "split", ckpt_every=100, interrupt_at=2)
    assert load_state(tmp_path / "split/last.pt")["step"] == 3  # saved although no checkpoint was due
    resumed = _run(tmp_path, "split", ckpt_every=100, resume="auto")
    assert resumed["weight"] == straight["weight"]
    assert "resumed from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "split/metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_resume_from_a_missing_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    with pytest.raises(ConfigError, match="resume names no checkpoint"):
        _run(tmp_path, resume=str(tmp_path / "nowhere.pt"))


def test_resume_with_changed_settings_lists_them_and_needs_allow_changes(tmp_path, capsys):
    _run(tmp_path, steps=3)
    with pytest.raises(ConfigError, match=r"other settings than its own \(batch_size: 4 → 8; steps: 3 → 6\)"):
        _run(tmp_path, steps=6, batch_size=8, resume="auto")
    capsys.readouterr()
    summary = _run(tmp_path, steps=6, batch_size=8, resume="auto", allow_changes=True)
    assert summary["finished"]
    assert "continuing with changed settings: batch_size: 4 → 8; steps: 3 → 6" in capsys.readouterr().out
    # a run field (progress, threads, ...) is not a setting of the run
    _run(tmp_path, steps=6, batch_size=8, resume="auto", progress=True, threads=1)


def test_non_finite_data_stop_names_the_cause_and_the_kept_state(tmp_path):
    with pytest.raises(FloatingPointError, match=r"in step 4: the batch held non-finite inputs") as exc:
        _run(tmp_path, nan_at=3, ckpt_every=2)
    assert "last.pt keeps the state after step 2" in str(exc.value)
    assert load_state(tmp_path / "run/last.pt")["step"] == 2
    with pytest.raises(FloatingPointError, match="no training state was saved yet"):
        _run(tmp_path, "early", nan_at=0)
    assert not (tmp_path / "early/last.pt").exists()


def test_divergence_is_told_from_bad_data(tmp_path):
    with pytest.raises(FloatingPointError, match=r"non-finite weights .*the training diverged"):
        _run(tmp_path, lr=1e30)


def test_a_state_of_another_task_is_refused(tmp_path):
    _run(tmp_path)
    state = load_state(tmp_path / "run/last.pt")
    state["command"] = "train"
    torch.save(state, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a `gspn toy` training state"):
        _run(tmp_path, "next", resume=str(tmp_path / "other.pt"))


class _ValNaN(Toy):
    def run_unit(self, index: int, progress: Progress) -> dict[str, Any]:
        record = super().run_unit(index, progress)
        return {**record, "val_loss": float("nan") if index == 1 else 0.5}


def test_a_non_finite_validation_loss_stops_the_run_too(tmp_path):
    # finite weights that give NaN outputs must not be saved (and counted as the best epoch)
    with pytest.raises(FloatingPointError, match=r"non-finite val_loss \(nan\) in step 2"):
        run(_ValNaN(ToyConfig(output_dir=str(tmp_path / "run"), ckpt_every=1)))
    assert load_state(tmp_path / "run/last.pt")["step"] == 1


def test_resuming_a_finished_run_does_nothing_and_says_so(tmp_path, capsys):
    first = _run(tmp_path)
    capsys.readouterr()
    again = _run(tmp_path, resume="auto")
    assert "holds the finished run (step 6/6): nothing to do" in capsys.readouterr().out
    assert again["weight"] == first["weight"]


class _FailingJob(Recipe):
    command: ClassVar[str] = "job"

    def build(self, ctx: Any) -> None:
        pass

    def run_unit(self, index: int, progress: Progress) -> dict[str, Any] | None:
        (self.out / "partial.txt").write_text("x")
        raise ValueError("the job failed half-way")


def test_a_failed_job_keeps_what_it_wrote_but_not_its_lock(tmp_path):
    with pytest.raises(ValueError, match="half-way"):
        run(_FailingJob(RunConfig(output_dir=str(tmp_path / "job"))))
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["partial.txt"]
