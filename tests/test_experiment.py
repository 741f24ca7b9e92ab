"""Experiment files: loading, overrides, the smoke form, and the errors of bad files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from saesweep.experiment import (
    ExperimentConfig,
    ExperimentError,
    field_reference,
    format_reference,
    load_experiment,
    parse_experiment,
)
from saesweep.saes import get_architecture, list_architectures
from saesweep.sweep import count_trials

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"

# A small valid experiment on the offline GPT-2 stand-in (12 layers, d_model 768),
# whose config is read without weights.
BASE = {
    "name": "tiny",
    "model": {"name": "gpt2", "random_weights": True},
    "data": {"dataset": "embedded", "context_size": 64},
    "hookpoints": {"layers": [0, 5], "template": "blocks.{layer}.hook_resid_pre"},
    "search": {
        "architectures": ["topk", "standard"],
        "expansion_factors": [2, 4],
        "k": [16, 32],
        "l1_coefficient": [1.0, 5.0],
    },
    "training": {
        "tokens_per_trial": 65536,
        "batch_size_tokens": 1024,
        "dead_latent_window_tokens": 32768,
    },
    "champion": {"l0_max": 64},
}


def write_experiment(tmp_path: Path, data: dict, name: str = "experiment.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


DELETE = object()


def with_changes(changes: dict[str, object]) -> dict:
    """Return a copy of BASE with dotted `changes` applied; a value of DELETE removes the key."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is DELETE:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def load_errors(path: Path, overrides: tuple[str, ...] = ()) -> ExperimentError:
    with pytest.raises(ExperimentError) as caught:
        load_experiment(path, overrides)
    return caught.value


# --- valid files -------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["quickstart.yaml", "gpt2_all_layers.yaml"])
def test_example_files_validate(file_name):
    exp = load_experiment(EXPERIMENTS / file_name)

    assert isinstance(exp, ExperimentConfig)
    assert exp.hookpoint_names
    assert set(exp.search.architectures) <= set(list_architectures())


def test_gpt2_example_covers_all_layers():
    exp = load_experiment(EXPERIMENTS / "gpt2_all_layers.yaml")

    assert exp.hookpoint_names == [f"blocks.{layer}.hook_resid_pre" for layer in range(12)]
    assert exp.search.architectures == ["standard", "gated", "jumprelu", "topk"]
    assert exp.search.expansion_factors.values == (8, 16, 32)
    assert exp.training.tokens_per_trial >= 100_000_000
    assert 0 < exp.tune.resources_per_trial.gpu < 1
    assert exp.servers.resources.gpu == 1
    assert count_trials(exp) == 12 * 4 * 3 * 3


def test_quickstart_example_is_small():
    exp = load_experiment(EXPERIMENTS / "quickstart.yaml")

    assert exp.model.name == "smollm2-135m"
    assert exp.data.dataset == "embedded"
    assert 2 <= len(exp.hookpoint_names) <= 3
    assert count_trials(exp) <= 4 * len(exp.hookpoint_names)
    assert exp.tune.resources_per_trial.gpu == 0


def test_defaults_filled_in(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, BASE))

    assert exp.hookpoint_names == ["blocks.0.hook_resid_pre", "blocks.5.hook_resid_pre"]
    assert exp.tune.search_alg == "grid"
    assert exp.mlflow_experiment_name == "tiny"
    assert exp.mlflow.experiment_name == "tiny"
    assert exp.sae.normalize_activations == "none"
    assert exp.search.l0_coefficient is None


def test_to_dict_round_trip(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, BASE))
    plain = exp.to_dict()

    assert yaml.safe_load(yaml.safe_dump(plain)) == plain
    assert parse_experiment(plain) == exp
    assert plain["search"]["k"] == [16, 32]
    assert plain["training"]["lr"] == exp.training.lr


def test_layer_range_resolves(tmp_path):
    data = with_changes({"hookpoints.layers": {"start": 0, "stop": 12, "step": 3}})
    exp = load_experiment(write_experiment(tmp_path, data))

    assert exp.hookpoint_names == [f"blocks.{layer}.hook_resid_pre" for layer in (0, 3, 6, 9)]


def test_hook_name_list(tmp_path):
    names = ["blocks.2.hook_resid_post", "blocks.7.hook_mlp_out"]
    exp = load_experiment(write_experiment(tmp_path, with_changes({"hookpoints": names})))

    assert exp.hookpoint_names == names
    assert exp.to_dict()["hookpoints"] == names


def test_numbers_written_as_strings(tmp_path):
    # PyYAML reads 1e-3 (no dot in the mantissa) as a string.
    text = yaml.safe_dump(with_changes({"training.lr": 0.5}), sort_keys=False)
    text = text.replace("lr: 0.5", "lr: 1e-3")
    path = tmp_path / "strings.yaml"
    path.write_text(text.replace("- 1.0\n", "- 1e-2\n"), encoding="utf-8")
    exp = load_experiment(path)

    assert exp.training.lr == pytest.approx(1e-3)
    assert exp.search.l1_coefficient.values == (0.01, 5.0)


def test_search_value_forms(tmp_path):
    data = with_changes(
        {
            "tune.search_alg": "random",
            "search.k": {"loguniform": [8, 64]},
            "search.l1_coefficient": {"choice": [1, 2]},
            "search.expansion_factors": 4,
        }
    )
    exp = load_experiment(write_experiment(tmp_path, data))

    assert exp.search.k.kind == "loguniform"
    assert exp.search.k.values == (8, 64)
    assert exp.search.l1_coefficient.kind == "choice"
    assert exp.search.l1_coefficient.values == (1.0, 2.0)
    assert exp.search.expansion_factors.values == (4,)


# --- overrides ---------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path):
    path = write_experiment(tmp_path, BASE)
    exp = load_experiment(
        path,
        [
            "training.lr=1e-3",
            "search.k=[8, 64]",
            "hookpoints.layers=[1, 2, 3]",
            "mlflow.tracking_uri=http://127.0.0.1:5000",
            "tune.resources_per_trial.gpu=0.5",
        ],
    )

    assert exp.training.lr == pytest.approx(1e-3)
    assert exp.search.k.values == (8, 64)
    assert exp.hookpoint_names == [f"blocks.{layer}.hook_resid_pre" for layer in (1, 2, 3)]
    assert exp.mlflow.tracking_uri == "http://127.0.0.1:5000"
    assert exp.tune.resources_per_trial.gpu == 0.5


def test_override_errors_name_the_override(tmp_path):
    path = write_experiment(tmp_path, BASE)
    error = load_errors(path, ("training.lr", "training.batch_size_tokens=-5"))

    paths = [item.path for item in error.errors]
    assert "--set training.lr" in paths
    assert "training.batch_size_tokens" in paths
    message = error.messages[paths.index("training.batch_size_tokens")]
    assert "-5" in message
    assert "--set training.batch_size_tokens" in message


def test_override_into_list_section(tmp_path):
    path = write_experiment(tmp_path, with_changes({"hookpoints": ["blocks.0.hook_resid_pre"]}))
    error = load_errors(path, ("hookpoints.layers=[1]",))

    assert error.errors[0].path == "hookpoints.layers"
    assert "hookpoints is not a mapping" in error.messages[0]


# --- smoke form --------------------------------------------------------------------


@pytest.mark.parametrize("file_name", ["quickstart.yaml", "gpt2_all_layers.yaml"])
def test_smoke_is_small_and_valid(file_name):
    exp = load_experiment(EXPERIMENTS / file_name)
    smoke = exp.smoke()

    assert smoke.name == exp.name + "-smoke"
    assert smoke.mlflow_experiment_name.endswith("-smoke")
    assert smoke.hookpoint_names == exp.hookpoint_names[:1]
    assert count_trials(smoke) <= 2
    assert smoke.training.tokens_per_trial <= 16 * 512
    assert smoke.training.eval_tokens <= 2048
    assert smoke.model == exp.model
    # The smoke form is itself a valid experiment.
    assert parse_experiment(smoke.to_dict()) == smoke
    # The original is unchanged.
    assert exp.training.tokens_per_trial > smoke.training.tokens_per_trial


def test_smoke_keeps_optuna(tmp_path):
    data = with_changes(
        {
            "tune.search_alg": "optuna",
            "search.k": {"loguniform": [8, 64]},
            "search.l1_coefficient": {"choice": [1.0, 5.0]},
            "search.expansion_factors": {"choice": [2, 4]},
            "search.num_samples": 5,
        }
    )
    smoke = load_experiment(write_experiment(tmp_path, data)).smoke()

    assert smoke.tune.search_alg == "optuna"
    assert smoke.search.k.values == (23,)
    assert smoke.search.expansion_factors.values == (2,)
    assert count_trials(smoke) == 2
    assert parse_experiment(smoke.to_dict()) == smoke


# --- MLflow tracking URI -----------------------------------------------------------


def test_tracking_uri_precedence(tmp_path):
    exp = load_experiment(write_experiment(tmp_path, BASE))
    mlflow = exp.mlflow

    default = mlflow.resolve_tracking_uri(tmp_path, environ={})
    assert default == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert mlflow.resolve_artifact_location(tmp_path, environ={}).startswith("file://")

    mlflow.tracking_uri = "http://127.0.0.1:5001"
    assert mlflow.resolve_tracking_uri(tmp_path, environ={}) == "http://127.0.0.1:5001"
    assert mlflow.resolve_artifact_location(tmp_path, environ={}) is None

    environ = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5002"}
    assert mlflow.resolve_tracking_uri(tmp_path, environ=environ) == "http://127.0.0.1:5002"


# --- bad files ---------------------------------------------------------------------

# (case id, changes to BASE, YAML path, value as shown, words of the fix)
BAD_FILES = [
    ("unknown key", {"training.batch_size": 4096},
     "training.batch_size", "4096", "did you mean `batch_size_tokens`"),
    ("unknown section", {"serverz": {"count": 2}},
     "serverz", "{'count': 2}", "did you mean `servers`"),
    ("unknown sae field", {"sae.jumprelu_bandwith": 0.1},
     "sae.jumprelu_bandwith", "0.1", "did you mean `jumprelu_bandwidth`"),
    ("wrong type", {"training.lr": "fast"},
     "training.lr", "'fast'", "write a number"),
    ("bool for integer", {"training.seed": True},
     "training.seed", "True", "write an integer"),
    ("k above d_sae", {"search.expansion_factors": [1, 2], "search.k": [64, 1024]},
     "search.k", "[64, 1024]", "use values up to 768"),
    ("negative coefficient", {"search.l1_coefficient": [-1.0, 5.0]},
     "search.l1_coefficient", "[-1.0, 5.0]", "use positive values"),
    ("layer beyond model", {"hookpoints.layers": [0, 40]},
     "hookpoints.layers[1]", "40", "use layers 0 to 11"),
    ("range beyond model", {"hookpoints.layers": {"start": 0, "stop": 13}},
     "hookpoints.layers.stop", "13", "use stop: 12"),
    ("unknown hook name", {"hookpoints": ["blocks.0.hook_resid_pree"]},
     "hookpoints[0]", "'blocks.0.hook_resid_pree'", "did you mean 'blocks.0.hook_resid_pre'"),
    ("bad template", {"hookpoints.template": "blocks.{layer}.hook_resid"},
     "hookpoints.template", "'blocks.{layer}.hook_resid'", "did you mean"),
    ("unknown architecture", {"search.architectures": ["topkk", "standard"]},
     "search.architectures[0]", "'topkk'", "did you mean 'topk'"),
    ("missing coefficient", {"search.architectures": ["topk", "jumprelu"]},
     "search.l0_coefficient", "is missing", "add e.g. `l0_coefficient:"),
    ("context too short", {"data.context_size": 1},
     "data.context_size", "1", "use a context such as 128"),
    ("context beyond model", {"data.context_size": 4096},
     "data.context_size", "4096", "use at most 1024"),
    ("batch size zero", {"training.batch_size_tokens": 0},
     "training.batch_size_tokens", "0", "use a positive number"),
    ("grid with loguniform", {"search.l1_coefficient": {"loguniform": [1e-3, 1e-1]}},
     "search.l1_coefficient", "{'loguniform': [0.001, 0.1]}", "set tune.search_alg: random"),
    ("optuna with grid list",
     {"tune.search_alg": "optuna", "search.k": {"choice": [16, 32]},
      "search.l1_coefficient": {"loguniform": [1.0, 5.0]}},
     "search.expansion_factors", "[2, 4]", "write {choice: [2, 4]}"),
    ("grid with num_samples", {"search.num_samples": 4},
     "search.num_samples", "4", "set tune.search_alg: random"),
    ("loguniform out of order", {"tune.search_alg": "random", "search.k": {"loguniform": [64, 8]}},
     "search.k.loguniform", "[64, 8]", "increasing order"),
    ("unknown scheduler", {"tune.scheduler": "hyperband"},
     "tune.scheduler", "'hyperband'", "set one of ['fifo', 'asha']"),
    ("gpu above one not whole", {"tune.resources_per_trial.gpu": 1.5},
     "tune.resources_per_trial.gpu", "1.5", "use 1 or 2"),
    ("decay with constant schedule", {"training.lr_decay_steps": 10},
     "training.lr_decay_steps", "10", "set training.lr_schedule to linear or cosine"),
    ("warm-up longer than training", {"training.lr_warmup_steps": 100},
     "training.lr_warmup_steps", "100", "raise tokens_per_trial"),
    ("asha grace beyond budget", {"tune.scheduler": "asha", "tune.asha.grace_period_tokens": 10**6},
     "tune.asha.grace_period_tokens", "1000000", "a fraction of tokens_per_trial"),
    ("shuffle buffer below batch", {"servers.shuffle_buffer_tokens": 100},
     "servers.shuffle_buffer_tokens", "100", "use at least 1024"),
    ("champion without l0_max", {"champion": {"policy": "max_explained_variance_at_l0"}},
     "champion.l0_max", "is missing", "l0_max: 100"),
    ("weighted champion without weights", {"champion": {"policy": "weighted_score"}},
     "champion.weights", "{}", "set weights"),
    ("missing name", {"name": DELETE},
     "name", "is missing", "add `name:`"),
    ("bad name", {"name": "my sweep!"},
     "name", "'my sweep!'", "'my-sweep'"),
    ("missing hookpoints", {"hookpoints": DELETE},
     "hookpoints", "is missing", "add `hookpoints:`"),
    ("bad device", {"model.device": "gpu"},
     "model.device", "'gpu'", "use cpu, cuda, cuda:N or mps"),
    ("no SAEs per trial", {"tune.saes_per_trial": 0},
     "tune.saes_per_trial", "0", "use 1, or e.g. 4"),
    ("several SAEs per trial with asha",
     {"tune.saes_per_trial": 3, "tune.scheduler": "asha", "tune.asha.grace_period_tokens": 1000},
     "tune.saes_per_trial", "3", "use scheduler fifo"),
]


@pytest.mark.parametrize(
    "changes, path, shown, fix", [case[1:] for case in BAD_FILES], ids=[case[0] for case in BAD_FILES]
)
def test_bad_file(tmp_path, changes, path, shown, fix):
    error = load_errors(write_experiment(tmp_path, with_changes(changes)))

    by_path = {item.path: message for item, message in zip(error.errors, error.messages)}
    assert path in by_path, f"no error at {path}; errors: {error.messages}"
    message = by_path[path]
    assert message.startswith(path)
    assert shown in message
    assert "Fix: " in message
    assert fix in message
    assert len(error.errors) == 1, error.messages


def test_bad_file_table_size():
    assert len(BAD_FILES) >= 10


def test_all_errors_reported_at_once(tmp_path):
    data = with_changes(
        {
            "training.batch_size": 4096,
            "training.lr": -1.0,
            "search.architectures": ["topk", "gatd"],
            "hookpoints.layers": [0, 99],
            "data.context_size": 1,
        }
    )
    error = load_errors(write_experiment(tmp_path, data))

    paths = sorted(item.path for item in error.errors)
    assert paths == sorted(
        [
            "training.batch_size",
            "training.lr",
            "search.architectures[1]",
            "hookpoints.layers[1]",
            "data.context_size",
        ]
    )
    assert str(error).startswith(f"{tmp_path / 'experiment.yaml'}: 5 errors")


def test_message_includes_field_help(tmp_path):
    error = load_errors(write_experiment(tmp_path, with_changes({"training.lr": "fast"})))

    assert "Peak learning rate of Adam" in error.messages[0]


def test_architecture_error_lists_registry(tmp_path):
    data = with_changes({"search.architectures": ["resnet"]})
    message = load_errors(write_experiment(tmp_path, data)).messages[0]

    for architecture in list_architectures():
        assert repr(architecture) in message


def test_token_not_echoed(tmp_path):
    secret = "hf_abcdefghijklmnop"
    data = with_changes({"model.load_options": {"token": secret}})
    error = load_errors(write_experiment(tmp_path, data))

    assert error.errors[0].path == "model.load_options.token"
    assert "HF_TOKEN" in error.messages[0]
    assert secret not in str(error)


def test_duplicate_key(tmp_path):
    path = tmp_path / "duplicate.yaml"
    path.write_text(
        "name: tiny\ntraining:\n  lr: 0.001\n  lr: 0.002\nhookpoints: [blocks.0.hook_resid_pre]\n",
        encoding="utf-8",
    )
    error = load_errors(path)

    assert error.errors[0].path == "training.lr"
    assert "line 4" in error.messages[0]


def test_invalid_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: tiny\ntraining:\n  lr: [0.001\n", encoding="utf-8")
    error = load_errors(path)

    assert error.errors[0].path == "(file)"
    assert "not valid YAML" in error.messages[0]


def test_missing_file(tmp_path):
    error = load_errors(tmp_path / "absent.yaml")

    assert "cannot be read" in error.messages[0]
    assert "absent.yaml" in error.messages[0]


def test_invalid_type_does_not_cascade(tmp_path):
    # An invalid batch size must not also produce errors from checks that read it.
    data = with_changes({"training.batch_size_tokens": "large", "servers.shuffle_buffer_tokens": 10})
    error = load_errors(write_experiment(tmp_path, data))

    assert [item.path for item in error.errors] == ["training.batch_size_tokens"]


# --- field reference ---------------------------------------------------------------


def test_every_field_documented():
    reference = field_reference()

    undocumented = [doc.path for doc in reference if not doc.help]
    assert undocumented == []
    paths = {doc.path for doc in reference}
    assert {"training.lr", "tune.asha.grace_period_tokens", "hookpoints.layers.stop"} <= paths
    assert "search.k.kind" not in paths


def test_reference_follows_registry():
    paths = {doc.path for doc in field_reference()}

    for architecture in list_architectures():
        assert f"search.{get_architecture(architecture).sparsity_coefficient}" in paths
    assert "sae.jumprelu_bandwidth" in paths
    assert "sae.architecture" not in paths
    text = format_reference()
    assert "training.lr (a number; default 0.0003)\n    Peak learning rate of Adam." in text
    assert "name (a string; required)" in text
