"""evaluate.py: `mfr-sae evaluate RUN` on a run trained on a language model's activations, offline."""

import json

import pytest

from mfr_sae.cli import main
from mfr_sae.evaluate import model_label

PROBE_DATASETS = "131_temp_cat_Typical Time,134_context_type_Belief_states"  # two short sae-probes tasks


def test_a_run_not_on_lm_activations_is_a_one_line_error(tmp_path, easy_overrides, capsys):
    run = tmp_path / "run"
    sets = [arg for o in easy_overrides + ["train.n_samples=2000"] for arg in ("--set", o)]
    assert main(["train", "--out", str(run), "--no-progress", *sets]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.kind=synthetic, not on a language model's activations" in err
    assert main(["evaluate", str(tmp_path / "nothing"), "--no-progress"]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_model_label_has_no_slash():
    assert model_label("HuggingFaceTB/SmolLM2-135M") == "SmolLM2-135M"
    assert model_label("/cache/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"


def test_sparse_probing_of_a_tiny_lm_run_end_to_end(tmp_path, cache_command):
    """A run on a tiny GPT-2's activations: evaluation.json holds the core metrics and the probing of each member
    beside the raw-activation probe, and evaluation.md reports them."""
    pytest.importorskip("sae_probes")
    cache = tmp_path / "cache"
    assert main(cache_command("blocks.1.hook_resid_post", cache, 3000, 32)) == 0
    run = tmp_path / "run"
    sets = [
        "data.kind=activations",
        f"data.path={cache}",
        "data.holdout=500",
        "sae.d_sae=64",
        "sae.k=4",
        "train.n_samples=2000",
        "train.batch_size=250",
        "eval.n_samples=500",
        "eval.lm_sequences=2",
    ]
    assert main(["train", "--out", str(run), "--no-progress", *[a for o in sets for a in ("--set", o)]]) == 0
    args = ["evaluate", str(run), "--probe-datasets", PROBE_DATASETS, "--no-absorption"]
    assert main([*args, "--probe-cache", str(tmp_path / "acts"), "--no-progress"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert [m["member"] for m in evaluation["core"]] == [0, 1] and "fvu" in evaluation["core"][0]
    probing = evaluation["probing"]
    assert probing["datasets"] == PROBE_DATASETS.split(",") and len(probing["members"]) == 2
    assert 0.5 < probing["baseline"]["test_auc"] <= 1
    assert all(0 <= scores["test_auc"] <= 1 for m in probing["members"] for scores in m["by_k"].values())
    assert "absorption" not in evaluation
    report = (run / "evaluation.md").read_text()
    assert "raw activations (reference)" in report and "AUC k=1" in report
