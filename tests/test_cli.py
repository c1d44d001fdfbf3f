import builtins
import errno
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from mfr_sae import cli, extras, files, load, run_log
from mfr_sae.cli import main
from mfr_sae.run_folder import checkpoint_step
from mfr_sae.train import Interrupted


def test_train_prints_the_table_and_writes_results(tmp_path, capsys, easy_overrides):
    sets = [a for o in easy_overrides + ["train.n_samples=5000"] for a in ("--set", o)]
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"] + sets) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    assert out.startswith(f"training {run} from step 0 of 5: 2 topk SAEs of 128 latents, k 3; MFR off: the baseline")
    assert "| member | k | mse |" in out and "gt_recovered_frac" in out
    assert "dead_frac n/a: run shorter than eval.dead_window (1,000,000 vectors)" in out  # why n/a, beside it
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["members"]) == 2


def test_a_bad_key_is_a_one_line_error_and_writes_nothing(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path / "run"), "--set", "sae.kk=3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown key 'sae.kk'" in err
    assert not (tmp_path / "run").exists()


def test_resume_refuses_new_settings(tmp_path, capsys):
    code = main(["train", "--resume", str(tmp_path), "--set", "train.lr=1"])
    assert code == 2 and "--resume takes the run's own config.yaml" in capsys.readouterr().err


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "none")]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_help_is_wrapped_to_the_terminal_width(monkeypatch, capsys):
    from mfr_sae.config import help_text

    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "\n    data.kind (str, default 'synthetic')\n        Where vectors come from:" in out  # indentation kept
    assert " ".join(help_text().split()) in " ".join(out.split())  # nothing lost


def test_overwrite_is_passed_to_train_and_refused_with_resume(monkeypatch, tmp_path, capsys):
    seen = []

    def fake_train(cfg, out, progress=True, overwrite=False):
        seen.append(overwrite)
        return {"members": [{"member": 0, "k": 3}]}

    monkeypatch.setattr(cli, "train", fake_train)
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", "--overwrite"]) == 0
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert seen == [True, False]
    assert main(["train", "--resume", str(tmp_path / "run"), "--overwrite"]) == 2
    assert "drop --config, --set, --out and --overwrite" in capsys.readouterr().err


def test_an_interrupted_run_exits_130_with_the_resume_command(monkeypatch, tmp_path, capsys):
    def stopped(cfg, out, progress=True, overwrite=False):
        raise Interrupted(7, out, 5)

    monkeypatch.setattr(cli, "train", stopped)
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    resume = f"`mfr-sae train --resume {tmp_path / 'run'}`"
    assert err == f"mfr-sae: interrupted at step 7; {resume} goes on from the checkpoint of step 5\n"


def _missing(monkeypatch, *modules):
    """Simulate absent packages: `import name` raises ImportError while sys.modules[name] is None."""
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)


def _one_line_error(capsys, needs, extra):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("mfr-sae: error: ") and err.endswith(f"needs {needs}: {extras.hint(needs)}\n")
    assert f"[{extra}]" in extras.hint(needs)


@pytest.mark.parametrize(
    "direct_url, expected",
    [
        (None, 'pip install "mfr-sae[eeg]"'),  # from a package index: no direct_url.json
        ('{"url": "file:///src/mfr%20sae", "dir_info": {"editable": true}}', 'pip install -e "/src/mfr sae[eeg]"'),
        ('{"url": "file:///src/mfr-sae", "dir_info": {}}', 'pip install "/src/mfr-sae[eeg]"'),
        ('{"url": "https://example.org/mfr_sae-1.0.whl", "archive_info": {}}', 'pip install "mfr-sae[eeg]"'),
    ],
)
def test_the_extras_hint_fits_the_way_mfr_sae_was_installed(monkeypatch, direct_url, expected):
    class Distribution:
        def read_text(self, name):
            return direct_url if name == "direct_url.json" else None

    monkeypatch.setattr(extras.importlib.metadata, "distribution", lambda name: Distribution())
    assert extras.hint("mne") == expected


def test_missing_mne_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path, capsys):
    _missing(monkeypatch, "mne")
    (tmp_path / "rec.fif").write_bytes(b"")
    assert (
        main(
            [
                "train",
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
                "--set",
                "data.kind=eeg",
                "--set",
                f"data.path={tmp_path / 'rec.fif'}",
            ]
        )
        == 2
    )
    _one_line_error(capsys, "mne", "eeg")
    assert (
        main(["reproduce", "eeg", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "rep"), "--no-progress"])
        == 2
    )
    _one_line_error(capsys, "mne", "eeg")
    assert not (tmp_path / "rep").exists()  # refused before anything was written or announced


def test_missing_transformers_datasets_or_gguf_are_one_line_errors_naming_the_extra(monkeypatch, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sees the dog\n")
    _missing(monkeypatch, "datasets")
    assert main(["cache", "--text", "someone/some-dataset", "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    _one_line_error(capsys, "datasets", "lm")
    if importlib.util.find_spec("transformers") is not None:
        _missing(monkeypatch, "gguf")
        (tmp_path / "m.gguf").write_bytes(b"")
        assert (
            main(
                [
                    "cache",
                    "--model",
                    str(tmp_path / "m.gguf"),
                    "--text",
                    str(text),
                    "--out",
                    str(tmp_path / "c"),
                    "--no-progress",
                ]
            )
            == 2
        )
        _one_line_error(capsys, "gguf", "lm")
    _missing(monkeypatch, "transformers")
    assert main(["cache", "--text", str(text), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    _one_line_error(capsys, "transformers", "lm")
    assert not (tmp_path / "c").exists()


CORRUPT = "is corrupt: its SHA-256 is not the one recorded when the checkpoint was written"


def _sets(overrides):
    return [arg for o in overrides for arg in ("--set", o)]


@pytest.fixture
def tiny_run(tmp_path, easy_overrides, capsys):
    """A trained run of 2 steps, its checkpoint holding every kind of file."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--no-progress", *_sets(easy_overrides + ["train.n_samples=2000"])]) == 0
    capsys.readouterr()
    return run


@pytest.mark.parametrize(
    "name",
    [
        "member_1/cfg.json",
        "member_1/sae_weights.safetensors",
        "member_1/sparsity.safetensors",
        "trainer_state.safetensors",
    ],
)
def test_a_flipped_byte_in_a_checkpoint_file_is_named_in_one_line_by_resume_compare_and_verify(
    tiny_run, name, flip_byte, capsys
):
    path = tiny_run / "checkpoint" / name
    flip_byte(path)
    (tiny_run / "results.json").unlink()  # unfinished: --resume reads the checkpoint
    assert main(["train", "--resume", str(tiny_run), "--no-progress"]) == 2
    assert capsys.readouterr().err == f"mfr-sae: error: {path} {CORRUPT}\n"
    if name.startswith("member_"):  # what the Python loading reads (compare, reports)
        assert main(["compare", str(tiny_run), str(tiny_run), "--out", str(tiny_run.parent / "cmp")]) == 2
        assert capsys.readouterr().err == f"mfr-sae: error: {path} {CORRUPT}\n"
    assert main(["verify", str(tiny_run)]) == 1
    assert capsys.readouterr().out == f"{path} {CORRUPT}\n"


def test_verify_of_an_intact_run_of_one_written_before_digests_and_of_no_run(tiny_run, capsys):
    assert main(["verify", str(tiny_run)]) == 0
    checkpoint = tiny_run / "checkpoint"
    assert (
        capsys.readouterr().out == f"{checkpoint}: intact, 7 files match the SHA-256 recorded when they were written\n"
    )
    (checkpoint / "digests.json").unlink()
    assert main(["verify", str(checkpoint)]) == 0
    assert capsys.readouterr().out == (
        f"{checkpoint}: no SHA-256 recorded (written before checkpoints recorded them), nothing to check\n"
    )
    assert main(["verify", str(tiny_run.parent / "none")]) == 2
    assert capsys.readouterr().err == f"mfr-sae: error: no SAE or run found at {tiny_run.parent / 'none'}\n"


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_ends_as_an_uninterrupted_run(
    tmp_path, easy_overrides, full_disk, capsys
):
    sets = _sets(easy_overrides + ["train.n_samples=30000", "train.checkpoint_every=10"])
    assert main(["train", "--out", str(tmp_path / "full"), "--no-progress", *sets]) == 0
    run = tmp_path / "cut"
    # the checkpoint of step 20 fails partway, once that of step 10 is in place and member_0's files are written
    full_disk(lambda path: (run / "checkpoint").is_dir() and path.parent.name == "member_1")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--no-progress", *sets]) == 2
    assert capsys.readouterr().err == (
        f"mfr-sae: error: cannot write the checkpoint {run / 'checkpoint.tmp'} (No space left on device); it was "
        f"removed and the previous checkpoint {run / 'checkpoint'} is untouched: free space on that disk (or make "
        f"it writable), then run `mfr-sae train --resume {run}`\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.yaml", "metrics.jsonl"]
    assert checkpoint_step(run / "checkpoint") == 10 and load(run).ks == [3, 3]
    full_disk(lambda path: False)  # space freed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    cut = load(run)
    for name, p in load(tmp_path / "full").named_parameters():
        assert torch.equal(p, getattr(cut, name)), name


class _FillingFile:
    """A file open for writing on a disk that fills up: a write for which `full(text)` holds puts half its text
    in the file, then fails as the operating system's write does (errno `error`, no file name)."""

    def __init__(self, file, full, error):
        self.file, self.full, self.error = file, full, error

    def write(self, text):
        if self.full(text):
            self.file.write(text[: len(text) // 2])
            raise OSError(self.error, os.strerror(self.error))
        return self.file.write(text)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


@pytest.fixture
def filling_disk(monkeypatch):
    """`filling_disk(module, full, error=ENOSPC)`: the files `module` opens for writing fail as `_FillingFile`s
    once `full(path, text)` holds."""

    def arm(module, full, error=errno.ENOSPC):
        def fake_open(path, mode="r", *args, **kwargs):
            file = builtins.open(path, mode, *args, **kwargs)  # noqa: SIM115 (its caller closes it)
            if "w" not in mode and "a" not in mode:
                return file
            return _FillingFile(file, lambda text: full(Path(path), text), error)

        monkeypatch.setattr(module, "open", fake_open, raising=False)

    return arm


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    return err


def test_a_full_disk_while_writing_metrics_is_one_line_and_the_checkpoint_before_it_resumes(
    tmp_path, easy_overrides, filling_disk, capsys
):
    run, disk = tmp_path / "run", {"full": True}
    sets = _sets(easy_overrides + ["train.n_samples=30000", "train.checkpoint_every=10", "train.log_every=5"])
    # the disk fills after the checkpoint of step 10: the line of step 15 is cut off
    filling_disk(run_log, lambda path, text: disk["full"] and json.loads(text)["step"] > 10)
    assert main(["train", "--out", str(run), "--no-progress", *sets]) == 2
    assert _one_line(capsys) == (
        f"mfr-sae: error: could not write {run / 'metrics.jsonl'}: No space left on device (the checkpoint of step "
        f"10 is intact: free space on that disk (or make it writable), then `mfr-sae train --resume {run}` goes "
        "on from it)\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.yaml", "metrics.jsonl"]
    assert checkpoint_step(run / "checkpoint") == 10 and load(run).ks == [3, 3]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()[:2]] == [5, 10]
    disk["full"] = False  # space freed
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [5, 10, 15, 20, 25, 30]  # the cut line is gone


@pytest.mark.parametrize(
    "error, words",
    [
        (errno.ENOSPC, "could not write"),
        (errno.EDQUOT, "could not write"),
        (errno.EROFS, "could not write"),
        (errno.EACCES, "could not access"),  # permission is refused to reads too
    ],
)
def test_a_refused_write_of_config_yaml_is_one_line_and_leaves_nothing(
    tmp_path, easy_overrides, filling_disk, capsys, error, words
):
    run = tmp_path / "run"
    filling_disk(files, lambda path, text: path.name == ".config.yaml.tmp", error)
    assert main(["train", "--out", str(run), "--no-progress", *_sets(easy_overrides)]) == 2
    assert _one_line(capsys) == f"mfr-sae: error: {words} {run / 'config.yaml'}: {os.strerror(error)}\n"
    assert not run.exists()  # the half-written config went, and the folder made for the run with it


def test_a_full_disk_while_writing_results_is_one_line_and_resume_writes_them(
    tmp_path, easy_overrides, filling_disk, capsys
):
    run, disk = tmp_path / "run", {"full": True}
    filling_disk(files, lambda path, text: disk["full"] and path.name == ".results.json.tmp")
    assert main(["train", "--out", str(run), "--no-progress", *_sets(easy_overrides + ["train.n_samples=2000"])]) == 2
    assert _one_line(capsys) == (
        f"mfr-sae: error: could not write {run / 'results.json'}: No space left on device (the checkpoint of step 2 "
        f"is intact: free space on that disk (or make it writable), then `mfr-sae train --resume {run}` goes on "
        "from it)\n"
    )
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint", "config.yaml", "metrics.jsonl"]  # no .tmp
    assert checkpoint_step(run / "checkpoint") == 2 and load(run).ks == [3, 3]
    disk["full"] = False
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert len(json.loads((run / "results.json").read_text())["members"]) == 2


def test_an_os_error_that_is_no_refused_write_keeps_its_traceback(tmp_path, easy_overrides, filling_disk):
    run = tmp_path / "run"
    filling_disk(files, lambda path, text: path.name == ".results.json.tmp", errno.EIO)
    with pytest.raises(OSError) as raised:  # a bug (or a failing disk): not a one-line user error
        main(["train", "--out", str(run), "--no-progress", *_sets(easy_overrides + ["train.n_samples=2000"])])
    assert raised.value.errno == errno.EIO and raised.value.filename == str(run / "results.json")


def test_a_full_disk_before_the_first_checkpoint_removes_the_new_run_and_says_to_start_again(
    tmp_path, easy_overrides, filling_disk, capsys
):
    run = tmp_path / "run"
    filling_disk(run_log, lambda path, text: True)
    sets = _sets(easy_overrides + ["train.n_samples=2000", "train.log_every=1"])
    assert main(["train", "--out", str(run), "--no-progress", *sets]) == 2
    assert _one_line(capsys) == (
        f"mfr-sae: error: could not write {run / 'metrics.jsonl'}: No space left on device (no checkpoint yet, and "
        "this run's files were removed: free space on that disk (or make it writable), then run the same command "
        "again)\n"
    )
    assert not run.exists()  # nothing left to block the retry


def test_only_commands_that_train_keep_freed_memory_in_the_heap(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "keep_freed_cpu_memory", lambda: calls.append(True))
    missing = str(tmp_path / "missing")
    assert cli.main(["browse", missing, "--out", str(tmp_path / "site")]) == 2  # reads a run: heap left as it is
    assert calls == []
    assert cli.main(["train", "--config", missing + ".yaml", "--out", str(tmp_path / "run")]) == 2
    assert calls == [True]
