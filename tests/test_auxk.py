import json

import pytest
import torch
from torch.nn import functional as F

from mfr_sae.auxk import auxk_loss
from mfr_sae.config import ConfigError, load_config
from mfr_sae.ensemble import Ensemble
from mfr_sae.train import Trainer


def dense_auxk(ensemble, x, residual, dead, k_aux):
    """The AuxK loss written densely: every latent's pre-activation, the live ones masked out."""
    losses = []
    for n in range(ensemble.n_members):
        inputs = x if ensemble.b_dec is None else x - ensemble.b_dec[n]
        pre = inputs @ ensemble.W_enc[n].T + ensemble.b_enc[n]
        pre = pre.masked_fill(~dead[n], -torch.inf)
        top = pre.topk(min(k_aux, int(dead[n].sum())), dim=1)
        codes = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
        e_hat = codes @ F.normalize(ensemble.decoder_weight[n], dim=-1)
        e = residual[n]
        loss = (e_hat - e).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
        losses.append(loss if dead[n].any() else loss * 0)  # a member without dead latents: no AuxK
    return torch.stack(losses)


def dead_latents(pattern: str) -> torch.Tensor:
    """[2, 20]: a share of random latents, or one member with 3 dead latents and the other 6 (k_aux 4 between
    them), or one member with none."""
    if pattern in ("uneven", "one empty"):
        dead = torch.zeros(2, 20, dtype=torch.bool)
        dead[0, [1, 5, 9][: 3 if pattern == "uneven" else 0]] = True
        dead[1, [0, 2, 3, 11, 17, 19]] = True
        return dead
    return torch.rand(2, 20) < float(pattern)


@pytest.mark.parametrize("k_aux", [4, 20])  # fewer than the dead latents, and all of them
@pytest.mark.parametrize("pattern", ["0.4", "0.9", "uneven", "one empty"])  # up to d (8) dead latents, or more
@pytest.mark.parametrize("tied, decoder_bias", [(True, False), (False, True)])
def test_auxk_equals_the_dense_reference_in_value_and_gradient(perturbed_ensemble, tied, decoder_bias, k_aux, pattern):
    ensemble = perturbed_ensemble(tied, decoder_bias)
    x = torch.randn(16, 8, dtype=torch.float64)
    residual = torch.randn(2, 16, 8, dtype=torch.float64)
    dead = dead_latents(pattern)

    def auxk_of_read_pre(ensemble, x, residual, dead, k_aux):  # as the trainer: pre-activations from the forward
        read_pre = ensemble(x, dead.flatten().nonzero().squeeze(1)).read_pre
        return auxk_loss(ensemble, x, residual, dead, k_aux, read_pre)

    values, grads = [], []
    for loss_of in (auxk_loss, auxk_of_read_pre, dense_auxk):
        ensemble.zero_grad()
        loss = loss_of(ensemble, x, residual, dead, k_aux)
        loss.sum().backward()
        values.append(loss.detach())
        # the weights' gradient is sparse (the dead rows alone): compared densely
        grads.append({name: p.grad.to_dense() for name, p in ensemble.named_parameters()})
    for value, grad in zip(values[:2], grads[:2]):
        torch.testing.assert_close(value, values[2])
        for name in grads[2]:
            torch.testing.assert_close(grad[name], grads[2][name], msg=name)
    assert torch.equal(values[0] > 0, dead.any(1))  # 0 for a member without dead latents
    # only the dead latents' rows take its gradient
    live = ~dead
    assert torch.equal(grads[0]["W_enc"][live], torch.zeros_like(grads[0]["W_enc"][live]))
    assert grads[0]["W_enc"][dead].abs().sum() > 0


def test_auxk_reads_no_pre_activations_rounded_by_autocast():
    # under bf16 autocast the forward pass's pre-activations are bf16; AuxK picks its top k_aux among them, so it
    # computes its own product in the input's precision instead (a bf16 read moved the gradient by ~1e-2)
    torch.manual_seed(2)
    ensemble = Ensemble(16, 64, [2, 3], tied=False, decoder_bias=True)
    x, residual = torch.randn(64, 16), torch.randn(2, 64, 16)
    dead = torch.rand(2, 64) < 0.3
    with torch.autocast("cpu", torch.bfloat16):
        read_pre = ensemble(x, dead.flatten().nonzero().squeeze(1)).read_pre
    assert read_pre.dtype == torch.bfloat16
    grads = []
    for pre in (None, read_pre):
        ensemble.zero_grad()
        auxk_loss(ensemble, x, residual, dead, 4, pre).sum().backward()
        grads.append(ensemble.W_enc.grad.to_dense())
    torch.testing.assert_close(grads[1], grads[0])


def test_auxk_under_bf16_autocast_is_close_to_fp32():
    torch.manual_seed(1)
    ensemble = Ensemble(16, 40, [2, 3, 4])
    x, residual = torch.randn(32, 16), torch.randn(3, 32, 16)
    dead = torch.rand(3, 40) < 0.3
    want = auxk_loss(ensemble, x, residual, dead, 8)
    with torch.autocast("cpu", torch.bfloat16):
        got = auxk_loss(ensemble, x, residual, dead, 8)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=3e-2, atol=1e-3)


def test_auxk_is_zero_for_a_member_without_dead_latents():
    ensemble = Ensemble(8, 20, [2, 2])
    dead = torch.zeros(2, 20, dtype=torch.bool)
    dead[1, :5] = True
    loss = auxk_loss(ensemble, torch.randn(4, 8), torch.randn(2, 4, 8), dead, 3)
    assert loss[0] == 0 and loss[1] > 0


def test_a_training_step_with_auxk_logs_it_and_moves_only_dead_latents_by_it(tmp_path, easy_overrides):
    overrides = easy_overrides + ["train.n_samples=4000", "sae.aux_dead_window=2000", "train.log_every=1"]
    grads = {}
    for coef in (0.0, 1 / 32):
        trainer = Trainer(load_config(None, [*overrides, f"sae.aux_coef={coef}"]), tmp_path / str(coef), progress=False)
        x = next(trainer.source.batches(1000))
        logs = trainer.train_step(x)  # nothing has been silent for 2,000 vectors yet
        assert ("aux_loss" in logs) == (coef > 0) and (coef == 0 or logs["aux_loss"].sum() == 0)
        trainer.firing.samples_since_fired[:, :10] = 2000  # the first 10 latents of each member: dead
        logs = trainer.train_step(x)
        grads[coef] = trainer.ensemble.W_enc.grad.clone()
    assert (logs["aux_loss"] > 0).all()
    moved = (grads[1 / 32] - grads[0.0]).abs().sum(-1) > 0
    assert moved[:, :10].all() and not moved[:, 10:].any()
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / str(1 / 32) / "metrics.jsonl").read_text().splitlines()]
    logged = [line["aux_loss"] for line in lines if "aux_loss" in line]
    assert logged and all(len(values) == 2 for values in logged)


def test_auxk_settings_are_checked():
    for bad in ("sae.aux_coef=-1", "sae.aux_k=-1", "sae.aux_dead_window=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])
