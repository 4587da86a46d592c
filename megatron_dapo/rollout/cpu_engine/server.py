"""The CPU engine's HTTP server: SGLang's routes and bodies (built and parsed by sglang_protocol) on aiohttp.

Answers as SGLang does: /generate returns one output dict for one prompt and sample, else a list; failures of
weight updates answer {"success": false, "message"} with status 400; a malformed body answers 400 with
{"error": {"message"}} naming the field.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from aiohttp import web

from megatron_dapo.rollout import sglang_protocol as protocol
from megatron_dapo.rollout.cpu_engine.model_runner import ModelRunner
from megatron_dapo.rollout.cpu_engine.scheduler import Scheduler, Sequence
from megatron_dapo.rollout.host_payload import DEFAULT_SHM_DIR, parse_host_payload, read_host_payload
from megatron_dapo.rollout.weight_payload import concat_bytes_size, init_weight_update_group, split_bytes

logger = logging.getLogger(__name__)
# How long joining a weight-update group waits for the trainer; the model thread is blocked meanwhile.
WEIGHT_GROUP_JOIN_TIMEOUT = timedelta(minutes=10)


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
        weight_shm_dir: str = DEFAULT_SHM_DIR,
    ):
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer  # None with --skip-tokenizer-init: outputs then carry no "text"
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.weight_version = weight_version
        self.weight_shm_dir = weight_shm_dir  # where /update_weights_from_tensor's segments are read
        self._released_tags: set[str] = set()
        self._groups: dict[str, dist.ProcessGroup] = {}  # weight-update groups by name (one per PP stage)
        self._loop_task: asyncio.Task | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)  # payloads are small handles, but allow large JSON
        app.router.add_route("POST", protocol.GENERATE, self.generate)
        app.router.add_route("PUT", protocol.GENERATE, self.generate)
        app.router.add_get(protocol.HEALTH, self.health)
        app.router.add_get(protocol.HEALTH_GENERATE, self.health_generate)
        app.router.add_get(protocol.GET_MODEL_INFO, self.model_info)
        app.router.add_get(protocol.MODEL_INFO, self.model_info)
        app.router.add_get(protocol.GET_WEIGHT_VERSION, self.get_weight_version)
        app.router.add_route("*", protocol.FLUSH_CACHE, self.flush_cache)
        app.router.add_post(protocol.ABORT_REQUEST, self.abort_request)
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
            items, single = protocol.parse_generate_request(await _read_json(request), self.runner.vocab_size)
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
        return protocol.generate_output(
            rid=item.rid,
            output_ids=sequence.output_ids,
            logprobs=sequence.logprobs if item.return_logprob else None,
            token_texts=token_texts,
            text=self._text(sequence),
            finish_reason=sequence.finish_reason,
            prompt_tokens=len(item.input_ids),
            cached_tokens=sequence.cached_tokens,
            weight_version=self.weight_version,
            e2e_latency=time.monotonic() - sequence.arrival_time,
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
        items, _ = protocol.parse_generate_request(body, self.runner.vocab_size)
        try:
            await asyncio.wait_for(self.scheduler.generate(items), timeout=60)
        except (TimeoutError, RuntimeError):
            return web.Response(status=503)
        return web.Response(status=200)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response(
            protocol.model_info_body(self.model_path, self.tokenizer_path, self.weight_version)
        )

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    async def flush_cache(self, request: web.Request) -> web.Response:
        # SGLang refuses to flush while requests run; so does the engine, for the same reason.
        if self.scheduler.active:
            return web.Response(status=400, text="Cache not flushed: requests are running.\n")
        self.runner.flush_prompt_cache()
        return web.Response(status=200, text="Cache flushed.\n")

    async def abort_request(self, request: web.Request) -> web.Response:
        try:
            abort = protocol.parse_abort_request(await _read_json(request))
        except protocol.ProtocolError as error:
            return _error(400, str(error))
        self.scheduler.abort(None if abort.abort_all else abort.rid)
        return web.Response(status=200)

    # ------------------------------------------------------------ weights

    async def _control(self, operation: Callable[[], str]) -> web.Response:
        """Run a model-changing operation exclusively; answer {"success", "message"} as SGLang does."""
        try:
            message = await self.scheduler.exclusive(operation)
        except Exception as error:  # a bad payload, a failed join or broadcast: report it, keep serving
            message = f"{type(error).__name__}: {error}"
            return web.json_response(protocol.success_body(False, message), status=400)
        logger.info(message)
        return web.json_response(protocol.success_body(True, message))

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
                protocol.success_body(False, "weights are released: resume them first"), status=400
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
            update = protocol.parse_update_weights_from_tensor(await _read_json(request))
            # TP size 1: this server is TP rank 0 and reads the first payload.
            payload = parse_host_payload(update.serialized_named_tensors[0], update.load_format)
        except protocol.ProtocolError as error:
            return web.json_response(protocol.success_body(False, str(error)), status=400)
        return await self._update_weights(
            lambda: read_host_payload(payload, self.weight_shm_dir),
            update.abort_all_requests,
            update.weight_version,
        )

    async def init_weights_update_group(self, request: web.Request) -> web.Response:
        """Join the trainer's named group as rank `rank_offset`, as an SGLang server of TP size 1 joins it
        (gloo: there is no NCCL on CPU). Several groups may be held at once, one per name."""
        try:
            init = protocol.parse_init_weights_update_group(await _read_json(request))
            if init.backend != "gloo":
                raise protocol.ProtocolError(
                    "backend", f"{init.backend!r} needs GPUs; the CPU engine joins with 'gloo'"
                )
            if init.group_name in self._groups:
                raise protocol.ProtocolError(
                    "group_name", f"group {init.group_name!r} exists: destroy it first"
                )
        except protocol.ProtocolError as error:
            return web.json_response(protocol.success_body(False, str(error)), status=400)

        def join() -> str:
            # Blocks until every rank has joined: it runs on the model thread, exclusively.
            self._groups[init.group_name] = init_weight_update_group(
                backend="gloo",
                master_address=init.master_address,
                master_port=init.master_port,
                world_size=init.world_size,
                rank=init.rank_offset,
                group_name=init.group_name,
                timeout=WEIGHT_GROUP_JOIN_TIMEOUT,
            )
            return f"Joined {init.group_name} as rank {init.rank_offset}."

        return await self._control(join)

    async def destroy_weights_update_group(self, request: web.Request) -> web.Response:
        try:
            group_name = protocol.parse_destroy_weights_update_group(await _read_json(request))
            self._group(group_name)
        except protocol.ProtocolError as error:
            return web.json_response(protocol.success_body(False, str(error)), status=400)

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
            update = protocol.parse_update_weights_from_distributed(await _read_json(request))
            group = self._group(update.group_name)
        except protocol.ProtocolError as error:
            return web.json_response(protocol.success_body(False, str(error)), status=400)
        return await self._update_weights(
            lambda: _receive_broadcast(update, group), update.abort_all_requests, update.weight_version
        )

    # ------------------------------------------------------------ memory

    async def release_memory_occupation(self, request: web.Request) -> web.Response:
        try:
            tags = protocol.parse_memory_tags(await _optional_json(request))
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
            tags = protocol.parse_memory_tags(await _optional_json(request))
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


async def _optional_json(request: web.Request) -> Any:
    """SGLang's release/resume routes accept GET without a body."""
    return await _read_json(request) if request.can_read_body else None


def _receive_broadcast(
    update: protocol.UpdateWeightsFromDistributed, group: dist.ProcessGroup
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
