"""Train/inference mismatch metrics against float64 Python references, and their reduction across parts."""

import itertools
import math

import pytest
import torch

from megatron_dapo.algo import RATIO_BAND, finalize_metrics, merge_metric_sums, mismatch_metric_sums


def random_logprobs(num_tokens: int, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log pi_old, log pi_rollout) in float32, as the trainer and the engine give them."""
    gen = torch.Generator().manual_seed(seed)
    rollout = torch.log(torch.rand(num_tokens, generator=gen) * 0.98 + 0.01)
    old = rollout + spread * torch.randn(num_tokens, generator=gen)
    return old, rollout


def reference(old: list[float], rollout: list[float]) -> dict[str, float]:
    """The logged metrics, token by token in Python floats."""
    log_ratios = [o - r for o, r in zip(old, rollout, strict=True)]
    low, high = RATIO_BAND
    return {
        "mismatch_kl": sum(math.exp(d) - 1 - d for d in log_ratios) / len(log_ratios),
        "mismatch_logprob_diff_mean": sum(abs(d) for d in log_ratios) / len(log_ratios),
        "mismatch_logprob_diff_max": max(abs(d) for d in log_ratios),
        "mismatch_ratio_outside_share": sum(not low <= math.exp(d) <= high for d in log_ratios)
        / len(log_ratios),
    }


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_metrics_match_the_reference(seed):
    old, rollout = random_logprobs(700, seed, spread=0.6)
    got = finalize_metrics(mismatch_metric_sums(old, rollout))
    expected = reference(old.double().tolist(), rollout.double().tolist())
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name
    # the band is left on both sides, so both comparisons are exercised
    ratios = (old.double() - rollout.double()).exp()
    assert (ratios < RATIO_BAND[0]).any() and (ratios > RATIO_BAND[1]).any()


def test_parts_merge_to_the_whole():
    """Micro-batches and ranks (an empty one included) add up to the whole step's metrics."""
    old, rollout = random_logprobs(300, seed=4, spread=0.3)
    cuts = [0, 17, 17, 120, 300]  # 17:17 is a rank without samples
    parts = [mismatch_metric_sums(old[a:b], rollout[a:b]) for a, b in itertools.pairwise(cuts)]
    whole = finalize_metrics(mismatch_metric_sums(old, rollout))
    merged = finalize_metrics(merge_metric_sums(parts))
    assert merged.keys() == whole.keys()
    for name in whole:
        assert merged[name] == pytest.approx(whole[name], rel=1e-12), name


def test_same_policy_gives_zero_and_no_tokens_give_nothing():
    old, _ = random_logprobs(50, seed=5, spread=0.0)
    got = finalize_metrics(mismatch_metric_sums(old, old.clone()))
    assert got == {
        "mismatch_kl": 0.0,
        "mismatch_logprob_diff_mean": 0.0,
        "mismatch_logprob_diff_max": 0.0,
        "mismatch_ratio_outside_share": 0.0,
    }
    assert finalize_metrics(mismatch_metric_sums(torch.zeros(0), torch.zeros(0))) == {}


def test_k3_mean_estimates_the_kl_of_sampled_tokens():
    """Tokens drawn from pi_rollout: the mean of k3 is KL(pi_rollout || pi_old), computed exactly here."""
    gen = torch.Generator().manual_seed(6)
    rollout_probs = torch.softmax(torch.randn(20, generator=gen, dtype=torch.float64), 0)
    old_probs = torch.softmax(
        rollout_probs.log() + 0.5 * torch.randn(20, generator=gen, dtype=torch.float64), 0
    )
    tokens = torch.multinomial(rollout_probs, 200_000, replacement=True, generator=gen)
    got = finalize_metrics(mismatch_metric_sums(old_probs.log()[tokens], rollout_probs.log()[tokens]))
    exact = sum(p * math.log(p / q) for p, q in zip(rollout_probs.tolist(), old_probs.tolist(), strict=True))
    assert exact > 0.01
    assert got["mismatch_kl"] == pytest.approx(exact, rel=0.05)


def test_unequal_shapes_are_refused():
    old, rollout = random_logprobs(10, seed=7, spread=0.1)
    with pytest.raises(ValueError, match="equal in shape"):
        mismatch_metric_sums(old, rollout[:-1])
