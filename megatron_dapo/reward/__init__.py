"""The DAPO math reward (Answer-line rule with Minerva normalisation), the one scoring of an engine's samples
that training and evaluation share (responses.py), and evaluation metrics."""

from megatron_dapo.reward.answer import extract_answer, normalize_answer
from megatron_dapo.reward.eval_metrics import avg_at_k, cons_at_k, majority_answer, pass_at_k
from megatron_dapo.reward.responses import ScoredResponse, score_responses
from megatron_dapo.reward.score import RewardResult, compute_score, normalize_ground_truth

__all__ = [
    "RewardResult",
    "ScoredResponse",
    "avg_at_k",
    "compute_score",
    "cons_at_k",
    "extract_answer",
    "majority_answer",
    "normalize_answer",
    "normalize_ground_truth",
    "pass_at_k",
    "score_responses",
]
