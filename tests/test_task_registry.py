"""The task registry: a family whose optional dependency is missing is hidden, any other import
error is a bug and is raised."""

from __future__ import annotations

import pytest

from ringbench.errors import UserError
from transfer import tasks


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTRY", {})
    monkeypatch.setattr(tasks, "_LOAD_ERRORS", {})
    monkeypatch.setattr(tasks, "_LOADED", False)


def _family(monkeypatch, name: str, missing: str) -> None:
    """Make importing the task-family module ``name`` fail on the module ``missing``."""
    real_import = tasks.importlib.import_module

    def import_module(module: str):
        if module == name:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)
        return real_import(module)

    monkeypatch.setattr(tasks.importlib, "import_module", import_module)


def test_missing_optional_dependency_hides_the_family(monkeypatch, fresh_registry):
    monkeypatch.setattr(tasks, "_TASK_MODULES", {"fake_family": ("fancylib",)})
    _family(monkeypatch, "fake_family", "fancylib.core")
    assert tasks.all_tasks() == {}  # the family is hidden, nothing raised
    with pytest.raises(UserError, match=r"not loaded: fake_family: No module named 'fancylib\.core'"):
        tasks.get_task("fake_task")


def test_any_other_missing_module_is_raised(monkeypatch, fresh_registry):
    monkeypatch.setattr(tasks, "_TASK_MODULES", {"fake_family": ("fancylib",)})
    _family(monkeypatch, "fake_family", "transfer.renamed_module")
    with pytest.raises(ModuleNotFoundError, match="renamed_module"):
        tasks.all_tasks()
