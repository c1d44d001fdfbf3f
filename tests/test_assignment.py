import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from mfr_sae import assignment
from mfr_sae.assignment import max_assignment


def _cosines(n: int, d: int, shared: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    a = base + rng.standard_normal((n, d)) / max(shared, 1e-9)
    b = base[rng.permutation(n)] + rng.standard_normal((n, d)) / max(shared, 1e-9)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return (a @ b.T).astype(np.float32)


@pytest.mark.parametrize("shared", [0.0, 0.5, 2.0])  # random rows, weakly and strongly shared features
@pytest.mark.parametrize("seed", [0, 1])
def test_the_sparse_optimum_is_proven_the_dense_one(monkeypatch, shared, seed):
    score = _cosines(400, 32, shared, seed)
    rows, columns = linear_sum_assignment(score, maximize=True)

    def no_dense(*args, **kwargs):
        raise AssertionError("the dense solver was needed")

    monkeypatch.setattr(assignment, "linear_sum_assignment", no_dense)
    monkeypatch.setattr(assignment, "DENSE_UP_TO", 0)  # the sparse path at any size
    mine = max_assignment(score)
    assert np.array_equal(mine[0], rows) and np.array_equal(mine[1], columns)


def test_when_the_candidates_miss_the_optimum_the_dense_solver_answers(monkeypatch):
    monkeypatch.setattr(assignment, "DENSE_UP_TO", 0)
    score = _cosines(200, 32, 0.0, 3)
    rows, columns = linear_sum_assignment(score, maximize=True)
    assert assignment.sparse_assignment(score, 2, rounds=1) is None  # 2 candidates a row: too few, and it knows
    mine = max_assignment(score, n_candidates=2)
    assert np.array_equal(mine[0], rows) and np.array_equal(mine[1], columns)


def test_the_check_refuses_a_matching_that_is_not_optimal():
    score = _cosines(200, 32, 0.5, 4)
    _, columns = linear_sum_assignment(score, maximize=True)
    worse = columns.copy()
    worse[[0, 1]] = worse[[1, 0]]  # two rows swap partners
    rows = np.repeat(np.arange(200), 32)
    candidates = np.argsort(-score, axis=1)[:, :32].ravel()
    edges = score[rows, candidates].astype(np.float64)
    assert len(assignment._unproven(score, columns, rows, candidates, edges)[0]) == 0
    broken, _ = assignment._unproven(score, worse, rows, candidates, edges)
    assert broken is None or len(broken) > 0  # a negative cycle (no potentials), or rows it fails on


def test_rectangular_and_small_matrices_go_to_the_dense_solver():
    score = _cosines(300, 16, 1.0, 5)[:, :250]
    assert all(np.array_equal(x, y) for x, y in zip(max_assignment(score), linear_sum_assignment(score, maximize=True)))
    small = _cosines(40, 8, 1.0, 6)
    assert all(np.array_equal(x, y) for x, y in zip(max_assignment(small), linear_sum_assignment(small, maximize=True)))


def test_up_to_dense_up_to_rows_the_dense_solver_answers_directly(monkeypatch):
    def no_sparse(*args, **kwargs):
        raise AssertionError("the sparse solver was asked")

    monkeypatch.setattr(assignment, "sparse_assignment", no_sparse)
    monkeypatch.setattr(assignment, "DENSE_UP_TO", 400)
    score = _cosines(400, 32, 1.0, 7)
    assert all(np.array_equal(x, y) for x, y in zip(max_assignment(score), linear_sum_assignment(score, maximize=True)))
    monkeypatch.setattr(assignment, "DENSE_UP_TO", 399)
    with pytest.raises(AssertionError, match="sparse solver was asked"):
        max_assignment(score)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_solve_in_threads_keeps_the_order_and_holds_few_items(workers):
    held, most_held = 0, 0

    def items():
        nonlocal held, most_held
        for seed in range(7):
            held += 1
            most_held = max(most_held, held)
            yield _cosines(60, 8, 0.5, seed)

    def solve(score):
        nonlocal held
        solved = max_assignment(score)
        held -= 1
        return solved

    solved = assignment.solve_in_threads(solve, items(), workers)
    for seed, (rows, columns) in enumerate(solved):
        expected = linear_sum_assignment(_cosines(60, 8, 0.5, seed), maximize=True)
        assert np.array_equal(rows, expected[0]) and np.array_equal(columns, expected[1])
    assert most_held <= workers + 1


def test_an_error_in_a_thread_reaches_the_caller():
    def solve(item):
        if item == 2:
            raise ValueError("item 2")
        return item

    with pytest.raises(ValueError, match="item 2"):
        assignment.solve_in_threads(solve, range(5), 2)
