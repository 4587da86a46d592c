"""The CPU engine as a separate process, driven over HTTP through the project's client only.

The conformance checks of any server speaking SGLang's protocol (tests/helpers/engine_checks.py, which
tests/gpu runs against real SGLang servers), then what only the CPU engine is held to: exact batching,
requests refused while released, updates over a gloo broadcast, its error messages, its exit.
One engine serves the whole module.
"""

import asyncio
import base64
import pickle
import time
from collections.abc import Iterator
from datetime import timedelta

import aiohttp
import pytest
import torch
import torch.distributed as dist

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.api_key import api_key_from_env, authorization_header
from megatron_dapo.rollout.engine import EngineRequestError
from megatron_dapo.rollout.launcher import ServerPool, ServerSpec, free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import SamplingParams
from tests.helpers.engine_checks import (
    CONFORMANCE_CHECKS,
    PROMPT,
    EngineUnderTest,
    assert_logprobs_match,
    check_name,
    greedy_reference,
    load_model,
    resume_with_reference_weights,
    save_engine_model,
    seeded_sampling_is_reproducible,
    weight_payload,
)

pytestmark = pytest.mark.slow

LOGPROB_TOLERANCE = 1e-4  # fp32 engine against the fp32 Hugging Face model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_engine_model(tmp_path_factory.mktemp("engine_model"))


@pytest.fixture(scope="module")
def engine(model_dir, tmp_path_factory) -> Iterator[EngineUnderTest]:
    log_file = tmp_path_factory.mktemp("engine_log") / "cpu_engine.log"
    spec = ServerSpec(
        model_path=str(model_dir),
        port=free_port(),
        engine="cpu",
        random_seed=1234,
        log_file=str(log_file),
        env={"OMP_NUM_THREADS": "1"},  # tiny matrices: more threads only contend with the test process
    )
    other = load_model(save_engine_model(tmp_path_factory.mktemp("other_model"), seed=1))
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    yield EngineUnderTest(pool, load_model(model_dir), other, LOGPROB_TOLERANCE, "cpu", abort_after_s=1.0)
    pool.stop()


@pytest.mark.parametrize("check", CONFORMANCE_CHECKS, ids=check_name)
def test_conformance(engine, check):
    """Each check every server of SGLang's protocol passes (tests/gpu runs them on SGLang)."""
    engine.run(check)


def test_seeded_sampling_is_reproducible(engine):
    engine.run(seeded_sampling_is_reproducible)


async def _concurrent_requests_are_batched(client: SGLangClient, engine: EngineUnderTest) -> None:
    prompts = [PROMPT[:2], PROMPT, (7, 7, 7, 1, 2, 3, 4, 5, 6), (60,)]
    lengths = [3, 10, 17, 6]  # rows leave the batch at different steps
    results = await asyncio.gather(
        *(
            client.generate(prompt, SamplingParams(temperature=0.0, max_new_tokens=length))
            for prompt, length in zip(prompts, lengths, strict=True)
        ),
        client.generate((1, 2, 3, 4), SamplingParams(temperature=0.7, max_new_tokens=8, seed=1), n=3),
    )
    for prompt, length, [completion] in zip(prompts, lengths, results[:-1], strict=True):
        assert completion.token_ids == greedy_reference(engine.reference, prompt, length)
    samples = results[-1]
    assert sum(completion.meta["cached_tokens"] > 0 for completion in samples) >= 2  # one prefill, shared
    for completion in samples:
        assert_logprobs_match(
            engine.reference, (1, 2, 3, 4), completion, temperature=0.7, tolerance=LOGPROB_TOLERANCE
        )


def test_concurrent_requests_are_batched_exactly(engine):
    engine.run(_concurrent_requests_are_batched)


async def _refused_while_released(client: SGLangClient, engine: EngineUnderTest) -> None:
    await client.release_memory()
    with pytest.raises(EngineRequestError, match="released"):
        await client.generate(PROMPT, SamplingParams(max_new_tokens=2))
    await resume_with_reference_weights(client, engine, weight_version=6)


def test_requests_while_released_are_refused(engine):
    engine.run(_refused_while_released)


def _join_as_sglang_does(port: int, group_name: str) -> dist.ProcessGroup:
    """Rank 0 of a 2-rank group, joined exactly as SGLang's `init_custom_process_group` joins (restated here
    as the reference the engine must meet): a TCP store at the address, keys under the group's name, a group
    beside the default one (this process has none)."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    timeout = timedelta(seconds=60)
    store, rank, world_size = next(rendezvous(f"tcp://127.0.0.1:{port}", 0, 2, timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(
        world_size, rank, [], dist.Backend("gloo"), store, group_name=group_name, timeout=timeout
    )
    _world.pg_group_ranks[group] = {0: 0, 1: 1}
    return group


async def _update_from_distributed(client: SGLangClient, engine: EngineUnderTest) -> None:
    """The test process plays the trainer's senders of two pipeline stages, each rank 0 of a named group of
    its own; the engine joins both as rank 1 and holds them at once."""
    loop = asyncio.get_running_loop()
    groups = {}
    for group_name in ("stage0", "stage1"):
        port = free_port()
        # Both sides block until the other joins (or receives): the HTTP call and rank 0 run concurrently.
        _, groups[group_name] = await asyncio.gather(
            client.init_weights_update_group(
                client.server_urls[0], master_address="127.0.0.1", master_port=port, rank_offset=1,
                world_size=2, group_name=group_name, backend="gloo",
            ),
            loop.run_in_executor(None, _join_as_sglang_does, port, group_name),
        )  # fmt: skip
    try:
        syncs = ((engine.other, 4, None, "stage0"), (engine.reference, 5, "flattened_bucket", "stage1"))
        for model, version, load_format, group_name in syncs:
            named = list(model.state_dict().items())
            await asyncio.gather(
                client.update_weights_from_distributed(
                    [name for name, _ in named],
                    [str(tensor.dtype).removeprefix("torch.") for _, tensor in named],
                    [list(tensor.shape) for _, tensor in named],
                    weight_version=version,
                    group_name=group_name,
                    load_format=load_format,
                ),
                loop.run_in_executor(
                    None, _broadcast, [tensor for _, tensor in named], load_format, groups[group_name]
                ),
            )
            [completion] = await client.generate(PROMPT, SamplingParams(temperature=0.0, max_new_tokens=8))
            assert completion.token_ids == greedy_reference(model, PROMPT, 8)
            assert completion.weight_version == version
        for group_name in groups:
            await client.destroy_weights_update_group(group_name)
        with pytest.raises(EngineRequestError, match="no group 'stage0'"):
            await client.destroy_weights_update_group("stage0")
    finally:
        for group in groups.values():
            dist.destroy_process_group(group)


def _broadcast(tensors: list[torch.Tensor], load_format: str | None, group: dist.ProcessGroup) -> None:
    if load_format is None:
        for tensor in tensors:
            dist.broadcast(tensor.contiguous(), group=group, group_src=0)
    else:  # one buffer of all the bytes, in order and unpadded, as SGLang's FlattenedTensorBucket lays them
        flat = torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for tensor in tensors])
        dist.broadcast(flat, group=group, group_src=0)


def test_weight_update_from_distributed_broadcast(engine):
    engine.run(_update_from_distributed)


async def _errors_name_their_cause(client: SGLangClient, engine: EngineUnderTest) -> None:
    url = client.server_urls[0]
    async with aiohttp.ClientSession(headers=authorization_header(api_key_from_env())) as session:
        body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2, "repetition_penalty": 1.3}}
        async with session.post(url + protocol.GENERATE, json=body) as response:
            assert response.status == 400 and "repetition_penalty" in await response.text()
        async with session.post(url + protocol.GENERATE, json={"input_ids": [1, 64]}) as response:
            assert response.status == 400 and "input_ids[0]" in await response.text()
    wrong_shape = [("model.norm.weight", torch.randn(7))]
    wrong_dtype = [("model.norm.weight", torch.randn(32, dtype=torch.float64))]
    for named, cause in ((wrong_shape, "shape"), (wrong_dtype, "dtype torch.float64")):
        refused = pytest.raises(EngineRequestError, match=rf"model\.norm\.weight: {cause}")
        with refused, weight_payload(named, "cpu") as payload:
            await client.update_weights_from_tensor([payload], weight_version=9)
    pickled = base64.b64encode(pickle.dumps([("model.norm.weight", torch.randn(32))])).decode()
    with pytest.raises(EngineRequestError, match="never unpickles"):
        await client.update_weights_from_tensor([pickled], weight_version=9)
    assert await client.health() == {url: True}
    info = await client.model_info(url)
    assert set(info) == protocol.MODEL_INFO_FIELDS and info["weight_version"] != "9"


def test_errors_name_their_cause(engine):
    engine.run(_errors_name_their_cause)


def test_a_join_nobody_answers_neither_stalls_generation_nor_delays_exit(model_dir, tmp_path):
    """Its own engine (the default 60 s join wait): requests are served while the join waits, and SIGTERM
    ends the engine at once (a join used to hold the model thread, and the exit, for up to 10 minutes)."""
    spec = ServerSpec(model_path=str(model_dir), port=free_port(), engine="cpu",
                      log_file=str(tmp_path / "engine.log"), env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    pool = ServerPool([spec], start_timeout_s=180)
    asyncio.run(pool.start())
    [server] = pool.servers
    try:

        async def generate_while_joining():
            async with SGLangClient(pool.urls, api_key=pool.api_key) as client:
                join = asyncio.ensure_future(
                    client.init_weights_update_group(
                        pool.urls[0], master_address="127.0.0.1", master_port=free_port(), rank_offset=1,
                        world_size=2, backend="gloo",
                    )
                )  # fmt: skip
                await asyncio.sleep(1.0)
                params = SamplingParams(temperature=0.0, max_new_tokens=6)
                [completion] = await asyncio.wait_for(client.generate(PROMPT, params), timeout=30)
                assert len(completion.token_ids) == 6 and not join.done()
                join.cancel()

        asyncio.run(generate_while_joining())
        started = time.monotonic()
        server.process.terminate()
        server.process.wait(timeout=20)
        assert time.monotonic() - started < 10
    finally:
        pool.stop()
