"""Throughput of the ensemble training step against the encoder-product floor, in one run.

At d=768, h=3072, batch 500, k=12, N=5 (fp32; CPU here, CUDA where present) this times:
- the floor: the encoder product alone, the faster of two ways to write it (one [500 x 768] x [768 x 3072]
  product per member, or one [500 x 768] x [768 x 5 * 3072] product, which the step uses);
- the baseline ensemble step (forward, sparse backward, AdamW) and the MFR step: the paper's form at
  `match_every` 1 (exact, certified: from a fresh initialisation on one batch, where most bounds fail;
  bench/certified.py measures it in training) and 50, and the one-to-one forms re-matched every 10 steps:
  `hungarian` (an assignment), `mnn` (mutual nearest neighbours) and `mnn_hungarian` (those, the rest
  assigned), each with the defaults' other settings; and the defaults of mfr.* themselves (`--mfr` adds
  settings on top) against the baseline as a training pays them: both timed on fresh batches after
  match_every + 1 untimed steps of training, over match_every steps (one re-matching, of trained rows), then
  over 10 steps between re-matchings;
- the same baseline step written with plain autograd (dense TopK gradient, dense decoder), the
  reference implementation the fused step replaces.

    python bench/step.py [--steps 10] [--device cpu] [--h 8192] [--rows hungarian,mnn,mnn_hungarian]
        [--mfr mfr.mmcs=greedy]

--h sets h (and the true features) for another size; --rows leaves out the slow rows (exact: m=1 and m=50;
reference: the plain-autograd step).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from collections.abc import Callable
from typing import Any

import torch
from timing import timed, timed_side_by_side  # bench/timing.py

from mfr_sae.config import PAPER_MFR, load_config
from mfr_sae.cpu_memory import keep_freed_cpu_memory
from mfr_sae.kernels import reference_decode, reference_encode
from mfr_sae.train import Trainer

D, BATCH, K, N = 768, 500, 12, 5
# the MFR rows; the baseline and the floor are always timed
ONE_TO_ONE = ("hungarian", "mnn", "mnn_hungarian")  # each timed re-matched every 10 steps
ROWS = ("reference", "exact", *ONE_TO_ONE, "defaults", "architectures")
# each architecture's step against TopK's (issue 27's goals: AuxK and BatchTopK within 1.15x, Matryoshka 1.3x)
ARCHITECTURES = {
    "topk": [],
    "topk + AuxK": ["sae.aux_coef=0.03125", "sae.aux_dead_window=5000"],  # a short window: some latents take part
    "batchtopk": ["sae.architecture=batchtopk"],
    "matryoshka": ["sae.architecture=matryoshka"],
}
ARCHITECTURE_GOALS = {"topk + AuxK": 1.15, "batchtopk": 1.15, "matryoshka": 1.3}


def trainer(device: str, extra: list[str], H: int) -> Trainer:
    overrides = [
        f"data.d={D}",
        f"data.n_features={H}",
        "data.n_groups=12",
        f"data.n_active={K}",
        f"sae.n_members={N}",
        f"sae.d_sae={H}",
        f"sae.k={K}",
        f"train.batch_size={BATCH}",
        "train.n_samples=10000000",
        "train.checkpoint_every=0",
        f"train.device={device}",
    ]
    if device == "cpu":
        keep_freed_cpu_memory()  # as `mfr-sae train` does
    return Trainer(load_config(None, overrides + extra), tempfile.mkdtemp() + "/run", progress=False)


def warmed_steps(runs: dict[str, Trainer], device: str, warm: int) -> dict[str, Callable[[], Any]]:
    """Each run's training step on its own fresh batches, after `warm` untimed ones."""
    batches = {name: (x.to(device) for x in run.source.batches(BATCH)) for name, run in runs.items()}
    steps = {name: (lambda run=run, name=name: run.train_step(next(batches[name]))) for name, run in runs.items()}
    for step in steps.values():
        for _ in range(warm):
            step()
    return steps


def in_training(device: str, H: int, mfr: list[str]) -> list[tuple[str, float]]:
    """Rows (name, seconds per step) of the baseline, MFR (the defaults, with `mfr` on top), the baseline and MFR
    again, as a training pays them. Each trains match_every + 1 steps on fresh batches untimed (the first
    re-matching, of a fresh initialisation's rows, among them), then both are timed step by step in turn (a
    drift of the machine's speed falls on both) over the next match_every steps (one re-matching, of trained
    rows, as in every later stretch of a training), then over 10 steps between re-matchings."""
    runs = {"baseline": trainer(device, [], H), "MFR": trainer(device, ["mfr.enabled=true", *mfr], H)}
    every = runs["MFR"].cfg.mfr.match_every
    steps = warmed_steps(runs, device, every + 1)
    stretch = timed_side_by_side(steps, every, torch.device(device))
    between = timed_side_by_side(steps, 10, torch.device(device))
    label = "the defaults" + (" with " + " ".join(mfr) if mfr else "")
    return [
        (f"baseline step in training, {every} steps", stretch["baseline"]),
        (f"MFR step, {label}, in training, {every} steps (one re-matching)", stretch["MFR"]),
        ("baseline step in training, 10 steps", between["baseline"]),
        (f"MFR step, {label}, between re-matchings", between["MFR"]),
    ]


def architectures_in_training(device: str, H: int, warm: int = 201, steps: int = 50) -> list[tuple[str, float]]:
    """Rows (name, seconds per step) of each architecture, MFR off: each trains `warm` steps on fresh batches
    untimed (AuxK's window shortened to 5,000 vectors, so that some of its dead latents take part), then all are
    timed step by step in turn over `steps` steps (a drift of the machine's speed falls on all alike)."""
    runs = {name: trainer(device, overrides, H) for name, overrides in ARCHITECTURES.items()}
    steps_of = warmed_steps(runs, device, warm)
    dead = {name: run.firing.idle_mask(run.cfg.sae.aux_dead_window).float().mean().item() for name, run in runs.items()}
    seconds = timed_side_by_side(steps_of, steps, torch.device(device))
    return [(f"architecture {name} (dead for AuxK {dead[name]:.1%})", seconds[name]) for name in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--h", type=int, default=3072, help="latents per member (3,072: the GPT-2 shape)")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"MFR rows to time, of {', '.join(ROWS)}")
    parser.add_argument(
        "--mfr", nargs="*", default=[], help="settings on top of the defaults' row, e.g. mfr.mmcs=greedy"
    )
    args = parser.parse_args()
    H, rows_wanted = args.h, set(args.rows.split(","))
    device = torch.device(args.device)
    print(
        f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"device {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}"
    )
    print(f"setting: d={D}, h={H}, batch {BATCH}, k={K}, N={N}, fp32; MFR rows: {', '.join(sorted(rows_wanted))}\n")

    base = trainer(args.device, [], H)
    x = next(base.source.batches(BATCH)).to(device)
    w, b = base.ensemble.W_enc.detach(), base.ensemble.b_enc.detach()
    batched = timed(lambda: torch.baddbmm(b.unsqueeze(1), x.expand(N, *x.shape), w.transpose(1, 2)), args.steps, device)
    single = timed(lambda: torch.addmm(b.reshape(-1), x, w.reshape(-1, D).t()), args.steps, device)
    floor = min(batched, single)  # the faster of the two ways to write the product

    ref = base.ensemble.__class__(D, H, [K] * N, device=device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)

    def reference_step():
        acts, idx = reference_encode(x, ref.W_enc, ref.b_enc, K)
        decoder = torch.nn.functional.normalize(ref.W_enc, dim=-1)
        loss = (reference_decode(acts, idx, decoder) - x).pow(2).mean(dim=(1, 2)).mean()
        ref_opt.zero_grad()
        loss.backward()
        ref_opt.step()

    rows = [("encoder product, N batched GEMMs", batched), ("encoder product, one [B, N h] GEMM", single)]
    if "reference" in rows_wanted:
        rows.append(("baseline step, plain autograd (reference)", timed(reference_step, args.steps, device)))
    rows.append(("baseline step, mfr-sae", timed(lambda: base.train_step(x), args.steps, device)))
    first_mfr = len(rows)
    for every in (1, 50) if "exact" in rows_wanted else ():
        paper = [*PAPER_MFR, "mfr.enabled=true", "mfr.reinit_window=0", f"mfr.match_every={every}"]
        mfr = trainer(args.device, paper, H)
        steps = max(args.steps, every)
        rows.append((f"MFR step, mfr-sae, match_every={every}", timed(lambda: mfr.train_step(x), steps, device)))
    for form in ONE_TO_ONE:
        if form in rows_wanted:  # the defaults' other settings, re-matched every 10 steps
            one_to_one = trainer(args.device, ["mfr.enabled=true", f"mfr.mmcs={form}", "mfr.match_every=10"], H)
            seconds = timed(lambda: one_to_one.train_step(x), max(args.steps, 10), device)
            rows.append((f"MFR step, {form}, match_every=10", seconds))
    baseline_of: dict[str, str] = {}  # an MFR row's baseline, where not the fixed batch's
    if "defaults" in rows_wanted:
        trained = in_training(args.device, H, args.mfr)
        rows += trained
        # each MFR row against the baseline timed on the same stretch of its own training
        baseline_of = {trained[1][0]: trained[0][0], trained[3][0]: trained[2][0]}
    if "architectures" in rows_wanted:
        rows += architectures_in_training(args.device, H)
    print(f"{'':44s} {'ms/step':>9s} {'tokens/s':>10s} {'x floor':>8s}")
    for name, seconds in rows:
        print(f"{name:44s} {1000 * seconds:9.1f} {BATCH / seconds:10.0f} {seconds / floor:8.2f}")
    times = dict(rows)
    baseline = times["baseline step, mfr-sae"]
    reference = times.get("baseline step, plain autograd (reference)")
    print(
        f"\nfloor: the faster encoder product, {1000 * floor:.1f} ms; baseline step / floor: {baseline / floor:.2f} "
        f"(goal <= 2)" + (f"; reference / mfr-sae: {reference / baseline:.2f}x" if reference else "")
    )
    for name, seconds in rows[first_mfr:]:
        if name.startswith("architecture "):
            topk = next(t for row, t in rows if row.startswith("architecture topk ("))
            kind = name.removeprefix("architecture ").split(" (")[0]
            goal = f" (goal <= {ARCHITECTURE_GOALS[kind]})" if kind in ARCHITECTURE_GOALS else ""
            print(f"{name} / TopK's: {seconds / topk:.2f}{goal}")
            continue
        if name.startswith("baseline"):
            continue
        against = times[baseline_of.get(name, "baseline step, mfr-sae")]
        goal = " (goal <= 1.2)" if name.endswith("match_every=1") else ""
        goal = " (the defaults' goal <= 1.5)" if "(one re-matching)" in name else goal
        print(f"{name} / baseline: {seconds / against:.2f}{goal if 'match_every=50' not in name else ''}")


if __name__ == "__main__":
    main()
