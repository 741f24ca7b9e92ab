"""Benchmark one shared-serving sweep against training the same SAEs one at a time, and SAELens.

The same SAE configs (hookpoints x architectures, equal tokens per SAE) are trained three ways:

a. shared: one saesweep sweep (``run_sweep``). One activation server runs the model once per
   batch, to the deepest hookpoint, and every trial reads its hookpoint from it.
a2. the same sweep with the SAEs of each hookpoint trained together in one trial
   (``tune.saes_per_trial``), so one trial process per hookpoint instead of one per SAE.
b. one at a time: in this process, config after config, with saesweep's own ``SAETrainer``
   and ``run_hookpoints``. Each config pays for its own forward passes (normalization
   estimate included) and reads them through the same shuffle buffer as a trial, so only the
   sharing differs from (a).
c. SAELens: SAELens's ``LanguageModelSAETrainingRunner``, config after config, on a
   TransformerLens ``HookedTransformer`` with the embedded model's weights. It reads the
   same token windows (pre-tokenized) and the same served positions.

For each it reports the wall time, the model forward tokens and the useful FLOPs (formulas
in ``benchmarks/_common.py``). It adds the utilization against this machine's matmul peak,
measured in the same run, and the peak memory (PSS of every process, Ray's object store
included). The ideal ratio of (b) to (a) is the ratio of their useful FLOPs.

Usage:

    python benchmarks/sweep_throughput.py            # the numbers in BENCHMARKS.md
    python benchmarks/sweep_throughput.py --quick    # a smoke run of a few steps

Ray runs locally on 127.0.0.1. No network is needed.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from saesweep import raycluster  # noqa: E402
from saesweep.activations.models import load_model, model_info  # noqa: E402
from saesweep.activations.server import open_token_stream  # noqa: E402
from saesweep.experiment import ExperimentConfig, parse_experiment  # noqa: E402
from saesweep.saes import SAE  # noqa: E402
from saesweep.sweep.runner import _server_config  # noqa: E402
from saesweep.sweep.space import trial_sae_config  # noqa: E402
from saesweep.sweep.trial import trainer_config  # noqa: E402
from saesweep.training.trainer import SAETrainer  # noqa: E402

logger = logging.getLogger("benchmarks.sweep_throughput")


@dataclass
class Settings:
    layers: list[int]
    architectures: list[str]
    expansion_factor: int
    tokens_per_sae: int
    batch_size: int
    context_size: int
    sequences_per_batch: int
    shuffle_buffer_tokens: int
    normalization_tokens: int
    log_every_steps: int
    threads: int
    saes_per_trial: int
    saelens: bool
    output: str | None
    plot: str | None

    @property
    def hookpoints(self) -> list[str]:
        return [f"blocks.{layer}.hook_resid_pre" for layer in self.layers]


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 hookpoint x 2 configs, 4 steps each")
    _common.add_sae_set_arguments(parser, default_tokens_per_sae=32768)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of the one-at-a-time and SAELens runs and of the matmul peak (default: all cores)",
    )
    parser.add_argument(
        "--saes-per-trial",
        type=int,
        default=None,
        help="also run the shared sweep with this many SAEs of a hookpoint per trial "
        "(default: the number of architectures; 1 skips that run)",
    )
    parser.add_argument("--no-saelens", action="store_true", help="skip the SAELens run")
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    parser.add_argument("--plot", default=None, help="write a bar chart of the wall times to this PNG file")
    args = parser.parse_args()

    batch_size = args.batch_size or (256 if args.quick else 1024)
    architectures = (args.architectures or ("topk,standard" if args.quick else "topk,standard,jumprelu")).split(",")
    return Settings(
        layers=[int(x) for x in (args.layers or ("1" if args.quick else "4,8,12,16")).split(",")],
        architectures=architectures,
        expansion_factor=args.expansion_factor,
        tokens_per_sae=args.tokens_per_sae or (1024 if args.quick else 32768),
        batch_size=batch_size,
        context_size=args.context_size,
        sequences_per_batch=args.sequences,
        shuffle_buffer_tokens=4 * batch_size,
        normalization_tokens=4 * batch_size,
        log_every_steps=1 if args.quick else 4,
        threads=args.threads,
        saes_per_trial=args.saes_per_trial or len(architectures),
        saelens=not args.no_saelens,
        output=args.output,
        plot=args.plot,
    )


def build_experiment(
    settings: Settings, output_dir: str, saes_per_trial: int = 1
) -> tuple[dict[str, Any], ExperimentConfig]:
    data = _common.sweep_experiment(
        name="sweep-throughput" if saes_per_trial == 1 else "sweep-throughput-packed",
        output_dir=output_dir,
        hookpoints=settings.hookpoints,
        architectures=settings.architectures,
        expansion_factors=[settings.expansion_factor],
        tokens_per_trial=settings.tokens_per_sae,
        batch_size_tokens=settings.batch_size,
        context_size=settings.context_size,
        sequences_per_batch=settings.sequences_per_batch,
        shuffle_buffer_tokens=settings.shuffle_buffer_tokens,
        normalization_tokens=settings.normalization_tokens,
        log_every_steps=settings.log_every_steps,
        # Each trial gets one torch thread: 0.1 CPU when it trains one SAE, 0.25 when it trains several.
        trial_cpus=0.1 if saes_per_trial == 1 else 0.25,
        # The server runs the forward pass on every core, so it is not the bottleneck.
        server_cpus=settings.threads,
        saes_per_trial=saes_per_trial,
    )
    return data, parse_experiment(data)


def configs_of(settings: Settings) -> list[dict[str, Any]]:
    return [
        _common.trial_config(hookpoint, architecture, settings.expansion_factor)
        for architecture in settings.architectures
        for hookpoint in settings.hookpoints
    ]


# -- (a) one shared sweep ----------------------------------------------------------------------


def run_shared(data: dict[str, Any], exp: ExperimentConfig) -> dict[str, Any]:
    """Start a local Ray instance, run the sweep, stop Ray; return the sweep's numbers.

    ``wall_s`` adds Ray's start and stop to the sweep's time, as a ``saesweep run`` pays them.
    Memory and CPU are sampled while the sweep runs.
    """
    import ray

    started = time.perf_counter()
    raycluster.connect(num_cpus=_common.ray_cpus_for(data), object_store_memory=1024**3, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    try:
        result = _common.run_shared_sweep(exp)
    finally:
        stopping = time.perf_counter()
        ray.shutdown()
        ray_stop_s = time.perf_counter() - stopping
    result["ray_start_s"] = ray_start_s
    result["ray_stop_s"] = ray_stop_s
    result["wall_s"] = ray_start_s + result["wall_s"] + ray_stop_s
    return result


# -- (b) one config at a time, in process -----------------------------------------------------


def run_one_at_a_time(settings: Settings, exp: ExperimentConfig) -> dict[str, Any]:
    """Train each config in this process, each with its own forward passes, and return the totals."""
    torch.set_num_threads(settings.threads)
    with _common.ResourceMonitor() as monitor:
        started = time.perf_counter()
        bridge, tokenizer = load_model(exp.model.name, dtype=exp.model.dtype)
        info = model_info(exp.model.name)
        load_s = time.perf_counter() - started
        counter = _common.ForwardCounter()
        runs = []
        streams: dict[str, _common.TokenBatchCache] = {}
        for config in configs_of(settings):
            hookpoint = config["hookpoint"]
            if hookpoint not in streams:
                server_config = _server_config(exp, [hookpoint], "train")
                streams[hookpoint] = _common.TokenBatchCache(
                    open_token_stream(server_config, tokenizer, info.token_policy()),
                )
            runs.append(train_in_process(exp, config, bridge, streams[hookpoint], info, counter))
    total = monitor.summary()
    return {
        "model_load_s": load_s,
        "lm_forward_tokens": counter.tokens,
        "tokens_trained": sum(run["tokens_trained"] for run in runs),
        # Configs run one after another, so their steady times add up.
        "steady_s": sum(run["tokens_trained"] / run["steady_tokens_per_s"] for run in runs),
        "configs": runs,
        **total,
    }


def train_in_process(
    exp: ExperimentConfig,
    config: dict[str, Any],
    bridge,
    token_batches: _common.TokenBatchCache,
    info,
    counter: _common.ForwardCounter,
) -> dict[str, Any]:
    """Train one SAE on activations computed for it alone; return its time and rates.

    As the server does, the normalization scale is estimated on the first batches of the
    token stream, and training reads the stream from its start, reusing those batches.
    """
    hookpoint = config["hookpoint"]
    started = time.perf_counter()
    d_in = info.hook_d_in(hookpoint)
    forward_before = counter.tokens
    chunks = _common.served_chunks(bridge, token_batches, hookpoint, counter)
    estimate_chunks: list[torch.Tensor] = []
    norm_scale = _common.estimate_norm_scale(
        _common.recorded(chunks, estimate_chunks), d_in, exp.servers.normalization_tokens
    )
    sae = SAE.from_config(trial_sae_config(exp, config, d_in=d_in, prepend_bos=info.prepend_bos))
    sae.activation_norm_scale = norm_scale
    clock = _common.ReportClock()
    trainer = SAETrainer(sae, trainer_config(exp), report_fn=clock)
    trainer.fit(
        _common.shuffled_batches(
            itertools.chain(estimate_chunks, chunks),
            exp.training.batch_size_tokens,
            exp.servers.shuffle_buffer_tokens,
            exp.training.seed,
        )
    )
    return {
        "hookpoint": hookpoint,
        "architecture": config["architecture"],
        "wall_s": time.perf_counter() - started,
        "lm_forward_tokens": counter.tokens - forward_before,
        "tokens_trained": trainer.tokens_trained,
        "steady_tokens_per_s": clock.steady_tokens_per_s(),
    }


# -- (c) SAELens, one config at a time ---------------------------------------------------------


def hooked_transformer(context_size: int):
    """Build a TransformerLens HookedTransformer holding the embedded SmolLM2-135M weights, offline.

    ``HookedTransformer.from_pretrained`` accepts only names from TransformerLens's list of
    official models, so the config is converted from the local model folder and the Llama
    weights are converted with TransformerLens's own converter. ``n_ctx`` is the benchmark's
    context size, because TransformerLens slices its causal mask and rotary tables from
    ``n_ctx``-sized buffers on every forward pass. With the model's 8192 a pass ran 1.8 to 4
    times slower (TransformerLens 3.9, 2 CPU cores).
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as loading
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from saesweep.activations import embedded

    path = embedded.prepare_embedded_model()
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg_dict = loading.convert_hf_model_config(str(path))
    cfg = HookedTransformerConfig(**{**cfg_dict, "n_ctx": context_size, "device": "cpu", "dtype": torch.float32})
    model = HookedTransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        convert_llama_weights(hf_model, cfg),
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    model.eval()
    return model, tokenizer


def count_forward_tokens(model, counter: _common.ForwardCounter) -> None:
    """Wrap ``model.run_with_cache``, which SAELens's activation store calls, to count tokens run forward."""
    run_with_cache = model.run_with_cache

    def counted(tokens, *args, **kwargs):
        counter.tokens += tokens.numel()
        return run_with_cache(tokens, *args, **kwargs)

    model.run_with_cache = counted


def saelens_sae_config(architecture: str, d_in: int, d_sae: int):
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAEConfig
    from sae_lens.saes.standard_sae import StandardTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAEConfig

    common = {"d_in": d_in, "d_sae": d_sae, "normalize_activations": "expected_average_only_in"}
    if architecture == "topk":
        return TopKTrainingSAEConfig(k=_common.ARCHITECTURE_COEFFICIENTS["topk"][1], **common)
    if architecture == "standard":
        return StandardTrainingSAEConfig(l1_coefficient=_common.ARCHITECTURE_COEFFICIENTS["standard"][1], **common)
    if architecture == "jumprelu":
        return JumpReLUTrainingSAEConfig(
            l0_coefficient=_common.ARCHITECTURE_COEFFICIENTS["jumprelu"][1], jumprelu_init_threshold=1.0, **common
        )
    raise ValueError(f"architecture {architecture!r} has no SAELens config here: use topk, standard or jumprelu")


def run_saelens(settings: Settings, exp: ExperimentConfig) -> dict[str, Any]:
    """Train each config with SAELens's runner in this process and return the totals."""
    import datasets
    from sae_lens import LanguageModelSAERunnerConfig, LanguageModelSAETrainingRunner, LoggingConfig

    torch.set_num_threads(settings.threads)
    with _common.ResourceMonitor() as monitor:
        started = time.perf_counter()
        model, tokenizer = hooked_transformer(settings.context_size)
        info = model_info(exp.model.name)
        load_s = time.perf_counter() - started
        counter = _common.ForwardCounter()
        count_forward_tokens(model, counter)

        # The same packed windows the server reads, with enough for the normalization
        # estimate, the mixing buffer and training.
        served_per_window = settings.context_size - 1
        needed_tokens = settings.tokens_per_sae + settings.normalization_tokens + 2 * settings.shuffle_buffer_tokens
        n_windows = math.ceil(needed_tokens / served_per_window) + settings.sequences_per_batch
        stream = iter(
            open_token_stream(_server_config(exp, settings.hookpoints, "train"), tokenizer, info.token_policy()),
        )
        windows: list[list[int]] = []
        while len(windows) < n_windows:
            windows.extend(next(stream).tokens.tolist())
        dataset = datasets.Dataset.from_dict({"input_ids": windows})

        runs = []
        for config in configs_of(settings):
            run_started = time.perf_counter()
            forward_before = counter.tokens
            runner_config = LanguageModelSAERunnerConfig(
                sae=saelens_sae_config(config["architecture"], info.d_model, info.d_model * settings.expansion_factor),
                model_name=exp.model.name,
                hook_name=config["hookpoint"],
                dataset_path="",
                is_dataset_tokenized=True,
                streaming=False,
                context_size=settings.context_size,
                prepend_bos=info.prepend_bos,
                # Serve what saesweep serves: no position 0 and no special tokens.
                seqpos_slice=(1, None),
                exclude_special_tokens=list(info.special_token_ids),
                training_tokens=settings.tokens_per_sae,
                train_batch_size_tokens=settings.batch_size,
                store_batch_size_prompts=settings.sequences_per_batch,
                # SAELens's buffer has room for n_batches_in_buffer windows: as many tokens as
                # the trial's shuffle buffer.
                n_batches_in_buffer=math.ceil(settings.shuffle_buffer_tokens / served_per_window),
                n_batches_for_norm_estimate=math.ceil(settings.normalization_tokens / settings.batch_size),
                lr=exp.training.lr,
                device="cpu",
                dtype="float32",
                seed=exp.training.seed,
                logger=LoggingConfig(log_to_wandb=False),
                checkpoint_path=None,
                output_path=None,
                n_checkpoints=0,
                verbose=False,
            )
            LanguageModelSAETrainingRunner(runner_config, override_dataset=dataset, override_model=model).run()
            runs.append(
                {
                    "hookpoint": config["hookpoint"],
                    "architecture": config["architecture"],
                    "wall_s": time.perf_counter() - run_started,
                    "lm_forward_tokens": counter.tokens - forward_before,
                }
            )
    return {
        "model_load_s": load_s,
        "lm_forward_tokens": counter.tokens,
        "tokens_trained": settings.tokens_per_sae * len(runs),
        "configs": runs,
        **monitor.summary(),
    }


# -- FLOPs, ratios and the report --------------------------------------------------------------


def flop_accounting(settings: Settings, results: dict[str, Any]) -> dict[str, Any]:
    """Return each way's useful FLOPs, the ideal ratio of (b) to (a), and the utilizations."""
    flops = _common.model_flops("smollm2-135m")
    d_in = model_info("smollm2-135m").d_model
    sae_per_token = _common.mean_sae_training_flops_per_token(
        d_in, d_in * settings.expansion_factor, settings.architectures
    )
    configs = configs_of(settings)
    deepest = max(settings.hookpoints, key=_common.blocks_run)
    shared = _common.shared_sweep_useful_flops(
        tokens_per_trial=settings.tokens_per_sae,
        n_trials=len(configs),
        forward_flops_per_token=flops.to_hookpoint(deepest, settings.context_size),
        sae_flops_per_token=sae_per_token,
        context_size=settings.context_size,
    )
    # One at a time, every config runs its own forward passes to its own hookpoint.
    one_at_a_time = sum(
        _common.shared_sweep_useful_flops(
            tokens_per_trial=settings.tokens_per_sae,
            n_trials=1,
            forward_flops_per_token=flops.to_hookpoint(config["hookpoint"], settings.context_size),
            sae_flops_per_token=sae_per_token,
            context_size=settings.context_size,
        )["total"]
        for config in configs
    )

    useful = {
        "shared": shared["total"],
        "shared_packed": shared["total"],
        "one_at_a_time": one_at_a_time,
        "saelens": one_at_a_time,
    }
    useful = {way: value for way, value in useful.items() if way in results}
    peaks = results["matmul_peak_flops"]
    peak = max(peaks["before"]["float32"], peaks["after"]["float32"])
    steady = {
        way: results[way]["steady_tokens_per_s"] * shared["per_trained_token"] / peak
        for way in ("shared", "shared_packed")
        if way in results
    }
    return {
        "model_forward_flops_per_token": {
            hookpoint: flops.to_hookpoint(hookpoint, settings.context_size) for hookpoint in settings.hookpoints
        },
        "sae_training_flops_per_token": sae_per_token,
        "useful_flops": useful,
        "ideal_ratio": one_at_a_time / shared["total"],
        "float32_peak_flops_per_s": peak,
        "utilization": {way: useful[way] / results[way]["wall_s"] / peak for way in useful},
        "steady_utilization": steady,
    }


def summarize(settings: Settings, results: dict[str, Any]) -> str:
    accounting = results["flops"]
    ideal = accounting["ideal_ratio"]
    shared = results["shared"]
    lines = [
        f"{len(configs_of(settings))} SAEs (x{settings.expansion_factor}) on {', '.join(settings.hookpoints)}; "
        f"{settings.tokens_per_sae} tokens each, batches of {settings.batch_size}",
        f"ideal ratio (one at a time / shared FLOPs): {ideal:.2f}",
        "",
        "| way | wall s | ratio to shared | fraction of ideal ratio | "
        "model forward tokens, normalization estimate included | useful GFLOP/s | utilization | peak memory GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ways = (
        ("shared", "a. shared sweep"),
        ("shared_packed", f"a2. shared sweep, {settings.saes_per_trial} SAEs per trial"),
        ("one_at_a_time", "b. one at a time"),
        ("saelens", "c. SAELens"),
    )
    for way, label in ways:
        if way not in results:
            continue
        run = results[way]
        ratio = run["wall_s"] / shared["wall_s"]
        fraction = "" if way.startswith("shared") else f"{ratio / ideal:.2f}"
        gflops = accounting["useful_flops"][way] / run["wall_s"] / 1e9
        lines.append(
            f"| {label} | {run['wall_s']:.0f} | {ratio:.2f} | {fraction} | "
            f"{run['lm_forward_tokens'] + run.get('norm_estimate_forward_tokens', 0)} | "
            f"{gflops:.1f} | {accounting['utilization'][way]:.1%} | {run['peak_memory_gib']:.2f} |"
        )
    one_at_a_time = results["one_at_a_time"]
    lines.append("")
    for way, label in ways[:2]:
        if way not in results:
            continue
        run = results[way]
        ratio = one_at_a_time["wall_s"] / run["wall_s"]
        steady_s = run["tokens_trained"] / run["steady_tokens_per_s"]
        steady_ratio = one_at_a_time["steady_s"] / steady_s
        lines += [
            f"{label}: one at a time took {ratio:.2f} times as long, {ratio / ideal:.2f} of the ideal ratio",
            f"  steady state (start-up left out): {steady_s:.0f} s against {one_at_a_time['steady_s']:.0f} s, "
            f"ratio {steady_ratio:.2f} = {steady_ratio / ideal:.2f} of ideal; "
            f"{accounting['steady_utilization'][way]:.1%} of the float32 peak",
            "  " + timeline(run),
            f"  object store peak (pages allocated in its /dev/shm file): {run['peak_object_store_gib']:.3f} GiB",
        ]
    return "\n".join(lines)


def timeline(shared: dict[str, Any]) -> str:
    """Describe when the shared sweep's trials started, first reported and last reported."""
    trials = shared["trials"]
    started = sorted(trial["started_s"] for trial in trials)
    first = sorted(trial["first_report_s"] for trial in trials)
    last = max(trial["last_report_s"] for trial in trials)
    return (
        f"timeline (s after run_sweep began, Ray start {shared['ray_start_s']:.0f} s before): "
        f"trials started {started[0]:.0f} to {started[-1]:.0f}, first reports {first[0]:.0f} to {first[-1]:.0f}, "
        f"last report {last:.0f}, sweep done {shared['sweep_wall_s']:.0f}"
    )


def plot(settings: Settings, results: dict[str, Any], path: str) -> None:
    """Draw each way's wall time, split into start-up and steady training where it is known."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = results["shared"]
    bars = []
    for way, label in (("shared", "a. shared sweep"), ("shared_packed", f"a2. {settings.saes_per_trial} SAEs per trial")):
        if way in results:
            run = results[way]
            bars.append((label, run["wall_s"], run["tokens_trained"] / run["steady_tokens_per_s"]))
    bars.append(("b. one at a time", results["one_at_a_time"]["wall_s"], results["one_at_a_time"]["steady_s"]))
    if "saelens" in results:
        bars.append(("c. SAELens", results["saelens"]["wall_s"], None))
    figure, axis = plt.subplots(figsize=(7, 3.2))
    for row, (label, wall, steady) in enumerate(bars):
        if steady is None:
            axis.barh(row, wall, color="tab:gray", label="whole run, not split")
            continue
        axis.barh(row, steady, color="tab:blue", label="steady training" if row == 0 else None)
        axis.barh(
            row,
            wall - steady,
            left=steady,
            color="tab:orange",
            label="start-up and the rest" if row == 0 else None,
        )
    ideal = shared["wall_s"] * results["flops"]["ideal_ratio"]
    axis.axvline(ideal, color="black", linestyle="--", label="shared wall x ideal FLOP ratio")
    axis.set_yticks(range(len(bars)), [label for label, *_ in bars])
    axis.invert_yaxis()
    axis.set_xlabel("wall time, s")
    axis.set_title(
        f"{len(configs_of(settings))} SAEs, {settings.tokens_per_sae} tokens each, {os.cpu_count()} CPU cores",
        fontsize=10,
    )
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args()
    results: dict[str, Any] = {"settings": asdict(settings), "machine": _common.machine_info()}
    results["matmul_peak_flops"] = {"before": _common.matmul_peaks(settings.threads)}
    with tempfile.TemporaryDirectory(prefix="saesweep-bench-") as output_dir:
        data, exp = build_experiment(settings, output_dir)
        results["shared"] = run_shared(data, exp)
        if settings.saes_per_trial > 1:
            packed_data, packed_exp = build_experiment(settings, output_dir, settings.saes_per_trial)
            results["shared_packed"] = run_shared(packed_data, packed_exp)
    results["one_at_a_time"] = run_one_at_a_time(settings, exp)
    if settings.saelens:
        results["saelens"] = run_saelens(settings, exp)
    results["matmul_peak_flops"]["after"] = _common.matmul_peaks(settings.threads)
    results["flops"] = flop_accounting(settings, results)
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(summarize(settings, results))
    print()
    _common.write_json(settings.output, results)
    if settings.plot:
        plot(settings, results, settings.plot)


if __name__ == "__main__":
    main()
