"""Train several SAEs in one process, each optimizer step on the same activation batch.

Trainers that share a hookpoint read one activation stream. Training them in one
process, one after another on each batch, saves the start-up and the CPU contention
of one process per SAE, and every SAE still trains on exactly the batches it would
get alone. A trainer whose loss diverges drops out and the others continue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch

from saesweep.training.trainer import Report, SAETrainer, TrainingDivergedError, rebatch

logger = logging.getLogger(__name__)

GroupReportFn = Callable[[list[tuple[int, SAETrainer, Report]]], None]
"""Receives (index in the group, trainer, report) for every trainer still training."""

_SHARED_SETTINGS = ("total_tokens", "batch_size", "log_every_steps", "checkpoint_every_steps")


def fit_together(
    trainers: Sequence[SAETrainer],
    batches: Iterable[torch.Tensor],
    *,
    report_fn: GroupReportFn | None = None,
    failed: dict[int, BaseException] | None = None,
) -> dict[int, BaseException]:
    """Train `trainers` on the same batches until their token budget or a stop request.

    Every step runs each trainer's `train_step` on one batch. At a logging or
    checkpoint step each trainer's own `report_fn` receives its `Report`, then
    `report_fn` receives all of them together. `failed` (index -> error) names
    trainers that failed before, for example in a run that is being resumed; they
    are skipped. The dict is updated in place as trainers fail, so a report
    receiver that keeps a reference to it reads the failures so far.

    Returns `failed` with the trainers whose loss diverged added. A group of one
    re-raises its error, and so does a group in which every trainer failed.
    """
    if not trainers:
        raise ValueError("fit_together needs at least one trainer")
    lead_cfg = trainers[0].cfg
    for trainer in trainers[1:]:
        for name in _SHARED_SETTINGS:
            if getattr(trainer.cfg, name) != getattr(lead_cfg, name):
                raise ValueError(
                    f"trainers trained together must share {name}: got {getattr(lead_cfg, name)} "
                    f"and {getattr(trainer.cfg, name)}"
                )
    failed = failed if failed is not None else {}
    active = {index: trainer for index, trainer in enumerate(trainers) if index not in failed}
    if not active:
        raise ValueError("every trainer of the group has failed before; there is nothing to train")
    lead = next(iter(active.values()))
    logger.info(
        "training %d SAE(s) together from step %d for %d tokens",
        len(active), lead.step, lead_cfg.total_tokens - lead.tokens_trained,
    )

    def stop_requested() -> bool:
        return any(trainer.stop_requested for trainer in active.values())

    def emit(checkpoint: bool, final: bool, log: bool) -> None:
        reports = []
        for index, trainer in active.items():
            metrics = trainer.log_metrics() if log else {}
            if metrics:
                trainer.last_metrics = metrics
            report = Report(trainer.step, trainer.tokens_trained, metrics, checkpoint=checkpoint, final=final)
            if trainer.report_fn is not None:
                trainer.report_fn(trainer, report)
            reports.append((index, trainer, report))
        if report_fn is not None:
            report_fn(reports)

    for batch in rebatch(batches, lead_cfg.batch_size):
        if lead.done or stop_requested():
            break
        for index, trainer in list(active.items()):
            try:
                trainer.train_step(batch)
            except TrainingDivergedError as error:
                if len(trainers) == 1:
                    raise
                logger.error("SAE %d of the group failed at step %d and stops: %s", index, trainer.step, error)
                failed[index] = error
                del active[index]
        if not active:
            break
        lead = next(iter(active.values()))
        if lead.done or stop_requested():
            break
        log_due = lead.step % lead_cfg.log_every_steps == 0
        checkpoint_due = bool(lead_cfg.checkpoint_every_steps) and lead.step % lead_cfg.checkpoint_every_steps == 0
        if log_due or checkpoint_due:
            emit(checkpoint=checkpoint_due, final=False, log=log_due)

    if not active:
        raise next(iter(failed.values()))
    if stop_requested():
        logger.info("stop requested at step %d: writing a checkpoint", lead.step)
    elif not lead.done:
        logger.warning("activation stream ended after %d of %d tokens", lead.tokens_trained, lead_cfg.total_tokens)
    emit(checkpoint=stop_requested(), final=True, log=lead.window.n_tokens > 0)
    return failed
