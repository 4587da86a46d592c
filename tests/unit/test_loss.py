"""The clip-higher policy loss and its aggregation, against float64 references written token by token, and
the invariance of the mini-batch loss (value and gradient) under any split into micro-batches and DP ranks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_dapo.algo import (
    LOSS_AGGREGATIONS,
    aggregate_loss,
    local_denominator,
    policy_loss,
    token_sample_index,
)

EPS_LOW, EPS_HIGH = 0.2, 0.28


def reference_token(lp, old, adv, *, dual_clip=None, weight=1.0):
    """(loss, d loss / d lp, clipped_upper, clipped_lower, dual_clipped) for one token, in Python floats."""
    r = math.exp(lp - old)
    clipped_r = min(max(r, 1 - EPS_LOW), 1 + EPS_HIGH)
    objective = min(r * adv, clipped_r * adv)
    dual = dual_clip is not None and adv < 0 and r > dual_clip
    if dual:
        objective = dual_clip * adv
    # the gradient flows only through the unclipped branch: for A > 0 while r <= 1 + eps_high, for A < 0 while
    # r >= 1 - eps_low (and r <= c under dual clip)
    flows = (adv > 0 and r <= 1 + EPS_HIGH) or (adv < 0 and r >= 1 - EPS_LOW and not dual)
    grad = -adv * r * weight if flows else 0.0
    return -objective * weight, grad, adv > 0 and r > 1 + EPS_HIGH, adv < 0 and r < 1 - EPS_LOW, dual


def random_tokens(num_tokens: int, seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(num_tokens, generator=gen, dtype=dtype) * 0.98 + 0.01)
    # ratios spread over roughly [0.5, 2]: many tokens beyond both clip bounds
    lp = old + 0.35 * torch.randn(num_tokens, generator=gen, dtype=dtype)
    adv = torch.randn(num_tokens, generator=gen, dtype=dtype)
    rollout = old + 0.3 * torch.randn(num_tokens, generator=gen, dtype=dtype)
    return lp, old, adv, rollout


@pytest.mark.parametrize("dual_clip", [None, 1.6])
@pytest.mark.parametrize("importance", [False, True])
def test_policy_loss_matches_reference(dual_clip, importance) -> None:
    lp, old, adv, rollout = random_tokens(400, seed=11 + int(importance) + 2 * (dual_clip is None))
    lp.requires_grad_(True)
    # any non-negative weights, some 0 (a rejected token), detached from the graph
    weights = (old - rollout).exp().clamp(max=1.5) * (rollout < old + 0.4) if importance else None
    kwargs = dict(importance_weights=weights.requires_grad_()) if importance else {}
    out = policy_loss(lp, old, adv, eps_low=EPS_LOW, eps_high=EPS_HIGH, dual_clip=dual_clip, **kwargs)
    out.loss.sum().backward()
    if importance:
        assert weights.grad is None  # the weights are constants of the loss
    weights = weights.tolist() if importance else [1.0] * len(lp)
    assert not importance or 0.0 in weights
    ref = [
        reference_token(a, b, c, dual_clip=dual_clip, weight=w)
        for a, b, c, w in zip(lp.tolist(), old.tolist(), adv.tolist(), weights, strict=True)
    ]
    loss, grad, upper, lower, dual = (list(x) for x in zip(*ref, strict=True))
    torch.testing.assert_close(
        out.loss.detach(), torch.tensor(loss, dtype=torch.float64), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(lp.grad, torch.tensor(grad, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert out.clipped_upper.tolist() == upper and any(upper)
    assert out.clipped_lower.tolist() == lower and any(lower)
    assert out.dual_clipped.tolist() == dual and (any(dual) == (dual_clip is not None))
    torch.testing.assert_close(out.ratio, (lp - old).exp().detach())


def test_policy_loss_float32_close_to_float64() -> None:
    lp, old, adv, _ = random_tokens(300, seed=5)
    exact = policy_loss(lp, old, adv).loss
    single = policy_loss(lp.float(), old.float(), adv.float()).loss
    torch.testing.assert_close(single.double(), exact, rtol=1e-5, atol=1e-6)


def test_extreme_log_ratio_stays_finite() -> None:
    lp = torch.tensor([0.0, -200.0, 0.0, -1.0], requires_grad=True)
    old = torch.tensor([-200.0, 0.0, -200.0, -1.0])
    adv = torch.tensor([0.0, 0.0, -1.0, 1.0])
    out = policy_loss(lp, old, adv, dual_clip=3.0)
    out.loss.sum().backward()
    assert torch.isfinite(out.loss).all() and torch.isfinite(lp.grad).all()
    assert out.loss[2] == 3.0  # dual clip bounds the negative-advantage token with an exploding ratio


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(dual_clip=1.0), "dual_clip"),
        (dict(eps_low=1.0), "eps_low"),
        (dict(importance_weights=torch.ones(2)), "importance_weights shape"),
    ],
)
def test_policy_loss_bad_arguments(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        policy_loss(torch.zeros(3), torch.zeros(3), torch.ones(3), **kwargs)


def test_policy_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="equal in shape"):
        policy_loss(torch.zeros(3), torch.zeros(4), torch.ones(3))


# ---- aggregation ----


def reference_aggregate(loss: list[float], mask: list[bool], lengths: list[int], mode: str) -> float:
    per_sample, start = [], 0
    for n in lengths:
        valid = [x for x, m in zip(loss[start : start + n], mask[start : start + n], strict=True) if m]
        start += n
        if valid:
            per_sample.append(sum(valid) / len(valid) if mode == "sample" else sum(valid))
    if mode == "token":
        valid = [x for x, m in zip(loss, mask, strict=True) if m]
        return sum(valid) / max(len(valid), 1)
    return sum(per_sample) / max(len(per_sample), 1)


def packed(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_matches_reference(mode) -> None:
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 17, 9, 4, 12]
    total = sum(lengths)
    loss = torch.randn(total, generator=gen, dtype=torch.float64)
    mask = torch.rand(total, generator=gen) < 0.7
    mask[22:31] = False  # one sample (length 9) fully masked: it must not count as a sample
    cu = packed(lengths)
    got = aggregate_loss(loss, mask, cu, mode, local_denominator(mask, cu, mode))
    expected = reference_aggregate(loss.tolist(), mask.tolist(), lengths, mode)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    expected_denominator = int(mask.sum()) if mode == "token" else len(lengths) - 1
    assert int(local_denominator(mask, cu, mode)) == expected_denominator


def test_masked_tokens_cannot_leak_nan() -> None:
    loss = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    mask = torch.tensor([1, 0, 1, 0])
    cu = packed([2, 2])
    for mode in LOSS_AGGREGATIONS:
        assert torch.isfinite(aggregate_loss(loss, mask, cu, mode, local_denominator(mask, cu, mode)))


def test_all_masked_minibatch_gives_zero_loss_and_zero_grad() -> None:
    loss = torch.randn(6, requires_grad=True)
    mask = torch.zeros(6, dtype=torch.bool)
    cu = packed([2, 4])
    for mode in LOSS_AGGREGATIONS:
        value = aggregate_loss(loss, mask, cu, mode, local_denominator(mask, cu, mode))
        (grad,) = torch.autograd.grad(value, loss)
        assert value.item() == 0.0 and (grad == 0).all()


def test_tokens_per_sample_for_context_parallel_halves() -> None:
    """Under CP a rank holds part of each sample: with the full per-sample counts, the halves add up."""
    gen = torch.Generator().manual_seed(9)
    lengths = [6, 10, 4]
    loss = torch.randn(20, generator=gen, dtype=torch.float64)
    mask = torch.rand(20, generator=gen) < 0.8
    cu = packed(lengths)
    whole = aggregate_loss(loss, mask, cu, "sample", local_denominator(mask, cu, "sample"))
    full_counts = torch.stack(
        [mask[a:b].sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)]
    )
    halves = []
    for first in (True, False):
        keep = [
            list(range(a, a + n // 2)) if first else list(range(a + n // 2, a + n))
            for a, n in zip(cu[:-1].tolist(), lengths, strict=True)
        ]
        idx = torch.tensor([i for k in keep for i in k])
        part_cu = packed([len(k) for k in keep])
        halves.append(
            aggregate_loss(
                loss[idx],
                mask[idx],
                part_cu,
                "sample",
                local_denominator(mask, cu, "sample"),
                tokens_per_sample=full_counts,
            )
        )
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("cu", "message"),
    [
        (torch.tensor([0, 3, 5]), "token count 6"),
        (torch.tensor([1, 3, 6]), "rise from 0"),
        (torch.tensor([0, 4, 3, 6]), "rise from 0"),
        (torch.tensor([0.0, 6.0]), "integer"),
    ],
)
def test_bad_cu_seqlens(cu, message) -> None:
    with pytest.raises(ValueError, match=message):
        aggregate_loss(torch.zeros(6), torch.ones(6), cu, "sample", 1)


def test_bad_mode_and_denominator() -> None:
    cu = packed([3])
    with pytest.raises(ValueError, match="one of"):
        aggregate_loss(torch.zeros(3), torch.ones(3), cu, "seq-mean", 1)
    with pytest.raises(ValueError, match="one of"):
        local_denominator(torch.ones(3), cu, "tokens")
    with pytest.raises(ValueError, match="global_denominator"):
        aggregate_loss(torch.zeros(3), torch.ones(3), cu, "token", -1)


def test_token_sample_index() -> None:
    assert token_sample_index(torch.tensor([0, 2, 2, 5]), 5).tolist() == [0, 0, 2, 2, 2]


# ---- invariance under micro-batch / data-parallel splits ----


@st.composite
def minibatch_splits(draw):
    num_samples = draw(st.integers(1, 12))
    lengths = draw(st.lists(st.integers(1, 20), min_size=num_samples, max_size=num_samples))
    dp_ranks = draw(st.integers(1, 4))
    microbatches = draw(st.integers(1, 3))
    part_of_sample = draw(
        st.lists(st.integers(0, dp_ranks * microbatches - 1), min_size=num_samples, max_size=num_samples)
    )
    masked_share = draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, dp_ranks * microbatches, part_of_sample, masked_share, seed


@settings(max_examples=100, deadline=None)
@given(split=minibatch_splits(), mode=st.sampled_from(LOSS_AGGREGATIONS))
def test_loss_and_gradient_invariant_to_split(split, mode) -> None:
    """Simulate every (DP rank, micro-batch) in one process: the global denominator is the sum of the local
    ones (what the all-reduce computes), and the sum of the parts' losses equals the whole mini-batch's."""
    lengths, num_parts, part_of_sample, masked_share, seed = split
    total = sum(lengths)
    lp, old, adv, _ = random_tokens(total, seed)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(total, generator=gen) >= masked_share
    cu = packed(lengths)
    starts = cu[:-1].tolist()

    lp_whole = lp.clone().requires_grad_(True)
    whole_loss = policy_loss(lp_whole, old, adv).loss
    whole = aggregate_loss(whole_loss, mask, cu, mode, local_denominator(mask, cu, mode))
    whole.backward()

    lp_parts = lp.clone().requires_grad_(True)
    parts = []
    for p in range(num_parts):
        samples = [s for s in range(len(lengths)) if part_of_sample[s] == p]
        idx = torch.tensor(
            [i for s in samples for i in range(starts[s], starts[s] + lengths[s])], dtype=torch.long
        )
        parts.append((idx, packed([lengths[s] for s in samples])))
    global_denominator = sum(local_denominator(mask[idx], part_cu, mode) for idx, part_cu in parts)
    summed = torch.zeros((), dtype=torch.float64)
    for idx, part_cu in parts:
        part_loss = policy_loss(lp_parts[idx], old[idx], adv[idx]).loss
        summed = summed + aggregate_loss(part_loss, mask[idx], part_cu, mode, global_denominator)
    summed.backward()

    assert int(global_denominator) == int(local_denominator(mask, cu, mode))
    assert summed.item() == pytest.approx(whole.item(), rel=1e-10, abs=1e-12)
    torch.testing.assert_close(lp_parts.grad, lp_whole.grad, rtol=1e-10, atol=1e-12)
    expected = reference_aggregate(whole_loss.tolist(), mask.tolist(), lengths, mode)
    assert whole.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_per_microbatch_mean_is_not_the_token_mean() -> None:
    """The pitfall the global denominator avoids: a per-micro-batch mean overweighs short micro-batches."""
    loss = torch.tensor([1.0, 1.0, 1.0, 4.0], dtype=torch.float64)
    mask = torch.ones(4, dtype=torch.bool)
    parts = [(slice(0, 3), packed([3])), (slice(3, 4), packed([1]))]
    per_microbatch = sum(
        aggregate_loss(loss[s], mask[s], cu, "token", 3 if s.stop == 3 else 1) for s, cu in parts
    )
    global_denominator = sum(local_denominator(mask[s], cu, "token") for s, cu in parts)
    exact = sum(aggregate_loss(loss[s], mask[s], cu, "token", global_denominator) for s, cu in parts)
    assert exact.item() == pytest.approx(7 / 4)
    assert per_microbatch.item() / 2 == pytest.approx(5 / 2)
