import json

import pytest
import torch

from mfr_sae import load
from mfr_sae.batchtopk import THRESHOLD_RATE, UNSET, batch_topk, jumprelu
from mfr_sae.checkpoint import save_checkpoint
from mfr_sae.config import load_config
from mfr_sae.distributed import Shard
from mfr_sae.ensemble import Ensemble
from mfr_sae.metrics import reconstruction_metrics
from mfr_sae.tied_kernel import tied_topk
from mfr_sae.train import train


def dense(values, idx, h):
    """(values, idx) [N, B, k'] as a dense [N, B, h]."""
    return values.new_zeros(*values.shape[:2], h).scatter_add(2, idx, values)


def dense_batch_topk(pre, ks):
    """Each member's k B largest ReLU'd pre-activations over the whole batch, by sorting all of them."""
    relu = pre.relu().transpose(0, 1).contiguous()  # [N, B, h]
    out = torch.zeros_like(relu)
    for n, k in enumerate(ks):
        flat = relu[n].flatten()
        top = flat.topk(k * pre.shape[0]).indices
        out[n].view(-1)[top] = flat[top]
    return out


@pytest.mark.parametrize("case", ["spread", "one_sample_holds_most", "few_positive"])
def test_batch_topk_equals_sorting_the_whole_batch(case):
    torch.manual_seed(0)
    pre = torch.randn(32, 3, 50, dtype=torch.float64)
    if case == "one_sample_holds_most":  # sample 0 holds the 40 largest of member 0: k_cap grows past 2k
        pre[0, 0] += 10
    if case == "few_positive":  # fewer positive entries than k B: all of them kept, the rest zero
        pre = pre - 2.5
    ks = [2, 3, 4]
    values, idx = batch_topk(pre, ks)
    assert values.shape[:2] == (3, 32) and values.shape == idx.shape
    torch.testing.assert_close(dense(values, idx, 50), dense_batch_topk(pre, ks), rtol=0, atol=0)
    ordered = idx.sort(dim=-1).values  # every slot names its own latent, kept or not (as a top-k's do)
    assert (ordered[..., 1:] != ordered[..., :-1]).all()
    kept = (values > 0).sum(dim=(1, 2))
    if case == "few_positive":
        assert (kept < torch.tensor(ks) * 32).all()
    else:
        assert kept.tolist() == [k * 32 for k in ks]  # k per sample on average, exactly
    if case == "one_sample_holds_most":
        assert (values[0, 0] > 0).sum() >= 40


def test_jumprelu_keeps_what_is_above_each_members_threshold():
    torch.manual_seed(1)
    pre = torch.randn(20, 2, 30)
    threshold = torch.tensor([0.5, -1.0])  # below 0: ReLU
    values, idx = jumprelu(pre, threshold)
    expected = pre.relu() * (pre > threshold.view(1, -1, 1))
    torch.testing.assert_close(dense(values, idx, 30), expected.transpose(0, 1), rtol=0, atol=0)


def test_the_tied_kernel_with_batch_topk_has_the_gradient_of_the_dense_reference():
    torch.manual_seed(2)
    x = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 9, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    select = lambda pre: batch_topk(pre, [2, 3])  # noqa: E731
    assert torch.autograd.gradcheck(lambda x, w, b: tied_topk(x, w, b, select)[0], (x, w, bias))
    out = tied_topk(x, w, bias, select)[0]
    pre = torch.einsum("bd,nhd->bnh", x, w) + bias
    codes = dense_batch_topk(pre, [2, 3])
    torch.testing.assert_close(out, torch.bmm(codes, torch.nn.functional.normalize(w, dim=-1)))


def test_the_threshold_follows_the_smallest_kept_activation_and_the_saved_member_is_jumprelu(tmp_path):
    torch.manual_seed(3)
    ens = Ensemble(6, 16, [2, 3], architecture="batchtopk")
    x = torch.randn(40, 6)
    out = ens(x)  # training mode: BatchTopK
    assert ((out.acts > 0).sum(dim=(1, 2)) == torch.tensor([80, 120])).all()
    assert (ens.threshold == UNSET).all()
    ens.architecture.after_step(ens, out.acts, Shard(2))
    smallest = torch.where(out.acts > 0, out.acts, torch.inf).flatten(1).amin(1)
    torch.testing.assert_close(ens.threshold, smallest)  # the first batch's
    ens.architecture.after_step(ens, out.acts / 2, Shard(2))
    torch.testing.assert_close(ens.threshold, smallest - THRESHOLD_RATE * smallest / 2)  # then a running mean
    ens.reset_member(1)
    assert ens.threshold[1] == UNSET
    ens.threshold.fill_(0.2)
    with ens.as_saved():
        saved = ens(x)
    assert ens.training
    pre = x @ ens.W_enc.transpose(1, 2) + ens.b_enc.unsqueeze(1)
    codes = pre.relu() * (pre > 0.2)
    torch.testing.assert_close(saved.x_hat, torch.bmm(codes, ens.decoder()))
    save_checkpoint(tmp_path, ens)
    cfg = json.loads((tmp_path / "checkpoint" / "member_1" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["mfr_sae"]["architecture"] == "batchtopk"
    loaded = load(tmp_path)
    assert not loaded.training and loaded.threshold.tolist() == pytest.approx([0.2, 0.2])
    torch.testing.assert_close(loaded(x).x_hat, saved.x_hat)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_saelens_loads_a_batchtopk_member_as_jumprelu_and_agrees(tmp_path, architecture):
    import sae_lens  # the test extra pins it (.ci/run)

    torch.manual_seed(4)
    ens = Ensemble(6, 16, [2, 3], tied=False, decoder_bias=True, architecture=architecture)
    with torch.no_grad():
        ens.b_dec.normal_()
        ens.b_enc.normal_(0, 0.1)
    ens.threshold.copy_(torch.tensor([0.1, 0.3]))
    save_checkpoint(tmp_path, ens)
    sae = sae_lens.SAE.load_from_disk(str(tmp_path / "checkpoint" / "member_1"), device="cpu")
    assert type(sae).__name__ == "JumpReLUSAE"
    x = torch.randn(9, 6)
    with ens.as_saved():
        torch.testing.assert_close(sae(x), ens(x).x_hat[1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["batchtopk", "matryoshka"])
def test_a_batchtopk_run_with_mfr_resumes_to_the_same_weights_and_reports_its_saved_form(
    tmp_path, easy_overrides, architecture, cut_and_resumed
):
    overrides = easy_overrides + [
        f"sae.architecture={architecture}",
        "mfr.enabled=true",
        "train.n_samples=40000",
        "train.checkpoint_every=15",
        "train.log_every=5",
    ]
    full = train(load_config(None, overrides), tmp_path / "full", progress=False)
    trainer, resumed = cut_and_resumed(overrides, tmp_path / "cut", 22)
    full_model, cut_model = load(tmp_path / "full"), load(tmp_path / "cut")
    for name, tensor in full_model.state_dict().items():
        assert torch.equal(tensor, cut_model.state_dict()[name]), name
    assert resumed["members"] == full["members"] and full_model.threshold.min() > 0
    # results.json's FVU is the saved (JumpReLU) members' own
    fvu = reconstruction_metrics(full_model, trainer.source.eval_vectors(5000))["fvu"]
    assert [m["fvu"] for m in full["members"]] == pytest.approx(fvu.tolist(), rel=1e-5)
    with full_model.as_saved():
        full_model.train()  # the training form (BatchTopK) reconstructs otherwise
        assert reconstruction_metrics(full_model, trainer.source.eval_vectors(5000))["fvu"].tolist() != fvu.tolist()
