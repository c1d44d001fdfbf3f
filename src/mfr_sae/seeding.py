"""Seeded random streams: every random draw of a run is a function of (seed, stream, index...).

So a resumed run, or one process of several, draws exactly what one uninterrupted run would. The stream
numbers below keep the draws of different purposes independent; they are listed together so that a new
one does not reuse an old one (changing one changes every run's numbers).
"""

from __future__ import annotations

import numpy as np
import torch

TRAIN_STREAM, EVAL_STREAM, FEATURE_STREAM = 0, 1, 2  # synthetic data: samples, held-out samples, features
INIT_STREAM = 7  # ensemble: a member's (re)initialisation
CHUNK_ORDER_STREAM, BUFFER_STREAM = 10, 11  # vectors: order of the chunks per epoch, rows within a buffer
EEG_ORDER_STREAM, EEG_TRAIN_NOISE, EEG_EVAL_NOISE = 30, 31, 32  # eeg: window order, noise (numpy's generator)


def seeded_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator whose state is a hash of the integers in key."""
    seed = int(np.random.SeedSequence(list(key)).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)
