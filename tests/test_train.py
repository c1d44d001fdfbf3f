import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mfr_sae import load
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
    cfg = load_config(None, easy_overrides + ["train.n_samples=20000", "train.log_every=5",
                                              "eval.every=10", "sae.k=[2, 4]"])
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
    assert load(run).ks == [2, 4]
    from safetensors.torch import load_file
    sparsity = load_file(run / "checkpoint" / "member_1" / "sparsity.safetensors")["sparsity"]
    assert sparsity.shape == (128,) and (sparsity <= 0).all()
    # log10 firing probabilities of a k=4 member sum (as probabilities) to its L0 of at most 4
    assert 0 < (10 ** sparsity).sum() <= 4.01
    assert load_config(run / "config.yaml").sae.k == [2, 4]


def test_loss_goes_down(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=50000", "train.log_every=1"])
    train(cfg, tmp_path / "run", progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in line]
    assert losses[-1] < 0.5 * losses[0]


class _Interrupt(Exception):
    pass


def test_resume_after_an_interruption_ends_with_the_same_weights(tmp_path, easy_overrides, monkeypatch):
    overrides = easy_overrides + ["train.n_samples=60000", "train.checkpoint_every=20", "train.log_every=5"]
    full = train(load_config(None, overrides), tmp_path / "full", progress=False)

    trainer = Trainer(load_config(None, overrides), tmp_path / "cut", progress=False)
    original = trainer.train_step

    def step_then_stop(*args):
        if trainer.step == 47:
            raise _Interrupt
        return original(*args)

    trainer.train_step = step_then_stop
    with pytest.raises(_Interrupt):
        trainer.fit()
    resumed = resume(tmp_path / "cut", progress=False)
    for name, p in load(tmp_path / "full").named_parameters():
        assert torch.equal(p, getattr(load(tmp_path / "cut"), name)), name
    assert resumed["members"] == full["members"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss" in line]
    assert steps == list(range(5, 61, 5))  # no step logged twice


def test_resume_after_kill_9_ends_with_the_same_weights(tmp_path, easy_overrides):
    overrides = easy_overrides + ["train.n_samples=300000", "train.batch_size=500", "train.checkpoint_every=25"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    cmd = [sys.executable, "-m", "mfr_sae", "train", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd + ["--out", str(tmp_path / "full")] + sets, check=True, env=env, capture_output=True)
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "cut")] + sets, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (tmp_path / "cut" / "checkpoint").exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "results.json").exists(), "the run finished before it was killed"
    done = subprocess.run(cmd + ["--resume", str(tmp_path / "cut")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    full, cut = load(tmp_path / "full"), load(tmp_path / "cut")
    for name, p in full.named_parameters():
        assert torch.equal(p, getattr(cut, name)), name


def test_an_existing_run_is_never_overwritten(tmp_path, easy_overrides):
    cfg = load_config(None, easy_overrides + ["train.n_samples=2000"])
    train(cfg, tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "results.json").read_text()
    with pytest.raises(TrainingError, match="already holds a run"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "results.json").read_text() == before


class _NaNAfter(SyntheticData):
    def sample(self, batch_size, stream=0, index=0):
        x = super().sample(batch_size, stream, index)
        if stream == 0 and index >= 3:
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
        cfg = load_config(None, easy_overrides + ["train.n_samples=100000", "mfr.enabled=true",
                                                  f"train.autocast={str(autocast).lower()}"])
        trainer = Trainer(cfg, tmp_path / str(autocast), progress=False)
        results[autocast] = trainer.fit()
        assert all(p.dtype == torch.float32 for p in trainer.ensemble.parameters())
    for fp32, bf16 in zip(results[False]["members"], results[True]["members"]):
        assert bf16["fvu"] == pytest.approx(fp32["fvu"], rel=0.1, abs=0.01)
        assert bf16["gt_mmcs"] == pytest.approx(fp32["gt_mmcs"], abs=0.03)
