"""Staging champion SAEs from the MLflow model registry and pushing them to the Hugging Face Hub.

`stage_champions` lays out the SAELens Hub layout: one folder per hookpoint
with cfg.json, sae_weights.safetensors and sparsity.safetensors, plus a model
card README.md. `upload` pushes that folder with `HfApi.upload_folder`. The
Hub token comes from HF_TOKEN or the saved Hugging Face login, is read only by
huggingface_hub, and is never logged, printed or written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from saesweep.saes.io import CFG_FILENAME, SPARSITY_FILENAME, WEIGHTS_FILENAME
from saesweep.tracking.champions import CHAMPION_ALIAS, METRIC_TAG_PREFIX
from saesweep.tracking.modelcard import ChampionCard, render_model_card
from saesweep.tracking.settings import SECRET_MARKERS

logger = logging.getLogger(__name__)

EXPERIMENT_TAG = "saesweep.experiment"
HOOK_NAME_TAG = "saesweep.hook_name"
REGISTERED_MODEL_PREFIX = "saesweep."
CARD_FILENAME = "README.md"
SAE_FILENAMES = (CFG_FILENAME, WEIGHTS_FILENAME, SPARSITY_FILENAME)
DEFAULT_UPLOAD_ROOT = "saesweep_upload"


class NoChampionsError(LookupError):
    """No registered model of the experiment has a champion version."""


def _search_models(client: MlflowClient) -> list[Any]:
    """Return every registered model whose name starts with `saesweep.`, across result pages."""
    models: list[Any] = []
    token = None
    while True:
        page = client.search_registered_models(
            filter_string=f"name LIKE '{REGISTERED_MODEL_PREFIX}%'", max_results=1000, page_token=token
        )
        models.extend(page)
        token = page.token
        if not token:
            return models


def _champion_version(client: MlflowClient, name: str) -> Any | None:
    try:
        return client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _redact(options: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Return a copy of `options` without credential values, and whether any was removed."""
    result: dict[str, Any] = {}
    removed = False
    for key, value in options.items():
        if any(marker in str(key).lower() for marker in SECRET_MARKERS):
            removed = True
            continue
        if isinstance(value, dict):
            value, inner = _redact(value)
            removed = removed or inner
        result[key] = value
    return result, removed


def _clean_cfg(path: Path) -> dict[str, Any]:
    """Read a staged cfg.json and drop credentials from its model load options."""
    cfg = json.loads(path.read_text())
    metadata = cfg.get("metadata") or {}
    for holder in (cfg, metadata):
        options = holder.get("model_from_pretrained_kwargs")
        if isinstance(options, dict):
            cleaned, removed = _redact(options)
            if removed:
                holder["model_from_pretrained_kwargs"] = cleaned
                logger.warning("%s: removed credential options from model_from_pretrained_kwargs", path)
                path.write_text(json.dumps(cfg, indent=2))
    return cfg


def _prepare_out_dir(out_dir: Path) -> None:
    """Make `out_dir` an empty folder, replacing an earlier staging but nothing else."""
    if not out_dir.exists():
        out_dir.mkdir(parents=True)
        return
    if not out_dir.is_dir():
        raise NotADirectoryError(f"staging folder {out_dir} is a file: pass another out_dir")
    entries = list(out_dir.iterdir())
    if not entries:
        return
    if not is_staged_folder(out_dir):
        raise FileExistsError(
            f"staging folder {out_dir} is not empty and does not hold an earlier staging: "
            "remove it or pass another out_dir"
        )
    logger.info("replacing the earlier staging in %s", out_dir)
    for entry in entries:
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def is_staged_folder(folder: Path) -> bool:
    """True when `folder` holds only a model card with `library_name: saelens` and SAE folders."""
    card = folder / CARD_FILENAME
    if not card.is_file() or "library_name: saelens" not in card.read_text(errors="replace"):
        return False
    for entry in folder.iterdir():
        if entry == card:
            continue
        if not entry.is_dir() or not all(f.name in SAE_FILENAMES for f in entry.iterdir()):
            return False
    return True


def _stage_one(client: MlflowClient, tracking_uri: str, model: Any, version: Any, folder: Path) -> dict[str, Any]:
    """Download one champion version into `folder` and return its cfg.json."""
    import mlflow.artifacts

    # NOTE: mlflow 3.17 resolves "models:/name@alias" URIs against the global
    # registry URI even when download_artifacts gets tracking_uri, so the
    # version's own download URI is used instead.
    source = client.get_model_version_download_uri(model.name, version.version)
    with tempfile.TemporaryDirectory() as scratch:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=tracking_uri, dst_path=scratch))
        for required in (CFG_FILENAME, WEIGHTS_FILENAME):
            if not (local / required).is_file():
                raise FileNotFoundError(
                    f"{model.name} version {version.version} ({source}) has no {required}: "
                    "its source must be an SAE folder saved by saesweep; register another version"
                )
        folder.mkdir(parents=True)
        for name in SAE_FILENAMES:
            if (local / name).is_file():
                shutil.copyfile(local / name, folder / name)
            else:
                logger.warning("%s version %s has no %s, so the staged folder lacks it", model.name, version.version, name)
    return _clean_cfg(folder / CFG_FILENAME)


def stage_champions(
    tracking_uri: str,
    experiment_name: str,
    out_dir: str | Path,
    *,
    repo_id: str | None = None,
) -> Path:
    """Download the champion SAE of every hookpoint of `experiment_name` into `out_dir`.

    Finds the registered models tagged `saesweep.experiment=<experiment_name>`,
    downloads each one's `champion` version into `out_dir/<hookpoint>/`, and
    writes the model card `out_dir/README.md`; `repo_id` appears in its usage
    example. `out_dir` must be absent, empty, or an earlier staging, which is
    replaced. Raises NoChampionsError when no model has a champion.
    """
    out_dir = Path(out_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    models = _search_models(client)
    mine = [m for m in models if m.tags.get(EXPERIMENT_TAG) == experiment_name]
    champions = []
    for model in mine:
        hookpoint = model.tags.get(HOOK_NAME_TAG)
        if not hookpoint:
            logger.warning("registered model %s has no %s tag: skipped", model.name, HOOK_NAME_TAG)
            continue
        version = _champion_version(client, model.name)
        if version is None:
            logger.warning("registered model %s has no %r alias: skipped", model.name, CHAMPION_ALIAS)
            continue
        champions.append((hookpoint, model, version))
    if not champions:
        experiments = sorted({m.tags[EXPERIMENT_TAG] for m in models if EXPERIMENT_TAG in m.tags})
        raise NoChampionsError(
            f"no registered model tagged {EXPERIMENT_TAG}={experiment_name!r} has a {CHAMPION_ALIAS!r} version "
            f"in {tracking_uri}; experiments with registered SAEs there: {experiments or 'none'}. "
            "Run the sweep with MLflow enabled, or check the experiment name and the tracking URI"
        )
    hookpoints = [hookpoint for hookpoint, _, _ in champions]
    duplicates = sorted({h for h in hookpoints if hookpoints.count(h) > 1})
    if duplicates:
        names = [model.name for hookpoint, model, _ in champions if hookpoint in duplicates]
        raise ValueError(
            f"several registered models of {experiment_name!r} are for hookpoint(s) {duplicates}: {names}. "
            "Upload one model at a time: give each model's sweep its own experiment name"
        )

    _prepare_out_dir(out_dir)
    cards = []
    for hookpoint, model, version in sorted(champions, key=lambda item: _natural_key(item[0])):
        cfg = _stage_one(client, tracking_uri, model, version, out_dir / hookpoint)
        saved_hook = (cfg.get("metadata") or {}).get("hook_name", cfg.get("hook_name"))
        if saved_hook != hookpoint:
            raise ValueError(
                f"{model.name} version {version.version}: cfg.json has hook_name {saved_hook!r} but the "
                f"registered model is for {hookpoint!r}; register the right SAE folder as the champion"
            )
        cards.append(_card(client, model, version, hookpoint, cfg))
        logger.info("staged %s version %s in %s", model.name, version.version, out_dir / hookpoint)
    (out_dir / CARD_FILENAME).write_text(render_model_card(cards, experiment=experiment_name, repo_id=repo_id))
    return out_dir


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _card(client: MlflowClient, model: Any, version: Any, hookpoint: str, cfg: dict[str, Any]) -> ChampionCard:
    tags = dict(version.tags or {})
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            try:
                metrics[key[len(METRIC_TAG_PREFIX) :]] = float(value)
            except ValueError:
                logger.warning("%s version %s: tag %s=%r is not a number", model.name, version.version, key, value)
    if not metrics and version.run_id:
        # Versions registered without metric tags: read the run's latest metrics.
        metrics = dict(client.get_run(version.run_id).data.metrics)
    return ChampionCard(
        folder=hookpoint,
        registered_model=model.name,
        version=str(version.version),
        run_id=version.run_id,
        cfg=cfg,
        version_tags=tags,
        metrics=metrics,
    )


def staged_files(staged_dir: str | Path) -> list[str]:
    """Return the sorted paths, relative to `staged_dir` and with / separators, of every file in it."""
    root = Path(staged_dir)
    return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())


def _check_staged(staged_dir: Path) -> list[str]:
    if not staged_dir.is_dir():
        raise FileNotFoundError(f"staged folder {staged_dir} not found: run stage_champions first")
    files = staged_files(staged_dir)
    if CARD_FILENAME not in files or not any(name.endswith("/" + CFG_FILENAME) for name in files):
        raise ValueError(
            f"{staged_dir} is not a staged upload: it needs {CARD_FILENAME} and one folder per hookpoint "
            f"with {CFG_FILENAME}; stage it with stage_champions"
        )
    return files


def validate_repo(repo_id: str) -> None:
    """Raise ValueError unless `repo_id` is a Hub model repository id "user/repo"."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: {error}") from error
    if repo_id.count("/") != 1:
        raise ValueError(f"invalid Hub repository id {repo_id!r}: use the form user/repo or org/repo")


def _check_token_absent(staged_dir: Path, files: list[str], token: str | None) -> None:
    """Raise ValueError when a staged text file (the model card, cfg.json) contains the Hub token.

    Weight files are not read: they can be gigabytes, and saesweep writes no metadata into them.
    """
    if not token:
        return
    needle = token.encode()
    for name in files:
        if name.endswith(".safetensors"):
            continue
        if needle in (staged_dir / name).read_bytes():
            raise ValueError(f"staged file {name} contains the Hugging Face token: remove it and stage again")


def upload(staged_dir: str | Path, repo_id: str, *, dry_run: bool, api: Any = None) -> list[str]:
    """Push the staged folder to the Hub model repository `repo_id` and return the files sent.

    The repository is created when it does not exist, then the whole folder
    goes in one `upload_folder` commit. With `dry_run`, nothing is sent and
    the returned list is what would be sent. `api` defaults to
    `huggingface_hub.HfApi()`, which reads the token from HF_TOKEN or the
    saved login. Paths are relative to `staged_dir`, with / separators.
    """
    from huggingface_hub import get_token

    staged_dir = Path(staged_dir)
    validate_repo(repo_id)
    files = _check_staged(staged_dir)
    token = get_token()
    _check_token_absent(staged_dir, files, token)
    total = sum((staged_dir / name).stat().st_size for name in files)
    if dry_run:
        logger.info("dry run: %d file(s), %d bytes, would go to %s", len(files), total, repo_id)
        return files

    if api is None:
        if token is None:
            raise PermissionError(
                "no Hugging Face token: set HF_TOKEN or log in with `hf auth login`, then run the upload again"
            )
        from huggingface_hub import HfApi

        api = HfApi()
    logger.info("uploading %d file(s), %d bytes, to %s", len(files), total, repo_id)
    api.create_repo(repo_id=repo_id, repo_type="model", exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        repo_type="model",
        folder_path=str(staged_dir),
        commit_message=f"Upload {sum(1 for n in files if n.endswith('/' + CFG_FILENAME))} SAE(s) staged by saesweep",
    )
    logger.info("uploaded %s to %s", staged_dir, repo_id)
    return files


def default_tracking_uri() -> str:
    """Return MLFLOW_TRACKING_URI, else the SQLite store that a sweep with default settings writes."""
    from saesweep.experiment import ExperimentConfig, MLflowSection

    output_dir = next(f.default for f in dataclasses.fields(ExperimentConfig) if f.name == "output_dir")
    return MLflowSection().resolve_tracking_uri(output_dir)


def _check_store_exists(tracking_uri: str) -> None:
    """Raise FileNotFoundError for a SQLite store that does not exist, instead of creating it."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        path = Path(tracking_uri[len(prefix) :].split("?", 1)[0])
        if not path.is_file():
            raise FileNotFoundError(
                f"MLflow store {path} not found: pass the tracking URI of the sweep "
                "(--tracking-uri or MLFLOW_TRACKING_URI)"
            )


def run_upload(
    experiment: str,
    repo: str,
    dry_run: bool,
    tracking_uri: str | None = None,
    out_dir: str | Path | None = None,
    *,
    write: Callable[[str], None] | None = None,
    api: Any = None,
) -> int:
    """Stage the champions of `experiment`, push them to `repo`, and return an exit code.

    The command `python -m saesweep upload` runs this. `tracking_uri` defaults
    to `default_tracking_uri()`, `out_dir` to saesweep_upload/<experiment> in
    the working directory. `write` receives the lines for the user (default:
    the log). Returns 0 on success, 1 when nothing was found or the push
    failed, 2 for invalid arguments.
    """
    write = write or logger.info
    tracking_uri = tracking_uri or default_tracking_uri()
    out_dir = Path(out_dir) if out_dir is not None else Path(DEFAULT_UPLOAD_ROOT) / experiment
    try:
        validate_repo(repo)
        _check_store_exists(tracking_uri)
        staged = stage_champions(tracking_uri, experiment, out_dir, repo_id=repo)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError) as error:
        write(f"error: {error}")
        return 2
    except (NoChampionsError, MlflowException) as error:
        write(f"error: {error}")
        return 1
    write(f"staged the champions of {experiment!r} in {staged}")

    try:
        files = upload(staged, repo, dry_run=dry_run, api=api)
    except (ValueError, PermissionError) as error:
        write(f"error: {error}")
        return 2
    except OSError as error:
        # huggingface_hub's HTTP errors derive from OSError. Their text names the URL, never the token.
        write(f"error: upload to {repo} failed: {error}")
        return 1
    verb = "would upload" if dry_run else "uploaded"
    write(f"{verb} {len(files)} file(s) from {staged} to the Hub model repository {repo}:")
    for name in files:
        write(f"  {name} ({os.path.getsize(staged / name):,} bytes)")
    return 0
