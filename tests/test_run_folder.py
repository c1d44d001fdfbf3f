"""The run folder's lock: one process per run folder, whichever comes second is refused in one line, and a
killed holder leaves no stale lock."""

import os
import signal
import subprocess
import sys
import time

import pytest

from mfr_sae.cli import main
from mfr_sae.config import load_config
from mfr_sae.run_folder import LOCK_FILE, TrainingError, locked
from mfr_sae.train import train


def _mfr_sae(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mfr_sae", *args], stderr=subprocess.PIPE, text=True)


def test_a_second_process_on_a_running_training_is_refused_and_a_kill_leaves_no_stale_lock(
    tmp_path, easy_overrides, capsys
):
    run = tmp_path / "run"
    sets = [a for o in easy_overrides + ["train.n_samples=20000000", "train.checkpoint_every=20"] for a in ("--set", o)]
    first = _mfr_sae("train", "--out", str(run), "--no-progress", *sets)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint").is_dir():  # training, and past its first checkpoint
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.stderr else ""
            time.sleep(0.2)
        for argv in (["train", "--resume", str(run)], ["train", "--out", str(run), "--overwrite", *sets]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"{run} is in use by process {first.pid}" in err
        assert first.poll() is None  # the first run goes on, untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with locked(run):  # the lock died with its process: nothing stale is left to refuse the next one
        assert (run / "checkpoint").is_dir()


def test_a_resume_while_this_process_holds_the_run_is_refused_naming_it(tmp_path, easy_overrides):
    run = tmp_path / "run"
    train(load_config(None, easy_overrides + ["train.n_samples=4000"]), run, progress=False)
    with locked(run):
        assert (run / LOCK_FILE).read_text() == str(os.getpid())
        second = _mfr_sae("train", "--resume", str(run))
        _, err = second.communicate(timeout=120)
    assert second.returncode == 2 and err.count("\n") == 1
    assert f"{run} is in use by process {os.getpid()}" in err
    assert not (run / LOCK_FILE).exists()  # released: the folder holds the run's files only


def test_a_lock_taken_for_a_new_folder_that_gets_nothing_else_leaves_nothing(tmp_path):
    with locked(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
        with pytest.raises(TrainingError, match="is in use by process"), locked(tmp_path / "new"):
            pass  # a second holder, even in this process, is refused
    assert not (tmp_path / "new").exists()
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(TrainingError, match="a-file is a file, not a run folder"), locked(tmp_path / "a-file"):
        pass
    assert (tmp_path / "a-file").read_text() == "mine"
