"""The one training loop: baseline and MFR ensembles, any source of vectors, resumable.

Each step: one batch shared by all members -> per-member MSE (mean over batch and dimensions) ->
objective = mean over members of their MSE (+ the MFR penalty when enabled) -> AdamW. Every member's
gradient from the MSE term is exactly what it would get if trained alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from mfr_sae import checkpoint as ckpt
from mfr_sae import distributed
from mfr_sae.config import ConfigError, RunConfig, load_config, save_config
from mfr_sae.data import VectorSource, load_ground_truth, make_source, split_batch
from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble
from mfr_sae.metrics import evaluate
from mfr_sae.mfr import MutualRegularizer, pairwise_mmcs

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
ESTIMATE_AFTER_STEPS, ESTIMATE_AFTER_S = 5, 10.0  # when the duration of a run is estimated
ANNOUNCE_OVER_S = 120.0  # the estimate is printed when the rest of the run takes longer than this
_now = time.perf_counter  # the clock of the duration estimate (a test sets its own)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite data or loss, a run folder in the way); one-line message."""


class Interrupted(Exception):
    """Training was stopped by the user (Ctrl-C); nothing was saved since the last checkpoint."""

    def __init__(self, step: int, run_dir: str | Path):
        self.step, self.run_dir = step, Path(run_dir)
        super().__init__(f"interrupted at step {step}; continue with `mfr-sae train --resume {run_dir}`")


def run_paths(run_dir: Path) -> list[Path]:
    """Everything the trainer writes in a run folder: its files, their temporary siblings (atomic writes) and
    the checkpoint folder with its temporary siblings (the folder `wandb/` of wandb is not the trainer's)."""
    names = (CONFIG_FILE, METRICS_FILE, RESULTS_FILE)
    return ([run_dir / name for name in names] + [run_dir / f".{name}.tmp" for name in names]
            + [run_dir / f"{ckpt.CHECKPOINT_DIR}{suffix}" for suffix in ("", ".tmp", ".old")])


def _remove(paths: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def keep_freed_cpu_memory() -> bool:
    """Ask glibc to keep freed memory in the heap. By default it hands every freed block over 32 MB back to
    the OS, so each step's weight-sized gradient buffers are page-faulted in anew (about 10 ms each at the
    GPT-2 shape on 2 cores; bench/RESULTS.md); jemalloc or tcmalloc (LD_PRELOAD) do the same job.
    Process-wide; a no-op off Linux/glibc. True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


class Trainer:
    """Holds the ensemble, optimiser and counters of one run; `fit()` trains to the end."""

    def __init__(self, cfg: RunConfig, run_dir: str | Path, source: VectorSource | None = None,
                 resume: bool = False, progress: bool = True, overwrite: bool = False):
        """overwrite: a new run in a folder that holds another clears that run's files (`run_paths`) first,
        once everything else has been checked; without it such a folder is an error."""
        self.cfg, self.run_dir, self.progress = cfg, Path(run_dir), progress
        self.created: list[Path] = []  # what this process created for a new run (removed if it fails early)
        rank, world, self.device = distributed.init(resolve_device(cfg.train.device), cfg.train.dist_timeout_s)
        self.shard = Shard(len(cfg.ks), rank, world)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        if cfg.train.wandb_project:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("train.wandb_project is set but wandb is not installed "
                                  "(pip install wandb)") from None
        self.source = source if source is not None else make_source(cfg.data, self.device)
        if cfg.data.kind != "synthetic":
            cfg.data.d = self.source.d
        elif self.source.d != cfg.data.d:
            raise ConfigError(f"data.d={cfg.data.d} but the data source gives vectors of size {self.source.d}")
        self.ground_truth, self.ground_truth_layout = self.source.ground_truth, None
        if cfg.eval.ground_truth:
            self.ground_truth, self.ground_truth_layout = load_ground_truth(cfg.eval.ground_truth, cfg.data.d)
            self.ground_truth = self.ground_truth.to(self.device)
        self.ensemble = self._new_ensemble(self.shard.members, self.device)
        # fused: one pass over parameters, gradients and moments (8x faster than for-each on 2 CPU cores)
        self.optimizer = torch.optim.AdamW(self.ensemble.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        # per latent of this rank's members: training vectors since it last fired
        self.samples_since_fired = torch.zeros(len(self.shard.members), cfg.sae.d_sae, dtype=torch.long,
                                               device=self.device)
        self.mfr = MutualRegularizer(cfg.mfr, cfg.ks, self.shard, torch.bfloat16 if cfg.train.autocast else None)
        self.window_lines: list[dict[str, Any]] = []  # reinitialisation-window log lines not yet written
        self.firing_prob: Tensor | None = None  # [N, h], from the last evaluation
        self.step = 0
        self.wandb_run = None
        try:
            if resume:
                self._restore()
            else:
                self._start_new_run(overwrite)
        except Exception as err:  # each rank reads its own members: the others are told why it stopped
            distributed.report_failure(err)
            raise
        self.shard.barrier()  # every rank is ready (with NCCL, the first collective must span all ranks)

    def _new_ensemble(self, members: list[int], device: torch.device) -> Ensemble:
        cfg = self.cfg
        return Ensemble(cfg.data.d, cfg.sae.d_sae, [cfg.ks[i] for i in members], cfg.sae.tied, cfg.sae.decoder_bias,
                        seed=cfg.train.seed, member_ids=members, device=device, shared_init=cfg.sae.shared_init)

    # ------------------------------------------------------------------ run folder and resume

    def _start_new_run(self, overwrite: bool = False) -> None:
        if overwrite:
            if self.shard.is_main and self.run_dir.is_dir():
                _remove(run_paths(self.run_dir))
            self.shard.barrier()  # cleared before any rank looks
        if (self.run_dir / CONFIG_FILE).exists() or ckpt.checkpoint_dir(self.run_dir):
            raise TrainingError(f"{self.run_dir} already holds a run: continue it with --resume "
                                f"{self.run_dir} or choose another --out")
        self.shard.barrier()  # every rank has looked before rank 0 writes
        if self.shard.is_main:
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True)
                self.created.append(self.run_dir)
            self.created += [self.run_dir / CONFIG_FILE, self.run_dir / METRICS_FILE]
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
            (self.run_dir / METRICS_FILE).write_text("")

    def _remove_failed_start(self) -> None:
        """A new run that fails before its first checkpoint leaves nothing that would block a retry: the files
        it created go, and its folder when it created it and nothing else is in it."""
        if not self.created or ckpt.checkpoint_dir(self.run_dir) is not None:
            return
        folder = self.created[0] if self.created[0] == self.run_dir else None
        _remove([path for path in self.created if path != folder]
                + [self.run_dir / f".{CONFIG_FILE}.tmp", self.run_dir / f"{ckpt.CHECKPOINT_DIR}.tmp"])
        if folder is not None and not any(folder.iterdir()):
            folder.rmdir()
        self.created = []

    def _restore(self) -> None:
        folder = ckpt.checkpoint_dir(self.run_dir)
        if folder is None:  # killed before the first checkpoint: start over in place
            (self.run_dir / METRICS_FILE).write_text("")
            return
        # this process's members only (the files hold all N, whatever the number of processes that wrote them)
        state, meta = ckpt.load_trainer_state(folder, slice(self.shard.start, self.shard.stop),
                                              whole=("mfr.matches",))
        loaded = ckpt.load(folder, self.device, members=self.shard.members)
        with torch.no_grad():
            for name, param in self.ensemble.named_parameters():
                param.copy_(getattr(loaded, name))
        self.step = meta["step"]
        self.samples_since_fired.copy_(state.pop("samples_since_fired"))
        self.mfr.load_state({k: v.to(self.device) for k, v in state.items() if k.startswith("mfr.")},
                            meta["mfr"])
        state = {k: v for k, v in state.items() if not k.startswith("mfr.")}
        self.optimizer.load_state_dict(_optimizer_state_from_tensors(self.optimizer, self.ensemble, state))
        self.shard.barrier()  # every rank has read before rank 0 truncates the log
        if self.shard.is_main:
            _truncate_metrics(self.run_dir / METRICS_FILE, self.step)

    def save(self) -> None:
        """Write the checkpoint of all N members (gathered to rank 0, which writes it)."""
        state = {k: v if v.ndim == 0 else self.shard.gather_to_main(v)
                 for k, v in _optimizer_state_to_tensors(self.optimizer, self.ensemble).items()}
        ensemble = self._ensemble_on_main()
        state["samples_since_fired"] = self.shard.gather_to_main(self.samples_since_fired)
        mfr_tensors, mfr_meta = self.mfr.state()
        if self.shard.is_main:
            state.update(mfr_tensors)
            meta = {"step": self.step, "mfr": mfr_meta}
            ckpt.save_checkpoint(self.run_dir, ensemble, state, meta, extra={"mfr": self.cfg.mfr.enabled},
                                 firing_prob=self.firing_prob)
        self.shard.barrier()  # nobody goes on (or exits) before the checkpoint is in place

    @torch.no_grad()
    def _ensemble_on_main(self) -> Ensemble | None:
        """All N members in one Ensemble on rank 0 (on the CPU), None on the other ranks; in one process,
        its own."""
        if self.shard.world == 1:
            return self.ensemble
        every = list(range(self.shard.n_members))
        full = self._new_ensemble(every, torch.device("cpu")) if self.shard.is_main else None
        for name, param in self.ensemble.named_parameters():
            gathered = self.shard.gather_to_main(param.detach())
            if full is not None:
                getattr(full, name).copy_(gathered)
        return full

    # ------------------------------------------------------------------ training

    def train_step(self, x: Tensor, target: Tensor | None = None) -> dict[str, Any]:
        """One step on input x; the loss is against `target` (denoising) or x itself. Returns this rank's
        numbers as they are (`_log_record` gathers them, at log steps only): the MSE and L0 of its members
        [n] on its slice of the batch (weighted by the slice's share), the penalty's values (all members'),
        inside the reinitialisation window the metric of its members [n], and reinitialisation events.
        In one process, every member's."""
        target = x if target is None else target
        if not (torch.isfinite(x).all() and torch.isfinite(target).all()):
            raise TrainingError(f"training batch of step {self.step} holds NaN or inf")
        rows = self.shard.batch_rows(len(x))  # data parallel: this replica's slice; else the whole batch
        share = (rows.stop - rows.start) / len(x)
        self.mfr.prefetch(self.ensemble.decoder_weight)  # the decoders travel while this rank encodes
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.cfg.train.autocast):
            out = self.ensemble(x[rows])
        acts, idx = out.acts, out.idx
        mse = (out.x_hat.float() - target[rows]).pow(2).mean(dim=(1, 2)) * share  # this slice's part
        n_members = self.shard.n_members
        loss = mse.sum() / n_members  # this rank's part of the mean over all members
        logs: dict[str, Any] = {"mse": mse.detach()}
        if self.mfr.penalty_on:  # on the decoders of all members; the gradient reaches this rank's own
            penalty, values = self.mfr.penalty(self.ensemble.decoder_weight, self.step,
                                               lambda: (self.shard.gather_sum(mse.detach()).sum() / n_members).item())
            logs.update(values)
            if self.shard.replica == 0:  # once per member: the replicas' gradients are summed
                loss = loss + penalty
        if not torch.isfinite(loss):
            raise TrainingError(f"loss became {loss.item()} at step {self.step} (try a lower train.lr); "
                                f"the last checkpoint is intact")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.shard.reduce_gradients(self.ensemble.parameters())
        self.optimizer.step()
        self.ensemble.renormalize_decoder()
        counts = self._count_firing(acts, idx, len(x))
        chosen, metric = self.mfr.reinit_check(self.step, counts, len(x))
        if metric is not None:
            logs["reinit_metric"] = metric
        for n in chosen:
            self._reinit_member(n)
        if chosen:
            logs["reinit"] = self.mfr.events[-len(chosen):]
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
        self.samples_since_fired[local] = 0
        self.ensemble.reset_member(local, attempt=self.mfr.attempts[n])
        for param in self.ensemble.parameters():
            for key in ("exp_avg", "exp_avg_sq"):
                if key in self.optimizer.state.get(param, {}):
                    self.optimizer.state[param][key][local].zero_()

    @torch.no_grad()
    def _count_firing(self, acts: Tensor, idx: Tensor, batch: int) -> Tensor:
        """Update samples-since-fired; return each latent's firing count in this batch, this rank's members
        [n, h] (over the whole batch: summed over the replicas of data parallel)."""
        n = self.ensemble.n_members
        counts = torch.zeros(n, self.ensemble.d_sae, device=acts.device)
        counts.scatter_add_(1, idx.reshape(n, -1), (acts > 0).reshape(n, -1).float())
        counts = self.shard.sum_replicas(counts)
        self.samples_since_fired += batch
        self.samples_since_fired[counts > 0] = 0
        return counts

    def dead_mask(self) -> Tensor:
        """Latents of this rank's members that have not fired on the last eval.dead_window training
        vectors: [n, h]."""
        return self.samples_since_fired >= self.cfg.eval.dead_window

    def dead_measured(self) -> list[bool]:
        """Per member (all N): whether it has trained on eval.dead_window vectors since its (re)initialisation;
        before that no latent can be dead by construction, so its dead fraction is not measured (None)."""
        return [steps * self.cfg.train.batch_size >= self.cfg.eval.dead_window
                for steps in self.mfr.steps_since_init]

    def _dead_frac_note(self, unmeasured: list[int]) -> str | None:
        """Why the dead_frac of these members (global indices) is None; None when all were measured."""
        if not unmeasured:
            return None
        window = f"eval.dead_window ({self.cfg.eval.dead_window:,} vectors)"
        if self.step * self.cfg.train.batch_size < self.cfg.eval.dead_window:
            return f"run shorter than {window}: dead_frac not measured"
        many = len(unmeasured) > 1
        return (f"member{'s' if many else ''} {', '.join(map(str, unmeasured))} re-initialised less than {window} "
                f"before the end: {'their' if many else 'its'} dead_frac not measured")

    def evaluate(self, lm: bool = False) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        """Every member's metrics, in member order (each rank scores its own), and with `lm` the loss
        recovered on an activation cache's model."""
        if not hasattr(self, "_eval_batch"):
            self._eval_batch = split_batch(self.source.eval_vectors(self.cfg.eval.n_samples))
        x, target = self._eval_batch
        members, firing_prob = evaluate(self.ensemble, x, self.ground_truth, self.dead_mask(),
                                        self.cfg.eval.recovered_threshold, self.cfg.eval.batch_size,
                                        None if target is x else target,
                                        self.dead_measured()[self.shard.start:self.shard.stop])
        lm_result = self._loss_recovered(members) if lm else None
        self.firing_prob = self.shard.gather(firing_prob.to(self.device)).cpu()  # NCCL sends CUDA tensors only
        return [m for part in self.shard.gather_objects(members) for m in part], lm_result

    def fit(self) -> dict[str, Any]:
        """Train to the end; an error that stops this rank is left for the others to name (distributed).
        Ctrl-C raises `Interrupted` (nothing saved since the last checkpoint: `resume` goes on from it); a new
        run that fails before its first checkpoint removes what it created (a retry is not blocked)."""
        try:
            return self._fit()
        except KeyboardInterrupt:
            interrupted = Interrupted(self.step, self.run_dir)
            distributed.report_failure(interrupted)
            raise interrupted from None
        except Exception as err:
            distributed.report_failure(err)
            if self.shard.is_main and not isinstance(err, Interrupted):
                with contextlib.suppress(OSError):  # the error that stopped the run is the one to see
                    self._remove_failed_start()
            raise

    def _fit(self) -> dict[str, Any]:
        cfg, n_steps = self.cfg, self.cfg.n_steps
        if cfg.train.wandb_project and self.shard.is_main:
            import wandb

            self.wandb_run = wandb.init(project=cfg.train.wandb_project, config=cfg.to_dict(),
                                        dir=str(self.run_dir))
        started = time.perf_counter()
        batches = self.source.batches(cfg.train.batch_size, self.step)
        show = self.progress and self.shard.is_main
        if show and self.step < n_steps:
            tqdm.write(f"{n_steps - self.step:,} steps of {cfg.train.batch_size:,} vectors"
                       + (f" (from step {self.step:,} of {n_steps:,})" if self.step else ""))
        estimate = _DurationEstimate(self.step, n_steps) if show else None
        bar = tqdm(total=n_steps, initial=self.step, desc="train", disable=not show, dynamic_ncols=True)
        try:  # the bar is closed before any error (or Ctrl-C) propagates: the error is the last thing shown
            with open(self.run_dir / METRICS_FILE if self.shard.is_main else os.devnull, "a") as log:
                while self.step < n_steps:
                    x, target = split_batch(next(batches))
                    logs = self.train_step(x.to(self.device), None if target is x else target.to(self.device))
                    bar.update(1)
                    if estimate is not None and (line := estimate.after_step(self.step)) is not None:
                        if line:
                            tqdm.write(line)
                        estimate = None
                    if "reinit_metric" in logs or "reinit" in logs:  # every step of the window (Figure 7)
                        self.window_lines.append({"step": self.step, **{k: logs[k] for k in ("reinit_metric", "reinit")
                                                                        if k in logs}})
                    if self.step % cfg.train.log_every == 0 or self.step == n_steps:
                        record = self._log_record(logs)
                        self._write(log, record)
                        bar.set_postfix(_postfix(record))
                    if cfg.eval.every and self.step % cfg.eval.every == 0 and self.step < n_steps:
                        self._write(log, {"step": self.step, "eval": self.evaluate()[0]})
                    if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                        self._write(log, None)  # the window lines up to the checkpoint
                        log.flush()
                        self.save()
                bar.close()
                members, lm = self.evaluate(lm=True)
                self._write(log, {"step": self.step, "eval": members, **({"lm": lm} if lm else {})})
        finally:
            bar.close()
        self.save()
        results = {
            "steps": self.step,
            "samples": self.step * cfg.train.batch_size,
            "train_seconds": round(time.perf_counter() - started, 3),
            "mfr": cfg.mfr.enabled,
            **self._pairwise_mmcs(),
            "beta": self.mfr.beta,
            "reinit_events": self.mfr.events,
            "lm": lm,
            "ground_truth": None if self.ground_truth is None else {
                "source": self.cfg.eval.ground_truth or self.cfg.data.kind,
                "n_true": len(self.ground_truth), "layout": self.ground_truth_layout},
            "dead_frac_note": self._dead_frac_note([m["member"] for m in members if m["dead_frac"] is None]),
            "members": members,
            "config": cfg.to_dict(),
        }
        if self.shard.is_main:
            ckpt.write_json(self.run_dir / RESULTS_FILE, results)
        if self.wandb_run is not None:
            self.wandb_run.finish()
        return results

    def _pairwise_mmcs(self) -> dict[str, float | None]:
        """pairwise_mmcs of all members, computed on rank 0 and sent to the others."""
        decoders = self.shard.gather_to_main(self.ensemble.decoder().detach())
        return self.shard.gather_objects(None if decoders is None else pairwise_mmcs(decoders.to(self.device)))[0]

    def _loss_recovered(self, members: list[dict[str, Any]]) -> dict[str, Any] | None:
        """On an activation cache: CE clean / zero-ablated / spliced per member, added to `members`."""
        if self.cfg.data.kind != "activations" or not self.cfg.eval.lm_sequences:
            return None
        from mfr_sae.lm_eval import evaluate_on_lm

        result = evaluate_on_lm(self.cfg.data.path, self.ensemble, self.cfg.eval.lm_sequences,
                                self.cfg.eval.lm_batch_size, self.device, self.progress)
        if result is None:
            return {"skipped": "the cache's text has no sequences left after those cached"}
        for member, scores in zip(members, result.pop("members")):
            member.update(ce_clean=result["ce_clean"], ce_zero=result["ce_zero"], **scores)
        return result

    def _log_record(self, logs: dict[str, Any]) -> dict[str, Any]:
        """The log line of this step, all members' numbers (gathered from the ranks)."""
        mse, l0 = self.shard.gather_sum(torch.stack([logs["mse"], logs["l0"]], dim=1)).T
        dead = self.shard.gather(self.dead_mask().float().mean(-1)).tolist()
        return {
            "step": self.step,
            "samples": self.step * self.cfg.train.batch_size,
            "loss": (mse.sum() / self.shard.n_members).item() + logs.get("penalty", 0.0),
            "mse": mse.tolist(),
            "l0": l0.tolist(),
            **{k: logs[k] for k in ("penalty", "penalty_weight", "pairwise_mmcs") if k in logs},
            **({"match_stale_frac": self.mfr.stale_frac} if self.mfr.stale_frac is not None else {}),
            "dead_frac": [d if measured else None for d, measured in zip(dead, self.dead_measured())],
        }

    def _write(self, log, record: dict[str, Any] | None) -> None:
        """Write the pending window lines (one gather of all their metrics), then `record`; a window line of
        the record's step goes into the record."""
        lines = self.window_lines
        if lines:
            local = torch.stack([line["reinit_metric"] for line in lines], dim=1)  # [n, lines]
            for line, metric in zip(lines, self.shard.gather(local).T.tolist()):
                line["reinit_metric"] = metric
            if record is not None and lines[-1]["step"] == record["step"]:
                record.update(lines.pop())
            self.window_lines = []
        for line in lines + ([record] if record is not None else []):
            log.write(json.dumps(line) + "\n")
            if self.wandb_run is not None:
                flat = {k: v for k, v in line.items() if isinstance(v, (int, float))}
                self.wandb_run.log(flat, step=line["step"])


def train(cfg: RunConfig, out: str | Path, source: VectorSource | None = None, progress: bool = True,
          overwrite: bool = False) -> dict[str, Any]:
    """Train a new run in folder `out`; returns what results.json holds. A folder that holds another run is an
    error, or with `overwrite` is cleared of that run's files (`run_paths`, nothing else) once the new config
    and data source are checked."""
    return Trainer(cfg.validate(), out, source, progress=progress, overwrite=overwrite).fit()


def resume(run_dir: str | Path, source: VectorSource | None = None, progress: bool = True) -> dict[str, Any]:
    """Continue a run from its last checkpoint (same config, same data stream) to the end. A finished run
    (results.json, and the checkpoint at the last step) is an error that changes nothing."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise TrainingError(f"cannot resume: {run_dir / CONFIG_FILE} not found")
    cfg = load_config(run_dir / CONFIG_FILE)
    folder = ckpt.checkpoint_dir(run_dir)
    if (run_dir / RESULTS_FILE).is_file() and folder is not None and _checkpoint_step(folder) == cfg.n_steps:
        raise TrainingError(f"{run_dir} is finished ({RESULTS_FILE}); nothing to resume")
    return Trainer(cfg, run_dir, source, resume=True, progress=progress).fit()


# ------------------------------------------------------------------ helpers

class _DurationEstimate:
    """After the first steps (ESTIMATE_AFTER_STEPS past the first, or ESTIMATE_AFTER_S), the expected time of
    the rest of the run, as one line when it exceeds ANNOUNCE_OVER_S. The rate leaves out the first step
    (warm-up) when later ones were timed."""

    def __init__(self, step: int, n_steps: int):
        self.first, self.n_steps = step, n_steps
        self.start = self.after_first = _now()

    def after_step(self, step: int) -> str | None:
        """Called after each step: None until the estimate is made, then the line to print ("" for a short
        run); not called again after that."""
        now, done = _now(), step - self.first
        if done == 1:
            self.after_first = now
        timed = done - 1  # steps since the first one
        if timed < ESTIMATE_AFTER_STEPS and now - self.start < ESTIMATE_AFTER_S and step < self.n_steps:
            return None
        if timed and now > self.after_first:
            rate = timed / (now - self.after_first)
        else:
            rate = done / max(now - self.start, 1e-9)
        left = (self.n_steps - step) / rate
        if left <= ANNOUNCE_OVER_S:
            return ""  # short: nothing to say (and no more asking)
        return f"{self.n_steps - step:,} steps at {rate:.3g} steps/s: about {round(left / 60):,} minutes"


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's numbers: loss, mean L0, and the mean dead fraction of the members where measured."""
    postfix = {"loss": f"{record['loss']:.4g}", "l0": f"{sum(record['l0']) / len(record['l0']):.1f}"}
    dead = [d for d in record["dead_frac"] if d is not None]
    if dead:
        postfix["dead"] = f"{100 * sum(dead) / len(dead):.1f}%"
    return postfix


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a checkpoint, from its trainer state's metadata only (None when unreadable)."""
    try:
        with safe_open(Path(folder) / ckpt.STATE_FILE, "pt") as f:
            return json.loads((f.metadata() or {}).get("meta", "{}")).get("step")
    except Exception:  # noqa: BLE001 (missing or corrupt: the resume itself says what is wrong)
        return None


def _optimizer_state_to_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, Tensor]:
    """AdamW state as flat named tensors (safetensors holds no pickle)."""
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = {}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"optimizer.{names[id(param)]}.{key}"] = torch.as_tensor(value)
    return tensors


def _optimizer_state_from_tensors(optimizer: torch.optim.Optimizer, model: torch.nn.Module,
                                  tensors: dict[str, Tensor]) -> dict[str, Any]:
    index = {n: i for i, (n, _) in enumerate(model.named_parameters())}
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        _, name, field = key.split(".")
        state.setdefault(index[name], {})[field] = value
    return {"state": state, "param_groups": optimizer.state_dict()["param_groups"]}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint a resume restarts from, and a last line cut off by a kill
    (the log is flushed at every checkpoint, so only lines after it can be partial)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise TrainingError(f"{path}: line {number} is not JSON") from None
        if record["step"] <= step:
            kept.append(line)
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept))
