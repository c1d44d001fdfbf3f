"""The shared parts of the reproductions (mfr_sae.reproduce): what a report says of reinitialisations."""

from mfr_sae.reproduce import reinit_history, reinit_summary


def _events(*pairs):
    return [{"member": member, "step": step} for member, step in pairs]


def test_reinit_history_counts_a_members_events_and_its_last_step():
    events = _events((0, 19), (1, 19), (0, 39))
    assert reinit_history(events, 0) == {"reinits": 2, "last_reinit_step": 39}
    assert reinit_history(events, 2) == {"reinits": 0, "last_reinit_step": None}


def test_a_member_re_initialised_near_the_end_is_flagged_as_barely_trained():
    late = reinit_summary(_events((0, 19), (0, 199), (1, 99)), 2, 200, [6, 12])
    assert late.startswith("3 reinitialisation(s): k=6 2x, last at step 199 of 200, k=12 1x, last at step 99")
    assert "k=[6] were re-initialised in the last 20% of training" in late
    early = reinit_summary(_events((0, 19), (1, 99)), 2, 200, [6, 12])
    assert "barely trained" not in early
    assert reinit_summary([], 2, 200, [6, 12]) == "No reinitialisation fired."
