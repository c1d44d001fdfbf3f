"""What a run measures and reports, on the objects the trainer trains (the ensemble, its latents' firing
history, the MFR state): each evaluation (every member's metrics, and the loss recovered on an activation
cache's model), the log line of a step, and at the end what results.json holds."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mfr_sae.config import RunConfig
from mfr_sae.consensus import consensus_decoder
from mfr_sae.data import TrueActivations, VectorSource, split_batch
from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble
from mfr_sae.firing import LatentFiring, dead_frac_note, dead_measured
from mfr_sae.gt_metrics import decoder_scores, evaluate_ground_truth
from mfr_sae.lm_eval import add_loss_recovered
from mfr_sae.metrics import evaluate
from mfr_sae.mfr import MutualRegularizer
from mfr_sae.mmcs import pairwise_mmcs

# the penalty's values that a log line carries (MutualRegularizer.penalty's)
PENALTY_LOGS = ("penalty", "penalty_weight", "beta_effective", "pairwise_mmcs", "pulled_frac", "confirmed_frac")


class RunReport:
    """The numbers of one run's members, all gathered from the processes that hold them."""

    def __init__(
        self,
        cfg: RunConfig,
        shard: Shard,
        device: torch.device,
        source: VectorSource,
        ground_truth: Tensor | None,
        ground_truth_layout: str | None,
        ensemble: Ensemble,
        firing: LatentFiring,
        mfr: MutualRegularizer,
        progress: bool = True,
    ):
        """ground_truth: the true features the members are scored against (or None); ground_truth_layout: how
        eval.ground_truth's file was read (None for the source's own)."""
        self.cfg, self.shard, self.device, self.source, self.progress = cfg, shard, device, source, progress
        self.ground_truth, self.ground_truth_layout = ground_truth, ground_truth_layout
        self.ensemble, self.firing, self.mfr = ensemble, firing, mfr
        self.firing_prob: Tensor | None = None  # [N, h], from the last evaluation
        self._agreement: tuple[int, dict[str, float | None]] | None = None  # (step, pairwise_mmcs) last measured
        self.true_l0: float | None = None  # the held-out samples' (benchmark sources only)
        self.benchmark_truth: Tensor | None = None  # the features the benchmark's metrics were measured against

    def evaluate(self, lm: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Every member's metrics, in member order (each rank scores its own), and with `lm` the loss
        recovered on an activation cache's model."""
        if not hasattr(self, "_eval_batch"):
            self._eval_batch = split_batch(self.source.eval_vectors(self.cfg.eval.n_samples))
        x, target = self._eval_batch
        with self.ensemble.as_saved() as ensemble:  # what results.json reports: the members as saved
            members, firing_prob = evaluate(
                ensemble,
                x,
                self.ground_truth,
                self.firing.dead_mask(),
                self.cfg.eval.recovered_threshold,
                self.cfg.eval.batch_size,
                None if target is x else target,
                self._dead_measured()[self.shard.start : self.shard.stop],
            )
            lm_result = add_loss_recovered(self.cfg, ensemble, members, self.device, self.progress) if lm else None
            self._add_benchmark_metrics(ensemble, members)
        self.firing_prob = self.shard.gather(firing_prob.to(self.device)).cpu()  # NCCL sends CUDA tensors only
        return [m for part in self.shard.gather_objects(members) for m in part], lm_result

    def _add_benchmark_metrics(self, ensemble: Ensemble, members: list[dict[str, Any]]) -> None:
        """SynthSAEBench's metrics of each member (gt_metrics.py: gt_f1, gt_uniqueness, ...) on the held-out
        samples, where the source knows their true feature activations; the run's true L0 beside them."""
        if not isinstance(self.source, TrueActivations):
            return

        def forward(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            out = ensemble(x)
            return out.x_hat, out.acts, out.idx

        held_out = self.source.held_out(self.cfg.eval.n_samples)
        # the source's own features: its true activations index them (eval.ground_truth does not replace them here)
        self.benchmark_truth = self.source.ground_truth
        # gt_mcc is already measured against these features unless eval.ground_truth named others: not matched twice
        same = self.ground_truth is not None and torch.equal(
            self.ground_truth.to(self.benchmark_truth), self.benchmark_truth
        )
        known = [member["gt_mcc"] for member in members] if same else None
        scores = evaluate_ground_truth(forward, ensemble.decoder(), self.benchmark_truth, held_out.batches(), known)
        for member, score in zip(members, scores):
            member.update(score.member_results())
        self.true_l0 = scores[0].true_l0

    def consensus(self) -> dict[str, float] | None:
        """MCC and uniqueness of the ensemble's consensus decoder (consensus.py) where the benchmark's metrics
        are measured; computed on rank 0 and sent to the others (a collective: every rank calls it)."""
        truth = self.benchmark_truth
        if truth is None or self.shard.n_members < 2:
            return None
        decoders = self.shard.gather_to_main(self.ensemble.decoder().detach())
        scores = None if decoders is None else decoder_scores(consensus_decoder(decoders.to(self.device))[0], truth)
        return dict(self.shard.gather_objects(scores)[0])

    def log_record(self, step: int, logs: dict[str, Any]) -> dict[str, Any]:
        """The log line of this step, all members' numbers (gathered from the ranks); logs: `train_step`'s."""
        mse, l0 = self.shard.gather_sum(torch.stack([logs["mse"], logs["l0"]], dim=1)).T
        dead = self.shard.gather(self.firing.dead_mask().float().mean(-1)).tolist()
        aux = self.shard.gather_sum(logs["aux_loss"]) if "aux_loss" in logs else None
        aux_part = 0.0 if aux is None else self.cfg.sae.aux_coef * aux.mean().item()
        return {
            "step": step,
            "samples": step * self.cfg.train.batch_size,
            "loss": (mse.sum() / self.shard.n_members).item() + logs.get("penalty", 0.0) + aux_part,
            "mse": mse.tolist(),
            "l0": l0.tolist(),
            **({} if aux is None else {"aux_loss": aux.tolist()}),
            **{k: logs[k] for k in PENALTY_LOGS if k in logs},
            **self.mfr.match_log(),
            "dead_frac": [d if measured else None for d, measured in zip(dead, self._dead_measured())],
        }

    def results(
        self, step: int, seconds: float, members: list[dict[str, Any]], lm: dict[str, Any] | None
    ) -> dict[str, Any]:
        """What results.json holds, after `step` steps in `seconds`; members and lm: the final `evaluate`."""
        cfg = self.cfg
        return {
            "steps": step,
            "samples": step * cfg.train.batch_size,
            "train_seconds": round(seconds, 3),
            "mfr": cfg.mfr.enabled,
            **(agreement := self.pairwise_mmcs(step)),
            **collapse_report(agreement["pairwise_mmcs_hungarian"]),
            "beta": self.mfr.beta,
            "reinit_events": self.mfr.events,
            "reinit_count": self.mfr.attempts,
            "lm": lm,
            "ground_truth": None
            if self.ground_truth is None
            else {
                "source": cfg.eval.ground_truth or cfg.data.kind,
                "n_true": len(self.ground_truth),
                "layout": self.ground_truth_layout,
            },
            **({} if self.true_l0 is None else {"true_l0": self.true_l0, "consensus": self.consensus()}),
            "dead_frac_note": dead_frac_note(
                [m["member"] for m in members if m["dead_frac"] is None],
                step * cfg.train.batch_size,
                cfg.eval.dead_window,
            ),
            "members": members,
            "config": cfg.to_dict(),
        }

    def pairwise_mmcs(self, step: int) -> dict[str, float | None]:
        """pairwise_mmcs (`max` and one-to-one) of all members at `step`, computed on rank 0 and sent to the
        others (a collective: every rank calls it); kept for a second call at the same step."""
        if self._agreement is not None and self._agreement[0] == step:
            return self._agreement[1]
        decoders = self.shard.gather_to_main(self.ensemble.decoder().detach())
        measured: dict[str, float | None] = self.shard.gather_objects(
            None if decoders is None else pairwise_mmcs(decoders.to(self.device))
        )[0]
        self._agreement = (step, measured)
        return measured

    def _dead_measured(self) -> list[bool]:
        return dead_measured(self.mfr.steps_since_init, self.cfg.train.batch_size, self.cfg.eval.dead_window)


# members whose one-to-one agreement passes this are copies of one another, not an ensemble
COLLAPSE_MMCS = 0.99


def collapse_report(one_to_one_mmcs: float | None) -> dict[str, Any]:
    """results.json's `collapsed` (the members' mean one-to-one MMCS above COLLAPSE_MMCS) and, when they are,
    a note saying so."""
    collapsed = one_to_one_mmcs is not None and one_to_one_mmcs > COLLAPSE_MMCS
    note = (
        f"the members collapsed into copies of one another (one-to-one pairwise MMCS {one_to_one_mmcs:.4f} > "
        f"{COLLAPSE_MMCS}): an ensemble of one SAE; compare it with the baseline (mfr.enabled=false) before "
        "using it, or lower mfr.beta"
        if collapsed
        else None
    )
    return {"collapsed": collapsed, "collapse_note": note}
