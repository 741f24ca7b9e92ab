"""Experiment sections that define what is trained: model, data, hookpoints and training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from saesweep.experiment.convert import INVALID, build_dataclass, convert
from saesweep.experiment.errors import ErrorCollector

DEFAULT_TEMPLATE = "blocks.{layer}.hook_resid_pre"


@dataclass
class ModelSection:
    """The language model whose activations the SAEs learn."""

    name: str = "smollm2-135m"
    """Model to load: "smollm2-135m" (the embedded SmolLM2-135M), a Hugging Face Hub
    name such as "gpt2", or a local Hugging Face model folder."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the model weights and of the served activations."""
    device: str = "cpu"
    """Torch device of the activation servers' model: "cpu", "cuda" or "cuda:N"."""
    random_weights: bool = False
    """Build the model's architecture with seeded random weights instead of loading
    trained ones. Offline, "gpt2" with random weights exercises the GPT-2 code path."""
    seed: int = 0
    """Seed of the random weights (used only with random_weights)."""
    load_options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the model loader, e.g. {revision: main}. They are
    saved in each SAE's cfg.json as model_from_pretrained_kwargs, so a Hub token
    must not be here. Set the HF_TOKEN environment variable instead."""


@dataclass
class DataSection:
    """The text the model reads to produce activations."""

    dataset: str = "embedded"
    """"embedded" (the Shakespeare texts shipped with saesweep), a
    Hugging Face Hub dataset name (streamed), or local .txt, .jsonl or .parquet
    files or a folder of them. Relative paths start at the working directory."""
    hub_config: str | None = None
    """Configuration name of a Hub dataset that has several, e.g. wikitext-103-raw-v1."""
    text_column: str = "text"
    """Column that contains the text, for Hub, JSONL and Parquet datasets."""
    heldout_fraction: float = 0.05
    """Share of the documents held out for evaluation. Training never reads them."""
    context_size: int = 128
    """Tokens per sequence fed to the model."""
    shuffle: bool = True
    """Shuffle the packed sequences (seeded by `seed`)."""
    seed: int = 0
    """Seed of the shuffle and of the split between training and held-out text."""
    prepend_bos: bool | None = None
    """Prepend the BOS token to each sequence. Null takes the model's own policy:
    GPT-2 prepends it, and SmolLM2 does not because its BOS is a chat token."""


@dataclass
class LayerRange:
    """Layers start, start + step, ... up to but not including stop, as Python's range."""

    stop: int
    """First layer not included."""
    start: int = 0
    """First layer included."""
    step: int = 1
    """Distance between consecutive layers."""

    def layers(self) -> list[int]:
        return list(range(self.start, self.stop, self.step))


class Layers:
    """YAML form of `hookpoints.layers`: a list of indices or a `{start, stop, step}` range."""

    yaml_type_name = "a list of layer indices or a mapping {start, stop, step}"
    mapping_form = LayerRange
    """Dataclass of the mapping form, whose fields document `layers.start` etc."""

    @classmethod
    def from_yaml(cls, value: Any, path: str, errors: ErrorCollector, help: str = "") -> Any:
        if isinstance(value, dict):
            return build_dataclass(LayerRange, value, path, errors)
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        return convert(value, list[int], path, errors, help)


@dataclass
class HookpointsSection:
    """The hookpoints to train SAEs on: an explicit list of hook names, or layers
    filled into a template.

    YAML forms: `hookpoints: [blocks.3.hook_resid_pre, ...]`, or
    `hookpoints: {layers: [3, 9], template: "blocks.{layer}.hook_resid_pre"}`,
    or `layers: {start: 0, stop: 12}` for a range.
    """

    names: list[str] | None = None
    """Hook names, e.g. blocks.3.hook_resid_pre (TransformerLens naming)."""
    layers: Layers | None = None
    """Layer indices filled into `template`: a list, or {start, stop, step} with
    stop excluded as in Python's range."""
    template: str = DEFAULT_TEMPLATE
    """Hook name with a {layer} placeholder, used with `layers`."""
    listed: bool = field(default=False, init=False, repr=False, compare=False)
    """Whether the file gave the hook names as a plain list (for error paths)."""

    yaml_type_name = "a list of hook names or a mapping with layers and template"

    @classmethod
    def from_yaml(cls, value: Any, path: str, errors: ErrorCollector, help: str = "") -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            names = convert(value, list[str], path, errors, help)
            if names is INVALID:
                return INVALID
            section = cls(names=names)
            section.listed = True
            return section
        return build_dataclass(cls, value, path, errors)

    def layer_indices(self) -> list[int]:
        """Return the layers given by `layers`, or [] when hook names are listed."""
        if self.layers is None:
            return []
        if isinstance(self.layers, LayerRange):
            return self.layers.layers()
        return list(self.layers)

    def resolve(self) -> list[str]:
        """Return the hook names, in the order given."""
        if self.names is not None:
            return list(self.names)
        return [self.template.format(layer=layer) for layer in self.layer_indices()]

    def to_yaml(self) -> Any:
        if self.names is not None:
            return list(self.names)
        layers = self.layers
        if isinstance(layers, LayerRange):
            layers = {"start": layers.start, "stop": layers.stop, "step": layers.step}
        return {"layers": layers, "template": self.template}


@dataclass
class TrainingSection:
    """Training settings of each trial."""

    tokens_per_trial: int = 2_000_000
    """Activation vectors (one per token position) each trial trains on."""
    batch_size_tokens: int = 4096
    """Activation vectors per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of Adam."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Shape of the learning-rate decay after warm-up. constant keeps lr, while
    linear and cosine decay it to zero over the last lr_decay_steps steps."""
    lr_warmup_steps: int = 0
    """Steps over which the learning rate rises linearly from zero to lr."""
    lr_decay_steps: int | None = None
    """Steps at the end of training over which lr decays (linear and cosine only).
    Null decays over every step after warm-up."""
    sparsity_warmup_steps: int = 0
    """Steps over which the sparsity coefficient (l1_coefficient, l0_coefficient)
    rises linearly from zero to its value."""
    grad_clip_norm: float | None = 1.0
    """Maximum gradient norm, or null to disable clipping."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's beta1 and beta2."""
    dead_latent_window_tokens: int = 1_000_000
    """A latent that has not fired on any of the last this many tokens counts as dead."""
    log_every_steps: int = 50
    """Steps between metric reports to Tune and MLflow."""
    checkpoint_every_steps: int = 500
    """Steps between Tune checkpoints. With 0, a trial saves only its final SAE and
    a checkpoint on SIGTERM."""
    autocast: bool = False
    """Train under bfloat16 autocast: the SAE's matmuls run in bfloat16, while its
    weights, the optimizer state and the held-out evaluation stay in sae.dtype. It
    pays on GPUs and on CPUs with bfloat16 matrix units; see BENCHMARKS.md."""
    sparse_decoder: bool = True
    """Train topk and batchtopk SAEs without multiplying the dense [batch, d_sae]
    latents by W_dec: the reconstruction sums only the W_dec rows of the selected
    latents (torch embedding_bag), and AuxK multiplies only the dead latents'
    columns. Losses and gradients match the dense decoder up to float rounding.
    Other architectures ignore it. Turn it off where dense matmuls beat the row
    gather, which may be the case on a GPU (measured so far on CPUs only). The
    dense-decoder lever of benchmarks/trial_overhead.py measures both ways."""
    eval_tokens: int = 100_000
    """Held-out activation vectors used for the final evaluation of each SAE, or 0 to
    skip the evaluation."""
    ce_eval_tokens: int = 0
    """Held-out tokens on which each finished SAE is spliced into the model to measure
    CE loss and KL scores (heldout_ce_loss_score, heldout_kl_div_score). Each trial
    costs four forward passes of the whole model over them on the evaluation server;
    0 skips it."""
    ce_eval_trials: Literal["all", "champions"] = "all"
    """SAEs that the spliced evaluation scores: "all" scores every trial's final SAE,
    "champions" only the champion of each hookpoint, after the sweep. The champion
    policy must then not read ce_loss_* or kl_div_* metrics."""
    seed: int = 0
    """Seed of the SAE initialization and of the trial's shuffle buffer."""

    @property
    def total_steps(self) -> int:
        """Optimizer steps of one trial."""
        if self.batch_size_tokens <= 0:
            return 0
        return math.ceil(self.tokens_per_trial / self.batch_size_tokens)
