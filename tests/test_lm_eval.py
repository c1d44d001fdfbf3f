import json

import pytest
import torch

pytest.importorskip("transformers")

from mfr_sae.cli import main
from mfr_sae.data.activations import read_texts, token_sequences
from mfr_sae.data.lm_model import load_model, splice
from mfr_sae.ensemble import Ensemble
from mfr_sae.lm_eval import loss_recovered


def identity_sae(d: int) -> Ensemble:
    """A TopK SAE that reconstructs exactly: latents relu(x) and relu(-x), decoder rows +e_i and -e_i."""
    ens = Ensemble(d, 2 * d, [2 * d])
    with torch.no_grad():
        ens.W_enc[0] = torch.cat([torch.eye(d), -torch.eye(d)])
    return ens


def test_identity_splice_gives_the_clean_loss_and_zero_ablation_does_not(tiny_gpt2):
    model, tokenizer = load_model(str(tiny_gpt2[0]))
    seqs = torch.stack(list(token_sequences(read_texts(str(tiny_gpt2[1])), tokenizer, 16))[:12])
    module = model.transformer.h[0].mlp
    with splice(module, lambda out: out):
        assert torch.equal(model(input_ids=seqs).logits, model(input_ids=seqs).logits)
    result = loss_recovered(model, module, identity_sae(32), seqs, batch_size=5)
    member = result["members"][0]
    assert member["ce_sae"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert member["frac_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert member["kl"] == pytest.approx(0.0, abs=1e-6)
    assert abs(result["ce_zero"] - result["ce_clean"]) > 1e-3
    assert result["tokens"] == 12 * 15
    # a useless SAE (all latents dead) recovers nothing: it is the zero ablation
    dead = Ensemble(32, 8, [2])
    with torch.no_grad():
        dead.b_enc.fill_(-1e4)
    useless = loss_recovered(model, module, dead, seqs)["members"][0]
    assert useless["frac_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_cache_then_train_baseline_and_mfr_then_loss_recovered(cache_command, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(cache_command("blocks.0.hook_mlp_out", cache, 6000, 16)) == 0
    assert "6000 vectors of d=32" in capsys.readouterr().out
    base = [
        "data.kind=activations",
        f"data.path={cache}",
        "data.holdout=500",
        "sae.d_sae=64",
        "sae.k=[4, 8]",
        "train.batch_size=100",
        "train.n_samples=20000",
        "train.lr=3e-3",
        "eval.n_samples=500",
        "eval.lm_sequences=20",
        "train.checkpoint_every=0",
    ]
    for name, extra in [("baseline", []), ("mfr", ["mfr.enabled=true"])]:
        sets = [a for o in base + extra for a in ("--set", o)]
        assert main(["train", "--out", str(tmp_path / name), "--no-progress"] + sets) == 0
    for name in ("baseline", "mfr"):
        results = json.loads((tmp_path / name / "results.json").read_text())
        assert results["config"]["data"]["d"] == 32 and results["lm"]["sequences"] == 20
        assert results["lm"]["ce_zero"] > results["lm"]["ce_clean"] + 0.05  # the layer matters
        for member in results["members"]:
            for key in ("k", "mse", "ce_clean", "ce_zero", "ce_sae", "frac_recovered", "kl"):
                assert key in member
            assert member["kl"] > 0
            if name == "baseline":  # a trained SAE recovers most of what zero ablation loses
                assert member["frac_recovered"] > 0.5 and member["fvu"] < 0.5
    assert json.loads((tmp_path / "mfr" / "results.json").read_text())["mfr"] is True
