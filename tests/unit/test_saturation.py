"""Skipping saturated prompts (algo/saturation.py, issue 13): the skip probabilities hold, skipped prompts
come back after the expiry, a resumed memory decides exactly as the original, and the prompt loader and the
config use it as described."""

import io
import math
import random

import numpy as np
import pytest
import torch

from megatron_dapo.algo.saturation import Outcome, SaturationPolicy, SkipSettings, group_outcome
from megatron_dapo.config import ConfigError, from_dict
from megatron_dapo.data.dataset import PromptLoader, TokenizedPrompt
from megatron_dapo.data.record import PromptRecord

G = 8


def group(outcome: Outcome, rng: random.Random) -> list[bool]:
    """A random group of G correctness flags with the given outcome."""
    if outcome is Outcome.ALL_CORRECT:
        return [True] * G
    if outcome is Outcome.ALL_WRONG:
        return [False] * G
    flags = [rng.random() < 0.5 for _ in range(G)]
    flags[rng.randrange(G)], flags[rng.randrange(G)] = True, False
    return flags if 0 < sum(flags) < G else group(outcome, rng)


def saved(state: dict) -> dict:
    """A state as a checkpoint stores it (torch.save / torch.load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def make_prompts(rows: list[int]) -> list[TokenizedPrompt]:
    return [TokenizedPrompt(PromptRecord(index=r, problem=f"p{r}", ground_truth=str(r)), (r,)) for r in rows]


def test_group_outcome():
    assert group_outcome([True] * 4) is Outcome.ALL_CORRECT
    assert group_outcome([False] * 4) is Outcome.ALL_WRONG
    assert group_outcome([True, False, False]) is Outcome.INFORMATIVE


@pytest.mark.parametrize(("p_correct", "p_wrong"), [(0.7, 0.2), (0.35, 0.9)])
def test_skip_probabilities_are_honoured(p_correct, p_wrong):
    rng = random.Random(int(p_correct * 100))
    rows = 6000
    outcomes = [rng.choice(list(Outcome)[1:]) for _ in range(rows)]
    policy = SaturationPolicy(rows, SkipSettings(p_correct, p_wrong, expiry_epochs=0), seed=rng.randrange(99))
    for row, outcome in enumerate(outcomes):
        policy.record(row, group(outcome, rng), step=rng.randrange(1, 50))
    for epoch in range(2):  # a second pass draws afresh: decisions are not a fixed property of the row
        decisions = [policy.should_skip(row) for row in range(rows)]
        for row in (r for r in range(rows) if not decisions[r]):  # offered: generated, same outcome again
            policy.record(row, group(outcomes[row], rng), step=50 + epoch)
        for outcome, p in ((Outcome.ALL_CORRECT, p_correct), (Outcome.ALL_WRONG, p_wrong)):
            mine = [d for d, o in zip(decisions, outcomes, strict=True) if o is outcome]
            sigma = math.sqrt(p * (1 - p) / len(mine))
            assert abs(sum(mine) / len(mine) - p) < 4 * sigma, (epoch, outcome)
        assert not any(d for d, o in zip(decisions, outcomes, strict=True) if o is Outcome.INFORMATIVE)
        if epoch == 0:
            first = decisions
    agree = sum(
        a == b for a, b, o in zip(first, decisions, outcomes, strict=True) if o is Outcome.ALL_CORRECT
    )
    assert agree < 0.9 * outcomes.count(Outcome.ALL_CORRECT)  # independent draws agree ~58% at p = 0.7


def test_unseen_prompts_are_never_skipped():
    policy = SaturationPolicy(50, SkipSettings(1.0, 1.0, 0), seed=1)
    assert not any(policy.should_skip(row) for row in range(50))


def test_expiry_brings_a_skipped_prompt_back_until_it_is_judged_again():
    policy = SaturationPolicy(3, SkipSettings(1.0, 1.0, expiry_epochs=3), seed=4)
    policy.record(1, [False] * G, step=7)
    assert [policy.should_skip(1) for _ in range(5)] == [True, True, True, False, False]
    policy.record(1, [True] * G, step=12)  # generated again, saturated again: skipped again
    assert [policy.should_skip(1) for _ in range(4)] == [True, True, True, False]
    policy.record(1, group(Outcome.INFORMATIVE, random.Random(0)), step=13)
    assert not policy.should_skip(1)


def test_resumed_state_makes_the_same_decisions():
    rng = random.Random(5)
    rows = 400
    settings = SkipSettings(0.6, 0.5, expiry_epochs=2)
    original = SaturationPolicy(rows, settings, seed=21)
    for step in range(1, 4):  # a few steps of judged groups and decisions
        for row in rng.sample(range(rows), 150):
            original.record(row, group(rng.choice(list(Outcome)[1:]), rng), step)
        for row in rng.sample(range(rows), 200):
            original.should_skip(row)
    state = saved(original.state_dict())
    resumed = SaturationPolicy(rows, settings, seed=21)
    resumed.load_state_dict(state)
    order = [rng.randrange(rows) for _ in range(3000)]
    assert [original.should_skip(r) for r in order] == [resumed.should_skip(r) for r in order]
    assert sum(resumed.skips) > 0
    # the seed matters: another run's seed decides otherwise
    other = SaturationPolicy(rows, settings, seed=22)
    other.load_state_dict(state)
    assert [resumed.should_skip(r) for r in order] != [other.should_skip(r) for r in order]


def test_state_is_compact_and_refuses_another_dataset():
    policy = SaturationPolicy(17_917, SkipSettings(0.5, 0.5, 1), seed=0)
    state = policy.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert sum(v.numel() * v.element_size() for v in state.values()) <= 13 * 17_917
    with pytest.raises(ValueError, match="remembers 17917 rows but this dataset has 100"):
        SaturationPolicy(100, SkipSettings(0.5, 0.5, 1), seed=0).load_state_dict(state)


def test_loader_skips_saturated_prompts_and_counts_them():
    rows = [0, 2, 3, 5, 8, 9, 11, 12, 14, 17]  # gaps: bad rows dropped from the file
    loader = PromptLoader(make_prompts(rows), seed=3, skip=SkipSettings(1.0, 1.0, expiry_epochs=2))
    saturated = {2, 8, 12, 17}
    for prompt in loader.take(len(rows)):  # epoch 0: every prompt is generated and judged
        correct = [True] * G if prompt.record.index in saturated else [True, False] * (G // 2)
        loader.saturation.record(prompt.record.index, correct, step=1)
    # epochs 1 and 2 skip the saturated rows; epoch 3 offers them again (skipped two epochs in a row)
    informative = sorted(set(rows) - saturated)
    assert sorted(p.record.index for p in loader.take(2 * len(informative))) == sorted(informative * 2)
    assert sorted(p.record.index for p in loader.take(len(rows))) == rows
    assert loader.epoch == 3 and loader.skipped_saturated == 2 * len(saturated)


def test_loader_without_skip_is_unchanged():
    prompts = make_prompts(list(range(13)))
    plain, with_none = PromptLoader(prompts, seed=9), PromptLoader(prompts, seed=9, skip=None)
    assert plain.take(40) == with_none.take(40) and with_none.saturation is None
    assert "saturation" not in plain.state_dict()


def test_loader_resumes_its_skip_decisions_exactly():
    rng = random.Random(8)
    rows = list(range(60))
    settings = SkipSettings(0.8, 0.6, expiry_epochs=2)

    def run(loader: PromptLoader, sizes: list[int], first_step: int) -> list[int]:
        taken = []
        for step, size in enumerate(sizes, first_step):
            prompts = loader.take(size)
            taken += [p.record.index for p in prompts]
            for p in prompts:  # outcomes drawn from the row and the step: the same in every run
                outcome = list(Outcome)[1 + (p.record.index * 7 + step) % 3]
                loader.saturation.record(p.record.index, group(outcome, random.Random(step)), step)
        return taken

    sizes = [rng.randint(3, 25) for _ in range(30)]
    expected = run(PromptLoader(make_prompts(rows), seed=2, skip=settings), sizes, 1)
    first = PromptLoader(make_prompts(rows), seed=2, skip=settings)
    got = run(first, sizes[:17], 1)
    assert first.skipped_saturated > 0
    resumed = PromptLoader(make_prompts(rows), seed=2, skip=settings)
    resumed.load_state_dict(saved(first.state_dict()))
    assert got + run(resumed, sizes[17:], 18) == expected


def test_loader_fails_clearly_when_every_prompt_is_skipped_for_good():
    loader = PromptLoader(make_prompts([0, 1, 2]), seed=1, skip=SkipSettings(1.0, 1.0, expiry_epochs=0))
    for prompt in loader.take(3):
        loader.saturation.record(prompt.record.index, [prompt.record.index % 2 == 0] * G, step=1)
    with pytest.raises(RuntimeError, match=r"skipped for good: lower algorithm\.skip_p_all_correct"):
        loader.take(1)


def test_loader_waits_out_chance_skips_when_prompts_can_come_back():
    loader = PromptLoader(make_prompts([0, 1]), seed=1, skip=SkipSettings(0.95, 0.95, expiry_epochs=0))
    for prompt in loader.take(2):
        loader.saturation.record(prompt.record.index, [True] * G, step=1)
    assert len(loader.take(5)) == 5  # p < 1: they return by chance, no error
    assert loader.skipped_saturated > 5


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("skip_p_all_correct", 1.5, "must be in \\[0, 1\\]"),
        ("skip_p_all_wrong", -0.1, "must be in \\[0, 1\\]"),
        ("skip_p_all_wrong", float("nan"), "must be in \\[0, 1\\]"),
        ("skip_expiry_epochs", -1, "must be >= 0"),
    ],
)
def test_config_rejects_impossible_skip_settings(field, value, message):
    with pytest.raises(ConfigError, match=f"algorithm.{field}: {message}"):
        from_dict({"algorithm": {"skip_saturated": True, field: value}})
    with pytest.raises(ValueError, match=f"algorithm.{field}"):
        SkipSettings(**{"p_all_correct": 0.5, "p_all_wrong": 0.5, "expiry_epochs": 1, field[5:]: value})


def test_config_skip_is_off_by_default_and_reaches_the_loader_settings():
    from megatron_dapo.trainer.data import skip_settings

    assert skip_settings(from_dict({})) is None
    cfg = from_dict(
        {"algorithm": {"skip_saturated": True, "skip_p_all_wrong": 0.25, "skip_expiry_epochs": 5}}
    )
    assert skip_settings(cfg) == SkipSettings(cfg.algorithm.skip_p_all_correct, 0.25, 5)
    assert np.isclose(cfg.algorithm.skip_p_all_wrong, 0.25)
