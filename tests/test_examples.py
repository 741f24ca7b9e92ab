"""Every example experiment runs end to end in its --smoke form."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
GPT2_OFFLINE = [
    "model.random_weights=true",
    "data.dataset=embedded",
    "model.device=cpu",
    "sae.device=cpu",
    "tune.resources_per_trial.gpu=0",
    "servers.resources.gpu=0",
    "servers.resources.custom={}",
]


@pytest.mark.parametrize(
    ("experiment", "overrides"),
    [("quickstart.yaml", []), ("gpt2_all_layers.yaml", GPT2_OFFLINE)],
    ids=["quickstart", "gpt2_all_layers"],
)
def test_example_smoke_run(tmp_path, experiment, overrides):
    command = [sys.executable, "-m", "saesweep", "run", str(REPO / "experiments" / experiment), "--smoke"]
    for override in [*overrides, f"output_dir={tmp_path}"]:
        command += ["--set", override]
    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    assert "2 SAEs done, 0 failed" in completed.stdout, completed.stdout[-2000:]
    assert list(tmp_path.glob("tune/*-smoke/*/checkpoint_*/**/sae/cfg.json"))
    assert not (tmp_path / "mlruns").exists()
