import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from mfr_sae import load, run_log
from mfr_sae.cli import main
from mfr_sae.config import load_config
from mfr_sae.data.synthetic import SyntheticData
from mfr_sae.train import Trainer, TrainingError, resume, train


def test_an_easy_ensemble_recovers_at_least_90_percent_of_true_features(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=400000"])
    results = train(cfg, tmp_path / "run", progress=False)
    assert len(results["members"]) == 2
    for member in results["members"]:
        assert member["gt_recovered_frac"] >= 0.9, member
        assert member["l0"] <= 3
        assert member["fvu"] < 0.1


def test_results_logs_and_checkpoint_of_a_run(tmp_path, easy_overrides):
    cfg = load_config(
        None, easy_overrides + ["train.n_samples=20000", "train.log_every=5", "eval.every=10", "sae.k=[2, 4]"]
    )
    train(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 20 and results["samples"] == 20000
    assert [m["k"] for m in results["members"]] == [2, 4]
    for key in ["k", "mse", "fvu", "l0", "dead_frac", "gt_mmcs", "gt_recovered_frac"]:
        assert key in results["members"][0]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [5, 10, 15, 20]
    assert [r["step"] for r in lines if "eval" in r] == [10, 20]
    for line in (r for r in lines if "eval" in r):  # agreement beside every evaluation: the run's own two members
        assert 0 < line["pairwise_mmcs_hungarian"] <= line["pairwise_mmcs"] < 0.99
    assert results["pairwise_mmcs_hungarian"] == lines[-1]["pairwise_mmcs_hungarian"]
    assert results["collapsed"] is False and results["collapse_note"] is None and results["reinit_count"] == [0, 0]
    assert load(run).ks == [2, 4]
    from safetensors.torch import load_file

    sparsity = load_file(run / "checkpoint" / "member_1" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (128,) and (sparsity <= 0).all()
    # log10 firing probabilities of a k=4 member sum (as probabilities) to its L0 of at most 4
    assert 0 < (10**sparsity).sum() <= 4.01
    assert load_config(run / "config.yaml").sae.k == [2, 4]


def test_loss_goes_down(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=50000", "train.log_every=1"])
    train(cfg, tmp_path / "run", progress=False)
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert losses[-1] < 0.5 * losses[0]


class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, easy_overrides, monkeypatch, raise_at):
    overrides = easy_overrides + ["train.n_samples=60000", "train.checkpoint_every=20", "train.log_every=5"]
    full = train(load_config(None, overrides), tmp_path / "full", progress=False)

    trainer = Trainer(load_config(None, overrides), tmp_path / "cut", progress=False)
    raise_at(trainer, 47, _Interrupt)
    with pytest.raises(_Interrupt):
        trainer.fit()
    resumed = resume(tmp_path / "cut", progress=False)
    for name, p in load(tmp_path / "full").named_parameters():
        assert torch.equal(p, getattr(load(tmp_path / "cut"), name)), name
    assert resumed["members"] == full["members"]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert steps == list(range(5, 61, 5))  # no step logged twice


def _checkpoint_id(run_dir):
    """Changes whenever a new checkpoint is renamed into place (None before the first)."""
    try:
        return (run_dir / "checkpoint").stat().st_ino
    except FileNotFoundError:
        return None


def test_a_run_killed_at_random_moments_and_resumed_each_time_ends_with_the_same_weights(tmp_path, easy_overrides):
    """SIGKILL at seeded random moments after each process's first checkpoint, with a checkpoint every other
    step (so kills land inside checkpoint and log writes too), then `--resume`: the same weights and log as an
    uninterrupted run."""
    overrides = easy_overrides + [
        "train.n_samples=150000",  # long enough that 5 kills land before the end
        "train.batch_size=500",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "mfr.enabled=true",
        "mfr.match_every=3",
    ]
    sets = [arg for o in overrides for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "mfr_sae", "train", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "full")] + sets, check=True, env=env, capture_output=True)
    run_dir, rng, kills = tmp_path / "cut", random.Random(0), 0
    args = ["--out", str(run_dir)] + sets
    while kills < 5:
        before = _checkpoint_id(run_dir)
        proc = subprocess.Popen(cmd + args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while _checkpoint_id(run_dir) == before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)  # this process has made progress once a checkpoint of its own is in place
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        args = ["--resume", str(run_dir)]
    assert kills == 5 and not (run_dir / "results.json").exists(), f"the run finished after {kills} kills"
    done = subprocess.run(cmd + args, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full, cut = load(tmp_path / "full"), load(run_dir)
    for name, p in full.named_parameters():
        assert torch.equal(p, getattr(cut, name)), name

    def logged_steps(folder):
        return [
            json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines() if '"loss"' in line
        ]

    assert logged_steps(run_dir) == logged_steps(tmp_path / "full") == list(range(1, 301))


def test_resume_drops_a_log_line_cut_off_by_a_kill(tmp_path, easy_overrides, monkeypatch, raise_at):
    overrides = easy_overrides + ["train.n_samples=30000", "train.checkpoint_every=10", "train.log_every=5"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "cut", progress=False)
    raise_at(trainer, 17, _Interrupt)
    with pytest.raises(_Interrupt):
        trainer.fit()
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as log:
        log.write('{"step": 17, "loss": 0.1')  # a write the kill cut short
    resume(tmp_path / "cut", progress=False)
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
        if "loss" in line
    ]
    assert steps == list(range(5, 31, 5))


def test_an_existing_run_is_never_overwritten(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=2000"])
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(
        TrainingError, match="already holds a run: continue it with --resume .*, replace it with --overwrite"
    ):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "results.json").read_text() == before


class _NaNAfter(SyntheticData):
    """Training batches from step `first` on hold a NaN."""

    first = 3

    def sample(self, batch_size, stream=0, index=0):
        x = super().sample(batch_size, stream, index)
        if stream == 0 and index >= self.first:
            x[7, 2] = float("nan")
        return x


def test_nan_in_the_data_stops_training_with_a_clear_error(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=10000"])
    source = _NaNAfter(32, 64, 4, 3)
    with pytest.raises(TrainingError, match="batch of step 3 holds NaN"):
        train(cfg, tmp_path / "run", source=source, progress=False)


class _NoisyPairs(SyntheticData):
    """Synthetic vectors as denoising pairs: (clean + seeded Gaussian noise, clean)."""

    def _noisy(self, clean, key):
        return clean + 0.5 * clean.std() * torch.randn(clean.shape, generator=torch.Generator().manual_seed(key))

    def batches(self, batch_size, start_step=0):
        for step, clean in enumerate(super().batches(batch_size, start_step), start_step):
            yield self._noisy(clean, step), clean

    def eval_vectors(self, n):
        clean = super().eval_vectors(n)
        return self._noisy(clean, 10_000), clean


def test_denoising_pairs_train_against_the_clean_target(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=100000"])
    d = cfg.data
    source = _NoisyPairs(d.d, d.n_features, d.n_groups, d.n_active, d.decay, seed=0)
    trainer = Trainer(cfg, tmp_path / "run", source=source, progress=False)
    noisy, clean = next(source.batches(1000))
    with torch.no_grad():
        x_hat = trainer.ensemble(noisy).x_hat
    logs = trainer.train_step(noisy, clean)  # the loss of the weights before the step
    torch.testing.assert_close(logs["mse"], (x_hat - clean).pow(2).mean(dim=(1, 2)))
    assert not torch.allclose(logs["mse"], (x_hat - noisy).pow(2).mean(dim=(1, 2)))
    results = trainer.fit()
    for member in results["members"]:
        assert member["snr_in_db"] == pytest.approx(6.0, abs=0.3)  # noise sd = half the signal's
        assert member["snr_out_db"] > member["snr_in_db"] + 1  # the sparse code drops part of the noise


def test_bf16_autocast_trains_like_fp32_with_fp32_weights(tmp_path, easy_overrides):
    results = {}
    for autocast in (False, True):
        cfg = load_config(
            None,
            easy_overrides + ["train.n_samples=100000", "mfr.enabled=true", f"train.autocast={str(autocast).lower()}"],
        )
        trainer = Trainer(cfg, tmp_path / str(autocast), progress=False)
        results[autocast] = trainer.fit()
        assert all(p.dtype == torch.float32 for p in trainer.ensemble.parameters())
    for fp32, bf16 in zip(results[False]["members"], results[True]["members"]):
        assert bf16["fvu"] == pytest.approx(fp32["fvu"], rel=0.1, abs=0.01)
        assert bf16["gt_mmcs"] == pytest.approx(fp32["gt_mmcs"], abs=0.03)


# ------------------------------------------------------------------ issue 17: nothing lost, nothing misleading


def test_dead_frac_is_not_measured_in_a_run_shorter_than_the_dead_window(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "train.log_every=5", "eval.every=10"])
    results = train(cfg, tmp_path / "short", progress=True)  # the progress bar shows no dead fraction
    assert [m["dead_frac"] for m in results["members"]] == [None, None]
    assert results["dead_frac_note"] == (
        "run shorter than eval.dead_window (1,000,000 vectors): dead_frac not measured"
    )
    on_disk = json.loads((tmp_path / "short" / "results.json").read_text())
    assert on_disk["dead_frac_note"] == results["dead_frac_note"]
    lines = [json.loads(line) for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["dead_frac"] == [None, None] for r in lines if "loss" in r)
    assert all(m["dead_frac"] is None for r in lines if "eval" in r for m in r["eval"])
    for member in results["members"]:  # measured on the held-out vectors whatever the run's length
        assert 0 <= member["silent_frac"] <= 1

    # once the run is past the window: numbers, and no note
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "train.log_every=5", "eval.dead_window=15000"])
    results = train(cfg, tmp_path / "long", progress=False)
    assert all(isinstance(m["dead_frac"], float) for m in results["members"])
    assert results["dead_frac_note"] is None
    lines = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    # logged at steps 5, 10, 15, 20: measured from step 15 (15,000 vectors) on
    assert [[d is None for d in r["dead_frac"]] for r in lines if "loss" in r] == [[True] * 2] * 2 + [[False] * 2] * 2


def test_dead_frac_of_a_member_re_initialised_late_is_not_measured(tmp_path, easy_overrides):
    cfg = load_config(
        None,
        easy_overrides
        + [
            "train.n_samples=20000",
            "mfr.enabled=true",
            "mfr.reinit_samples=1000",
            "mfr.reinit_window=10",
            "eval.dead_window=19500",
        ],
    )
    trainer = Trainer(cfg, tmp_path / "run", progress=False)
    with torch.no_grad():  # member 1 cannot use most latents: re-initialised at step 0, 19 steps before the end
        trainer.ensemble.b_enc[1, 32:] = -100.0
    results = trainer.fit()
    assert [(e["step"], e["member"]) for e in results["reinit_events"]] == [(0, 1)]
    assert isinstance(results["members"][0]["dead_frac"], float) and results["members"][1]["dead_frac"] is None
    assert results["dead_frac_note"] == (
        "member 1 re-initialised less than eval.dead_window (19,500 vectors) before the end: its dead_frac not measured"
    )


class _Bar:
    """Records the progress bars of training and whether they were closed."""

    def __init__(self, monkeypatch):
        self.closed = []
        record = self.closed

        class Bar(run_log.tqdm):
            def close(self):
                record.append(True)
                super().close()

        monkeypatch.setattr(run_log, "tqdm", Bar)


def test_ctrl_c_saves_nothing_closes_the_bar_and_says_how_to_resume(tmp_path, easy_overrides, monkeypatch, raise_at):
    from mfr_sae.train import Interrupted
    from mfr_sae.trainer_state import load_trainer_state

    bar = _Bar(monkeypatch)
    overrides = easy_overrides + ["train.n_samples=30000", "train.checkpoint_every=5", "train.log_every=1"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", progress=True)
    raise_at(trainer, 7, KeyboardInterrupt)
    try:
        trainer.fit()
    except Interrupted as err:  # (while it is in flight, its traceback keeps the bar from being collected)
        caught, closed = err, bool(bar.closed)
    assert caught.step == 7 and caught.run_dir == tmp_path / "run" and closed
    resume_command = f"`mfr-sae train --resume {tmp_path / 'run'}`"
    assert str(caught) == f"interrupted at step 7; {resume_command} goes on from the checkpoint of step 5"
    assert load_trainer_state(tmp_path / "run" / "checkpoint")[1]["step"] == 5  # nothing saved after step 5
    assert not (tmp_path / "run" / "results.json").exists()
    assert resume(tmp_path / "run", progress=False)["steps"] == 30


def test_ctrl_c_before_the_first_checkpoint_says_that_resume_starts_again(tmp_path, easy_overrides, capsys, raise_at):
    from mfr_sae.train import Interrupted

    overrides = easy_overrides + ["train.n_samples=30000", "train.checkpoint_every=20"]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", progress=False)
    raise_at(trainer, 3, KeyboardInterrupt)
    with pytest.raises(Interrupted, match="at step 3, before the first checkpoint: .* starts again from step 0"):
        trainer.fit()
    assert resume(tmp_path / "run", progress=False)["steps"] == 30
    assert f"{tmp_path / 'run'}: no checkpoint yet, starting again from step 0" in capsys.readouterr().err


def test_an_error_closes_the_progress_bar_before_it_propagates(tmp_path, easy_overrides, monkeypatch):
    bar = _Bar(monkeypatch)
    trainer = Trainer(load_config(None, easy_overrides + ["train.n_samples=10000"]), tmp_path / "run", progress=True)

    def fail(*args):
        assert not bar.closed
        raise RuntimeError("boom")

    trainer.train_step = fail
    try:
        trainer.fit()
    except RuntimeError as err:  # (while it is in flight, its traceback keeps the bar from being collected)
        assert str(err) == "boom" and bar.closed
    else:
        raise AssertionError("no error")


class _NaNAtStep2(_NaNAfter):
    first = 2


def test_a_run_that_fails_before_its_first_checkpoint_does_not_block_a_retry(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=10000", "train.checkpoint_every=5"])
    with pytest.raises(TrainingError, match="batch of step 2 holds NaN"):
        train(cfg, tmp_path / "new", source=_NaNAtStep2(32, 64, 4, 3), progress=False)
    assert not (tmp_path / "new").exists()  # it created the folder: gone with its files
    assert train(cfg, tmp_path / "new", progress=False)["steps"] == 10

    mine = tmp_path / "mine"  # a folder of the user's: only the run's files go
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(TrainingError, match="batch of step 2 holds NaN"):
        train(cfg, mine, source=_NaNAtStep2(32, 64, 4, 3), progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert train(cfg, mine, progress=False)["steps"] == 10

    # after its first checkpoint a failed run stays, for --resume
    cfg = load_config(None, easy_overrides + ["train.n_samples=10000", "train.checkpoint_every=1"])
    with pytest.raises(TrainingError, match="batch of step 2 holds NaN"):
        train(cfg, tmp_path / "kept", source=_NaNAtStep2(32, 64, 4, 3), progress=False)
    assert (tmp_path / "kept" / "config.yaml").exists() and (tmp_path / "kept" / "checkpoint").is_dir()


def test_resume_of_a_finished_run_changes_nothing_and_succeeds(tmp_path, easy_overrides, capsys):
    """A requeue loop on a cluster resumes until done: a finished run is success, not a failure."""
    first = train(load_config(None, easy_overrides + ["train.n_samples=5000"]), tmp_path / "run", progress=False)
    assert "MFR off: the baseline (--set mfr.enabled=true trains with MFR)" in capsys.readouterr().out
    results, log = ((tmp_path / "run" / name).read_bytes() for name in ("results.json", "metrics.jsonl"))
    assert resume(tmp_path / "run", progress=False) == json.loads(results) == json.loads(json.dumps(first))
    assert "is finished (results.json); nothing to resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "results.json").read_bytes() == results
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == log


def test_overwrite_replaces_another_run_and_only_its_files(tmp_path, easy_overrides):
    from mfr_sae.config import ConfigError

    run = tmp_path / "run"
    train(load_config(None, easy_overrides + ["train.n_samples=5000"]), run, progress=False)
    (run / "notes.txt").write_text("keep")
    (run / "checkpoint.old").mkdir()  # a save cut off mid-swap: the trainer's too
    before = (run / "results.json").read_bytes()
    new = load_config(None, easy_overrides + ["train.n_samples=3000", "sae.k=[2, 4]"])
    with pytest.raises(TrainingError, match="already holds a run"):
        train(new, run, progress=False)
    bad = load_config(None, easy_overrides + ["train.n_samples=3000"])
    bad.train.lr = -1.0
    with pytest.raises(ConfigError, match="train.lr"):
        train(bad, run, progress=False, overwrite=True)
    assert (run / "results.json").read_bytes() == before  # an invalid config clears nothing
    results = train(new, run, progress=False, overwrite=True)
    assert results["steps"] == 3 and [m["k"] for m in results["members"]] == [2, 4]
    assert json.loads((run / "results.json").read_text())["steps"] == 3
    assert load_config(run / "config.yaml").sae.k == [2, 4]
    assert (run / "notes.txt").read_text() == "keep" and not (run / "checkpoint.old").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [3, 3]


def test_a_long_run_says_how_long_it_will_take(tmp_path, easy_overrides, monkeypatch, capsys):
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "train.batch_size=500"])
    trainer = Trainer(cfg, tmp_path / "run", progress=True)
    monkeypatch.setattr(run_log, "_now", lambda: 4.0 * trainer.step)  # 4 s a step
    trainer.fit()
    started, *lines = capsys.readouterr().out.splitlines()
    assert started.startswith(f"training {tmp_path / 'run'} from step 0 of 40: ")
    assert lines[0] == "40 steps of 500 vectors"
    # after 10 s (at step 3), over steps 2-3 (the first left out): 0.25 steps/s, 37 steps left = 148 s
    assert lines[1] == "37 steps at 0.25 steps/s: about 2 minutes" and len(lines) == 2

    cfg = load_config(None, easy_overrides + ["train.n_samples=10000"])  # 40 s: only the step count
    trainer = Trainer(cfg, tmp_path / "short", progress=True)
    monkeypatch.setattr(run_log, "_now", lambda: 4.0 * trainer.step)
    trainer.fit()
    assert capsys.readouterr().out.splitlines()[1:] == ["10 steps of 1,000 vectors"]


def test_all_finite_finds_nan_and_inf_and_is_not_fooled_by_a_sum_that_overflows():
    from mfr_sae.train import all_finite

    x = torch.full((4, 3), 3e38)  # finite, yet its float32 sum overflows to inf
    assert all_finite(x) and all_finite(torch.zeros(2, 2))
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = torch.zeros(4, 3)
        y[2, 1] = bad
        assert not all_finite(y)


def test_a_run_whose_members_become_copies_says_so(tmp_path, easy_overrides, capsys):
    from mfr_sae.cli import main

    overrides = ["train.n_samples=3000", "sae.shared_init=true", "mfr.enabled=true", "mfr.beta=1"]
    args = ["train", "--out", str(tmp_path / "copies"), "--no-progress"]
    assert main([*args, *(f"--set={o}" for o in easy_overrides + overrides)]) == 0
    results = json.loads((tmp_path / "copies" / "results.json").read_text())
    assert results["collapsed"] and results["pairwise_mmcs_hungarian"] > 0.99
    assert "collapsed into copies" in results["collapse_note"] and "collapsed into copies" in capsys.readouterr().err
