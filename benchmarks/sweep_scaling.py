"""Benchmark how a shared-serving sweep scales with concurrent trials and with d_sae.

Two series of sweeps run one after another on one local Ray instance, every trial of a
sweep at once on one hookpoint, with equal tokens per trial:

1. trials: 1, 2, 4, 8 and 16 topk SAEs (expansion factor 4, k = 32, 33, ...). For each
   count it reports the sweep's wall time and the model forward tokens the server ran
   (``lm_forward_tokens``, with and without the normalization estimate). It adds the
   forward tokens that training the same SAEs one at a time would need, the trials'
   steady training rate and the useful FLOPs per second.
2. d_sae: 4 topk SAEs per sweep at expansion factors 2, 4, 8 and 16 (d_sae = 1152 to 9216
   on SmolLM2-135M), with the same columns.

Usage:

    python benchmarks/sweep_scaling.py            # the numbers in BENCHMARKS.md
    python benchmarks/sweep_scaling.py --quick    # a smoke run: 1 and 2 trials, then 2 trials at x2

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


CONTENDED_CORES = 0.2
"""Other jobs' mean CPU use (cores) above which the plot marks a sweep as measured under contention."""


@dataclass
class Settings:
    layer: int
    trial_counts: list[int]
    expansion_factors: list[int]
    trials_per_expansion: int
    tokens_per_trial: int
    batch_size: int
    context_size: int
    sequences_per_batch: int
    output: str | None
    plot: str | None

    @property
    def hookpoint(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 2 trials, then 2 trials at x2; 4 steps")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer of blocks.L.hook_resid_pre (default 8; --quick: 1)",
    )
    parser.add_argument(
        "--trials",
        default=None,
        help="comma-separated trial counts (default 1,2,4,8,16; --quick: 1,2)",
    )
    parser.add_argument(
        "--expansion-factors",
        default=None,
        help="comma-separated expansion factors (default 2,4,8,16; --quick: 2)",
    )
    parser.add_argument(
        "--trials-per-expansion",
        type=int,
        default=None,
        help="trials per expansion-factor sweep (default 4; --quick: 2)",
    )
    parser.add_argument(
        "--tokens-per-trial",
        type=int,
        default=None,
        help="training tokens per trial (default 16384; --quick: 1024)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tokens per optimizer step (default 1024; --quick: 256)",
    )
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--sequences", type=int, default=8, help="windows per forward batch (default 8)")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--plot", default=None, help="write the scaling plots to this PNG file")
    args = parser.parse_args()

    layer = args.layer
    if layer is None:
        layer = 1 if args.quick else 8
    return Settings(
        layer=layer,
        trial_counts=[int(x) for x in (args.trials or ("1,2" if args.quick else "1,2,4,8,16")).split(",")],
        expansion_factors=[int(x) for x in (args.expansion_factors or ("2" if args.quick else "2,4,8,16")).split(",")],
        trials_per_expansion=args.trials_per_expansion or (2 if args.quick else 4),
        tokens_per_trial=args.tokens_per_trial or (1024 if args.quick else 16384),
        batch_size=args.batch_size or (256 if args.quick else 1024),
        context_size=args.context_size,
        sequences_per_batch=args.sequences,
        output=args.output,
        plot=args.plot,
    )


def experiment_data(
    settings: Settings, name: str, trials: int, expansion_factor: int, output_dir: str
) -> dict[str, Any]:
    return _common.sweep_experiment(
        name=name,
        output_dir=output_dir,
        hookpoints=[settings.hookpoint],
        architectures=["topk"],
        expansion_factors=[expansion_factor],
        coefficients={"k": [32 + index for index in range(trials)]},
        tokens_per_trial=settings.tokens_per_trial,
        batch_size_tokens=settings.batch_size,
        context_size=settings.context_size,
        sequences_per_batch=settings.sequences_per_batch,
        shuffle_buffer_tokens=4 * settings.batch_size,
        normalization_tokens=4 * settings.batch_size,
        log_every_steps=1 if settings.tokens_per_trial <= 8 * settings.batch_size else 4,
    )


def measure(settings: Settings, data: dict[str, Any], trials: int, expansion_factor: int) -> dict[str, Any]:
    """Run one sweep and add its FLOP counts and the forward tokens of training one at a time."""
    run = _common.run_shared_sweep(parse_experiment(data))
    d_in = model_info("smollm2-135m").d_model
    forward = _common.model_flops("smollm2-135m").to_hookpoint(settings.hookpoint, settings.context_size)
    sae = _common.sae_training_flops_per_token(d_in, d_in * expansion_factor, "topk")
    needed = _common.shared_sweep_useful_flops(
        tokens_per_trial=settings.tokens_per_trial,
        n_trials=trials,
        forward_flops_per_token=forward,
        sae_flops_per_token=sae,
        context_size=settings.context_size,
    )
    return {
        **run,
        "concurrent_trials": trials,
        "expansion_factor": expansion_factor,
        "d_sae": d_in * expansion_factor,
        "sae_flops_per_token": sae,
        "forward_tokens_one_at_a_time": trials * forward_tokens_alone(settings),
        "useful_flops_per_s": needed["total"] / run["sweep_wall_s"],
        "steady_useful_flops_per_s": run["steady_tokens_per_s"] * needed["per_trained_token"],
    }


def forward_tokens_alone(settings: Settings) -> int:
    """Return the forward tokens one trial needs when it computes its own activations, at least.

    These are the whole forward batches that serve its training tokens and the half of the
    shuffle buffer that still contains tokens when training ends. The normalization estimate
    reads the first of these batches, as a server does, so it adds nothing while it needs
    fewer tokens than training. Batches a server computes ahead (``max_batches_in_flight``)
    are not counted.
    """
    served_per_batch = settings.sequences_per_batch * (settings.context_size - 1)
    # The shuffle buffer and the normalization estimate both hold 4 batches (see experiment_data).
    buffer_tokens = estimate_tokens = 4 * settings.batch_size
    needed = max(settings.tokens_per_trial + buffer_tokens // 2, estimate_tokens)
    batches = -(-needed // served_per_batch)
    return batches * settings.sequences_per_batch * settings.context_size


def summarize(settings: Settings, results: dict[str, Any]) -> str:
    lines = [
        f"hookpoint {settings.hookpoint}, {settings.tokens_per_trial} tokens per trial, "
        f"batches of {settings.batch_size}",
        "",
        "| trials | d_sae | wall s | lm_forward_tokens | with unserved normalization estimate | "
        "one at a time would run, at least | tokens trained | steady tokens/s, all trials | "
        "useful GFLOP/s | steady GFLOP/s | peak memory GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for series in ("by_trial_count", "by_d_sae"):
        for run in results[series]:
            lines.append(
                f"| {run['concurrent_trials']} | {run['d_sae']} | {run['sweep_wall_s']:.0f} | "
                f"{run['lm_forward_tokens']} | {run['lm_forward_tokens'] + run['norm_estimate_forward_tokens']} | "
                f"{run['forward_tokens_one_at_a_time']:.0f} | "
                f"{run['tokens_trained']} | {run['steady_tokens_per_s']:.0f} | {run['useful_flops_per_s'] / 1e9:.1f} | "
                f"{run['steady_useful_flops_per_s'] / 1e9:.1f} | {run['peak_memory_gib']:.2f} |"
            )
    return "\n".join(lines)


def plot(settings: Settings, results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    runs = results["by_trial_count"]
    counts = [run["concurrent_trials"] for run in runs]
    left.plot(counts, [run["sweep_wall_s"] for run in runs], marker="o", label="sweep wall s")
    left.set_xlabel("concurrent trials")
    left.set_ylabel("wall time, s")
    left.set_xscale("log", base=2)
    twin = left.twinx()
    twin.plot(
        counts,
        [run["lm_forward_tokens"] for run in runs],
        marker="s",
        color="tab:green",
        label="lm_forward_tokens",
    )
    twin.plot(
        counts,
        [run["forward_tokens_one_at_a_time"] for run in runs],
        linestyle="--",
        color="tab:gray",
        label="forward tokens, one at a time",
    )
    twin.set_ylabel("model forward tokens")
    handles = left.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    left.legend(handles, labels, fontsize=7, loc="upper left")
    left.set_title(f"{settings.hookpoint}, {settings.tokens_per_trial} tokens per trial", fontsize=9)

    runs = results["by_d_sae"]
    sizes = [run["d_sae"] for run in runs]
    right.plot(sizes, [run["sweep_wall_s"] for run in runs], marker="o", label="sweep wall s")
    right.set_xscale("log", base=2)
    right.set_xlabel("d_sae")
    right.set_ylabel("wall time, s")
    twin = right.twinx()
    twin.plot(
        sizes,
        [run["steady_useful_flops_per_s"] / 1e9 for run in runs],
        marker="s",
        color="tab:red",
        label="steady useful GFLOP/s",
    )
    twin.set_ylabel("GFLOP/s")
    handles = right.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    labels = right.get_legend_handles_labels()[1] + twin.get_legend_handles_labels()[1]
    right.legend(handles, labels, fontsize=7, loc="upper left")
    for run in runs:
        if run["other_jobs_cpu_cores"] > CONTENDED_CORES:
            right.annotate(
                f"other jobs took\n{run['other_jobs_cpu_cores']:.2f} cores",
                (run["d_sae"], run["sweep_wall_s"]),
                fontsize=7,
                xytext=(-95, -35),
                textcoords="offset points",
            )
    right.set_title(f"{settings.trials_per_expansion} concurrent trials per sweep", fontsize=9)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args()
    results: dict[str, Any] = {"settings": asdict(
        settings,
    ), "machine": _common.machine_info(), "by_trial_count": [], "by_d_sae": []}
    import ray

    with tempfile.TemporaryDirectory(prefix="saesweep-bench-") as output_dir:
        plans = [("by_trial_count", n, 4) for n in settings.trial_counts]
        plans += [("by_d_sae", settings.trials_per_expansion, e) for e in settings.expansion_factors]
        datas = [
            (series, n, e, experiment_data(settings, f"scaling-{series}-{n}-x{e}", n, e, output_dir))
            for series, n, e in plans
        ]
        raycluster.connect(
            num_cpus=max(_common.ray_cpus_for(data) for *_, data in datas),
            object_store_memory=1024**3,
            log_to_driver=False,
        )
        try:
            for series, n, e, data in datas:
                results[series].append(measure(settings, data, n, e))
        finally:
            ray.shutdown()
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(summarize(settings, results))
    print()
    _common.write_json(settings.output, results)
    if settings.plot:
        plot(settings, results, settings.plot)


if __name__ == "__main__":
    main()
