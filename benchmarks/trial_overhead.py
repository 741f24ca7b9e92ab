"""Benchmark SAE training inside a Ray Tune trial fed by the server, against a bare in-process loop.

One run measures, with the same SAE config, batch size and torch thread count (1 by default):

1. in trial: a one-trial saesweep sweep. Its training rate is taken from the trial's own
   reports (``tokens_per_second`` windows after the first), so start-up is left out.
2. bare, alone: ``SAETrainer.fit`` in this process over a list of activation batches that
   were computed beforehand from the same token stream and read through the same shuffle
   buffer, so no forward pass, Ray or Tune runs while it trains.
3. bare, server alongside: the same bare loop while an activation server streams the
   same hookpoint to a reader that consumes it at the in-trial rate. The server's forward
   passes then take the same share of the machine as during the trial.
4. levers on the bare loop, each against the bare loop alone: 2 torch threads, bfloat16
   autocast around training (float32 weights), ``torch.compile`` of ``training_loss``, and
   the dense decoder (``sparse_decoder=False``), which shows what the sparse decoder of
   topk and batchtopk SAEs gains over it.
5. the copy path: the time per training batch of what the activation client does between
   the object store and the trainer (``ray.get``, the copy out of shared memory, the
   shuffle buffer), against the time of one bare training step.

Usage:

    python benchmarks/trial_overhead.py            # the numbers in BENCHMARKS.md
    python benchmarks/trial_overhead.py --quick    # a smoke run of a few steps

Ray runs locally on 127.0.0.1. No network is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from saesweep import raycluster  # noqa: E402
from saesweep.activations.client import ActivationClient  # noqa: E402
from saesweep.activations.models import load_model, model_info  # noqa: E402
from saesweep.activations.server import open_token_stream, start_server  # noqa: E402
from saesweep.activations.shuffle import ShuffleBuffer  # noqa: E402
from saesweep.experiment import ExperimentConfig, parse_experiment  # noqa: E402
from saesweep.saes import SAE  # noqa: E402
from saesweep.sweep.runner import _server_config  # noqa: E402
from saesweep.sweep.space import trial_sae_config  # noqa: E402
from saesweep.sweep.trial import trainer_config  # noqa: E402
from saesweep.training.trainer import SAETrainer  # noqa: E402

LEVERS = ("threads-2", "autocast-bf16", "compile", "dense-decoder")
"""Levers measured on the bare loop."""


@dataclass
class Settings:
    layer: int
    architecture: str
    expansion_factor: int
    tokens: int
    batch_size: int
    context_size: int
    sequences_per_batch: int
    threads: int
    levers: list[str]
    output: str | None

    @property
    def hookpoint(self) -> str:
        return f"blocks.{self.layer}.hook_resid_pre"


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 8 steps of 256 tokens, the autocast lever only",
    )
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="layer of blocks.L.hook_resid_pre (default 2; --quick: 1)",
    )
    parser.add_argument("--architecture", default="topk", help="SAE architecture (default topk)")
    parser.add_argument("--expansion-factor", type=int, default=None, help="d_sae / d_model (default 8; --quick: 2)")
    parser.add_argument(
        "--tokens",
        type=int,
        default=None,
        help="training tokens of each run (default 65536; --quick: 2048)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tokens per optimizer step (default 1024; --quick: 256)",
    )
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--sequences", type=int, default=8, help="windows per forward batch (default 8)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the trial and of the bare loop (default 1)",
    )
    parser.add_argument(
        "--levers",
        default=None,
        help=f"comma-separated levers to measure on the bare loop, from {', '.join(LEVERS)} "
        "(default all; --quick: autocast-bf16; 'none' for none)",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON to this file")
    args = parser.parse_args()

    levers = args.levers or ("autocast-bf16" if args.quick else ",".join(LEVERS))
    levers = [] if levers == "none" else levers.split(",")
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        parser.error(f"unknown levers {unknown}: choose from {', '.join(LEVERS)}")
    layer = args.layer
    if layer is None:
        layer = 1 if args.quick else 2
    return Settings(
        layer=layer,
        architecture=args.architecture,
        expansion_factor=args.expansion_factor or (2 if args.quick else 8),
        tokens=args.tokens or (2048 if args.quick else 65536),
        batch_size=args.batch_size or (256 if args.quick else 1024),
        context_size=args.context_size,
        sequences_per_batch=args.sequences,
        threads=args.threads,
        levers=levers,
        output=args.output,
    )


def build_experiment(settings: Settings, output_dir: str) -> tuple[dict[str, Any], ExperimentConfig]:
    steps = settings.tokens // settings.batch_size
    data = _common.sweep_experiment(
        name="trial-overhead",
        output_dir=output_dir,
        hookpoints=[settings.hookpoint],
        architectures=[settings.architecture],
        expansion_factors=[settings.expansion_factor],
        tokens_per_trial=settings.tokens,
        batch_size_tokens=settings.batch_size,
        context_size=settings.context_size,
        sequences_per_batch=settings.sequences_per_batch,
        shuffle_buffer_tokens=4 * settings.batch_size,
        normalization_tokens=4 * settings.batch_size,
        log_every_steps=max(1, steps // 16),
        # torch threads of a trial: one per whole CPU that Ray assigns it.
        trial_cpus=float(settings.threads),
    )
    return data, parse_experiment(data)


# -- the trial ---------------------------------------------------------------------------------


def run_in_trial(exp: ExperimentConfig) -> dict[str, Any]:
    run = _common.run_shared_sweep(exp)
    return {
        "steady_tokens_per_s": run["steady_tokens_per_s"],
        "sweep_wall_s": run["sweep_wall_s"],
        "other_jobs_cpu_cores": run["other_jobs_cpu_cores"],
    }


# -- the bare loop -----------------------------------------------------------------------------


def materialize_batches(settings: Settings, exp: ExperimentConfig) -> tuple[list[torch.Tensor], float]:
    """Return the training batches a trial would read, computed in process, and the normalization scale."""
    torch.set_num_threads(os.cpu_count() or 1)
    bridge, tokenizer = load_model(exp.model.name, dtype=exp.model.dtype)
    info = model_info(exp.model.name)
    stream = _common.TokenBatchCache(
        open_token_stream(_server_config(exp, [settings.hookpoint], "train"), tokenizer, info.token_policy())
    )
    counter = _common.ForwardCounter()
    scale = _common.estimate_norm_scale(
        _common.served_chunks(bridge, stream, settings.hookpoint, counter),
        info.d_model,
        exp.servers.normalization_tokens,
    )
    batches = []
    chunks = _common.served_chunks(bridge, stream, settings.hookpoint, counter)
    for batch in _common.shuffled_batches(
        chunks,
        settings.batch_size,
        exp.servers.shuffle_buffer_tokens,
        exp.training.seed,
    ):
        batches.append(batch.clone())
        if len(batches) * settings.batch_size >= settings.tokens:
            break
    return batches, scale


def bare_loop(
    settings: Settings,
    exp: ExperimentConfig,
    batches: list[torch.Tensor],
    scale: float,
    lever: str | None = None,
) -> dict[str, Any]:
    """Train the trial's SAE config on ``batches`` in this process and return its steady rate."""
    info = model_info(exp.model.name)
    config = _common.trial_config(settings.hookpoint, settings.architecture, settings.expansion_factor)
    sae = SAE.from_config(trial_sae_config(exp, config, d_in=info.d_model, prepend_bos=info.prepend_bos))
    sae.activation_norm_scale = scale
    torch.set_num_threads(2 if lever == "threads-2" else settings.threads)
    context: contextlib.AbstractContextManager = contextlib.nullcontext()
    if lever == "autocast-bf16":
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    if lever == "compile":
        sae.training_loss = torch.compile(sae.training_loss)
    cfg = trainer_config(exp)
    if lever == "dense-decoder":
        cfg = replace(cfg, sparse_decoder=False)
    clock = _common.ReportClock()
    trainer = SAETrainer(sae, cfg, report_fn=clock)
    with _common.ResourceMonitor() as monitor, context:
        trainer.fit(batches)
    usage = monitor.summary()
    return {
        "lever": lever,
        "threads": torch.get_num_threads(),
        "wall_s": usage["wall_s"],
        "steady_tokens_per_s": clock.steady_tokens_per_s(),
        "other_jobs_cpu_cores": usage["other_jobs_cpu_cores"],
    }


@ray.remote(num_cpus=0)
class PacedReader:
    """Reads a hookpoint from a server at a fixed rate and discards it, to keep the server busy."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self._stop = False

    def read(self, server, hookpoint: str, batch_size: int, shuffle_buffer_tokens: int, tokens_per_s: float) -> dict:
        """Read until ``stop``; return the tokens read and the seconds spent reading."""
        client = ActivationClient(server, hookpoint, batch_size=batch_size, shuffle_buffer_tokens=shuffle_buffer_tokens)
        started = time.perf_counter()
        while not self._stop:
            next(client)
            # Sleep until the delivered tokens match the target rate.
            ahead = client.tokens_delivered / tokens_per_s - (time.perf_counter() - started)
            if ahead > 0:
                time.sleep(ahead)
        seconds = time.perf_counter() - started
        client.close()
        return {"tokens": client.tokens_delivered, "seconds": seconds}

    def stop(self) -> None:
        self._stop = True


def bare_loop_with_server(
    settings: Settings, exp: ExperimentConfig, batches: list[torch.Tensor], scale: float, tokens_per_s: float
) -> dict[str, Any]:
    """Run the bare loop while a server streams the hookpoint to a reader paced at ``tokens_per_s``."""
    server = start_server(_server_config(exp, [settings.hookpoint], "train"), num_cpus=1, max_restarts=0)
    reader = PacedReader.options(max_concurrency=2).remote()
    pending = reader.read.remote(
        server,
        settings.hookpoint,
        settings.batch_size,
        exp.servers.shuffle_buffer_tokens,
        tokens_per_s,
    )
    try:
        # Let the reader fill its shuffle buffer before the clock starts.
        time.sleep(2.0)
        result = bare_loop(settings, exp, batches, scale)
    finally:
        reader.stop.remote()
        read = ray.get(pending)
        ray.kill(server)
    # A reader below the target rate means the server could not keep up, so it took less
    # of the machine than during the trial.
    return {**result, "reader_tokens": read["tokens"], "reader_tokens_per_s": read["tokens"] / read["seconds"]}


# -- the copy path -----------------------------------------------------------------------------


def copy_path(settings: Settings, batches: list[torch.Tensor], repeats: int = 20) -> dict[str, float]:
    """Time, per training batch, the client's work between the object store and the trainer.

    One served forward batch is put in the object store. Each repeat gets it (a zero-copy
    view), copies it out as the client does, and passes it through a shuffle buffer of the
    trial's size, taking the training batches it releases.
    """
    torch.set_num_threads(settings.threads)
    served = np.concatenate(
        [batch.numpy() for batch in batches],
    )[: settings.sequences_per_batch * (settings.context_size - 1)]
    reference = ray.put(served)
    buffer = ShuffleBuffer(4 * settings.batch_size, seed=0)
    get_s = copy_s = shuffle_s = 0.0
    batches_taken = 0
    for _ in range(repeats):
        started = time.perf_counter()
        view = ray.get(reference)
        got = time.perf_counter()
        chunk = torch.from_numpy(np.array(view))
        copied = time.perf_counter()
        buffer.add(chunk)
        while buffer.ready_tokens >= settings.batch_size:
            buffer.take(settings.batch_size)
            batches_taken += 1
        ended = time.perf_counter()
        get_s += got - started
        copy_s += copied - got
        shuffle_s += ended - copied
        del view
    per_batch = max(batches_taken, 1)
    return {
        "training_batches": batches_taken,
        "ray_get_s_per_batch": get_s / per_batch,
        "copy_s_per_batch": copy_s / per_batch,
        "shuffle_s_per_batch": shuffle_s / per_batch,
    }


# -- the report --------------------------------------------------------------------------------


def summarize(settings: Settings, results: dict[str, Any]) -> str:
    trial = results["in_trial"]["steady_tokens_per_s"]
    alone = results["bare_alone"]["steady_tokens_per_s"]
    alongside = results["bare_with_server"]["steady_tokens_per_s"]
    other = {name: results[name]["other_jobs_cpu_cores"] for name in ("in_trial", "bare_alone", "bare_with_server")}
    lines = [
        f"{settings.architecture} SAE x{settings.expansion_factor} on {settings.hookpoint}, batches of "
        f"{settings.batch_size}, {settings.threads} torch thread(s), {settings.tokens} tokens per run",
        "",
        "| run | tokens/s | in trial / this | other jobs, cores |",
        "|---|---:|---:|---:|",
        f"| in trial (Ray Tune, fed by the server) | {trial:.0f} | 1.00 | {other['in_trial']:.2f} |",
        f"| bare loop, alone | {alone:.0f} | {trial / alone:.2f} | {other['bare_alone']:.2f} |",
        f"| bare loop, server streaming alongside | {alongside:.0f} | {trial / alongside:.2f} | "
        f"{other['bare_with_server']:.2f} |",
        "",
        f"the paced reader read {results['bare_with_server']['reader_tokens_per_s']:.0f} tokens/s "
        "(target: the in-trial rate)",
    ]
    if results["levers"]:
        lines += [
            "",
            "| lever on the bare loop | tokens/s | gain over bare loop alone | other jobs, cores |",
            "|---|---:|---:|---:|",
        ]
        for run in results["levers"]:
            lines.append(
                f"| {run['lever']} | {run['steady_tokens_per_s']:.0f} | {run['steady_tokens_per_s'] / alone:.2f} | "
                f"{run['other_jobs_cpu_cores']:.2f} |"
            )
    copy = results["copy_path"]
    step_s = settings.batch_size / alone
    client_s = copy["ray_get_s_per_batch"] + copy["copy_s_per_batch"] + copy["shuffle_s_per_batch"]
    lines += [
        "",
        f"client work per training batch: ray.get {copy['ray_get_s_per_batch'] * 1e3:.2f} ms, copy "
        f"{copy['copy_s_per_batch'] * 1e3:.2f} ms, shuffle buffer {copy['shuffle_s_per_batch'] * 1e3:.2f} ms; "
        f"{client_s / step_s:.1%} of a bare training step ({step_s * 1e3:.0f} ms)",
    ]
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args()
    results: dict[str, Any] = {"settings": asdict(settings), "machine": _common.machine_info()}
    with tempfile.TemporaryDirectory(prefix="saesweep-bench-") as output_dir:
        data, exp = build_experiment(settings, output_dir)
        raycluster.connect(
            num_cpus=_common.ray_cpus_for(data) + 1,
            object_store_memory=512 * 1024**2,
            log_to_driver=False,
        )
        try:
            results["in_trial"] = run_in_trial(exp)
            batches, scale = materialize_batches(settings, exp)
            results["bare_alone"] = bare_loop(settings, exp, batches, scale)
            results["bare_with_server"] = bare_loop_with_server(
                settings, exp, batches, scale, results["in_trial"]["steady_tokens_per_s"]
            )
            results["levers"] = [bare_loop(settings, exp, batches, scale, lever) for lever in settings.levers]
            results["copy_path"] = copy_path(settings, batches)
        finally:
            ray.shutdown()
    in_trial = results["in_trial"]["steady_tokens_per_s"]
    results["in_trial_over_bare_alone"] = in_trial / results["bare_alone"]["steady_tokens_per_s"]
    results["in_trial_over_bare_with_server"] = in_trial / results["bare_with_server"]["steady_tokens_per_s"]
    results["machine"]["load_average_1min_end"] = os.getloadavg()[0]
    print(summarize(settings, results))
    print()
    _common.write_json(settings.output, results)


if __name__ == "__main__":
    main()
