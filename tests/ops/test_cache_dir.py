"""Where the CPU kernel library is cached, and the error when that directory cannot be written.

Nothing here compiles the kernel: the resolver is tested directly, and the unwritable cases fail
before the compiler runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gspn.ops import _cpu as cpu


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fake ``$HOME`` with neither cache variable set."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("GSPN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return home


def test_unset_xdg_cache_home_uses_home_cache(home):
    assert cpu._cache_dir() == home / ".cache" / "gspn"


def test_empty_xdg_cache_home_is_treated_as_unset(home, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.chdir(tmp_path)
    assert cpu._cache_dir() == home / ".cache" / "gspn"
    assert cpu._cache_dir().is_absolute()


def test_relative_xdg_cache_home_is_ignored(home, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    monkeypatch.chdir(tmp_path)
    assert cpu._cache_dir() == home / ".cache" / "gspn"


def test_absolute_xdg_cache_home_is_used(home, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu._cache_dir() == tmp_path / "xdg" / "gspn"


@pytest.mark.parametrize("xdg", [None, "", "relative", "/absolute/xdg"])
def test_gspn_cache_dir_overrides_xdg(home, tmp_path, monkeypatch, xdg):
    if xdg is not None:
        monkeypatch.setenv("XDG_CACHE_HOME", xdg)
    monkeypatch.setenv("GSPN_CACHE_DIR", str(tmp_path / "mine"))
    assert cpu._cache_dir() == tmp_path / "mine"


def test_gspn_cache_dir_expands_user_and_empty_means_unset(home, monkeypatch):
    monkeypatch.setenv("GSPN_CACHE_DIR", "~/kernels")
    assert cpu._cache_dir() == home / "kernels"
    monkeypatch.setenv("GSPN_CACHE_DIR", "")
    assert cpu._cache_dir() == home / ".cache" / "gspn"


def _assert_names_fix(message: str, directory: Path) -> None:
    assert "\n" not in message, message
    assert str(directory) in message, message
    assert "set GSPN_CACHE_DIR to a writable directory" in message, message


def test_cache_dir_under_a_file_names_gspn_cache_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    directory = blocker / "cache"  # its parent is a regular file: not creatable, even as root
    with pytest.raises(RuntimeError) as info:
        cpu._prepare_cache_dir(directory)
    _assert_names_fix(str(info.value), directory)


def test_cache_dir_that_is_a_file_names_gspn_cache_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(RuntimeError) as info:
        cpu._prepare_cache_dir(blocker)
    _assert_names_fix(str(info.value), blocker)


def test_existing_unwritable_cache_dir_names_gspn_cache_dir(tmp_path, monkeypatch):
    # Running as root, chmod cannot make a directory unwritable: simulate the refusal instead.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cpu.tempfile, "TemporaryDirectory", refuse)
    output = tmp_path / "gspn_cpu_test.so"
    with pytest.raises(RuntimeError) as info:
        cpu._compile("c++", output)
    _assert_names_fix(str(info.value), tmp_path)
    assert "Permission denied" in str(info.value)
    assert not output.exists()


def test_unwritable_cache_dir_makes_cpu_backend_unavailable_with_the_fix(tmp_path):
    """End to end in a fresh process: the backend reports the one-line error and ``auto`` falls back."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    directory = blocker / "cache"
    script = """
import warnings, torch, gspn
from gspn.ops.line_scan import cpu
print(cpu.unavailable_reason(torch.device("cpu")))
x = torch.randn(1, 2, 3, 4)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    gspn.ops.line_scan(x, x, x, x, x)
assert any("GSPN_CACHE_DIR" in str(w.message) for w in caught), [str(w.message) for w in caught]
"""
    env = dict(os.environ, GSPN_CACHE_DIR=str(directory))
    env.pop("GSPN_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    if "no C++ compiler" in proc.stdout:
        pytest.skip("no C++ compiler: the cache directory is never reached")
    assert proc.returncode == 0, proc.stderr
    _assert_names_fix(proc.stdout.strip(), directory)
