"""The streaming dynamic-sampling component, driven as the trainer drives it."""

import random

import pytest

from megatron_dapo.algo import DynamicSampler, DynamicSamplingError, is_informative


def flags(num_correct: int, group_size: int) -> list[bool]:
    return [True] * num_correct + [False] * (group_size - num_correct)


def run_step(sampler: DynamicSampler, rng: random.Random, group_size: int, next_id: list[int], kept: list):
    """Submit what the sampler asks for, finish in-flight prompts in random order, until the batch is full.
    Per-prompt accuracies are spread: a third always right, a third always wrong, a third in between.
    Returns the batch, the stats, and the prompts still in flight (to be aborted)."""
    in_flight: list[int] = []
    while not sampler.full:
        for _ in range(sampler.prompts_to_submit(in_flight=len(in_flight))):
            in_flight.append(next_id[0])
            next_id[0] += 1
        prompt = in_flight.pop(rng.randrange(len(in_flight)))
        accuracy = rng.choice([0.0, 1.0, rng.random()])
        correct = [rng.random() < accuracy for _ in range(group_size)]
        group = ("group", prompt, tuple(correct))
        if sampler.add(group, correct):
            kept.append(group)
    batch, stats = sampler.take_batch()
    return batch, stats, in_flight


def test_is_informative() -> None:
    assert is_informative([True, False]) and is_informative(flags(15, 16))
    assert (
        not is_informative(flags(16, 16)) and not is_informative(flags(0, 16)) and not is_informative([True])
    )


def test_streaming_fills_batches_with_informative_groups_and_loses_none() -> None:
    rng = random.Random(0)
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=32, max_rounds=20)
    next_id, batches, kept = [0], [], []
    for _ in range(6):
        batch, stats, _ = run_step(sampler, rng, 8, next_id, kept)
        assert len(batch) == 32
        assert all(is_informative(g[2]) for g in batch)
        assert stats["groups_kept"] + stats["groups_carried_in"] == 32 + stats["groups_carried_out"]
        assert (
            stats["groups_all_correct"] + stats["groups_all_wrong"] + stats["groups_kept"] == stats["groups"]
        )
        assert stats["groups_all_correct"] > 0 and stats["groups_all_wrong"] > 0
        assert stats["prompts_submitted"] <= 20 * 32
        batches += batch
    # every kept group is trained on exactly once, first finished first, or waits in the carry-over
    assert batches == kept[: 6 * 32]
    assert sampler.state_dict()["carried"] == kept[6 * 32 :]


def test_surplus_is_carried_over_first() -> None:
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=2)
    assert sampler.prompts_to_submit(in_flight=0) == 2
    for name in "abc":
        sampler.add(name, [True, False])
    sampler.add("d", [True, True])  # all correct: filtered, never carried
    batch, stats = sampler.take_batch()
    assert batch == ["a", "b"] and stats["groups_carried_out"] == 1 and stats["groups_all_correct"] == 1
    assert not sampler.full
    sampler.add("e", [False, True])
    batch, stats = sampler.take_batch()
    assert batch == ["c", "e"] and stats["groups_carried_in"] == 1


def test_keep_rate_drives_oversampling() -> None:
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=100, max_rounds=50)
    assert sampler.prompts_to_submit(in_flight=0) == 100  # no evidence yet: ask for exactly one batch
    for i in range(400):
        sampler.add(i, flags(1 if i % 4 == 0 else 0, 4))  # one group in four is kept
    sampler.prompts_to_submit(in_flight=0)
    batch, _ = sampler.take_batch()
    assert len(batch) == 100
    rate = sampler.keep_rate
    assert rate == pytest.approx(101 / 401)
    assert sampler.prompts_to_submit(in_flight=0) == pytest.approx(100 / rate, abs=1)
    # prompts already in flight count at the keep rate
    fresh: DynamicSampler = DynamicSampler(prompts_per_step=100, max_rounds=50)
    fresh.load_state_dict(sampler.state_dict())
    assert fresh.prompts_to_submit(in_flight=200) == pytest.approx((100 - 200 * rate) / rate, abs=1)


def test_disabled_keeps_every_group_without_oversampling() -> None:
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=3, enabled=False)
    assert sampler.prompts_to_submit(in_flight=0) == 3
    assert sampler.prompts_to_submit(in_flight=3) == 0
    for name, correct in [("x", [True]), ("y", [False]), ("z", [True])]:  # G = 1 is fine without filtering
        assert sampler.add(name, correct)
    assert sampler.full and sampler.prompts_to_submit(in_flight=0) == 0
    batch, stats = sampler.take_batch()
    assert batch == ["x", "y", "z"] and stats["groups_all_correct"] == 2 and stats["groups_all_wrong"] == 1


def test_aborted_prompts_are_resubmitted() -> None:
    """Prompts lost without a result (e.g. an engine restart) leave in_flight; the sampler asks again."""
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=4, enabled=False)
    assert sampler.prompts_to_submit(in_flight=0) == 4
    sampler.add("a", [True])
    assert sampler.prompts_to_submit(in_flight=0) == 3


def test_unfillable_batch_fails_with_a_clear_message() -> None:
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=8, max_rounds=3)
    submitted, in_flight, finished = 0, 0, 0
    with pytest.raises(
        DynamicSamplingError, match=r"filled only 1 of 8 groups after 3 rounds \(24 prompts"
    ) as err:
        for _ in range(10_000):  # a hang would exhaust this loop instead of raising
            n = sampler.prompts_to_submit(in_flight=in_flight)
            submitted, in_flight = submitted + n, in_flight + n - 1
            finished += 1
            sampler.add(finished, flags(2, 4) if finished == 3 else flags(4, 4))
    assert "23 were all correct and 0 all wrong" in str(err.value)
    assert submitted == 24


def test_no_failure_while_prompts_are_in_flight() -> None:
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=2, max_rounds=1)
    assert sampler.prompts_to_submit(in_flight=0) == 2
    sampler.add("a", flags(2, 2))
    assert sampler.prompts_to_submit(in_flight=1) == 0  # budget spent, but one prompt may still fill it
    sampler.add("b", flags(1, 2))
    with pytest.raises(DynamicSamplingError):
        sampler.prompts_to_submit(in_flight=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="prompts_per_step"):
        DynamicSampler(prompts_per_step=0)
    with pytest.raises(ValueError, match="max_rounds"):
        DynamicSampler(prompts_per_step=1, max_rounds=0)
    sampler: DynamicSampler = DynamicSampler(prompts_per_step=1)
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        sampler.add("g", [True])
    with pytest.raises(ValueError, match="in_flight"):
        sampler.prompts_to_submit(in_flight=-1)
    with pytest.raises(RuntimeError, match="wait for `full`"):
        sampler.take_batch()


def test_state_dict_round_trip_resumes_identically() -> None:
    rng = random.Random(5)
    a: DynamicSampler = DynamicSampler(prompts_per_step=4)
    for i in range(9):
        a.add(i, flags(rng.randrange(3), 2))
    while not a.full:
        a.add("extra", [True, False])
    a.take_batch()
    b: DynamicSampler = DynamicSampler(prompts_per_step=4)
    b.load_state_dict(a.state_dict())
    for sampler in (a, b):
        for i in range(6):
            sampler.add(100 + i, [True, False])
    assert a.prompts_to_submit(in_flight=0) == b.prompts_to_submit(in_flight=0)
    assert a.take_batch() == b.take_batch()
