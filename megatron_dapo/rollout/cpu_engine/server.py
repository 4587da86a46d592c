"""The CPU engine's HTTP server: SGLang's routes and bodies (built and parsed by sglang_protocol) on aiohttp.

Answers as SGLang does: /generate returns one output dict for one prompt and sample, else a list; failures of
weight updates answer {"success": false, "message"} with status 400; a malformed body answers 400 with
{"error": {"message"}} naming the field; with an API key, a request without it answers 401 (rollout/api_key).
/pause_generation and /continue_generation stop and restart the scheduler's loop (see scheduler.py); each
output reports the weight version of each of its tokens (meta_info.weight_versions).

What it trusts: only clients holding the key (when one is set) on the address it serves on. A weight-update
group is joined only at that address, as a non-zero rank (the trainer, rank 0, hosts the store), within
`ServerSettings.weight_group_timeout_s`, off the model thread: generation goes on while a join waits.
Weight payloads are never unpickled: /update_weights_from_tensor reads only a segment of the checked name,
owner and size in `ServerSettings.weight_shm_dir` (rollout/host_payload.py), and never writes or removes it.
"""

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from aiohttp import web

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.api_key import is_authorized, needs_key
from megatron_dapo.rollout.cpu_engine import requests as engine_requests
from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.scheduler import Scheduler, Sequence
from megatron_dapo.rollout.host_payload import DEFAULT_SHM_DIR, parse_host_payload, read_host_payload
from megatron_dapo.rollout.weight_payload import concat_bytes_size, init_weight_update_group, split_bytes

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ServerSettings:
    """What the server accepts; the defaults are those of `python -m megatron_dapo.rollout.cpu_engine`."""

    host: str = "127.0.0.1"  # the address served on: weight-update groups are joined there only
    api_key: str | None = None  # None: no authentication (bind to 127.0.0.1 then)
    max_request_bytes: int = 64 << 20  # a 20k-token prompt is ~150 KB of JSON; weight payloads are headers
    max_sequences_per_request: int = 1024  # prompts x n of one /generate
    # Each broadcast, and each of torch's two tries to reach the store, waits this long at most.
    weight_group_timeout_s: float = 60.0
    weight_shm_dir: str = DEFAULT_SHM_DIR  # where /update_weights_from_tensor's segments are read


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message}}, status=status)


class EngineServer:
    def __init__(
        self,
        runner: ModelRunner,
        scheduler: Scheduler,
        tokenizer: Any,
        model_path: str,
        tokenizer_path: str | None,
        weight_version: str,
        settings: ServerSettings = ServerSettings(),
    ):
        self.settings = settings
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer  # None with --skip-tokenizer-init: outputs then carry no "text"
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.weight_version = weight_version
        self._released_tags: set[str] = set()
        self._groups: dict[str, dist.ProcessGroup] = {}  # weight-update groups by name (one per PP stage)
        self._joining: set[str] = set()  # groups whose join is under way
        self._loop_task: asyncio.Task | None = None

    @property
    def weight_version(self) -> str:
        """The scheduler holds it: each token records the version it was sampled under."""
        return self.scheduler.weight_version

    @weight_version.setter
    def weight_version(self, version: str) -> None:
        self.scheduler.weight_version = version

    def app(self) -> web.Application:
        middlewares = [_api_key_middleware(self.settings.api_key)] if self.settings.api_key else []
        app = web.Application(client_max_size=self.settings.max_request_bytes, middlewares=middlewares)
        app.router.add_route("POST", protocol.GENERATE, self.generate)
        app.router.add_route("PUT", protocol.GENERATE, self.generate)
        app.router.add_get(protocol.HEALTH, self.health)
        app.router.add_get(protocol.HEALTH_GENERATE, self.health_generate)
        app.router.add_get(protocol.GET_MODEL_INFO, self.model_info)
        app.router.add_get(protocol.MODEL_INFO, self.model_info)
        app.router.add_get(protocol.GET_WEIGHT_VERSION, self.get_weight_version)
        app.router.add_route("*", protocol.FLUSH_CACHE, self.flush_cache)
        app.router.add_post(protocol.ABORT_REQUEST, self.abort_request)
        app.router.add_post(protocol.PAUSE_GENERATION, self.pause_generation)
        app.router.add_post(protocol.CONTINUE_GENERATION, self.continue_generation)
        app.router.add_post(protocol.UPDATE_WEIGHTS_FROM_TENSOR, self.update_weights_from_tensor)
        app.router.add_post(protocol.INIT_WEIGHTS_UPDATE_GROUP, self.init_weights_update_group)
        app.router.add_post(protocol.DESTROY_WEIGHTS_UPDATE_GROUP, self.destroy_weights_update_group)
        app.router.add_post(protocol.UPDATE_WEIGHTS_FROM_DISTRIBUTED, self.update_weights_from_distributed)
        app.router.add_route("*", protocol.RELEASE_MEMORY_OCCUPATION, self.release_memory_occupation)
        app.router.add_route("*", protocol.RESUME_MEMORY_OCCUPATION, self.resume_memory_occupation)
        app.on_startup.append(self._start_loop)
        app.on_cleanup.append(self._stop_loop)
        return app

    async def _start_loop(self, app: web.Application) -> None:
        self._loop_task = asyncio.create_task(self.scheduler.run())

    async def _stop_loop(self, app: web.Application) -> None:
        self._loop_task.cancel()
        self.scheduler.shutdown()

    # ------------------------------------------------------------ generation

    async def generate(self, request: web.Request) -> web.Response:
        try:
            items, single = engine_requests.parse_generate_request(
                await _read_json(request), self.runner.vocab_size, self.settings.max_sequences_per_request
            )
            if self._released_tags:
                raise protocol.ProtocolError(
                    "memory",
                    f"released ({sorted(self._released_tags)}): call /resume_memory_occupation first",
                )
            sequences = await self.scheduler.generate(items)
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        except RuntimeError as error:
            return _error(500, str(error))
        outputs = [self._output(sequence) for sequence in sequences]
        return web.json_response(outputs[0] if single else outputs)

    def _output(self, sequence: Sequence) -> dict:
        item = sequence.item
        token_texts = None
        if item.return_text_in_logprobs and self.tokenizer is not None:
            token_texts = [self.tokenizer.decode([token]) for token in sequence.output_ids]
        spans = sequence.weight_version_spans(self.weight_version)
        return engine_requests.generate_output(
            rid=item.rid,
            output_ids=sequence.output_ids,
            logprobs=sequence.logprobs if item.return_logprob else None,
            token_texts=token_texts,
            text=self._text(sequence),
            finish_reason=sequence.finish_reason,
            prompt_tokens=len(item.input_ids),
            cached_tokens=sequence.cached_tokens,
            weight_version=spans[-1]["version"],  # as SGLang: the last token's (else the current one)
            e2e_latency=time.monotonic() - sequence.arrival_time,
            weight_versions=spans,
            retractions=sequence.retractions,
        )

    def _text(self, sequence: Sequence) -> str | None:
        if self.tokenizer is None:
            return None
        tokens = sequence.output_ids
        if sequence.finish_reason.get("matched") is not None and not sequence.item.sampling.no_stop_trim:
            tokens = tokens[:-1]  # SGLang leaves the matched stop token out of the text
        return self.tokenizer.decode(tokens, skip_special_tokens=sequence.item.sampling.skip_special_tokens)

    async def health(self, request: web.Request) -> web.Response:
        alive = self._loop_task is not None and not self._loop_task.done()
        return web.Response(status=200 if alive else 503)

    async def health_generate(self, request: web.Request) -> web.Response:
        """One greedy token from token 0, as SGLang's /health_generate."""
        body = {"input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}
        items, _ = engine_requests.parse_generate_request(body, self.runner.vocab_size)
        try:
            await asyncio.wait_for(self.scheduler.generate(items), timeout=60)
        except (TimeoutError, RuntimeError):
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            engine_requests.model_info_body(self.model_path, self.tokenizer_path, self.weight_version)
        )

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    async def flush_cache(self, request: web.Request) -> web.Response:
        # SGLang refuses to flush while requests run; so does the engine, for the same reason.
        if not self.scheduler.can_flush:
            return web.Response(status=400, text="Cache not flushed: requests are running.\n")
        self.runner.flush_prompt_cache()
        return web.Response(status=200, text="Cache flushed.\n")

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            abort = engine_requests.parse_abort_request(await _read_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        self.scheduler.abort(None if abort.abort_all else abort.rid)
        return web.Response(status=200)

    async def pause_generation(self, request: web.Request) -> web.Response:
        try:
            mode = engine_requests.parse_pause_generation(await _optional_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        await self.scheduler.pause(mode)
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        try:
            engine_requests.parse_continue_generation(await _optional_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        self.scheduler.resume()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    # ------------------------------------------------------------ weights

    async def _control(self, operation: Callable[[], str]) -> web.Response:
        """Run a model-changing operation exclusively; answer {"success", "message"} as SGLang does."""
        try:
            message = await self.scheduler.exclusive(operation)
        except Exception as error:  # a bad payload, a failed join or broadcast: report it, keep serving
            message = f"{type(error).__name__}: {error}"
            return web.json_response(engine_requests.success_body(False, message), status=400)
        logger.info(message)
        return web.json_response(engine_requests.success_body(True, message))

    async def _update_weights(
        self,
        receive: Callable[[], list[tuple[str, torch.Tensor]]],
        abort_all_requests: bool,
        version: str | None,
    ) -> web.Response:
        """Load what `receive` returns. The prompt cache is always dropped with the old weights (flush_cache
        only saves GPU work in SGLang; here a stale prompt would silently mix two models)."""
        if "weights" in self._released_tags:
            return web.json_response(
                engine_requests.success_body(False, "weights are released: resume them first"), status=400
            )
        if abort_all_requests:
            self.scheduler.abort(None)

        def load() -> str:
            named = receive()
            self.runner.load_weights(named)
            if version is not None:
                self.weight_version = version
            return f"Succeeded to update {len(named)} tensors (weight version {self.weight_version})."

        return await self._control(load)

    async def update_weights_from_tensor(self, request: web.Request) -> web.Response:
        """Host-memory payloads only (rollout/host_payload.py): a pickle is refused, never unpickled."""
        try:
            update = engine_requests.parse_update_weights_from_tensor(await _read_json(request))
            # TP size 1: this server is TP rank 0 and reads the first payload.
            payload = parse_host_payload(update.serialized_named_tensors[0], update.load_format)
        except protocol.ProtocolError as error:
            return web.json_response(engine_requests.success_body(False, str(error)), status=400)
        return await self._update_weights(
            lambda: read_host_payload(payload, self.settings.weight_shm_dir),
            update.abort_all_requests,
            update.weight_version,
        )

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's named group as rank `rank_offset`, as an SGLang server of TP size 1 joins it
        (gloo: there is no NCCL on CPU). Several groups may be held at once, one per name. The join waits
        for the trainer on a thread of its own, bounded by the settings' timeout: generation goes on."""
        try:
            init = engine_requests.parse_init_weights_update_group(await _read_json(request))
            self._check_join(init)
        except protocol.ProtocolError as error:
            return web.json_response(engine_requests.success_body(False, str(error)), status=400)
        timeout = timedelta(seconds=self.settings.weight_group_timeout_s)
        self._joining.add(init.group_name)
        try:
            group = await _in_daemon_thread(
                lambda: init_weight_update_group(
                    backend="gloo",
                    master_address=init.master_address,
                    master_port=init.master_port,
                    world_size=init.world_size,
                    rank=init.rank_offset,
                    group_name=init.group_name,
                    timeout=timeout,
                ),
                on_abandoned=dist.destroy_process_group,
            )
        except Exception as error:  # a refused connection, a timeout: report it, keep serving
            message = f"joining {init.group_name!r} failed: {type(error).__name__}: {error}"
            return web.json_response(engine_requests.success_body(False, message), status=400)
        finally:
            self._joining.discard(init.group_name)
        self._groups[init.group_name] = group
        message = f"Joined {init.group_name} as rank {init.rank_offset}."
        logger.info(message)
        return web.json_response(engine_requests.success_body(True, message))

    def _check_join(self, init: engine_requests.InitWeightsUpdateGroup) -> None:
        """Refuse a join that would open a store (rank 0 hosts it) or reach beyond the served address."""
        if init.backend != "gloo":
            raise protocol.ProtocolError(
                "backend", f"{init.backend!r} needs GPUs; the CPU engine joins with 'gloo'"
            )
        if init.group_name in self._groups or init.group_name in self._joining:
            raise protocol.ProtocolError("group_name", f"group {init.group_name!r} exists: destroy it first")
        if not 1 <= init.rank_offset < init.world_size:
            raise protocol.ProtocolError(
                "rank_offset",
                f"{init.rank_offset} not in [1, world_size={init.world_size}): rank 0 is the trainer, which "
                "hosts the group's store; the engine never opens one",
            )
        if not _same_address(init.master_address, self.settings.host):
            raise protocol.ProtocolError(
                "master_address",
                f"{init.master_address!r}: the engine joins groups only at the address it serves on "
                f"({self.settings.host}); start the trainer's store there",
            )

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            group_name = engine_requests.parse_destroy_weights_update_group(await _read_json(request))
            self._group(group_name)
        except protocol.ProtocolError as error:
            return web.json_response(engine_requests.success_body(False, str(error)), status=400)

        def destroy() -> str:
            dist.destroy_process_group(self._groups.pop(group_name))
            return f"Destroyed {group_name}."

        return await self._control(destroy)

    def _group(self, group_name: str) -> dist.ProcessGroup:
        if group_name not in self._groups:
            raise protocol.ProtocolError(
                "group_name", f"no group {group_name!r} (have {sorted(self._groups)})"
            )
        return self._groups[group_name]

    async def update_weights_from_distributed(self, request: web.Request) -> web.Response:
        try:
            update = engine_requests.parse_update_weights_from_distributed(await _read_json(request))
            group = self._group(update.group_name)
        except protocol.ProtocolError as error:
            return web.json_response(engine_requests.success_body(False, str(error)), status=400)
        return await self._update_weights(
            lambda: _receive_broadcast(update, group), update.abort_all_requests, update.weight_version
        )

    # ------------------------------------------------------------ memory

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        try:
            tags = engine_requests.parse_memory_tags(await _optional_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))

        def release() -> None:
            self.runner.flush_prompt_cache()  # the KV cache is the prompt cache between requests
            if "weights" in tags:
                self.runner.release_weights()

        await self.scheduler.exclusive(release)
        self._released_tags |= set(tags)
        return web.json_response(None)

    async def resume_memory_occupation(self, request: web.Request) -> web.Response:
        try:
            tags = engine_requests.parse_memory_tags(await _optional_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        if "weights" in tags and "weights" in self._released_tags:
            await self.scheduler.exclusive(self.runner.resume_weights)
        self._released_tags -= set(tags)
        return web.json_response(None)


async def _read_json(request: web.Request) -> Any:
    try:
        return await request.json()
    except ValueError as error:
        raise protocol.ProtocolError("body", f"not JSON: {error}") from error
    except RecursionError as error:  # json.loads recurses once per nesting level
        raise protocol.ProtocolError("body", "JSON nested too deeply") from error


def _api_key_middleware(api_key: str) -> Callable:
    """Refuse, with SGLang's 401, every request to a protected route without `Authorization: Bearer <key>`."""

    @web.middleware
    async def check_api_key(request: web.Request, handler: Callable) -> web.StreamResponse:
        if (
            request.method == "OPTIONS"
            or not needs_key(request.path)
            or is_authorized(request.headers.get("Authorization"), api_key)
        ):
            return await handler(request)
        return web.json_response({"error": "Unauthorized"}, status=401)

    return check_api_key


def _same_address(address: str, host: str) -> bool:
    """Whether `address` names the served address: the same literal or IP, or loopback for a loopback host
    (never a lookup of a name the client chose). A server on all interfaces (0.0.0.0) joins on loopback."""
    if address == host:
        return True
    return is_loopback(address) and (is_loopback(host) or _is_unspecified(host))


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _is_unspecified(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


async def _in_daemon_thread(function: Callable[[], T], on_abandoned: Callable[[T], Any]) -> T:
    """Run a blocking call on a daemon thread (a stuck call never holds up the exit) and await its result;
    a result that arrives after the caller went away goes to `on_abandoned`."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def deliver(result: T | None, error: BaseException | None) -> None:
        if future.cancelled():
            if error is None:
                on_abandoned(result)
        elif error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def run() -> None:
        try:
            outcome = (function(), None)
        except BaseException as error:  # handed to the awaiting coroutine, which reports it
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the event loop closed meanwhile: the server is gone
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=run, name="cpu-engine-group-join", daemon=True).start()
    return await future


async def _optional_json(request: web.Request) -> Any:
    """SGLang's release/resume routes accept GET without a body; continue_generation any empty body."""
    return await _read_json(request) if request.can_read_body else None


def _receive_broadcast(
    update: engine_requests.UpdateWeightsFromDistributed, group: dist.ProcessGroup
) -> list[tuple[str, torch.Tensor]]:
    """Receive the tensors the group's rank 0 broadcasts, in the order of `names`.

    Per tensor (load_format None) one broadcast each; a flattened bucket is one broadcast of all their bytes
    (weight_payload.concat_bytes), as SGLang's FlattenedTensorBucket lays them out.
    """
    dtypes = [getattr(torch, name) for name in update.dtypes]
    if update.load_format is None:
        tensors = [
            torch.empty(shape, dtype=dtype) for shape, dtype in zip(update.shapes, dtypes, strict=True)
        ]
        for tensor in tensors:
            dist.broadcast(tensor, group=group, group_src=0)
        return list(zip(update.names, tensors, strict=True))
    if update.load_format != protocol.FLATTENED_BUCKET:
        raise protocol.ProtocolError("load_format", f"unknown load format {update.load_format!r}")
    flat = torch.empty(concat_bytes_size(update.shapes, dtypes), dtype=torch.uint8)
    dist.broadcast(flat, group=group, group_src=0)
    return list(zip(update.names, split_bytes(flat, update.shapes, dtypes), strict=True))
