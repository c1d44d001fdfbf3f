"""Cost of `mfr-sae browse`'s one pass over a cache, as a ratio to the encoder alone over the same rows.

Writes a cache-like file of random rows (d=576, SmolLM2's hook width), then times, in one run on this machine,
(1) the ensemble's encoder over every row (`Ensemble.encode`: the product and the top-k, which any pass over
the cache pays) and (2) `browse.collect` over the same rows (the encoder plus firing counts, histograms and
each latent's running top contexts), then (3) `browse.window_activations` (each top context's latent on the
tokens around it: one dot product per token). Issue 29 asks for the pass to run at the speed of the encoder
product and to fit 3 members x 16,384 latents x 10 million tokens in a few GB: its memory is N h CONTEXTS
entries and 4 N bytes a row (each row's smallest kept activation), both printed here.

    python bench/browse.py [--rows 200000] [--h 16384] [--members 3] [--k 32]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mfr_sae.browse import CONTEXTS, HISTOGRAM_BINS, collect, window_activations
from mfr_sae.data.vectors import VectorsData
from mfr_sae.ensemble import Ensemble

D, CONTEXT = 576, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--h", type=int, default=16384)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--k", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"setting: {args.rows} rows of d={D}, {args.members} members x h={args.h}, k={args.k}, fp32\n")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.npy"
        np.save(path, np.random.default_rng(0).standard_normal((args.rows, D), dtype=np.float32))
        cache = VectorsData(path, holdout=1)
        ensemble = Ensemble(D, args.h, [args.k] * args.members).eval()
        start = time.perf_counter()
        with torch.no_grad():
            for first in range(0, args.rows, 4096):
                ensemble.encode(cache.read_rows(first, min(first + 4096, args.rows)))
        encoder = time.perf_counter() - start
        start = time.perf_counter()
        stats = collect(ensemble, cache, args.rows, progress=False)
        one_pass = time.perf_counter() - start
        start = time.perf_counter()
        window_activations(ensemble, cache, stats, CONTEXT)
        windows = time.perf_counter() - start
    n_latents = args.members * args.h
    kept_mb = n_latents * (CONTEXTS * 12 + HISTOGRAM_BINS * 4 + 12) / 2**20
    print(f"encoder over every row (the floor):     {encoder:8.1f} s")
    print(f"browse.collect, one pass:               {one_pass:8.1f} s   {one_pass / encoder:.2f}x the encoder")
    print(f"browse.window_activations, top windows: {windows:8.1f} s   {windows / encoder:.2f}x the encoder")
    print(f"what the pass keeps, whatever the rows: {kept_mb:.0f} MB ({CONTEXTS} contexts, {HISTOGRAM_BINS} bins each)")
    print(f"and per row: {4 * args.members} bytes ({4 * args.members * 10_000_000 / 2**20:.0f} MB for 10M rows)")


if __name__ == "__main__":
    main()
