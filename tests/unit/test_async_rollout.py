"""Asynchronous DAPO's collector against a fake engine whose samples take time per token: generation ahead
of training under a staleness bound, partial rollouts continued across weight updates, exact state."""

import asyncio
import random

import pytest

from megatron_dapo.algo import DynamicSampler
from megatron_dapo.data.dataset import PromptLoader
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from megatron_dapo.trainer.rollout.collector import RewardSettings, RolloutCollector, RolloutSettings
from megatron_dapo.trainer.rollout.flights import Flight
from tests.unit.test_trainer_rollout import TOKENIZER, prompts

G = 4
MAX_TOKENS = 24
FILLER = TOKENIZER(".", add_special_tokens=False)["input_ids"][0]


class TimedEngine:
    """Each sample emits filler tokens one tick at a time, then its answer and EOS at once; how many
    fillers and whether the answer is right come from the request's seed, the tick length from the wall
    clock's own generator. pause("abort") ends every running sample with its tokens so far;
    pause("retract") freezes them until continue_generation."""

    def __init__(self, accuracies: list[float], *, tick_s: float = 0.001, wall_seed: int = 0) -> None:
        self.accuracies, self.tick_s = accuracies, tick_s
        self.wall = random.Random(wall_seed)
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.aborted: set[str] = set()
        self.abort_running = False
        self.active = 0
        self.pauses: list[str] = []
        self.inputs: dict[str, tuple[int, ...]] = {}  # request id -> prompt (+ partial response)

    async def generate(self, input_ids, params: SamplingParams, n: int = 1, *, request_id=None):
        self.inputs[request_id] = tuple(input_ids)
        samples = (self._sample(input_ids, params, i, request_id) for i in range(n))
        return list(await asyncio.gather(*samples))

    async def _sample(self, input_ids, params: SamplingParams, i: int, request_id: str) -> Completion:
        draw = random.Random(params.seed + i)
        row = input_ids[2] - 7
        answer = row if draw.random() < self.accuracies[row] else -1
        tail = TOKENIZER(f"Answer: {answer}", add_special_tokens=False)["input_ids"] + [
            TOKENIZER.eos_token_id
        ]
        length = min(draw.randint(0, MAX_TOKENS), params.max_new_tokens - len(tail))
        tokens: list[int] = []
        self.active += 1
        try:
            while len(tokens) < length:
                await self.unpaused.wait()
                if request_id in self.aborted or self.abort_running:
                    return Completion(tokens, [-0.5] * len(tokens), FinishReason.ABORT)
                tokens.append(FILLER)
                await asyncio.sleep(self.tick_s * self.wall.uniform(0.2, 3.0))
        finally:
            self.active -= 1
        tokens += tail
        return Completion(tokens, [-0.5] * len(tokens), FinishReason.STOP)

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def pause_generation(self, mode: str) -> None:
        self.pauses.append(mode)
        if mode == "abort":
            self.abort_running = True
            while self.active:
                await asyncio.sleep(self.tick_s)
        else:
            self.unpaused.clear()

    async def continue_generation(self) -> None:
        self.abort_running = False
        self.unpaused.set()


def collector(engine, accuracies, *, eta: int, partial: bool, deterministic=False, regenerate=False):
    loader = PromptLoader(prompts(accuracies), seed=3)
    settings = RolloutSettings(
        samples_per_prompt=G,
        params=SamplingParams(max_new_tokens=MAX_TOKENS),
        max_inflight_prompts=8,
        seed=11,
        deterministic=deterministic,
        reward=RewardSettings(max_response_tokens=MAX_TOKENS, overlong_buffer_tokens=None),
        partial=partial,
        max_staleness=eta,
        regenerate_stale=regenerate,
    )
    return RolloutCollector(engine, loader, DynamicSampler(4, max_rounds=50), TOKENIZER, settings)


async def train_overlapped(collect: RolloutCollector, steps: int, *, seed: int, deterministic=False):
    """The rollout role's overlapped schedule: hand over step s's batch, collect s+1 while "training",
    pause around the weight update, resume with version s. Returns every step's (batch, metrics)."""
    wall = random.Random(seed)
    await collect.resume(0)
    steps_out, ahead = [], None
    for step in range(1, steps + 1):
        result = await ahead if ahead is not None else await collect.collect(step)
        steps_out.append(result)
        ahead = asyncio.ensure_future(collect.collect(step + 1))
        await asyncio.sleep(wall.uniform(0.0, 0.03))  # training
        if deterministic:
            await asyncio.shield(ahead)
        else:
            await collect.pause()
        await asyncio.sleep(wall.uniform(0.0, 0.01))  # the weights travel
        await collect.resume(step)
    ahead.cancel()
    await asyncio.gather(ahead, return_exceptions=True)
    return steps_out


def lags(batch, step: int) -> list[int]:
    return [step - 1 - v for g in batch for r in g.responses for v, _ in r.spans(g.weight_version)]


@pytest.mark.parametrize("trial", range(6))
def test_staleness_never_exceeds_the_bound_whatever_the_finish_order(trial):
    rng = random.Random(trial)
    eta, partial = rng.choice([1, 2]), rng.random() < 0.5
    accuracies = [rng.choice([0.0, 0.5, 1.0, 0.3]) for _ in range(400)]
    engine = TimedEngine(accuracies, tick_s=rng.uniform(0.0003, 0.002), wall_seed=trial)
    collect = collector(engine, accuracies, eta=eta, partial=partial)
    results = asyncio.run(train_overlapped(collect, steps=6, seed=trial))
    seen_lags = []
    for step, (batch, metrics) in enumerate(results, start=1):
        assert len(batch) == 4 and all(0 < sum(g.correct) < G for g in batch)  # dynamic sampling is exact
        step_lags = lags(batch, step)
        assert max(step_lags) <= eta and min(step_lags) >= 0
        assert metrics["rollout"]["staleness_max"] == max(step_lags)
        seen_lags += step_lags
        for group in batch:  # every token has a version, in order
            for response in group.responses:
                assert sum(n for _, n in response.version_spans) == len(response.token_ids)
                versions = [v for v, _ in response.version_spans]
                assert versions == sorted(versions)
    assert max(seen_lags) >= 1, "overlapped generation trained on nothing off-policy"
    assert set(engine.pauses) <= {"abort" if partial else "retract"}  # none when nothing was running


def test_partial_rollouts_continue_interrupted_samples_from_their_tokens():
    accuracies = [0.5] * 300
    engine = TimedEngine(accuracies, tick_s=0.002, wall_seed=5)
    collect = collector(engine, accuracies, eta=1, partial=True)
    results = asyncio.run(train_overlapped(collect, steps=5, seed=5))
    resumed = sum(m["rollout"]["resumed_samples"] for _, m in results)
    assert resumed > 0
    continued = [r for b, _ in results for g in b for r in g.responses if len(r.version_spans) > 1]
    assert continued, "no trained sample spans two weight versions"
    # A continuation was prompted with the original prompt plus the tokens the sample had.
    continuations = [
        ids for rid, ids in engine.inputs.items() if "-r" in rid and "s" in rid.rsplit("-", 1)[1]
    ]
    assert continuations and all(len(ids) > 3 and ids[:2] == (5, 6) for ids in continuations)
    assert sum(m["sampling"]["tokens_discarded"] for _, m in results) == 0


def test_without_partial_the_synchronous_surplus_is_thrown_away_and_counted():
    accuracies = [0.5] * 100
    engine = TimedEngine(accuracies, wall_seed=2)
    collect = collector(engine, accuracies, eta=0, partial=False)
    collect.sampler._prev_kept, collect.sampler._prev_seen = 1, 9  # over-submits: a surplus to abort
    _, metrics = asyncio.run(collect.collect(1))
    assert metrics["sampling"]["groups_aborted"] > 0 and metrics["sampling"]["tokens_discarded"] > 0
    assert not collect.waiting


def test_groups_past_the_bound_are_dropped_or_regenerated():
    accuracies = [0.5] * 100

    async def carry_two_versions(collect: RolloutCollector):
        first, _ = await collect.collect(1)
        collect.sampler._kept = list(first)  # pretend these were carried over: version 0
        collect.version = 2
        return first, *(await collect.collect(3))  # step 3 trains version 2: version 0 lags 2 > 1

    for regenerate in (False, True):
        engine = TimedEngine(accuracies, wall_seed=3)
        collect = collector(engine, accuracies, eta=1, partial=True, regenerate=regenerate)
        first, batch, metrics = asyncio.run(carry_two_versions(collect))
        assert metrics["rollout"]["dropped_stale_samples"] >= 4 * G
        assert max(lags(batch, 3)) <= 1 and metrics["rollout"]["staleness_max"] <= 1
        step_three = {int(rid.split("-")[2]) for rid in engine.inputs if rid.startswith("step3-")}
        assert bool(step_three & {g.prompt_index for g in first}) == regenerate  # asked again first


def test_deterministic_overlapped_collection_does_not_depend_on_timing():
    accuracies = [random.Random(7).choice([0.0, 0.5, 1.0]) for _ in range(300)]
    runs = []
    for wall_seed in (1, 2):
        engine = TimedEngine(accuracies, wall_seed=wall_seed)
        collect = collector(engine, accuracies, eta=1, partial=True, deterministic=True)
        results = asyncio.run(train_overlapped(collect, steps=4, seed=wall_seed, deterministic=True))
        runs.append([batch for batch, _ in results])
        assert max(lags(results[-1][0], 4)) == 1  # generated while the step before trained
    assert runs[0] == runs[1]


def test_flights_survive_a_checkpoint_with_their_tokens():
    accuracies = [0.5] * 100
    engine = TimedEngine(accuracies, tick_s=0.002, wall_seed=4)
    collect = collector(engine, accuracies, eta=0, partial=True)
    collect.sampler._prev_kept, collect.sampler._prev_seen = 1, 9
    asyncio.run(collect.collect(1))
    assert collect.waiting, "the aborted surplus should wait to continue"
    state = collect.state_dict()
    restored = collector(engine, accuracies, eta=0, partial=True)
    restored.load_state_dict(state)
    assert [f.state()["samples"] for f in restored.waiting] == [f.state()["samples"] for f in collect.waiting]
    restored.version = 1
    batch, metrics = asyncio.run(restored.collect(2))
    assert len(batch) == 4 and metrics["rollout"]["resumed_samples"] > 0


def test_a_sample_interrupted_at_the_limit_is_truncated_not_continued():
    async def relaunch() -> Flight:
        flight = Flight.new(prompts([0.5])[0], step=1, submission=0, samples=2)
        flight.samples[0].extend(
            Completion([FILLER] * MAX_TOKENS, [-0.1] * MAX_TOKENS, FinishReason.ABORT), 0
        )
        flight.launch(TimedEngine([0.5]), SamplingParams(max_new_tokens=MAX_TOKENS), version=1, run_seed=3)
        flight.settle(await flight.task)
        return flight

    flight = asyncio.run(relaunch())
    assert flight.finished and flight.samples[0].finish_reason is FinishReason.LENGTH
    assert len(flight.samples[0].token_ids) == MAX_TOKENS and flight.request_ids == ["step1-0-0-r1s1"]
