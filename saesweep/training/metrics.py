"""Reconstruction and sparsity metrics, accumulated exactly over many batches.

Definitions (x: input activations, x_hat: reconstruction, f: latent activations,
N tokens, d = d_in):

- explained_variance = 1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2, with
  both sums over all N tokens and the mean per dimension over all N tokens
  (the fraction of variance unexplained of Gao et al. 2024, sec. 2.1, taken
  about the mean; a constant offset in x does not count as explained).
- mse = sum ||x - x_hat||^2 / N: squared error per token, summed over d.
- l0 = mean over tokens of the number of nonzero latents; l1 = mean over
  tokens of sum_i |f_i|.
- A latent is dead when it has not fired in the last `window_tokens` tokens.
  It is dense when it fires on more than `dense_threshold` of the tokens of a window
  (the "dense latents" of Gao et al. 2024 and Anthropic's update notes).
- log10 feature density = log10(fires / tokens + 1e-10), the quantity SAELens
  writes to sparsity.safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOG_DENSITY_EPS = 1e-10


@dataclass
class ReconstructionMetrics:
    n_tokens: int
    explained_variance: float
    mse: float
    l0: float
    l1: float

    def as_dict(self) -> dict[str, float]:
        return {
            "explained_variance": self.explained_variance,
            "mse": self.mse,
            "l0": self.l0,
            "l1": self.l1,
        }


class ReconstructionAccumulator:
    """Accumulate explained variance, MSE, L0 and L1 over batches of any size.

    The variance about the mean is merged across batches with Chan et al.'s
    pairwise update in float64, so one batch and the same data in ten batches
    give the same value, and a large constant offset costs no precision.
    """

    def __init__(self, d_in: int):
        self.d_in = d_in
        self.reset()

    def reset(self) -> None:
        self.n_tokens = 0
        self._mean = torch.zeros(self.d_in, dtype=torch.float64)
        self._m2 = torch.zeros(self.d_in, dtype=torch.float64)
        self._sse = 0.0
        self._l0_sum = 0.0
        self._l1_sum = 0.0

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, feature_acts: torch.Tensor | None = None) -> None:
        """Add a batch: `x`, `x_hat` [..., d_in]; `feature_acts` [..., d_sae] or None."""
        x = x.detach().reshape(-1, self.d_in).to(torch.float64).cpu()
        x_hat = x_hat.detach().reshape(-1, self.d_in).to(torch.float64).cpu()
        n = x.shape[0]
        if n == 0:
            return
        batch_mean = x.mean(dim=0)
        batch_m2 = (x - batch_mean).pow(2).sum(dim=0)
        total = self.n_tokens + n
        delta = batch_mean - self._mean
        self._m2 += batch_m2 + delta.pow(2) * (self.n_tokens * n / total)
        self._mean += delta * (n / total)
        self.n_tokens = total
        self._sse += float((x - x_hat).pow(2).sum())
        if feature_acts is not None:
            acts = feature_acts.detach().reshape(n, -1)
            self._l0_sum += float(torch.count_nonzero(acts))
            # Accumulating in float64 without a float64 copy of the latents saves a pass.
            self._l1_sum += float(acts.abs().sum(dtype=torch.float64))

    def compute(self) -> ReconstructionMetrics:
        if self.n_tokens == 0:
            raise ValueError("no tokens were accumulated: call update() before compute()")
        total_variance = float(self._m2.sum())
        explained = 1.0 - self._sse / total_variance if total_variance > 0 else float("nan")
        return ReconstructionMetrics(
            n_tokens=self.n_tokens,
            explained_variance=explained,
            mse=self._sse / self.n_tokens,
            l0=self._l0_sum / self.n_tokens,
            l1=self._l1_sum / self.n_tokens,
        )


class FiringTracker:
    """Track when each latent last fired and how often, over a token window.

    `tokens_since_fired` counts tokens since each latent's last firing. A
    latent that has never fired counts from the start of tracking, so it is
    dead only once a full window has passed.
    """

    def __init__(self, d_sae: int, window_tokens: int, dense_threshold: float = 0.1):
        if window_tokens <= 0:
            raise ValueError(f"window_tokens must be positive, got {window_tokens}")
        self.d_sae = d_sae
        self.window_tokens = window_tokens
        self.dense_threshold = dense_threshold
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long)
        self.total_tokens = 0
        self.total_fires = torch.zeros(d_sae, dtype=torch.float64)
        self._window_fires = torch.zeros(d_sae, dtype=torch.float64)
        self._window_tokens_seen = 0
        self._last_window_density: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, feature_acts: torch.Tensor) -> None:
        """Add a batch of latent activations [..., d_sae]."""
        acts = feature_acts.detach().reshape(-1, self.d_sae)
        n = acts.shape[0]
        fires = (acts != 0).sum(dim=0).cpu()
        fired = fires > 0
        self.tokens_since_fired += n
        self.tokens_since_fired[fired] = 0
        self.total_tokens += n
        self.total_fires += fires.to(torch.float64)
        self._window_fires += fires.to(torch.float64)
        self._window_tokens_seen += n
        if self._window_tokens_seen >= self.window_tokens:
            self._last_window_density = self._window_fires / self._window_tokens_seen
            self._window_fires.zero_()
            self._window_tokens_seen = 0

    def dead_mask(self) -> torch.Tensor:
        """[d_sae] bool: latents that have not fired in the last window_tokens tokens."""
        return self.tokens_since_fired >= self.window_tokens

    def dead_fraction(self) -> float:
        return float(self.dead_mask().float().mean())

    def dense_fraction(self) -> float:
        """Fraction of latents firing on more than dense_threshold of the tokens
        of the last complete window (of the tokens so far before the first)."""
        density = self._last_window_density
        if density is None:
            if self._window_tokens_seen == 0:
                return 0.0
            density = self._window_fires / self._window_tokens_seen
        return float((density > self.dense_threshold).double().mean())

    def log10_density(self) -> torch.Tensor:
        """[d_sae] log10 of each latent's firing rate over every token seen."""
        rate = self.total_fires / max(self.total_tokens, 1)
        return torch.log10(rate + LOG_DENSITY_EPS).float()

    def state_dict(self) -> dict:
        return {
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "total_tokens": self.total_tokens,
            "total_fires": self.total_fires.clone(),
            "window_fires": self._window_fires.clone(),
            "window_tokens_seen": self._window_tokens_seen,
            "last_window_density": self._last_window_density,
        }

    def load_state_dict(self, state: dict) -> None:
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.total_tokens = int(state["total_tokens"])
        self.total_fires = state["total_fires"].clone()
        self._window_fires = state["window_fires"].clone()
        self._window_tokens_seen = int(state["window_tokens_seen"])
        self._last_window_density = state["last_window_density"]


@torch.no_grad()
def evaluate_sae(sae, batches, max_tokens: int | None = None) -> ReconstructionMetrics:
    """Reconstruction metrics of `sae` over an iterable of [batch, d_in] activations."""
    accumulator = ReconstructionAccumulator(sae.cfg.d_in)
    for x in batches:
        feature_acts = sae.encode(x)
        accumulator.update(x, sae.decode(feature_acts), feature_acts)
        if max_tokens is not None and accumulator.n_tokens >= max_tokens:
            break
    return accumulator.compute()
