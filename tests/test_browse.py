import numpy as np
import pytest
import torch

from mfr_sae.browse import (
    AFTER,
    BEFORE,
    best_matches,
    collect,
    token_position,
    window_activations,
)
from mfr_sae.data.vectors import VectorsData
from mfr_sae.ensemble import Ensemble
from mfr_sae.metrics import max_cosine


@pytest.fixture
def rows_and_ensemble(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(700, 16)
    np.save(tmp_path / "rows.npy", x.numpy())
    ensemble = Ensemble(16, 40, [3, 5]).eval()
    return VectorsData(tmp_path / "rows.npy", holdout=1), ensemble, x


def test_one_pass_keeps_each_latents_top_activations_and_counts_as_a_dense_pass(rows_and_ensemble):
    cache, ensemble, x = rows_and_ensemble
    stats = collect(ensemble, cache, len(x), contexts=6, batch_rows=37, progress=False)  # 19 batches merged
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]: (member, latent) by row
    assert torch.equal(stats.fired.flatten(), (dense > 0).sum(1).float())
    torch.testing.assert_close(stats.total.flatten(), dense.sum(1), rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.largest.flatten(), dense.max(1).values.clamp_min(0))
    assert torch.equal(stats.histogram.sum(-1).flatten(), stats.fired.flatten())
    want = dense.topk(6, dim=1)
    fired = want.values > 0
    assert torch.equal(stats.top.values[fired], want.values[fired])
    assert torch.equal(stats.top.indices[fired], want.indices[fired])  # the rows they fire on
    assert (stats.top.values[~fired] <= 0).all()  # a latent firing fewer times keeps empty slots


def test_the_windows_hold_each_contexts_latent_on_the_tokens_around_it(rows_and_ensemble):
    cache, ensemble, x = rows_and_ensemble
    stats = collect(ensemble, cache, len(x), contexts=4, progress=False)
    context = 50  # sequences of 49 rows
    windows = window_activations(ensemble, cache, stats, context, chunk_rows=64)
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]
    for owner in (0, 7, 45, 79):
        for slot, (value, row) in enumerate(zip(stats.top.values[owner], stats.top.indices[owner])):
            if value <= 0:
                assert not windows[owner, slot].any()
                continue
            sequence, position = (int(t) for t in token_position(row, context))
            for offset in range(-BEFORE, 5):
                inside = 1 <= position + offset <= context - 1 and int(row) + offset < len(x)
                want = dense[owner, int(row) + offset] if inside else 0.0
                assert windows[owner, slot, offset + BEFORE] == pytest.approx(float(want), abs=1e-6)
            assert windows[owner, slot, BEFORE] == pytest.approx(float(value), rel=1e-5)  # the token it fired on


def test_best_matches_are_each_latents_best_cosine_in_every_other_member():
    torch.manual_seed(1)
    decoder = torch.nn.functional.normalize(torch.randn(3, 50, 8), dim=-1)
    cosine, match = best_matches(decoder)
    for a in range(3):
        assert (cosine[a, a] == 1).all() and torch.equal(match[a, a], torch.arange(50))
        for b in set(range(3)) - {a}:
            want, want_match = max_cosine(decoder[a], decoder[b])
            torch.testing.assert_close(cosine[a, b], want)
            assert torch.equal(match[a, b], want_match)


def test_the_windows_of_jumprelu_members_equal_their_dense_codes_whatever_the_threshold(tmp_path):
    # saved BatchTopK members are JumpReLU: with a low or unset threshold a row's smallest kept activation is near
    # 0, so that a recomputed window value within rounding of it must still count as kept
    torch.manual_seed(0)
    x = torch.randn(1500, 256) * 3 + 1.0
    np.save(tmp_path / "rows.npy", x.numpy())
    cache = VectorsData(tmp_path / "rows.npy", holdout=1)
    ensemble = Ensemble(256, 128, [3, 8, 20], architecture="batchtopk")
    with torch.no_grad():
        for param in ensemble.parameters():
            param.add_(0.05 * torch.randn_like(param))
        ensemble.threshold.copy_(torch.tensor([0.5, 2.0, -1.0]))  # the last: unset, a plain ReLU
    ensemble.eval()
    stats = collect(ensemble, cache, len(x), contexts=4, progress=False)
    context = 50
    windows = window_activations(ensemble, cache, stats, context, chunk_rows=300)
    with torch.no_grad():
        dense = ensemble.dense_codes(x).transpose(1, 2).flatten(0, 1)  # [N h, rows]
    offsets = torch.arange(-BEFORE, AFTER + 1)
    rows = stats.top.indices.unsqueeze(-1) + offsets
    shown = token_position(stats.top.indices, context)[1].unsqueeze(-1) + offsets
    inside = (shown >= 1) & (shown <= context - 1) & (rows < len(x)) & (stats.top.values > 0).unsqueeze(-1)
    owner = torch.arange(len(rows)).view(-1, 1, 1).expand_as(rows)
    want = torch.zeros_like(windows)
    want[inside] = dense[owner[inside], rows[inside]]
    assert inside.sum() > 20_000
    assert torch.equal(windows > 0, want > 0)  # kept exactly where the encoder keeps
    torch.testing.assert_close(windows, want, rtol=1e-4, atol=1e-4)
