"""Soft overlong punishment (the paper's three branches) and overlong filtering."""

from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from megatron_dapo.algo import overlong_filter_mask, overlong_penalty, overlong_penalty_tensor

L_MAX, L_CACHE = 20_480, 4_096  # the paper's: 16,384 expected + 4,096 cache


def reference(length: int, max_length: int, buffer_length: int) -> Fraction:
    if length <= max_length - buffer_length:
        return Fraction(0)
    if length <= max_length:
        return Fraction((max_length - buffer_length) - length, buffer_length)
    return Fraction(-1)


@pytest.mark.parametrize(
    ("length", "expected"),
    [(0, 0.0), (16_384, 0.0), (16_385, -1 / 4096), (18_432, -0.5), (20_479, -4095 / 4096), (20_480, -1.0),
     (20_481, -1.0), (10**9, -1.0)],
)  # fmt: skip
def test_paper_settings(length: int, expected: float) -> None:
    assert overlong_penalty(length, L_MAX, L_CACHE) == pytest.approx(expected, abs=1e-15)


@given(
    st.integers(1, 50_000).flatmap(
        lambda max_length: st.tuples(
            st.integers(0, 2 * max_length), st.just(max_length), st.integers(0, max_length)
        )
    )
)
def test_scalar_and_tensor_match_exact_reference(args) -> None:
    length, max_length, buffer_length = args
    expected = float(reference(length, max_length, buffer_length))
    got = overlong_penalty(length, max_length, buffer_length)
    assert got == pytest.approx(expected, abs=1e-12)
    assert -1.0 <= got <= 0.0
    tensor = overlong_penalty_tensor(torch.tensor([length]), max_length, buffer_length)
    assert tensor.dtype == torch.float32 and tensor.item() == pytest.approx(expected, abs=1e-6)


def test_tensor_form_on_random_lengths_is_monotone() -> None:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(0, 2 * L_MAX, (2000,), generator=gen).sort().values
    penalties = overlong_penalty_tensor(lengths, L_MAX, L_CACHE)
    expected = torch.tensor([float(reference(n, L_MAX, L_CACHE)) for n in lengths.tolist()])
    torch.testing.assert_close(penalties, expected)
    assert (penalties[1:] <= penalties[:-1]).all()


def test_zero_buffer_is_a_hard_cliff() -> None:
    assert overlong_penalty(100, 100, 0) == 0.0
    assert overlong_penalty(101, 100, 0) == -1.0
    assert overlong_penalty_tensor(torch.tensor([100, 101]), 100, 0).tolist() == [0.0, -1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [((10, 100, 101), "buffer_length"), ((10, 100, -1), "buffer_length"), ((-1, 100, 10), "length")],
)
def test_bad_arguments(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        overlong_penalty(*args)


def test_tensor_form_rejects_float_lengths() -> None:
    with pytest.raises(ValueError, match="integer"):
        overlong_penalty_tensor(torch.tensor([1.5]), 100, 10)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_filter_masks_only_truncated_samples(mask_dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    lengths = [3, 5, 2, 6]
    cu = torch.tensor([0, 3, 8, 10, 16], dtype=torch.int32)
    mask = (torch.rand(16, generator=gen) < 0.8).to(mask_dtype)
    truncated = torch.tensor([False, True, False, True])
    filtered = overlong_filter_mask(mask, cu, truncated)
    assert filtered.dtype == mask_dtype
    start = 0
    for n, cut in zip(lengths, truncated.tolist(), strict=True):
        expected = torch.zeros(n, dtype=mask_dtype) if cut else mask[start : start + n]
        assert torch.equal(filtered[start : start + n], expected)
        start += n


def test_filter_bad_truncated() -> None:
    with pytest.raises(ValueError, match="truncated"):
        overlong_filter_mask(torch.ones(4), torch.tensor([0, 4]), torch.tensor([1, 0]))
