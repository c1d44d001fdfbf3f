import json

from mfr_sae.cli import main


def test_train_prints_the_table_and_writes_results(tmp_path, capsys, easy_overrides):
    sets = [a for o in easy_overrides + ["train.n_samples=5000"] for a in ("--set", o)]
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress"] + sets) == 0
    out = capsys.readouterr().out
    assert "| member | k | mse |" in out and "gt_recovered_frac" in out
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
