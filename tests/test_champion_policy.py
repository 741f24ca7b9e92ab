"""Champion policies that read the spliced CE loss score, and their validation."""

from __future__ import annotations

import pytest

from saesweep.experiment import ExperimentError, parse_experiment
from saesweep.tracking.champions import choose_champions, describe_policy, policy_score

BASE = {
    "name": "c",
    "hookpoints": {"names": ["blocks.0.hook_resid_pre"]},
    "search": {"architectures": ["topk"], "k": [8]},
}


def experiment(champion: dict, ce_eval_tokens: int = 256):
    return parse_experiment(
        {**BASE, "champion": champion, "training": {"ce_eval_tokens": ce_eval_tokens}}, check_model=False
    )


def validation_errors(champion: dict, ce_eval_tokens: int = 0) -> dict[str, str]:
    with pytest.raises(ExperimentError) as raised:
        experiment(champion, ce_eval_tokens)
    return {error.path: message for error, message in zip(raised.value.errors, raised.value.messages)}


class _Outcome:
    def __init__(self, trial_id, hookpoint, ev, ce_loss_score, l0, ok=True):
        self.trial_id = trial_id
        self.config = {"hookpoint": hookpoint}
        self.metrics = {"heldout_explained_variance": ev, "heldout_l0": l0}
        if ce_loss_score is not None:
            self.metrics["heldout_ce_loss_score"] = ce_loss_score
        self.ok = ok


OUTCOMES = [
    _Outcome("a", "h1", ev=0.95, ce_loss_score=0.99, l0=80),  # best on both, but L0 above the limit
    _Outcome("b", "h1", ev=0.90, ce_loss_score=0.70, l0=40),  # best explained variance within the limit
    _Outcome("c", "h1", ev=0.80, ce_loss_score=0.85, l0=45),  # best CE loss score within the limit
    _Outcome("d", "h1", ev=0.99, ce_loss_score=None, l0=10),  # never spliced: not eligible for CE
    _Outcome("e", "h2", ev=0.70, ce_loss_score=0.97, l0=10, ok=False),  # failed trials never win
    _Outcome("f", "h2", ev=0.60, ce_loss_score=0.50, l0=10),
]


def test_ce_policy_picks_best_ce_within_l0():
    policy = experiment({"policy": "max_ce_loss_score_at_l0", "l0_max": 50}).champion
    champions = choose_champions(OUTCOMES, policy)
    assert {hookpoint: o.trial_id for hookpoint, o in champions.items()} == {"h1": "c", "h2": "f"}
    assert policy_score(OUTCOMES[0].metrics, policy) is None
    assert policy_score(OUTCOMES[3].metrics, policy) is None
    assert policy_score(OUTCOMES[2].metrics, policy) == pytest.approx(0.85)
    assert describe_policy(policy) == "highest ce_loss_score with l0 <= 50, measured on held-out text"


def test_explained_variance_policy_unchanged():
    policy = experiment({"l0_max": 50}, ce_eval_tokens=0).champion
    assert policy.policy == "max_explained_variance_at_l0"
    champions = choose_champions(OUTCOMES, policy)
    assert {hookpoint: o.trial_id for hookpoint, o in champions.items()} == {"h1": "d", "h2": "f"}


def test_weighted_policy_reads_ce_loss_score():
    policy = experiment({"policy": "weighted_score", "weights": {"ce_loss_score": 1.0, "l0": -0.01}}).champion
    champions = choose_champions(OUTCOMES, policy)
    # a: 0.99 - 0.80 = 0.19, b: 0.70 - 0.40 = 0.30, c: 0.85 - 0.45 = 0.40; d has no CE score.
    assert champions["h1"].trial_id == "c"


def test_ce_policy_without_spliced_evaluation_rejected():
    errors = validation_errors({"policy": "max_ce_loss_score_at_l0", "l0_max": 50})
    assert list(errors) == ["champion.policy"]
    message = errors["champion.policy"]
    assert message.startswith("champion.policy = 'max_ce_loss_score_at_l0'")
    assert "needs ce_loss_score" in message
    assert "training.ce_eval_tokens = 0" in message
    assert "Fix: set training.ce_eval_tokens to a number of held-out tokens such as 4096" in message


def test_weighted_ce_without_spliced_evaluation_rejected():
    errors = validation_errors({"policy": "weighted_score", "weights": {"heldout_kl_div_score": 1.0, "l0": -0.01}})
    assert list(errors) == ["champion.weights"]
    assert "needs heldout_kl_div_score" in errors["champion.weights"]
    assert "drop heldout_kl_div_score from champion.weights" in errors["champion.weights"]


def test_metric_field_naming_ce_rejected():
    errors = validation_errors({"l0_max": 50, "explained_variance_metric": "ce_loss_score"})
    assert list(errors) == ["champion.explained_variance_metric"]
    assert "remove champion.explained_variance_metric" in errors["champion.explained_variance_metric"]


def test_ce_policy_needs_l0_max():
    errors = validation_errors({"policy": "max_ce_loss_score_at_l0"}, ce_eval_tokens=256)
    assert list(errors) == ["champion.l0_max"]
    assert "policy max_ce_loss_score_at_l0 needs it" in errors["champion.l0_max"]


def test_ce_policy_with_champion_only_scoring_rejected():
    with pytest.raises(ExperimentError) as raised:
        parse_experiment(
            {
                **BASE,
                "champion": {"policy": "max_ce_loss_score_at_l0", "l0_max": 64},
                "training": {"ce_eval_tokens": 256, "ce_eval_trials": "champions"},
            },
            check_model=False,
        )
    errors = {error.path: message for error, message in zip(raised.value.errors, raised.value.messages)}
    assert list(errors) == ["training.ce_eval_trials"]
    assert "'champions'" in errors["training.ce_eval_trials"]
    assert "ce_eval_trials: all" in errors["training.ce_eval_trials"]


def test_champion_only_scoring_with_ev_policy_accepted():
    exp = parse_experiment(
        {
            **BASE,
            "champion": {"l0_max": 64},
            "training": {"ce_eval_tokens": 256, "ce_eval_trials": "champions"},
        },
        check_model=False,
    )
    assert exp.training.ce_eval_trials == "champions"
