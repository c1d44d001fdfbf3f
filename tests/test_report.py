import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

import mfr_sae.reproduce as reproduce
from mfr_sae.config import load_config
from mfr_sae.report import (
    column_decimals,
    count_axis,
    figure_link,
    fmt_duration,
    fmt_mean_sd,
    fmt_num,
    fmt_p,
    fmt_sig,
    markdown_table,
    round_sig,
)
from mfr_sae.reproduce import RunTracker, describe_runs, time_left


def test_fmt_mean_sd_gives_the_mean_to_3_significant_digits_and_the_sd_to_2():
    assert fmt_mean_sd([0.06376, 0.06380]) == "0.0638 ± 2.8e-05"
    assert fmt_mean_sd([1234.5, 1240.1]) == "1.24e+03 ± 4"
    assert fmt_mean_sd([0.5, None, 0.7]) == "0.6 ± 0.14"  # None (undefined) is left out
    assert fmt_mean_sd([None]) == "n/a"
    assert fmt_mean_sd([0.123456]) == "0.123"


def test_a_column_of_means_is_printed_to_one_number_of_decimals():
    # 0.38 and 1.08 beside 0.715: to the 3 significant digits of the smallest, every mean shows 3 decimals
    decimals = column_decimals([0.38, 1.08, 0.715, None, 0.0])
    assert decimals == 3
    shown = [fmt_mean_sd(v, decimals=decimals) for v in ([0.37, 0.39], [1.08], [0.71, 0.72], [0.0, 0.0])]
    assert shown == ["0.380 ± 0.014", "1.080", "0.715 ± 0.0071", "0.000 ± 0"]
    assert fmt_mean_sd([1.07, 1.09], decimals=3) == "1.080 ± 0.014" and fmt_mean_sd([1.0, 1.02], decimals=2) == (
        "1.01 ± 0.014"
    )
    assert fmt_mean_sd([0.37, 0.39, 0.38], decimals=3) == "0.380 ± 0.010"  # the sd's trailing zero kept too
    assert column_decimals([15.0, 5.333]) == 2 and column_decimals([0.0012, 0.0005]) == 6
    # a mean near 0 beside 1: no more decimals than 4 significant digits of the largest
    assert column_decimals([0.0078, 0.367, 1.0]) == 3 and column_decimals([-0.0078, 0.068]) == 5
    assert column_decimals([0.0, None]) == 0 and column_decimals([1234.0]) == 0


def test_fmt_sig_keeps_the_trailing_zeros_of_its_significant_digits():
    assert [fmt_sig(v) for v in (0.38, 1.0, -0.0183, 100.0, 0.0)] == ["0.380", "1.00", "-0.0183", "100", "0.00"]
    assert fmt_sig(None) == "-"


def test_integers_stay_integers():
    assert fmt_mean_sd([12345]) == "12345" and fmt_mean_sd([3, 5]) == "4 ± 1.4"
    assert fmt_num(3500000) == "3500000" and fmt_num(0.00132449) == "0.00132" and fmt_num(None) == "-"
    table = markdown_table([{"k": 12345, "mse": 0.0012345, "fvu": None, "name": "x"}], ["k", "mse", "fvu", "name"])
    assert table.splitlines()[-1] == "| 12345 | 0.00123 | n/a | x |"


def test_p_values_and_rounding_as_printed():
    assert fmt_p(0.012345) == "0.0123" and fmt_p(None) == "-"
    assert round_sig(0.12341) == round_sig(0.12344) == 0.123 and round_sig(0.1236) == 0.124


def test_a_figure_is_a_relative_link_with_a_one_line_caption(tmp_path):
    link = figure_link(tmp_path / "out" / "fig3_agreement.png", "Figure 3: agreement\nacross SAEs")
    assert link == "![Figure 3: agreement across SAEs](fig3_agreement.png)\n\n*Figure 3: agreement across SAEs*"


def test_durations():
    assert [fmt_duration(s) for s in (4.2, 150, 900, 5000)] == ["4 s", "2.5 min", "15 min", "1.4 h"]


def test_count_axis_ticks_are_few_short_and_apart():
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([0, 800_000], [0, 1])
    count_axis(ax.xaxis)
    fig.canvas.draw()
    labels = [t for t in ax.get_xticklabels() if t.get_text() and 0 <= t.get_position()[0] <= 800_000]
    assert 3 <= len(labels) <= 6 and all(len(t.get_text()) <= 5 for t in labels)
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
    assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:]))  # no two labels touch
    plt.close(fig)


def test_the_tracker_numbers_runs_estimates_the_time_left_and_names_reused_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(reproduce, "train", lambda cfg, run_dir, progress: {"train_seconds": 2.0})
    cfg = load_config(None, [])
    finished = tmp_path / "runs" / "a"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text(json.dumps({"train_seconds": 5.0}))
    tracker = RunTracker(3, tmp_path, progress=True)
    for name in "abc":
        assert tracker.run(name, cfg, tmp_path / "runs" / name)["train_seconds"] in (2.0, 5.0)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[a] reused: {finished} (run 1 of 3)"
    assert out[1] == f"[b] training: {tmp_path / 'runs' / 'b'} (run 2 of 3)"  # no run trained yet: no estimate
    assert out[2].startswith(f"[c] training: {tmp_path / 'runs' / 'c'} (run 3 of 3, about ") and out[2].endswith(
        " left)"
    )
    summary = tracker.summary()
    assert summary["train_seconds"] == 9.0 and [r["how"] for r in summary["runs"]] == ["reused", "trained", "trained"]
    text = describe_runs(summary, 3.0)
    assert "Runs: 3, 9 s of training in all" in text and "Trained now: 2 (4 s)." in text
    assert "Reused from an earlier invocation, not trained now: 1 (`runs/a`)." in text
    assert text.endswith("This invocation took 3 s.")


def test_time_left_is_the_rate_times_the_runs_left():
    assert time_left(None, 5) == "" and time_left(60.0, 0) == ""
    assert time_left(60.0, 3) == ", about 3.0 min left"
