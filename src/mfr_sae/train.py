"""The one training loop: baseline and MFR ensembles, any source of vectors, resumable.

Each step: one batch shared by all members -> per-member MSE (mean over batch and dimensions) ->
objective = mean over members of their MSE (+ the MFR penalty when enabled) -> AdamW. Every member's
gradient from the MSE term is exactly what it would get if trained alone.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mfr_sae import checkpoint as ckpt
from mfr_sae import process_group
from mfr_sae.auxk import auxk_loss
from mfr_sae.config import ConfigError, RunConfig, load_run_config
from mfr_sae.data import VectorSource, run_source, split_batch
from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble
from mfr_sae.files import read_json, refused_write, write_json
from mfr_sae.firing import LatentFiring
from mfr_sae.kernels import member_mse
from mfr_sae.mfr import MutualRegularizer
from mfr_sae.run_folder import (
    CONFIG_FILE,
    METRICS_FILE,
    RESULTS_FILE,
    TrainingError,
    is_finished,
    locked,
    remove_failed_start,
    start_new_run,
    truncate_metrics,
)
from mfr_sae.run_log import RunLog, TrainingProgress, require_wandb
from mfr_sae.run_report import RunReport
from mfr_sae.trainer_state import restore_training, save_training


class Interrupted(Exception):
    """Training was stopped by the user (Ctrl-C); nothing was saved since the last checkpoint."""

    def __init__(self, step: int, run_dir: str | Path, saved_step: int | None = None):
        self.step, self.run_dir = step, Path(run_dir)
        resume = f"`mfr-sae train --resume {run_dir}`"
        super().__init__(
            f"interrupted at step {step}; {resume} goes on from the checkpoint of step {saved_step}"
            if saved_step is not None
            else f"interrupted at step {step}, before the first checkpoint: {resume} starts again from step 0"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


class Trainer:
    """Holds the ensemble, optimiser and counters of one run; `fit()` trains to the end."""

    def __init__(
        self,
        cfg: RunConfig,
        run_dir: str | Path,
        source: VectorSource | None = None,
        resume: bool = False,
        progress: bool = True,
        overwrite: bool = False,
    ):
        """overwrite: a new run in a folder that holds another clears that run's files (`run_paths`) first,
        once everything else has been checked; without it such a folder is an error."""
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.created: list[Path] = []  # what this process created for a new run (removed if it fails early)
        rank, world, self.device = process_group.init(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
        self.shard = Shard(len(cfg.ks), rank, world)
        require_wandb(cfg.train.wandb_project)
        self.source, truth, layout = run_source(cfg, self.device, source)
        self.ensemble = self._new_ensemble(self.shard.members, self.device)
        # fused: one pass over parameters, gradients and moments (bench/RESULTS.md)
        self.optimizer = torch.optim.AdamW(
            self.ensemble.parameters(),
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            fused=self.device.type in ("cpu", "cuda"),
        )
        self.firing = LatentFiring(len(self.shard.members), cfg.sae.d_sae, cfg.eval.dead_window, self.device)
        self.mfr = MutualRegularizer(cfg.mfr, cfg.ks, self.shard, torch.bfloat16 if cfg.train.autocast else None)
        self.report = RunReport(
            cfg, self.shard, self.device, self.source, truth, layout, self.ensemble, self.firing, self.mfr, progress
        )
        self.step = 0
        try:
            self.saved_step: int | None = None  # the step of the last checkpoint written or read
            if resume:
                self._restore()
            else:
                self.created = start_new_run(self.run_dir, cfg, self.shard, overwrite)
        except Exception as err:  # each rank reads its own members: the others are told why it stopped
            process_group.report_failure(err)
            raise
        self.shard.barrier()  # every rank is ready (with NCCL, the first collective must span all ranks)

    def _new_ensemble(self, members: list[int], device: torch.device) -> Ensemble:
        cfg = self.cfg
        return Ensemble(
            cfg.data.d,
            cfg.sae.d_sae,
            [cfg.ks[i] for i in members],
            cfg.sae.tied,
            cfg.sae.decoder_bias,
            seed=cfg.train.seed,
            member_ids=members,
            device=device,
            shared_init=cfg.sae.shared_init,
            architecture=cfg.sae.architecture,
            architecture_options=cfg.sae.options,
        )

    # ------------------------------------------------------------------ run folder and resume

    def _restore(self) -> None:
        folder = ckpt.checkpoint_dir(self.run_dir)
        if folder is None:  # killed before the first checkpoint: start over in place
            if self.shard.is_main:
                print(f"{self.run_dir}: no checkpoint yet, starting again from step 0", file=sys.stderr)
            (self.run_dir / METRICS_FILE).write_text("")
            return
        self.step = self.saved_step = restore_training(
            folder, self.shard, self.device, self.ensemble, self.optimizer, self.firing, self.mfr
        )
        self.shard.barrier()  # every rank has read before rank 0 truncates the log
        if self.shard.is_main:
            truncate_metrics(self.run_dir / METRICS_FILE, self.step)

    def save(self) -> None:
        """Write the checkpoint of all N members (gathered to rank 0, which writes it)."""
        save_training(
            self.run_dir,
            self.shard,
            self.ensemble,
            self._new_ensemble,
            self.optimizer,
            self.firing,
            self.mfr,
            self.step,
            self.report.firing_prob,
        )
        self.saved_step = self.step

    # ------------------------------------------------------------------ training

    def train_step(self, x: Tensor, target: Tensor | None = None) -> dict[str, Any]:
        """One step on input x; the loss is against `target` (denoising) or x itself. Returns this rank's
        numbers as they are (`RunReport.log_record` gathers them, at log steps only): the MSE and L0 of its
        members [n] on its slice of the batch (weighted by the slice's share), the penalty's values (all
        members'), inside the reinitialisation window the metric of its members [n], and reinitialisation
        events. In one process, every member's."""
        target = x if target is None else target
        if not (all_finite(x) and (target is x or all_finite(target))):
            raise TrainingError(f"training batch of step {self.step} holds NaN or inf")
        rows = self.shard.batch_rows(len(x))  # data parallel: this replica's slice; else the whole batch
        share = (rows.stop - rows.start) / len(x)
        self.mfr.prefetch(self.ensemble.decoder_weight)  # the decoders travel while this rank encodes
        sae = self.cfg.sae
        dead = self.firing.idle_mask(sae.aux_dead_window) if sae.aux_coef else None  # AuxK's latents
        dead_latents = dead.flatten().nonzero().squeeze(1) if dead is not None else None
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.train.autocast):
            out = self.ensemble(x[rows], dead_latents)  # (which reads their pre-activations on the way)
        acts, idx = out.acts, out.idx
        self.ensemble.architecture.after_step(self.ensemble, acts, self.shard)  # e.g. BatchTopK's threshold
        n_members = self.shard.n_members
        if out.prefixes is None:
            mse = fit = member_mse(out.x_hat.float(), target[rows]) * share  # this slice's part
        else:  # Matryoshka: the mean over prefixes of their MSE; the last is the whole reconstruction's
            errors = torch.stack([member_mse(prefix.float(), target[rows]) for prefix in out.prefixes]) * share
            mse, fit = errors[-1], errors.mean(0)
        loss = fit.sum() / n_members  # this rank's part of the mean over all members
        logs: dict[str, Any] = {"mse": mse.detach()}
        if dead is not None:  # AuxK: dead latents reconstruct what their member leaves over
            residual = target[rows] - out.x_hat.detach().float()
            k_aux = sae.aux_k or self.cfg.data.d // 2
            aux = auxk_loss(self.ensemble, x[rows], residual, dead, k_aux, out.read_pre) * share
            loss = loss + sae.aux_coef * aux.sum() / n_members
            logs["aux_loss"] = aux.detach()
        if self.mfr.penalty_on:  # on the decoders of all members; the gradient reaches this rank's own
            penalty, values = self.mfr.penalty(
                self.ensemble.decoder_weight,
                self.step,
                lambda: (self.shard.gather_sum(mse.detach()).sum() / n_members).item(),
                self.firing.idle_mask(self.cfg.mfr.idle_window) if self.cfg.mfr.idle_window else None,
                value=self._logs_at(self.step + 1),
            )
            logs.update(values)
            if self.shard.replica == 0:  # once per member: the replicas' gradients are summed
                loss = loss + penalty
        if not torch.isfinite(loss):
            raise TrainingError(
                f"loss became {loss.item()} at step {self.step} (try a lower train.lr); the last checkpoint is intact"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.shard.reduce_gradients(self.ensemble.parameters())
        self.optimizer.step()
        self.ensemble.renormalize_decoder()
        counts = self.firing.count(acts, idx, len(x), self.shard)
        chosen, metric = self.mfr.reinit_check(self.step, counts, len(x))
        if metric is not None:
            logs["reinit_metric"] = metric
        for n in chosen:
            self._reinit_member(n)
        if chosen:
            logs["reinit"] = self.mfr.events[-len(chosen) :]
        self.step += 1
        logs["l0"] = (acts > 0).sum(-1).float().mean(-1) * share
        return logs

    @torch.no_grad()
    def _reinit_member(self, n: int) -> None:
        """Fresh weights for member n (global index; on the rank that holds it, seeded by its attempt number)
        and its AdamW moments zeroed."""
        if n not in self.shard.members:
            return
        local = n - self.shard.start
        self.firing.reset(local)
        self.ensemble.reset_member(local, attempt=self.mfr.attempts[n])
        for param in self.ensemble.parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in self.optimizer.state.get(param, {}):
                    self.optimizer.state[param][key][local].zero_()

    def fit(self) -> dict[str, Any]:
        """Train to the end; an error that stops this rank is left for the others to name (process_group).
        Ctrl-C raises `Interrupted` (nothing saved since the last checkpoint: `resume` goes on from it); a new
        run that fails before its first checkpoint removes what it created (a retry is not blocked). A write
        the file system refuses (a full disk...: `refused_write`) is a TrainingError naming the file, the cause
        and how to go on."""
        try:
            return self._fit()
        except KeyboardInterrupt:
            interrupted = Interrupted(self.step, self.run_dir, self.saved_step)
            process_group.report_failure(interrupted)
            raise interrupted from None
        except Exception as err:
            process_group.report_failure(err)
            if self.shard.is_main and not isinstance(err, Interrupted):
                with contextlib.suppress(OSError):  # the error that stopped the run is the one to see
                    remove_failed_start(self.run_dir, self.created)
                    self.created = []
            line = refused_write(err)
            if line is not None:
                raise TrainingError(f"{line} ({self._after_refused_write()})") from err
            raise

    def first_line(self) -> str:
        """What is trained, and whether with MFR: plain `mfr-sae train` trains the baseline."""
        cfg = self.cfg
        ks = sorted(set(cfg.ks))
        what = (
            f"{'resuming' if self.step else 'training'} {self.run_dir} from step {self.step} of {cfg.n_steps}: "
            f"{cfg.sae.n_members} {cfg.sae.architecture} SAEs of {cfg.sae.d_sae} latents, k {'/'.join(map(str, ks))}"
        )
        if cfg.mfr.enabled:
            return f"{what}; MFR on (mfr.*)"
        return f"{what}; MFR off: the baseline (--set mfr.enabled=true trains with MFR)"

    def _after_refused_write(self) -> str:
        """What a run stopped by a refused write kept, and how to go on: said after the cleanup of `fit`."""
        fix = "free space on that disk (or make it writable)"
        resume = f"`mfr-sae train --resume {self.run_dir}`"
        if self.saved_step is not None:  # a checkpoint is replaced only whole (save_checkpoint)
            return f"the checkpoint of step {self.saved_step} is intact: {fix}, then {resume} goes on from it"
        if (self.run_dir / CONFIG_FILE).is_file():
            return f"no checkpoint yet: {fix}, then {resume} starts again from step 0"
        return f"no checkpoint yet, and this run's files were removed: {fix}, then run the same command again"

    def _fit(self) -> dict[str, Any]:
        started = time.perf_counter()
        if self.shard.is_main:
            print(self.first_line(), flush=True)  # (stdout: an error stays the one line on stderr)
        log = RunLog(self.run_dir / METRICS_FILE, self.shard, self.cfg.train.wandb_project, self.cfg.to_dict())
        try:
            members, lm = self._train_to_end(log)
            self.save()
            results = self.report.results(self.step, time.perf_counter() - started, members, lm)
            if self.shard.is_main:
                write_json(self.run_dir / RESULTS_FILE, results)
        finally:
            log.close()
        return results

    def _logs_at(self, step: int) -> bool:
        """Whether the step that ends at `step` writes a log line (with the penalty's value)."""
        return step % self.cfg.train.log_every == 0 or step == self.cfg.n_steps

    def _train_to_end(self, log: RunLog) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """The steps left, with their log lines, evaluations and checkpoints; then the final evaluation."""
        cfg, n_steps = self.cfg, self.cfg.n_steps
        batches = self.source.batches(cfg.train.batch_size, self.step)
        bar = TrainingProgress(self.step, n_steps, cfg.train.batch_size, self.progress and self.shard.is_main)
        try:  # the bar is closed before any error (or Ctrl-C) propagates: the error is the last thing shown
            while self.step < n_steps:
                x, target = split_batch(next(batches))
                logs = self.train_step(x.to(self.device), None if target is x else target.to(self.device))
                bar.step_done(self.step)
                log.add_window_line(self.step, logs)
                if self._logs_at(self.step):
                    record = self.report.log_record(self.step, logs)
                    log.write(record)
                    bar.show_record(record)
                if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < n_steps:
                    members = self.report.evaluate()[0]
                    log.write({"step": self.step, "eval": members, **self.report.pairwise_mmcs(self.step)})
                if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                    log.write(None)  # the window lines up to the checkpoint
                    log.flush()
                    self.save()
            bar.close()
            members, lm = self.report.evaluate(lm=True)
            agreement = self.report.pairwise_mmcs(self.step)
            log.write({"step": self.step, "eval": members, **agreement, **({"lm": lm} if lm else {})})
        finally:
            bar.close()
        return members, lm


def train(
    cfg: RunConfig, out: str | Path, source: VectorSource | None = None, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train a new run in folder `out`; returns what results.json holds. A folder that holds another run is an
    error, or with `overwrite` is cleared of that run's files (`run_paths`, nothing else) once the new config
    and data source are checked."""
    with locked(Path(out)):
        return Trainer(cfg.validate(), out, source, progress=progress, overwrite=overwrite).fit()


def resume(run_dir: str | Path, source: VectorSource | None = None, progress: bool = True) -> dict[str, Any]:
    """Continue a run from its last checkpoint (same config, same data stream) to the end. A finished run
    (results.json, and the checkpoint at the last step) is left as it is: its results are returned (a requeue
    loop that resumes until done sees success)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise TrainingError(f"cannot resume: {run_dir / CONFIG_FILE} not found")
    cfg = load_run_config(run_dir / CONFIG_FILE)
    with locked(run_dir):
        if is_finished(run_dir, cfg.n_steps):
            if process_group.world_from_env()[0] == 0:
                print(f"{run_dir} is finished ({RESULTS_FILE}); nothing to resume", file=sys.stderr)
            return dict(read_json(run_dir / RESULTS_FILE))
        return Trainer(cfg, run_dir, source, resume=True, progress=progress).fit()


def all_finite(x: Tensor) -> bool:
    """No NaN or inf in x: a finite sum proves it (one reduction), else every element is checked (a sum of
    finite values can overflow)."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())
