"""The plotting helpers: their arithmetic, and what each bar and line of a figure stands for."""

import matplotlib.pyplot as plt
import numpy as np
import pytest

from companion.plots import moving_average, plot_accuracy_against_compute, plot_grouped_bars


def test_moving_average_is_the_mean_of_each_window_at_its_last_x():
    y = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    x, smooth = moving_average(y, 3)
    by_hand = [sum(y[i - 2:i + 1]) / 3 for i in range(2, len(y))]
    np.testing.assert_allclose(smooth, by_hand, rtol=1e-12)
    assert list(x) == [3, 4, 5, 6, 7]  # 1-based positions of each window's last value
    x, smooth = moving_average(y, 2, x=[10, 20, 30, 40, 50, 60, 70])
    assert list(x) == [20, 30, 40, 50, 60, 70] and smooth[0] == 2.0


def test_moving_average_leaves_short_series_alone_and_refuses_bad_input():
    x, y = moving_average([1.0, 2.0], 5)
    assert list(x) == [1, 2] and list(y) == [1.0, 2.0]
    assert list(moving_average([1.0, 2.0], 1)[1]) == [1.0, 2.0]
    with pytest.raises(ValueError, match="3 x values for 2 y values"):
        moving_average([1.0, 2.0], 1, x=[1, 2, 3])
    with pytest.raises(ValueError, match="window=0"):
        moving_average([1.0, 2.0], 0)


def test_grouped_bars_put_each_row_beside_the_others_in_every_column():
    rows = {"probe": {"a": 0.9, "b": 0.5, "c": 1.0}, "model": {"a": 0.3, "b": 0.2, "c": 0.1}}
    fig = plot_grouped_bars(rows, ["a", "b", "c"], "title", "accuracy", ylim=(0, 1.3),
                            legend_loc="upper center")
    ax = fig.axes[0]
    bars = ax.patches
    assert [b.get_height() for b in bars] == [0.9, 0.5, 1.0, 0.3, 0.2, 0.1]
    centres = [b.get_x() + b.get_width() / 2 for b in bars]
    assert centres == pytest.approx([-0.19, 0.81, 1.81, 0.19, 1.19, 2.19])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["probe", "model"]
    assert ax.get_ylim() == (0, 1.3) and ax.get_title() == "title"
    plt.close(fig)


def test_accuracy_against_compute_draws_each_task_the_mean_and_stage_2():
    curve = [{"tokens": 1e6, "by_task": {"count": 0.2, "ocr": 0.4}, "mean_task_accuracy": 0.3},
             {"tokens": 3e6, "by_task": {"count": 0.6, "ocr": 0.8}, "mean_task_accuracy": 0.7}]
    fig = plot_accuracy_against_compute(curve, [(100, 0.4), (200, 0.5)], ["count", "ocr"],
                                        text_only_accuracy=0.45)
    lm_axes, stage2_axes = fig.axes[:2]
    lines = {line.get_label(): line for line in lm_axes.get_lines()}
    assert list(lines) == ["count", "ocr", "mean"]
    assert list(lines["ocr"].get_xdata()) == [1.0, 3.0]  # millions of tokens
    assert list(lines["ocr"].get_ydata()) == [0.4, 0.8]
    assert list(lines["mean"].get_ydata()) == [0.3, 0.7]
    stage2, text_lm = stage2_axes.get_lines()
    assert list(stage2.get_xdata()) == [100, 200] and list(stage2.get_ydata()) == [0.4, 0.5]
    assert list(text_lm.get_ydata()) == [0.45, 0.45]
    plt.close(fig)


def test_accuracy_against_compute_without_an_lm_curve_or_text_lm():
    fig = plot_accuracy_against_compute([], [(300, 0.6)], ["count"])
    lm_axes, stage2_axes = fig.axes[:2]
    assert not lm_axes.get_lines() and len(stage2_axes.get_lines()) == 1
    plt.close(fig)
