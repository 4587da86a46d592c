"""The DAPO rule reward: +1 when the response's final answer equals the ground truth after normalisation."""

from dataclasses import dataclass

from megatron_dapo.reward.answer import extract_answer, normalize_answer


@dataclass(frozen=True)
class RewardResult:
    score: float  # +1.0 correct, -1.0 otherwise (no answer included)
    correct: bool
    pred: str  # the normalised prediction; "" when the response has no answer


def normalize_ground_truth(ground_truth: str) -> str:
    """The ground truth's normal form; rejects one that normalises to nothing, which no answer could match."""
    if not isinstance(ground_truth, str):
        raise TypeError(f"ground_truth must be a str, got {type(ground_truth).__name__}")
    normalized = normalize_answer(ground_truth)
    if not normalized:
        raise ValueError(
            f"ground_truth {ground_truth[:80]!r} is empty after normalisation: fix or drop this dataset row"
        )
    return normalized


def compute_score(response: str, ground_truth: str, *, boxed_fallback: bool = False) -> RewardResult:
    """Score one response. `boxed_fallback` reads the last \\boxed{} when there is no Answer line (the
    paper's rule has no fallback: a response without an Answer line is wrong)."""
    if not isinstance(response, str):
        raise TypeError(f"response must be a str, got {type(response).__name__}")
    target = normalize_ground_truth(ground_truth)
    answer = extract_answer(response, boxed_fallback=boxed_fallback)
    pred = normalize_answer(answer) if answer is not None else ""
    correct = pred == target
    return RewardResult(1.0 if correct else -1.0, correct, pred)
