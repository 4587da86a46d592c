"""The SGLang client against fake servers (aiohttp test servers): dispatch, retries, failover, aborts."""

import asyncio
import contextlib
import itertools
import time

import pytest

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.engine import EngineRequestError, EngineUnavailableError
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.rollout.types import FinishReason
from tests.helpers.fake_servers import FAST_RETRY, PARAMS, FakeServer


async def _until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the fake servers"
        await asyncio.sleep(0.01)


def test_least_outstanding_dispatch_keeps_a_requests_samples_together():
    async def scenario():
        async with (
            FakeServer(hold=True) as a,
            FakeServer(hold=True) as b,
            FakeServer(hold=True) as c,
            SGLangClient([a.url, b.url, c.url], retry=FAST_RETRY) as client,
        ):
            # Issued back to back, before any reaches its server: dispatch must still spread them.
            tasks = [asyncio.ensure_future(client.generate([1, 2], PARAMS)) for _ in range(5)]
            await _until(
                lambda: len(a.generate_bodies) + len(b.generate_bodies) + len(c.generate_bodies) == 5
            )
            assert [len(a.generate_bodies), len(b.generate_bodies), len(c.generate_bodies)] == [2, 2, 1]
            # All 4 samples of one prompt go to the least loaded server.
            grouped = asyncio.ensure_future(client.generate([3], PARAMS, n=4, request_id="group"))
            await _until(lambda: len(c.generate_bodies) == 5)
            assert [body["rid"] for body in c.generate_bodies[1:]] == [f"group-{i};" for i in range(4)]
            # Sample i is seeded with seed + i: samples differ, yet the request is reproducible.
            seeds = [body["sampling_params"]["sampling_seed"] for body in c.generate_bodies[1:]]
            assert seeds == [100, 101, 102, 103]
            for server in (a, b, c):
                server.released.set()
            completions = await grouped
            assert [completion.token_ids for completion in completions] == [[5, 6]] * 4
            assert {completion.weight_version for completion in completions} == {3}
            assert all(completion.meta["server"] == c.url for completion in completions)
            await asyncio.gather(*tasks)
            assert all(count == 0 for count in client._outstanding.values())

    asyncio.run(scenario())


def test_retries_back_off_then_succeed():
    async def scenario():
        async with FakeServer(failures=2) as server, SGLangClient([server.url], retry=FAST_RETRY) as client:
            [completion] = await client.generate([1], PARAMS)
            assert completion.finish_reason is FinishReason.LENGTH
            gaps = [later - earlier for earlier, later in itertools.pairwise(server.arrivals)]
            assert len(server.arrivals) == 3
            assert gaps[0] >= FAST_RETRY.delay_s(0) and gaps[1] >= FAST_RETRY.delay_s(1) == 0.1

    asyncio.run(scenario())


def test_error_status_is_not_retried():
    async def scenario():
        async with FakeServer(status=400) as server, SGLangClient([server.url], retry=FAST_RETRY) as client:
            with pytest.raises(EngineRequestError, match="400"):
                await client.generate([1], PARAMS)
            assert len(server.arrivals) == 1
            # Rids must stay prefix-free (SGLang aborts by prefix): ";" ends each one and is refused in ids.
            with pytest.raises(ValueError, match="reserved"):
                await client.generate([1], PARAMS, request_id="step-1;")

    asyncio.run(scenario())


def test_unreachable_server_is_retried_then_its_samples_move():
    async def scenario():
        dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        async with FakeServer() as alive, SGLangClient([dead, alive.url], retry=FAST_RETRY) as client:
            started = time.monotonic()
            completions = await client.generate([1], PARAMS, n=2)
            # The dead server was tried max_retries + 1 times, with backoff, before the samples moved.
            assert time.monotonic() - started >= sum(FAST_RETRY.delay_s(retry) for retry in range(3))
            assert [completion.meta["server"] for completion in completions] == [alive.url] * 2
            assert len(alive.generate_bodies) == 2
            await client.generate([1], PARAMS)  # now dispatched to the live server directly
            assert len(alive.generate_bodies) == 3
            client.mark_available(dead)
            assert client._pick_server() == dead
        async with SGLangClient([dead], retry=FAST_RETRY) as client:
            with pytest.raises(EngineUnavailableError, match="no server is available"):
                await client.generate([1], PARAMS)

    asyncio.run(scenario())


def test_abort_ends_one_request_and_abort_all_every_request():
    async def scenario():
        async with (
            FakeServer(hold=True) as a,
            FakeServer(hold=True) as b,
            SGLangClient([a.url, b.url], retry=FAST_RETRY) as client,
        ):
            surplus = asyncio.ensure_future(client.generate([1], PARAMS, n=2, request_id="surplus"))
            kept = asyncio.ensure_future(client.generate([2], PARAMS, request_id="kept"))
            await _until(lambda: len(a.generate_bodies) == 2 and len(b.generate_bodies) == 1)
            await client.abort("surplus")
            assert sorted(body["rid"] for body in a.abort_bodies) == ["surplus-0;", "surplus-1;"]
            assert not b.abort_bodies  # only the server holding the request hears of it
            completions = await surplus
            assert [completion.finish_reason for completion in completions] == [FinishReason.ABORT] * 2
            assert not kept.done()
            await client.abort_all()
            assert b.abort_bodies == [{"abort_all": True}]
            [completion] = await kept
            assert completion.finish_reason is FinishReason.ABORT
            await client.abort("surplus")  # ended already: nothing to do

    asyncio.run(scenario())


def test_cancelling_generate_releases_its_samples():
    async def scenario():
        async with FakeServer(hold=True) as server, SGLangClient([server.url], retry=FAST_RETRY) as client:
            task = asyncio.ensure_future(client.generate([1], PARAMS, n=3, request_id="cancelled"))
            await _until(lambda: len(server.generate_bodies) == 3)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert client._outstanding[server.url] == 0 and "cancelled" not in client._inflight

    asyncio.run(scenario())


def test_router_receives_generation_and_workers_receive_aborts():
    async def scenario():
        async with FakeServer(hold=True) as router, FakeServer() as worker_a, FakeServer() as worker_b:
            urls = [worker_a.url, worker_b.url]
            async with SGLangClient(urls, router_url=router.url, retry=FAST_RETRY) as client:
                task = asyncio.ensure_future(client.generate([1], PARAMS, request_id="routed"))
                await _until(lambda: len(router.generate_bodies) == 1)
                assert not worker_a.generate_bodies and not worker_b.generate_bodies
                abort = asyncio.ensure_future(client.abort("routed"))
                await _until(lambda: worker_a.abort_bodies and worker_b.abort_bodies)
                router.released.set()
                await asyncio.gather(task, abort)
                assert worker_a.abort_bodies[0] == {"rid": "routed-0;", "abort_all": False}

    asyncio.run(scenario())


def test_pause_and_continue_reach_every_server_with_sglang_bodies():
    """The bodies are pinned: {"mode"} (PauseGenerationReqInput) and {} (ContinueGenerationReqInput, whose
    torch_empty_cache keeps SGLang's default)."""

    async def scenario():
        async with (
            FakeServer() as a,
            FakeServer() as b,
            SGLangClient([a.url, b.url], retry=FAST_RETRY) as client,
        ):
            for mode in protocol.PAUSE_MODES:
                await client.pause_generation(mode)
                await client.continue_generation()
            with pytest.raises(protocol.ProtocolError, match=r"^mode:"):
                await client.pause_generation("drain")  # refused before anything is sent
            expected = []
            for mode in protocol.PAUSE_MODES:
                expected += [(protocol.PAUSE_GENERATION, {"mode": mode}), (protocol.CONTINUE_GENERATION, {})]
            assert a.pause_bodies == expected and b.pause_bodies == expected

    asyncio.run(scenario())
