"""Figure 8 from fabricated curves (no training): every method's line shows, and an all-zero panel says so."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest

from mfr_sae.reproduce.synthetic_figures import recovery_figure


def _run(mmcs: list[float], recovered: list[float]) -> dict:
    """One seed's logged curve: (training vectors, per-member MMCS, per-member fraction recovered)."""
    return {"curve": [(1000 * (i + 1), [m, m + 0.01], [r, r]) for i, (m, r) in enumerate(zip(mmcs, recovered))]}


def _runs(recovered: float) -> dict:
    baseline = [_run([0.30, 0.34, 0.36, 0.37], [recovered] * 4), _run([0.31, 0.35, 0.36, 0.38], [recovered] * 4)]
    return {
        "baseline": baseline,
        "reinit": baseline,  # no reinitialisation fired: the baseline's runs
        "mfr": [_run([0.29, 0.33, 0.35, 0.36], [recovered] * 4)] * 2,
        "shared_init": [_run([0.30, 0.34, 0.36, 0.375], [recovered] * 4)] * 2,
    }


@pytest.fixture
def nothing_recovered():
    fig = recovery_figure(_runs(recovered=0.0), threshold=0.9)
    yield fig
    plt.close(fig)


def test_every_methods_line_shows_even_where_lines_coincide(nothing_recovered):
    mmcs, _ = nothing_recovered.axes
    lines = {line.get_label(): line for line in mmcs.get_lines()}
    assert list(lines) == ["baseline", "reinit (identical to baseline)", "mfr", "shared_init"]
    assert len({(line.get_linestyle(), line.get_marker()) for line in lines.values()}) == 4
    base, reinit = lines["baseline"], lines["reinit (identical to baseline)"]
    # the same curve twice: the baseline, drawn first, is wider and solid, so the dashed reinit leaves it seen
    assert base.get_linestyle() == "-" and reinit.get_linestyle() == "--"
    assert base.get_linewidth() > reinit.get_linewidth()
    assert base.get_markevery() != reinit.get_markevery()  # markers on different evaluations
    # the data drawn are the means, unaltered
    assert np.array_equal(base.get_ydata(), reinit.get_ydata())
    assert np.allclose(base.get_ydata(), [0.31, 0.35, 0.365, 0.38])
    assert list(base.get_xdata()) == [1000, 2000, 3000, 4000]


def test_a_panel_where_nothing_was_recovered_starts_at_0_and_says_so(nothing_recovered):
    mmcs, recovered = nothing_recovered.axes
    assert recovered.get_ylim() == (0, 1)  # not a flat line on an axis from -0.05 to 0.05
    assert "cosine >= 0.9" in recovered.get_ylabel()
    assert [t.get_text() for t in recovered.texts] == [
        "nothing recovered: no true feature reached\ncosine 0.9 (any method, seed or step)"
    ]
    assert not mmcs.texts and mmcs.get_ylim()[0] > 0.2  # the MMCS panel keeps its own range


def test_a_panel_with_recovered_features_starts_at_0_without_the_note():
    fig = recovery_figure(_runs(recovered=0.05), threshold=0.9)
    _, recovered = fig.axes
    assert recovered.get_ylim()[0] == 0 and 0.05 < recovered.get_ylim()[1] < 1 and not recovered.texts
    plt.close(fig)
