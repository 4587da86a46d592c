"""No request waits forever (deadlines from measured speed), and the check before each step: against fake
servers, one of which accepts connections and never answers."""

import asyncio
import random
import time

import pytest
from aiohttp import web

from megatron_dapo.config import ConfigError, from_dict
from megatron_dapo.eval.job import leave_out_silent_servers
from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.deadline import SPEED_WINDOW, DeadlinePolicy, SpeedMeter
from megatron_dapo.rollout.engine import EngineUnavailableError
from megatron_dapo.rollout.failover import check_servers
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_client import SGLangClient
from megatron_dapo.trainer.rollout.engine import request_deadlines
from tests.helpers.fake_servers import FAST_RETRY, PARAMS, FakeServer, SilentServer

SHORT = DeadlinePolicy(floor_s=0.5, min_tokens_per_s=100.0, slack=1.0)  # 0.52 s for PARAMS' 2 tokens


class VersionServer(FakeServer):
    """A fake that also answers /health and /get_weight_version."""

    def __init__(self, version: int):
        super().__init__()
        self.version = version
        self.server.app.router.add_get(protocol.HEALTH, self._ok)
        self.server.app.router.add_get(protocol.GET_WEIGHT_VERSION, self._version)
        self.server.app.router.add_post(protocol.FLUSH_CACHE, self._ok)

    async def _ok(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": str(self.version)})


def test_deadline_follows_the_slowest_recent_sample():
    rng = random.Random()
    policy = DeadlinePolicy(floor_s=rng.uniform(1, 50), min_tokens_per_s=rng.uniform(1, 20), slack=2.5)
    meter = SpeedMeter(policy)
    url, max_new = "http://127.0.0.1:1", rng.randint(100, 5000)
    # Before any sample has finished: the assumed speed.
    assert meter.deadline_s(url, max_new) == pytest.approx(
        policy.floor_s + max_new * 2.5 / policy.min_tokens_per_s
    )
    samples = [(rng.randint(1, 900), rng.uniform(0.1, 20)) for _ in range(SPEED_WINDOW + 7)]
    for tokens, seconds in samples:
        meter.record(url, tokens, seconds)
    meter.record(url, 0, 1e-3)  # an empty sample (aborted before prefill) says nothing of speed
    slowest = min(tokens / seconds for tokens, seconds in samples[-SPEED_WINDOW:])
    assert meter.tokens_per_s(url) == pytest.approx(slowest)
    assert meter.deadline_s(url, max_new) == pytest.approx(policy.floor_s + max_new * 2.5 / slowest)
    meter.forget(url)  # a restarted server is measured anew
    assert meter.tokens_per_s(url) is None
    with pytest.raises(ValueError, match="slack"):
        DeadlinePolicy(slack=0.5)


def test_a_silent_server_loses_its_samples_to_another_within_the_deadline():
    async def scenario():
        async with (
            SilentServer() as silent,
            FakeServer() as alive,
            SGLangClient([silent.url, alive.url], retry=FAST_RETRY, deadlines=SHORT) as client,
        ):
            started = time.monotonic()
            completions = await client.generate([1, 2], PARAMS, n=2)  # both to the silent server first
            elapsed = time.monotonic() - started
            assert silent.requests == 2
            assert [completion.meta["server"] for completion in completions] == [alive.url] * 2
            assert SHORT.floor_s <= elapsed < SHORT.floor_s + 2.0  # no retry on the silent server
            assert client.down_servers() == [silent.url] and client.failures == 1
            assert client.speeds.tokens_per_s(alive.url) is not None  # measured from the finished samples

    asyncio.run(scenario())


class QueueingServer(FakeServer):
    """Answers at once, except request "queued", which it answers after `delay_s` (as if queued)."""

    def __init__(self, delay_s: float):
        super().__init__()
        self.delay_s = delay_s

    async def _generate(self, request: web.Request) -> web.Response:
        if (await request.json())["rid"].startswith("queued"):
            await asyncio.sleep(self.delay_s)
        return await super()._generate(request)


def test_a_queued_sample_keeps_its_server_while_other_samples_finish():
    async def scenario():
        async with QueueingServer(delay_s=4 * SHORT.floor_s) as busy:
            async with SGLangClient([busy.url], retry=FAST_RETRY, deadlines=SHORT) as client:
                queued = asyncio.ensure_future(client.generate([1], PARAMS, request_id="queued"))
                while not queued.done():  # the server finishes another sample every 0.1 s meanwhile
                    await client.generate([2], PARAMS)
                    await asyncio.sleep(0.1)
                [completion] = await queued
                assert completion.token_ids and completion.meta["server"] == busy.url
                assert client.failures == 0
            # With nothing else finishing, the same wait is past the deadline (of a client with no measure).
            async with SGLangClient([busy.url], retry=FAST_RETRY, deadlines=SHORT) as client:
                with pytest.raises(EngineUnavailableError, match="no answer within"):
                    await client.generate([1], PARAMS, request_id="queued-alone")

    asyncio.run(scenario())


def test_only_a_silent_server_fails_with_a_clear_error_in_bounded_time():
    async def scenario():
        async with SilentServer() as silent, SGLangClient([silent.url], deadlines=SHORT) as client:
            started = time.monotonic()
            with pytest.raises(EngineUnavailableError) as failure:
                await client.generate([1], PARAMS)
            assert time.monotonic() - started < SHORT.floor_s + 2.0
            message = str(failure.value)
            assert "no server is available" in message and "no answer within 0.5 s" in message, message

    asyncio.run(scenario())


def test_check_admits_current_servers_holds_out_stale_ones_and_skips_silent_ones():
    async def scenario():
        version = random.randint(3, 1000)
        dead = f"http://127.0.0.1:{free_port()}"
        async with (
            VersionServer(version) as current,
            VersionServer(version - 1) as stale,
            SilentServer() as silent,
        ):
            urls = [stale.url, silent.url, dead, current.url]
            async with SGLangClient(urls, retry=FAST_RETRY) as client:
                check = await check_servers(client, None, version)
                assert (check.ready, check.stale) == ([current.url], [stale.url])
                assert check.failed == [silent.url, dead] and check.restarted == []
                assert client.failures == 3
                # Generation goes only to the current server; control calls to every server that answers.
                for _ in range(3):
                    [completion] = await client.generate([1], PARAMS)
                    assert completion.meta["server"] == current.url
                answered = await client._on_servers(None, protocol.FLUSH_CACHE, None)
                assert [url for url, _ in answered] == [stale.url, current.url]
                # The stale server got the weights (as a sync would give them): the next check admits it.
                stale.version = version
                check = await check_servers(client, None, version)
                assert check.ready == [stale.url, current.url]
                assert client.down_servers() == [silent.url, dead]
                assert client.failures == 3  # the same failures, not counted again

    asyncio.run(scenario())


def test_dapo_eval_leaves_out_a_silent_server_and_refuses_when_none_answers():
    async def scenario():
        async with SilentServer() as silent, VersionServer(0) as alive:
            async with SGLangClient([silent.url, alive.url], retry=FAST_RETRY) as client:
                started = time.monotonic()
                await leave_out_silent_servers(client)
                assert time.monotonic() - started < FAST_RETRY.connect_timeout_s + 1.0
                assert client.down_servers() == [silent.url]
                [completion] = await client.generate([1], PARAMS)
                assert completion.meta["server"] == alive.url and silent.requests == 1  # its /health only
            async with SGLangClient([silent.url], retry=FAST_RETRY) as client:
                with pytest.raises(EngineUnavailableError, match="no server answers /health"):
                    await leave_out_silent_servers(client)

    asyncio.run(scenario())


def test_the_trainer_client_takes_its_deadlines_from_the_config():
    rng = random.Random()
    floor_s, speed, slack = rng.uniform(1, 600), rng.uniform(0.1, 100), rng.uniform(1, 10)
    cfg = from_dict(
        {
            "rollout": {
                "request_deadline_floor_s": floor_s,
                "request_min_tokens_per_s": speed,
                "request_deadline_slack": slack,
            }
        }
    )
    assert request_deadlines(cfg.rollout) == DeadlinePolicy(floor_s, speed, slack)
    with pytest.raises(ConfigError, match=r"rollout\.request_deadline_slack"):
        from_dict({"rollout": {"request_deadline_slack": 0.5}})
