"""Helpers shared by the benchmarks: machine facts, FLOP counts, matmul peak, resource sampling.

FLOP counts (one multiply-add counts as 2 FLOPs):

- Model forward, per token, for each block that runs: ``2 * (weights of the attention
  projections and the MLP)`` plus the attention scores and the weighted sum of values,
  ``2 * 2 * n_heads * d_head * (context_size + 1) / 2``, since with a causal mask a token
  attends to ``(context_size + 1) / 2`` positions on average. Norms, activations and the
  embedding lookup are left out. A pass to ``blocks.L.hook_resid_pre`` runs L blocks, and a
  pass to any other hook of block L runs L + 1 (an upper bound for ``hook_resid_mid`` and
  ``hook_attn_out``).
- SAE training step, per token, with a dense decoder: ``6 * 2 * d_in * d_sae``. The forward
  pass has two matmuls (encoder and decoder) of ``2 * d_in * d_sae`` each. The backward pass
  costs twice the forward, because it computes the gradient of each weight and of each
  matmul's input. The encoder's input needs one too, since the decoder bias is subtracted
  from it. Topk SAEs train with the sparse decoder (``training.sparse_decoder``), which
  reads only the k selected rows of W_dec: ``3 * 2 * d_in * d_sae`` for the encoder's three
  matmuls plus ``3 * 2 * k * d_in`` for the decoder's forward pass and its two gradients.
  Element-wise work, top-k selection, the AuxK loss and the optimizer are left out.
- Useful FLOPs of a job are the FLOPs it needs: per SAE, its training tokens' share of
  the forward passes (``context_size / (context_size - 1)`` positions run per served token,
  since position 0 is not served) and its SAE steps. Forward passes that a server runs
  ahead of its trials, and the normalization estimate, count as overhead.
"""

from __future__ import annotations

import json
import os
import platform
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

ARCHITECTURE_COEFFICIENTS = {
    "topk": ("k", 32),
    "standard": ("l1_coefficient", 5.0),
    "jumprelu": ("l0_coefficient", 5.0),
}
"""Sparsity coefficient and value of each architecture the benchmarks train."""

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_\w+)$")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_BYTES_PER_KIB = 1024


# -- machine -----------------------------------------------------------------------------------


def cpu_model() -> str:
    """Return the CPU model name from /proc/cpuinfo, or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """Return the facts a benchmark record states: cores, CPU model, versions, torch threads, load."""
    from importlib.metadata import version

    import ray

    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "transformer_lens": version("transformer-lens"),
        "sae_lens": version("sae-lens"),
        "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1),
        "load_average_1min": os.getloadavg()[0],
    }


def matmul_peak(dtype: torch.dtype, threads: int, size: int = 2048, repeats: int = 5, rounds: int = 5) -> float:
    """Return the best measured FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``threads`` threads.

    The best of ``rounds`` timings of ``repeats`` matmuls is kept, because on a shared
    machine other jobs only ever slow a round down.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        for _ in range(2):
            a @ b
        best = 0.0
        for _ in range(rounds):
            started = time.perf_counter()
            for _ in range(repeats):
                a @ b
            seconds = time.perf_counter() - started
            best = max(best, 2 * size**3 * repeats / seconds)
        return best
    finally:
        torch.set_num_threads(previous)


def matmul_peaks(threads: int) -> dict[str, float]:
    """Return the float32 and bfloat16 matmul peaks in FLOP/s, keyed by dtype name."""
    return {
        "float32": matmul_peak(torch.float32, threads),
        "bfloat16": matmul_peak(torch.bfloat16, threads),
    }


# -- FLOP counts -------------------------------------------------------------------------------


def blocks_run(hookpoint: str) -> int:
    """Return how many transformer blocks a forward pass runs to reach ``hookpoint``."""
    match = _BLOCK_HOOK.match(hookpoint)
    if match is None:
        raise ValueError(f"hookpoint {hookpoint!r} is not blocks.L.<hook>: use e.g. blocks.4.hook_resid_pre")
    layer = int(match.group(1))
    return layer if match.group(2) == "hook_resid_pre" else layer + 1


@dataclass(frozen=True)
class ModelFlops:
    """Forward FLOPs per token of one transformer block of a model."""

    weights_per_block: int
    """Weights of the attention projections and the MLP of one block."""
    attention_width: int
    """n_heads * d_head, the width of the attention scores' dot products."""

    def per_token(self, blocks: int, context_size: int) -> float:
        """Return the forward FLOPs per token of ``blocks`` blocks at ``context_size``."""
        attention = 2 * 2 * self.attention_width * (context_size + 1) / 2
        return blocks * (2 * self.weights_per_block + attention)

    def to_hookpoint(self, hookpoint: str, context_size: int) -> float:
        """Return the forward FLOPs per token of a pass that stops at ``hookpoint``."""
        return self.per_token(blocks_run(hookpoint), context_size)


def model_flops(model: str, *, random_weights: bool = False) -> ModelFlops:
    """Read the block shape of ``model`` from its config (no weights) and return its FLOP counter.

    Llama-style models (gated MLP, grouped-query attention) and GPT-2 are supported.
    """
    from saesweep.activations.models import load_config

    config = load_config(model, random_weights=random_weights).get_text_config()
    if config.model_type == "gpt2":
        d_model = config.n_embd
        d_mlp = config.n_inner or 4 * d_model
        weights = 4 * d_model * d_model + 2 * d_model * d_mlp
        return ModelFlops(weights_per_block=weights, attention_width=d_model)
    if hasattr(config, "intermediate_size") and hasattr(config, "num_key_value_heads"):
        d_model = config.hidden_size
        d_head = getattr(config, "head_dim", None) or d_model // config.num_attention_heads
        query_width = config.num_attention_heads * d_head
        key_value_width = config.num_key_value_heads * d_head
        attention = 2 * d_model * query_width + 2 * d_model * key_value_width
        mlp = 3 * d_model * config.intermediate_size
        return ModelFlops(weights_per_block=attention + mlp, attention_width=query_width)
    raise ValueError(
        f"model {model!r} ({config.model_type}) has no FLOP formula here: the benchmarks count "
        "Llama-style models and GPT-2. Use smollm2-135m or gpt2."
    )


def sae_training_flops_per_token(
    d_in: int, d_sae: int, architecture: str = "standard", sparse_decoder: bool = True
) -> float:
    """Return the FLOPs of one SAE training step per token (see the module docstring).

    A topk SAE with the sparse decoder keeps ``k`` latents per token, the value in
    ``ARCHITECTURE_COEFFICIENTS``.
    """
    if architecture == "topk" and sparse_decoder:
        k = ARCHITECTURE_COEFFICIENTS["topk"][1]
        return 3 * 2 * d_in * d_sae + 3 * 2 * k * d_in
    return 6 * 2 * d_in * d_sae


def mean_sae_training_flops_per_token(d_in: int, d_sae: int, architectures: list[str]) -> float:
    """Return the mean of ``sae_training_flops_per_token`` over one SAE of each architecture."""
    return sum(sae_training_flops_per_token(d_in, d_sae, name) for name in architectures) / len(architectures)


# -- resource sampling -------------------------------------------------------------------------


def _pss_bytes(pid: int) -> int:
    """Return the proportional set size of process ``pid`` (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * _BYTES_PER_KIB
    except OSError:
        pass
    return 0


def _object_store_bytes(raylet_pid: int) -> int:
    """Return the bytes allocated in the raylet's /dev/shm files, the pages Ray's object store has used.

    The store is a deleted tmpfs file that the raylet maps. Its allocated blocks count the
    pages ever written, and Ray keeps them while the store lives. Reading
    ``/proc/PID/map_files`` needs the same user as the raylet (or root).
    """
    seen: dict[int, int] = {}
    try:
        with open(f"/proc/{raylet_pid}/maps") as maps:
            for line in maps:
                if "/dev/shm/" not in line:
                    continue
                address_range, *_ = line.split()
                stat = os.stat(f"/proc/{raylet_pid}/map_files/{address_range}")
                seen[stat.st_ino] = stat.st_blocks * 512
    except OSError:
        return 0
    return sum(seen.values())


def _system_busy_seconds() -> float:
    """Return the CPU seconds all cores have spent busy since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    values = [int(value) for value in fields[:8]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / _CLOCK_TICKS


class ResourceMonitor:
    """Sample the memory and CPU use of this process and all its descendants in a thread.

    Memory is the sum of the proportional set sizes (PSS), so pages shared by several
    processes, such as Ray's object store in /dev/shm, count once. With ``object_store``,
    the object store's allocated pages are sampled apart from the raylet's /dev/shm
    files, since the raylet hosts the store. CPU time of the tree is compared with the
    whole machine's busy time, which gives the CPU that other jobs took while the monitor
    ran. The sampling thread's own CPU time is reported too, because it is part of the
    tree's.
    """

    def __init__(self, interval_s: float = 1.0, object_store: bool = False):
        self.interval_s = interval_s
        self.object_store = object_store
        self.root = psutil.Process()
        self.peak_pss_bytes = 0
        self.peak_object_store_bytes = 0
        self.samples = 0
        self.sampling_cpu_s = 0.0
        self._cpu_first: dict[int, float] = {}
        self._cpu_last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceMonitor:
        self.started = time.time()
        self._busy_start = _system_busy_seconds()
        self._sample()
        self._thread = threading.Thread(target=self._run, name="resource-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.ended = time.time()
        self._busy_end = _system_busy_seconds()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            started = time.thread_time()
            self._sample()
            self.sampling_cpu_s += time.thread_time() - started

    def _sample(self) -> None:
        try:
            processes = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        pss = 0
        shared = 0
        for process in processes:
            pss += _pss_bytes(process.pid)
            try:
                times = process.cpu_times()
                cpu = times.user + times.system
                if process.pid not in self._cpu_first:
                    # A process started after the monitor counts from zero.
                    born_after = process.create_time() >= getattr(self, "started", 0.0)
                    self._cpu_first[process.pid] = 0.0 if born_after else cpu
                self._cpu_last[process.pid] = cpu
                role = _process_role(process, self.root.pid)
            except psutil.Error:
                continue
            # Ray renames a worker when it becomes an actor and again when it exits, so
            # the first specific role seen sticks.
            if self._roles.get(process.pid) not in _SPECIFIC_ROLES:
                self._roles[process.pid] = role
            if self.object_store and role == "raylet":
                shared = max(shared, _object_store_bytes(process.pid))
        self.peak_pss_bytes = max(self.peak_pss_bytes, pss)
        self.peak_object_store_bytes = max(self.peak_object_store_bytes, shared)
        self.samples += 1

    def summary(self) -> dict[str, float]:
        """Return wall time, peak memory (GiB) and mean CPU use (cores) of this tree and of others."""
        wall = self.ended - self.started
        ours = sum(self._cpu_last[pid] - self._cpu_first[pid] for pid in self._cpu_last)
        busy = self._busy_end - self._busy_start
        result = {
            "wall_s": wall,
            "peak_memory_gib": self.peak_pss_bytes / 1024**3,
            "cpu_cores_used": ours / wall if wall > 0 else 0.0,
            # Negative values are sampling error: a process's last CPU time is read up to
            # one interval before it exits, and /proc/stat counts in clock ticks.
            "other_jobs_cpu_cores": max(0.0, busy - ours) / wall if wall > 0 else 0.0,
            "monitor_cpu_s": self.sampling_cpu_s,
        }
        if self.object_store:
            result["peak_object_store_gib"] = self.peak_object_store_bytes / 1024**3
        return result

    def cpu_seconds_by_role(self) -> dict[str, float]:
        """Return the CPU seconds this tree used, per process role (see ``_process_role``)."""
        seconds: dict[str, float] = {}
        for pid, last in self._cpu_last.items():
            role = self._roles.get(pid, "other")
            seconds[role] = seconds.get(role, 0.0) + last - self._cpu_first[pid]
        return seconds


_SPECIFIC_ROLES = ("driver", "trial", "server", "raylet", "gcs")


def _process_role(process: psutil.Process, root_pid: int) -> str:
    """Classify a process of the tree: driver, trial, server, raylet, gcs, other Ray worker or other."""
    if process.pid == root_pid:
        return "driver"
    try:
        title = " ".join(process.cmdline()[:2])
    except psutil.Error:
        return "other"
    if title.startswith("ray::ImplicitFunc"):
        return "trial"
    if "ActivationServer" in title or "EvaluationServer" in title:
        return "server"
    if "raylet" in title:
        return "raylet"
    if "gcs_server" in title:
        return "gcs"
    if title.startswith("ray::"):
        return "other_ray_worker"
    return "other"


# -- sweeps ------------------------------------------------------------------------------------


def sweep_experiment(
    *,
    name: str,
    output_dir: str,
    hookpoints: list[str],
    architectures: list[str],
    expansion_factors: list[int],
    tokens_per_trial: int,
    batch_size_tokens: int,
    context_size: int,
    sequences_per_batch: int,
    shuffle_buffer_tokens: int,
    normalization_tokens: int,
    log_every_steps: int,
    trial_cpus: float = 0.1,
    server_cpus: float = 1.0,
    model_dtype: str = "float32",
    sae_dtype: str = "float32",
    max_batches_in_flight: int = 4,
    coefficients: dict[str, list[float]] | None = None,
    saes_per_trial: int = 1,
    autocast: bool = False,
) -> dict[str, Any]:
    """Return experiment-file data for a benchmark sweep, run in one wave with tracking off.

    Every trial runs at once (``max_concurrent_trials`` is the trial count), so one forward
    pass feeds all of them. There is no held-out evaluation and no checkpoint, so the
    sweep's time is serving and training. ``coefficients`` overrides the sparsity values
    searched per coefficient name (a list is a grid). ``saes_per_trial`` and ``autocast``
    set ``tune.saes_per_trial`` and ``training.autocast``.
    """
    search: dict[str, Any] = {"architectures": architectures, "expansion_factors": expansion_factors}
    for architecture in architectures:
        coefficient, value = ARCHITECTURE_COEFFICIENTS[architecture]
        search[coefficient] = [value]
    search.update(coefficients or {})
    per_hookpoint = len(expansion_factors) * sum(len(search[ARCHITECTURE_COEFFICIENTS[a][0]]) for a in architectures)
    n_trials = len(hookpoints) * -(-per_hookpoint // saes_per_trial)
    return {
        "name": name,
        "model": {"name": "smollm2-135m", "dtype": model_dtype},
        "data": {"dataset": "embedded", "context_size": context_size},
        "hookpoints": {"names": hookpoints},
        "sae": {
            "dtype": sae_dtype,
            "normalize_activations": "expected_average_only_in",
            "jumprelu_init_threshold": 1.0,
        },
        "search": search,
        "training": {
            "tokens_per_trial": tokens_per_trial,
            "batch_size_tokens": batch_size_tokens,
            "lr": 1.0e-3,
            "log_every_steps": log_every_steps,
            "checkpoint_every_steps": 0,
            "dead_latent_window_tokens": tokens_per_trial,
            "eval_tokens": 0,
            "autocast": autocast,
        },
        "tune": {
            "max_concurrent_trials": n_trials,
            "resources_per_trial": {"cpu": trial_cpus},
            "saes_per_trial": saes_per_trial,
        },
        "servers": {
            "resources": {"cpu": server_cpus},
            "sequences_per_batch": sequences_per_batch,
            "max_batches_in_flight": max_batches_in_flight,
            "shuffle_buffer_tokens": shuffle_buffer_tokens,
            "normalization_tokens": normalization_tokens,
        },
        "mlflow": {"enabled": False},
        "champion": {"l0_max": 1000},
        "output_dir": output_dir,
    }


def ray_cpus_for(data: dict[str, Any]) -> int:
    """Return the logical Ray CPUs that let every trial of the sweep ``data`` run at once."""
    import math

    trials = data["tune"]["max_concurrent_trials"]
    needed = data["servers"]["resources"]["cpu"] + trials * data["tune"]["resources_per_trial"]["cpu"] + 1
    return max(os.cpu_count() or 1, math.ceil(needed))


def trial_reports(tune_path: str | Path) -> list[dict[str, Any]]:
    """Return every trial's Tune reports (result.json rows) from a finished sweep's folder."""
    trials = []
    for result_file in sorted(Path(tune_path).glob("*/result.json")):
        rows = [json.loads(line) for line in result_file.read_text().splitlines() if line.strip()]
        rows = [row for row in rows if "tokens_per_second" in row]
        if rows:
            trials.append({"trial_id": rows[0]["trial_id"], "config": rows[0]["config"], "reports": rows})
    return trials


def steady_rate(reports: list[dict[str, Any]]) -> dict[str, float] | None:
    """Return tokens per second between a trial's first and last report, or None with fewer than 2.

    The first report's window includes the trial's start-up (imports, subscribing, filling
    the shuffle buffer), so it is left out. Times are Tune's ``time_total_s``, the seconds
    since the trial started.
    """
    if len(reports) < 2:
        return None
    first, last = reports[0], reports[-1]
    seconds = last["time_total_s"] - first["time_total_s"]
    tokens = last["tokens_trained"] - first["tokens_trained"]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "first_report": first["timestamp"],
        "last_report": last["timestamp"],
    }



def add_sae_set_arguments(parser: Any, default_tokens_per_sae: int) -> None:
    """Add the options that choose a sweep's SAEs and its token batches to `parser`."""
    parser.add_argument(
        "--layers",
        default=None,
        help="comma-separated layers of blocks.L.hook_resid_pre (default 4,8,12,16; --quick: 1)",
    )
    parser.add_argument(
        "--architectures",
        default=None,
        help="comma-separated SAE architectures (default topk,standard,jumprelu; --quick: topk,standard)",
    )
    parser.add_argument("--expansion-factor", type=int, default=4, help="d_sae / d_model (default 4)")
    parser.add_argument(
        "--tokens-per-sae",
        type=int,
        default=None,
        help=f"training tokens per SAE (default {default_tokens_per_sae}; --quick: 1024)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="tokens per optimizer step (default 1024; --quick: 256)",
    )
    parser.add_argument("--context-size", type=int, default=128, help="tokens per window (default 128)")
    parser.add_argument("--sequences", type=int, default=8, help="windows per forward batch (default 8)")

def write_json(path: str | None, data: dict[str, Any]) -> None:
    """Print ``data`` as JSON, and write it to ``path`` when given."""
    text = json.dumps(data, indent=2, default=str)
    print(text)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


# -- in-process activations --------------------------------------------------------------------


class ForwardCounter:
    """Tokens run forward by an in-process loop, every position of every window counted."""

    def __init__(self) -> None:
        self.tokens = 0


def served_chunks(bridge, batches, hookpoint: str, counter: ForwardCounter):
    """Yield the served ``[n_tokens, d_in]`` activations of ``hookpoint`` for each token batch.

    Each batch runs forward to the hookpoint, and only the positions that a server would
    serve are kept (``TokenBatch.keep``), as the activation server does.
    """
    from saesweep.activations.models import run_hookpoints

    for batch in batches:
        activations = run_hookpoints(bridge, batch.tokens, [hookpoint])[hookpoint]
        counter.tokens += batch.tokens.numel()
        yield activations[batch.keep]


def recorded(chunks, record: list):
    """Yield ``chunks`` and append each to ``record``, so they can be read again."""
    for chunk in chunks:
        record.append(chunk)
        yield chunk


def estimate_norm_scale(chunks, d_in: int, n_tokens: int) -> float:
    """Return ``sqrt(d_in) / mean ||x||`` over the first ``n_tokens`` served tokens, as the server estimates it."""
    import math

    norm_sum = 0.0
    seen = 0
    for chunk in chunks:
        norm_sum += chunk.double().norm(dim=-1).sum().item()
        seen += chunk.shape[0]
        if seen >= n_tokens:
            break
    return math.sqrt(d_in) / (norm_sum / seen)


def shuffled_batches(chunks, batch_size: int, shuffle_buffer_tokens: int, seed: int):
    """Yield ``[batch_size, d_in]`` batches through the client's shuffle buffer, as a trial reads them."""
    from saesweep.activations.shuffle import ShuffleBuffer

    buffer = ShuffleBuffer(shuffle_buffer_tokens, seed=seed)
    for chunk in chunks:
        buffer.add(chunk)
        while buffer.ready_tokens >= batch_size:
            yield buffer.take(batch_size)


class ReportClock:
    """A trainer ``report_fn`` that records the time and the tokens trained at each report."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, int]] = []

    def __call__(self, trainer, report) -> None:
        self.reports.append((time.perf_counter(), report.tokens_trained))

    def steady_tokens_per_s(self) -> float:
        """Return tokens per second between the first and the last report (nan with fewer than 2)."""
        if len(self.reports) < 2:
            return float("nan")
        (t0, tokens0), (t1, tokens1) = self.reports[0], self.reports[-1]
        return (tokens1 - tokens0) / (t1 - t0) if t1 > t0 else float("nan")


def trial_config(hookpoint: str, architecture: str, expansion_factor: int) -> dict[str, Any]:
    """Return a trial config as Tune passes it to ``run_trial``, for ``trial_sae_config``."""
    from saesweep.experiment.search import coefficient_names

    coefficient, value = ARCHITECTURE_COEFFICIENTS[architecture]
    config: dict[str, Any] = {name: None for name in coefficient_names()}
    config.update(hookpoint=hookpoint, architecture=architecture, expansion_factor=expansion_factor)
    config[coefficient] = value
    return config


class TokenBatchCache:
    """A token stream read once and replayed from its start by every iteration.

    In-process loops that train configs one after another replay the same batches, so that
    tokenizing the text is paid once, as the activation server pays it once.
    """

    def __init__(self, stream) -> None:
        self._stream = iter(stream)
        self._batches: list = []

    def __iter__(self):
        index = 0
        while True:
            if index == len(self._batches):
                self._batches.append(next(self._stream))
            yield self._batches[index]
            index += 1


def run_shared_sweep(exp, allow_failures: bool = False) -> dict[str, Any]:
    """Run the sweep ``exp`` on the connected Ray instance and return its times, tokens and memory.

    Raises RuntimeError when a trial fails, since its time would not count a whole SAE,
    unless ``allow_failures`` is set. The failures are then listed in ``failed_trials``.
    """
    from saesweep.sweep.runner import run_sweep

    with ResourceMonitor(object_store=True) as monitor:
        result = run_sweep(exp, write=lambda line: None)
    failed = [trial.error for trial in result.trials if not trial.ok]
    if failed and not allow_failures:
        raise RuntimeError(f"{len(failed)} trial(s) of sweep {exp.name} failed: {failed}")
    trials = []
    for trial in trial_reports(result.tune_path):
        rate = steady_rate(trial["reports"])
        config = trial["config"]
        # A trial that trains several SAEs reports the tokens of each; they train on the same batches.
        members = config["pack"]["members"] if "pack" in config else [config]
        first, last = trial["reports"][0], trial["reports"][-1]
        trials.append(
            {
                "hookpoint": config["hookpoint"],
                "architecture": ",".join(member["architecture"] for member in members),
                "expansion_factor": config.get("expansion_factor", members[0]["expansion_factor"]),
                "saes": len(members),
                "steady_tokens_per_s": rate["tokens_per_s"] * len(members) if rate else float("nan"),
                # Seconds after the sweep started; Tune stamps reports in whole seconds.
                "started_s": first["timestamp"] - first["time_total_s"] - monitor.started,
                "first_report_s": first["timestamp"] - monitor.started,
                "last_report_s": last["timestamp"] - monitor.started,
            }
        )
    return {
        "sweep_wall_s": result.wall_time_s,
        "lm_forward_tokens": result.lm_forward_tokens,
        "norm_estimate_forward_tokens": int(sum(s["norm_estimate_forward_tokens"] for s in result.server_stats)),
        "tokens_trained": result.tokens_trained,
        "sharing_ratio": result.sharing_ratio,
        "served_tokens": {
            hookpoint: tokens for stats in result.server_stats for hookpoint, tokens in stats["served_tokens"].items()
        },
        # Every trial runs at once, so their steady rates add up.
        "steady_tokens_per_s": sum(trial["steady_tokens_per_s"] for trial in trials),
        "trials": trials,
        "failed_trials": failed,
        "cpu_seconds_by_role": monitor.cpu_seconds_by_role(),
        **monitor.summary(),
    }


def forward_tokens_per_served(context_size: int) -> float:
    """Return the positions run forward per served token: position 0 of each window is not served.

    Document separators are not served either, which this leaves out.
    """
    return context_size / (context_size - 1)


def shared_sweep_useful_flops(
    *,
    tokens_per_trial: int,
    n_trials: int,
    forward_flops_per_token: float,
    sae_flops_per_token: float,
    context_size: int,
) -> dict[str, float]:
    """Return the FLOPs a shared sweep needs: one forward pass feeding every trial, and every SAE step.

    ``total`` is the whole job. ``per_trained_token`` is what one trained token costs in the
    steady state: its SAE step plus its share of a forward pass that feeds ``n_trials``.
    Forward batches a server computes ahead and the normalization estimate count as overhead.
    """
    forward = forward_flops_per_token * forward_tokens_per_served(context_size)
    return {
        "total": tokens_per_trial * (forward + n_trials * sae_flops_per_token),
        "per_trained_token": sae_flops_per_token + forward / n_trials,
    }
