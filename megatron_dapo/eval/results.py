"""What an evaluation reports: every scored sample, and avg@n, pass@k and cons@n over the problems."""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from megatron_dapo.reward import avg_at_k, cons_at_k, normalize_ground_truth, pass_at_k
from megatron_dapo.rollout.types import FinishReason


@dataclass(frozen=True)
class SampleResult:
    """One scored response."""

    sample: int  # 0..n-1 within its problem, in the engine's order
    response: str  # decoded, special tokens left out
    pred: str  # normalised answer; "" when the response has none
    correct: bool
    finish_reason: FinishReason
    response_tokens: int  # tokens generated, the stop token included


@dataclass(frozen=True)
class ProblemResult:
    """All samples of one problem."""

    problem: int  # position in the evaluated prompts
    index: int  # row in the dataset file
    ground_truth: str
    samples: tuple[SampleResult, ...]

    @property
    def num_correct(self) -> int:
        return sum(sample.correct for sample in self.samples)


@dataclass(frozen=True)
class EvalResult:
    """Metrics over all problems, and every sample behind them."""

    samples_per_problem: int  # n
    avg_at_n: float  # mean accuracy over all samples
    pass_at_k: dict[int, float]  # k -> mean over problems of the unbiased pass@k
    cons_at_n: float  # share of problems whose majority answer is right
    response_tokens_mean: float  # tokens per response
    truncation_ratio: float  # share of responses cut at max_new_tokens
    problems: tuple[ProblemResult, ...]

    @property
    def num_samples(self) -> int:
        return len(self.problems) * self.samples_per_problem

    def metrics(self) -> dict[str, float]:
        """Flat scalars for logging, e.g. {"avg@32": ..., "pass@1": ..., "cons@32": ...}."""
        n = self.samples_per_problem
        return {
            f"avg@{n}": self.avg_at_n,
            **{f"pass@{k}": value for k, value in self.pass_at_k.items()},
            f"cons@{n}": self.cons_at_n,
            "response_length_mean": self.response_tokens_mean,
            "truncation_ratio": self.truncation_ratio,
        }


def default_ks(samples_per_problem: int) -> tuple[int, ...]:
    """1, 2, 4, ... below n, then n: the pass@k curve at a glance."""
    ks = [2**i for i in range(samples_per_problem.bit_length()) if 2**i < samples_per_problem]
    return (*ks, samples_per_problem)


def summarize(problems: Sequence[ProblemResult], ks: Sequence[int] | None = None) -> EvalResult:
    """Aggregate scored problems, each with the same number of samples n; `ks` defaults to default_ks(n)."""
    if not problems:
        raise ValueError("summarize needs at least one problem")
    n = len(problems[0].samples)
    if any(len(problem.samples) != n for problem in problems):
        raise ValueError("every problem must have the same number of samples")
    ks = default_ks(n) if ks is None else tuple(ks)
    if not all(1 <= k <= n for k in ks):
        raise ValueError(f"ks={ks}: every k must be between 1 and samples_per_problem={n}")
    samples = [sample for problem in problems for sample in problem.samples]
    return EvalResult(
        samples_per_problem=n,
        avg_at_n=_mean(avg_at_k([s.correct for s in problem.samples]) for problem in problems),
        pass_at_k={k: _mean(pass_at_k(n, problem.num_correct, k) for problem in problems) for k in ks},
        cons_at_n=_mean(
            cons_at_k([s.pred for s in problem.samples], normalize_ground_truth(problem.ground_truth))
            for problem in problems
        ),
        response_tokens_mean=_mean(sample.response_tokens for sample in samples),
        truncation_ratio=_mean(sample.finish_reason is FinishReason.LENGTH for sample in samples),
        problems=tuple(problems),
    )


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return math.fsum(values) / len(values)
