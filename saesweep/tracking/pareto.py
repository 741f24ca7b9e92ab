"""Pareto frontiers of sparsity against reconstruction, and their plots.

A trial is on the frontier when no other trial of its hookpoint reaches at
least its score with an L0 at most its L0. Plotted as a step line, the frontier
gives the best score reachable for each L0 budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saesweep.saes import list_architectures

# Marker size (points squared) of a trial and of a champion.
TRIAL_MARKER_SIZE = 36
CHAMPION_MARKER_SIZE = 320
PANEL_SIZE_INCHES = (6.4, 4.8)
DPI = 110


@dataclass(frozen=True)
class TrialPoint:
    """One finished trial of a hookpoint, as plotted and tabulated."""

    trial_id: str
    hookpoint: str
    architecture: str
    expansion_factor: int | None
    coefficient_name: str | None
    coefficient: float | None
    l0: float | None
    explained_variance: float | None
    mse: float | None
    ce_loss_score: float | None

    def score(self, metric: str) -> float | None:
        """Return the value of `metric` ("explained_variance" or "ce_loss_score")."""
        return getattr(self, metric)


@dataclass(frozen=True)
class Panel:
    """One plot of L0 (x) against a score (y)."""

    metric: str
    """TrialPoint field on the y axis: explained_variance or ce_loss_score."""
    label: str
    """Y axis label."""


EXPLAINED_VARIANCE_PANEL = Panel("explained_variance", "explained variance")
CE_LOSS_PANEL = Panel("ce_loss_score", "CE loss recovered")


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[int]:
    """Return the indices of the frontier points of `points`, as (l0, score) pairs, by ascending l0.

    A point is on the frontier when its score is higher than that of every
    point with a smaller or equal L0. Of two equal points, the first is kept.
    """
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    frontier: list[int] = []
    best = -math.inf
    for index in order:
        score = points[index][1]
        if score > best:
            frontier.append(index)
            best = score
    return frontier


def architecture_colors(architectures: Sequence[str]) -> dict[str, str]:
    """Map each architecture to a colour of the tab10 cycle.

    Registered architectures keep their registry position, so an architecture
    has the same colour in every plot of every report.
    """
    known = list_architectures()
    extra = sorted(set(architectures) - set(known))
    palette = [f"C{i}" for i in range(10)]
    return {name: palette[i % len(palette)] for i, name in enumerate(known + extra)}


def plot_hookpoint(
    hookpoint: str,
    points: Sequence[TrialPoint],
    champion_id: str | None,
    panels: Sequence[Panel],
    source: str,
) -> Figure:
    """Draw one panel per entry of `panels` for the trials of one hookpoint.

    `points` must all have a positive L0, because the x axis is logarithmic.
    `source` names where the metrics were measured, e.g. "held-out text".
    """
    width, height = PANEL_SIZE_INCHES
    figure = Figure(figsize=(width * len(panels), height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    colors = architecture_colors([p.architecture for p in points])
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, panel, points, champion_id, colors, source)
    figure.suptitle(hookpoint)
    return figure


def _draw_panel(ax, panel: Panel, points: Sequence[TrialPoint], champion_id: str | None, colors, source: str) -> None:
    scored = [p for p in points if p.score(panel.metric) is not None]
    architectures = sorted({p.architecture for p in scored}, key=list(colors).index)
    for architecture in architectures:
        group = [p for p in scored if p.architecture == architecture]
        ax.scatter(
            [p.l0 for p in group],
            [p.score(panel.metric) for p in group],
            s=TRIAL_MARKER_SIZE,
            color=colors[architecture],
            label=architecture,
            zorder=3,
        )

    pairs = [(p.l0, p.score(panel.metric)) for p in scored]
    frontier = [pairs[i] for i in pareto_frontier(pairs)]
    if frontier:
        # The last step runs to the largest L0 plotted, so the line covers every budget shown.
        xs = [x for x, _ in frontier] + [max(x for x, _ in pairs)]
        ys = [y for _, y in frontier] + [frontier[-1][1]]
        ax.step(xs, ys, where="post", color="0.3", linewidth=1.5, label="Pareto frontier", zorder=2)

    champion = next((p for p in scored if p.trial_id == champion_id), None)
    if champion is not None:
        ax.scatter(
            [champion.l0],
            [champion.score(panel.metric)],
            s=CHAMPION_MARKER_SIZE,
            marker="*",
            facecolors=colors[champion.architecture],
            edgecolors="black",
            linewidths=1.2,
            zorder=4,
        )

    ax.set_xscale("log")
    ax.set_xlabel(f"L0, active latents per token ({source}, log scale)")
    ax.set_ylabel(f"{panel.label} ({source})")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if champion is not None:
        handles.append(
            Line2D([], [], marker="*", linestyle="none", markersize=14, markerfacecolor="white", markeredgecolor="black")
        )
        labels.append("champion")
    if handles:
        ax.legend(handles, labels, loc="best", fontsize="small")


def save_figure(figure: Figure, path: Path) -> Path:
    """Write `figure` as a PNG to `path` and return the path."""
    figure.savefig(path, format="png")
    return path
