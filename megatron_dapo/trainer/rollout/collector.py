"""One step's rollout: stream prompts to the engine, score groups as they finish, keep the informative ones.

Dynamic sampling the streaming way (DAPO section 3.2, as slime does it rather than verl): prompts go out a few
at a time as `DynamicSampler.prompts_to_submit` asks, each finished group is scored and filtered at once, and
when the batch is full the surplus still generating is aborted. Valid groups that finish after the batch is
full are carried into the next step by the sampler.

Runs on global rank 0 inside its asyncio loop; the other ranks receive the finished batch.
"""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from megatron_dapo.algo import (
    DynamicSampler,
    finalize_metrics,
    group_metric_sums,
    is_informative,
    overlong_penalty,
    rollout_metric_sums,
)
from megatron_dapo.data.dataset import PromptLoader, TokenizedPrompt
from megatron_dapo.reward import score_responses
from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from megatron_dapo.trainer.batch import Group, Response

_SEED_LIMIT = 2**31 - 2**16  # the engine draws sample i of a request with seed + i: leave room for i


@dataclass(frozen=True)
class RewardSettings:
    max_response_tokens: int  # L_max
    overlong_buffer_tokens: int | None  # L_cache of the soft overlong punishment; None: no punishment
    boxed_fallback: bool = False


@dataclass(frozen=True)
class RolloutSettings:
    samples_per_prompt: int  # G
    params: SamplingParams  # the training sampling; each request gets its own seed
    max_inflight_prompts: int  # prompts generating at once (a bound on engine load, not on the batch)
    seed: int  # the run's seed
    deterministic: bool  # take groups in submission order and await the surplus instead of aborting it
    reward: RewardSettings


def request_seed(run_seed: int, step: int, prompt_index: int, submission: int) -> int:
    """The sampling seed of one request: the same (run, step, prompt, submission) always samples the same."""
    state = np.random.SeedSequence([run_seed, step, prompt_index, submission]).generate_state(1)[0]
    return int(state) % _SEED_LIMIT


def score_group(
    prompt: TokenizedPrompt,
    completions: Sequence[Completion],
    tokenizer: PreTrainedTokenizerBase,
    settings: RewardSettings,
) -> Group:
    """Rule reward on each decoded response (the scoring evaluation uses too), plus the soft overlong
    punishment on its length."""
    rules = score_responses(
        prompt.record.ground_truth,
        [c.token_ids for c in completions],
        tokenizer,
        boxed_fallback=settings.boxed_fallback,
    )
    responses = []
    for completion, rule in zip(completions, rules, strict=True):
        penalty = 0.0
        if settings.overlong_buffer_tokens is not None:
            penalty = overlong_penalty(
                len(completion.token_ids), settings.max_response_tokens, settings.overlong_buffer_tokens
            )
        responses.append(
            Response(
                token_ids=tuple(completion.token_ids),
                logprobs=tuple(completion.logprobs),
                finish_reason=completion.finish_reason,
                reward=rule.score + penalty,
                correct=rule.correct,
            )
        )
    return Group(prompt.record.index, prompt.token_ids, tuple(responses))


@dataclass
class _Request:
    prompt: TokenizedPrompt
    request_id: str
    task: asyncio.Task  # -> list[Completion]
    weight_version: int  # the engine holds the weights published after step - 1 while step generates


class RolloutCollector:
    """Fills one step's batch of groups from the prompt stream through the engine."""

    def __init__(
        self,
        engine: RolloutEngine,
        loader: PromptLoader,
        sampler: DynamicSampler[Group],
        tokenizer: PreTrainedTokenizerBase,
        settings: RolloutSettings,
    ) -> None:
        self.engine, self.loader, self.sampler = engine, loader, sampler
        self.tokenizer, self.settings = tokenizer, settings

    async def collect(self, step: int) -> tuple[list[Group], dict[str, dict[str, float]]]:
        """The step's batch (prompts_per_step groups) and its rollout metrics, grouped for the tracker."""
        started = time.perf_counter()
        skipped_before = self.loader.skipped_saturated
        running: list[_Request] = []
        owed = 0  # prompts the sampler asked for that wait for a free slot
        submitted = 0
        finished: list[Group] = []  # every group scored this step, kept or not
        aborted: list[list[Completion]] = []
        try:
            while not self.sampler.full:
                # Raises DynamicSamplingError once the round budget is spent with nothing left in flight.
                owed += self.sampler.prompts_to_submit(in_flight=owed + len(running))
                while owed and len(running) < self.settings.max_inflight_prompts:
                    running.append(self._submit(self.loader.take(1)[0], step, submitted))
                    owed, submitted = owed - 1, submitted + 1
                request = await self._next_finished(running)
                self._add(request, await request.task, finished, aborted)
            await self._settle_surplus(running, finished, aborted)
            if self.loader.saturation is not None:  # every judged group, kept or filtered: what to skip next
                for group in finished:
                    self.loader.saturation.record(group.prompt_index, group.correct, step)
        except BaseException:
            # A failed request (or a cancelled step) must not leave the others generating.
            for request in running:
                request.task.cancel()
            await asyncio.gather(*(r.task for r in running), return_exceptions=True)
            raise
        batch, stats = self.sampler.take_batch()
        metrics = _rollout_metrics(batch, finished, aborted, stats, submitted, self.sampler.enabled)
        metrics["sampling"]["prompts_skipped_saturated"] = self.loader.skipped_saturated - skipped_before
        elapsed = time.perf_counter() - started
        generated = metrics["sampling"]["tokens_generated"]
        metrics["timing"] = {"rollout_s": elapsed, "tokens_per_s": generated / max(elapsed, 1e-9)}
        return batch, metrics

    def _submit(self, prompt: TokenizedPrompt, step: int, submission: int) -> _Request:
        seed = request_seed(self.settings.seed, step, prompt.record.index, submission)
        request_id = f"step{step}-{submission}-{prompt.record.index}"
        generation = self.engine.generate(
            prompt.token_ids,
            replace(self.settings.params, seed=seed),
            n=self.settings.samples_per_prompt,
            request_id=request_id,
        )
        return _Request(prompt, request_id, asyncio.ensure_future(generation), weight_version=step - 1)

    async def _next_finished(self, running: list[_Request]) -> _Request:
        """Removed from `running`: the oldest request (deterministic), else the oldest of those finished."""
        if self.settings.deterministic:
            return running.pop(0)
        await asyncio.wait([r.task for r in running], return_when=asyncio.FIRST_COMPLETED)
        request = next(r for r in running if r.task.done())
        running.remove(request)
        return request

    def _add(
        self,
        request: _Request,
        completions: list[Completion],
        finished: list[Group],
        aborted: list[list[Completion]],
    ) -> None:
        if any(c.finish_reason is FinishReason.ABORT for c in completions):
            aborted.append(completions)
            return
        group = score_group(request.prompt, completions, self.tokenizer, self.settings.reward)
        group = replace(group, weight_version=request.weight_version)
        finished.append(group)
        self.sampler.add(group, group.correct)

    async def _settle_surplus(
        self, running: list[_Request], finished: list[Group], aborted: list[list[Completion]]
    ) -> None:
        """The batch is full: end what is still generating. Groups that complete anyway are offered to the
        sampler, which carries the valid ones into the next step."""
        if not self.settings.deterministic:
            # Whether an abort lands before a group finishes is timing: deterministic runs await instead.
            await asyncio.gather(*(self.engine.abort(r.request_id) for r in running if not r.task.done()))
        while running:
            request = running.pop(0)
            self._add(request, await request.task, finished, aborted)


def _rollout_metrics(
    batch: Sequence[Group],
    finished: Sequence[Group],
    aborted: Sequence[Sequence[Completion]],
    stats: dict[str, int],
    submitted: int,
    filtering: bool,
) -> dict[str, dict[str, float]]:
    """Accuracy, rewards and lengths over every group generated this step and over the batch trained on;
    `filtering`: dynamic sampling is on, so saturated groups were generated and thrown away."""
    generated = _sample_metrics(finished)
    kept = _sample_metrics(batch)
    shares = finalize_metrics(
        group_metric_sums([sum(g.correct) for g in finished], [len(g.responses) for g in finished])
    )
    tokens_aborted = sum(len(c.token_ids) for completions in aborted for c in completions)
    tokens_finished = sum(len(r.token_ids) for g in finished for r in g.responses)
    tokens_trained = sum(len(r.token_ids) for g in batch for r in g.responses)
    filtered = [g for g in finished if filtering and not is_informative(g.correct)]
    tokens_filtered = sum(len(r.token_ids) for g in filtered for r in g.responses)
    rollout = {
        **generated,
        "accuracy_kept": kept["accuracy"],
        "reward_mean_kept": kept["reward_mean"],
        "response_length_mean_kept": kept["response_length_mean"],
    }
    sampling = {
        "prompts_submitted": submitted,
        "groups_finished": len(finished),
        "groups_aborted": len(aborted),
        "groups_kept": stats["groups_kept"],
        "groups_carried_in": stats["groups_carried_in"],
        "groups_carried_out": stats["groups_carried_out"],
        "kept_group_share": stats["groups_kept"] / max(len(finished), 1),
        "groups_all_correct_share": shares.get("groups_all_correct_share", 0.0),
        "groups_all_wrong_share": shares.get("groups_all_wrong_share", 0.0),
        "tokens_generated": tokens_finished + tokens_aborted,
        "tokens_trained": tokens_trained,
        "tokens_filtered": tokens_filtered,  # of all-correct and all-wrong groups, dropped by the filter
        "filtered_token_share": tokens_filtered / max(tokens_finished + tokens_aborted, 1),
    }
    return {"rollout": rollout, "sampling": sampling}


def _sample_metrics(groups: Sequence[Group]) -> dict[str, float]:
    responses = [r for g in groups for r in g.responses]
    if not responses:
        return {"accuracy": 0.0, "reward_mean": 0.0, "response_length_mean": 0.0}
    sums = rollout_metric_sums(
        torch.tensor([len(r.token_ids) for r in responses]),
        torch.tensor([r.truncated for r in responses]),
        torch.tensor([r.correct for r in responses]),
    )
    metrics = finalize_metrics(sums)
    metrics["reward_mean"] = sum(r.reward for r in responses) / len(responses)
    return metrics
