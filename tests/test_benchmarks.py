"""The benchmarks' --quick forms run end to end and write JSON with sane values (no timing checks)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_quick(script: str, tmp_path: Path, *extra: str) -> dict:
    """Run ``benchmarks/<script> --quick`` and return the JSON it wrote."""
    output = tmp_path / f"{Path(script).stem}.json"
    completed = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--output", str(output), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())


def is_positive(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_sweep_throughput_quick(tmp_path):
    results = run_quick("sweep_throughput.py", tmp_path)
    settings = results["settings"]
    n_saes = len(settings["layers"]) * len(settings["architectures"])
    expected_tokens = n_saes * settings["tokens_per_sae"]
    for way in ("shared", "one_at_a_time", "saelens"):
        run = results[way]
        assert run["tokens_trained"] == expected_tokens, way
        assert is_positive(run["wall_s"]), way
        assert is_positive(run["lm_forward_tokens"]), way
        assert is_positive(run["peak_memory_gib"]), way
        assert 0 < results["flops"]["utilization"][way] < 1, way
    assert results["shared"]["peak_object_store_gib"] > 0
    assert results["shared"]["sharing_ratio"] > 0
    assert results["flops"]["ideal_ratio"] > 1
    assert len(results["one_at_a_time"]["configs"]) == n_saes
    assert len(results["saelens"]["configs"]) == n_saes
    for peaks in results["matmul_peak_flops"].values():
        assert is_positive(peaks["float32"])
        assert is_positive(peaks["bfloat16"])
    assert results["machine"]["cores"] >= 1
    assert results["machine"]["cpu_model"]


def test_utilization_quick(tmp_path):
    results = run_quick("utilization.py", tmp_path)
    assert set(results["variants"]) == {"float32", "bfloat16"}
    peak = results["peak_flops_per_s"]
    for name, run in results["variants"].items():
        assert not run["failed_trials"], name
        assert run["tokens_trained"] > 0, name
        assert is_positive(run["sweep_wall_s"]), name
        whole = run["useful_flops"]["total"] / run["sweep_wall_s"]
        assert 0 < whole < peak["bfloat16"], name
        assert is_positive(run["useful_flops"]["steady_per_s"]), name
    assert peak["bfloat16"] > 0
    assert peak["float32"] > 0


def test_sweep_scaling_quick(tmp_path):
    results = run_quick("sweep_scaling.py", tmp_path)
    settings = results["settings"]
    counts = [run["concurrent_trials"] for run in results["by_trial_count"]]
    assert counts == settings["trial_counts"]
    for run in results["by_trial_count"] + results["by_d_sae"]:
        assert run["tokens_trained"] == run["concurrent_trials"] * settings["tokens_per_trial"]
        assert is_positive(run["lm_forward_tokens"])
        assert run["forward_tokens_one_at_a_time"] >= run["concurrent_trials"] * settings["tokens_per_trial"]
        assert is_positive(run["useful_flops_per_s"])
    sizes = [run["d_sae"] for run in results["by_d_sae"]]
    assert sizes == sorted(sizes)
    assert len(sizes) == len(settings["expansion_factors"])


def test_trial_overhead_quick(tmp_path):
    results = run_quick("trial_overhead.py", tmp_path)
    for run in ("in_trial", "bare_alone", "bare_with_server"):
        assert is_positive(results[run]["steady_tokens_per_s"]), run
    assert results["bare_with_server"]["reader_tokens"] > 0
    assert is_positive(results["bare_with_server"]["reader_tokens_per_s"])
    assert [lever["lever"] for lever in results["levers"]] == ["autocast-bf16"]
    assert is_positive(results["levers"][0]["steady_tokens_per_s"])
    assert is_positive(results["in_trial_over_bare_alone"])
    copy = results["copy_path"]
    assert copy["training_batches"] > 0
    assert copy["copy_s_per_batch"] >= 0
