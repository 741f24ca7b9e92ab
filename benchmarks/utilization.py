"""Benchmark how much of this machine's matmul peak a whole shared-serving sweep uses.

One run measures torch's float32 and bfloat16 matmul peaks (all cores, before and after the
sweeps) and runs the same sweep (hookpoints x architectures, equal tokens per SAE) in
several variants, one after another on one local Ray instance:

- float32: model and SAEs in float32 (the default);
- bfloat16: model and SAEs in bfloat16 (``model.dtype`` and ``sae.dtype``);
- bf16-model: model in bfloat16, SAEs in float32;
- server-2-threads: float32, the activation server with 2 CPUs (2 torch threads);
- trial-2-threads: float32, every trial with 2 CPUs (2 torch threads) instead of 0.1 (1
  thread). The Ray instance declares enough logical CPUs that all trials still run at
  once, so the trials' threads outnumber the cores;
- autocast: float32, SAE training under bfloat16 autocast (``training.autocast``);
- packed: float32, the SAEs of each hookpoint trained together in one trial
  (``tune.saes_per_trial: 3``), so one trial process per hookpoint;
- packed-server-2: packed, the activation server with 2 CPUs (2 torch threads);
- packed-bf16: packed-server-2, with the model in bfloat16 and SAE training under autocast.

For each variant it reports the sweep's wall time and its useful FLOPs per second (model
forward plus SAE training, formulas in ``benchmarks/_common.py``). It gives that rate as a
fraction of the float32 and of the bfloat16 peak, over the whole sweep and over its steady
state (the trials' reports after their first, which leaves out start-up).

Usage:

    python benchmarks/utilization.py            # the numbers in BENCHMARKS.md
    python benchmarks/utilization.py --quick    # a smoke run: float32 and bfloat16, a few steps

Ray runs locally on 127.0.0.1. No network is needed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from saesweep import raycluster  # noqa: E402
from saesweep.activations.models import model_info  # noqa: E402
from saesweep.experiment import parse_experiment  # noqa: E402

VARIANTS: dict[str, dict[str, Any]] = {
    "float32": {"model_dtype": "float32", "sae_dtype": "float32"},
    "bfloat16": {"model_dtype": "bfloat16", "sae_dtype": "bfloat16"},
    "bf16-model": {"model_dtype": "bfloat16", "sae_dtype": "float32"},
    "server-2-threads": {"model_dtype": "float32", "sae_dtype": "float32", "server_cpus": 2.0},
    "trial-2-threads": {"model_dtype": "float32", "sae_dtype": "float32", "trial_cpus": 2.0},
    "autocast": {"model_dtype": "float32", "sae_dtype": "float32", "autocast": True},
    "packed": {"model_dtype": "float32", "sae_dtype": "float32", "saes_per_trial": 3, "trial_cpus": 0.25},
    "packed-server-2": {
        "model_dtype": "float32", "sae_dtype": "float32", "saes_per_trial": 3, "trial_cpus": 0.25, "server_cpus": 2.0,
    },
    "packed-bf16": {
        "model_dtype": "bfloat16", "sae_dtype": "float32", "autocast": True, "saes_per_trial": 3, "trial_cpus": 0.25,
        "server_cpus": 2.0,
    },
}
"""Sweep variants by name: dtypes, bfloat16 autocast of SAE training, SAEs per trial, and
Ray CPUs per server and per trial."""


@dataclass
class Settings:
    layers: list[int]
    architectures: list[str]
    expansion_factor: int
    tokens_per_sae: int
    batch_size: int
    context_size: int
    sequences_per_batch: int
    variants: list[str]
    output: str | None
    plot: str | None

    @property
    def hookpoints(self) -> list[str]:
        return [f"blocks.{layer}.hook_resid_pre" for layer in self.layers]


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1 hookpoint x 2 configs, float32 and bfloat16, 4 steps",
    )
    _common.add_sae_set_arguments(parser, default_tokens_per_sae=16384)
    parser.add_argument(
        "--variants",
        default=None,
        help=f"comma-separated sweep variants, from {', '.join(VARIANTS)} (default all; --quick: float32,bfloat16)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--plot", default=None, help="write a bar chart of the utilization to this PNG file")
    args = parser.parse_args()

    variants = (args.variants or ("float32,bfloat16" if args.quick else ",".join(VARIANTS))).split(",")
    unknown = [name for name in variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {', '.join(VARIANTS)}")
    return Settings(
        layers=[int(x) for x in (args.layers or ("1" if args.quick else "4,8,12,16")).split(",")],
        architectures=(args.architectures or ("topk,standard" if args.quick else "topk,standard,jumprelu")).split(","),
        expansion_factor=args.expansion_factor,
        tokens_per_sae=args.tokens_per_sae or (1024 if args.quick else 16384),
        batch_size=args.batch_size or (256 if args.quick else 1024),
        context_size=args.context_size,
        sequences_per_batch=args.sequences,
        variants=variants,
        output=args.output,
        plot=args.plot,
    )


def experiment_data(settings: Settings, variant: str, output_dir: str) -> dict[str, Any]:
    options = VARIANTS[variant]
    return _common.sweep_experiment(
        name=f"utilization-{variant}",
        output_dir=output_dir,
        hookpoints=settings.hookpoints,
        architectures=settings.architectures,
        expansion_factors=[settings.expansion_factor],
        tokens_per_trial=settings.tokens_per_sae,
        batch_size_tokens=settings.batch_size,
        context_size=settings.context_size,
        sequences_per_batch=settings.sequences_per_batch,
        shuffle_buffer_tokens=4 * settings.batch_size,
        normalization_tokens=4 * settings.batch_size,
        log_every_steps=1 if settings.tokens_per_sae <= 8 * settings.batch_size else 4,
        model_dtype=options["model_dtype"],
        sae_dtype=options["sae_dtype"],
        trial_cpus=options.get("trial_cpus", 0.1),
        server_cpus=options.get("server_cpus", 1.0),
        saes_per_trial=options.get("saes_per_trial", 1),
        autocast=options.get("autocast", False),
    )


def useful_flops(settings: Settings, run: dict[str, Any]) -> dict[str, float]:
    """Return the useful FLOPs of a sweep run, over the whole sweep and per second of its steady state."""
    flops = _common.model_flops("smollm2-135m")
    d_in = model_info("smollm2-135m").d_model
    deepest = max(settings.hookpoints, key=_common.blocks_run)
    needed = _common.shared_sweep_useful_flops(
        tokens_per_trial=settings.tokens_per_sae,
        n_trials=len(settings.hookpoints) * len(settings.architectures),
        forward_flops_per_token=flops.to_hookpoint(deepest, settings.context_size),
        sae_flops_per_token=_common.mean_sae_training_flops_per_token(
            d_in, d_in * settings.expansion_factor, settings.architectures
        ),
        context_size=settings.context_size,
    )
    return {"total": needed["total"], "steady_per_s": run["steady_tokens_per_s"] * needed["per_trained_token"]}


def summarize(settings: Settings, results: dict[str, Any]) -> str:
    peaks = results["peak_flops_per_s"]
    lines = [
        f"{len(settings.hookpoints) * len(settings.architectures)} SAEs (x{settings.expansion_factor}) on "
        f"{', '.join(settings.hookpoints)}; {settings.tokens_per_sae} tokens each",
        f"matmul peak: float32 {peaks['float32'] / 1e9:.0f} GFLOP/s, bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s",
        "",
        "| variant | wall s | useful GFLOP/s | of float32 peak | of bfloat16 peak | steady GFLOP/s | "
        "steady, of float32 peak | steady, of bfloat16 peak | peak memory GiB | other jobs, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for variant in settings.variants:
        run = results["variants"][variant]
        rate = run["useful_flops"]["total"] / run["sweep_wall_s"]
        steady = run["useful_flops"]["steady_per_s"]
        lines.append(
            f"| {variant} | {run['sweep_wall_s']:.0f} | {rate / 1e9:.1f} | {rate / peaks['float32']:.1%} | "
            f"{rate / peaks['bfloat16']:.1%} | {steady / 1e9:.1f} | {steady / peaks['float32']:.1%} | "
            f"{steady / peaks['bfloat16']:.1%} | {run['peak_memory_gib']:.2f} | {run['other_jobs_cpu_cores']:.2f} |"
        )
    return "\n".join(lines)


def plot(settings: Settings, results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peaks = results["peak_flops_per_s"]
    names = settings.variants
    runs = [results["variants"][name] for name in names]
    whole = [run["useful_flops"]["total"] / run["sweep_wall_s"] / 1e9 for run in runs]
    steady = [run["useful_flops"]["steady_per_s"] / 1e9 for run in runs]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    positions = range(len(names))
    axis.bar([p - 0.2 for p in positions], whole, width=0.4, label="whole sweep")
    axis.bar([p + 0.2 for p in positions], steady, width=0.4, label="steady state")
    axis.axhline(peaks["float32"] / 1e9, color="gray", linestyle="--", label="float32 matmul peak")
    axis.set_xticks(list(positions), names, fontsize=8, rotation=30, ha="right")
    axis.set_ylabel("useful GFLOP/s")
    axis.set_title(
        f"Sweep utilization, {os.cpu_count()} CPU cores (bfloat16 peak {peaks['bfloat16'] / 1e9:.0f} GFLOP/s)",
        fontsize=10,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args()
    cores = os.cpu_count() or 1
    results: dict[str, Any] = {"settings": asdict(settings), "machine": _common.machine_info()}
    peaks_before = _common.matmul_peaks(cores)
    results["variants"] = {}
    import ray

    with tempfile.TemporaryDirectory(prefix="saesweep-bench-") as output_dir:
        datas = {variant: experiment_data(settings, variant, output_dir) for variant in settings.variants}
        raycluster.connect(
            num_cpus=max(_common.ray_cpus_for(data) for data in datas.values()),
            object_store_memory=1024**3,
            log_to_driver=False,
        )
        try:
            for variant, data in datas.items():
                run = _common.run_shared_sweep(parse_experiment(data), allow_failures=True)
                run["useful_flops"] = useful_flops(settings, run)
                results["variants"][variant] = run
        finally:
            ray.shutdown()
    peaks_after = _common.matmul_peaks(cores)
    results["peak_flops_per_s"] = {dtype: max(peaks_before[dtype], peaks_after[dtype]) for dtype in peaks_before}
    results["matmul_peak_flops"] = {"before": peaks_before, "after": peaks_after}
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(summarize(settings, results))
    print()
    _common.write_json(settings.output, results)
    if settings.plot:
        plot(settings, results, settings.plot)


if __name__ == "__main__":
    main()
