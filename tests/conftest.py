"""Shared fixtures of the test suite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test (restored after): timings of 2 OpenMP threads on a shared, loaded
    machine are erratic, and some results are only bit-stable at a fixed thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


#: Test folders of tiny end-to-end runs: each test there runs on one thread (:func:`one_thread`), as tiny
#: models gain nothing from intra-op threads and OpenMP's spinning threads make them several times slower
#: on a busy 2-core machine.
ONE_THREAD_FOLDERS = ("recipes", "commands", "training_utils", "integrations")


@pytest.fixture(autouse=True)
def _tiny_runs_on_one_thread(request: pytest.FixtureRequest) -> None:
    path = Path(request.node.path)
    root = Path(__file__).parent
    if path.is_relative_to(root) and path.relative_to(root).parts[0] in ONE_THREAD_FOLDERS:
        request.getfixturevalue("one_thread")


def _assert_close(
    actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-12, name: str = "output"
) -> None:
    """``torch.testing.assert_close`` with the absolute tolerance scaled by ``expected``'s largest
    magnitude (a relative error of the whole tensor, not of each element) and the tensor named."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol + rtol * scale, msg=lambda m: f"{name}: {m}")


@pytest.fixture
def assert_close() -> Callable[..., None]:
    """:func:`_assert_close` as a fixture: ``assert_close(actual, expected, rtol=, atol=, name=)``."""
    return _assert_close
