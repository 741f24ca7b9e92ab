"""Killing the sweep driver mid-run, then `resume`: the sweep completes without rerunning finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_sweep import small_experiment

pytestmark = pytest.mark.slow


def _trial_results(tune_path: Path) -> dict[str, list[dict]]:
    results = {}
    for result_file in tune_path.glob("run_trial_*/result.json"):
        lines = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        results[result_file.parent.name] = lines
    return results


def _finished(results: dict[str, list[dict]]) -> set[str]:
    return {name for name, lines in results.items() if lines and lines[-1].get("done")}


def _start(command: str, experiment_file: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "saesweep", command, str(experiment_file)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so the test can kill Ray with it
    )


def test_resume_after_driver_killed(tmp_path):
    data = small_experiment(
        tmp_path,
        search={"architectures": ["topk"], "k": [8, 16, 24, 32], "l1_coefficient": None},
        tune={"max_concurrent_trials": 1},
    )
    data["name"] = "resumable"
    experiment_file = tmp_path / "resumable.yaml"
    experiment_file.write_text(yaml.safe_dump(data))
    tune_path = tmp_path / "results" / "tune" / "resumable"

    driver = _start("run", experiment_file, tmp_path)
    try:
        deadline = time.monotonic() + 600
        while not _finished(_trial_results(tune_path)):
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline, "no trial finished within 10 minutes"
            time.sleep(1)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    before = _trial_results(tune_path)
    finished_before = _finished(before)
    assert 1 <= len(finished_before) < 4

    resumed = _start("resume", experiment_file, tmp_path)
    output, _ = resumed.communicate(timeout=900)
    assert resumed.returncode == 0, output

    after = _trial_results(tune_path)
    assert len(after) == 4
    assert _finished(after) == set(after)
    for name in finished_before:
        assert after[name] == before[name], f"finished trial {name} ran again"
    # One trial ran at a time, so no forward token fed two trials: the forward
    # tokens of both runs of the driver must cover every trained token.
    summary = json.loads((tune_path / "summary.json").read_text())
    assert summary["tokens_trained"] == 4 * 6144
    assert summary["sharing_ratio"] <= 1.0
