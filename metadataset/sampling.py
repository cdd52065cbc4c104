"""Episode sampling: Meta-Dataset's variable-way variable-shot rules, and fixed N-way K-shot.

Pure functions of an explicit ``numpy.random.Generator`` (PCG64 gives the same stream on every
machine), so that the same seed gives the same episodes and two backbones evaluated with the same
seed see exactly the same episodes (a paired comparison).

Variable-way variable-shot (Triantafillou et al., ICLR 2020, section 3.2 and appendix):

* ways ``~ U{5, min(50, C)}`` (C = classes in the split), classes uniformly without replacement;
  ImageNet instead picks an internal node of its WordNet DAG spanning 5..392 leaves uniformly and
  keeps at most 50 of its leaves; Omniglot picks one alphabet uniformly, then ways uniformly in
  ``[5, min(50, characters in it)]`` from that alphabet;
* query per class, the same for every class: ``min(10, floor(min_c n_c / 2))``;
* support size: ``beta ~ U(0, 1)``, ``S = min(500, sum_c floor(beta * min(100, r_c) + 1))`` with
  ``r_c = n_c - query``;
* shots: ``p_c ∝ n_c * exp(u_c)``, ``u_c ~ U(log 0.5, log 2)``; ``k_c = min(floor(p_c (S - ways)) + 1, r_c)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ringbench.errors import UserError

MAX_SPANNING_LEAVES_ELIGIBLE = 392  # ImageNet DAG: internal nodes spanning more leaves are not used


@dataclass(frozen=True)
class VariableEpisodes:
    """Meta-Dataset's episode constants (the paper's defaults)."""

    min_ways: int = 5
    max_ways: int = 50
    max_num_query: int = 10
    max_support_set_size: int = 500
    max_support_size_contrib_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)


@dataclass(frozen=True)
class FixedEpisodes:
    """N-way K-shot with Q queries per class."""

    ways: int = 5
    shots: int = 5
    queries: int = 15

    @property
    def min_ways(self) -> int:
        return self.ways


@dataclass(frozen=True)
class ClassStructure:
    """Optional class structure of a split, used to pick related classes.

    ``superclass_of``: superclass index of every class (Omniglot's alphabets, the bi-level rule).
    ``node_leaves``: for every internal node of a class DAG (ImageNet's WordNet graph), the class
    indices of the leaves it spans.
    """

    superclass_of: np.ndarray | None = None
    node_leaves: tuple[np.ndarray, ...] | None = None


@dataclass(frozen=True)
class EpisodeDescription:
    """Which classes (indices into the split), support shots per class, and queries per class."""

    classes: np.ndarray
    shots: np.ndarray
    queries: int

    @property
    def ways(self) -> int:
        return len(self.classes)


def validate_split(class_names: Sequence[str], counts: Sequence[int] | np.ndarray, min_ways: int, where: str) -> None:
    """Bad input for the protocol: fewer than ``min_ways`` classes, or a class with < 2 images."""
    counts = np.asarray(counts)
    if len(counts) < min_ways:
        raise UserError(f"{where}: the split has {len(counts)} classes; episodes need at least {min_ways}")
    small = np.flatnonzero(counts < 2)
    if len(small):
        names = ", ".join(f"{class_names[i]!r} ({int(counts[i])})" for i in small[:5])
        raise UserError(
            f"{where}: every class needs at least 2 images (one support, one query); {len(small)} do not: {names}"
        )


def validate_episodes(
    class_names: Sequence[str],
    counts: Sequence[int] | np.ndarray,
    rules: VariableEpisodes | FixedEpisodes,
    where: str,
) -> None:
    """The split can give episodes under ``rules``: :func:`validate_split`, and for fixed episodes
    ``ways`` classes holding ``shots + queries`` images each. Checked before any feature is computed."""
    validate_split(class_names, counts, rules.min_ways, where)
    if isinstance(rules, FixedEpisodes):
        counts = np.asarray(counts)
        need = rules.shots + rules.queries
        enough = int((counts >= need).sum())
        if enough < rules.ways:
            raise UserError(
                f"{where}: {rules.ways}-way {rules.shots}-shot {rules.queries}-query episodes need {rules.ways} "
                f"classes of at least {need} images; {enough} of {len(counts)} have that many "
                f"(largest: {int(counts.max()) if len(counts) else 0})"
            )


# --- the rules, one function each ------------------------------------------------------------


def sample_num_ways(rng: np.random.Generator, num_classes: int, min_ways: int, max_ways: int) -> int:
    """Ways uniform in ``[min_ways, min(max_ways, num_classes)]``."""
    high = min(max_ways, num_classes)
    if high < min_ways:
        raise ValueError(f"{num_classes} classes, fewer than min_ways={min_ways}")
    return int(rng.integers(min_ways, high + 1))


def compute_num_query(class_sizes: np.ndarray, max_num_query: int) -> int:
    """Queries per class: ``min(max_num_query, floor(min_c n_c / 2))``."""
    smallest = int(np.min(class_sizes))
    if smallest < 2:
        raise ValueError("every class needs at least 2 images")
    return min(max_num_query, smallest // 2)


def sample_support_set_size(
    rng: np.random.Generator, remaining: np.ndarray, max_contrib_per_class: int, max_support_set_size: int
) -> int:
    """``min(max_size, sum_c floor(beta * min(max_contrib, r_c) + 1))``, ``beta ~ U(0, 1)``."""
    if max_support_set_size < len(remaining):
        raise ValueError("max_support_set_size is smaller than the number of ways")
    beta = rng.uniform()
    contrib = np.minimum(max_contrib_per_class, remaining)
    return int(min(np.floor(beta * contrib + 1).sum(), max_support_set_size))


def sample_num_support_per_class(
    rng: np.random.Generator,
    class_sizes: np.ndarray,
    remaining: np.ndarray,
    support_set_size: int,
    min_log_weight: float,
    max_log_weight: float,
) -> np.ndarray:
    """Shots ``min(floor(p_c (S - ways)) + 1, r_c)`` with ``p_c ∝ n_c exp(U(min_log_w, max_log_w))``."""
    ways = len(class_sizes)
    if support_set_size < ways:
        raise ValueError("support set smaller than the number of ways")
    if np.min(remaining) < 1:
        raise ValueError("a class has no images left after the query set")
    weights = class_sizes * np.exp(rng.uniform(min_log_weight, max_log_weight, size=ways))
    proportions = weights / weights.sum()
    desired = np.floor(proportions * (support_set_size - ways)).astype(np.int64) + 1
    return np.minimum(desired, remaining).astype(np.int64)


def sample_classes(
    rng: np.random.Generator, num_classes: int, rules: VariableEpisodes, structure: ClassStructure | None = None
) -> np.ndarray:
    """Class indices of one variable-way episode (uniform, DAG rule, or bi-level rule)."""
    if structure is not None and structure.node_leaves is not None:
        nodes = eligible_nodes(structure.node_leaves, rules.min_ways)
        leaves = np.asarray(nodes[int(rng.integers(len(nodes)))])
        if len(leaves) > rules.max_ways:
            leaves = rng.choice(leaves, size=rules.max_ways, replace=False)
        return np.asarray(leaves, dtype=np.int64)
    if structure is not None and structure.superclass_of is not None:
        superclass_of = np.asarray(structure.superclass_of)
        supers, sizes = np.unique(superclass_of, return_counts=True)
        eligible = supers[sizes >= rules.min_ways]
        if len(eligible) == 0:
            raise UserError(f"no superclass has at least {rules.min_ways} classes")
        chosen = eligible[int(rng.integers(len(eligible)))]
        members = np.flatnonzero(superclass_of == chosen)
        ways = sample_num_ways(rng, len(members), rules.min_ways, rules.max_ways)
        return rng.choice(members, size=ways, replace=False).astype(np.int64)
    ways = sample_num_ways(rng, num_classes, rules.min_ways, rules.max_ways)
    return rng.choice(num_classes, size=ways, replace=False).astype(np.int64)


def eligible_nodes(node_leaves: Sequence[np.ndarray], min_ways: int) -> list[np.ndarray]:
    """DAG nodes spanning between ``min_ways`` and 392 leaves (the ImageNet rule)."""
    nodes = [np.asarray(n) for n in node_leaves if min_ways <= len(n) <= MAX_SPANNING_LEAVES_ELIGIBLE]
    if not nodes:
        raise UserError(f"no node of the class hierarchy spans {min_ways}..{MAX_SPANNING_LEAVES_ELIGIBLE} classes")
    return nodes


def sample_variable_episode(
    rng: np.random.Generator,
    class_sizes: np.ndarray,
    rules: VariableEpisodes = VariableEpisodes(),
    structure: ClassStructure | None = None,
) -> EpisodeDescription:
    """One Meta-Dataset episode description (see the module docstring)."""
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    classes = sample_classes(rng, len(class_sizes), rules, structure)
    sizes = class_sizes[classes]
    queries = compute_num_query(sizes, rules.max_num_query)
    remaining = sizes - queries
    support = sample_support_set_size(
        rng, remaining, rules.max_support_size_contrib_per_class, rules.max_support_set_size
    )
    shots = sample_num_support_per_class(rng, sizes, remaining, support, rules.min_log_weight, rules.max_log_weight)
    return EpisodeDescription(classes=classes, shots=shots, queries=queries)


def sample_fixed_episode(rng: np.random.Generator, class_sizes: np.ndarray, rules: FixedEpisodes) -> EpisodeDescription:
    """N classes uniformly among those with at least K + Q images; K shots and Q queries each."""
    class_sizes = np.asarray(class_sizes, dtype=np.int64)
    eligible = np.flatnonzero(class_sizes >= rules.shots + rules.queries)
    if len(eligible) < rules.ways:
        raise UserError(
            f"{rules.ways}-way {rules.shots}-shot {rules.queries}-query episodes need {rules.ways} "
            f"classes with at least {rules.shots + rules.queries} images; only {len(eligible)} have"
        )
    classes = rng.choice(eligible, size=rules.ways, replace=False).astype(np.int64)
    return EpisodeDescription(
        classes=classes, shots=np.full(rules.ways, rules.shots, dtype=np.int64), queries=rules.queries
    )


def sample_episode(
    rng: np.random.Generator,
    class_sizes: np.ndarray,
    rules: VariableEpisodes | FixedEpisodes,
    structure: ClassStructure | None = None,
) -> EpisodeDescription:
    if isinstance(rules, FixedEpisodes):
        return sample_fixed_episode(rng, class_sizes, rules)
    return sample_variable_episode(rng, class_sizes, rules, structure)


@dataclass(frozen=True)
class Episode:
    """Indices into the image set and episode-relative labels ``0..ways-1``."""

    support: np.ndarray
    support_labels: np.ndarray
    query: np.ndarray
    query_labels: np.ndarray


def draw_images(rng: np.random.Generator, description: EpisodeDescription, members: Sequence[np.ndarray]) -> Episode:
    """Pick each class's support and query images: a disjoint random subset of the class.

    ``members[c]`` holds the image indices of class ``c``.
    """
    support, support_y, query, query_y = [], [], [], []
    for label, (cls, shots) in enumerate(zip(description.classes, description.shots)):
        chosen = rng.permutation(members[cls])[: shots + description.queries]
        support.append(chosen[:shots])
        query.append(chosen[shots:])
        support_y.append(np.full(shots, label))
        query_y.append(np.full(len(chosen) - shots, label))
    return Episode(
        np.concatenate(support),
        np.concatenate(support_y).astype(np.int64),
        np.concatenate(query),
        np.concatenate(query_y).astype(np.int64),
    )


def class_members(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    """Indices of each class's images, in order."""
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def iter_episodes(
    seed: int | Sequence[int],
    labels: np.ndarray,
    num_classes: int,
    count: int,
    rules: VariableEpisodes | FixedEpisodes,
    structure: ClassStructure | None = None,
) -> Iterator[Episode]:
    """``count`` episodes over images with class ``labels``, drawn one at a time (memory does not
    grow with ``count``); a function of ``seed`` only."""
    rng = np.random.default_rng(seed)
    members = class_members(labels, num_classes)
    sizes = np.array([len(m) for m in members])
    for _ in range(count):
        yield draw_images(rng, sample_episode(rng, sizes, rules, structure), members)


def sample_episodes(
    seed: int | Sequence[int],
    labels: np.ndarray,
    num_classes: int,
    count: int,
    rules: VariableEpisodes | FixedEpisodes,
    structure: ClassStructure | None = None,
) -> list[Episode]:
    """The episodes of :func:`iter_episodes` as a list."""
    return list(iter_episodes(seed, labels, num_classes, count, rules, structure))
