"""Data safety of the application half: no checkpoint runs code, divergence never overwrites good state,
any kill leaves a consistent run folder, a run folder belongs to one run, arguments are checked up front."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch

from gspn._files import RunDirError, atomic_write, claim_run_dir, safe_torch_load
from gspn._pickle import UnsafeCheckpointError
from gspn.commands import main
from gspn.recipes.classification import evaluate_checkpoint
from gspn.recipes.classification import run as train
from gspn.recipes.classification import train as classification_mod
from gspn.training_utils import load_state, read_metrics
from gspn.training_utils import runner as runner_mod
from tiny import classification_config, tiny_dit_argv

SRC = Path(__file__).resolve().parents[2] / "src" / "gspn"
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="needs diffusers")


class _RunsShell:
    """Pickles as a call of ``os.system``: loading it with plain pickle would run the command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path: Path) -> tuple[Path, Path]:
    """A ``torch.save`` file whose pickle calls ``os.system``, and the file that command would create."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": _RunsShell(marker), "ema": {}, "step": 1, "latents": _RunsShell(marker)}, path)
    return path, marker


def _tiny_cfg(tmp_path: Path, name: str, **kw):
    return classification_config(tmp_path, name, **{"train_limit": 96, "val_limit": 32, **kw})


# ------------------------------------------------------------------------------- no checkpoint runs code


def _loaders(path: Path, tmp_path: Path):
    from gspn.recipes.diffusion.data import load_dataset, load_latents
    from gspn.recipes.diffusion.sample import load_for_sampling
    from gspn.recipes.unet_distillation import UNetDistillationConfig, UNetDistillationRecipe
    from gspn.training_utils import run

    captions = tmp_path / "captions.txt"
    captions.write_text("a photo\n")
    distill = UNetDistillationConfig(
        model="never-loaded", captions=str(captions), output_dir=str(tmp_path / "d"), resume=str(path)
    )

    return {
        "safe_torch_load": lambda: safe_torch_load(path),
        "train.load_state": lambda: load_state(path),
        "train.evaluate_checkpoint": lambda: evaluate_checkpoint(path),
        "diffusion.load_latents": lambda: load_latents(path),
        "train-dit --data latents:": lambda: load_dataset(f"latents:{path}"),
        "sample.load_for_sampling": lambda: load_for_sampling(path),
        "distill resume": lambda: run(UNetDistillationRecipe(distill)),
    }


@pytest.mark.parametrize(
    "loader",
    [
        "safe_torch_load",
        "train.load_state",
        "train.evaluate_checkpoint",
        "diffusion.load_latents",
        "train-dit --data latents:",
        "sample.load_for_sampling",
        "distill resume",
    ],
)
def test_every_loader_refuses_a_pickle_that_runs_code(evil, tmp_path: Path, loader: str) -> None:
    path, marker = evil
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        _loaders(path, tmp_path)[loader]()
    assert not marker.exists()


@needs_diffusers
def test_train_dit_resume_refuses_a_pickle_that_runs_code(evil, tmp_path: Path, capsys) -> None:
    path, marker = evil
    model_args = ("hidden_size=32", "depth=2", "num_global_blocks=1")
    rc = main(tiny_dit_argv(tmp_path / "run", "--steps", "1", "--resume", str(path), model_args=model_args))
    assert rc == 2 and "refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize(
    "argv",
    [["sample", "--checkpoint", "EVIL", "--steps", "1", "--output-dir", "OUT"], ["eval", "--checkpoint", "EVIL"]],
)
def test_commands_refuse_a_pickle_that_runs_code(evil, tmp_path: Path, capsys, argv: list[str]) -> None:
    path, marker = evil
    argv = [str(path) if a == "EVIL" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refused" in err[0]
    assert not marker.exists()


def test_no_unsafe_torch_load_in_the_library() -> None:
    """Every ``torch.load`` of the package goes through :func:`gspn._files.safe_torch_load`."""
    for py in SRC.rglob("*.py"):
        text = py.read_text()
        code = re.sub(r'""".*?"""', "", text, flags=re.S)
        assert "weights_only=False" not in code, py
        if py.name != "_files.py":
            assert "torch.load(" not in code, py


# ------------------------------------------------------------------------------- divergence


@needs_diffusers
def test_train_dit_divergence_keeps_the_good_checkpoint(tmp_path: Path, capsys) -> None:
    out = tmp_path / "dit"
    common = tiny_dit_argv(out)
    assert main([*common, "--steps", "2", "--ckpt-every", "1"]) == 0
    good = (out / "last.pt").read_bytes()
    ema = (out / "ema.safetensors").read_bytes()
    capsys.readouterr()
    argv = [*common, "--steps", "6", "--lr", "1e30", "--clip-grad", "0", "--ckpt-every", "100", "--resume"]
    rc = main([*argv, "--allow-changes"])  # the changed steps, lr and clipping are listed, then accepted
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "non-finite" in err[0]
    assert (out / "last.pt").read_bytes() == good
    assert (out / "ema.safetensors").read_bytes() == ema


def test_train_divergence_exits_non_zero_with_one_line(tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "train",
            "--model",
            "baseline_conv",
            "--model-arg",
            "width=8",
            "--image-size",
            "16",
            "--epochs",
            "2",
            "--train-limit",
            "160",
            "--val-limit",
            "32",
            "--workers",
            "0",
            "--lr",
            "1e30",
            "--clip-grad",
            "none",
            "--weight-decay",
            "0",
            "--output-dir",
            str(tmp_path / "nan"),
            "--no-progress",
            "--quiet",
            "--no-plot",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "non-finite" in err[0]
    assert not (tmp_path / "nan/last.pt").exists()


# ------------------------------------------------------------------------------- a kill at any write


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception`` handlers)."""


def _consistent(out: Path) -> None:
    """The invariants a run folder keeps after any kill (and after the resume that follows)."""
    last = load_state(out / "last.pt")
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["epoch"] for r in recs] == list(range(last["epoch"] + 1))
    best = load_state(out / "best.pt")
    assert best["epoch"] == last["best_epoch"]
    assert max(r["val_acc"] for r in recs) == last["best_acc"]


def test_a_kill_at_each_write_leaves_a_consistent_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = train(_tiny_cfg(tmp_path, "ref"))
    writes = {
        (module, name): getattr(module, name)
        for module, names in (
            (runner_mod, ("save_state", "append_metrics", "atomic_write")),
            (classification_mod, ("atomic_write", "save_classifier")),
        )
        for name in names
    }
    n = 0
    while True:
        n += 1
        count = {"n": 0}

        def wrap(name, fn, n=n, count=count):
            def killer(*a, **k):
                count["n"] += 1
                if count["n"] == n:
                    raise _Killed(name)
                return fn(*a, **k)

            return killer

        for (module, name), fn in writes.items():
            monkeypatch.setattr(module, name, wrap(name, fn))
        out = tmp_path / f"kill{n}"
        try:
            train(_tiny_cfg(tmp_path, f"kill{n}"))
            finished = True
        except _Killed:
            finished = False
        for (module, name), fn in writes.items():
            monkeypatch.setattr(module, name, fn)
        if finished:
            break
        resume = "auto" if (out / "last.pt").exists() else None
        summary = train(_tiny_cfg(tmp_path, f"kill{n}", resume=resume))
        _consistent(out)
        assert summary["rank_weight_digests"] == reference["rank_weight_digests"], f"kill at write {n}"
        assert summary["best_epoch"] == reference["best_epoch"]
        assert [r["val_acc"] for r in read_metrics(out / "metrics.jsonl")] == [
            r["val_acc"] for r in read_metrics(tmp_path / "ref/metrics.jsonl")
        ]
        shutil.rmtree(out)
    assert n > 6  # every write of a 2-epoch run was interrupted once


def test_metrics_reader_ignores_a_line_cut_by_a_kill(tmp_path: Path) -> None:
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"epoch": 0}\n{"epoch": 1, "va')
    assert read_metrics(p) == [{"epoch": 0}]


# ------------------------------------------------------------------------------- one run per folder


def test_a_new_run_into_an_existing_run_folder_is_refused(tmp_path: Path) -> None:
    train(_tiny_cfg(tmp_path, "r", epochs=1))
    before = (tmp_path / "r/last.pt").read_bytes()
    with pytest.raises(RunDirError, match=r"`resume` .*`overwrite`"):
        train(_tiny_cfg(tmp_path, "r", epochs=1, lr=1e-2))
    assert (tmp_path / "r/last.pt").read_bytes() == before
    assert len(read_metrics(tmp_path / "r/metrics.jsonl")) == 1
    train(_tiny_cfg(tmp_path, "r", epochs=1, lr=1e-2, overwrite=True))
    assert len(read_metrics(tmp_path / "r/metrics.jsonl")) == 1
    assert load_state(tmp_path / "r/last.pt")["config"]["lr"] == 1e-2


def test_a_run_folder_is_locked_while_a_run_owns_it(tmp_path: Path) -> None:
    owner = claim_run_dir(tmp_path / "run", ("last.pt",), resume=False)
    try:
        with pytest.raises(RunDirError, match="in use"):
            claim_run_dir(tmp_path / "run", ("last.pt",), resume=True)
    finally:
        owner.release()
    claim_run_dir(tmp_path / "run", ("last.pt",), resume=True).release()


def test_stale_temporary_files_are_cleaned_and_files_honour_the_umask(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".last.pt.abc123.tmp").write_bytes(b"half")
    (run / ".adapter.tmp4242").mkdir()
    claim_run_dir(run, ("last.pt",), resume=False).release()
    assert sorted(p.name for p in run.iterdir()) == [".gspn.lock"]
    old = os.umask(0o022)
    try:
        atomic_write(run / "w.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((run / "w.bin").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------- checked up front


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "--epochs", "-1"], "--epochs"),
        (["train", "--batch-size", "0"], "--batch-size"),
        (["train", "--lr", "nan"], "--lr"),
        (["train", "--output-dir", "FILE"], "is a file"),
        (["train-dit", "--batch-size", "-1"], "--batch-size"),
        (["train-dit", "--batch-size", "0"], "--batch-size"),
        (["train-dit", "--steps", "0"], "--steps"),
        (["train-dit", "--cfg-scale", "nan"], "--cfg-scale"),
        (["train-dit", "--output-dir", "FILE/sub"], "is a file"),
        (["sample", "--checkpoint", "CKPT", "--labels", "-1"], "outside"),
        (["sample", "--checkpoint", "CKPT", "--labels", "5-2"], "--labels"),
        (["sample", "--checkpoint", "CKPT", "--labels", ""], "--labels"),
        (["sample", "--checkpoint", "CKPT", "--cfg-scale", "nan"], "--cfg-scale"),
        (["sample", "--checkpoint", "CKPT", "--output-dir", "FILE"], "is a file"),
        (["generate", "--prompt", "x", "--height", "0"], "--height"),
        (["generate", "--prompt", "x", "--strength", "1.5"], "--strength"),
        (["generate", "--prompt", "x", "--output-dir", "FILE/x.png"], "is a file"),
        (["extract-latents", "--vae", "v", "--output", "FILE/z.pt"], "is a file"),
        (["train", "--threads", "-2"], "--threads"),
    ],
)
def test_commands_check_arguments_up_front_with_one_line(tmp_path: Path, capsys, argv, needle) -> None:
    if "CKPT" in argv:  # a real (tiny) DiT weights file, so that only the checked option is wrong
        from gspn.models import create_model, save_checkpoint

        save_checkpoint(
            create_model(
                "gspn_dit_tiny",
                input_size=8,
                in_channels=1,
                num_classes=3,
                hidden_size=32,
                depth=2,
                d_state=4,
                num_global_blocks=1,
            ),
            tmp_path / "m.safetensors",
        )
    (tmp_path / "afile").write_text("x")
    subs = {
        "FILE": str(tmp_path / "afile"),
        "FILE/sub": str(tmp_path / "afile/sub"),
        "FILE/x.png": str(tmp_path / "afile/x.png"),
        "FILE/z.pt": str(tmp_path / "afile/z.pt"),
        "CKPT": str(tmp_path / "m.safetensors"),
    }
    argv = [subs.get(a, a) for a in argv]
    if argv[0] in ("train", "train-dit") and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "never")]
    if argv[0] == "sample" and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "never")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "never").exists()


def test_ctrl_c_prints_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import gspn.recipes.classification

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(gspn.recipes.classification, "run", interrupted)
    assert main(["train", "--epochs", "1"]) == 130
    assert capsys.readouterr().err.strip() == "gspn train: interrupted"


def test_missing_extra_names_the_extra(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import gspn.recipes.classification

    def needs_sklearn(cfg):
        raise ModuleNotFoundError("No module named 'sklearn'", name="sklearn")

    monkeypatch.setattr(gspn.recipes.classification, "run", needs_sklearn)
    assert main(["train", "--epochs", "1"]) == 2
    assert "gspn[data]" in capsys.readouterr().err


def test_python_dash_m_gspn_is_the_gspn_command() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gspn", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("gspn ")


@pytest.mark.parametrize("content", [b"", b'{"epoch": 0}\n', b"\x80\x04K"])
def test_a_file_that_is_not_a_checkpoint_is_a_one_line_error_not_an_unsafe_pickle(tmp_path, capsys, content):
    path = tmp_path / "not.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a checkpoint") as exc:
        safe_torch_load(path)
    assert not isinstance(exc.value, UnsafeCheckpointError)
    assert main(["eval", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a checkpoint" in err[0]
