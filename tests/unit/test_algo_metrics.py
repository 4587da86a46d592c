"""Training metrics against float64 references, and their reduction across micro-batches/ranks."""

import itertools
import math

import pytest
import torch

from megatron_dapo.algo import (
    finalize_metrics,
    group_metric_sums,
    merge_metric_sums,
    policy_loss,
    rollout_metric_sums,
    token_metric_sums,
)


def random_batch(num_tokens: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    old = torch.log(torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 0.98 + 0.01)
    lp = old + 0.4 * torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    adv = torch.randn(num_tokens, generator=gen, dtype=torch.float64)
    entropy = torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 3
    mask = torch.rand(num_tokens, generator=gen) < 0.75
    return lp, old, adv, entropy, mask


def test_token_metrics_match_reference() -> None:
    lp, old, adv, entropy, mask = random_batch(500, seed=1)
    out = policy_loss(lp, old, adv, eps_low=0.2, eps_high=0.28, dual_clip=2.0)
    got = finalize_metrics(token_metric_sums(out, lp, entropy, mask))

    rows = [
        (a, b, c, e)
        for a, b, c, e, m in zip(
            lp.tolist(), old.tolist(), adv.tolist(), entropy.tolist(), mask.tolist(), strict=True
        )
        if m
    ]
    n = len(rows)
    upper = [math.exp(a) for a, b, c, _ in rows if c > 0 and math.exp(a - b) > 1.28]
    lower = [1 for a, b, c, _ in rows if c < 0 and math.exp(a - b) < 0.8]
    dual = [1 for a, b, c, _ in rows if c < 0 and math.exp(a - b) > 2.0]
    kl = [math.exp(a - b) - 1 - (a - b) for a, b, _, _ in rows]
    assert got["entropy"] == pytest.approx(sum(e for *_, e in rows) / n, rel=1e-12)
    assert got["clip_fraction_upper"] == pytest.approx(len(upper) / n, rel=1e-12)
    assert got["clip_fraction_lower"] == pytest.approx(len(lower) / n, rel=1e-12)
    assert got["dual_clip_fraction"] == pytest.approx(len(dual) / n, rel=1e-12)
    assert got["clipped_upper_prob_mean"] == pytest.approx(sum(upper) / len(upper), rel=1e-12)
    assert got["approx_kl"] == pytest.approx(sum(kl) / n, rel=1e-12)
    assert len(upper) > 0 and len(lower) > 0 and len(dual) > 0
    largest = max(abs(math.exp(a - b) - 1) for a, b, _, _ in rows)  # masked tokens left out
    ratio_dev_max = token_metric_sums(out, lp, entropy, mask)["ratio_dev_max"]
    assert float(ratio_dev_max) == pytest.approx(largest, rel=1e-12)


def test_k3_estimates_kl_old_to_new() -> None:
    """Over tokens sampled from the old policy, the k3 mean converges to the exact KL(old || new)."""
    gen = torch.Generator().manual_seed(2)
    p_old = torch.softmax(torch.randn(6, generator=gen, dtype=torch.float64), 0)
    p_new = torch.softmax(p_old.log() + 0.3 * torch.randn(6, generator=gen, dtype=torch.float64), 0)
    tokens = torch.multinomial(p_old, 200_000, replacement=True, generator=gen)
    lp, old = p_new.log()[tokens], p_old.log()[tokens]
    out = policy_loss(lp, old, torch.zeros_like(lp))
    got = finalize_metrics(
        token_metric_sums(out, lp, torch.zeros_like(lp), torch.ones_like(lp, dtype=torch.bool))
    )
    exact = float((p_old * (p_old / p_new).log()).sum())
    assert got["approx_kl"] == pytest.approx(exact, rel=0.05)


def test_sums_merge_across_microbatches_like_the_whole() -> None:
    lp, old, adv, entropy, mask = random_batch(300, seed=3)
    whole = token_metric_sums(policy_loss(lp, old, adv), lp, entropy, mask)
    cuts = [0, 17, 140, 141, 300]
    parts = [
        token_metric_sums(policy_loss(lp[a:b], old[a:b], adv[a:b]), lp[a:b], entropy[a:b], mask[a:b])
        for a, b in itertools.pairwise(cuts)
    ]
    merged = merge_metric_sums(parts)
    assert merged.keys() == whole.keys()
    for key in whole:
        assert float(merged[key]) == pytest.approx(float(whole[key]), rel=1e-12)


def test_rollout_metrics_and_max_reduction() -> None:
    gen = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 20_480, (64,), generator=gen)
    truncated = lengths > 16_000
    correct = torch.rand(64, generator=gen) < 0.4
    first = rollout_metric_sums(lengths[:40], truncated[:40], correct[:40])
    second = rollout_metric_sums(lengths[40:], truncated[40:], correct[40:])
    got = finalize_metrics(merge_metric_sums([first, second]))
    assert got["response_length_mean"] == pytest.approx(sum(lengths.tolist()) / 64, rel=1e-12)
    assert got["response_length_max"] == max(lengths.tolist())
    assert got["truncation_ratio"] == pytest.approx(sum(truncated.tolist()) / 64)
    assert got["accuracy"] == pytest.approx(sum(correct.tolist()) / 64)


def test_group_shares() -> None:
    sums = group_metric_sums([0, 16, 3, 16, 0, 0, 8], [16] * 7)
    got = finalize_metrics(sums)
    assert got["groups_all_correct_share"] == pytest.approx(2 / 7)
    assert got["groups_all_wrong_share"] == pytest.approx(3 / 7)
    with pytest.raises(ValueError, match="group_sizes"):
        group_metric_sums([1, 2], [4])


def test_undefined_metrics_are_left_out() -> None:
    lp = torch.tensor([-1.0, -2.0])
    out = policy_loss(lp, lp, torch.tensor([1.0, -1.0]))  # ratio 1: nothing clipped
    got = finalize_metrics(token_metric_sums(out, lp, torch.ones(2), torch.ones(2)))
    assert "clipped_upper_prob_mean" not in got and got["clip_fraction_upper"] == 0.0
    nothing_valid = finalize_metrics(token_metric_sums(out, lp, torch.ones(2), torch.zeros(2)))
    assert nothing_valid == {}
    empty = rollout_metric_sums(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool),
                                torch.zeros(0, dtype=torch.bool))  # fmt: skip
    assert finalize_metrics(empty) == {}


def test_rollout_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="equal in shape"):
        rollout_metric_sums(torch.ones(3), torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool))
