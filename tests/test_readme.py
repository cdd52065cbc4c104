"""The README's task list is the registry's (regenerate with `make readme`)."""

from __future__ import annotations

from tests.helpers import REPO
from transfer.run import readme_tasks_block


def test_readme_task_list_matches_registry():
    assert readme_tasks_block() in (REPO / "README.md").read_text(), "README task list is stale: run `make readme`"
