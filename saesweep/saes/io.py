"""Reading and writing SAELens v6 files: cfg.json, sae_weights.safetensors,
sparsity.safetensors."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from saesweep.saes.base import SAE
from saesweep.saes.config import INFERENCE_FIELDS, METADATA_FIELDS, SAEConfig
from saesweep.saes.registry import get_architecture, list_architectures

logger = logging.getLogger(__name__)

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"

# The SAELens file format these files follow. SAELens reads metadata.sae_lens_version
# to choose between its pre-6.0 and 6.x config layouts.
SAE_LENS_FORMAT_VERSION = "6.0.0"


def _training_details(sae: SAE) -> dict[str, Any]:
    cfg = sae.cfg
    details: dict[str, Any] = {"seed": cfg.seed, "decoder_init_norm": cfg.decoder_init_norm}
    if cfg.architecture in ("standard", "gated"):
        details["l1_coefficient"] = cfg.l1_coefficient
        if cfg.architecture == "standard":
            details["lp_norm"] = cfg.lp_norm
    elif cfg.architecture == "jumprelu":
        details.update(
            l0_coefficient=cfg.l0_coefficient,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            pre_act_loss_coefficient=cfg.pre_act_loss_coefficient,
        )
    else:
        details.update(k=cfg.k, aux_k=cfg.aux_k, aux_k_coefficient=cfg.aux_k_coefficient)
        if cfg.architecture == "batchtopk":
            details["topk_threshold_lr"] = cfg.topk_threshold_lr
    return details


def sae_cfg_dict(sae: SAE) -> dict[str, Any]:
    """Return the cfg.json contents for `sae` once any activation scale is folded in."""
    from saesweep import __version__

    cfg = sae.cfg
    result: dict[str, Any] = {name: getattr(cfg, name) for name in INFERENCE_FIELDS}
    result["normalize_activations"] = "none"
    result["architecture"] = sae.saved_architecture
    if sae.saved_architecture == "topk":
        result["k"] = int(cfg.k)
        result["rescale_acts_by_decoder_norm"] = False
    metadata: dict[str, Any] = {name: getattr(cfg, name) for name in METADATA_FIELDS}
    if metadata["seqpos_slice"] is not None:
        metadata["seqpos_slice"] = list(metadata["seqpos_slice"])
    metadata.update(cfg.metadata)
    metadata.update(
        sae_lens_version=SAE_LENS_FORMAT_VERSION,
        sae_lens_training_version=None,
        saesweep_version=__version__,
        training_architecture=cfg.architecture,
        training_architecture_details=_training_details(sae),
    )
    if cfg.normalize_activations != "none":
        metadata["folded_activation_norm_scale"] = float(sae.activation_norm_scale)
    result["metadata"] = metadata
    return result


def save_sae(sae: SAE, path: str | Path, sparsity: torch.Tensor | None = None) -> Path:
    """Write `sae` to the folder `path` as SAELens v6 files and return the folder.

    Any activation normalization is folded into the saved weights and biases,
    so the files work on raw activations. `sparsity` [d_sae] is the log10
    firing rate of each latent, written to sparsity.safetensors.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    folded = sae.folded_copy() if sae.cfg.normalize_activations != "none" else sae
    state = {name: tensor.contiguous().cpu() for name, tensor in folded.inference_state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILENAME))
    with open(path / CFG_FILENAME, "w") as f:
        json.dump(sae_cfg_dict(sae), f, indent=2)
    if sparsity is not None:
        if sparsity.shape != (sae.cfg.d_sae,):
            raise ValueError(f"sparsity must have shape [{sae.cfg.d_sae}], got {list(sparsity.shape)}")
        save_file({"sparsity": sparsity.detach().float().contiguous().cpu()}, str(path / SPARSITY_FILENAME))
    return path


def read_cfg(path: str | Path) -> dict[str, Any]:
    """Read cfg.json from the folder `path`."""
    cfg_path = Path(path) / CFG_FILENAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: an SAE folder needs {CFG_FILENAME} and {WEIGHTS_FILENAME}")
    with open(cfg_path) as f:
        return json.load(f)


def load_sae(path: str | Path, device: str | None = None, dtype: str | None = None) -> SAE:
    """Load the SAE in the folder `path` (SAELens v6 files), strictly.

    `device` and `dtype` win over cfg.json. A missing or unexpected tensor, or
    an unknown architecture, raises ValueError naming it and the file.
    """
    path = Path(path)
    cfg_dict = read_cfg(path)
    version = str((cfg_dict.get("metadata") or {}).get("sae_lens_version") or cfg_dict.get("sae_lens_version") or "")
    if not version or int(version.split(".")[0]) < 6:
        raise ValueError(
            f"{path / CFG_FILENAME} has sae_lens_version {version or 'missing'}: only SAELens v6 files "
            "are supported; load it with sae_lens and save it again with save_model"
        )
    architecture = cfg_dict.get("architecture")
    if architecture not in list_architectures():
        raise ValueError(
            f"{path / CFG_FILENAME}: unknown architecture {architecture!r}; "
            f"saesweep reads {list_architectures()}"
        )
    arch_cls = get_architecture(architecture)
    overrides = {key: value for key, value in (("device", device), ("dtype", dtype)) if value is not None}
    cfg = SAEConfig.from_dict({**cfg_dict, **overrides})
    if cfg.normalize_activations != "none":
        logger.warning(
            "%s: normalize_activations=%r with no stored scale; the SAE is applied to raw "
            "activations as SAELens does",
            path,
            cfg.normalize_activations,
        )

    weights_path = path / WEIGHTS_FILENAME
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found")
    with safe_open(str(weights_path), framework="pt", device="cpu") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    expected = arch_cls.parameter_names(cfg_dict)
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    if missing:
        raise ValueError(f"{weights_path}: missing tensor(s) {missing} for architecture {architecture!r}")
    if unexpected:
        raise ValueError(f"{weights_path}: unexpected tensor(s) {unexpected} for architecture {architecture!r}")

    sae = arch_cls(cfg.replace(device="cpu"))
    for name, tensor in tensors.items():
        wanted = tuple(getattr(sae, name).shape)
        if tuple(tensor.shape) != wanted:
            raise ValueError(f"{weights_path}: tensor {name} has shape {list(tensor.shape)}, expected {list(wanted)}")
    sae.load_inference_state_dict({name: t.to(sae.dtype) for name, t in tensors.items()}, cfg_dict)
    return sae.to(cfg.device)


def load_sparsity(path: str | Path) -> torch.Tensor | None:
    """Return the log10 firing rates [d_sae] in sparsity.safetensors, or None without the file."""
    sparsity_path = Path(path) / SPARSITY_FILENAME
    if not sparsity_path.is_file():
        return None
    with safe_open(str(sparsity_path), framework="pt", device="cpu") as f:
        return f.get_tensor("sparsity")


def load_pretrained(
    release: str,
    sae_id: str,
    device: str = "cpu",
    dtype: str | None = None,
    **hub_kwargs: Any,
) -> tuple[SAE, dict[str, Any], torch.Tensor | None]:
    """Load (sae, cfg_dict, sparsity) from a local folder `release`/`sae_id`, or
    from the Hub repository `release` ("user/repo"), folder `sae_id`.

    `hub_kwargs` go to `huggingface_hub.hf_hub_download` (revision, token,
    cache_dir, ...).
    """
    local = Path(release).expanduser()
    if local.is_dir():
        folder = local / sae_id if sae_id else local
    else:
        folder = _download_from_hub(release, sae_id, **hub_kwargs)
    sae = load_sae(folder, device=device, dtype=dtype)
    return sae, read_cfg(folder), load_sparsity(folder)


def _download_from_hub(repo_id: str, sae_id: str, **hub_kwargs: Any) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    prefix = f"{sae_id.strip('/')}/" if sae_id.strip("/") else ""
    cfg_file = hf_hub_download(repo_id=repo_id, filename=prefix + CFG_FILENAME, **hub_kwargs)
    hf_hub_download(repo_id=repo_id, filename=prefix + WEIGHTS_FILENAME, **hub_kwargs)
    try:
        hf_hub_download(repo_id=repo_id, filename=prefix + SPARSITY_FILENAME, **hub_kwargs)
    except EntryNotFoundError:
        logger.info("%s/%s has no %s", repo_id, prefix, SPARSITY_FILENAME)
    return Path(cfg_file).parent
