"""Batch assembly: groups -> samples with group-normalised advantages -> mini-batches -> each DP rank's
micro-batches; and the learning-rate schedule the updates run under."""

import pytest
import torch

from megatron_dapo.algo import group_advantages
from megatron_dapo.config import OptimizerConfig
from megatron_dapo.rollout.types import FinishReason
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.policy import lr_schedule
from megatron_dapo.trainer.rollout import Group, Response


def random_groups(num_groups: int, group_size: int, seed: int) -> list[Group]:
    g = torch.Generator().manual_seed(seed)
    groups = []
    for index in range(num_groups):
        prompt = tuple(
            torch.randint(0, 40, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        )
        responses = []
        for _ in range(group_size):
            length = int(torch.randint(1, 12, (1,), generator=g))
            tokens = tuple(torch.randint(0, 40, (length,), generator=g).tolist())
            logprobs = tuple((-torch.rand(length, generator=g)).tolist())
            correct = bool(torch.rand(1, generator=g) < 0.5)
            truncated = bool(torch.rand(1, generator=g) < 0.2)
            reward = (1.0 if correct else -1.0) - 0.3 * truncated
            reason = FinishReason.LENGTH if truncated else FinishReason.STOP
            responses.append(Response(tokens, logprobs, reason, reward, correct))
        groups.append(Group(100 + index, prompt, tuple(responses)))
    return groups


def test_samples_follow_the_groups_and_advantages_are_normalised_within_each_group():
    groups = random_groups(5, 4, seed=1)
    batch = StepBatch.from_groups(groups, scale_by_std=True)
    responses = [(g, r) for g in groups for r in g.responses]
    assert len(batch) == 20
    for sample, (group, response) in zip(batch.samples, responses, strict=True):
        assert tuple(sample.token_ids) == group.prompt_ids + response.token_ids
        assert sample.response_start == len(group.prompt_ids)
    rewards = torch.tensor([r.reward for _, r in responses])
    expected = group_advantages(rewards, torch.arange(5).repeat_interleave(4))
    torch.testing.assert_close(batch.advantages, expected)
    assert batch.truncated.tolist() == [r.truncated for _, r in responses]
    for logprobs, (_, response) in zip(batch.rollout_logprobs, responses, strict=True):
        assert logprobs.tolist() == pytest.approx(list(response.logprobs))
    # each group's advantages sum to zero: the normalisation saw the whole group
    assert batch.advantages.view(5, 4).sum(1).abs().max() < 1e-5


def test_minibatches_are_consecutive_and_must_divide_the_step():
    batch = StepBatch.from_groups(random_groups(4, 4, seed=2), scale_by_std=True)
    assert batch.minibatches(8) == [list(range(8)), list(range(8, 16))]
    with pytest.raises(ValueError, match="samples_per_minibatch"):
        batch.minibatches(6)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_each_dp_rank_gets_the_same_number_of_microbatches_and_all_samples_are_covered(dp_size):
    batch = StepBatch.from_groups(random_groups(6, 4, seed=3), scale_by_std=True)
    ids = list(range(4, 20))
    per_rank = [
        batch.microbatches(ids, dp_rank=r, dp_size=dp_size, tokens_per_microbatch=40, cp=1, pad_multiple=1)
        for r in range(dp_size)
    ]
    assert len({len(rank) for rank in per_rank}) == 1
    covered = sorted(i for rank in per_rank for mb in rank for i in mb.sample_ids if i >= 0)
    assert covered == ids
    for rank in per_rank:
        for mb in rank:
            assert mb.tokens.numel() <= 40
            for i, length in zip(mb.sample_ids, mb.lengths, strict=True):
                if i >= 0:
                    assert length == len(batch.samples[i].token_ids)


class _Optimizer:
    """The one attribute Megatron's scheduler touches."""

    def __init__(self) -> None:
        self.param_groups = [
            {"lr": None, "weight_decay": None},
            {"lr": None, "weight_decay": None, "wd_mult": 0.0},
        ]


def test_lr_warms_up_linearly_over_rollout_steps_then_stays_constant():
    optimizer = _Optimizer()
    schedule = lr_schedule(
        optimizer, OptimizerConfig(lr=1e-3, warmup_steps=4, weight_decay=0.1), total_steps=10
    )
    seen = []
    for _ in range(7):
        schedule.step(1)  # the trainer steps it once per rollout step, before the step's updates
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3])
    assert (
        optimizer.param_groups[0]["weight_decay"] == 0.1 and optimizer.param_groups[1]["weight_decay"] == 0.0
    )


def test_lr_without_warmup_is_constant_from_the_first_step_and_resumes_from_its_state():
    optimizer = _Optimizer()
    schedule = lr_schedule(optimizer, OptimizerConfig(lr=2e-5, warmup_steps=0), total_steps=3)
    schedule.step(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(2e-5)
    warm = lr_schedule(_Optimizer(), OptimizerConfig(lr=1e-3, warmup_steps=10), total_steps=100)
    for _ in range(3):
        warm.step(1)
    resumed_optimizer = _Optimizer()
    resumed = lr_schedule(resumed_optimizer, OptimizerConfig(lr=1e-3, warmup_steps=10), total_steps=100)
    resumed.load_state_dict(warm.state_dict())
    resumed.step(1)
    assert resumed_optimizer.param_groups[0]["lr"] == pytest.approx(4e-4)
