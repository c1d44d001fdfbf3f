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
import tempfile
import time

import torch

from mfr_sae.config import load_config
from mfr_sae.mfr import match_all
from mfr_sae.train import Trainer


def trainer_for(overrides: list[str], device: str) -> Trainer:
    base = ["data.d=768", "data.n_features=3072", "data.n_groups=12", "data.n_active=12",
            "sae.n_members=5", "sae.d_sae=3072", "sae.k=12", "train.batch_size=500",
            "train.n_samples=10000000", "train.checkpoint_every=0", f"train.device={device}"]
    return Trainer(load_config(None, base + overrides), tempfile.mkdtemp() + "/run", progress=False)


def seconds_per_step(trainer: Trainer, steps: int, warmup: int = 2) -> float:
    batches = trainer.source.batches(trainer.cfg.train.batch_size)
    x = next(batches).to(trainer.device)
    for _ in range(warmup):
        trainer.train_step(x)
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x)
    sync()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--match-every", type=int, nargs="+", default=[1, 10, 50, 100])
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"device {args.device}")
    print("setting: d=768, h=3072, N=5 (10 pairs), batch 500, k=12, fp32\n")

    base = seconds_per_step(trainer_for([], args.device), args.steps)
    print(f"{'step':32s} {'s/step':>8s} {'penalty / SAE step':>20s}")
    print(f"{'baseline (no penalty)':32s} {base:8.3f} {'-':>20s}")
    mfr = ["mfr.enabled=true", "mfr.reinit_window=0"]
    dense = seconds_per_step(trainer_for(mfr + ["mfr.match_every=0"], args.device), max(2, args.steps // 3))
    print(f"{'MFR, naive dense penalty':32s} {dense:8.3f} {(dense - base) / base:19.1%}")
    for every in args.match_every:
        trainer = trainer_for(mfr + [f"mfr.match_every={every}"], args.device)
        # time whole matching periods, so the re-matching cost is amortised as in training
        steps = max(args.steps, every)
        t = seconds_per_step(trainer, steps, warmup=1)
        print(f"{f'MFR, matched, match_every={every}':32s} {t:8.3f} {(t - base) / base:19.1%}")

    # staleness: how many arg-max matches move between re-matchings during real training
    trainer = trainer_for(mfr + ["mfr.match_every=1"], args.device)
    batches = trainer.source.batches(500)
    previous = match_all(trainer.ensemble.decoder().detach())
    print("\narg-max matches that moved over 10 steps of MFR training (share of all matches):")
    for block in range(3):
        for _ in range(10):
            trainer.train_step(next(batches).to(trainer.device))
        current = match_all(trainer.ensemble.decoder().detach())
        print(f"  steps {10 * block:3d}-{10 * block + 10:3d}: {(current != previous).float().mean().item():.2%}")
        previous = current


if __name__ == "__main__":
    main()
