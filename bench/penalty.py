"""Cost of the MFR penalty per training step, as a ratio to the SAE step it regularises.

Times, in one run on this machine, the baseline ensemble step (forward, backward, AdamW) and the MFR
step with the naive dense penalty (`match_every=0`) and with the matched penalty at several
`match_every`, at the paper's GPT-2 scale: d=768, h=3072, N=5, batch 500, k=12 (fp32). Also prints how
many matches are stale when they are recomputed (0% means the cached penalty was exact all along).

    python bench/penalty.py [--steps 6] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform

import torch
from step import BATCH, PAPER_MFR, trainer  # bench/step.py
from timing import timed  # bench/timing.py

from mfr_sae.matching import match_all
from mfr_sae.train import Trainer


def seconds_per_step(run: Trainer, steps: int, warmup: int = 2) -> float:
    x = next(run.source.batches(BATCH)).to(run.device)
    return timed(lambda: run.train_step(x), steps, run.device, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--match-every", type=int, nargs="+", default=[1, 10, 50, 100])
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {args.device}"
    )
    print("setting: d=768, h=3072, N=5 (10 pairs), batch 500, k=12, fp32\n")

    base = seconds_per_step(trainer(args.device, []), args.steps)
    print(f"{'step':32s} {'s/step':>8s} {'penalty / SAE step':>20s}")
    print(f"{'baseline (no penalty)':32s} {base:8.3f} {'-':>20s}")
    mfr = [*PAPER_MFR, "mfr.enabled=true", "mfr.reinit_window=0"]
    dense = seconds_per_step(trainer(args.device, mfr + ["mfr.match_every=0"]), max(2, args.steps // 3))
    print(f"{'MFR, naive dense penalty':32s} {dense:8.3f} {(dense - base) / base:19.1%}")
    for every in args.match_every:
        run = trainer(args.device, mfr + [f"mfr.match_every={every}"])
        # time whole matching periods, so the re-matching cost is amortised as in training
        steps = max(args.steps, every)
        t = seconds_per_step(run, steps, warmup=1)
        print(f"{f'MFR, matched, match_every={every}':32s} {t:8.3f} {(t - base) / base:19.1%}")

    # staleness: how many arg-max matches move between re-matchings during real training
    run = trainer(args.device, mfr + ["mfr.match_every=1"])
    batches = run.source.batches(BATCH)
    previous = match_all(run.ensemble.decoder().detach())
    print("\narg-max matches that moved over 10 steps of MFR training (share of all matches):")
    for block in range(3):
        for _ in range(10):
            run.train_step(next(batches).to(run.device))
        current = match_all(run.ensemble.decoder().detach())
        print(f"  steps {10 * block:3d}-{10 * block + 10:3d}: {(current != previous).float().mean().item():.2%}")
        previous = current


if __name__ == "__main__":
    main()
