"""Exact MFR matching, certified (`mfr_sae.certified`) against every row matched every step, in one run.

Three trainers take the same batches in lockstep (one step each in turn, so that they share the
machine's state): the baseline (MFR off), MFR exact with every row re-matched every step (the
reference), and MFR exact with only the rows whose bound fails re-matched (what `match_every=1` does).
The paper's form (`max`, beta auto), synthetic vectors of configs/gpt2-shape.yaml unless --set says
otherwise. It checks at every step that the certified matches equal the reference's, bitwise, and
prints per-step times over the last half of the steps (the start, while the rows are random and nearly
every row fails, is reported apart), and the share of rows the certified matching re-matched.

    python bench/certified.py [--steps 200] [--set data.d=256 --set sae.d_sae=1024 ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from mfr_sae.config import PAPER_MFR, load_config
from mfr_sae.cpu_memory import keep_freed_cpu_memory
from mfr_sae.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], help="config overrides, as for mfr-sae train")
    args = parser.parse_args()
    keep_freed_cpu_memory()
    overrides = ["train.checkpoint_every=0", f"train.n_samples={10**9}", *args.set]
    mfr = [*PAPER_MFR, "mfr.enabled=true"]
    trainers = {
        name: Trainer(load_config("configs/gpt2-shape.yaml", overrides + extra), tempfile.mkdtemp(), progress=False)
        for name, extra in [("baseline", []), ("exact, every row", mfr), ("exact, certified", mfr)]
    }
    trainers["exact, every row"].mfr.matching.certified = None
    certified = trainers["exact, certified"].mfr.matching.certified
    assert certified is not None
    cfg = trainers["baseline"].cfg
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"d={cfg.data.d}, h={cfg.sae.d_sae}, N={cfg.sae.n_members}, k={cfg.sae.k}, batch {cfg.train.batch_size}, "
        f"{args.steps} steps"
    )
    seconds: dict[str, list[float]] = {name: [] for name in trainers}
    rematched = []
    batches = trainers["baseline"].source.batches(cfg.train.batch_size)
    for step in range(args.steps):
        batch = next(batches)
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step(batch)
            seconds[name].append(time.perf_counter() - start)
        reference = trainers["exact, every row"].mfr.matching.matches
        mine = trainers["exact, certified"].mfr.matching.matches
        assert all(torch.equal(mine[pair], matches) for pair, matches in reference.items()), f"step {step}"
        rematched.append(certified.rematched_frac)
    half = args.steps // 2
    base = sum(seconds["baseline"][half:]) / (args.steps - half)
    print("\n| step | ms/step, first half | ms/step, last half | x baseline (last half) | rows re-matched |")
    print("|---|---|---|---|---|")
    for name, times in seconds.items():
        early, late = sum(times[:half]) / half, sum(times[half:]) / (args.steps - half)
        share = ""
        if name == "exact, certified":
            share = (
                f"{sum(rematched[:half]) / half:.1%} first half, {sum(rematched[half:]) / (args.steps - half):.1%} last"
            )
        print(f"| {name} | {1000 * early:.1f} | {1000 * late:.1f} | {late / base:.2f} | {share} |")
    print(f"\ncertified matches equal the reference's at all {args.steps} steps")


if __name__ == "__main__":
    main()
