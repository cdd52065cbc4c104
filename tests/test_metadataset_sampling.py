"""Meta-Dataset episode rules, checked over thousands of sampled episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from metadataset.sampling import (
    ClassStructure,
    FixedEpisodes,
    VariableEpisodes,
    class_members,
    compute_num_query,
    draw_images,
    sample_episode,
    sample_episodes,
    sample_fixed_episode,
    sample_num_support_per_class,
    sample_support_set_size,
    sample_variable_episode,
    validate_split,
)
from ringbench.errors import UserError

RULES = VariableEpisodes()


def _episodes(sizes, count=3000, seed=0, structure=None, rules=RULES):
    rng = np.random.default_rng(seed)
    return [sample_variable_episode(rng, sizes, rules, structure) for _ in range(count)]


@pytest.fixture(scope="module")
def sizes():
    sizes = np.random.default_rng(1).integers(2, 1200, size=80)
    sizes[::10] = [2, 3, 5, 8, 11, 15, 19, 25]  # small classes make the query rule bind
    return sizes


@pytest.fixture(scope="module")
def variable(sizes):
    return _episodes(sizes)


def test_ways_uniform_over_the_allowed_range(sizes, variable):
    ways = np.array([e.ways for e in variable])
    assert ways.min() == 5 and ways.max() == 50  # [5, min(50, C)] with C = 80
    counts = np.bincount(ways, minlength=51)[5:]
    expected = len(ways) / 46
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 90, chi2  # 45 degrees of freedom: p ~ 1e-4 at 90
    few = _episodes(sizes[:7], count=600)
    assert {e.ways for e in few} == {5, 6, 7}  # C = 7 < 50
    for e in variable:
        assert len(np.unique(e.classes)) == e.ways


def test_query_size_equal_for_every_class_and_follows_the_formula(sizes, variable):
    for e in variable:
        assert e.queries == min(10, int(sizes[e.classes].min()) // 2)
    assert any(e.queries < 10 for e in variable) and any(e.queries == 10 for e in variable)


def test_shots_bounds_and_support_cap(sizes, variable):
    totals = []
    for e in variable:
        remaining = sizes[e.classes] - e.queries
        assert (e.shots >= 1).all()  # every class at least one shot
        assert (e.shots <= remaining).all()  # never more than what is left after the query
        assert e.shots.sum() <= 500
        totals.append(e.shots.sum())
    big = _episodes(np.full(60, 2000), count=2000, seed=3)
    big_totals = np.array([e.shots.sum() for e in big])
    assert big_totals.max() > 450  # the 500 cap is reached (S = 500) ...
    assert (big_totals <= 500).all()  # ... and never exceeded
    assert np.mean(totals) > 20


def test_support_size_formula_with_the_same_generator():
    remaining = np.array([3, 40, 150, 700])
    for seed in range(50):
        beta = np.random.default_rng(seed).uniform()
        expected = min(500, sum(math.floor(beta * min(100, r) + 1) for r in remaining))
        assert sample_support_set_size(np.random.default_rng(seed), remaining, 100, 500) == expected


def test_shots_formula_with_the_same_generator():
    sizes = np.array([20, 100, 400, 35, 800])
    remaining = sizes - 10
    for seed in range(50):
        u = np.random.default_rng(seed).uniform(math.log(0.5), math.log(2), size=5)
        p = sizes * np.exp(u)
        p = p / p.sum()
        expected = np.minimum(np.floor(p * (200 - 5)).astype(int) + 1, remaining)
        got = sample_num_support_per_class(
            np.random.default_rng(seed), sizes, remaining, 200, math.log(0.5), math.log(2)
        )
        np.testing.assert_array_equal(got, expected)


def test_shots_follow_class_sizes():
    """Proportions ∝ n_c: classes four times larger get about four times the shots (±2x noise)."""
    sizes = np.array([1000] * 10 + [250] * 10)
    big, small = [], []
    for e in _episodes(sizes, count=2000, seed=5):
        for cls, shots in zip(e.classes, e.shots):
            (big if sizes[cls] == 1000 else small).append(shots)
    ratio = np.mean(big) / np.mean(small)
    assert 2.5 < ratio < 4.5, ratio


def test_query_rule_and_errors():
    assert compute_num_query(np.array([7, 100]), 10) == 3
    assert compute_num_query(np.array([500, 100]), 10) == 10
    with pytest.raises(ValueError):
        compute_num_query(np.array([1, 100]), 10)


def test_determinism_by_seed(sizes):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    a = sample_episodes([4, 2], labels, len(sizes), 50, RULES)
    b = sample_episodes([4, 2], labels, len(sizes), 50, RULES)
    c = sample_episodes([4, 3], labels, len(sizes), 50, RULES)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.support, y.support)
        np.testing.assert_array_equal(x.query, y.query)
    assert any(len(x.support) != len(z.support) or (x.support != z.support).any() for x, z in zip(a, c))


def test_drawn_images_are_disjoint_and_belong_to_their_class(sizes):
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(len(sizes)), sizes))
    members = class_members(labels, len(sizes))
    rng = np.random.default_rng(0)
    for _ in range(200):
        d = sample_episode(rng, sizes, RULES)
        e = draw_images(rng, d, members)
        assert not set(e.support) & set(e.query)
        np.testing.assert_array_equal(labels[e.support], d.classes[e.support_labels])
        np.testing.assert_array_equal(labels[e.query], d.classes[e.query_labels])
        np.testing.assert_array_equal(np.bincount(e.query_labels, minlength=d.ways), np.full(d.ways, d.queries))
        np.testing.assert_array_equal(np.bincount(e.support_labels, minlength=d.ways), d.shots)


def test_dag_rule_uses_eligible_nodes_and_caps_ways():
    nodes = (np.arange(3), np.arange(10, 18), np.arange(20, 80), np.arange(0, 400))  # 3 / 8 / 60 / 400 leaves
    structure = ClassStructure(node_leaves=nodes)
    sizes = np.full(400, 50)
    seen = set()
    for e in _episodes(sizes, count=2000, seed=2, structure=structure):
        classes = set(e.classes.tolist())
        if classes <= set(range(10, 18)):
            assert e.ways == 8
            seen.add("8")
        else:
            assert classes <= set(range(20, 80)) and e.ways == 50  # 60 leaves, 50 kept
            seen.add("60")
    assert seen == {"8", "60"}  # the 3-leaf and 400-leaf nodes are never used


def test_bilevel_rule_keeps_episodes_inside_one_superclass():
    superclass_of = np.repeat([0, 1, 2, 3], [4, 12, 30, 60])  # superclass 0 has too few classes
    structure = ClassStructure(superclass_of=superclass_of)
    used = set()
    for e in _episodes(np.full(len(superclass_of), 20), count=2000, seed=3, structure=structure):
        supers = set(superclass_of[e.classes].tolist())
        assert len(supers) == 1
        (s,) = supers
        used.add(s)
        assert 5 <= e.ways <= min(50, int((superclass_of == s).sum()))
    assert used == {1, 2, 3}


def test_fixed_episodes():
    sizes = np.array([19, 20, 25, 100, 30, 20, 50])
    rng = np.random.default_rng(0)
    rules = FixedEpisodes(ways=5, shots=5, queries=15)
    for _ in range(500):
        e = sample_fixed_episode(rng, sizes, rules)
        assert e.ways == 5 and (e.shots == 5).all() and e.queries == 15
        assert 0 not in e.classes  # 19 < 5 + 15 images
    with pytest.raises(UserError, match="5-way 5-shot 15-query"):
        sample_fixed_episode(rng, np.array([30, 30, 30, 30, 10]), rules)


def test_split_validation():
    validate_split(["a", "b", "c", "d", "e"], [2, 3, 4, 5, 6], 5, "src")
    with pytest.raises(UserError, match="at least 5"):
        validate_split(["a", "b", "c", "d"], [9, 9, 9, 9], 5, "src")
    with pytest.raises(UserError, match="'e' \\(1\\)"):
        validate_split(["a", "b", "c", "d", "e"], [9, 9, 9, 9, 1], 5, "src")
