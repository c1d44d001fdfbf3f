"""The one-to-one matching that maximises total similarity, at h = 3,072 in milliseconds instead of seconds,
proven optimal for the whole matrix (issue 19 item 2).

scipy's dense solver (`linear_sum_assignment`) takes ~h^3. But in a matching of decoders each row's partner is
almost always among its few most similar rows, so:
1. solve the assignment on the sparse graph of every row's K best columns (`min_weight_full_bipartite_matching`,
   LAPJVsp, about linear in the edges);
2. prove it optimal for the dense matrix by linear-programming duality: column potentials v from shortest
   paths in the sparse solution's residual graph (Bellman-Ford, vectorised) make every sparse edge's reduced
   cost non-negative; if every entry of the dense matrix satisfies S_ij + v_j <= S_iM(i) + v_M(i) (checked
   in one pass over S), the duals are feasible for the dense problem and the sparse optimum is the dense one;
3. where the check fails, add the entry that breaks it to the graph and solve again (a few rounds).
If the sparse graph has no full matching, or no proof is found, the dense solver answers instead: the
result is always the dense optimum.

Up to DENSE_UP_TO rows the dense solver answers directly (about a second at most there): LAPJVsp can be far
slower than it on decoders with near-duplicate rows, as MFR's collapsed members have (a decoder whose rows
half have a twin, against the true features: 20 s a round against 0.56 s dense at h = 3,072).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

N_CANDIDATES = 32  # columns per row in the sparse graph: enough at h = 3,072 even for random rows
TOLERANCE = 1e-6  # slack of the optimality check (scores in float32)
CHUNK = 1024  # rows of the matrix checked at a time
ROUNDS = 4  # solve-and-check rounds before the dense solver is asked
BREAKING_PER_ROW = 8  # entries that break the proof added to the graph per row and round
MAX_SWEEPS = 1000  # Bellman-Ford sweeps before giving up on a proof (then the dense solver answers)
DENSE_UP_TO = 4096  # rows up to which the dense solver answers directly

Item = TypeVar("Item")
Result = TypeVar("Result")


def max_assignment(score: np.ndarray, n_candidates: int = N_CANDIDATES) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the one-to-one matching maximising the total score, as
    `linear_sum_assignment(score, maximize=True)` returns it (rows sorted)."""
    n, m = score.shape
    sparse = n == m and n > max(DENSE_UP_TO, 2 * n_candidates)
    match = sparse_assignment(score, n_candidates) if sparse else None
    if match is None:
        # the problem maximize=True solves, in one copy of float32 scores instead of a negation and a conversion
        dense: tuple[np.ndarray, np.ndarray] = linear_sum_assignment(np.negative(score, dtype=np.float64))
        return dense
    return np.arange(n), match


def solve_in_threads(
    solve: Callable[[Item], Result], items: Iterable[Item], workers: int | None = None
) -> list[Result]:
    """[solve(item) for item in items], up to `workers` at once in threads (default: torch's thread count).
    scipy's assignment solvers release the GIL, so the matchings of several member pairs run side by side,
    and the next item (a similarity product) is made while they run; items are drawn only as workers free
    up, so at most workers + 1 are held at a time."""
    workers = workers or torch.get_num_threads()
    if workers <= 1:
        return [solve(item) for item in items]
    results: list[Result] = []
    with ThreadPoolExecutor(workers) as pool:
        pending: list[Future[Result]] = []
        for item in items:
            if len(pending) == workers:
                results.append(pending.pop(0).result())
            pending.append(pool.submit(solve, item))
        results += [future.result() for future in pending]
    return results


def sparse_assignment(score: np.ndarray, n_candidates: int = N_CANDIDATES, rounds: int = ROUNDS) -> np.ndarray | None:
    """Each row's column in the optimum of the square matrix `score`, found on the graph of every row's
    n_candidates best columns and proven optimal for the whole matrix; None when that graph has no full
    matching or no proof is found in `rounds` rounds (each adds, for every row the proof fails on, the
    column that breaks it, and solves again)."""
    n = len(score)
    columns = torch.from_numpy(score).topk(n_candidates, dim=1).indices.numpy().ravel()
    rows = np.repeat(np.arange(n), n_candidates)
    for _ in range(rounds):
        edge_score = score[rows, columns].astype(np.float64)
        # costs 2 - score > 0: the sparse solver reads stored zeros as missing edges
        graph = csr_matrix((2.0 - edge_score, (rows, columns)), shape=score.shape)
        try:
            matched_rows, matched_columns = min_weight_full_bipartite_matching(graph)
        except ValueError:  # no full matching among the candidates
            return None
        match = np.empty(n, dtype=np.int64)
        match[matched_rows] = matched_columns
        broken_rows, breaking_columns = _unproven(score, match, rows, columns, edge_score)
        if broken_rows is None:
            return None
        if not len(broken_rows):
            return match
        rows, columns = np.concatenate([rows, broken_rows]), np.concatenate([columns, breaking_columns])
    return None


def _unproven(
    score: np.ndarray, match: np.ndarray, rows: np.ndarray, columns: np.ndarray, edge_score: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray]:
    """The entries (row, column) on which potentials from the residual graph of the edges (rows, columns)
    fail to certify `match` for the whole matrix, up to BREAKING_PER_ROW a row (none: `match` is optimal;
    None: no potentials found)."""
    n = len(score)
    matched = score[np.arange(n), match].astype(np.float64)
    # the edge from column match[i] to column j (row i swaps to j) costs matched[i] - score[i, j]
    sources, lengths = match[rows], matched[rows] - edge_score
    potential = np.zeros(n)
    for _ in range(min(n, MAX_SWEEPS)):  # Bellman-Ford sweeps until nothing relaxes (match optimal: no negative cycle)
        relaxed = potential.copy()
        np.minimum.at(relaxed, columns, potential[sources] + lengths)
        if np.array_equal(relaxed, potential):
            break
        potential = relaxed
    else:
        return None, np.empty(0, dtype=np.int64)
    # every entry: score[i, j] + potential[j] <= matched[i] + potential[match[i]], a chunk of rows at a time
    limit = matched + potential[match] + TOLERANCE
    broken, breaking = [], []
    for start in range(0, n, CHUNK):
        block = score[start : start + CHUNK] + potential[None, :]
        over = np.flatnonzero(block.max(axis=1) > limit[start : start + CHUNK])
        if not len(over):
            continue
        # each broken row's worst entries (those over its limit), so that few rounds are needed
        worst = np.argpartition(-block[over], BREAKING_PER_ROW, axis=1)[:, :BREAKING_PER_ROW]
        above = np.take_along_axis(block[over], worst, axis=1) > limit[start + over][:, None]
        broken.append(np.repeat(over + start, BREAKING_PER_ROW)[above.ravel()])
        breaking.append(worst.ravel()[above.ravel()])
    if not broken:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    return np.concatenate(broken), np.concatenate(breaking)
