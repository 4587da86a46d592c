"""Each step's rollout: stream prompts to the engine, score groups as they finish, keep the informative ones.

Dynamic sampling the streaming way (DAPO section 3.2, as slime does it rather than verl): prompts go out a few
at a time as `DynamicSampler.prompts_to_submit` asks, each finished group is scored and filtered at once, and
when the batch is full the surplus still generating is aborted. Valid groups that finish after the batch is
full are carried into the next step by the sampler.

Asynchronous DAPO (issue 14) on the same path: with rollout.partial the aborted surplus keeps its tokens and
continues at the next step (trainer/rollout/flights.py); with rollout.max_staleness = eta > 0 the surplus is
not aborted at all, the next step's collection starts while the policy trains, and weight updates interrupt
(partial) or retract generation instead of waiting for it. Every token keeps the version of the
weights that generated it; a group with a token more than eta versions behind the policy of the step it
would train in is dropped (or generated again) and counted, so dynamic sampling stays exact: groups are
judged whole, when their last sample completes, and only informative ones fill the batch.

Runs on global rank 0 inside its asyncio loop; the other ranks receive the finished batch.
"""

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

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
from megatron_dapo.rollout.types import Completion, SamplingParams
from megatron_dapo.trainer.batch import Group, Response
from megatron_dapo.trainer.rollout.flights import Flight


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
    partial: bool = False  # interrupted samples keep their tokens and continue later (rollout.partial)
    max_staleness: int = 0  # rollout.max_staleness (eta); > 0: generation runs ahead of training
    regenerate_stale: bool = False  # a group too stale to train on is generated again from its prompt

    @property
    def staleness_bound(self) -> int:
        """The most versions a trained token may lag the step's policy: eta, and 1 in the synchronous loop,
        whose carried-over groups and continued samples come from the weights before the step's."""
        return max(self.max_staleness, 1)


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
class Tally:
    """What happened to generated tokens between two batches (the next batch's metrics)."""

    tokens_generated: int = 0  # returned by the engine, finished or interrupted
    tokens_discarded: int = 0  # interrupted without rollout.partial: thrown away
    tokens_dropped_stale: int = 0  # of groups too stale to train on
    dropped_stale_samples: int = 0
    resumed_samples: int = 0  # interrupted samples continued from their tokens
    groups_aborted: int = 0
    engine_wait_weights_s: float = 0.0  # generation paused for a weight update


class RolloutCollector:
    """Fills each step's batch of groups from the prompt stream through the engine.

    The flights it runs, the interrupted ones it will continue and the prompts it will generate again live
    here between steps: with rollout.max_staleness > 0 the rollout role starts the next step's `collect`
    while the policy trains, and generation continues through weight updates (`pause` / `resume`).
    """

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
        self.version = 0  # the weights the engine holds: set at every `resume`
        self.running: list[Flight] = []
        self.waiting: list[Flight] = []  # interrupted, to continue at their next launch
        self.retry: list[TokenizedPrompt] = []  # prompts of groups dropped as stale, to generate again
        self._prompts = {p.record.index: p for p in loader.prompts}  # by training-set row
        self.tally = Tally()
        self._unpaused = asyncio.Event()
        self._unpaused.set()
        self._paused_at: float | None = None  # when the engine was paused, None: not paused

    async def collect(self, step: int) -> tuple[list[Group], dict[str, dict[str, float]]]:
        """The step's batch (prompts_per_step groups) and its rollout metrics, grouped for the tracker."""
        started = time.perf_counter()
        skipped_before = self.loader.skipped_saturated
        owed = 0  # prompts the sampler asked for that wait for a free slot
        submitted = 0
        finished: list[Group] = []  # every group judged this step, kept or not
        limit = self.settings.max_inflight_prompts
        try:
            await self._drop_stale(step)
            while not self.sampler.full:
                await self._unpaused.wait()  # a weight update is under way
                in_flight = owed + len(self.running) + len(self.waiting)
                # Raises DynamicSamplingError once the round budget is spent with nothing left in flight.
                owed += self.sampler.prompts_to_submit(in_flight=in_flight)
                while self.waiting and len(self.running) < limit:
                    self._launch(self.waiting.pop(0))
                while owed and len(self.running) < limit:
                    self._launch(self._new_flight(step, submitted))
                    owed, submitted = owed - 1, submitted + 1
                self._settle(await self._next_finished(), step, finished)
            await self._settle_surplus(step, finished)
            if self.loader.saturation is not None:  # every judged group, kept or filtered: what to skip next
                for group in finished:
                    self.loader.saturation.record(group.prompt_index, group.correct, step)
        except BaseException:
            # A failed request (or a cancelled step) must not leave the others generating.
            running, self.running = self.running, []
            for flight in running:
                flight.task.cancel()
            await asyncio.gather(*(f.task for f in running), return_exceptions=True)
            raise
        batch, stats = self.sampler.take_batch()
        tally, self.tally = self.tally, Tally()
        if self.settings.max_staleness > 0:  # what the next step could not train on stops generating now
            await self._drop_stale(step + 1)
        metrics = _rollout_metrics(batch, finished, tally, stats, submitted, self.sampler.enabled)
        metrics["rollout"].update(staleness_metrics(batch, step))
        metrics["sampling"]["prompts_skipped_saturated"] = self.loader.skipped_saturated - skipped_before
        elapsed = time.perf_counter() - started
        metrics["timing"] = {
            "rollout_s": elapsed,
            "tokens_per_s": tally.tokens_generated / max(elapsed, 1e-9),
            "engine_wait_weights_s": tally.engine_wait_weights_s,
        }
        return batch, metrics

    async def pause(self) -> None:
        """Before the weights change: no new launch, and the running samples are interrupted (to continue
        under the new weights) with rollout.partial, or else retracted: the engine keeps them and, after the
        update, recomputes their prefix under the new weights and goes on."""
        self._unpaused.clear()
        if self.running and self._paused_at is None:
            self._paused_at = time.perf_counter()
            await self.engine.pause_generation("abort" if self.settings.partial else "retract")

    async def resume(self, version: int) -> None:
        """The engine holds weight `version` now: generation goes on."""
        self.version = version
        if self._paused_at is not None:
            await self.engine.continue_generation()
            self.tally.engine_wait_weights_s += time.perf_counter() - self._paused_at
            self._paused_at = None
        self._unpaused.set()

    def _new_flight(self, step: int, submission: int) -> Flight:
        prompt = self.retry.pop(0) if self.retry else self.loader.take(1)[0]
        return Flight.new(prompt, step, submission, self.settings.samples_per_prompt)

    def _launch(self, flight: Flight) -> None:
        self.tally.resumed_samples += flight.partial_samples
        flight.launch(self.engine, self.settings.params, self.version, self.settings.seed)
        self.running.append(flight)

    async def _next_finished(self) -> Flight:
        """Removed from `running`: the oldest flight (deterministic), else the oldest of those done."""
        if self.settings.deterministic:
            flight = self.running.pop(0)
            await asyncio.wait([flight.task])
            return flight
        await asyncio.wait([f.task for f in self.running], return_when=asyncio.FIRST_COMPLETED)
        flight = next(f for f in self.running if f.task.done())
        self.running.remove(flight)
        return flight

    def _settle(self, flight: Flight, step: int, finished: list[Group]) -> None:
        """A launch has ended: judge the group if every sample is done, else keep the flight to continue
        (rollout.partial) or drop it."""
        self.tally.tokens_generated += flight.settle(flight.task.result())
        if not flight.finished:
            if self.settings.partial:
                self.waiting.append(flight)
            else:
                self.tally.groups_aborted += 1
                self.tally.tokens_discarded += flight.tokens
            return
        group = self._group(flight)
        if self._stale(group.weight_version, step):
            self._drop(group.prompt_index, len(group.responses), flight.tokens)
            return
        finished.append(group)
        self.sampler.add(group, group.correct)

    def _group(self, flight: Flight) -> Group:
        group = score_group(
            flight.prompt, [s.completion() for s in flight.samples], self.tokenizer, self.settings.reward
        )
        responses = tuple(
            replace(r, version_spans=tuple(s.spans))
            for r, s in zip(group.responses, flight.samples, strict=True)
        )
        return replace(group, responses=responses, weight_version=flight.oldest_version)

    def _stale(self, version: int, step: int) -> bool:
        return step - 1 - version > self.settings.staleness_bound

    def _drop(self, prompt_index: int, samples: int, tokens: int) -> None:
        self.tally.dropped_stale_samples += samples
        self.tally.tokens_dropped_stale += tokens
        if self.settings.regenerate_stale:
            self.retry.append(self._prompts[prompt_index])

    async def _drop_stale(self, step: int) -> None:
        """Before collecting `step`: groups and flights too stale to train on at `step` leave."""
        for group in self.sampler.drop_kept(lambda g: self._stale(g.weight_version, step)):
            tokens = sum(len(r.token_ids) for r in group.responses)
            self._drop(group.prompt_index, len(group.responses), tokens)
        stale = [f for f in self.waiting + self.running if self._stale(f.oldest_version, step)]
        self.waiting = [f for f in self.waiting if f not in stale]
        self.running = [f for f in self.running if f not in stale]
        await self._interrupt([f for f in stale if f.task is not None])  # one round of aborts for all
        for flight in stale:
            if flight.task is not None:
                self.tally.tokens_generated += flight.settle(flight.task.result())
            self._drop(flight.prompt.record.index, len(flight.samples), flight.tokens)

    async def _interrupt(self, flights: list[Flight]) -> None:
        """Abort the flights' requests and wait until each has returned what it generated."""
        await asyncio.gather(*(self.engine.abort(rid) for f in flights for rid in f.request_ids))
        if flights:
            await asyncio.wait([f.task for f in flights])

    async def _settle_surplus(self, step: int, finished: list[Group]) -> None:
        """The batch is full. Synchronous: end what is still generating (deterministic runs await it, since
        whether an abort lands first is timing); groups that complete anyway are carried into the next
        step. Ahead of training (max_staleness > 0): generation goes on, less what the next step could not
        train on."""
        if self.settings.deterministic:
            while self.running:
                self._settle(await self._next_finished(), step, finished)
            return
        if self.settings.max_staleness == 0:  # else the next step's collection goes on with them
            await self._interrupt([f for f in self.running if not f.task.done()])
            while self.running:
                self._settle(await self._next_finished(), step, finished)

    def state_dict(self) -> dict[str, Any]:
        """The flights to continue (a running launch restarts from its samples' settled tokens) and the
        prompts to generate again."""
        return {
            "flights": [f.state() for f in self.waiting + self.running],
            "retry": list(self.retry),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.waiting = [Flight.from_state(s) for s in state.get("flights", [])]
        self.retry = list(state.get("retry", []))


def staleness_metrics(batch: Sequence[Group], step: int) -> dict[str, float]:
    """Over the batch's tokens: how many versions the weights that generated each lag the step's policy
    (version step - 1), and the share of tokens from older weights."""
    lags = torch.tensor(
        [(step - 1 - v, n) for g in batch for r in g.responses for v, n in r.spans(g.weight_version)],
        dtype=torch.float64,
    ).reshape(-1, 2)
    tokens = lags[:, 1].sum().clamp(min=1)
    return {
        "staleness_max": lags[:, 0].max().item() if len(lags) else 0.0,
        "staleness_mean": (lags[:, 0] * lags[:, 1]).sum().item() / tokens.item(),
        "offpolicy_token_share": lags[lags[:, 0] >= 1, 1].sum().item() / tokens.item(),
    }


def _rollout_metrics(
    batch: Sequence[Group],
    finished: Sequence[Group],
    tally: Tally,
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
        "groups_aborted": tally.groups_aborted,
        "groups_kept": stats["groups_kept"],
        "groups_carried_in": stats["groups_carried_in"],
        "groups_carried_out": stats["groups_carried_out"],
        "kept_group_share": stats["groups_kept"] / max(len(finished), 1),
        "groups_all_correct_share": shares.get("groups_all_correct_share", 0.0),
        "groups_all_wrong_share": shares.get("groups_all_wrong_share", 0.0),
        "tokens_generated": tally.tokens_generated,
        "tokens_trained": tokens_trained,
        "tokens_filtered": tokens_filtered,  # of all-correct and all-wrong groups, dropped by the filter
        "filtered_token_share": tokens_filtered / max(tally.tokens_generated, 1),
        "tokens_discarded": tally.tokens_discarded,  # interrupted samples thrown away (no rollout.partial)
        "tokens_dropped_stale": tally.tokens_dropped_stale,
    }
    rollout["resumed_samples"] = tally.resumed_samples
    rollout["dropped_stale_samples"] = tally.dropped_stale_samples
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
