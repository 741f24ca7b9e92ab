"""Several SAEs trained together in one process on the same batches."""

from __future__ import annotations

import pytest
import torch

from saesweep import SAE, SAEConfig
from saesweep.sweep.trial import Member, TrialState
from saesweep.training.group import fit_together
from saesweep.training.trainer import SAETrainer, TrainerConfig, TrainingDivergedError

D_IN, D_SAE = 16, 64


def batches(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(256, D_IN, generator=generator) + 1.0 for _ in range(n)]


def trainer(architecture: str = "topk", seed: int = 0, **sae_options) -> SAETrainer:
    options = {"topk": {"k": 4}, "standard": {"l1_coefficient": 1.0}}[architecture] | sae_options
    sae = SAE.from_config(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, seed=seed, **options))
    cfg = TrainerConfig(total_tokens=256 * 6, batch_size=256, lr=1e-3, log_every_steps=2, dead_latent_window=512)
    return SAETrainer(sae, cfg)


def test_packed_sae_trains_as_alone():
    data = batches(8)
    together = [trainer("topk", seed=1), trainer("standard", seed=2)]
    reports = []
    failed = fit_together(together, iter(data), report_fn=reports.append)
    alone = [trainer("topk", seed=1), trainer("standard", seed=2)]
    for single in alone:
        single.fit(iter(data))

    assert failed == {}
    for joint, single in zip(together, alone):
        assert joint.tokens_trained == single.tokens_trained == 256 * 6
        for name, tensor in single.sae.state_dict().items():
            torch.testing.assert_close(joint.sae.state_dict()[name], tensor, msg=name)
    # Steps 2 and 4 log, and the final report closes the run. Each report covers both SAEs.
    assert [[index for index, _, _ in group] for group in reports] == [[0, 1]] * 3
    assert reports[-1][0][2].final
    assert reports[0][1][2].metrics["l0"] > 0


def test_diverging_sae_fails_alone():
    group = [trainer("standard", seed=1), trainer("standard", seed=2, l1_coefficient=1e40)]
    failed = fit_together(group, iter(batches(8)))

    assert list(failed) == [1]
    assert isinstance(failed[1], TrainingDivergedError)
    assert group[0].tokens_trained == 256 * 6
    assert group[1].step == 0


def test_all_failed_group_raises():
    with pytest.raises(TrainingDivergedError, match="lower the learning rate"):
        fit_together([trainer("standard", l1_coefficient=1e40)], iter(batches(4)))
    doomed = [trainer("standard", seed=seed, l1_coefficient=1e40) for seed in (1, 2)]
    with pytest.raises(TrainingDivergedError):
        fit_together(doomed, iter(batches(4)))


def test_schedules_must_match():
    first, second = trainer(), trainer()
    second.cfg.batch_size = 128
    with pytest.raises(ValueError, match="must share batch_size: got 256 and 128"):
        fit_together([first, second], iter(batches(2)))


def _state(trainers: list[SAETrainer]) -> TrialState:
    members = [Member(f"trial-{index}", {"architecture": t.sae.cfg.architecture}, t, None) for index, t in enumerate(trainers)]
    return TrialState(members, packed=True, metric="explained_variance", mode="max")


def test_checkpoint_restores_saes_and_failures(tmp_path):
    data = batches(8)
    first = _state([trainer("topk", seed=1), trainer("standard", seed=2, l1_coefficient=1e40), trainer("standard", seed=3)])
    fit_together([m.trainer for m in first.members], iter(data[:3]), failed=first.failed)
    first.close_failed_runs()
    first.save(tmp_path)
    assert (tmp_path / "members" / "0" / "sae" / "cfg.json").is_file()
    assert not (tmp_path / "members" / "1").exists()

    second = _state([trainer("topk", seed=1), trainer("standard", seed=2, l1_coefficient=1e40), trainer("standard", seed=3)])
    second.load(tmp_path)
    assert list(second.failed) == [1]
    assert "TrainingDivergedError" in second.members[1].error
    for index in (0, 2):
        old, new = first.members[index], second.members[index]
        assert new.trainer.step == old.trainer.step == 3
        for name, tensor in old.trainer.sae.state_dict().items():
            torch.testing.assert_close(new.trainer.sae.state_dict()[name], tensor)

    fit_together([m.trainer for m in second.members], iter(data[3:]), failed=second.failed)
    uninterrupted = trainer("topk", seed=1)
    uninterrupted.fit(iter(data))
    for name, tensor in uninterrupted.sae.state_dict().items():
        torch.testing.assert_close(second.members[0].trainer.sae.state_dict()[name], tensor, msg=name)


def test_result_has_members_and_best():
    state = _state([trainer("topk", seed=1), trainer("standard", seed=2), trainer("standard", seed=3)])
    for member, value in zip(state.members, (0.5, 0.8, 0.6)):
        member.metrics.update(explained_variance=value, tokens_per_second=100.0)
    state.mark_failed(2, TrainingDivergedError("loss is nan"))

    result = state.result()
    assert set(result["members"]) == {"trial-0", "trial-1"}
    assert result["explained_variance"] == 0.8
    assert result["tokens_per_second"] == 200.0
    assert state.members[2].error == "TrainingDivergedError: loss is nan"
