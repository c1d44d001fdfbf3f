"""The one-to-one (Hungarian) matching of two decoders: scipy's dense solver against mfr_sae.assignment (sparse
candidates, proven optimal for the dense matrix), on the same similarity matrices, in one run.

Decoders: h unit rows in d = 768; the second member's rows are the first's, permuted, plus noise of a given
size (`shared`: 0 is two independent random decoders, the hardest case for the candidates; 1 and 2 are
decoders sharing their features more and more, as trained members do). Prints per h and setting the time of
the similarity product (the floor every matching pays), of each solver, the ratio, and whether the matchings
are the same (they must be) and whether the fast path needed the dense fallback. The sparse path is timed
at every h (`max_assignment` itself hands matrices up to assignment.DENSE_UP_TO rows to the dense solver).
`--run DIR` also times the trained decoders of a run (members 0 and 1, and member 0 against the run's
ground truth when it has one). Last, the square matrices are solved one after another and side by side in
threads (`assignment.solve_in_threads`, as a re-matching step solves its member pairs).

    python bench/assignment.py [--h 1024 3072 8192] [--threads 1] [--run DIR]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mfr_sae import assignment
from mfr_sae.assignment import max_assignment, solve_in_threads, sparse_assignment

DENSE_UP_TO = assignment.DENSE_UP_TO  # what training uses, for the side-by-side timing
assignment.DENSE_UP_TO = 0  # the sparse path at every size


def decoders(h: int, d: int, shared: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(h, d, generator=gen)
    noise = 1e9 if shared == 0 else 1 / shared
    a = base + noise * torch.randn(h, d, generator=gen)
    b = base[torch.randperm(h, generator=gen)] + noise * torch.randn(h, d, generator=gen)
    return torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)


def seconds(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--h", type=int, nargs="*", default=[1024, 3072, 8192])
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--run", help="a run folder whose trained decoders are matched too")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {args.threads} torch threads, torch {torch.__version__}, d={args.d}\n")
    print(
        "| h | shared | similarity product s | scipy dense s | mfr_sae.assignment s | dense / ours | same | fallback |"
    )
    print("|---|---|---|---|---|---|---|---|")
    problems = [(f"{h} | {shared}", *decoders(h, args.d, shared, seed=h)) for h in args.h for shared in [0.0, 1.0, 2.0]]
    problems += trained(args.run) if args.run else []
    for label, a, b in problems:
        product_s, sims = seconds(lambda: (a @ b.T).numpy())
        dense_s, dense = seconds(lambda: linear_sum_assignment(sims, maximize=True))
        ours_s, ours = seconds(lambda: max_assignment(sims))
        fallback = sims.shape[0] != sims.shape[1] or sparse_assignment(sims) is None  # the dense solver answered
        same = all(np.array_equal(x, y) for x, y in zip(dense, ours))
        print(
            f"| {label} | {product_s:.3f} | {dense_s:.3f} | {ours_s:.3f} | {dense_s / ours_s:.1f} | "
            f"{'yes' if same else 'NO'} | {'yes' if fallback else 'no'} |",
            flush=True,
        )
    side_by_side(problems, args.threads)


def side_by_side(problems: list[tuple[str, torch.Tensor, torch.Tensor]], threads: int) -> None:
    """The square matrices' assignments one after another against `solve_in_threads` (as a re-matching step
    solves its member pairs), in the same run, with the size rule training uses (assignment.DENSE_UP_TO)."""
    assignment.DENSE_UP_TO = DENSE_UP_TO
    scores = [(a @ b.T).numpy() for _, a, b in problems if len(a) == len(b)]
    serial_s, serial = seconds(lambda: [max_assignment(score) for score in scores])
    threaded_s, threaded = seconds(lambda: solve_in_threads(max_assignment, scores, threads))
    same = all(np.array_equal(x[1], y[1]) for x, y in zip(serial, threaded))
    print(
        f"\n{len(scores)} square matrices above, max_assignment one after another {serial_s:.3f} s, side by side in "
        f"{threads} threads {threaded_s:.3f} s: {serial_s / threaded_s:.2f}x ({'same' if same else 'NOT the same'})"
    )


def trained(run: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Members 0 and 1 of a run, and the run's ground truth against member 0 (when it has one)."""
    from mfr_sae import load
    from mfr_sae.config import load_config
    from mfr_sae.data import run_source

    unit = torch.nn.functional.normalize(load(run).decoder_weight.detach().float(), dim=-1)
    h = unit.shape[1]
    problems = [(f"{h} | trained: {run} members 0, 1", unit[0], unit[1])]
    _, truth, _ = run_source(load_config(f"{run}/config.yaml", []), torch.device("cpu"))
    if truth is not None:
        truth = torch.nn.functional.normalize(truth.float(), dim=-1)
        problems.append((f"{h} | trained: {run} truth, member 0", truth, unit[0]))
    return problems


if __name__ == "__main__":
    main()
