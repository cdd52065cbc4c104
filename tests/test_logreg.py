"""The batched solver's warm starts (``init``): what a regularisation path with warm starts relies on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ringbench.logreg import logreg_objective, solve_logreg


def _problems(lams: list[float], batch: int = 2, n: int = 40, d: int = 6, k: int = 3):
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch, n, d)))
    y = torch.from_numpy(rng.integers(0, k, size=(batch, n)))
    y[:, :k] = torch.arange(k)  # every class present
    weights = torch.ones(batch, len(lams), n, dtype=torch.float64)
    class_mask = torch.ones(batch, k, dtype=torch.bool)
    lam = torch.tensor([lams] * batch, dtype=torch.float64)
    return x, y, weights, class_mask, lam


@pytest.mark.parametrize("lams", [[1e-2], [1e-3, 1e-2, 1e-1]])  # the scale folded into the features, or not
def test_a_warm_start_reaches_the_cold_solution(lams):
    x, y, weights, class_mask, lam = _problems(lams)
    cold = solve_logreg(x, y, weights, class_mask, lam, tol=1e-10)
    # from the solutions at 10x the regularisation: a regularisation path's warm start
    neighbour = solve_logreg(x, y, weights, class_mask, lam * 10, tol=1e-10)
    warm = solve_logreg(x, y, weights, class_mask, lam, tol=1e-10, init=neighbour)
    for a, b in zip(cold, warm):
        np.testing.assert_allclose(
            a.numpy(), b.numpy(), atol=1e-5
        )  # the stopping tests: gradient, or F at machine precision
    f_cold, f_warm = (logreg_objective(x, y, weights, class_mask, lam, *s) for s in (cold, warm))
    np.testing.assert_allclose(f_warm.numpy(), f_cold.numpy(), rtol=1e-12)


def test_a_start_that_is_already_solved_is_returned_unchanged():
    x, y, weights, class_mask, lam = _problems([1e-3, 1e-1])
    solved = solve_logreg(x, y, weights, class_mask, lam, tol=1e-10)
    again = solve_logreg(x, y, weights, class_mask, lam, tol=1e-6, init=solved)
    for a, b in zip(solved, again):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-14)


def test_an_initial_weight_of_the_wrong_shape_is_refused():
    x, y, weights, class_mask, lam = _problems([1e-2])
    weight, bias = solve_logreg(x, y, weights, class_mask, lam)
    with pytest.raises(ValueError, match="initial weight"):
        solve_logreg(x, y, weights, class_mask, lam, init=(weight[:, :-1], bias))
