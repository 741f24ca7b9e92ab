"""The model card (README.md) of a staged Hub upload of champion SAEs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

CARD_TAGS = ["saelens", "sparse-autoencoder", "saesweep"]
REPO_PLACEHOLDER = "<user>/<repo>"
NONE_TAG_VALUES = ("", "None", "null")

# Metrics shown in the SAE table, in this order, with their column titles.
SUMMARY_METRICS = (
    ("heldout_explained_variance", "Explained variance", ".4f"),
    ("heldout_l0", "L0", ".1f"),
    ("heldout_mse", "MSE", ".4g"),
    ("heldout_ce_loss_score", "CE loss recovered", ".4f"),
    ("dead_latents_frac", "Dead latents", ".3f"),
)


@dataclass
class ChampionCard:
    """Model card entry of one staged champion SAE."""

    folder: str
    """Folder of the SAE in the repository, named after its hookpoint."""
    registered_model: str
    version: str
    run_id: str | None
    cfg: dict[str, Any]
    """cfg.json of the SAE, as staged."""
    version_tags: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    """Metric name -> value from the version tags (held-out metrics are `heldout_*`)."""

    @property
    def metadata(self) -> dict[str, Any]:
        return self.cfg.get("metadata") or {}

    @property
    def architecture(self) -> str:
        """Return the training architecture, which differs from cfg.json for batchtopk (saved as jumprelu)."""
        return str(self.metadata.get("training_architecture") or self.version_tags.get("architecture") or self.cfg.get("architecture"))

    def coefficient(self) -> str:
        """Return the sparsity coefficient as `name=value`, from the version tags."""
        for name in ("l1_coefficient", "l0_coefficient", "k"):
            value = self.version_tags.get(name)
            if value not in (None, *NONE_TAG_VALUES):
                return f"{name}={value}"
        return "–"

    def expansion_factor(self) -> str:
        tag = self.version_tags.get("expansion_factor")
        if tag not in (None, *NONE_TAG_VALUES):
            return str(tag)
        d_in, d_sae = self.cfg.get("d_in"), self.cfg.get("d_sae")
        return f"{d_sae // d_in}" if isinstance(d_in, int) and isinstance(d_sae, int) and d_in else "–"

    def tokens_trained(self) -> str:
        value = self.metrics.get("tokens_trained")
        return "–" if value is None else f"{int(value):,}"


def _value(metrics: dict[str, float], name: str, spec: str) -> str:
    value = metrics.get(name)
    return "–" if value is None else format(value, spec)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _distinct(cards: Sequence[ChampionCard], key: str) -> str:
    values = sorted({str(card.metadata.get(key)) for card in cards if card.metadata.get(key) is not None})
    return ", ".join(values) if values else "unknown"


def render_model_card(
    cards: Sequence[ChampionCard],
    *,
    experiment: str,
    repo_id: str | None = None,
) -> str:
    """Render README.md: YAML front matter with `library_name: saelens`, the SAE
    table, how to load them, and how each was trained."""
    repo = repo_id or REPO_PLACEHOLDER
    front_matter = yaml.safe_dump({"library_name": "saelens", "tags": CARD_TAGS}, sort_keys=False)
    models = _distinct(cards, "model_name")
    policies = sorted({card.version_tags.get("saesweep.policy", "") for card in cards} - {""})
    lines = [
        "---",
        front_matter.rstrip("\n"),
        "---",
        "",
        f"# Sparse autoencoders for {models}",
        "",
        f"{len(cards)} sparse autoencoder(s) (SAEs) trained by saesweep in the sweep experiment `{experiment}`, "
        "one per hookpoint. Each is the champion of its hookpoint, chosen by this policy: "
        + ("; ".join(policies) if policies else "not recorded")
        + ".",
        "",
        "Each folder holds SAELens v6 files: `cfg.json`, `sae_weights.safetensors` and "
        "`sparsity.safetensors` (log10 firing rate of each latent). Any activation normalization "
        "used in training is folded into the weights, so the SAEs take raw activations.",
        "",
        "## Usage",
        "",
        "```python",
        "from sae_lens import SAE",
        "",
        f'sae = SAE.from_pretrained("{repo}", "{cards[0].folder if cards else "<hookpoint>"}")',
        "```",
        "",
        "## SAEs",
        "",
        "The metrics in this table are measured on held-out text that no SAE was trained on. "
        "Every logged metric of each SAE is listed under Training.",
        "",
    ]
    header = ["Folder", "Architecture", "d_sae", "Expansion factor", "Coefficient", "Tokens trained"]
    header += [title for _, title, _ in SUMMARY_METRICS]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for card in cards:
        row = [
            card.folder,
            card.architecture,
            card.cfg.get("d_sae", "–"),
            card.expansion_factor(),
            card.coefficient(),
            card.tokens_trained(),
        ]
        row += [_value(card.metrics, name, spec) for name, _, spec in SUMMARY_METRICS]
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")

    lines += [
        "",
        "## Training",
        "",
        f"- Model: {models}",
        f"- Dataset: {_distinct(cards, 'dataset_path')}",
        f"- Context size: {_distinct(cards, 'context_size')} tokens",
        f"- Positions trained on: {_distinct(cards, 'served_positions')}",
        "",
    ]
    for card in cards:
        lines += _training_section(card)
    return "\n".join(lines) + "\n"


def _training_section(card: ChampionCard) -> list[str]:
    details = card.metadata.get("training_architecture_details") or {}
    lines = [
        f"### {card.folder}",
        "",
        f"- Model: {card.metadata.get('model_name', 'unknown')}, hookpoint `{card.metadata.get('hook_name', card.folder)}`",
        f"- Dataset: {card.metadata.get('dataset_path', 'unknown')}, context size {card.metadata.get('context_size', 'unknown')}",
        f"- Tokens trained: {card.tokens_trained()}",
        f"- Architecture: {card.architecture} (saved as {card.cfg.get('architecture')}), "
        f"d_in {card.cfg.get('d_in')}, d_sae {card.cfg.get('d_sae')}, expansion factor {card.expansion_factor()}",
        f"- Sparsity coefficient: {card.coefficient()}",
        f"- Architecture settings: `{json.dumps(details, sort_keys=True)}`",
        f"- MLflow: registered model `{card.registered_model}` version {card.version}"
        + (f", run `{card.run_id}`" if card.run_id else ""),
        "",
    ]
    if card.metrics:
        lines += ["| Metric | Value |", "|---|---|"]
        lines += [f"| {_cell(name)} | {value:.6g} |" for name, value in sorted(card.metrics.items())]
        lines.append("")
    return lines
