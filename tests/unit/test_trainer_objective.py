"""The trainer's objective over packed micro-batches equals algo/loss.py applied to the unpacked samples.

The reference sees each sample's response tokens laid end to end (no prompts, no packing, no micro-batches)
and divides once by the global denominator; the objective sees THD-packed micro-batches with prompts, is
called per chunk and per CP share, and leaves the division to Megatron (sum of losses / sum of denominators).
"""

from dataclasses import replace

import pytest
import torch

from megatron_dapo.algo import (
    ImportanceCorrection,
    aggregate_loss,
    importance_weights,
    local_denominator,
    merge_metric_sums,
    policy_loss,
    token_metric_sums,
)
from megatron_dapo.data.packing import Sample, pack
from megatron_dapo.parallel.context import split_for_cp
from megatron_dapo.trainer.batch import StepBatch
from megatron_dapo.trainer.policy.objective import DapoObjective, ObjectiveSettings, token_targets

SETTINGS = ObjectiveSettings(
    eps_low=0.2,
    eps_high=0.28,
    dual_clip=None,
    aggregation="token",
    overlong_filtering=False,
)


class FakeGroup:
    """What split_for_cp and token_targets read of a process group."""

    def __init__(self, rank: int = 0, size: int = 1) -> None:
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def random_step(num_samples: int, seed: int):
    """A StepBatch of random samples, and each response's new and old log-probs (the new ones with grad)."""
    g = torch.Generator().manual_seed(seed)
    samples, truncated, rollout, new, old = [], [], [], [], []
    for _ in range(num_samples):
        prompt = torch.randint(0, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        response = torch.randint(0, 50, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        samples.append(Sample(prompt + response, len(prompt)))
        old_lp = -torch.rand(len(response), generator=g, dtype=torch.float64) * 3
        old.append(old_lp.float())
        # ratios spread well past both clip bounds
        new.append((old_lp + torch.randn(len(response), generator=g, dtype=torch.float64) * 0.4).float())
        rollout.append((old_lp + torch.randn(len(response), generator=g, dtype=torch.float64) * 0.2).float())
        truncated.append(bool(torch.rand(1, generator=g) < 0.3))
    step = StepBatch(
        samples=samples,
        advantages=torch.randn(num_samples, generator=g),
        truncated=torch.tensor(truncated),
        rollout_logprobs=rollout,
        weight_versions=torch.zeros(num_samples, dtype=torch.int64),
    )
    return step, [lp.requires_grad_() for lp in new], old


def reference_loss(step, new, old, settings, sample_ids, correction=None):
    """algo/loss.py on the samples' responses laid end to end, divided by the global denominator; with a
    correction, its weights over those samples, a rejected token (weight 0) leaving the mask."""
    lengths = torch.tensor([len(new[i]) for i in sample_ids])
    cu_seqlens = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)])
    mask = torch.cat(
        [
            torch.full((len(new[i]),), not (settings.overlong_filtering and step.truncated[i]))
            for i in sample_ids
        ]
    )
    weights = None
    if correction is not None:
        old_all, rollout_all = (torch.cat([x[i] for i in sample_ids]) for x in (old, step.rollout_logprobs))
        weights = importance_weights(old_all, rollout_all, cu_seqlens, correction)
        mask = mask & (weights != 0)
    out = policy_loss(
        torch.cat([new[i] for i in sample_ids]),
        torch.cat([old[i] for i in sample_ids]),
        torch.cat([step.advantages[i].expand(len(new[i])) for i in sample_ids]),
        eps_low=settings.eps_low,
        eps_high=settings.eps_high,
        dual_clip=settings.dual_clip,
        importance_weights=weights,
    )
    denominator = local_denominator(mask, cu_seqlens, settings.aggregation)
    return aggregate_loss(out.loss, mask, cu_seqlens, settings.aggregation, denominator), out, mask


def sample_weights(step, old, correction):
    """Each sample's weights on their own, by sample id, as the policy role hands them to token_targets."""
    if correction is None:
        return None
    return {
        i: importance_weights(lp, step.rollout_logprobs[i], torch.tensor([0, len(lp)]), correction)
        for i, lp in enumerate(old)
    }


def objective_loss(step, new, old, settings, microbatches, *, cp=1, chunk=None, correction=None):
    """sum of micro-batch losses / sum of denominators, as Megatron's per-token mode forms it."""
    old_by_id = dict(enumerate(old))
    weights = sample_weights(step, old, correction)
    total, denominator = 0.0, 0
    for rank in range(cp):
        group = FakeGroup(rank, cp)
        targets = {
            mb.sample_ids: token_targets(mb, step, old_by_id, settings, group, torch.device("cpu"), weights)
            for mb in microbatches
        }
        objective = DapoObjective(targets, settings)
        for mb in microbatches:
            real = [i for i in mb.sample_ids if i >= 0]
            logprobs = mb.scatter_response([new[i] for i in real] if real else [torch.zeros(0)])
            local = mb.cp_share(group)
            logprobs = split_for_cp(logprobs, list(mb.seq_lens), group)
            step_size = chunk or logprobs.shape[0]
            for begin in range(0, logprobs.shape[0], step_size):
                tokens = slice(begin, begin + step_size)
                total = total + objective.token_loss(
                    local, logprobs[tokens], torch.zeros_like(logprobs[tokens]), tokens
                )
            denominator += int(objective.denominator(local))
    return total / max(denominator, 1)


@pytest.mark.parametrize("aggregation", ["token", "sample", "sequence_sum"])
@pytest.mark.parametrize("overlong_filtering", [False, True])
def test_loss_and_gradient_match_the_reference(aggregation, overlong_filtering):
    step, new, old = random_step(7, seed=1)
    settings = replace(SETTINGS, aggregation=aggregation, overlong_filtering=overlong_filtering)
    ids = list(range(7))
    expected, _, _ = reference_loss(step, new, old, settings, ids)
    expected_grads = torch.autograd.grad(expected, new)
    microbatches = [pack(step.samples, [0, 3, 5]), pack(step.samples, [1, 2]), pack(step.samples, [4, 6])]
    got = objective_loss(step, new, old, settings, microbatches)
    got_grads = torch.autograd.grad(got, new)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("aggregation", ["token", "sample"])
def test_chunks_and_context_parallel_shares_sum_to_the_whole(aggregation):
    """The memory-bounded path calls token_loss per chunk; CP ranks each hold two zigzag chunks of every
    sequence. Neither may change the loss."""
    step, new, old = random_step(6, seed=2)
    settings = replace(SETTINGS, aggregation=aggregation, overlong_filtering=True)
    expected, _, _ = reference_loss(step, new, old, settings, list(range(6)))
    microbatches = [
        pack(step.samples, [0, 1, 2], pad_multiple=4),
        pack(step.samples, [3, 4, 5], pad_multiple=4),
    ]
    for cp, chunk in [(1, 3), (2, None), (2, 5)]:
        got = objective_loss(step, new, old, settings, microbatches, cp=cp, chunk=chunk)
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)


def test_dual_clip_and_importance_weights_follow_the_reference():
    step, new, old = random_step(5, seed=3)
    settings = replace(SETTINGS, dual_clip=3.0, eps_high=0.05)
    correction = ImportanceCorrection(cap=1.1)
    expected, _, _ = reference_loss(step, new, old, settings, list(range(5)), correction)
    unweighted, _, _ = reference_loss(step, new, old, settings, list(range(5)))
    got = objective_loss(
        step, new, old, settings, [pack(step.samples, list(range(5)))], correction=correction
    )
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)
    assert abs(float(expected.detach()) - float(unweighted.detach())) > 1e-3  # the weights changed the loss


CORRECTIONS = [
    ImportanceCorrection(cap=1.2, mode="mask"),
    ImportanceCorrection(cap=1.5, level="sequence"),
    ImportanceCorrection(cap=2.0, level="sequence", mode="mask"),
    ImportanceCorrection(cap=1.1, level="geometric", mode="mask"),
]


@pytest.mark.parametrize("correction", CORRECTIONS, ids=lambda c: f"{c.level}-{c.mode}")
@pytest.mark.parametrize("aggregation", ["token", "sample"])
def test_importance_correction_survives_packing_chunks_and_context_parallel(correction, aggregation):
    """Weights of whole samples reach each token of every CP share and chunk; a rejected token or sample
    leaves the denominator too. Loss and gradient equal the reference on the unpacked samples."""
    step, new, old = random_step(8, seed=7)
    settings = replace(SETTINGS, aggregation=aggregation)
    expected, _, mask = reference_loss(step, new, old, settings, list(range(8)), correction)
    unweighted, _, _ = reference_loss(step, new, old, settings, list(range(8)))
    assert abs(float(expected.detach()) - float(unweighted.detach())) > 1e-4  # the correction acts
    assert correction.mode == "truncate" or 0 < int(mask.sum()) < mask.numel()  # some rejected, some kept
    expected_grads = torch.autograd.grad(expected, new)
    microbatches = [
        pack(step.samples, [0, 3, 5, 7], pad_multiple=4),
        pack(step.samples, [1, 2, 4, 6], pad_multiple=4),
    ]
    for cp, chunk in [(1, None), (2, None), (2, 3)]:
        got = objective_loss(
            step, new, old, settings, microbatches, cp=cp, chunk=chunk, correction=correction
        )
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-6, atol=1e-7)
        for g, e in zip(torch.autograd.grad(got, new), expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_metrics_are_the_reference_sums():
    step, new, old = random_step(6, seed=4)
    settings = replace(SETTINGS, overlong_filtering=True)
    _, out, mask = reference_loss(step, new, old, settings, list(range(6)))
    entropy = [torch.rand(len(lp)) for lp in new]
    lp_flat = torch.cat(new).detach()
    expected = token_metric_sums(out, lp_flat, torch.cat(entropy), mask)
    microbatches = [pack(step.samples, [0, 1, 2]), pack(step.samples, [3, 4, 5])]
    targets = {
        mb.sample_ids: token_targets(
            mb, step, dict(enumerate(old)), settings, FakeGroup(), torch.device("cpu")
        )
        for mb in microbatches
    }
    objective = DapoObjective(targets, settings)
    parts = []
    for mb in microbatches:
        lp = mb.scatter_response([new[i].detach() for i in mb.sample_ids])
        ent = mb.scatter_response([entropy[i] for i in mb.sample_ids])
        parts.append(objective.metrics(mb, lp, ent))
    got = merge_metric_sums(parts)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-6, atol=1e-6, msg=key)
    assert expected["clip_upper_tokens"] > 0 and expected["clip_lower_tokens"] > 0  # the test sees clipping


def test_a_filler_microbatch_trains_nothing():
    step, _, old = random_step(2, seed=5)
    filler = pack(step.samples, [])
    target = token_targets(filler, step, dict(enumerate(old)), SETTINGS, FakeGroup(), torch.device("cpu"))
    objective = DapoObjective({filler.sample_ids: target}, SETTINGS)
    logprobs = torch.zeros(filler.tokens.shape[0], requires_grad=True)
    loss = objective.token_loss(filler, logprobs, torch.zeros_like(logprobs), slice(0, logprobs.shape[0]))
    assert loss.item() == 0.0 and int(objective.denominator(filler)) == 0


def test_only_context_parallel_rank_zero_reports_the_denominator():
    step, _, old = random_step(3, seed=6)
    batch = pack(step.samples, [0, 1, 2], pad_multiple=4)
    shares = [
        token_targets(
            batch, step, dict(enumerate(old)), SETTINGS, FakeGroup(rank, 2), torch.device("cpu")
        ).denominator
        for rank in range(2)
    ]
    assert int(shares[0]) == int(batch.loss_mask.sum()) and int(shares[1]) == 0
