"""Pausing the CPU engine mid-request (SGLang's /pause_generation and /continue_generation), driven through
the project's client: what each mode returns or keeps, weight updates while paused, and partial samples
resumed from prompt + partial output. References are the Hugging Face models, teacher-forced in fp32."""

import asyncio
import random
import time

import aiohttp
import pytest

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.cpu_engine.server import EngineServer
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams
from tests.helpers.engine_checks import greedy_reference, load_model, on_device, weight_payload
from tests.helpers.engine_server import post, serving
from tests.helpers.tiny_models import TINY_VOCAB_SIZE, reference_logprobs, save_tiny_qwen2

TOLERANCE = 1e-5  # fp32 engine (batched decode over a KV cache) against one fp32 forward of the whole text
LONG = SamplingParams(temperature=0.0, max_new_tokens=160)  # greedy; runs long enough to be paused mid-way
INITIAL, PUSHED = 0, 1  # weight versions: the served model ("default"), then the pushed one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("pause_model"), seed=0, max_position_embeddings=512)


@pytest.fixture(scope="module")
def models(model_dir, tmp_path_factory):
    """The served model, and another of the same shapes (other random weights) pushed as an update."""
    other_dir = save_tiny_qwen2(tmp_path_factory.mktemp("pause_other"), seed=1, max_position_embeddings=512)
    return load_model(model_dir), load_model(other_dir)


def random_prompt(rng: random.Random) -> list[int]:
    return [rng.randrange(TINY_VOCAB_SIZE) for _ in range(rng.randint(3, 9))]


async def until_generating(server: EngineServer, tokens: int) -> None:
    """Until a running sequence holds `tokens` output tokens (the protocol has no progress route: this
    reads the scheduler)."""
    deadline = time.monotonic() + 60
    while not any(len(sequence.output_ids) >= tokens for sequence in server.scheduler._running):
        assert time.monotonic() < deadline, "the request never started generating"
        await asyncio.sleep(0.002)


def worst(logprobs: list[float], expected: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(logprobs, expected, strict=True))


def split_at_update(completion: Completion) -> int:
    """How many tokens the initial weights generated, once checked that the pushed ones made the rest."""
    versions = completion.token_weight_versions
    before = versions.count(INITIAL)
    assert versions == [INITIAL] * before + [PUSHED] * (len(versions) - before), versions
    assert 0 < before < len(completion.token_ids), "the pause did not land mid-request"
    return before


def test_a_resumed_partial_sample_equals_prefix_plus_continuation(model_dir):
    """Greedy: N tokens at once equal k tokens, then N - k more from prompt + those k, log-probs too."""
    rng = random.Random()
    prompt, total = random_prompt(rng), 24
    cut = rng.randint(1, total - 1)

    async def scenario():
        async with serving(model_dir) as (url, _), SGLangClient([url]) as client:
            greedy = SamplingParams(temperature=0.0, max_new_tokens=total)
            [whole] = await client.generate(prompt, greedy)
            [prefix] = await client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=cut))
            rest = SamplingParams(temperature=0.0, max_new_tokens=total - cut)
            [continuation] = await client.generate(prompt + prefix.token_ids, rest)
            return whole, prefix, continuation

    whole, prefix, continuation = asyncio.run(scenario())
    assert len(whole.token_ids) == total and len(prefix.token_ids) == cut
    assert prefix.token_ids + continuation.token_ids == whole.token_ids
    assert worst(prefix.logprobs + continuation.logprobs, whole.logprobs) <= TOLERANCE


def test_abort_pause_returns_partial_outputs_and_holds_new_requests(model_dir, models):
    served, _ = models
    rng = random.Random()
    prompt = random_prompt(rng)

    async def scenario():
        async with serving(model_dir) as (url, server), SGLangClient([url]) as client:
            running = asyncio.ensure_future(client.generate(prompt, LONG))
            await until_generating(server, 3)
            await client.pause_generation("abort")  # returns once every request has ended
            [aborted] = await asyncio.wait_for(running, 10)
            late = asyncio.ensure_future(
                client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=4))
            )
            await asyncio.sleep(0.5)
            assert not late.done(), "a request arriving while paused must wait for continue"
            await client.continue_generation()
            [served_late] = await asyncio.wait_for(late, 30)
            # A retracted request aborted while paused ends at once, with what it generated.
            held = asyncio.ensure_future(client.generate(prompt, LONG, request_id="held"))
            await until_generating(server, 2)
            await client.pause_generation("retract")
            await asyncio.wait_for(client.abort("held"), 10)
            [aborted_while_paused] = await held
            await client.continue_generation()
            return aborted, served_late, aborted_while_paused

    aborted, served_late, aborted_while_paused = asyncio.run(scenario())
    for partial in (aborted, aborted_while_paused):
        assert partial.finish_reason is FinishReason.ABORT
        assert 2 <= len(partial.token_ids) < LONG.max_new_tokens
        assert len(partial.logprobs) == len(partial.token_ids)
        assert partial.token_ids == greedy_reference(served, prompt, len(partial.token_ids))
        assert (
            worst(partial.logprobs, reference_logprobs(served, prompt, partial.token_ids, 1.0)) <= TOLERANCE
        )
    assert served_late.finish_reason is FinishReason.LENGTH
    assert served_late.token_ids == greedy_reference(served, prompt, 4)


async def _update_while_paused(model_dir, pushed_model, prompt: list[int], mode: str):
    """A long request paused in `mode`, the pushed weights loaded meanwhile, then continued: its completion
    and the version the server reports after it."""
    async with serving(model_dir) as (url, server), SGLangClient([url]) as client:
        request = asyncio.ensure_future(client.generate(prompt, LONG))
        await until_generating(server, 3)
        await client.pause_generation(mode)
        if mode == "retract":
            await client.flush_cache()  # retracted requests hold no KV cache: SGLang allows the flush
        with weight_payload(on_device(pushed_model, "cpu"), "cpu") as payload:
            # Must not wait for the paused request, which cannot end before continue.
            await asyncio.wait_for(client.update_weights_from_tensor([payload], weight_version=PUSHED), 30)
        assert not request.done()
        await client.continue_generation()
        [completion] = await asyncio.wait_for(request, 120)
        return completion, await client.server_weight_version(url)


def test_retract_pause_continues_the_request_under_the_new_weights(model_dir, models):
    """Retracted requests are prefilled again at continue (prompt + tokens so far) under the weights loaded
    while paused: tokens before the pause are the old model's, every later one the new model's, exactly."""
    served, pushed = models
    prompt = random_prompt(random.Random())
    completion, version = asyncio.run(_update_while_paused(model_dir, pushed, prompt, "retract"))
    assert (
        completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == LONG.max_new_tokens
    )
    before = split_at_update(completion)
    tokens = completion.token_ids
    assert tokens[:before] == greedy_reference(served, prompt, before)
    assert tokens[before:] == greedy_reference(pushed, prompt + tokens[:before], len(tokens) - before)
    old = reference_logprobs(served, prompt, tokens, 1.0)
    new = reference_logprobs(pushed, prompt, tokens, 1.0)
    assert worst(completion.logprobs[:before], old[:before]) <= TOLERANCE
    assert worst(completion.logprobs[before:], new[before:]) <= TOLERANCE
    assert worst(old[before:], new[before:]) > 0.1  # the two models disagree: the check can tell them apart
    assert completion.weight_version == PUSHED == version and completion.meta["total_retractions"] == 1


def test_in_place_pause_keeps_the_old_cache_and_continues_under_the_new_weights(model_dir, models):
    """In place, requests keep the KV cache the old weights computed (SGLang's semantics): the tokens after
    the pause come from the new weights over that cache, so they match neither model exactly; those
    before it are the old model's."""
    served, pushed = models
    prompt = random_prompt(random.Random())
    completion, version = asyncio.run(_update_while_paused(model_dir, pushed, prompt, "in_place"))
    assert (
        completion.finish_reason is FinishReason.LENGTH and len(completion.token_ids) == LONG.max_new_tokens
    )
    before = split_at_update(completion)
    tokens = completion.token_ids
    assert tokens[:before] == greedy_reference(served, prompt, before)
    old = reference_logprobs(served, prompt, tokens, 1.0)
    assert worst(completion.logprobs[:before], old[:before]) <= TOLERANCE
    assert worst(completion.logprobs[before:], old[before:]) > 0.1  # the new weights generated the rest
    assert completion.weight_version == PUSHED == version and completion.meta["total_retractions"] == 0


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        (protocol.PAUSE_GENERATION, {"mode": "drain"}, "mode"),
        (protocol.PAUSE_GENERATION, {"mode": ["abort"]}, "mode"),
        (protocol.PAUSE_GENERATION, {"mode": "abort", "wait": True}, "pause_generation.wait"),
        (protocol.CONTINUE_GENERATION, {"mode": "abort"}, "continue_generation.mode"),
    ],
)
def test_bad_pause_bodies_get_400_naming_the_field(model_dir, route, body, field):
    async def scenario():
        async with serving(model_dir) as (url, _), aiohttp.ClientSession() as session:
            answer = await post(session, url + route, body)
            # Neither paused nor broken: it generates at once.
            generated = await post(session, url + protocol.GENERATE, {"input_ids": [1, 2]})
            return answer, generated

    (status, text), generated = asyncio.run(scenario())
    assert status == 400 and f"{field}: " in text, text
    if field == "mode":
        assert all(repr(mode) in text for mode in protocol.PAUSE_MODES), text
    assert generated[0] == 200
