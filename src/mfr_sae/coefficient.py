"""The MFR penalty's coefficient beta * w(t) (docs/design.md section 4): w(t) a cosine warmup, and beta given,
`auto` (the paper: set at the first step so that the penalty equals the mean reconstruction loss of the members,
times a factor with `0.02*auto`, and kept), or `recon`: beta_t = factor x (running mean of the reconstruction
loss) / (1 - MMCS at the first step), so that the penalty keeps its weight against the reconstruction loss while
that loss falls by orders of magnitude during training.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch import Tensor

from mfr_sae.config import ConfigError, MFRConfig, beta_parts

RECON_MEAN_RATE = 0.01  # beta=recon: the running mean of the reconstruction loss spans about 100 steps


def warmup_weight(step: int, warmup_steps: int) -> float:
    """Cosine ramp from 0 to 1: 0.5 * (1 - cos(pi * t / W)) for t < W, then 1."""
    if step >= warmup_steps:
        return 1.0
    return 0.5 * (1 - math.cos(math.pi * step / warmup_steps))


class Coefficient:
    """beta and what sets it: its kind and factor (mfr.beta) and, for recon, the distance 1 - MMCS at the first
    step and the running mean of the reconstruction loss. The same on every rank."""

    def __init__(self, cfg: MFRConfig):
        self.cfg = cfg
        self.beta_factor, self.beta_kind = beta_parts(cfg.beta) or (1.0, "auto")
        # beta: None until auto or recon sets it at the first step (recon: anew every step)
        self.beta: float | None = self.beta_factor if cfg.enabled and self.beta_kind == "fixed" else None
        self.start_distance: float | None = None  # recon: 1 - MMCS at the first step
        self.recon_mean: float | None = None  # recon: running mean of the members' reconstruction loss

    def beta_at(self, distance: Tensor, recon_loss: Callable[[], float]) -> float:
        """beta at a step whose distance 1 - MMCS is taken: set first where auto (at the first step) or recon
        (every step) sets it. recon_loss: the mean reconstruction loss of all members (asked for once by
        beta=auto, every step by recon)."""
        if self.beta_kind == "recon":
            self.beta = self._recon_beta(distance.item(), recon_loss())
        elif self.beta is None:
            self.beta = self._auto_beta(distance.item(), recon_loss)
        return self.beta

    def known(self) -> bool:
        """Whether beta is known at a step whose distance is not taken (`beta_between`)."""
        return self.beta is not None and (self.beta_kind != "recon" or self.start_distance is not None)

    def beta_between(self, recon_loss: Callable[[], float]) -> float:
        """beta at a step whose distance is not taken, once `known`: recon's running mean goes on."""
        if self.beta_kind == "recon":  # its running mean goes on every step
            self.beta = self._recon_beta(0.0, recon_loss())
        assert self.beta is not None  # `known`
        return self.beta

    def _auto_beta(self, distance: float, recon_loss: Callable[[], float]) -> float:
        """beta=auto: the penalty equals the reconstruction loss at the start (times beta_factor)."""
        return self.beta_factor * recon_loss() / self._first_distance(distance)

    def _recon_beta(self, distance: float, recon_loss: float) -> float:
        """beta=recon: beta_factor x the running mean of the reconstruction loss (about the last 100 steps) over
        the distance at the first step."""
        if self.start_distance is None:
            self.start_distance = self._first_distance(distance)
        mean = self.recon_mean
        self.recon_mean = recon_loss if mean is None else mean + RECON_MEAN_RATE * (recon_loss - mean)
        return self.beta_factor * self.recon_mean / self.start_distance

    def _first_distance(self, distance: float) -> float:
        """1 - MMCS at the first step, which auto and recon divide by."""
        if distance <= 1e-8:
            raise ConfigError(
                f"mfr.beta={self.cfg.beta}: the members start identical (pairwise MMCS = 1), "
                "so no beta makes the penalty equal the loss; set mfr.beta to a number"
            )
        return distance

    def state(self) -> dict[str, Any]:
        return {"beta": self.beta, "beta_start_distance": self.start_distance, "recon_mean": self.recon_mean}

    def load_state(self, meta: dict[str, Any]) -> None:
        self.beta = meta["beta"]
        self.start_distance, self.recon_mean = meta.get("beta_start_distance"), meta.get("recon_mean")
