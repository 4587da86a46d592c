"""The async HTTP client of SGLang servers (and of the CPU engine, which speaks the same protocol).

Dispatch: each generate() call goes whole to the server with the fewest requests in flight, so the n samples
of a prompt share that server's prefix cache; with an sglang-router, generation goes through the router and
control calls go to every server directly. Each sample is its own SGLang request with its own rid
("{request_id}-{i};"): SGLang cannot abort the sub-requests of an n > 1 request through their parent's
rid, and its scheduler aborts every request whose rid *starts with* the given one, so rids must be
prefix-free; the closing ";" (refused inside request ids) makes them so.

Failures: connection errors and 502/503/504 are retried with exponential backoff; a server still unreachable
after the retries, or that does not answer a sample within its deadline (rollout/deadline.py), is marked down:
the samples it held move to another server (generation restarts there), and neither generation nor weight
updates go to it until it is admitted again. A server can also be held out: no generation, but weight updates,
e.g. a restarted server waiting for the current weights. Restarting a dead server is the launcher's job
(ServerPool.restart_dead); deciding when a server comes back is rollout/failover.py's.

Authentication: every request carries `Authorization: Bearer <api_key>` (SGLang's --api-key); the key is the
`api_key` argument, else the environment variable DAPO_API_KEY (rollout/api_key.py), else none.
"""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.api_key import api_key_from_env, authorization_header
from megatron_dapo.rollout.deadline import DEFAULT_DEADLINES, DeadlinePolicy, SpeedMeter
from megatron_dapo.rollout.engine import (
    EngineError,
    EngineRequestError,
    EngineTimeoutError,
    EngineUnavailableError,
)
from megatron_dapo.rollout.types import Completion, FinishReason, SamplingParams

RETRYABLE_STATUSES = frozenset({502, 503, 504})  # a server starting, restarting or overloaded
RID_END = ";"  # ends every rid, so that no rid is a prefix of another
ABORT_RESEND_S = 1.0  # SGLang drops an abort for a rid it does not hold yet: repeat until the sample ends

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 5  # attempts after the first one
    backoff_s: float = 0.5  # wait before the first retry; doubles at each retry
    max_backoff_s: float = 8.0
    connect_timeout_s: float = 10.0
    control_timeout_s: float = 600.0  # weight updates, memory, flush; generation: see rollout/deadline.py

    def delay_s(self, retry: int) -> float:
        return min(self.max_backoff_s, self.backoff_s * 2**retry)


@dataclass
class _Sample:
    url: str  # the server holding the sample now (it changes when the sample moves)
    task: asyncio.Task | None = None


class SGLangClient:
    """Implements rollout.engine.RolloutEngine over HTTP. Use as `async with SGLangClient(urls) as client`."""

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        router_url: str | None = None,
        retry: RetryPolicy = RetryPolicy(),
        api_key: str | None = None,
        deadlines: DeadlinePolicy = DEFAULT_DEADLINES,
    ):
        if not server_urls:
            raise ValueError("server_urls: give at least one server, e.g. ['http://127.0.0.1:30000']")
        self.server_urls = [url.rstrip("/") for url in server_urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self.retry = retry
        self._headers = authorization_header(api_key or api_key_from_env())
        self.weight_versions = dict.fromkeys(self.server_urls, 0)
        self._outstanding = dict.fromkeys(self.server_urls, 0)  # samples in flight, per server
        self._unavailable: set[str] = set()  # no generation goes there
        self._down: set[str] = set()  # nothing goes there (a subset of _unavailable)
        self.failures = 0  # times a server was taken out of dispatch
        self.speeds = SpeedMeter(deadlines)
        self._inflight: dict[str, dict[str, _Sample]] = {}  # request_id -> rid -> sample
        self._aborted: set[str] = set()  # request_ids the caller aborted
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def weight_version(self) -> int:
        """The version every server has at least."""
        return min(self.weight_versions.values())

    def mark_available(self, url: str) -> None:
        """Take a (re)started server back into dispatch; it holds its initial weights (version 0)."""
        self.speeds.forget(url)
        self.admit(url)
        self.weight_versions[url] = 0

    def admit(self, url: str) -> None:
        """Generation and weight updates go to `url` again."""
        self._unavailable.discard(url)
        self._down.discard(url)

    def hold_out(self, url: str, reason: str) -> None:
        """No generation goes to `url`, weight updates do: it is alive but holds other weights."""
        self._take_out(url, reason)
        self._down.discard(url)

    def mark_down(self, url: str, reason: str) -> None:
        """Nothing goes to `url` until it is admitted or held out again: it does not answer."""
        self._take_out(url, reason)
        self._down.add(url)

    def down_servers(self) -> list[str]:
        return [url for url in self.server_urls if url in self._down]

    def _take_out(self, url: str, reason: str) -> None:
        if url not in self._unavailable:
            self.failures += 1
            logger.warning("rollout server %s taken out of dispatch: %s", url, reason)
        self._unavailable.add(url)

    # ------------------------------------------------------------ generation

    async def generate(
        self, input_ids: Sequence[int], params: SamplingParams, n: int = 1, *, request_id: str | None = None
    ) -> list[Completion]:
        if n < 1:
            raise ValueError(f"n={n}: ask for at least one sample")
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._inflight:
            raise ValueError(f"request_id {request_id!r} is already in flight; give each generate() its own")
        if RID_END in request_id:
            raise ValueError(f"request_id {request_id!r}: {RID_END!r} is reserved to end the rids of samples")
        url = self.router_url or self._pick_server()
        samples: dict[str, _Sample] = {}
        self._inflight[request_id] = samples
        for index in range(n):
            rid = f"{request_id}-{index}{RID_END}"
            seed = None if params.seed is None else params.seed + index
            sample = samples[rid] = _Sample(url)
            # Counted at dispatch, not when the task first runs: back-to-back calls must see each other.
            self._outstanding[url] = self._outstanding.get(url, 0) + 1
            body = protocol.generate_body(input_ids, params, rid, seed)
            sample.task = asyncio.ensure_future(
                self._generate_sample(request_id, sample, body, params.max_new_tokens)
            )
            sample.task.add_done_callback(lambda _, sample=sample: self._count_done(sample))
        try:
            return list(await asyncio.gather(*(sample.task for sample in samples.values())))
        except BaseException:
            # Cancelled or failed: drop the other samples too. Closing their connections makes SGLang (and the
            # CPU engine) abort them server-side.
            for sample in samples.values():
                sample.task.cancel()
            raise
        finally:
            del self._inflight[request_id]
            self._aborted.discard(request_id)

    def _pick_server(self, failure: EngineError | None = None) -> str:
        """The available server with the fewest samples in flight (the first listed among equals)."""
        candidates = [url for url in self.server_urls if url not in self._unavailable]
        if not candidates:
            after = f" (the last failure: {failure})" if failure else ""
            raise EngineUnavailableError(",".join(self.server_urls), f"no server is available{after}")
        return min(candidates, key=self._outstanding.__getitem__)

    def _count_done(self, sample: _Sample) -> None:
        self._outstanding[sample.url] -= 1

    async def _generate_sample(
        self, request_id: str, sample: _Sample, body: dict, max_new_tokens: int
    ) -> Completion:
        while True:
            if request_id in self._aborted:  # aborted before reaching a server
                return Completion([], [], FinishReason.ABORT, self.weight_version, {"id": body["rid"]})
            started = time.monotonic()
            try:
                answer = await self._within_deadline(
                    self._request("POST", sample.url, protocol.GENERATE, body, timeout_s=None),
                    sample.url,
                    max_new_tokens,
                    started,
                )
            except EngineUnavailableError as error:
                if self.router_url is not None:
                    raise
                self.mark_down(sample.url, str(error))
                new_url = self._pick_server(error)  # raises when no server is left
                self._outstanding[sample.url] -= 1
                self._outstanding[new_url] += 1
                sample.url = new_url
                continue
            completion = protocol.parse_generate_response(answer)
            completion.meta["server"] = sample.url
            self.speeds.record(sample.url, len(completion.token_ids), time.monotonic() - started)
            return completion

    async def _within_deadline(
        self, request: Coroutine[Any, Any, Any], url: str, max_new_tokens: int, started: float
    ) -> Any:
        """The answer of a /generate request; EngineTimeoutError once neither it nor any other sample of
        its server has finished within the deadline. The clock restarts whenever one does: a busy server
        queues samples, and those it finishes show it alive."""
        task = asyncio.ensure_future(request)
        try:
            while True:
                deadline_s = self.speeds.deadline_s(url, max_new_tokens)
                remaining = max(started, self.speeds.last_finished(url)) + deadline_s - time.monotonic()
                if remaining <= 0:
                    raise EngineTimeoutError(
                        url,
                        f"{protocol.GENERATE} got no answer within {deadline_s:.1f} s, nor did any other "
                        "sample of this server finish",
                    )
                done, _ = await asyncio.wait({task}, timeout=remaining)
                if done:
                    return task.result()
        finally:
            task.cancel()  # closing the connection aborts the sample server-side

    async def abort(self, request_id: str) -> None:
        samples = self._inflight.get(request_id)
        if samples is None:
            return
        self._aborted.add(request_id)
        while pending := {rid: sample for rid, sample in samples.items() if not sample.task.done()}:
            await asyncio.gather(*(self._send_abort(sample.url, rid) for rid, sample in pending.items()))
            await asyncio.wait([sample.task for sample in pending.values()], timeout=ABORT_RESEND_S)

    async def _send_abort(self, url: str, rid: str) -> None:
        # Behind a router the server of a rid is unknown: every server gets the abort; the others ignore it.
        urls = self.server_urls if url == self.router_url else [url]
        await asyncio.gather(*(self._post_abort(target, protocol.abort_body(rid)) for target in urls))

    async def _post_abort(self, url: str, body: dict) -> None:
        # No retries: a server that cannot be reached holds nothing to abort (its samples move or end).
        with contextlib.suppress(EngineUnavailableError):
            await self._request(
                "POST", url, protocol.ABORT_REQUEST, body, timeout_s=self.retry.connect_timeout_s, retries=0
            )

    async def abort_all(self) -> None:
        """End every generate() call of this client, on every server (other clients' requests too)."""
        request_ids = list(self._inflight)
        self._aborted.update(request_ids)
        reachable = [url for url in self.server_urls if url not in self._down]
        await asyncio.gather(*(self._post_abort(url, protocol.abort_all_body()) for url in reachable))
        # A request still on its way to a server escapes abort_all: give the others a moment to end, then
        # abort the stragglers one by one.
        tasks = [
            sample.task
            for request_id in request_ids
            for sample in self._inflight.get(request_id, {}).values()
        ]
        if tasks:
            await asyncio.wait(tasks, timeout=ABORT_RESEND_S)
        await asyncio.gather(*(self.abort(request_id) for request_id in request_ids))

    async def pause_generation(self, mode: str = "abort") -> None:
        """Pause every server (mode: protocol.PAUSE_MODES); returns once each has paused."""
        await self._on_servers(None, protocol.PAUSE_GENERATION, protocol.pause_generation_body(mode))

    async def continue_generation(self) -> None:
        await self._on_servers(None, protocol.CONTINUE_GENERATION, {})

    # ------------------------------------------------------------ weights and memory

    async def update_weights_from_tensor(
        self,
        serialized_named_tensors: Sequence[str],
        *,
        weight_version: int,
        load_format: str | None = None,
        flush_cache: bool = True,
        url: str | None = None,
    ) -> None:
        body = protocol.update_weights_from_tensor_body(
            serialized_named_tensors, load_format, flush_cache, weight_version
        )
        for target, answer in await self._on_servers(url, protocol.UPDATE_WEIGHTS_FROM_TENSOR, body):
            protocol.parse_success_response(answer, protocol.UPDATE_WEIGHTS_FROM_TENSOR)
            self.weight_versions[target] = weight_version

    async def init_weights_update_group(
        self,
        url: str,
        *,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        group_name: str = protocol.DEFAULT_GROUP_NAME,
        backend: str = "nccl",
    ) -> None:
        body = protocol.init_weights_update_group_body(
            master_address, master_port, rank_offset, world_size, group_name, backend
        )
        for _, answer in await self._on_servers(url, protocol.INIT_WEIGHTS_UPDATE_GROUP, body):
            protocol.parse_success_response(answer, protocol.INIT_WEIGHTS_UPDATE_GROUP)

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        *,
        weight_version: int,
        group_name: str = protocol.DEFAULT_GROUP_NAME,
        load_format: str | None = None,
        flush_cache: bool = True,
    ) -> None:
        body = protocol.update_weights_from_distributed_body(
            names, dtypes, shapes, group_name, load_format, flush_cache, weight_version
        )
        for target, answer in await self._on_servers(None, protocol.UPDATE_WEIGHTS_FROM_DISTRIBUTED, body):
            protocol.parse_success_response(answer, protocol.UPDATE_WEIGHTS_FROM_DISTRIBUTED)
            self.weight_versions[target] = weight_version

    async def destroy_weights_update_group(self, group_name: str = protocol.DEFAULT_GROUP_NAME) -> None:
        body = protocol.destroy_weights_update_group_body(group_name)
        for _, answer in await self._on_servers(None, protocol.DESTROY_WEIGHTS_UPDATE_GROUP, body):
            protocol.parse_success_response(answer, protocol.DESTROY_WEIGHTS_UPDATE_GROUP)

    async def release_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._on_servers(
            None, protocol.RELEASE_MEMORY_OCCUPATION, protocol.memory_occupation_body(tags)
        )

    async def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        await self._on_servers(None, protocol.RESUME_MEMORY_OCCUPATION, protocol.memory_occupation_body(tags))

    async def flush_cache(self) -> None:
        await self._on_servers(None, protocol.FLUSH_CACHE, None)

    async def health(self) -> dict[str, bool]:
        async def probe(url: str) -> bool:
            try:
                await self._request(
                    "GET", url, protocol.HEALTH, None, timeout_s=self.retry.connect_timeout_s, retries=0
                )
            except EngineError:
                return False
            return True

        return dict(zip(self.server_urls, await asyncio.gather(*map(probe, self.server_urls)), strict=True))

    async def server_weight_version(self, url: str) -> int | None:
        """The weight version `url` reports, or None when it fails /health (each call bounded by the
        connect timeout: a server that accepts connections and never answers fails too)."""
        try:
            for route in (protocol.HEALTH, protocol.GET_WEIGHT_VERSION):
                answer = await self._request(
                    "GET", url, route, None, timeout_s=self.retry.connect_timeout_s, retries=0
                )
        except EngineError:
            return None
        version = answer.get("weight_version") if isinstance(answer, dict) else None
        return protocol.parse_weight_version(version)

    async def model_info(self, url: str) -> dict:
        return await self._request(
            "GET", url, protocol.GET_MODEL_INFO, None, timeout_s=self.retry.control_timeout_s
        )

    # ------------------------------------------------------------ HTTP

    async def _on_servers(self, url: str | None, route: str, body: dict | None) -> list[tuple[str, Any]]:
        """POST to one server, or to every server not marked down when url is None; answers in server
        order. Of every server, one that cannot be reached is marked down and left out, unless all fail."""
        if url:
            url = url.rstrip("/")
            return [(url, await self._control_request(url, route, body))]
        targets = [target for target in self.server_urls if target not in self._down]
        answers = await asyncio.gather(
            *(self._control_request(target, route, body) for target in targets), return_exceptions=True
        )
        reached = []
        for target, answer in zip(targets, answers, strict=True):
            if isinstance(answer, EngineUnavailableError):
                self.mark_down(target, str(answer))
            elif isinstance(answer, BaseException):
                raise answer
            else:
                reached.append((target, answer))
        if not reached:
            raise EngineUnavailableError(",".join(targets) or "every server", f"{route}: no server answered")
        return reached

    async def _control_request(self, url: str, route: str, body: dict | None) -> Any:
        return await self._request("POST", url, route, body, timeout_s=self.retry.control_timeout_s)

    def _client_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # limit=0: thousands of samples may be in flight at once, one connection each.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), headers=self._headers
            )
        return self._session

    async def _request(
        self,
        method: str,
        url: str,
        route: str,
        body: dict | None,
        *,
        timeout_s: float | None,
        retries: int | None = None,
    ) -> Any:
        """One HTTP call, retried on connection errors and 502/503/504; its JSON answer (None if empty).

        timeout_s bounds the whole call (None: unbounded); connecting is bounded by the retry policy.
        """
        client_timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self.retry.connect_timeout_s)
        max_retries = self.retry.max_retries if retries is None else retries
        for attempt in range(max_retries + 1):
            try:
                async with self._client_session().request(
                    method, url + route, json=body, timeout=client_timeout
                ) as response:
                    text = await response.text()
                    if response.status in RETRYABLE_STATUSES:
                        raise _RetryableStatus(f"status {response.status}: {text[:200]}")
                    if response.status >= 400:
                        raise EngineRequestError(url, route, response.status, text)
            except (aiohttp.ClientConnectionError, _RetryableStatus, TimeoutError) as error:
                if isinstance(error, TimeoutError) and not isinstance(error, aiohttp.ConnectionTimeoutError):
                    # Connected, but no answer in time: retrying would wait as long again.
                    detail = f"{route} got no answer within {timeout_s:.1f} s"
                    raise EngineTimeoutError(url, detail) from error
                if attempt == max_retries:
                    raise EngineUnavailableError(
                        url, f"{route} failed {attempt + 1} times: {error!r}"
                    ) from error
                await asyncio.sleep(self.retry.delay_s(attempt))
                continue
            try:
                return json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                return text  # a few SGLang routes (/flush_cache) answer plain text


class _RetryableStatus(Exception):
    pass
