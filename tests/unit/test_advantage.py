"""group_advantages against a float64 loop over groups, and its edge cases (singletons, constant groups)."""

import math
import statistics

import pytest
import torch

from megatron_dapo.algo import group_advantages


def reference(rewards: list[float], group_ids: list[int], scale_by_std: bool, eps: float) -> list[float]:
    groups: dict[int, list[float]] = {}
    for r, g in zip(rewards, group_ids, strict=True):
        groups.setdefault(g, []).append(r)
    out = []
    for r, g in zip(rewards, group_ids, strict=True):
        values = groups[g]
        if len(set(values)) == 1:
            out.append(0.0)
            continue
        centred = r - statistics.fmean(values)
        out.append(centred / (statistics.stdev(values) + eps) if scale_by_std else centred)
    return out


@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_matches_float64_reference(seed: int, scale_by_std: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_groups, group_size = 13, 7
    # non-contiguous ids, shuffled, and a mix of +-1 rule rewards with soft overlong penalties
    ids = (torch.arange(num_groups).repeat_interleave(group_size) * 37 + 5)[torch.randperm(91, generator=gen)]
    rewards = torch.where(torch.rand(91, generator=gen) < 0.5, 1.0, -1.0) - torch.rand(91, generator=gen) * (
        torch.rand(91, generator=gen) < 0.3
    )
    expected = reference(rewards.double().tolist(), ids.tolist(), scale_by_std, 1e-6)
    got64 = group_advantages(rewards.double(), ids, scale_by_std=scale_by_std)
    got32 = group_advantages(rewards, ids, scale_by_std=scale_by_std)
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got64, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got32, torch.tensor(expected, dtype=torch.float32), rtol=1e-6, atol=1e-6)


def test_ragged_groups_and_permutation_invariance() -> None:
    gen = torch.Generator().manual_seed(7)
    sizes = [1, 2, 5, 16, 3]
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(sizes)])
    rewards = torch.randn(ids.numel(), generator=gen, dtype=torch.float64)
    adv = group_advantages(rewards, ids)
    expected = reference(rewards.tolist(), ids.tolist(), True, 1e-6)
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    perm = torch.randperm(ids.numel(), generator=gen)
    torch.testing.assert_close(group_advantages(rewards[perm], ids[perm]), adv[perm])


def test_singleton_and_constant_groups_are_exactly_zero() -> None:
    # 0.1 three times has mean 0.10000000000000002 in float64: that rounding residue is not an advantage
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, -1.0, -1.0, 1.0, 0.7], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4])
    for scale_by_std in (True, False):
        adv = group_advantages(rewards, ids, scale_by_std=scale_by_std)
        assert torch.isfinite(adv).all()
        assert (adv == 0).all(), adv


def test_group_size_one_everywhere_gives_zero() -> None:
    adv = group_advantages(torch.randn(9), torch.arange(9))
    assert (adv == 0).all()


def test_two_sample_group_is_plus_minus_one_over_sqrt2() -> None:
    adv = group_advantages(torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([3, 3]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([1 / math.sqrt(2), -1 / math.sqrt(2)], dtype=torch.float64))


def test_empty_input() -> None:
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    ("rewards", "ids", "message"),
    [
        (torch.ones(3), torch.zeros(4, dtype=torch.long), "group_ids"),
        (torch.ones(3), torch.zeros(3), "group_ids"),
        (torch.ones(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), "rewards"),
        (torch.tensor([1.0, float("nan")]), torch.zeros(2, dtype=torch.long), "NaN"),
    ],
)
def test_bad_input_names_the_field(rewards: torch.Tensor, ids: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, ids)
