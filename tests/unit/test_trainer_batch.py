"""Batch assembly: groups -> samples with group-normalised advantages -> mini-batches -> each DP rank's
micro-batches; and the learning-rate schedule the updates run under."""

import pytest
import torch

from megatron_dapo.algo import group_advantages
from megatron_dapo.config import OptimizerConfig
from megatron_dapo.data.packing import pack, plan_microbatches
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.distribute import decode, encode
from megatron_dapo.trainer.policy.build import lr_schedule
from tests.helpers.batches import random_groups


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


SHARD = dict(samples_per_minibatch=8, tokens_per_microbatch=40, cp=1, pad_multiple=1)


@pytest.mark.parametrize("dp_size", [1, 2, 3])
def test_each_dp_rank_gets_its_share_with_the_same_microbatch_count(dp_size):
    """The shares hold every sample once, and pack into the micro-batches of plan_microbatches."""
    batch = StepBatch.from_groups(random_groups(6, 4, seed=3), scale_by_std=True)
    shares = batch.shard(dp_size=dp_size, **SHARD)
    assert [len(minibatch) for minibatch in batch.minibatches(8)] == [8, 8, 8]
    for m, ids in enumerate(batch.minibatches(8)):
        plan = plan_microbatches(
            [len(batch.samples[i].token_ids) for i in ids], dp_size=dp_size, tokens_per_microbatch=40
        )
        assert len({len(rank) for rank in plan}) == 1  # the same schedule on every rank
        for rank, share in enumerate(shares):
            packed = share.microbatches(pad_multiple=1)[m]
            expected = [pack(batch.samples, [ids[j] for j in group]) for group in plan[rank]]
            assert len(packed) == len(expected)
            for got, want in zip(packed, expected, strict=True):
                assert torch.equal(got.tokens, want.tokens) and got.seq_lens == want.seq_lens
                assert got.tokens.numel() <= 40
    samples = [tuple(s.token_ids) for share in shares for s in share.data.samples]
    assert sorted(samples) == sorted(tuple(s.token_ids) for s in batch.samples)


def test_a_share_survives_its_wire_format_exactly():
    batch = StepBatch.from_groups(random_groups(5, 4, seed=4), scale_by_std=True)
    for share in batch.shard(
        dp_size=2, samples_per_minibatch=10, tokens_per_microbatch=30, cp=1, pad_multiple=1
    ):
        header, buffer = encode(share)
        assert buffer.dtype == torch.uint8 and buffer.numel() > 0
        received = decode(header, buffer.clone())
        assert received.plan == share.plan
        got, sent = received.data, share.data
        assert [tuple(s.token_ids.tolist()) for s in got.samples] == [
            tuple(s.token_ids) for s in sent.samples
        ]
        assert [s.response_start for s in got.samples] == [s.response_start for s in sent.samples]
        assert torch.equal(got.advantages, sent.advantages) and torch.equal(got.truncated, sent.truncated)
        assert torch.equal(got.weight_versions, sent.weight_versions)
        for a, b in zip(got.rollout_logprobs, sent.rollout_logprobs, strict=True):
            assert torch.equal(a, b)


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
