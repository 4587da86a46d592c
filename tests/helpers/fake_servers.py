"""Fake SGLang servers on 127.0.0.1 (aiohttp test servers) for the client tests: one that answers /generate
like SGLang (holding requests or failing on demand) and records the pause/continue bodies it gets, and one
that accepts every request and never answers."""

import asyncio
import time

from aiohttp import web
from aiohttp.test_utils import TestServer

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.cpu_engine import requests as engine_requests
from megatron_dapo.rollout.sglang_client import RetryPolicy
from megatron_dapo.rollout.types import SamplingParams

FAST_RETRY = RetryPolicy(max_retries=3, backoff_s=0.05, max_backoff_s=1.0, connect_timeout_s=2.0)
PARAMS = SamplingParams(temperature=0.8, max_new_tokens=2, seed=100)


class FakeServer:
    """Answers /generate like SGLang; can hold requests until released or aborted, or fail with a status."""

    def __init__(self, hold: bool = False, failures: int = 0, status: int | None = None):
        self.hold, self.failures, self.status = hold, failures, status
        self.arrivals: list[float] = []
        self.generate_bodies: list[dict] = []
        self.abort_bodies: list[dict] = []
        self.pause_bodies: list[tuple[str, object]] = []  # (route, JSON body) of pause and continue calls
        self.released = asyncio.Event()
        self._aborted: dict[str, asyncio.Event] = {}
        app = web.Application()
        app.router.add_post(protocol.GENERATE, self._generate)
        app.router.add_post(protocol.ABORT_REQUEST, self._abort)
        app.router.add_post(protocol.PAUSE_GENERATION, self._pause_or_continue)
        app.router.add_post(protocol.CONTINUE_GENERATION, self._pause_or_continue)
        self.server = TestServer(app)

    async def __aenter__(self) -> "FakeServer":
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.released.set()
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    async def _generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.arrivals.append(time.monotonic())
        if self.failures:
            self.failures -= 1
            return web.Response(status=503, text="starting")
        if self.status:
            return web.Response(status=self.status, text="bad request")
        self.generate_bodies.append(body)
        aborted = self._aborted.setdefault(body["rid"], asyncio.Event())
        if self.hold:
            waits = [asyncio.ensure_future(self.released.wait()), asyncio.ensure_future(aborted.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        tokens = [] if aborted.is_set() else [5, 6]
        finish = protocol.finish_abort("Aborted") if aborted.is_set() else protocol.finish_length(2)
        return web.json_response(
            engine_requests.generate_output(
                rid=body["rid"], output_ids=tokens, logprobs=[-0.5] * len(tokens), token_texts=None,
                text=None, finish_reason=finish, prompt_tokens=len(body["input_ids"]), cached_tokens=0,
                weight_version="3", e2e_latency=0.0,
            )
        )  # fmt: skip

    async def _abort(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.abort_bodies.append(body)
        if body.get("abort_all"):
            for event in self._aborted.values():
                event.set()
        else:
            self._aborted.setdefault(body["rid"], asyncio.Event()).set()
        return web.Response()

    async def _pause_or_continue(self, request: web.Request) -> web.Response:
        self.pause_bodies.append((request.path, await request.json() if request.can_read_body else None))
        return web.json_response({"message": "ok", "status": "ok"})  # SGLang's answer, message aside


class SilentServer:
    """Accepts every connection and request, and never answers any."""

    def __init__(self) -> None:
        self.requests = 0
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._never)
        self.server = TestServer(app)

    async def _never(self, request: web.Request) -> web.Response:
        self.requests += 1
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def __aenter__(self) -> "SilentServer":
        await self.server.start_server()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.server.close()

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")
