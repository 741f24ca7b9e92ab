"""Command line: python -m saesweep {prepare,validate,run,resume,upload}."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger("saesweep")


def _add_experiment_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="experiment YAML file, e.g. experiments/quickstart.yaml")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one field; the value is parsed as YAML (repeatable)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="cut tokens, hookpoints and configs down for a quick end-to-end check",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m saesweep",
        description="Train and compare many sparse autoencoders on language-model activations as one Ray job.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("prepare", help="dequantize the embedded model into the cache and check the embedded corpus")

    validate = commands.add_parser("validate", help="check an experiment file without running anything")
    _add_experiment_arguments(validate)

    for name, text in (("run", "run a sweep"), ("resume", "continue an interrupted sweep from its Tune state")):
        command = commands.add_parser(name, help=text)
        _add_experiment_arguments(command)
        command.add_argument(
            "--address",
            default=None,
            help="Ray cluster address; default: RAY_ADDRESS, else a local Ray on 127.0.0.1",
        )
    upload = commands.add_parser(
        "upload", help="stage the champion SAEs of an experiment in the SAELens Hub layout and push them"
    )
    upload.add_argument("--experiment", required=True, help="MLflow experiment name of the sweep")
    upload.add_argument("--repo", required=True, help="Hugging Face Hub model repository, user/repo")
    upload.add_argument("--dry-run", action="store_true", help="write the staged folder and list what would be sent")
    upload.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI; default: MLFLOW_TRACKING_URI, else saesweep_results/mlflow.db",
    )
    upload.add_argument("--out-dir", default=None, help="staging folder; default: saesweep_upload/EXPERIMENT")
    return parser


def _load(args: argparse.Namespace):
    from saesweep.experiment import load_experiment

    exp = load_experiment(args.file, args.overrides)
    return exp.smoke() if args.smoke else exp


def _describe(exp) -> str:
    from saesweep.sweep.space import count_trials, count_tune_trials

    n_saes, n_trials = count_trials(exp), count_tune_trials(exp)
    trials = f"{n_trials} trial(s)" if n_saes == n_trials else f"{n_saes} SAEs in {n_trials} trial(s)"
    return (
        f"experiment {exp.name!r}: model {exp.model.name}, {len(exp.hookpoint_names)} hookpoint(s), "
        f"{trials}, {exp.training.tokens_per_trial:,} tokens per SAE"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from saesweep.experiment import ExperimentError

    try:
        if args.command == "prepare":
            from saesweep.activations.embedded import prepare_all

            prepare_all()
            print("embedded model and corpus are ready")
            return 0

        if args.command == "upload":
            from saesweep.tracking.upload import run_upload

            return run_upload(
                args.experiment,
                args.repo,
                args.dry_run,
                tracking_uri=args.tracking_uri,
                out_dir=args.out_dir,
                write=lambda line: print(line, flush=True),
            )

        exp = _load(args)
        if args.command == "validate":
            print(f"{args.file} is valid: {_describe(exp)}")
            return 0

        from saesweep.sweep.runner import run_sweep

        print(_describe(exp), flush=True)
        result = run_sweep(exp, resume=args.command == "resume", address=args.address, write=lambda line: print(line, flush=True))
        print(f"results: {result.tune_path}")
        return 0 if all(trial.ok for trial in result.trials) else 1
    except ExperimentError as error:
        print(error, file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
