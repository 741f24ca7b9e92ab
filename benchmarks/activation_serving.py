"""Benchmark activation serving against a bare forward pass, and its fan-out to 1 to 8 subscribers.

One run measures, on the same token batches:

1. bare: an in-process TransformerLens bridge forward to the hookpoint (``run_hookpoints``),
   tokens per second over every position;
2. served: an activation server actor feeding N subscribers (N = 1, 2, 4, 8), each a Ray
   actor that iterates an ``ActivationClient`` as a trainer would, but does no training.
   For each N it reports the server's forward tokens per second, its ratio to the bare
   forward, and the tokens per second delivered to all subscribers together.

Usage:

    python benchmarks/activation_serving.py            # the numbers in BENCHMARKS.md
    python benchmarks/activation_serving.py --quick    # a smoke run of a few batches

Ray runs locally on 127.0.0.1. Everything shares this machine's cores, so the subscribers'
copying competes with the forward pass, as trainers on one node would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from dataclasses import dataclass

import ray
import torch

from saesweep import raycluster
from saesweep.activations.client import ActivationClient
from saesweep.activations.models import load_model, model_info, run_hookpoints
from saesweep.activations.server import ServerConfig, open_token_stream, start_server

logger = logging.getLogger("benchmarks.activation_serving")


@dataclass
class Settings:
    model: str
    hookpoint: str
    dtype: str
    context_size: int
    sequences_per_batch: int
    forward_batches: int
    subscriber_counts: list[int]
    threads: int
    client_batch_size: int
    shuffle_buffer_tokens: int


def parse_args() -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 4 batches of 4 windows of 64 tokens, hookpoint in block 1",
    )
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="model name (default: the embedded SmolLM2-135M)",
    )
    parser.add_argument(
        "--hookpoint",
        default=None,
        help="hookpoint to serve (default: blocks.6.hook_resid_post; --quick: blocks.1.hook_resid_post)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="model dtype",
    )
    parser.add_argument(
        "--context-size",
        type=int,
        default=None,
        help="tokens per window (default 128; --quick: 64)",
    )
    parser.add_argument(
        "--sequences",
        type=int,
        default=None,
        help="windows per forward batch (default 8; --quick: 4)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=None,
        help="forward batches per measurement (default 12; --quick: 4)",
    )
    parser.add_argument(
        "--subscribers",
        default="1,2,4,8",
        help="comma-separated subscriber counts",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads of both the bare and the served forward pass",
    )
    parser.add_argument(
        "--client-batch-size",
        type=int,
        default=None,
        help="tokens per batch a subscriber reads (default 512; --quick: 128)",
    )
    parser.add_argument(
        "--shuffle-buffer-tokens",
        type=int,
        default=None,
        help="subscriber shuffle buffer, in tokens (default 4096; --quick: 512)",
    )
    args = parser.parse_args()
    return Settings(
        model=args.model,
        hookpoint=args.hookpoint or ("blocks.1.hook_resid_post" if args.quick else "blocks.6.hook_resid_post"),
        dtype=args.dtype,
        context_size=args.context_size or (64 if args.quick else 128),
        sequences_per_batch=args.sequences or (4 if args.quick else 8),
        forward_batches=args.batches or (4 if args.quick else 12),
        subscriber_counts=[int(n) for n in args.subscribers.split(",")],
        threads=args.threads,
        client_batch_size=args.client_batch_size or (128 if args.quick else 512),
        shuffle_buffer_tokens=args.shuffle_buffer_tokens or (512 if args.quick else 4096),
    )


def server_config(settings: Settings) -> ServerConfig:
    return ServerConfig(
        hookpoints=(settings.hookpoint,),
        model=settings.model,
        dtype=settings.dtype,
        context_size=settings.context_size,
        sequences_per_batch=settings.sequences_per_batch,
        norm_estimate_tokens=settings.context_size,
        torch_threads=settings.threads,
    )


class BareForward:
    """The in-process forward pass on the first batches of the served token stream."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.bridge, tokenizer = load_model(settings.model, dtype=settings.dtype)
        policy = model_info(settings.model).token_policy()
        stream = iter(open_token_stream(server_config(settings), tokenizer, policy))
        self.batches = [next(stream).tokens for _ in range(settings.forward_batches + 1)]

    def measure(self) -> dict[str, float]:
        torch.set_num_threads(self.settings.threads)
        hookpoints = [self.settings.hookpoint]
        run_hookpoints(self.bridge, self.batches[0], hookpoints)  # warm-up
        started = time.perf_counter()
        for tokens in self.batches[1:]:
            run_hookpoints(self.bridge, tokens, hookpoints)
        seconds = time.perf_counter() - started
        n_tokens = sum(tokens.numel() for tokens in self.batches[1:])
        return {"tokens": n_tokens, "seconds": seconds, "tokens_per_s": n_tokens / seconds}


@ray.remote(num_cpus=0)
class Subscriber:
    """A trainer stand-in: reads activations from an ``ActivationClient`` and discards them."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def ready(self) -> bool:
        return True

    def read(self, server, settings: Settings, n_tokens: int, seed: int) -> dict:
        """Fill the shuffle buffer, then time the reading of ``n_tokens`` tokens."""
        client = ActivationClient(
            server,
            settings.hookpoint,
            batch_size=settings.client_batch_size,
            shuffle_buffer_tokens=settings.shuffle_buffer_tokens,
            seed=seed,
        )
        while client.tokens_received < settings.shuffle_buffer_tokens:
            next(client)
        warm_tokens = client.tokens_delivered
        started = time.time()
        while client.tokens_delivered - warm_tokens < n_tokens:
            next(client)
        ended = time.time()
        client.close()
        tokens = client.tokens_delivered - warm_tokens
        return {"tokens": tokens, "started": started, "ended": ended, "tokens_per_s": tokens / (ended - started)}


def forward_rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Forward tokens per second between ``start`` and ``end``, from (time, lm_forward_tokens) samples."""
    inside = [sample for sample in samples if start <= sample[0] <= end]
    if len(inside) < 2:
        inside = [samples[0], samples[-1]]
    (t0, tokens0), (t1, tokens1) = inside[0], inside[-1]
    return (tokens1 - tokens0) / (t1 - t0)


def measure_served(
    settings: Settings, server, subscribers: list, n_subscribers: int, n_batches: int
) -> dict[str, float]:
    """Stream to ``n_subscribers`` at once and return forward and delivered throughput.

    After filling its shuffle buffer, each subscriber times the reading of about
    ``n_batches`` forward batches' worth of served tokens. Throughput is measured over the
    window in which every subscriber was timing.
    """
    # A window serves all its positions but the first (and any document separators).
    n_tokens = n_batches * settings.sequences_per_batch * (settings.context_size - 1)
    pending = [
        subscriber.read.remote(server, settings, n_tokens, seed)
        for seed, subscriber in enumerate(subscribers[:n_subscribers])
    ]
    requests = list(pending)
    samples = []
    while pending:
        _, pending = ray.wait(pending, timeout=0.25)
        samples.append((time.time(), ray.get(server.stats.remote())["lm_forward_tokens"]))
    results = ray.get(requests)
    start = max(result["started"] for result in results)
    end = min(result["ended"] for result in results)
    forward_per_s = forward_rate(samples, start, end)
    delivered_per_s = sum(result["tokens_per_s"] for result in results)
    return {
        "subscribers": n_subscribers,
        "window_s": end - start,
        "forward_tokens_per_s": forward_per_s,
        "delivered_tokens_per_s": delivered_per_s,
        "forward_per_delivered_each": forward_per_s / (delivered_per_s / n_subscribers),
    }


def format_table(settings: Settings, bare: list[dict], served: list[dict]) -> str:
    bare_per_s = sum(run["tokens_per_s"] for run in bare) / len(bare)
    bare_runs = ", ".join(f"{run['tokens_per_s']:.0f}" for run in bare)
    lines = [
        f"model {settings.model} ({settings.dtype}), hookpoint {settings.hookpoint}, "
        f"{settings.sequences_per_batch} x {settings.context_size} tokens per forward batch, "
        f"{settings.threads} torch threads, {os.cpu_count()} cores ({platform.machine()}), "
        f"load average {os.getloadavg()[0]:.1f} at the end",
        "",
        f"bare in-process forward: {bare_per_s:.0f} tokens/s (mean of runs before and after serving: {bare_runs})",
        "",
        "| subscribers | server forward tokens/s | ratio to bare forward | delivered tokens/s, all subscribers | forward tokens per token each subscriber read |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in served:
        lines.append(
            f"| {row['subscribers']} | {row['forward_tokens_per_s']:.0f} | "
            f"{row['forward_tokens_per_s'] / bare_per_s:.2f} | {row['delivered_tokens_per_s']:.0f} | "
            f"{row['forward_per_delivered_each']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    settings = parse_args()
    raycluster.connect(num_cpus=settings.threads + 1, object_store_memory=1024**3)
    try:
        server = start_server(server_config(settings), num_cpus=settings.threads, max_restarts=0)
        subscribers = [Subscriber.remote() for _ in range(max(settings.subscriber_counts))]
        ray.get([subscriber.ready.remote() for subscriber in subscribers])
        bare_forward = BareForward(settings)
        # Other load on the machine drifts, so the bare forward runs before and after serving.
        bare = [bare_forward.measure()]
        measure_served(settings, server, subscribers, max(settings.subscriber_counts), n_batches=1)
        served = [
            measure_served(settings, server, subscribers, n, settings.forward_batches)
            for n in settings.subscriber_counts
        ]
        bare.append(bare_forward.measure())
        print(format_table(settings, bare, served))
        print()
        print(json.dumps({"settings": vars(settings), "bare": bare, "served": served}, indent=2))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
