"""The one scoring of an engine's samples: decoding and the DAPO rule on random responses, and training
rollouts and evaluation agreeing sample by sample because both score through it."""

import random

import pytest

from megatron_dapo.data.dataset import TokenizedPrompt
from megatron_dapo.data.demo_tokenizer import build_demo_tokenizer
from megatron_dapo.data.record import PromptRecord
from megatron_dapo.eval import score_problem
from megatron_dapo.reward import score_responses
from megatron_dapo.rollout.types import Completion, FinishReason
from megatron_dapo.trainer.rollout.collector import RewardSettings, score_group

TOKENIZER = build_demo_tokenizer()


def random_response(rng: random.Random, ground_truth: str) -> tuple[str, str, str]:
    """(text, the answer it gives, kind): right in some surface form, wrong, boxed only, or no answer."""
    kind = rng.choice(["right", "wrong", "boxed", "none"])
    filler = "".join(rng.choice("abc xyz+=1\n") for _ in range(rng.randrange(0, 30)))
    if kind == "right":
        form = rng.choice(["{}", "${}$", "\\boxed{{{}}}", "{}.", "0{}"])
        return f"{filler}\nAnswer: {form.format(ground_truth)}", ground_truth, kind
    if kind == "wrong":
        wrong = str(int(ground_truth) + rng.randint(1, 9))
        return f"{filler}\nAnswer: {wrong}", wrong, kind
    if kind == "boxed":
        return f"{filler} so \\boxed{{{ground_truth}}}", ground_truth, kind
    return f"{filler} no idea", "", kind


def token_ids(rng: random.Random, text: str) -> list[int]:
    """The text's tokens, ending with the stop token (as an engine returns it) or, when cut, without it."""
    ids = TOKENIZER.encode(text, add_special_tokens=False)
    return [*ids, TOKENIZER.eos_token_id] if rng.random() < 0.7 else ids


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("boxed_fallback", [False, True])
def test_each_response_is_decoded_and_scored_by_the_rule(seed: int, boxed_fallback: bool) -> None:
    rng = random.Random(seed)
    ground_truth = str(rng.randint(10, 999))
    samples = [random_response(rng, ground_truth) for _ in range(rng.randint(1, 12))]
    scored = score_responses(
        ground_truth,
        [token_ids(rng, text) for text, _, _ in samples],
        TOKENIZER,
        boxed_fallback=boxed_fallback,
    )
    assert len(scored) == len(samples)
    for response, (text, answer, kind) in zip(scored, samples, strict=True):
        pred = "" if kind == "boxed" and not boxed_fallback else answer
        assert response.text == text  # the stop token is no part of the text
        assert (response.pred, response.correct) == (pred, pred == ground_truth)
        assert response.score == (1.0 if pred == ground_truth else -1.0)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("boxed_fallback", [False, True])
def test_training_and_evaluation_score_every_sample_alike(seed: int, boxed_fallback: bool) -> None:
    rng = random.Random(seed)
    ground_truth = str(rng.randint(10, 999))
    prompt = TokenizedPrompt(
        PromptRecord(index=rng.randint(0, 99), ground_truth=ground_truth, problem="p"), (5, 6, 7)
    )
    completions = []
    for _ in range(rng.randint(2, 8)):
        ids = token_ids(rng, random_response(rng, ground_truth)[0])
        reason = FinishReason.STOP if ids[-1] == TOKENIZER.eos_token_id else FinishReason.LENGTH
        completions.append(Completion(ids, [-0.5] * len(ids), reason))
    longest = max(len(c.token_ids) for c in completions)
    settings = RewardSettings(longest, overlong_buffer_tokens=None, boxed_fallback=boxed_fallback)

    group = score_group(prompt, completions, TOKENIZER, settings)
    problem = score_problem(0, prompt, completions, TOKENIZER, boxed_fallback=boxed_fallback)

    assert [r.correct for r in group.responses] == [s.correct for s in problem.samples]
    assert [r.reward for r in group.responses] == [1.0 if s.correct else -1.0 for s in problem.samples]
    shared = score_responses(
        ground_truth, [c.token_ids for c in completions], TOKENIZER, boxed_fallback=boxed_fallback
    )
    assert [(s.response, s.pred, s.correct) for s in problem.samples] == [
        (r.text, r.pred, r.correct) for r in shared
    ]
