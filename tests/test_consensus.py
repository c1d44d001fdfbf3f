import torch
import torch.nn.functional as F

from mfr_sae.consensus import consensus_decoder
from mfr_sae.metrics import ground_truth_metrics


def test_agreed_rows_are_the_mean_of_the_matched_rows_and_the_rest_stay_member_0s():
    g = torch.Generator().manual_seed(0)
    truth = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    # three members: the truth plus independent noise, shuffled; rows 0..7 of member 2 replaced (no agreement)
    noisy = [F.normalize(truth + 0.04 * torch.randn(64, 32, generator=g), dim=-1) for _ in range(3)]
    noisy[2][:8] = F.normalize(torch.randn(8, 32, generator=g), dim=-1)
    orders = [torch.arange(64), torch.randperm(64, generator=g), torch.randperm(64, generator=g)]
    decoder = torch.stack([member[order] for member, order in zip(noisy, orders)]) * 3.0  # norms do not matter
    rows, agreed = consensus_decoder(decoder)
    assert not agreed[:8].any() and agreed[8:].float().mean() > 0.9
    torch.testing.assert_close(rows[~agreed], noisy[0][~agreed])  # member 0's own rows
    i = int(torch.nonzero(agreed)[0])  # an agreed row: the normalised mean of its three matches
    expected = F.normalize(sum(member[i] for member in noisy), dim=-1)
    torch.testing.assert_close(rows[i], expected)
    # averaging independent errors: closer to the truth than any member
    consensus_mcc = ground_truth_metrics(rows, truth)["gt_mcc"]
    assert all(consensus_mcc > ground_truth_metrics(member, truth)["gt_mcc"] for member in noisy)


def test_identical_members_give_member_0_and_a_stricter_cosine_agrees_on_less():
    g = torch.Generator().manual_seed(1)
    member = F.normalize(torch.randn(16, 8, generator=g), dim=-1)
    rows, agreed = consensus_decoder(torch.stack([member, member]))
    assert agreed.all()
    torch.testing.assert_close(rows, member)
    other = F.normalize(member + 0.3 * torch.randn(16, 8, generator=g), dim=-1)
    loose, strict = (
        consensus_decoder(torch.stack([member, other]), 0.5)[1],
        consensus_decoder(torch.stack([member, other]), 0.99)[1],
    )
    assert loose.sum() > strict.sum()
