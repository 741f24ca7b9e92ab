"""A concise live view of a running sweep, as a Ray Tune callback."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)


class LiveView(Callback):
    """Write one status line at most every `interval_s` seconds: trials running,
    done and failed, training tokens/s over running trials (over all of a trial's
    SAEs), and per hookpoint the best explained variance so far with its L0."""

    def __init__(self, write: Callable[[str], None] | None = None, interval_s: float = 10.0):
        self.write = write or logger.info
        self.interval_s = interval_s
        self._last_write = 0.0
        self._latest: dict[str, dict[str, Any]] = {}
        self._hookpoint: dict[str, str] = {}
        self._done: set[str] = set()
        self._failed: set[str] = set()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._hookpoint[trial.trial_id] = str(trial.config.get("hookpoint"))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self._hookpoint[trial.trial_id] = str(trial.config.get("hookpoint"))
        self._latest[trial.trial_id] = result
        now = time.monotonic()
        if now - self._last_write >= self.interval_s:
            self._last_write = now
            self.write(self.status_line())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done.add(trial.trial_id)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._failed.add(trial.trial_id)
        self.write(f"trial {trial.trial_id} on {trial.config.get('hookpoint')} failed: {trial.error_file or 'see logs'}")

    def status_line(self) -> str:
        running = [t for t in self._latest if t not in self._done and t not in self._failed]
        tokens_per_second = sum(self._latest[t].get("tokens_per_second", 0.0) for t in running)
        parts = [
            f"trials: {len(running)} running, {len(self._done)} done, {len(self._failed)} failed",
            f"{tokens_per_second / 1000:.1f}k tok/s",
        ]
        for hookpoint, (ev, l0) in sorted(self._best_per_hookpoint().items()):
            parts.append(f"{hookpoint}: EV {ev:.3f} at L0 {l0:.1f}")
        return " | ".join(parts)

    def _best_per_hookpoint(self) -> dict[str, tuple[float, float]]:
        best: dict[str, tuple[float, float]] = {}
        for trial_id, result in self._latest.items():
            hookpoint = self._hookpoint.get(trial_id, "?")
            # A trial that trains several SAEs reports each one's metrics under "members".
            for metrics in (result.get("members") or {}).values() or [result]:
                ev = metrics.get("heldout_explained_variance", metrics.get("explained_variance"))
                l0 = metrics.get("heldout_l0", metrics.get("l0"))
                if ev is None or l0 is None:
                    continue
                if hookpoint not in best or ev > best[hookpoint][0]:
                    best[hookpoint] = (float(ev), float(l0))
        return best

    def finish(self, result: Any) -> None:
        """Write the closing summary of a finished sweep."""
        failed = [t for t in result.trials if not t.ok]
        self.write(
            f"sweep {result.experiment}: {len(result.trials) - len(failed)} SAEs done, {len(failed)} failed, "
            f"{result.tokens_trained:,} tokens trained from {result.lm_forward_tokens:,} model forward tokens "
            f"(sharing ratio {result.sharing_ratio:.2f}) in {result.wall_time_s:.0f} s"
        )
        for trial in failed:
            self.write(f"  failed {trial.trial_id} {trial.config}: {trial.error}")
