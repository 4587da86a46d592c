"""The CPU engine's HTTP server in the test's own process and event loop (aiohttp's test server), for the
unit tests that drive it as a client would and look at its scheduler meanwhile."""

import contextlib
import random
from collections.abc import AsyncIterator

import aiohttp
import torch
from aiohttp.test_utils import TestServer

from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.scheduler import Scheduler
from megatron_dapo.rollout.cpu_engine.server import EngineServer, ServerSettings


@contextlib.asynccontextmanager
async def serving(
    model_dir, settings: ServerSettings | None = None, allow_auto_truncate: bool = False
) -> AsyncIterator[tuple[str, EngineServer]]:
    """The engine on a free loopback port; yields its URL and the EngineServer."""
    runner = ModelRunner(str(model_dir), torch.float32, context_length=None)
    scheduler = Scheduler(
        runner,
        eos_token_ids=frozenset(),
        max_running_requests=64,
        seed=random.randrange(2**31),
        allow_auto_truncate=allow_auto_truncate,
    )
    server = EngineServer(
        runner, scheduler, None, str(model_dir), None, "default", settings or ServerSettings()
    )
    test_server = TestServer(server.app(), host="127.0.0.1")
    await test_server.start_server()
    try:
        yield str(test_server.make_url("")).rstrip("/"), server
    finally:
        await test_server.close()


async def post(session: aiohttp.ClientSession, url: str, body=None, data: str | None = None, **kwargs):
    """(status, text) of a POST of `body` as JSON, or of `data` verbatim."""
    async with session.post(url, json=body if data is None else None, data=data, **kwargs) as response:
        return response.status, await response.text()
