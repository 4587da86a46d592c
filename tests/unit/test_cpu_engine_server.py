"""The CPU engine's HTTP server in this process (a tiny model behind aiohttp's test server), attacked as a
client on the machine could: no or a wrong API key, bad values in one request of a batch, malformed fields,
oversized requests, and weight-group joins that would block the model or open a store."""

import asyncio
import json
import random
import socket
import threading
import time

import aiohttp
import pytest

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.api_key import API_KEY_ENV, new_api_key
from megatron_dapo.rollout.cpu_engine.server import ServerSettings
from megatron_dapo.rollout.engine import EngineRequestError
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import SamplingParams
from tests.helpers.engine_server import post, serving
from tests.helpers.tiny_models import TINY_VOCAB_SIZE, save_tiny_qwen2

CONTEXT_TOKENS = 128  # save_tiny_qwen2's max_position_embeddings


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_qwen2(tmp_path_factory.mktemp("server_model"))


def random_prompts(count: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(TINY_VOCAB_SIZE) for _ in range(rng.randint(2, 9))] for _ in range(count)]


def greedy_body(prompt, max_new_tokens: int = 6) -> dict:
    return {"input_ids": prompt, "sampling_params": {"temperature": 0.0, "max_new_tokens": max_new_tokens}}


# ---------------------------------------------------------------- item 3: the API key


def test_api_key_refuses_requests_without_it(model_dir, monkeypatch):
    key = new_api_key()

    async def scenario():
        async with (
            serving(model_dir, ServerSettings(api_key=key)) as (url, _),
            aiohttp.ClientSession() as session,
        ):
            body = greedy_body([1, 2, 3])
            wrong = [f"Bearer {new_api_key()}", f"Basic {key}", f"Bearer {key[:-1]}", key, f"Bearer  {key}"]
            for headers in [{}] + [{"Authorization": value} for value in wrong]:
                status, text = await post(session, url + protocol.GENERATE, body, headers=headers)
                assert (status, text) == (401, '{"error": "Unauthorized"}'), headers
                status, _ = await post(session, url + protocol.INIT_WEIGHTS_UPDATE_GROUP, {}, headers=headers)
                assert status == 401
            async with session.get(url + protocol.GET_MODEL_INFO) as response:
                assert response.status == 401
            # As in SGLang, the health routes stay open (launchers and probes hold no key).
            for route in (protocol.HEALTH, protocol.HEALTH_GENERATE):
                async with session.get(url + route) as response:
                    assert response.status == 200, route
            status, _ = await post(
                session, url + protocol.GENERATE, body, headers={"Authorization": f"bearer {key}"}
            )
            assert status == 200
            async with SGLangClient([url], api_key=key) as client:
                [completion] = await client.generate([1, 2, 3], SamplingParams(max_new_tokens=3))
                assert len(completion.token_ids) == 3
            monkeypatch.setenv(API_KEY_ENV, key)  # the client's default: the job's key from the environment
            async with SGLangClient([url]) as client:
                assert len((await client.generate([4], SamplingParams(max_new_tokens=2)))[0].token_ids) == 2
            monkeypatch.delenv(API_KEY_ENV)
            async with SGLangClient([url]) as client:
                with pytest.raises(EngineRequestError, match="401"):
                    await client.generate([4], SamplingParams(max_new_tokens=2))

    asyncio.run(scenario())


# ---------------------------------------------------------------- item 4: one bad request among many


def test_boolean_token_ids_fail_only_their_own_request(model_dir):
    rng = random.Random()
    prompts = random_prompts(8, rng)
    bad = rng.randrange(8)

    async def scenario():
        async with serving(model_dir) as (url, _), aiohttp.ClientSession() as session:
            alone = [await post(session, url + protocol.GENERATE, greedy_body(prompt)) for prompt in prompts]
            bodies = [greedy_body(prompt) for prompt in prompts]
            bodies[bad] = greedy_body([True, True])
            together = await asyncio.gather(
                *(post(session, url + protocol.GENERATE, body) for body in bodies)
            )
            return alone, together

    alone, together = asyncio.run(scenario())
    status, text = together[bad]
    assert status == 400 and "input_ids[0]" in text and "not booleans" in text
    for index in set(range(8)) - {bad}:
        assert together[index][0] == 200
        assert _output_ids(together[index][1]) == _output_ids(alone[index][1])


def test_a_failing_prefill_fails_only_its_own_request(model_dir):
    """Whatever breaks one prompt's forward (here a stand-in fault) fails that request alone."""
    rng = random.Random()
    prompts = random_prompts(6, rng)
    poisoned = tuple(prompts[rng.randrange(6)])

    async def scenario():
        async with serving(model_dir) as (url, server), aiohttp.ClientSession() as session:
            alone = [await post(session, url + protocol.GENERATE, greedy_body(prompt)) for prompt in prompts]
            server.runner.flush_prompt_cache()
            prefill = server.runner.prefill

            def faulty_prefill(prompt, **kwargs):
                if prompt == poisoned:
                    raise RuntimeError("stand-in fault in this prompt's forward")
                return prefill(prompt, **kwargs)

            server.runner.prefill = faulty_prefill
            together = await asyncio.gather(
                *(post(session, url + protocol.GENERATE, greedy_body(prompt)) for prompt in prompts)
            )
            server.runner.prefill = prefill
            after = await post(session, url + protocol.GENERATE, greedy_body(list(poisoned)))
            return alone, together, after

    alone, together, after = asyncio.run(scenario())
    for prompt, (status, text), (_, alone_text) in zip(prompts, together, alone, strict=True):
        if tuple(prompt) == poisoned:
            assert status == 500 and "stand-in fault" in text
        else:
            assert status == 200 and _output_ids(text) == _output_ids(alone_text)
    assert after[0] == 200  # the engine serves on


def _output_ids(text: str) -> list[int]:
    return json.loads(text)["output_ids"]


# ---------------------------------------------------------------- item 9: malformed fields and limits


@pytest.mark.parametrize(
    ("route", "data", "field"),
    [
        (protocol.GENERATE, '{"input_ids": [1, 2], "sampling_params": {"top_k": NaN}}',
         "sampling_params.top_k"),
        (protocol.GENERATE, '{"input_ids": [1], "sampling_params": {"stop_token_ids": ["x"]}}',
         "sampling_params.stop_token_ids[0]"),
        (protocol.GENERATE, '{"input_ids": [1], "sampling_params": {"max_new_tokens": true}}',
         "sampling_params.max_new_tokens"),
        (protocol.GENERATE, "[" * 100_000 + "]" * 100_000, "body"),
        (protocol.RELEASE_MEMORY_OCCUPATION, '{"tags": 5}', "tags"),
        (protocol.RESUME_MEMORY_OCCUPATION, '{"tags": [null]}', "tags"),
        (protocol.ABORT_REQUEST, '{"rid": 5}', "rid"),
        (protocol.INIT_WEIGHTS_UPDATE_GROUP,
         '{"master_address": "127.0.0.1", "master_port": "x", "rank_offset": 1, "world_size": 2}',
         "master_port"),
        (protocol.UPDATE_WEIGHTS_FROM_DISTRIBUTED,
         '{"names": ["w"], "dtypes": ["float32"], "shapes": [["a"]]}', "shapes[0]"),
    ],
)  # fmt: skip
def test_malformed_fields_get_400_naming_the_field(model_dir, route, data, field):
    async def scenario():
        async with serving(model_dir) as (url, _), aiohttp.ClientSession() as session:
            answer = await post(session, url + route, data=data, headers={"Content-Type": "application/json"})
            healthy = await post(session, url + protocol.GENERATE, greedy_body([1, 2]))
            return answer, healthy

    (status, text), healthy = asyncio.run(scenario())
    assert status == 400 and f"{field}: " in text, text
    assert healthy[0] == 200


def test_sample_count_and_body_size_are_bounded(model_dir):
    settings = ServerSettings(max_request_bytes=8192, max_sequences_per_request=8)

    async def scenario():
        async with serving(model_dir, settings) as (url, _), aiohttp.ClientSession() as session:
            many = {"input_ids": [1, 2], "sampling_params": {"n": 10**9, "max_new_tokens": 1}}
            status, text = await post(session, url + protocol.GENERATE, many)
            assert status == 400 and "sampling_params.n" in text and "at most 8" in text
            batch = {"input_ids": [[1], [2], [3]], "sampling_params": {"n": 3, "max_new_tokens": 1}}
            status, text = await post(session, url + protocol.GENERATE, batch)
            assert status == 400 and "input_ids" in text and "3 prompts x n=3" in text
            large = {"input_ids": [1] * 5000, "sampling_params": {"max_new_tokens": 1}}
            status, text = await post(session, url + protocol.GENERATE, large)
            assert status == 413 and "8192" in text
            fits = {"input_ids": [[1], [2]], "sampling_params": {"n": 4, "max_new_tokens": 1}}
            status, text = await post(session, url + protocol.GENERATE, fits)
            assert status == 200 and len(json.loads(text)) == 8

    asyncio.run(scenario())


def test_max_new_tokens_beyond_the_context_is_refused_as_sglang_does(model_dir):
    rng = random.Random()
    prompt = [rng.randrange(TINY_VOCAB_SIZE) for _ in range(rng.randint(40, 100))]
    room = CONTEXT_TOKENS - len(prompt)

    async def scenario(allow_auto_truncate: bool):
        async with (
            serving(model_dir, allow_auto_truncate=allow_auto_truncate) as (url, _),
            aiohttp.ClientSession() as session,
        ):
            return [
                await post(session, url + protocol.GENERATE, body)
                for body in (
                    greedy_body(prompt, max_new_tokens=room),  # prompt + new = context: SGLang refuses it
                    greedy_body(prompt, max_new_tokens=room - 1),
                    greedy_body(prompt * 4, max_new_tokens=1),  # the prompt alone overflows (>= 160)
                )
            ]

    at_context, below, long_prompt = asyncio.run(scenario(False))
    assert at_context[0] == 400 and "sampling_params.max_new_tokens" in at_context[1]
    assert "context length of 128" in at_context[1]
    assert below[0] == 200 and len(_output_ids(below[1])) == room - 1
    assert long_prompt[0] == 400 and "input_ids" in long_prompt[1]
    # allow_auto_truncate: max_new_tokens shrinks to what the context leaves; a long prompt is cut to it.
    at_context, below, long_prompt = asyncio.run(scenario(True))
    assert at_context[0] == 200 and len(_output_ids(at_context[1])) == room
    assert below[0] == 200 and len(_output_ids(below[1])) == room - 1
    assert long_prompt[0] == 200 and _output_ids(long_prompt[1]) == []


# ---------------------------------------------------------------- item 2: weight-update group joins


def _join_body(port: int, rank_offset: int = 1, address: str = "127.0.0.1", name: str = "g") -> dict:
    return protocol.init_weights_update_group_body(address, port, rank_offset, 2, name, "gloo")


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_a_join_never_opens_a_store_nor_reaches_another_address(model_dir):
    async def scenario():
        async with serving(model_dir) as (url, _), aiohttp.ClientSession() as session:
            port = free_port()
            started = time.monotonic()
            status, text = await post(session, url + protocol.INIT_WEIGHTS_UPDATE_GROUP, _join_body(port, 0))
            assert status == 400 and "rank_offset" in text and not _listening(port)
            for address in ("10.11.12.13", "0.0.0.0", "example.org"):
                status, text = await post(
                    session, url + protocol.INIT_WEIGHTS_UPDATE_GROUP, _join_body(port, address=address)
                )
                assert status == 400 and "master_address" in text and address in text
            assert time.monotonic() - started < 5  # refused at once, nothing waited for

    asyncio.run(scenario())


def test_a_pending_join_is_bounded_and_generation_goes_on(model_dir):
    """Nobody hosts the store: the join waits at most the timeout, on a daemon thread (a stuck join never
    holds up the engine's exit), while requests are served; the same name cannot be joined twice at once."""
    timeout_s = 4.0
    rng = random.Random()

    async def scenario():
        settings = ServerSettings(weight_group_timeout_s=timeout_s)
        async with serving(model_dir, settings) as (url, _), aiohttp.ClientSession() as session:
            started = time.monotonic()
            join = asyncio.ensure_future(
                post(session, url + protocol.INIT_WEIGHTS_UPDATE_GROUP, _join_body(free_port()))
            )
            await asyncio.sleep(0.5)
            threads = [thread for thread in threading.enumerate() if thread.name == "cpu-engine-group-join"]
            assert threads and all(thread.daemon for thread in threads)
            status, text = await post(
                session, url + protocol.INIT_WEIGHTS_UPDATE_GROUP, _join_body(free_port())
            )
            assert status == 400 and "exists" in text
            answers = await asyncio.gather(
                *(post(session, url + protocol.GENERATE, greedy_body(p)) for p in random_prompts(4, rng))
            )
            served_after = time.monotonic() - started
            assert [status for status, _ in answers] == [200] * 4 and not join.done()
            status, text = await join
            return served_after, time.monotonic() - started, status, text

    served_after, joined_after, status, text = asyncio.run(scenario())
    assert served_after < timeout_s
    assert status == 400 and '"success": false' in text and "joining 'g' failed" in text
    assert timeout_s - 0.5 <= joined_after < timeout_s + 15
