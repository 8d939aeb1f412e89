"""Matplotlib figures of the chapter. Each returns the figure; titles and axes are labelled.

The interactive widgets (:mod:`companion.widgets`) call these same functions, so every
figure can also be drawn without ipywidgets (tests, papermill, static HTML).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch

from companion.losses.preference import dpo_loss


def show_images(images, titles: Sequence[str] | None = None, columns: int = 4,
                size: float = 2.6, suptitle: str | None = None, fontsize: int = 7):
    """A grid of PIL images with wrapped titles."""
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(columns * size, rows * (size + 1.0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, image in enumerate(images):
        ax = axes.flat[i]
        ax.imshow(image)
        if titles is not None:
            ax.set_title("\n".join(textwrap.wrap(titles[i], 34)), fontsize=fontsize)
    if suptitle:
        fig.suptitle(suptitle)
    fig.tight_layout()
    return fig


def similarity_heatmap(similarity: torch.Tensor, title: str, ax=None,
                       labels: Sequence[str] | None = None, vmin=None, vmax=None):
    """The seed's N×N picture: rows are images, columns texts, the diagonal the positives."""
    sim = similarity.detach().cpu().float().numpy()
    if ax is None:
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
    else:
        fig = ax.figure
    im = ax.imshow(sim, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xlabel("text j")
    ax.set_ylabel("image i")
    ax.set_title(title)
    n = sim.shape[0]
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    if labels is not None:
        ax.set_xticklabels(labels, rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    return fig


def row_softmax(similarity: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(s_ij / τ) over each row: the distribution InfoNCE's cross-entropy reads."""
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    return torch.softmax(similarity.double() / temperature, dim=1)


def plot_row_softmax(similarity: torch.Tensor, temperature: float, rows: int = 4):
    """Bars of softmax(row / τ) for the first ``rows`` images; the matching text in red."""
    probs = row_softmax(similarity, temperature).numpy()
    rows = min(rows, probs.shape[0])
    fig, axes = plt.subplots(1, rows, figsize=(3.0 * rows, 2.6), sharey=True)
    axes = np.atleast_1d(axes)
    n = probs.shape[1]
    for i, ax in enumerate(axes):
        colours = ["tab:red" if j == i else "tab:gray" for j in range(n)]
        ax.bar(range(n), probs[i], color=colours)
        ax.set_title(f"image {i}: p(match) = {probs[i, i]:.2f}", fontsize=9)
        ax.set_xlabel("text j")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("softmax probability")
    fig.suptitle(f"Each row's softmax at temperature τ = {temperature:g} (red: the positive)")
    fig.tight_layout()
    return fig


def moving_average(y: Sequence[float], window: int, x: Sequence[float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the means of every ``window`` consecutive values of ``y``, each at the
    ``x`` of its last value (``x`` default: 1, 2, ...); unchanged when ``window`` is 1 or
    longer than ``y``. The training curves of 3.3 plot their noisy per-step values this way."""
    y = np.asarray(y, dtype=float)
    x = np.arange(1, len(y) + 1) if x is None else np.asarray(x)
    if len(x) != len(y):
        raise ValueError(f"moving_average: {len(x)} x values for {len(y)} y values")
    if window < 1:
        raise ValueError(f"moving_average: window={window} must be at least 1")
    if window == 1 or len(y) < window:
        return x, y
    return x[window - 1:], np.convolve(y, np.ones(window) / window, mode="valid")


def plot_curves(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str,
                xlabel: str = "step", ylabel: str = "loss", logy: bool = False, ax=None,
                smooth: int = 1):
    """Several named (x, y) curves on one axis; ``smooth`` is a moving-average window."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
    else:
        fig = ax.figure
    for name, (x, y) in series.items():
        ax.plot(*moving_average(y, smooth, x), label=name)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if len(series) > 1:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_bars(values: dict[str, float], title: str, ylabel: str, ylim=(0, 1), ax=None,
              fmt: str = "{:.2f}"):
    """One bar per named value, the value written on top."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(3.5, 1.1 * len(values)), 3.2))
    else:
        fig = ax.figure
    names = list(values)
    bars = ax.bar(names, [values[n] for n in names], color="tab:blue")
    for bar, name in zip(bars, names):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), fmt.format(values[name]),
                ha="center", va="bottom", fontsize=8)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    return fig


def plot_loss_memory(results: list[dict], title: str = "Contrastive loss at CLIP batch sizes"):
    """Loss memory and time against batch size N for the plain and tiled InfoNCE.

    ``results``: the rows of ``benchmarks/results/contrastive_loss_memory.json`` (method, n,
    loss_mib, time_s; rows with ``skipped`` are drawn as missing).
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    styles = {"plain": "o-", "tiled": "s-", "gemm_floor": "^--"}
    for method, style in styles.items():
        rows = sorted((r for r in results if r["method"] == method and "skipped" not in r),
                      key=lambda r: r["n"])
        if not rows:
            continue
        n = [r["n"] for r in rows]
        if method != "gemm_floor":
            axes[0].plot(n, [r["loss_mib"] for r in rows], style, label=method)
        axes[1].plot(n, [r["time_s"] for r in rows], style,
                     label="GEMM floor" if method == "gemm_floor" else method)
    for ax, ylabel, name in ((axes[0], "loss memory (MiB)", "Memory of the loss"),
                             (axes[1], "forward + backward (s)", "Time")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size N")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_dpo_losses(beta: float, label_smoothing: float = 0.1, h_range: float = 20.0):
    """Each DPO variant's loss against h = (log-ratio of chosen) − (log-ratio of rejected),
    at ``beta`` (the curves come from :func:`companion.losses.preference.dpo_loss`)."""
    h = torch.linspace(-h_range, h_range, 401, dtype=torch.float64)
    zero = torch.zeros_like(h)
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    variants = [("sigmoid (DPO)", "sigmoid", 0.0),
                (f"sigmoid, label smoothing {label_smoothing}", "sigmoid", label_smoothing),
                (f"robust, ε = {label_smoothing}", "robust", label_smoothing),
                ("hinge", "hinge", 0.0), ("IPO", "ipo", 0.0)]
    for name, kind, eps in variants:
        per_pair = [float(dpo_loss(h[i:i + 1], zero[i:i + 1], zero[i:i + 1], zero[i:i + 1],
                                   beta=beta, loss_type=kind, label_smoothing=eps))
                    for i in range(len(h))]
        ax.plot(h.numpy(), per_pair, label=name)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_ylim(-0.1, 3.0)
    ax.set_xlabel("h = [log π(c) − log π_ref(c)] − [log π(r) − log π_ref(r)]")
    ax.set_ylabel("loss")
    ax.set_title(f"DPO losses at β = {beta:g} "
                 f"(IPO's minimum sits at h = 1/(2β) = {1 / (2 * beta):g})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_task_accuracy(tables: dict[str, dict[str, dict[str, float]]], title: str,
                       key: str = "accuracy", ax=None):
    """Grouped bars: one group per task type, one bar per named run. ``tables`` maps a run
    name to :meth:`TaskScores.by_task` (task -> {"accuracy", "hallucination_rate", ...})."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(9, 3.4))
    else:
        fig = ax.figure
    names = list(tables)
    tasks = list(next(iter(tables.values())))
    width = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        offset = (k - (len(names) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(tasks))],
               [tables[name].get(t, {}).get(key, float("nan")) for t in tasks], width, label=name)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"judged {key.replace('_', ' ')} (held-out)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_paired_changes(changes: dict[str, dict], base: str, accuracy_floor: float = -0.02):
    """Two panels of each run's paired change from ``base``, with whiskers of two standard
    errors: mean task accuracy (a dotted line at ``accuracy_floor``, the loss allowed) and
    hallucination rate (lower is better). ``changes`` is what
    :func:`companion.rlhf.versus_reference_model` returns."""
    names = list(changes)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    for ax, key, label in ((axes[0], "accuracy", "mean task accuracy"),
                           (axes[1], "hallucination", "hallucination rate")):
        values = [changes[n][f"{key}_change"] for n in names]
        whiskers = [2 * changes[n][f"{key}_se"] for n in names]
        ax.bar(names, values, yerr=whiskers, capsize=6,
               color=[f"C{i + 1}" for i in range(len(names))])
        ax.axhline(0, color="black", linewidth=0.8)
        if key == "accuracy":
            ax.axhline(accuracy_floor, color="grey", linestyle=":",
                       label=f"allowed loss ({accuracy_floor:+.2f})")
            ax.legend(fontsize=8)
        ax.set(ylabel=f"change in {label}",
               title=f"{label.capitalize()}: change from {base} (± 2 se)")
    fig.tight_layout()
    return fig


def plot_model_path(points: Sequence[tuple[str, float, float]], title: str,
                    xlabel: str = "model (chapter)"):
    """A sequence of models, one point each, left to right: mean task accuracy (circles) and
    hallucination rate (squares) on held-out records. ``points`` holds ``(label, mean task
    accuracy, hallucination rate)`` per model; the labels name the x ticks."""
    fig, ax = plt.subplots(figsize=(10, 3.4))
    xs = range(len(points))
    ax.plot(xs, [p[1] for p in points], marker="o", label="mean task accuracy")
    ax.plot(xs, [p[2] for p in points], marker="s", label="hallucination rate")
    ax.set_xticks(list(xs), [p[0] for p in points])
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("rate on held-out records")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_grouped_bars(rows: dict[str, dict[str, float]], columns: Sequence[str], title: str,
                      ylabel: str, ylim=(0, 1.05), legend_loc: str = "best", ax=None):
    """Grouped bars: one group per column, one bar per named row (``rows`` maps a name to
    ``{column: value}``), side by side in the order given; the legend in one line."""
    if ax is None:
        fig, ax = plt.subplots(figsize=(8, 3.2))
    else:
        fig = ax.figure
    width = 0.76 / max(1, len(rows))
    for k, (name, row) in enumerate(rows.items()):
        offset = (k - (len(rows) - 1) / 2) * width
        ax.bar([i + offset for i in range(len(columns))], [row[c] for c in columns], width,
               label=name)
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, ncol=max(1, len(rows)))
    return fig


def plot_accuracy_against_compute(lm_curve: Sequence[dict],
                                  stage2_points: Sequence[tuple[int, float]],
                                  tasks: Sequence[str], text_only_accuracy: float | None = None):
    """Section 3.2's two panels of held-out accuracy against training compute.

    Left: the text-only LM while it pretrained, told each scene in words (one thin line per
    task type in ``tasks`` and the mean in black, against the millions of tokens it had
    seen; ``lm_curve`` holds the points :func:`companion.lm.pretrained_lm` returns with
    ``with_curve=True``: ``tokens``, ``by_task``, ``mean_task_accuracy``); left empty without
    one. Right: stage 2's mean task accuracy against its optimiser steps
    (``stage2_points``: ``(step, accuracy)`` pairs), with the LM told the scene in words
    (``text_only_accuracy``) as a dashed line when given."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    if lm_curve:
        millions = [point["tokens"] / 1e6 for point in lm_curve]
        for task in tasks:
            axes[0].plot(millions, [point["by_task"][task] for point in lm_curve], lw=1,
                         alpha=0.6, label=task)
        axes[0].plot(millions, [point["mean_task_accuracy"] for point in lm_curve], "k-o",
                     lw=2, label="mean")
        axes[0].legend(fontsize=7, ncol=2)
    axes[0].set(xlabel="pretraining tokens seen (millions)", ylim=(0, 1.05),
                ylabel="held-out accuracy, told in words",
                title="The LM against pretraining compute")
    axes[1].plot([step for step, _ in stage2_points], [acc for _, acc in stage2_points], "k-o",
                 lw=2, label="stage 2, from pixels")
    if text_only_accuracy is not None:
        axes[1].axhline(text_only_accuracy, ls="--", color="grey",
                        label="the LM told the scene in words")
    axes[1].set(xlabel="stage-2 optimiser steps", ylabel="held-out mean task accuracy",
                ylim=(0, 1.05), title="Stage 2 against its steps")
    axes[1].legend(fontsize=8)
    return fig
