"""gt_metrics.py: SynthSAEBench's metrics equal sae_lens.synthetic.eval_sae_on_synthetic_data's on the same SAE (one
of ours, saved and loaded by SAELens) and the same samples."""

import math

import pytest
import torch

pytest.importorskip("sae_lens")  # the [synth] extra (the test extra installs it)

from mfr_sae.checkpoint import save_checkpoint
from mfr_sae.data.synthsaebench import SynthSAEBenchData
from mfr_sae.ensemble import Ensemble
from mfr_sae.gt_metrics import GroundTruthEval, best_matches, decoder_scores, evaluate_ground_truth, mcc

N_SAMPLES = 2500  # three held-out batches, the last one partial
SMALL = {"num_features": 256, "hidden_dim": 48, "hierarchy.total_root_nodes": 2, "orthogonalization.num_steps": 10}


class Replay:
    """An activation generator (duck-typed for eval_sae_on_synthetic_data) that hands out given true activations in
    order: sae-lens evaluates on exactly the samples we do."""

    def __init__(self, activations):
        self.activations, self.start = activations, 0

    def sample(self, batch_size):
        part = self.activations[self.start : self.start + batch_size]
        self.start += batch_size
        return part


@pytest.fixture(scope="module")
def source():
    return SynthSAEBenchData("synthsaebench-1k", SMALL)


@pytest.fixture(scope="module")
def ensemble(source):
    """Two TopK members (k 5 and 8, h 96) whose latents are, by turns, true features blurred by noise, a feature
    twice (uniqueness < 1), and random directions: precision, recall and F1 well inside (0, 1); a few dead."""
    gen = torch.Generator().manual_seed(0)
    truth = source.ground_truth
    ens = Ensemble(source.d, 96, [5, 8], tied=False, decoder_bias=True, seed=1)
    with torch.no_grad():
        for m in range(2):
            rows = truth[torch.randperm(len(truth), generator=gen)[:96]].clone()
            rows[40:50] = rows[30:40]  # twins
            rows += (0.15 + 0.1 * m) * torch.randn(rows.shape, generator=gen) / math.sqrt(source.d)
            rows[80:] = torch.randn(16, source.d, generator=gen)
            rows = torch.nn.functional.normalize(rows, dim=1)
            ens.W_dec[m] = rows
            ens.W_enc[m] = rows
            ens.b_enc[m] = -0.3 * torch.rand(96, generator=gen)
            ens.b_enc[m, 90:] = -100  # dead
            ens.b_dec[m] = source.bias
    return ens.eval()


def _ensemble_forward(ens):
    def forward(x):
        out = ens(x)
        return out.x_hat, out.acts, out.idx

    return forward


def _assert_equal(ours, theirs):
    expected = {**theirs.to_dict(), **theirs.to_dict()["classification"]}
    for name, value in ours.as_dict().items():
        assert value == pytest.approx(expected[name], rel=2e-5, abs=1e-6), name


def test_equal_to_sae_lens_on_our_saved_members_and_the_same_samples(tmp_path, source, ensemble):
    import sae_lens
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    held = source.held_out(N_SAMPLES)
    ours = evaluate_ground_truth(_ensemble_forward(ensemble), ensemble.decoder(), source.ground_truth, held.batches())
    save_checkpoint(tmp_path, ensemble)
    true_acts = torch.cat([acts for _, acts in held.batches()])
    for m in range(2):
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "checkpoint" / f"member_{m}"), device="cpu")
        theirs = eval_sae_on_synthetic_data(
            sae, source.model.feature_dict, Replay(true_acts), num_samples=N_SAMPLES, batch_size=1000
        )
        _assert_equal(ours[m], theirs)
        # the SAE is neither perfect nor useless, so every metric is tested away from its bounds
        assert 0.2 < theirs.classification.f1_score < 0.95 and 0.5 < theirs.mcc < 0.99
        assert theirs.uniqueness < 0.95 and theirs.dead_latents >= 6 and 0 < theirs.explained_variance < 0.99
        # and on dense codes (SAELens's encode), batch by batch in other batches: the same numbers
        dense = evaluate_ground_truth(
            lambda x, sae=sae: (sae.decode(sae.encode(x)), sae.encode(x), None),
            sae.W_dec,
            source.ground_truth,
            ((held.vectors[s : s + 700], true_acts[s : s + 700]) for s in range(0, N_SAMPLES, 700)),
        )
        _assert_equal(dense[0], theirs)
    assert ours[0].true_l0 == ours[1].true_l0 == pytest.approx((true_acts != 0).sum().item() / N_SAMPLES)
    assert ours[0].mcc != ours[1].mcc


def test_decoder_only_metrics_and_chunking(source, ensemble):
    from sae_lens.synthetic import feature_uniqueness, mean_correlation_coefficient

    decoder = ensemble.decoder()[1].detach()
    scores = decoder_scores(decoder, source.ground_truth)
    assert scores["mcc"] == pytest.approx(mean_correlation_coefficient(decoder, source.ground_truth), abs=1e-6)
    assert scores["uniqueness"] == pytest.approx(feature_uniqueness(decoder, source.ground_truth))
    assert torch.equal(best_matches(decoder, source.ground_truth, chunk=7), best_matches(decoder, source.ground_truth))
    # more latents than features: the matching pairs every feature once
    wide = torch.cat([decoder, decoder, decoder])
    assert mcc(wide, source.ground_truth) == pytest.approx(
        mean_correlation_coefficient(wide, source.ground_truth), abs=1e-6
    )


def test_one_sae_and_no_samples():
    truth = torch.eye(4)
    accumulator = GroundTruthEval(torch.eye(4)[:3], truth)
    [empty] = accumulator.scores()
    assert (empty.sae_l0, empty.dead_latents, empty.f1_score, empty.explained_variance, empty.mcc) == (0, 3, 0, 0, 1)
    x = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]])
    codes = torch.tensor([[1.0, 0, 0], [0, 0, 0]])  # latent 0 finds feature 0; latent 1 misses feature 1
    accumulator.add(x, codes @ torch.eye(4)[:3], x, codes)
    [one] = accumulator.scores()
    assert (one.true_l0, one.sae_l0, one.dead_latents) == (1.0, 0.5, 2)
    assert (one.precision, one.recall, one.f1_score) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert one.explained_variance == pytest.approx(1 - 2.0 / (2.5 - 0.25 - 1.0))
    assert one.shrinkage == pytest.approx(0.5)


def test_a_synthsaebench_run_reports_the_benchmark_metrics_as_sae_lens_computes_them(tmp_path, monkeypatch):
    """`data.kind=synthsaebench` end to end: results.json's members carry the benchmark's metrics, equal to
    eval_sae_on_synthetic_data's on the saved member and the run's held-out samples; the run's true L0 and its
    consensus decoder beside them. The members' MCC is matched once (metrics.py's), not again here."""
    import sae_lens
    from sae_lens.synthetic import eval_sae_on_synthetic_data

    import mfr_sae.gt_metrics as gt_metrics
    from mfr_sae.config import load_config
    from mfr_sae.train import train

    matched = []  # how many decoders each call of gt_metrics.mccs matched
    real_mccs = gt_metrics.mccs
    monkeypatch.setattr(
        gt_metrics, "mccs", lambda decs, truth: matched.append(len(d := list(decs))) or real_mccs(d, truth)
    )

    overrides = [
        "data.kind=synthsaebench",
        "data.preset=synthsaebench-1k",
        "data.synth={num_features: 256, hidden_dim: 48, hierarchy.total_root_nodes: 2,"
        " orthogonalization.num_steps: 10}",
        "sae.architecture=batchtopk",
        "sae.d_sae=96",
        "sae.k=6",
        "train.n_samples=20000",
        "train.batch_size=500",
        "eval.n_samples=1500",
        "mfr.enabled=true",
    ]
    results = train(load_config(None, overrides), tmp_path / "run", progress=False)
    assert matched == [1]  # the consensus decoder's alone
    source = SynthSAEBenchData("synthsaebench-1k", SMALL)  # the run's model and held-out samples, drawn again
    true_acts = torch.cat([acts for _, acts in source.held_out(1500).batches()])
    assert results["true_l0"] == pytest.approx((true_acts != 0).sum().item() / 1500)
    assert set(results["consensus"]) == {"mcc", "uniqueness"} and 0 < results["consensus"]["mcc"] < 1
    for m, member in enumerate(results["members"]):
        sae = sae_lens.SAE.load_from_disk(str(tmp_path / "run" / "checkpoint" / f"member_{m}"), device="cpu")
        theirs = eval_sae_on_synthetic_data(sae, source.model.feature_dict, Replay(true_acts), num_samples=1500)
        assert member["gt_f1"] == pytest.approx(theirs.classification.f1_score, rel=2e-5, abs=1e-6)
        assert member["gt_mcc"] == pytest.approx(theirs.mcc, rel=2e-5)
        assert member["gt_uniqueness"] == pytest.approx(theirs.uniqueness)
        assert member["gt_explained_variance"] == pytest.approx(theirs.explained_variance, rel=2e-5)
        assert member["gt_shrinkage"] == pytest.approx(theirs.shrinkage, rel=2e-5)
        assert member["gt_dead_latents"] == theirs.dead_latents
