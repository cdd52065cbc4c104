"""The import graph: arrows point one way (ringbench <- pretrain, ringbench <- metadataset <- transfer; the sweep
above both stages; the leaderboard beside them, reading the store through ringbench) and no module imports itself
through a chain of others. The stages meet only at files: transfer never imports pretrain, nor pretrain transfer.
Read from the source (every ``import``, lazy ones inside functions included), so it fails when a change adds a
forbidden arrow."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("ringbench", "pretrain", "transfer", "metadataset", "sweep", "leaderboard")
# package -> the first-party packages it may import
ALLOWED = {
    "ringbench": {"ringbench"},
    "metadataset": {"metadataset", "ringbench"},
    "pretrain": {"pretrain", "ringbench"},
    "transfer": {"transfer", "metadataset", "ringbench"},
    "leaderboard": {"leaderboard", "ringbench"},
    "sweep": {"sweep", "pretrain", "transfer", "leaderboard", "ringbench"},
}
# Scripts kept for the commands of earlier versions (``python transfer/sweep.py``): each imports only the
# package it stands in for, and no module imports it.
COMMAND_SHIMS = {"transfer.sweep": "sweep", "transfer.leaderboard": "leaderboard"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """module -> the first-party modules it imports (resolved to modules that exist)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                candidates = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for candidate in candidates:
                if candidate.split(".")[0] not in PACKAGES:
                    continue
                while candidate and candidate not in modules:  # `from pkg import name`: the module pkg
                    candidate = candidate.rpartition(".")[0]
                if candidate and candidate != name:
                    targets.add(candidate)
                    break
        graph[name] = targets
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_arrows_point_downward():
    graph = import_graph()
    assert {"metadataset.sampling", "ringbench.config"} <= graph["transfer.fewshot"]  # the graph was read
    assert "pretrain.losses" in graph["pretrain.methods.base"]  # `from pretrain import losses`
    wrong = sorted(
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if dst.split(".")[0] not in ALLOWED[src.split(".")[0]]
        and not (src in COMMAND_SHIMS and dst.split(".")[0] == COMMAND_SHIMS[src])
    )
    assert wrong == []


def test_stages_meet_only_at_files():
    graph = import_graph()
    crossing = sorted(
        f"{src} -> {dst}"
        for src, targets in graph.items()
        for dst in targets
        if {src.split(".")[0], dst.split(".")[0]} == {"pretrain", "transfer"}
    )
    assert crossing == []


def test_command_shims_only_stand_in():
    graph = import_graph()
    for shim, package in COMMAND_SHIMS.items():
        assert graph[shim] and {dst.split(".")[0] for dst in graph[shim]} == {package}
        assert [src for src, targets in graph.items() if shim in targets] == []


def test_no_import_cycle():
    assert _cycle(import_graph()) is None


def test_cycle_detection_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
