"""Evaluation through a running engine: every prompt sampled n times at once, scored, aggregated."""

import asyncio
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from megatron_dapo.data.dataset import TokenizedPrompt
from megatron_dapo.eval.results import EvalResult, ProblemResult, SampleResult, summarize
from megatron_dapo.eval.sets import EvalSet
from megatron_dapo.reward import normalize_ground_truth, score_responses
from megatron_dapo.rollout.engine import EngineError, RolloutEngine
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams

T = TypeVar("T")


def score_problem(
    problem: int,
    prompt: TokenizedPrompt,
    completions: Sequence[Completion],
    tokenizer: PreTrainedTokenizerBase,
    *,
    boxed_fallback: bool = False,
) -> ProblemResult:
    """Decode and score one problem's samples with the DAPO rule, as training does (reward/responses.py)."""
    for i, completion in enumerate(completions):
        if completion.finish_reason is FinishReason.ABORT:
            # An evaluation with aborted samples would report numbers of a different sampling: refuse it.
            raise EngineError(f"row {prompt.record.index}: sample {i} was aborted by the engine")
    scored = score_responses(
        prompt.record.ground_truth,
        [c.token_ids for c in completions],
        tokenizer,
        boxed_fallback=boxed_fallback,
    )
    samples = tuple(
        SampleResult(
            sample=i,
            response=response.text,
            pred=response.pred,
            correct=response.correct,
            finish_reason=completion.finish_reason,
            response_tokens=len(completion.token_ids),
        )
        for i, (completion, response) in enumerate(zip(completions, scored, strict=True))
    )
    return ProblemResult(problem, prompt.record.index, prompt.record.ground_truth, samples)


async def evaluate(
    engine: RolloutEngine,
    prompts: Sequence[TokenizedPrompt],
    *,
    samples_per_problem: int,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    boxed_fallback: bool = False,
    ks: Sequence[int] | None = None,
    progress_desc: str | None = "eval",
) -> EvalResult:
    """Sample `samples_per_problem` responses to every prompt through `engine`, score and aggregate them.

    Every prompt is submitted at once: the engine dispatches them over its servers. With `params.seed` set,
    problem p samples with seeds seed + p * n + i, so that no two samples share a seed. `progress_desc`
    None: no progress bar.
    """
    if samples_per_problem < 1:
        raise ValueError(f"samples_per_problem={samples_per_problem}: need at least one sample per problem")
    if not prompts:
        raise ValueError("evaluate needs at least one prompt")
    for prompt in prompts:  # fail before generating, not after: an answer no response could match
        try:
            normalize_ground_truth(prompt.record.ground_truth)
        except ValueError as error:
            raise ValueError(f"row {prompt.record.index}: {error}") from None
    n = samples_per_problem
    # disable=None: a bar on a terminal only, not in log files.
    disable = True if progress_desc is None else None
    with tqdm(total=len(prompts) * n, desc=progress_desc, unit="sample", disable=disable) as bar:

        async def one_problem(position: int, prompt: TokenizedPrompt) -> ProblemResult:
            seeded = params if params.seed is None else replace(params, seed=params.seed + position * n)
            completions = await engine.generate(prompt.token_ids, seeded, n=n)
            result = score_problem(position, prompt, completions, tokenizer, boxed_fallback=boxed_fallback)
            bar.update(n)
            return result

        problems = await gather_or_cancel(one_problem(i, prompt) for i, prompt in enumerate(prompts))
    return summarize(problems, ks)


async def evaluate_sets(
    engine: RolloutEngine,
    eval_sets: Sequence[EvalSet],
    *,
    samples_per_problem: int,
    params: SamplingParams,
    tokenizer: PreTrainedTokenizerBase,
    boxed_fallback: bool = False,
) -> dict[str, EvalResult]:
    """Every set at once, so that no set waits for the slowest sample of another."""
    results = await gather_or_cancel(
        evaluate(
            engine,
            eval_set.prompts,
            samples_per_problem=samples_per_problem,
            params=params,
            tokenizer=tokenizer,
            boxed_fallback=boxed_fallback,
            progress_desc=eval_set.name,
        )
        for eval_set in eval_sets
    )
    return {eval_set.name: result for eval_set, result in zip(eval_sets, results, strict=True)}


async def gather_or_cancel(coroutines: Iterable[Coroutine[Any, Any, T]]) -> list[T]:
    """Run all at once; when one fails (or the caller is cancelled) cancel the others, which aborts their
    requests, and let them finish cancelling before the error goes up."""
    tasks = [asyncio.ensure_future(coroutine) for coroutine in coroutines]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
