"""Evaluation over k samples per problem: avg@k, pass@k (unbiased estimator), cons@k (majority vote)."""

from collections import Counter
from collections.abc import Sequence


def avg_at_k(correct: Sequence[bool]) -> float:
    """Share of one problem's samples that are correct (the paper's avg@32 averages this over problems)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k needs at least one sample")
    return sum(bool(c) for c in correct) / len(correct)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them correct, is
    correct: 1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1..n} (1 - k/i), which never overflows."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def majority_answer(preds: Sequence[str]) -> str | None:
    """The most frequent non-empty normalised answer; a tie goes to the answer that appeared first.
    None when no sample has an answer."""
    counts = Counter(p for p in preds if p)
    if not counts:
        return None
    # Counter keeps first-insertion order and max() returns the first maximal item: ties -> earliest answer.
    return max(counts, key=counts.__getitem__)


def cons_at_k(preds: Sequence[str], normalized_ground_truth: str) -> float:
    """1.0 when the majority answer of one problem's samples is correct, else 0.0.

    preds: `RewardResult.pred` of each sample ("" = no answer, which never votes);
    normalized_ground_truth: `normalize_ground_truth(ground_truth)`.
    """
    if len(preds) == 0:
        raise ValueError("cons_at_k needs at least one sample")
    return 1.0 if majority_answer(preds) == normalized_ground_truth else 0.0
