"""SynthSAEBench's generation against the training step it feeds (issue 43: "generation no slower than the training
step"), in one run.

Times, for a preset (default synthsaebench-16k):
- building its model (mfr_sae.data.synthsaebench.build_model: sae-lens's SyntheticModel with the orthogonalisation's
  gradient written out); `--exact` also times sae-lens's own build (about an hour of 2 CPU cores at 16k);
- drawing one batch of `--batch` vectors with their true activations (SynthSAEBenchData.sample: sae-lens's
  sampler, seeded per batch, the vectors summed over the active features), the true activations alone
  (activation_generator.sample), and sae-lens's own draw of both (SyntheticModel.sample_with_features, whose
  vectors are a dense product);
- one training step of a plain torch TopK SAE (width `--h`, k `--k`, on the preset's d; encoder product, TopK,
  dense decoder, MSE, backward, Adam) on a batch of the same size: the reference step;
side by side (one call of each in turn, so a drift in the machine's load falls on both alike), and prints vectors
per second of each and the ratio generation / step (> 1: generation is the slower). An ensemble of N members
trains on each batch once for all of them, so generation keeps up where N steps take as long as one draw.
With `--trained BASELINE MFR` (two finished runs on the preset, e.g. a replicate's two arms in `mfr-sae study
--data synthsaebench-16k`): each run's own training step (the ensemble, its AuxK, MFR's penalty and matching as they
stand at the end of its training: confirmed latents pulled), resumed from a copy of its last checkpoint (the runs
are left as they are) and timed in turn with the draw that feeds it: MFR's cost once active, as a ratio to the
baseline's step, and each run's training throughput (draw + step).
Last, what the benchmark's metrics cost at this size (gt_metrics: every latent's best match, and the Hungarian
matching of MCC) for one decoder of `--h` rows near true features.

    python bench/synthsaebench.py [--preset synthsaebench-16k] [--steps 5] [--batch 1024] [--h 4096] [--k 25]
        [--threads N] [--exact] [--device cpu] [--trained BASELINE_RUN MFR_RUN]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import timed_side_by_side  # bench/timing.py

from mfr_sae.checkpoint import CHECKPOINT_DIR
from mfr_sae.config import load_run_config
from mfr_sae.data.synthsaebench import PRESETS, SynthSAEBenchData, build_model, synthsaebench_config
from mfr_sae.gt_metrics import best_matches, mcc
from mfr_sae.run_folder import CONFIG_FILE
from mfr_sae.seeding import TRAIN_STREAM
from mfr_sae.train import Trainer


def topk_step(d: int, h: int, k: int, batch: int, device: torch.device):
    """One training step of a plain TopK SAE (the reference), as a closure over its state."""
    gen = torch.Generator(device=device).manual_seed(0)
    w_enc = (torch.randn(h, d, generator=gen, device=device) / d**0.5).requires_grad_()
    w_dec = (torch.randn(h, d, generator=gen, device=device) / d**0.5).requires_grad_()
    b_enc = torch.zeros(h, device=device, requires_grad=True)
    b_dec = torch.zeros(d, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=3e-4)
    x = torch.randn(batch, d, generator=gen, device=device)

    def step() -> None:
        pre = (x - b_dec) @ w_enc.T + b_enc
        values, index = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, index, values.relu())
        loss = ((codes @ w_dec + b_dec) - x).pow(2).sum(dim=1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def trained_step(run_dir: Path, scratch: Path) -> tuple[Callable[[], None], str]:
    """A finished run's training step from its last checkpoint, resumed in a copy under `scratch` (the run is left
    as it is), on fresh batches of its own stream; and what it is."""
    copy = Path(tempfile.mkdtemp(dir=scratch)) / run_dir.name
    copy.mkdir()
    shutil.copy(run_dir / CONFIG_FILE, copy / CONFIG_FILE)
    shutil.copytree(run_dir / CHECKPOINT_DIR, copy / CHECKPOINT_DIR)
    cfg = load_run_config(copy / CONFIG_FILE)
    trainer = Trainer(cfg, copy, resume=True, progress=False)
    batches = trainer.source.batches(cfg.train.batch_size, trainer.step)
    what = (
        f"{cfg.sae.n_members} {cfg.sae.architecture} members, h {cfg.sae.d_sae}, k {cfg.sae.k}, aux_coef "
        f"{cfg.sae.aux_coef}, MFR {'on' if cfg.mfr.enabled else 'off'}, batch {cfg.train.batch_size}, "
        f"from step {trainer.step}"
    )
    return (lambda: trainer.train_step(next(batches).to(trainer.device))), what


def trained_rows(runs: list[Path], steps: int, device: torch.device) -> None:
    """The baseline's and MFR's training steps (draw included) side by side, and their ratio."""
    with tempfile.TemporaryDirectory() as scratch:
        (base, base_what), (mfr, mfr_what) = (trained_step(run, Path(scratch)) for run in runs)
        base(), mfr()  # the first step pays the re-matching of restored matches and the allocator's warm-up
        seconds = timed_side_by_side({"baseline": base, "MFR": mfr}, steps, device)
    print(f"\ntrained runs, each step with its draw ({steps} steps each, in turn):")
    print(f"- baseline ({base_what}): {seconds['baseline']:.3f} s a step")
    print(f"- MFR ({mfr_what}): {seconds['MFR']:.3f} s a step")
    print(f"MFR / baseline, draw and step: {seconds['MFR'] / seconds['baseline']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="synthsaebench-16k", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--h", type=int, default=4096)
    parser.add_argument("--k", type=int, default=25)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--exact", action="store_true", help="also time sae-lens's own build of the model")
    parser.add_argument("--trained", nargs=2, type=Path, metavar=("BASELINE_RUN", "MFR_RUN"), help="two finished runs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch threads, load average "
        f"{load:.1f} at the start, torch {torch.__version__}, device {device}\n"
    )
    cfg = synthsaebench_config(args.preset)
    start = time.perf_counter()
    source = SynthSAEBenchData(args.preset, device=device)
    print(f"{args.preset}: {cfg.num_features} features in {cfg.hidden_dim} dimensions")
    print(f"build (written-out orthogonalisation): {time.perf_counter() - start:.1f} s")
    if args.exact:
        start = time.perf_counter()
        build_model(cfg, device, exact=True)
        print(f"build (sae-lens's orthogonalisation): {time.perf_counter() - start:.1f} s")

    model, batch = source.model, args.batch
    index = iter(range(10**9))  # a fresh batch every call
    step = topk_step(source.d, args.h, args.k, batch, device)

    seconds = timed_side_by_side(
        {
            "draw": lambda: source.sample(batch, TRAIN_STREAM, next(index)),
            "activations": lambda: model.activation_generator.sample(batch),
            "sae-lens": lambda: model.sample_with_features(batch),
            "step": step,
        },
        args.steps,
        device,
    )
    print(f"\n| batch {batch} | s a batch | vectors / s |")
    print("|---|---|---|")
    labels = {
        "draw": "draw (SynthSAEBenchData.sample: sae-lens's activations, vectors summed over the active features)",
        "activations": "  its true activations alone (sae-lens's activation_generator.sample)",
        "sae-lens": "sae-lens's own draw (SyntheticModel.sample_with_features: a dense product for the vectors)",
        "step": f"TopK SAE step (h {args.h}, k {args.k}, d {source.d})",
    }
    for name, label in labels.items():
        print(f"| {label} | {seconds[name]:.3f} | {batch / seconds[name]:,.0f} |")
    ratio = seconds["draw"] / seconds["step"]
    print(f"\ngeneration / step: {ratio:.2f} ({'slower' if ratio > 1 else 'faster'} than the step it feeds)")
    members = math.ceil(ratio)
    print(f"an ensemble of {members} or more such members trains on a batch at least as long as it takes to draw")

    gen = torch.Generator().manual_seed(0)
    truth = source.ground_truth.cpu()
    near = truth[torch.randperm(len(truth), generator=gen)[: args.h]]
    decoder = torch.nn.functional.normalize(near + 0.5 * torch.randn(near.shape, generator=gen) / source.d**0.5, dim=1)
    start = time.perf_counter()
    best_matches(decoder, truth)
    middle = time.perf_counter()
    value = mcc(decoder, truth)
    end = time.perf_counter()
    print(
        f"metrics of one decoder of {args.h} rows against {len(truth)} features: best matches "
        f"{middle - start:.1f} s, MCC (Hungarian) {end - middle:.1f} s (MCC {value:.3f})"
    )
    if args.trained:
        trained_rows(args.trained, args.steps, device)


if __name__ == "__main__":
    main()
