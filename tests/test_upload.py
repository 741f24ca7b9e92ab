"""Staging champion SAEs from a real MLflow registry, and the Hub push through a recording client."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import sae_lens
import torch
import yaml
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from saesweep import SAE, SAEConfig
from saesweep.experiment import ChampionSection
from saesweep.sweep.runner import TrialOutcome
from saesweep.tracking.champions import choose_champions, register_champions, registered_model_name
from saesweep.tracking.upload import (
    CARD_FILENAME,
    NoChampionsError,
    run_upload,
    stage_champions,
    staged_files,
    upload,
)

MODEL = "smollm2-135m"
EXPERIMENT = "upload-test"
HOOK_1 = "blocks.1.hook_resid_pre"
HOOK_3 = "blocks.3.hook_resid_pre"
OTHER_HOOK = "blocks.5.hook_resid_pre"
D_IN, D_SAE = 32, 128
# A stand-in Hub token; the tests check that it never reaches a file, a log or the output.
SECRET = "hf_saesweepTestTokenDoNotLeak0123456789"
SAE_FILES = ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"]


class RecordingHubApi:
    """Stand-in for huggingface_hub.HfApi that records each call and the folder contents it was given."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.sent: dict[str, str] = {}

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        self.sent = folder_digest(Path(kwargs["folder_path"]))


def folder_digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder`."""
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in staged_files(folder)}


def make_sae(architecture: str, hookpoint: str, seed: int, **fields) -> SAE:
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        seed=seed,
        model_name=MODEL,
        hook_name=hookpoint,
        context_size=64,
        prepend_bos=False,
        dataset_path="embedded",
        model_from_pretrained_kwargs={"revision": "main", "token": SECRET},
        metadata={"served_positions": "no padding, BOS, separator or position 0"},
        **fields,
    )
    sae = SAE.from_config(cfg)
    with torch.no_grad():
        sae.b_enc.uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def outcome(trial_id, hookpoint, architecture, coefficient, l0, explained_variance, folder, ce_loss_score=None):
    config = {"hookpoint": hookpoint, "architecture": architecture, "expansion_factor": D_SAE // D_IN}
    config.update({"l1_coefficient": None, "l0_coefficient": None, "k": None})
    config["k" if architecture == "topk" else "l1_coefficient"] = coefficient
    metrics = {
        "heldout_l0": l0,
        "heldout_explained_variance": explained_variance,
        "heldout_mse": 0.125,
        "heldout_l1": 4.0,
        "heldout_eval_tokens": 1024.0,
        "tokens_trained": 6144.0,
        "dead_latents_frac": 0.25,
    }
    if ce_loss_score is not None:
        metrics["heldout_ce_loss_score"] = ce_loss_score
    return TrialOutcome(trial_id, config, metrics, None, str(folder))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A SQLite store with one sweep: 2 hookpoints x 2 trials, champions registered; plus
    a registered model of another experiment and one without a champion."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=str(root / "artifacts"))
    parent = client.create_run(experiment_id, run_name="sweep")

    saes = {
        "t1": make_sae("topk", HOOK_1, seed=1, k=16),
        "t2": make_sae("standard", HOOK_1, seed=2, l1_coefficient=1.0),
        "t3": make_sae("topk", HOOK_3, seed=3, k=16),
        "t4": make_sae("standard", HOOK_3, seed=4, l1_coefficient=2.0),
    }
    outcomes = [
        outcome("t1", HOOK_1, "topk", 16, 16.0, 0.80, root / "t1", ce_loss_score=0.9),
        outcome("t2", HOOK_1, "standard", 1.0, 40.0, 0.70, root / "t2"),
        outcome("t3", HOOK_3, "topk", 16, 16.0, 0.60, root / "t3"),
        outcome("t4", HOOK_3, "standard", 2.0, 30.0, 0.75, root / "t4"),
    ]
    child_runs = {}
    for trial_id, sae in saes.items():
        sparsity = torch.linspace(-4.0, -1.0, D_SAE)
        sae.save_model(root / trial_id, sparsity=sparsity)
        run = client.create_run(
            experiment_id, run_name=trial_id, tags={MLFLOW_PARENT_RUN_ID: parent.info.run_id, "saesweep.tune_trial_id": trial_id}
        )
        client.log_artifacts(run.info.run_id, str(root / trial_id), "sae")
        child_runs[trial_id] = run.info.run_id

    policy = ChampionSection(l0_max=100)
    champions = choose_champions(outcomes, policy)
    register_champions(
        client, experiment=EXPERIMENT, model_name=MODEL, champions=champions, child_runs=child_runs, policy=policy
    )
    # Another experiment's champion, and a registered model of this experiment without one.
    register_champions(
        client,
        experiment="other-experiment",
        model_name=MODEL,
        champions={OTHER_HOOK: outcome("t1", OTHER_HOOK, "topk", 16, 16.0, 0.8, root / "t1")},
        child_runs=child_runs,
        policy=policy,
    )
    client.create_registered_model(
        registered_model_name(MODEL, "blocks.7.hook_resid_pre"),
        tags={"saesweep.experiment": EXPERIMENT, "saesweep.model_name": MODEL, "saesweep.hook_name": "blocks.7.hook_resid_pre"},
    )
    return {"uri": uri, "saes": saes, "champions": {HOOK_1: "t1", HOOK_3: "t4"}, "root": root}


@pytest.fixture(scope="module")
def staged(registry, tmp_path_factory):
    out = tmp_path_factory.mktemp("staged") / "hub"
    return stage_champions(registry["uri"], EXPERIMENT, out, repo_id="someone/smollm2-saes")


def test_staged_layout_is_saelens_hub_layout(staged):
    assert staged_files(staged) == [CARD_FILENAME] + [f"{hook}/{name}" for hook in (HOOK_1, HOOK_3) for name in SAE_FILES]


def test_staged_saes_are_the_champions(registry, staged):
    x = torch.randn(20, D_IN, generator=torch.Generator().manual_seed(0))
    for hookpoint, trial_id in registry["champions"].items():
        original = registry["saes"][trial_id]
        ours = SAE.load_from_disk(staged / hookpoint)
        theirs = sae_lens.SAE.load_from_disk(str(staged / hookpoint))

        assert ours.cfg.hook_name == hookpoint
        assert ours.cfg.architecture == original.cfg.architecture
        with torch.no_grad():
            torch.testing.assert_close(ours(x), original(x))
            torch.testing.assert_close(theirs(x), original(x))


def test_staged_topk_reproduces_registered_l0(registry, staged):
    client = MlflowClient(tracking_uri=registry["uri"])
    version = client.get_model_version_by_alias(registered_model_name(MODEL, HOOK_1), "champion")
    sae = sae_lens.SAE.load_from_disk(str(staged / HOOK_1))
    x = torch.randn(50, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        l0 = (sae.encode(x) != 0).sum(dim=-1).float().mean().item()

    assert l0 == pytest.approx(float(version.tags["metric.heldout_l0"]))


def test_staged_sparsity_matches_saved(registry, staged):
    _, _, sparsity = SAE.from_pretrained(str(staged), HOOK_3)

    torch.testing.assert_close(sparsity, torch.linspace(-4.0, -1.0, D_SAE))


def test_staged_cfg_drops_credentials(staged):
    for hookpoint in (HOOK_1, HOOK_3):
        cfg = json.loads((staged / hookpoint / "cfg.json").read_text())
        assert cfg["metadata"]["model_from_pretrained_kwargs"] == {"revision": "main"}
        assert SECRET not in (staged / hookpoint / "cfg.json").read_text()


def test_model_card_front_matter_and_metrics(staged):
    text = (staged / CARD_FILENAME).read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)

    assert meta["library_name"] == "saelens"
    assert "sparse-autoencoder" in meta["tags"]
    assert "# Sparse autoencoders for smollm2-135m" in body
    assert 'SAE.from_pretrained("someone/smollm2-saes", "blocks.1.hook_resid_pre")' in body
    assert "highest explained_variance with l0 <= 100, measured on held-out text" in body
    assert f"| {HOOK_1} | topk | {D_SAE} | 4 | k=16 | 6,144 | 0.8000 | 16.0 | 0.125 | 0.9000 | 0.250 |" in body
    assert f"| {HOOK_3} | standard | {D_SAE} | 4 | l1_coefficient=2.0 | 6,144 | 0.7500 | 30.0 | 0.125 | – | 0.250 |" in body


def test_model_card_says_how_trained(staged):
    body = (staged / CARD_FILENAME).read_text()

    assert "- Model: smollm2-135m" in body
    assert "- Dataset: embedded" in body
    assert "- Context size: 64 tokens" in body
    assert "- Positions trained on: no padding, BOS, separator or position 0" in body
    assert f"### {HOOK_3}" in body
    assert "- Architecture: standard (saved as standard), d_in 32, d_sae 128, expansion factor 4" in body
    assert "- Sparsity coefficient: l1_coefficient=2.0" in body
    assert "- Tokens trained: 6,144" in body
    assert f"registered model `saesweep.{MODEL}.{HOOK_3}` version 1" in body
    assert "| heldout_l1 | 4 |" in body


def test_other_experiments_are_left_out(staged):
    assert not (staged / OTHER_HOOK).exists()
    assert not (staged / "blocks.7.hook_resid_pre").exists()
    assert OTHER_HOOK not in (staged / CARD_FILENAME).read_text()


def test_unknown_experiment_names_known_ones(registry, tmp_path):
    with pytest.raises(NoChampionsError, match="other-experiment") as error:
        stage_champions(registry["uri"], "no-such-experiment", tmp_path / "out")

    assert "upload-test" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_restaging_replaces_earlier_staging(registry, tmp_path):
    out = tmp_path / "hub"
    stage_champions(registry["uri"], EXPERIMENT, out)
    (out / "blocks.9.hook_resid_pre").mkdir()
    (out / "blocks.9.hook_resid_pre" / "cfg.json").write_text("{}")
    stage_champions(registry["uri"], EXPERIMENT, out)

    assert sorted(p.name for p in out.iterdir()) == sorted([CARD_FILENAME, HOOK_1, HOOK_3])


def test_staging_keeps_foreign_folder(registry, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")

    with pytest.raises(FileExistsError, match="remove it or pass another out_dir"):
        stage_champions(registry["uri"], EXPERIMENT, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_push_sends_exactly_staged_folder(staged):
    api = RecordingHubApi()
    files = upload(staged, "someone/smollm2-saes", dry_run=False, api=api)

    assert files == staged_files(staged)
    assert [name for name, _ in api.calls] == ["create_repo", "upload_folder"]
    create, push = api.calls[0][1], api.calls[1][1]
    assert create == {"repo_id": "someone/smollm2-saes", "repo_type": "model", "exist_ok": True}
    assert Path(push["folder_path"]) == staged
    assert push["repo_id"] == "someone/smollm2-saes"
    assert push["repo_type"] == "model"
    # No filters and no subfolder: the repository receives the folder as staged.
    for option in ("path_in_repo", "allow_patterns", "ignore_patterns", "delete_patterns"):
        assert push.get(option) is None, option
    assert api.sent == folder_digest(staged)
    assert sorted(api.sent) == files


def test_dry_run_sends_nothing(staged):
    api = RecordingHubApi()
    files = upload(staged, "someone/smollm2-saes", dry_run=True, api=api)

    assert files == staged_files(staged)
    assert api.calls == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad..name/x", ""])
def test_invalid_repo_id_rejected(staged, repo_id):
    with pytest.raises(ValueError, match="invalid Hub repository id"):
        upload(staged, repo_id, dry_run=True, api=RecordingHubApi())


def test_push_without_token_explains_login(staged, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))

    with pytest.raises(PermissionError, match="set HF_TOKEN or log in"):
        upload(staged, "someone/smollm2-saes", dry_run=False)


def test_staged_token_blocks_push(staged, monkeypatch, tmp_path):
    copy = tmp_path / "hub"
    for name in staged_files(staged):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((staged / name).read_bytes())
    (copy / CARD_FILENAME).write_text((copy / CARD_FILENAME).read_text() + f"\ntoken {SECRET}\n")
    monkeypatch.setenv("HF_TOKEN", SECRET)
    api = RecordingHubApi()

    with pytest.raises(ValueError, match="contains the Hugging Face token") as error:
        upload(copy, "someone/smollm2-saes", dry_run=False, api=api)
    assert SECRET not in str(error.value)
    assert api.calls == []


def test_run_upload_never_shows_token(registry, monkeypatch, tmp_path, caplog, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    caplog.set_level(logging.DEBUG)
    lines: list[str] = []
    api = RecordingHubApi()

    code = run_upload(EXPERIMENT, "someone/smollm2-saes", False, registry["uri"], tmp_path / "hub", write=lines.append, api=api)

    assert code == 0
    assert api.sent == folder_digest(tmp_path / "hub")
    captured = capsys.readouterr()
    for text in ("\n".join(lines), caplog.text, captured.out, captured.err):
        assert SECRET not in text
    for name in staged_files(tmp_path / "hub"):
        assert SECRET.encode() not in (tmp_path / "hub" / name).read_bytes()


def test_run_upload_dry_run_lists_files(registry, tmp_path):
    lines: list[str] = []

    code = run_upload(EXPERIMENT, "someone/smollm2-saes", True, registry["uri"], tmp_path / "hub", write=lines.append)

    assert code == 0
    assert f"would upload 7 file(s) from {tmp_path / 'hub'} to the Hub model repository someone/smollm2-saes:" in lines
    listed = [line.split(" (")[0].strip() for line in lines if line.startswith("  ")]
    assert listed == staged_files(tmp_path / "hub")


def test_run_upload_error_codes(registry, tmp_path):
    lines: list[str] = []
    missing_store = f"sqlite:///{tmp_path / 'missing.db'}"

    assert run_upload(EXPERIMENT, "someone/x", True, missing_store, tmp_path / "a", write=lines.append) == 2
    assert "missing.db not found" in lines[-1]
    assert not (tmp_path / "missing.db").exists()
    assert run_upload("nope", "someone/x", True, registry["uri"], tmp_path / "b", write=lines.append) == 1
    assert "no registered model tagged saesweep.experiment='nope'" in lines[-1]
    assert run_upload(EXPERIMENT, "not a repo", True, registry["uri"], tmp_path / "c", write=lines.append) == 2
    assert "invalid Hub repository id 'not a repo'" in lines[-1]


def test_staging_leaves_no_stray_store(registry, tmp_path, monkeypatch):
    # A "models:/" URI resolved against MLflow's default registry would create
    # ./mlflow.db; staging must read only the store it is given.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    stage_champions(registry["uri"], EXPERIMENT, tmp_path / "hub")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["hub"]
