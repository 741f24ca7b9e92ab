"""The sweep report: Pareto frontiers, plots, champion and failure tables."""

from __future__ import annotations

import random

import matplotlib.image
import pytest

from saesweep.experiment import ChampionSection
from saesweep.sweep.runner import TrialOutcome
from saesweep.tracking.champions import choose_champions, describe_policy
from saesweep.tracking.pareto import (
    CE_LOSS_PANEL,
    CHAMPION_MARKER_SIZE,
    EXPLAINED_VARIANCE_PANEL,
    TrialPoint,
    pareto_frontier,
    plot_hookpoint,
)
from saesweep.tracking.report import (
    HTML_FILENAME,
    MARKDOWN_FILENAME,
    plot_filename,
    short_reason,
    write_report,
)

HOOK_A = "blocks.2.hook_resid_pre"
HOOK_B = "blocks.10.hook_resid_pre"
COEFFICIENT_OF = {"topk": "k", "batchtopk": "k", "standard": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}


def outcome(trial_id, hookpoint, architecture, coefficient, metrics, error=None, expansion_factor=4):
    """A TrialOutcome shaped like the sweep runner's: every coefficient key, the unused ones None."""
    config = {
        "hookpoint": hookpoint,
        "architecture": architecture,
        "expansion_factor": expansion_factor,
        "l1_coefficient": None,
        "l0_coefficient": None,
        "k": None,
    }
    config[COEFFICIENT_OF[architecture]] = coefficient
    return TrialOutcome(trial_id, config, metrics, error, None if error else f"/sweep/{trial_id}/sae")


def heldout(l0, explained_variance, **more):
    metrics = {"heldout_l0": l0, "heldout_explained_variance": explained_variance, "heldout_mse": 0.25, "heldout_l1": 3.0}
    metrics.update({f"heldout_{name}": value for name, value in more.items()})
    # Training-time values that the report must not plot when held-out ones exist.
    metrics.update({"l0": 999.0, "explained_variance": -1.0})
    return metrics


@pytest.fixture
def sweep_outcomes() -> list[TrialOutcome]:
    """Two hookpoints: A with a known frontier and CE scores, B without CE scores; one failure."""
    return [
        outcome("a_topk8", HOOK_A, "topk", 8, heldout(8.0, 0.60, ce_loss_score=0.70)),
        outcome("a_topk32", HOOK_A, "topk", 32, heldout(32.0, 0.80, ce_loss_score=0.85)),
        outcome("a_std1", HOOK_A, "standard", 1.0, heldout(20.0, 0.55, ce_loss_score=0.90)),
        outcome("a_jump", HOOK_A, "jumprelu", 0.1, heldout(60.0, 0.90, ce_loss_score=0.95)),
        outcome("b_topk16", HOOK_B, "topk", 16, heldout(16.0, 0.70)),
        outcome("b_std3", HOOK_B, "standard", 3.0, heldout(40.0, 0.65)),
        outcome(
            "a_diverged",
            HOOK_A,
            "standard",
            1.0e40,
            {},
            error="TrainingDivergedError: loss is nan | lower the learning rate <or> the sparsity coefficient",
        ),
    ]


@pytest.mark.parametrize(
    ("points", "expected"),
    [
        ([], []),
        ([(10.0, 0.5)], [0]),
        # Sorted by L0, each frontier point beats every point to its left.
        ([(8.0, 0.6), (32.0, 0.8), (20.0, 0.55), (60.0, 0.9)], [0, 1, 3]),
        # A point that needs more L0 for less explained variance is dominated.
        ([(5.0, 0.9), (50.0, 0.7)], [0]),
        # Of equal L0, only the best score counts; of identical points, the first.
        ([(10.0, 0.4), (10.0, 0.6), (10.0, 0.6)], [1]),
        # Equal score at a higher L0 is not an improvement.
        ([(10.0, 0.6), (20.0, 0.6), (30.0, 0.7)], [0, 2]),
    ],
)
def test_pareto_frontier_cases(points, expected):
    assert pareto_frontier(points) == expected


def test_report_writes_plots_and_tables(sweep_outcomes, tmp_path):
    champions = {HOOK_A: sweep_outcomes[1], HOOK_B: sweep_outcomes[4]}
    written = write_report(sweep_outcomes, champions, "highest explained_variance with l0 <= 40", tmp_path / "report")

    names = [path.name for path in written]
    # Hookpoints sort by layer number, so blocks.2 comes before blocks.10.
    assert names == [plot_filename(HOOK_A), plot_filename(HOOK_B), MARKDOWN_FILENAME, HTML_FILENAME]
    for path in written:
        assert path.is_file()
        assert path.parent == tmp_path / "report"


def test_ce_scores_add_second_panel(sweep_outcomes, tmp_path):
    written = write_report(sweep_outcomes, {}, "policy", tmp_path)
    image_a = matplotlib.image.imread(written[0])
    image_b = matplotlib.image.imread(written[1])

    # Hookpoint A has CE loss scores: two panels side by side, same height.
    assert image_a.shape[0] == image_b.shape[0]
    assert image_a.shape[1] == pytest.approx(2 * image_b.shape[1], rel=0.01)


def test_markdown_states_policy_and_champions(sweep_outcomes, tmp_path):
    champions = {HOOK_A: sweep_outcomes[1], HOOK_B: sweep_outcomes[4]}
    write_report(sweep_outcomes, champions, "highest explained_variance with l0 <= 40", tmp_path)
    text = (tmp_path / MARKDOWN_FILENAME).read_text()

    assert "Champion policy: highest explained_variance with l0 <= 40." in text
    assert f"| {HOOK_A} | a_topk32 | topk | 4 | k=32 | 0.8000 | 32.0 | 0.25 | 0.8500 | held-out text |" in text
    assert f"| {HOOK_B} | b_topk16 | topk | 4 | k=16 | 0.7000 | 16.0 | 0.25 | – | held-out text |" in text
    assert f"![{HOOK_A}]({plot_filename(HOOK_A)})" in text
    # Training-time metrics are not shown once held-out ones exist.
    assert "999" not in text


def test_markdown_marks_frontier_trials(sweep_outcomes, tmp_path):
    write_report(sweep_outcomes, {HOOK_A: sweep_outcomes[1]}, "policy", tmp_path)
    lines = (tmp_path / MARKDOWN_FILENAME).read_text().splitlines()
    rows = {line.split(" | ")[1]: line for line in lines if line.startswith(f"| {HOOK_A} | a_")}

    assert set(rows) == {"a_topk8", "a_topk32", "a_std1", "a_jump"}
    assert rows["a_topk8"].endswith("| yes |  |")
    assert rows["a_topk32"].endswith("| yes | yes |")
    assert rows["a_std1"].endswith("|  |  |")
    assert rows["a_jump"].endswith("| yes |  |")


def test_failed_trials_listed_with_reason(sweep_outcomes, tmp_path):
    write_report(sweep_outcomes, {}, "policy", tmp_path)
    markdown = (tmp_path / MARKDOWN_FILENAME).read_text()
    page = (tmp_path / HTML_FILENAME).read_text()

    assert "## Failed trials" in markdown
    assert (
        f"| a_diverged | {HOOK_A} | standard | 4 | l1_coefficient=1e+40 | TrainingDivergedError: loss is nan "
        "\\| lower the learning rate <or> the sparsity coefficient |"
    ) in markdown
    assert "lower the learning rate &lt;or&gt; the sparsity coefficient" in page
    assert "<or>" not in page


def test_html_has_tables_and_images(sweep_outcomes, tmp_path):
    write_report(sweep_outcomes, {HOOK_A: sweep_outcomes[1]}, "max EV & L0 <= 40", tmp_path)
    page = (tmp_path / HTML_FILENAME).read_text()

    assert page.startswith("<!DOCTYPE html>")
    assert "Champion policy: max EV &amp; L0 &lt;= 40." in page
    assert f'<img src="{plot_filename(HOOK_A)}"' in page
    assert f'<img src="{plot_filename(HOOK_B)}"' in page
    assert "<td>a_topk32</td>" in page
    assert "no champion: no finished trial meets the policy" in page


def test_hookpoint_without_champion_says_so(sweep_outcomes, tmp_path):
    write_report(sweep_outcomes, {HOOK_A: sweep_outcomes[1]}, "policy", tmp_path)
    text = (tmp_path / MARKDOWN_FILENAME).read_text()

    assert f"| {HOOK_B} | no champion: no finished trial meets the policy |" in text


def test_training_metrics_when_no_heldout(tmp_path):
    outcomes = [
        outcome("t1", HOOK_A, "topk", 8, {"l0": 8.0, "explained_variance": 0.5, "mse": 0.3}),
        outcome("t2", HOOK_A, "topk", 16, {"l0": 16.0, "explained_variance": 0.7, "mse": 0.2}),
        outcome("dead", HOOK_A, "standard", 100.0, {"l0": 0.0, "explained_variance": 0.0}),
    ]
    written = write_report(outcomes, {HOOK_A: outcomes[1]}, "policy", tmp_path)
    text = (tmp_path / MARKDOWN_FILENAME).read_text()

    assert written[0].name == plot_filename(HOOK_A)
    assert f"| {HOOK_A} | t2 | topk | 4 | k=16 | 0.7000 | 16.0 | 0.2 | training batches |" in text
    assert f"{HOOK_A}, trial dead: L0 is 0, which a log axis cannot show" in text


def test_no_finished_trials_still_reports(tmp_path):
    failed = [outcome("x", HOOK_A, "topk", 8, {}, error="RayTaskError: worker died")]
    written = write_report(failed, {}, "policy", tmp_path)
    text = (tmp_path / MARKDOWN_FILENAME).read_text()

    assert [path.name for path in written] == [MARKDOWN_FILENAME, HTML_FILENAME]
    assert "No trial finished." in text
    assert "RayTaskError: worker died" in text


def test_plot_marks_champion_and_frontier():
    points = [
        TrialPoint("a", HOOK_A, "topk", 4, "k", 8.0, 8.0, 0.60, 0.1, None),
        TrialPoint("b", HOOK_A, "topk", 4, "k", 32.0, 32.0, 0.80, 0.1, None),
        TrialPoint("c", HOOK_A, "standard", 4, "l1_coefficient", 1.0, 20.0, 0.55, 0.1, None),
    ]
    figure = plot_hookpoint(HOOK_A, points, "b", [EXPLAINED_VARIANCE_PANEL], "held-out text")
    (ax,) = figure.axes

    assert ax.get_xscale() == "log"
    (step,) = [line for line in ax.get_lines() if line.get_label() == "Pareto frontier"]
    assert list(step.get_xdata()) == [8.0, 32.0, 32.0]
    assert list(step.get_ydata()) == [0.60, 0.80, 0.80]
    stars = [c for c in ax.collections if list(c.get_sizes()) == [CHAMPION_MARKER_SIZE]]
    assert len(stars) == 1
    assert stars[0].get_offsets().tolist() == [[32.0, 0.80]]
    # One scatter per architecture, so the legend shows each colour once.
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["standard", "topk", "Pareto frontier", "champion"]


def test_ce_panel_uses_its_own_frontier():
    points = [
        TrialPoint("a", HOOK_A, "topk", 4, "k", 8.0, 8.0, 0.60, 0.1, 0.9),
        TrialPoint("b", HOOK_A, "topk", 4, "k", 32.0, 32.0, 0.80, 0.1, 0.7),
    ]
    figure = plot_hookpoint(HOOK_A, points, None, [EXPLAINED_VARIANCE_PANEL, CE_LOSS_PANEL], "held-out text")
    ev_axes, ce_axes = figure.axes

    assert "CE loss recovered" in ce_axes.get_ylabel()
    (ev_step,) = [line for line in ev_axes.get_lines() if line.get_label() == "Pareto frontier"]
    (ce_step,) = [line for line in ce_axes.get_lines() if line.get_label() == "Pareto frontier"]
    assert list(ev_step.get_xdata()) == [8.0, 32.0, 32.0]
    # On CE loss recovered, the trial at L0 32 is dominated by the one at L0 8.
    assert list(ce_step.get_xdata()) == [8.0, 32.0]
    assert list(ce_step.get_ydata()) == [0.9, 0.9]


def test_long_reason_keeps_both_ends():
    reason = "RayTaskError(ValueError): " + "frame\n" * 500 + "ValueError: d_sae must be positive"
    text = short_reason(reason)

    assert text.startswith("RayTaskError(ValueError): frame frame")
    assert text.endswith("ValueError: d_sae must be positive")
    assert "\n" not in text
    assert len(text) <= 600 + len(" … ")


def test_report_agrees_with_champion_policy(tmp_path):
    rng = random.Random(0)
    outcomes = []
    for index in range(12):
        l0 = rng.uniform(4.0, 200.0)
        explained_variance = 1.0 - 1.0 / (1.0 + l0 / 30.0) + rng.uniform(-0.05, 0.05)
        outcomes.append(outcome(f"t{index}", HOOK_A, "topk", int(l0), heldout(l0, explained_variance)))
    policy = ChampionSection(l0_max=64)
    champions = choose_champions(outcomes, policy)
    write_report(outcomes, champions, describe_policy(policy), tmp_path)
    text = (tmp_path / MARKDOWN_FILENAME).read_text()

    eligible = [o for o in outcomes if o.metrics["heldout_l0"] <= 64]
    best = max(eligible, key=lambda o: o.metrics["heldout_explained_variance"])
    assert champions[HOOK_A] is best
    assert f"| {HOOK_A} | {best.trial_id} | topk |" in text
    assert describe_policy(policy) in text
    # The champion under an L0 limit is the frontier point at that limit.
    frontier_rows = [line for line in text.splitlines() if line.startswith(f"| {HOOK_A} | t") and "| yes |" in line]
    assert any(f"| {best.trial_id} |" in line for line in frontier_rows)
