"""Shared fixtures (helpers live in tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.helpers import write_card

# One torch thread per pytest-xdist worker (workers share the cores), else up to two.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture
def card_path(tmp_path: Path) -> Path:
    """A ResNet-18 CIFAR-stem backbone card."""
    return write_card(tmp_path / "card.pth")


@pytest.fixture(scope="session")
def twin_card(tmp_path_factory) -> tuple[Path, Path]:
    """One small card (16 px) and one feature cache shared by the kNN and SVM embedded twins' tests: they
    run the same synthetic shapes, so the first one's features are the others' cache hits."""
    folder = tmp_path_factory.mktemp("twins")
    return write_card(folder / "card.pth", image_size=16), folder / "cache"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """CLIs run in-process may set torch's thread count (``--threads``): restore it after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``heavy`` (minutes of CPU in subprocesses) run first: with several pytest-xdist
    workers, the others' tests then overlap them instead of waiting at the end."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
