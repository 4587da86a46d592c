"""avg@k, pass@k (against exact rational arithmetic) and cons@k (majority vote, ties, missing answers)."""

from fractions import Fraction
from math import comb

import pytest

from megatron_dapo.reward import (
    avg_at_k,
    compute_score,
    cons_at_k,
    majority_answer,
    normalize_ground_truth,
    pass_at_k,
)


def exact_pass_at_k(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(comb(n - c, k), comb(n, k))


def test_pass_at_k_matches_exact_fractions_for_small_n() -> None:
    for n in range(1, 41):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    float(exact_pass_at_k(n, c, k)), rel=1e-12, abs=1e-15
                )


@pytest.mark.parametrize(("n", "c", "k"), [(1000, 1, 1), (1000, 3, 500), (5000, 17, 64), (20_000, 2, 10_000)])
def test_pass_at_k_is_stable_for_large_n(n: int, c: int, k: int) -> None:
    # C(20000, 10000) has ~6000 digits: a float formula through the binomials would overflow
    assert pass_at_k(n, c, k) == pytest.approx(float(exact_pass_at_k(n, c, k)), rel=1e-10)


def test_pass_at_k_edges() -> None:
    assert pass_at_k(32, 0, 8) == 0.0
    assert pass_at_k(32, 32, 1) == 1.0
    assert pass_at_k(32, 1, 32) == 1.0
    assert pass_at_k(32, 5, 1) == pytest.approx(5 / 32)


@pytest.mark.parametrize(("n", "c", "k"), [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5)])
def test_pass_at_k_bad_arguments(n: int, c: int, k: int) -> None:
    with pytest.raises(ValueError, match="pass_at_k"):
        pass_at_k(n, c, k)


def test_avg_at_k() -> None:
    assert avg_at_k([True, False, False, True]) == 0.5
    assert avg_at_k([False]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        avg_at_k([])


@pytest.mark.parametrize(
    ("preds", "expected"),
    [
        (["25", "7", "25"], "25"),
        (["7", "25", "25", "7"], "7"),  # tie: the answer that appeared first
        (["25", "7", "7", "25"], "25"),
        (["", "", "7"], "7"),  # samples without an answer do not vote
        (["", "", "7", "3", "3"], "3"),
        (["", ""], None),
        ([], None),
    ],
)
def test_majority_answer(preds: list[str], expected: str | None) -> None:
    assert majority_answer(preds) == expected


def test_cons_at_k_through_the_reward() -> None:
    """Normalised predictions vote together: "025", "$25$" and "\\boxed{25}" are one answer."""
    responses = ["Answer: 025", "Answer: 7", "Answer: $25$", "no answer", "Answer: 7", "Answer: \\boxed{25}"]
    preds = [compute_score(r, "25").pred for r in responses]
    assert preds == ["25", "7", "25", "", "7", "25"]
    assert cons_at_k(preds, normalize_ground_truth("025")) == 1.0
    assert cons_at_k(preds[:2] + preds[3:5], normalize_ground_truth("25")) == 0.0  # 7 wins 2 to 1
    assert cons_at_k(["", ""], normalize_ground_truth("25")) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        cons_at_k([], "25")
