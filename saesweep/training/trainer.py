"""The SAE trainer: Adam over a plain iterator of [batch, d_in] activation tensors."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from saesweep.saes import SAE
from saesweep.training.metrics import FiringTracker, ReconstructionAccumulator

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "linear", "cosine")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerConfig:
    """Settings of one SAE's training run."""

    total_tokens: int = 2_000_000
    """Activation tokens to train on."""
    batch_size: int = 4096
    """Tokens per optimizer step."""
    lr: float = 3e-4
    """Peak Adam learning rate."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_warmup_steps: int = 0
    """Steps of linear warm-up from 0 to `lr`."""
    lr_schedule: str = "constant"
    """After warm-up: constant, or decay to `lr_end_factor * lr` over the last
    `lr_decay_steps` steps, linearly or along a cosine."""
    lr_decay_steps: int = 0
    """Steps of decay at the end of training; 0 with a decaying schedule means
    every step after warm-up."""
    lr_end_factor: float = 0.0
    sparsity_warmup_steps: int = 0
    """Steps over which the sparsity penalty ramps linearly from 0 to full."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value; None disables clipping."""
    dead_latent_window: int = 1_000_000
    """A latent that has not fired in this many tokens counts as dead."""
    dense_threshold: float = 0.1
    """A latent firing on more than this fraction of tokens counts as dense."""
    init_b_dec_to_mean: bool = True
    """Set the decoder bias to the mean of the first batch before the first
    step, so the latents start by explaining variation, not the offset."""
    log_every_steps: int = 50
    checkpoint_every_steps: int = 0
    """Call the checkpoint callback every this many steps; 0 disables."""
    autocast: bool = False
    """Run the SAE's forward and backward passes under bfloat16 autocast. The
    weights, the optimizer state and the metrics stay in the SAE's dtype."""
    sparse_decoder: bool = True
    """Passed to `SAE.training_loss`: topk and batchtopk SAEs then decode from the
    selected latents' rows of W_dec instead of a dense [batch, d_sae] matmul.
    Other architectures ignore it."""

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}: use one of {list(LR_SCHEDULES)}")
        for name in ("total_tokens", "batch_size", "log_every_steps", "dead_latent_window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def total_steps(self) -> int:
        return max(1, math.ceil(self.total_tokens / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(cfg: TrainerConfig, step: int) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return (step + 1) / cfg.lr_warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    decay_steps = cfg.lr_decay_steps or max(1, cfg.total_steps - cfg.lr_warmup_steps)
    decay_start = cfg.total_steps - decay_steps
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    end = cfg.lr_end_factor
    if cfg.lr_schedule == "linear":
        return 1.0 - (1.0 - end) * progress
    return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rebatch(batches: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Regroup a stream of [n, d_in] tensors into [batch_size, d_in] tensors."""
    pending: list[torch.Tensor] = []
    held = 0
    for batch in batches:
        batch = batch.reshape(-1, batch.shape[-1])
        pending.append(batch)
        held += batch.shape[0]
        while held >= batch_size:
            joined = torch.cat(pending) if len(pending) > 1 else pending[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending = [rest] if rest.shape[0] else []
            held = rest.shape[0]


@dataclass
class Report:
    """Progress record passed to `report_fn` at a logging or checkpoint step."""

    step: int
    tokens_trained: int
    metrics: dict[str, float]
    """Metrics over the steps since the previous report with metrics; empty when
    the step is only a checkpoint step."""
    checkpoint: bool
    """True when the receiver should save `trainer.state_dict()` now."""
    final: bool
    """True for the last report of `fit`."""


ReportFn = Callable[["SAETrainer", Report], None]


class SAETrainer:
    """Train one SAE on activations from any iterator of [n, d_in] tensors.

    The trainer does not depend on where activations come from. `report_fn`
    receives a `Report` every `log_every_steps` steps, every
    `checkpoint_every_steps` steps (with `checkpoint=True`), when a stop request
    ends training early (with `checkpoint=True`), and at the end of `fit`.
    """

    def __init__(self, sae: SAE, cfg: TrainerConfig, *, report_fn: ReportFn | None = None):
        self.sae = sae
        self.cfg = cfg
        self.report_fn = report_fn
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.firing = FiringTracker(sae.cfg.d_sae, cfg.dead_latent_window, cfg.dense_threshold)
        self.window = ReconstructionAccumulator(sae.cfg.d_in)
        self.step = 0
        self.tokens_trained = 0
        self.stop_requested = False
        self.last_metrics: dict[str, float] = {}
        """Metrics of the latest report that had metrics."""
        self._losses_sum: dict[str, float] = {}
        self._steps_in_window = 0
        self._window_start = time.perf_counter()
        self._window_tokens = 0

    def request_stop(self) -> None:
        """Stop after the current step and write a checkpoint (safe from a signal handler)."""
        self.stop_requested = True

    @property
    def done(self) -> bool:
        return self.tokens_trained >= self.cfg.total_tokens

    def sparsity_scale(self) -> float:
        if self.cfg.sparsity_warmup_steps <= 0:
            return 1.0
        return min(1.0, (self.step + 1) / self.cfg.sparsity_warmup_steps)

    def fit(self, batches: Iterable[torch.Tensor]) -> dict[str, float]:
        """Train until `total_tokens` or a stop request; return the last metrics."""
        from saesweep.training.group import fit_together

        fit_together([self], batches)
        return self.last_metrics

    def train_step(self, x: torch.Tensor) -> None:
        """Run one optimizer step on x [batch, d_in]."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.cfg, self.step)

        if self.step == 0 and self.cfg.init_b_dec_to_mean:
            self._init_b_dec(x)

        # forward and losses
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.cfg.autocast):
            output = self.sae.training_loss(
                x,
                dead_mask=self.firing.dead_mask().to(x.device),
                sparsity_scale=self.sparsity_scale(),
                sparse_decoder=self.cfg.sparse_decoder,
            )
        if not torch.isfinite(output.loss):
            terms = {name: float(value.detach()) for name, value in output.losses.items()}
            raise TrainingDivergedError(
                f"loss is {float(output.loss.detach())} at step {self.step} (terms {terms}): "
                "lower the learning rate or the sparsity coefficient"
            )

        # backward, then the decoder constraint of the architecture
        self.optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        self.sae.remove_parallel_decoder_grad()
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.cfg.grad_clip_norm)
        self.optimizer.step()
        self.sae.apply_decoder_constraint()

        # bookkeeping
        n_tokens = x.shape[0]
        self.step += 1
        self.tokens_trained += n_tokens
        self._window_tokens += n_tokens
        self.firing.update(output.feature_acts)
        self.window.update(output.sae_in, output.sae_out, output.feature_acts)
        self._steps_in_window += 1
        for name, value in {"loss": output.loss, **output.losses}.items():
            self._losses_sum[name] = self._losses_sum.get(name, 0.0) + float(value.detach())
        self._last_step_metrics = output.metrics

    @torch.no_grad()
    def _init_b_dec(self, x: torch.Tensor) -> None:
        mean = x.to(self.sae.dtype).mean(dim=0) * self.sae.activation_norm_scale_in_use()
        self.sae.b_dec.data.copy_(mean)
        logger.info("initialized b_dec to the mean of the first batch (norm %.3g)", float(mean.norm()))

    def log_metrics(self) -> dict[str, float]:
        """Summarize the steps since the previous call."""
        metrics: dict[str, float] = {}
        if self.window.n_tokens:
            metrics.update(self.window.compute().as_dict())
        steps = max(1, self._steps_in_window)
        metrics.update({name: total / steps for name, total in self._losses_sum.items()})
        metrics.update(getattr(self, "_last_step_metrics", {}))
        elapsed = time.perf_counter() - self._window_start
        metrics.update(
            dead_latents_frac=self.firing.dead_fraction(),
            dense_latents_frac=self.firing.dense_fraction(),
            tokens_trained=float(self.tokens_trained),
            lr=self.optimizer.param_groups[0]["lr"],
            sparsity_scale=self.sparsity_scale(),
            tokens_per_second=self._window_tokens / elapsed if elapsed > 0 else 0.0,
        )
        self.window.reset()
        self._losses_sum = {}
        self._steps_in_window = 0
        self._window_start = time.perf_counter()
        self._window_tokens = 0
        return metrics

    # resume -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it stopped."""
        return {
            "sae": {name: tensor.detach().clone() for name, tensor in self.sae.state_dict().items()},
            "activation_norm_scale": self.sae.activation_norm_scale,
            "optimizer": self.optimizer.state_dict(),
            "firing": self.firing.state_dict(),
            "step": self.step,
            "tokens_trained": self.tokens_trained,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sae.load_state_dict(state["sae"])
        self.sae.activation_norm_scale = float(state["activation_norm_scale"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.firing.load_state_dict(state["firing"])
        self.step = int(state["step"])
        self.tokens_trained = int(state["tokens_trained"])
