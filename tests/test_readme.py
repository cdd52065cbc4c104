"""The task tables of the README (one row per family) and docs/tasks.md (every task) are the registry's
(regenerate them with `make readme`)."""

from __future__ import annotations

import pytest

from ringbench.errors import UserError
from tests.helpers import REPO
from transfer.run import generated_block, write_generated_blocks


@pytest.mark.parametrize("page, block", [("README.md", "task-families"), ("docs/tasks.md", "tasks")])
def test_generated_task_tables_match_the_registry(page, block):
    assert generated_block(block) in (REPO / page).read_text(), f"{page}: stale task table: run `make readme`"


def test_blocks_are_rewritten_in_place(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("before\n<!-- task-families:begin -->\nold\n<!-- task-families:end -->\nafter\n")
    write_generated_blocks(page)
    text = page.read_text()
    assert text.startswith("before\n") and text.endswith("\nafter\n") and "old" not in text
    assert generated_block("task-families") in text and "| fewshot " in text
    page.write_text("no markers\n")
    with pytest.raises(UserError, match="no <!-- tasks:begin -->"):
        write_generated_blocks(page)
