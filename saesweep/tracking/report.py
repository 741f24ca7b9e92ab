"""The sweep report: Pareto plots per hookpoint, a champions table, failed trials.

`write_report` writes one PNG per hookpoint, report.md and report.html into one
folder, which the sweep runner logs as an artifact of the MLflow parent run.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from saesweep.saes import get_architecture
from saesweep.tracking.champions import HELDOUT_PREFIX
from saesweep.tracking.pareto import (
    CE_LOSS_PANEL,
    EXPLAINED_VARIANCE_PANEL,
    TrialPoint,
    pareto_frontier,
    plot_hookpoint,
    save_figure,
)

logger = logging.getLogger(__name__)

MARKDOWN_FILENAME = "report.md"
HTML_FILENAME = "report.html"
COEFFICIENT_KEYS = ("l1_coefficient", "l0_coefficient", "k")
# Failure reasons longer than this keep their start and end, where the
# exception type and the final message usually are.
MAX_REASON_CHARS = 600


@dataclass
class HookpointSection:
    """Everything the report shows for one hookpoint."""

    hookpoint: str
    source: str
    """Metric source: "held-out text" or "training batches"."""
    points: list[TrialPoint]
    """Finished trials with a positive L0 and an explained variance, plotted."""
    champion: TrialPoint | None
    unplotted: list[tuple[str, str]] = field(default_factory=list)
    """(trial id, reason) of finished trials that cannot be plotted."""
    frontier_ids: set[str] = field(default_factory=set)
    plot_filename: str | None = None

    @property
    def has_ce_loss(self) -> bool:
        return any(p.ce_loss_score is not None for p in self.points)


def write_report(
    outcomes: Iterable[Any],
    champions: dict[str, Any],
    policy_text: str,
    out_dir: str | Path,
) -> list[Path]:
    """Write the sweep report into `out_dir` and return the files written.

    `outcomes` are the sweep's TrialOutcome objects, `champions` maps a
    hookpoint to its champion TrialOutcome, and `policy_text` states how the
    champions were chosen. Metrics measured on held-out text (`heldout_*`) are
    used wherever a hookpoint has them, else the last training metrics, and
    the report names the source. Returns the PNG plots, then report.md and report.html.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = list(outcomes)
    finished = [o for o in outcomes if o.ok]
    failed = [o for o in outcomes if not o.ok]
    champion_ids = {hookpoint: outcome.trial_id for hookpoint, outcome in champions.items()}

    by_hookpoint: dict[str, list[Any]] = {}
    for outcome in finished:
        by_hookpoint.setdefault(str(outcome.config.get("hookpoint")), []).append(outcome)
    for hookpoint in champion_ids:
        by_hookpoint.setdefault(hookpoint, [])

    written: list[Path] = []
    sections = []
    for hookpoint in sorted(by_hookpoint, key=natural_key):
        section = build_section(hookpoint, by_hookpoint[hookpoint], champion_ids.get(hookpoint))
        if section.points:
            panels = [EXPLAINED_VARIANCE_PANEL] + ([CE_LOSS_PANEL] if section.has_ce_loss else [])
            champion_id = section.champion.trial_id if section.champion else None
            figure = plot_hookpoint(hookpoint, section.points, champion_id, panels, section.source)
            section.plot_filename = plot_filename(hookpoint)
            written.append(save_figure(figure, out_dir / section.plot_filename))
        sections.append(section)

    markdown_path = out_dir / MARKDOWN_FILENAME
    markdown_path.write_text(render_markdown(sections, failed, policy_text))
    html_path = out_dir / HTML_FILENAME
    html_path.write_text(render_html(sections, failed, policy_text))
    written += [markdown_path, html_path]
    logger.info(
        "sweep report written to %s: %d hookpoint(s), %d finished and %d failed trial(s)",
        out_dir,
        len(sections),
        len(finished),
        len(failed),
    )
    return written


def natural_key(text: str) -> list[Any]:
    """Sort key that orders blocks.2 before blocks.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def plot_filename(hookpoint: str) -> str:
    """Return the PNG file name of a hookpoint's plot: pareto_<hookpoint>.png, with unsafe characters replaced."""
    return "pareto_" + re.sub(r"[^A-Za-z0-9._-]", "_", hookpoint) + ".png"


def coefficient_of(config: dict[str, Any]) -> tuple[str | None, float | None]:
    """Return (name, value) of the sparsity coefficient of a trial config."""
    try:
        name = get_architecture(str(config.get("architecture"))).sparsity_coefficient
    except ValueError:
        name = next((key for key in COEFFICIENT_KEYS if config.get(key) is not None), None)
    value = config.get(name) if name else None
    return name, _number(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _has_heldout(outcome: Any) -> bool:
    metrics = outcome.metrics
    return all(_number(metrics.get(HELDOUT_PREFIX + name)) is not None for name in ("l0", "explained_variance"))


def trial_point(outcome: Any, prefix: str) -> TrialPoint:
    """Read the metrics named `prefix` + l0, explained_variance, mse and ce_loss_score of one trial."""
    config = outcome.config
    metrics = outcome.metrics
    coefficient_name, coefficient = coefficient_of(config)
    expansion = _number(config.get("expansion_factor"))
    return TrialPoint(
        trial_id=str(outcome.trial_id),
        hookpoint=str(config.get("hookpoint")),
        architecture=str(config.get("architecture")),
        expansion_factor=int(expansion) if expansion is not None else None,
        coefficient_name=coefficient_name,
        coefficient=coefficient,
        l0=_number(metrics.get(prefix + "l0")),
        explained_variance=_number(metrics.get(prefix + "explained_variance")),
        mse=_number(metrics.get(prefix + "mse")),
        ce_loss_score=_number(metrics.get(prefix + "ce_loss_score")),
    )


def build_section(hookpoint: str, outcomes: Sequence[Any], champion_id: str | None) -> HookpointSection:
    """Collect the plotted points, the champion and the frontier of one hookpoint."""
    heldout = any(_has_heldout(o) for o in outcomes)
    prefix, source = (HELDOUT_PREFIX, "held-out text") if heldout else ("", "training batches")
    points: list[TrialPoint] = []
    unplotted: list[tuple[str, str]] = []
    for outcome in outcomes:
        point = trial_point(outcome, prefix)
        if point.l0 is None or point.explained_variance is None:
            unplotted.append((point.trial_id, f"no {prefix}l0 or {prefix}explained_variance metric"))
        elif point.l0 <= 0:
            unplotted.append((point.trial_id, f"L0 is {point.l0:g}, which a log axis cannot show"))
        else:
            points.append(point)

    champion = next((p for p in points if p.trial_id == champion_id), None)
    if champion is None and champion_id is not None:
        champion = next((trial_point(o, prefix) for o in outcomes if str(o.trial_id) == champion_id), None)
    pairs = [(p.l0, p.explained_variance) for p in points]
    frontier_ids = {points[i].trial_id for i in pareto_frontier(pairs)}
    return HookpointSection(hookpoint, source, points, champion, unplotted, frontier_ids)


def short_reason(error: str | None) -> str:
    """Collapse a failure reason onto one line of at most MAX_REASON_CHARS characters plus an ellipsis."""
    text = " ".join((error or "unknown error").split())
    if len(text) <= MAX_REASON_CHARS:
        return text
    half = MAX_REASON_CHARS // 2
    return f"{text[:half]} … {text[-half:]}"


def _format(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def _coefficient_text(point: TrialPoint) -> str:
    if point.coefficient_name is None:
        return "–"
    return f"{point.coefficient_name}={_format(point.coefficient, 'g')}"


def _config_cells(config: dict[str, Any]) -> list[str]:
    name, value = coefficient_of(config)
    coefficient = f"{name}={_format(value, 'g')}" if name else "–"
    return [
        str(config.get("hookpoint", "–")),
        str(config.get("architecture", "–")),
        str(config.get("expansion_factor", "–")),
        coefficient,
    ]


def champion_rows(sections: Sequence[HookpointSection]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the champions table, one row per hookpoint."""
    with_ce = any(s.has_ce_loss for s in sections)
    header = ["Hookpoint", "Trial", "Architecture", "Expansion factor", "Coefficient", "Explained variance", "L0", "MSE"]
    header += ["CE loss recovered"] if with_ce else []
    header += ["Measured on"]
    rows = []
    for section in sections:
        point = section.champion
        if point is None:
            rows.append([section.hookpoint, "no champion: no finished trial meets the policy"] + [""] * (len(header) - 2))
            continue
        row = [
            section.hookpoint,
            point.trial_id,
            point.architecture,
            _format(point.expansion_factor, "d"),
            _coefficient_text(point),
            _format(point.explained_variance, ".4f"),
            _format(point.l0, ".1f"),
            _format(point.mse, ".4g"),
        ]
        row += [_format(point.ce_loss_score, ".4f")] if with_ce else []
        rows.append(row + [section.source])
    return header, rows


def trial_rows(sections: Sequence[HookpointSection]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the table of every plotted trial, by hookpoint and ascending L0."""
    with_ce = any(s.has_ce_loss for s in sections)
    header = ["Hookpoint", "Trial", "Architecture", "Expansion factor", "Coefficient", "Explained variance", "L0", "MSE"]
    header += ["CE loss recovered"] if with_ce else []
    header += ["On explained-variance frontier", "Champion"]
    rows = []
    for section in sections:
        champion_id = section.champion.trial_id if section.champion else None
        for point in sorted(section.points, key=lambda p: (p.l0, p.trial_id)):
            row = [
                section.hookpoint,
                point.trial_id,
                point.architecture,
                _format(point.expansion_factor, "d"),
                _coefficient_text(point),
                _format(point.explained_variance, ".4f"),
                _format(point.l0, ".1f"),
                _format(point.mse, ".4g"),
            ]
            row += [_format(point.ce_loss_score, ".4f")] if with_ce else []
            row += ["yes" if point.trial_id in section.frontier_ids else "", "yes" if point.trial_id == champion_id else ""]
            rows.append(row)
    return header, rows


def failed_rows(failed: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the failed-trials table."""
    header = ["Trial", "Hookpoint", "Architecture", "Expansion factor", "Coefficient", "Reason"]
    rows = [[str(o.trial_id), *_config_cells(o.config), short_reason(o.error)] for o in failed]
    return header, rows


def unplotted_rows(sections: Sequence[HookpointSection]) -> list[str]:
    """Return one line per finished trial left out of the plots, with the reason."""
    return [f"{section.hookpoint}, trial {trial_id}: {reason}" for section in sections for trial_id, reason in section.unplotted]


def _markdown_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_markdown_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def render_markdown(sections: Sequence[HookpointSection], failed: Sequence[Any], policy_text: str) -> str:
    """Render the report as markdown, with plots linked by file name."""
    lines = ["# Sweep report", "", f"Champion policy: {policy_text}.", "", "## Champions", ""]
    lines += _markdown_table(*champion_rows(sections)) if sections else ["No trial finished."]
    lines += ["", "## Pareto frontiers", ""]
    for section in sections:
        if section.plot_filename:
            lines += [f"![{section.hookpoint}]({section.plot_filename})", ""]
    header, rows = trial_rows(sections)
    if rows:
        lines += _markdown_table(header, rows) + [""]
    unplotted = unplotted_rows(sections)
    if unplotted:
        lines += ["Finished trials left out of the plots:", ""] + [f"- {_markdown_cell(line)}" for line in unplotted] + [""]
    lines += ["## Failed trials", ""]
    lines += _markdown_table(*failed_rows(failed)) if failed else ["None."]
    return "\n".join(lines) + "\n"


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


STYLE = (
    "body{font-family:sans-serif;margin:2em;}"
    "table{border-collapse:collapse;margin:1em 0;}"
    "th,td{border:1px solid #ccc;padding:0.3em 0.6em;text-align:left;}"
    "th{background:#f3f3f3;}img{max-width:100%;}"
)


def render_html(sections: Sequence[HookpointSection], failed: Sequence[Any], policy_text: str) -> str:
    """Render the report as a standalone HTML page, with plots linked by file name."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Sweep report</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>Sweep report</h1>",
        f"<p>Champion policy: {html.escape(policy_text)}.</p>",
        "<h2>Champions</h2>",
        _html_table(*champion_rows(sections)) if sections else "<p>No trial finished.</p>",
        "<h2>Pareto frontiers</h2>",
    ]
    for section in sections:
        if section.plot_filename:
            name = html.escape(section.plot_filename, quote=True)
            parts.append(f'<p><img src="{name}" alt="{html.escape(section.hookpoint, quote=True)}"></p>')
    header, rows = trial_rows(sections)
    if rows:
        parts.append(_html_table(header, rows))
    unplotted = unplotted_rows(sections)
    if unplotted:
        items = "".join(f"<li>{html.escape(line)}</li>" for line in unplotted)
        parts.append(f"<p>Finished trials left out of the plots:</p><ul>{items}</ul>")
    parts.append("<h2>Failed trials</h2>")
    parts.append(_html_table(*failed_rows(failed)) if failed else "<p>None.</p>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
