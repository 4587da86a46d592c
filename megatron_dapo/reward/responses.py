"""The DAPO rule on an engine's samples: decode each response, then score it against the ground truth.

Training rollouts (trainer/rollout/collector.py, which adds the soft overlong punishment) and evaluation
(eval/run.py, which refuses aborted samples) both score through `score_responses`, so the two can never
disagree on what is correct.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from megatron_dapo.reward.score import compute_score


@dataclass(frozen=True)
class ScoredResponse:
    """One decoded sample and its rule reward."""

    text: str  # decoded, special tokens left out
    pred: str  # the normalised answer; "" when the response has none
    correct: bool
    score: float  # the rule reward: +1.0 correct, -1.0 otherwise (no answer included)


def score_responses(
    ground_truth: str,
    responses: Sequence[Sequence[int]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    boxed_fallback: bool,
) -> list[ScoredResponse]:
    """Decode each response's generated token ids and score it with the DAPO rule (compute_score).

    Special tokens are dropped when decoding: the stop token the engine returns is no part of the answer."""
    texts = tokenizer.batch_decode([list(ids) for ids in responses], skip_special_tokens=True)
    scored = []
    for text in texts:
        rule = compute_score(text, ground_truth, boxed_fallback=boxed_fallback)
        scored.append(ScoredResponse(text=text, pred=rule.pred, correct=rule.correct, score=rule.score))
    return scored
