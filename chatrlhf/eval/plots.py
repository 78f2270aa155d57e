"""The report's plots as PNG bytes, drawn with matplotlib's object API (no pyplot, no global state, no display).

Each function takes plain lists and returns the PNG, so the report decides where it goes (a file in the run's
`report/` directory, and the same bytes embedded in report.html).
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

WIDTH_IN, HEIGHT_IN, DPI = 6.4, 3.2, 100
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22")


class Series(NamedTuple):
    label: str
    x: list[float]
    y: list[float]
    """NaN for a step where the value was null (a non-finite value); the line breaks there."""
    err: list[float] | None = None
    """Optional ± error bars (e.g. a standard error)."""


def _figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, HEIGHT_IN), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=11, loc="left")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return fig, ax


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def line_plot(
    title: str,
    series: list[Series],
    xlabel: str = "step",
    ylabel: str = "",
    shades: list[tuple[float, float]] = (),
    mark: float | None = None,
    logy: bool = False,
    xlim: tuple[float, float] | None = None,
    zero: bool = False,
) -> bytes:
    """Lines over steps (with markers when a series has few points: sparse evaluations); `shades` highlight
    x-ranges and `mark` draws a vertical line (a doctor finding's compared windows and its firing iteration);
    `logy` takes a log scale when the values are positive and span more than 20×; `xlim` fixes the x range (the
    stage's steps, so that a lone final evaluation sits at the end of the run); `zero` starts the y axis at 0."""
    fig, ax = _figure(title, xlabel, ylabel)
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        few = sum(math.isfinite(v) for v in s.y) <= 30
        style = {"marker": "o", "markersize": 3.5} if few else {}
        if s.err is not None:
            ax.errorbar(s.x, s.y, yerr=s.err, label=s.label, color=color, linewidth=1.4, capsize=2, **style)
        else:
            ax.plot(s.x, s.y, label=s.label, color=color, linewidth=1.4, **style)
    for i, (a, b) in enumerate(shades):
        ax.axvspan(a, b, color="#f4a582", alpha=0.3, label="compared windows" if i == 0 else None)
    if mark is not None:
        ax.axvline(mark, color="#b2182b", linewidth=1.2, linestyle="--", label="fired")
    finite = [v for s in series for v in s.y if math.isfinite(v)]
    if logy and finite and min(finite) > 0 and max(finite) > 20 * min(finite):
        ax.set_yscale("log")
    if xlim is not None and xlim[1] > xlim[0]:
        pad = 0.02 * (xlim[1] - xlim[0])
        ax.set_xlim(xlim[0] - pad, xlim[1] + pad)
    if zero and finite and min(finite) >= 0 and ax.get_yscale() == "linear":
        ax.set_ylim(0, 1.05 * max(finite) or 1.0)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", useOffset=False)  # 0.001 ± 1e-5 reads better than an offset
    if len(series) > 1 or shades or mark is not None:
        ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def histogram_plot(title: str, groups: list[tuple[str, list[float]]], xlabel: str) -> bytes:
    """Overlaid histograms on shared bins (e.g. the reward model's chosen vs rejected scores)."""
    fig, ax = _figure(title, xlabel, "pairs")
    values = [v for _, g in groups for v in g]
    lo, hi = min(values), max(values)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    for i, (label, g) in enumerate(groups):
        ax.hist(g, bins=bins, alpha=0.55, label=f"{label} (n={len(g)})", color=COLORS[i % len(COLORS)])
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


def interval_plot(title: str, rows: list[tuple[str, list[tuple[str, float, float | None, float | None]]]]) -> bytes:
    """Means with 95% intervals, one panel row per metric: `rows` = [(metric, [(model, mean, low, high), ...])]."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH_IN, 0.9 + 0.9 * len(rows)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(rows), 1, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=11, x=0.02, ha="left")
    for ax, (metric, models) in zip(axes, rows):
        for i, (_, mean, low, high) in enumerate(models):
            xerr = None if low is None or high is None else [[mean - low], [high - mean]]
            ax.errorbar([mean], [i], xerr=xerr, fmt="o", color=COLORS[i % len(COLORS)], capsize=4, markersize=6)
        ax.set_yticks(range(len(models)), [m for m, *_ in models], fontsize=9)
        ax.set_ylim(-0.6, len(models) - 0.4)
        ax.set_xlabel(metric, fontsize=9)
        ax.tick_params(labelsize=8)
        ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    return _png(fig)
