"""The rollout collector against a fake engine: dynamic sampling fills the batch, the surplus is aborted or
carried over, a hopeless batch fails clearly, seeds make reruns identical."""

import asyncio
import random
from dataclasses import replace

import pytest

from megatron_dapo.algo import DynamicSampler, DynamicSamplingError, SkipSettings
from megatron_dapo.data.dataset import PromptLoader, TokenizedPrompt
from megatron_dapo.data.record import PromptRecord
from megatron_dapo.demo.tokenizer import build_demo_tokenizer
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from megatron_dapo.trainer.batch import Group, Response
from megatron_dapo.trainer.rollout.collector import (
    RewardSettings,
    RolloutCollector,
    RolloutSettings,
    Tally,
    _rollout_metrics,
    score_group,
)
from megatron_dapo.trainer.rollout.flights import request_seed

TOKENIZER = build_demo_tokenizer()
G = 4
MAX_TOKENS = 16


def prompts(accuracies: list[float]) -> list[TokenizedPrompt]:
    """Prompt i is answered correctly with probability accuracies[i] by the fake engine."""
    return [
        TokenizedPrompt(PromptRecord(index=i, problem=f"{acc}", ground_truth=str(i)), (5, 6, i + 7))
        for i, acc in enumerate(accuracies)
    ]


class FakeEngine:
    """Answers "Answer: <row>" (right) or "Answer: -1" (wrong) per sample, from the request's seed; takes a
    random time per request, so groups finish out of submission order. Aborted requests end with ABORT."""

    def __init__(self, accuracies: list[float], *, delay_s: float = 0.01, wall_seed: int = 0) -> None:
        self.accuracies = accuracies
        self.delay_s = delay_s
        self.wall = random.Random(wall_seed)  # timing only: never decides what is sampled
        self.requests: list[tuple[str, int]] = []  # (request_id, seed)
        self.aborted: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._abort_events: dict[str, asyncio.Event] = {}

    async def generate(
        self, input_ids, params: SamplingParams, n: int = 1, *, request_id=None
    ) -> list[Completion]:
        self.requests.append((request_id, params.seed))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        event = self._abort_events[request_id] = asyncio.Event()
        try:
            await asyncio.wait_for(event.wait(), timeout=self.delay_s * self.wall.uniform(0.1, 3.0))
            return [Completion([], [], FinishReason.ABORT) for _ in range(n)]
        except TimeoutError:
            pass
        finally:
            self.in_flight -= 1
        row = input_ids[-1] - 7
        samples = random.Random(params.seed)
        completions = []
        for _ in range(n):
            answer = row if samples.random() < self.accuracies[row] else -1
            ids = TOKENIZER(f"Answer: {answer}", add_special_tokens=False)["input_ids"] + [
                TOKENIZER.eos_token_id
            ]
            completions.append(Completion(ids, [-0.5] * len(ids), FinishReason.STOP))
        return completions

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort_events[request_id].set()


def collector(
    engine,
    accuracies,
    *,
    prompts_per_step=4,
    deterministic=False,
    max_rounds=10,
    inflight=8,
    enabled=True,
    skip=None,
):
    loader = PromptLoader(prompts(accuracies), seed=3, skip=skip)
    sampler = DynamicSampler(prompts_per_step, enabled=enabled, max_rounds=max_rounds)
    settings = RolloutSettings(
        samples_per_prompt=G,
        params=SamplingParams(max_new_tokens=MAX_TOKENS),
        max_inflight_prompts=inflight,
        seed=11,
        deterministic=deterministic,
        reward=RewardSettings(max_response_tokens=MAX_TOKENS, overlong_buffer_tokens=None),
    )
    return RolloutCollector(engine, loader, sampler, TOKENIZER, settings)


def run_step(collect: RolloutCollector, step: int):
    """One step's collection, the engine holding the weights of the step before (as after a sync)."""
    collect.version = step - 1
    return asyncio.run(collect.collect(step))


def mixed_accuracies(count: int, seed: int) -> list[float]:
    """A third of the prompts always right, a third always wrong, a third in between."""
    rng = random.Random(seed)
    return [rng.choice([0.0, 1.0, 0.5]) for _ in range(count)]


def test_dynamic_sampling_fills_the_batch_with_informative_groups_only():
    accuracies = mixed_accuracies(60, seed=1)
    engine = FakeEngine(accuracies)
    batch, metrics = run_step(collector(engine, accuracies), 1)
    assert len(batch) == 4
    for group in batch:
        assert 0 < sum(group.correct) < G  # all-correct and all-wrong groups were filtered
        assert accuracies[group.prompt_index] == 0.5
    sampling = metrics["sampling"]
    assert sampling["prompts_submitted"] > 4  # it had to ask for more prompts than the batch holds
    assert sampling["groups_all_correct_share"] > 0 and sampling["groups_all_wrong_share"] > 0
    assert metrics["rollout"]["accuracy_kept"] == pytest.approx(sum(sum(g.correct) for g in batch) / (4 * G))


def test_without_dynamic_sampling_every_group_is_kept():
    accuracies = mixed_accuracies(60, seed=2)
    engine = FakeEngine(accuracies)
    batch, metrics = run_step(collector(engine, accuracies, enabled=False), 1)
    assert len(batch) == 4 and metrics["sampling"]["prompts_submitted"] == 4


def test_the_surplus_is_aborted_and_valid_late_groups_carry_over():
    accuracies = [0.5] * 40  # nearly every group is informative: whatever finishes late is surplus
    engine = FakeEngine(accuracies, delay_s=0.02)
    collect = collector(engine, accuracies, prompts_per_step=4, inflight=12)
    collect.sampler._prev_kept, collect.sampler._prev_seen = 1, 9  # a low keep rate: it over-submits
    batch, metrics = run_step(collect, 1)
    assert len(batch) == 4
    assert engine.aborted, "requests still generating when the batch filled must be aborted"
    # An abort can cross a group finishing anyway: that group is kept (carried), not lost.
    assert 0 < metrics["sampling"]["groups_aborted"] <= len(engine.aborted)
    carried = metrics["sampling"]["groups_carried_out"]
    assert carried == len(collect.sampler.state_dict()["carried"])
    # The next step starts with the carried groups.
    batch2, metrics2 = run_step(collect, 2)
    assert metrics2["sampling"]["groups_carried_in"] == carried
    assert len(batch2) == 4


def test_deterministic_mode_awaits_the_surplus_and_carries_it_over():
    accuracies = [0.5] * 40
    engine = FakeEngine(accuracies)
    collect = collector(engine, accuracies, deterministic=True, inflight=12)
    collect.sampler._prev_kept, collect.sampler._prev_seen = 1, 9
    _, metrics = run_step(collect, 1)
    assert not engine.aborted
    assert metrics["sampling"]["groups_carried_out"] > 0


def test_in_flight_prompts_stay_within_the_limit():
    accuracies = mixed_accuracies(80, seed=3)
    engine = FakeEngine(accuracies)
    run_step(collector(engine, accuracies, prompts_per_step=8, inflight=3), 1)
    assert engine.max_in_flight <= 3


def test_a_batch_that_cannot_be_filled_fails_clearly():
    accuracies = [0.0] * 50  # every group all wrong
    engine = FakeEngine(accuracies, delay_s=0.001)
    with pytest.raises(DynamicSamplingError, match="after 2 rounds"):
        run_step(collector(engine, accuracies, max_rounds=2), 1)
    assert len(engine.requests) == 2 * 4  # exactly the round budget, then it stopped


@pytest.mark.parametrize("deterministic", [True, False])
def test_every_request_carries_its_own_seed(deterministic):
    accuracies = mixed_accuracies(60, seed=4)
    engine = FakeEngine(accuracies)
    run_step(collector(engine, accuracies, deterministic=deterministic), 7)
    seeds = [seed for _, seed in engine.requests]
    assert len(set(seeds)) == len(seeds)
    request_id, seed = engine.requests[0]
    row = int(request_id.rsplit("-", 1)[1])
    assert seed == request_seed(11, 7, row, 0)


def test_deterministic_collection_does_not_depend_on_timing():
    accuracies = mixed_accuracies(80, seed=5)
    runs = []
    for wall_seed in (1, 2):
        engine = FakeEngine(accuracies, wall_seed=wall_seed)
        collect = collector(engine, accuracies, deterministic=True)
        runs.append([run_step(collect, s)[0] for s in (1, 2)])
    assert runs[0] == runs[1]


def test_request_seeds_differ_by_every_input_and_repeat_exactly():
    base = request_seed(1, 2, 3, 4)
    assert base == request_seed(1, 2, 3, 4)
    variants = {request_seed(*args) for args in [(9, 2, 3, 4), (1, 9, 3, 4), (1, 2, 9, 4), (1, 2, 3, 9)]}
    assert base not in variants and len(variants) == 4
    assert 0 <= base < 2**31 - G


def test_score_group_adds_the_overlong_penalty_and_flags_truncation():
    prompt = prompts([1.0])[0]
    right = TOKENIZER("Answer: 0", add_special_tokens=False)["input_ids"]
    completions = [
        Completion(right, [-0.1] * len(right), FinishReason.STOP),
        Completion(right + [5] * 6, [-0.1] * (len(right) + 6), FinishReason.LENGTH),
    ]
    settings = RewardSettings(max_response_tokens=len(right) + 6, overlong_buffer_tokens=4)
    group = score_group(prompt, completions, TOKENIZER, settings)
    first, second = group.responses
    assert first.correct and first.reward == 1.0 and not first.truncated
    # 6 tokens past the answer: at L_max, the soft punishment is -1 on top of the rule reward.
    assert second.truncated and second.reward == pytest.approx(second.correct * 2 - 1 - 1.0)
    no_penalty = score_group(prompt, completions, TOKENIZER, replace(settings, overlong_buffer_tokens=None))
    assert no_penalty.responses[1].reward == (1.0 if second.correct else -1.0)


def requested_rows(engine: FakeEngine) -> list[int]:
    return [int(request_id.rsplit("-", 1)[1]) for request_id, _ in engine.requests]


def test_saturated_prompts_are_skipped_and_not_generated_again():
    accuracies = mixed_accuracies(24, seed=6)
    engine = FakeEngine(accuracies, delay_s=0.001)
    skip = SkipSettings(p_all_correct=1.0, p_all_wrong=1.0, expiry_epochs=0)
    collect = collector(engine, accuracies, deterministic=True, skip=skip)
    skipped = 0
    for step in range(1, 9):  # several epochs of the 24 prompts
        _, metrics = run_step(collect, step)
        skipped += metrics["sampling"]["prompts_skipped_saturated"]
    assert collect.loader.epoch >= 2
    rows = requested_rows(engine)
    for row, accuracy in enumerate(accuracies):
        if accuracy in (0.0, 1.0):  # always saturated: generated once, judged, never again
            assert rows.count(row) == 1, (row, accuracy)
    assert max(rows.count(row) for row, a in enumerate(accuracies) if a == 0.5) >= 2
    assert skipped == collect.loader.skipped_saturated >= sum(a != 0.5 for a in accuracies)
    # what was remembered is what the engine showed: both kinds of saturation, recorded by row
    memory = collect.loader.saturation
    assert all(memory.outcome[row] == 2 for row, a in enumerate(accuracies) if a == 1.0)
    assert all(memory.outcome[row] == 3 for row, a in enumerate(accuracies) if a == 0.0)


def test_without_skip_saturated_prompts_come_back_every_epoch():
    accuracies = mixed_accuracies(24, seed=6)
    engine = FakeEngine(accuracies, delay_s=0.001)
    collect = collector(engine, accuracies, deterministic=True)
    for step in range(1, 9):
        _, metrics = run_step(collect, step)
        assert metrics["sampling"]["prompts_skipped_saturated"] == 0
    rows = requested_rows(engine)
    assert max(rows.count(row) for row, a in enumerate(accuracies) if a == 1.0) >= 2


def scored_group(row: int, correct: list[bool], lengths: list[int]) -> Group:
    responses = tuple(
        Response(tuple(range(n)), (-0.1,) * n, FinishReason.STOP, 1.0 if c else -1.0, c)
        for c, n in zip(correct, lengths, strict=True)
    )
    return Group(row, (1, 2), responses)


@pytest.mark.parametrize("filtering", [True, False])
def test_filtered_token_share_counts_the_saturated_groups_generated(filtering):
    rng = random.Random(12)
    lengths = [[rng.randint(1, 30) for _ in range(G)] for _ in range(5)]
    finished = [
        scored_group(0, [True] * G, lengths[0]),
        scored_group(1, [True, False, True, True], lengths[1]),
        scored_group(2, [False] * G, lengths[2]),
        scored_group(3, [False, False, True, False], lengths[3]),
    ]
    # the fifth group was interrupted and thrown away
    tally = Tally(tokens_generated=sum(map(sum, lengths)), tokens_discarded=sum(lengths[4]), groups_aborted=1)
    stats = {"groups_kept": 2, "groups_carried_in": 0, "groups_carried_out": 0}
    sampling = _rollout_metrics(finished[1::2], finished, tally, stats, 5, filtering)["sampling"]
    saturated = sum(lengths[0]) + sum(lengths[2])
    assert sampling["tokens_discarded"] == sum(lengths[4]) and sampling["groups_aborted"] == 1
    assert sampling["tokens_filtered"] == (saturated if filtering else 0)
    assert sampling["filtered_token_share"] == pytest.approx(
        (saturated if filtering else 0) / sum(map(sum, lengths))
    )
