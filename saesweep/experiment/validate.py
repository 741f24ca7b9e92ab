"""Checks of an experiment's values against each other and against the model.

`validate_experiment` runs every check and records each problem in an
`ErrorCollector`, so that one run reports all of them. This module checks what
is trained: name, model, data, hookpoints and SAE defaults. `validate_search`
checks the search space. `validate_run` checks the sections that define how
the sweep runs: training, Tune, servers, MLflow and champion.
"""

from __future__ import annotations

import difflib
import functools
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from saesweep.experiment.errors import MISSING, ErrorCollector, suggest
from saesweep.experiment.validate_run import check_run_sections
from saesweep.experiment.validate_search import check_search
from saesweep.saes import SAEConfig, list_architectures

if TYPE_CHECKING:
    from saesweep.activations.models import ModelInfo
    from saesweep.experiment.config import ExperimentConfig

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
DEVICE_PATTERN = re.compile(r"^(cpu|cuda(:\d+)?|mps)$")
# Loader options that carry credentials, which would be saved in every SAE's cfg.json.
SECRET_OPTION_PATTERN = re.compile(r"token|password|secret", re.IGNORECASE)
LOCAL_DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# SAEConfig fields that must be positive or non-negative when the SAE section sets them.
POSITIVE_SAE_FIELDS = (
    "decoder_init_norm",
    "jumprelu_init_threshold",
    "jumprelu_bandwidth",
    "topk_threshold_lr",
    "lp_norm",
    "aux_k",
)
NON_NEGATIVE_SAE_FIELDS = ("aux_k_coefficient", "pre_act_loss_coefficient")


def validate_experiment(
    exp: ExperimentConfig, errors: ErrorCollector, *, check_model: bool = True
) -> ModelInfo | None:
    """Record every problem of `exp` in `errors`, and return the model's info if it was read.

    With `check_model`, the model's config is read (no weights) to check layers,
    hook names, context size and k against d_sae.
    """
    _check_name(exp, errors)
    _check_model(exp, errors)
    info = _read_model_info(exp, errors) if check_model else None
    _check_data(exp, errors, info)
    _check_hookpoints(exp, errors, info)
    _check_sae(exp, errors, info)
    check_search(exp, errors, info)
    check_run_sections(exp, errors)
    return info


def _check_name(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    if exp.name is not None and not NAME_PATTERN.match(exp.name):
        cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", exp.name).strip("-._") or "my-sweep"
        errors.add(
            "name", exp.name, "must start with a letter or digit and contain only letters, "
            "digits, '.', '_' and '-'",
            f"use a name such as {cleaned!r}.",
        )


def _check_model(exp: ExperimentConfig, errors: ErrorCollector) -> None:
    model = exp.model
    if not DEVICE_PATTERN.match(model.device):
        errors.add(
            "model.device", model.device, "is not a torch device name",
            "use cpu, cuda, cuda:N or mps.",
        )
    for key in model.load_options:
        if SECRET_OPTION_PATTERN.search(key):
            errors.add(
                f"model.load_options.{key}", "<hidden>",
                "credentials must not be in an experiment file, which is logged and saved "
                "with every SAE",
                "remove it and set the HF_TOKEN environment variable on the machines instead.",
            )


def _read_model_info(exp: ExperimentConfig, errors: ErrorCollector) -> ModelInfo | None:
    if errors.is_invalid("model"):
        return None
    from saesweep.activations.models import is_gpt2

    model = exp.model
    options = {k: v for k, v in model.load_options.items() if not SECRET_OPTION_PATTERN.search(k)}
    # transformers' GPT2Config() defaults are GPT-2 small's shape, so "gpt2" is
    # checked offline against the random-weight stand-in's config.
    random_weights = model.random_weights or is_gpt2(model.name)
    try:
        return _model_info(model.name, random_weights, options)
    except (OSError, ValueError) as error:
        errors.add(
            "model.name", model.name, f"the model's config cannot be read ({error})",
            "use 'smollm2-135m' (after `python -m saesweep prepare`), a Hub name that this "
            "machine can reach, or a local Hugging Face model folder.",
        )
        return None


def _model_info(name: str, random_weights: bool, options: dict[str, Any]) -> ModelInfo:
    """Return `model_info(...)`, cached per process when the options are hashable."""
    try:
        key = tuple(sorted(options.items()))
        hash(key)
    except TypeError:
        return _read_model_info_uncached(name, random_weights, **options)
    return _cached_model_info(name, random_weights, key)


@functools.lru_cache(maxsize=8)
def _cached_model_info(name: str, random_weights: bool, options: tuple) -> ModelInfo:
    return _read_model_info_uncached(name, random_weights, **dict(options))


def _read_model_info_uncached(name: str, random_weights: bool, **options: Any) -> ModelInfo:
    from saesweep.activations.models import model_info

    return model_info(name, random_weights=random_weights, **options)


def _check_data(exp: ExperimentConfig, errors: ErrorCollector, info: ModelInfo | None) -> None:
    data = exp.data
    if not data.dataset:
        errors.add(
            "data.dataset", data.dataset, "is empty",
            "use 'embedded', a Hub dataset name or a path to local text files.",
        )
    elif data.dataset.endswith(LOCAL_DATA_SUFFIXES) and not Path(data.dataset).exists():
        errors.add(
            "data.dataset", data.dataset,
            f"the file does not exist (relative to {Path.cwd()})",
            "correct the path, or run from the folder that the path is relative to.",
        )
    if not data.text_column:
        errors.add(
            "data.text_column", data.text_column, "is empty", "name the text column, e.g. text.",
        )
    if not 0 < data.heldout_fraction < 1:
        errors.add(
            "data.heldout_fraction", data.heldout_fraction,
            "must be between 0 and 1, both excluded",
            "use e.g. 0.05 to hold out 5% of the documents.",
        )
    if data.context_size < 2:
        errors.add(
            "data.context_size", data.context_size,
            "must be at least 2, because position 0 of every sequence is never served",
            "use a context such as 128 tokens.",
        )
    elif info is not None and data.context_size > info.n_ctx:
        errors.add(
            "data.context_size", data.context_size,
            f"exceeds the {info.n_ctx} positions that model {info.name!r} supports",
            f"use at most {info.n_ctx}.",
        )


def _check_hookpoints(
    exp: ExperimentConfig, errors: ErrorCollector, info: ModelInfo | None
) -> None:
    hookpoints = exp.hookpoints
    if hookpoints is None or errors.is_invalid("hookpoints"):
        return
    if hookpoints.names is not None and hookpoints.layers is not None:
        both = {"names": hookpoints.names, "layers": hookpoints.layer_indices()}
        errors.add(
            "hookpoints", both, "sets both names and layers",
            "keep one: a list of hook names, or layers with a template.",
        )
        return
    if hookpoints.names is None and hookpoints.layers is None:
        errors.add(
            "hookpoints.layers", MISSING, "no hookpoints are selected",
            "set layers, e.g. `layers: [3, 9]`, or list hook names under hookpoints.",
        )
        return
    if hookpoints.names is not None:
        _check_hook_names(hookpoints, errors, info)
    else:
        _check_layers(hookpoints, errors, info)


def _check_hook_names(hookpoints: Any, errors: ErrorCollector, info: ModelInfo | None) -> None:
    prefix = "hookpoints" if hookpoints.listed else "hookpoints.names"
    if not hookpoints.names:
        errors.add(prefix, [], "the list is empty", "list at least one hook name.")
    seen: set[str] = set()
    for index, name in enumerate(hookpoints.names):
        path = f"{prefix}[{index}]"
        if name in seen:
            errors.add(path, name, "is listed twice", "remove the duplicate.")
        seen.add(name)
        if info is not None and name not in info.hook_names:
            errors.add(path, name, *_unknown_hook_message(name, info))


def _unknown_hook_message(name: str, info: ModelInfo) -> tuple[str, str]:
    match = re.match(r"^blocks\.(\d+)\.", name)
    if match and int(match.group(1)) >= info.n_layers:
        return (
            f"layer {match.group(1)} does not exist: model {info.name!r} has "
            f"{info.n_layers} layers",
            f"use layers 0 to {info.n_layers - 1}.",
        )
    close = difflib.get_close_matches(name, info.hook_names, n=1)
    return (
        f"model {info.name!r} has no such hookpoint",
        suggest(
            close[0] if close else None,
            f"use blocks.L.<hook> with L from 0 to {info.n_layers - 1}.",
        ),
    )


def _check_layers(hookpoints: Any, errors: ErrorCollector, info: ModelInfo | None) -> None:
    layers = hookpoints.layers
    if errors.is_invalid("hookpoints.layers"):
        return
    if isinstance(layers, list):
        if not layers:
            errors.add("hookpoints.layers", [], "the list is empty", "list at least one layer.")
        seen: set[int] = set()
        for index, layer in enumerate(layers):
            path = f"hookpoints.layers[{index}]"
            if layer < 0:
                errors.add(path, layer, "layers are numbered from 0", "use a layer index >= 0.")
            elif layer in seen:
                errors.add(path, layer, "is listed twice", "remove the duplicate.")
            elif info is not None and layer >= info.n_layers:
                errors.add(
                    path, layer, f"layer {layer} does not exist: model {info.name!r} has "
                    f"{info.n_layers} layers", f"use layers 0 to {info.n_layers - 1}.",
                )
            seen.add(layer)
    else:
        _check_layer_range(layers, errors, info)
    _check_template(hookpoints, errors, info)


def _check_layer_range(layers: Any, errors: ErrorCollector, info: ModelInfo | None) -> None:
    if layers.start < 0:
        errors.add("hookpoints.layers.start", layers.start, "must be >= 0", "start at 0 or later.")
    if layers.step < 1:
        errors.add("hookpoints.layers.step", layers.step, "must be >= 1", "use step: 1.")
        return
    if layers.stop <= layers.start:
        errors.add(
            "hookpoints.layers.stop", layers.stop,
            f"must be greater than start ({layers.start}), "
            "because stop is excluded as in range()",
            f"use stop: {layers.start + 1} or more.",
        )
        return
    last = layers.layers()[-1]
    if info is not None and last >= info.n_layers:
        errors.add(
            "hookpoints.layers.stop", layers.stop,
            f"the range reaches layer {last}, but model {info.name!r} has "
            f"{info.n_layers} layers", f"use stop: {info.n_layers} (stop is excluded).",
        )


def _check_template(hookpoints: Any, errors: ErrorCollector, info: ModelInfo | None) -> None:
    template = hookpoints.template
    try:
        example = template.format(layer=0)
    except (KeyError, IndexError, ValueError):
        example = None
    if example is None or "{layer}" not in template:
        errors.add(
            "hookpoints.template", template, "must contain {layer} and no other placeholder",
            "write e.g. blocks.{layer}.hook_resid_pre.",
        )
        return
    if info is not None and example not in info.hook_names:
        close = difflib.get_close_matches(example, info.hook_names, n=1)
        suggestion = close[0].replace(".0.", ".{layer}.", 1) if close else ""
        errors.add(
            "hookpoints.template", template, f"gives {example!r}, which model {info.name!r} lacks",
            f"did you mean {suggestion!r}?" if suggestion else "use blocks.{layer}.<hook>.",
        )


def _check_sae(exp: ExperimentConfig, errors: ErrorCollector, info: ModelInfo | None) -> None:
    sae = exp.sae
    from saesweep.saes.config import DTYPES, NORMALIZATIONS

    if sae.dtype not in DTYPES:
        errors.add(
            "sae.dtype", sae.dtype, "is not a supported dtype", f"use one of {sorted(DTYPES)}.",
        )
    if not DEVICE_PATTERN.match(sae.device):
        errors.add(
            "sae.device", sae.device, "is not a torch device name", "use cpu, cuda, cuda:N or mps.",
        )
    if sae.normalize_activations not in NORMALIZATIONS:
        errors.add(
            "sae.normalize_activations", sae.normalize_activations, "is not supported",
            f"use one of {list(NORMALIZATIONS)}.",
        )
    for name in POSITIVE_SAE_FIELDS:
        value = getattr(sae, name, None)
        if value is not None and value <= 0:
            errors.add(
                f"sae.{name}", value, "must be positive", "use a value above 0, or remove it.",
            )
    for name in NON_NEGATIVE_SAE_FIELDS:
        value = getattr(sae, name, None)
        if value is not None and value < 0:
            errors.add(f"sae.{name}", value, "must not be negative", "use 0 or more.")
    if errors.is_invalid("sae"):
        return
    # SAEConfig's own checks, for rules this module does not repeat.
    d_in = info.d_model if info is not None else 768
    try:
        SAEConfig(architecture=list_architectures()[0], d_in=d_in, d_sae=64 * d_in, **vars(sae))
    except (TypeError, ValueError) as error:
        errors.add(
            "sae", vars(sae), f"is rejected by SAEConfig ({error})",
            "correct the value named in that message.",
        )
