"""Weight sync: the policy's Megatron TP/PP shards to the rollout engine, in Hugging Face layout, in buckets.

Every training rank calls `sync_weights` after each optimizer step: it is a collective. One model replica (the
ranks of data- and context-parallel rank 0) does the work, stage by stage, first to last. The TP ranks of the
stage all-gather each parameter in turn (so memory holds one parameter, not the model), map it to Hugging Face
names and layouts with checkpoint/hf_mapping, cast it to the engine's dtype and pack the tensors into buckets
of about `bucket_bytes`; the stage's sender (its TP rank 0) hands each bucket to the engine and waits for the
answer before building the next. Each Hugging Face tensor is sent once, by the one stage that holds it: the
final norm by the last stage, the embedding by the first; with tied embeddings the last stage's output layer
is the embedding's copy and is skipped.

Two transports, as SGLang defines them:
- `TensorTransport`, /update_weights_from_tensor: the payload carries handles to shared memory, not bytes
  (rollout/weight_payload.py). CPU tensors go through /dev/shm files (the CPU engine); CUDA tensors through
  CUDA IPC handles, for SGLang servers sharing the GPUs of the training job ("colocated").
- `BroadcastTransport`, /init_weights_update_group + /update_weights_from_distributed: each stage's sender
  joins a process group with every GPU of every server (NCCL; gloo on CPU) and broadcasts the buckets, for
  servers on GPUs of their own.

Engine calls are coroutines of the async client (rollout/sglang_client.py). `sync_weights` blocks the calling
thread, which must be the training thread (it runs collectives and, on GPUs, owns the CUDA device); the
coroutines run on `loop`, an event loop running in another thread: the trainer's rollout loop, or a
`BackgroundLoop` for a synchronous trainer. Only sender ranks (`is_sender`) need the client and the loop.
Generation must be idle during a sync: a request running across it would mix two policies.
"""

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor, nn

from megatron_dapo.checkpoint.hf_mapping import HFMapping, Layout, ModelDims, to_global_name
from megatron_dapo.model.policy import unwrap
from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.weight_payload import serialize_flattened_bucket, serialize_named_tensors

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 2**20  # slime's default: few HTTP calls, one bucket of memory on the sender
LOAD_FORMATS = (None, FLATTENED_BUCKET)  # per-tensor handles, or one flat buffer per bucket

NamedTensors = list[tuple[str, Tensor]]
T = TypeVar("T")


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class StageReport:
    """What one pipeline stage's sender sent in one sync."""

    stage: int
    tensors: int  # Hugging Face tensors
    bytes: int  # in the engine's dtype
    buckets: int
    seconds: float  # the stage's turn: gathering, mapping, packing, and the engine taking the buckets
    engine_seconds: float  # of which the engine calls (serialization or broadcast included)


@dataclass(frozen=True)
class SyncReport:
    """One sync, the same on every rank; `metrics()` for the trainer's logs."""

    weight_version: int
    stages: tuple[StageReport, ...]  # in stage order
    seconds: float  # the whole call, on this rank

    @property
    def bytes(self) -> int:
        return sum(stage.bytes for stage in self.stages)

    @property
    def buckets(self) -> int:
        return sum(stage.buckets for stage in self.stages)

    @property
    def tensors(self) -> int:
        return sum(stage.tensors for stage in self.stages)

    def metrics(self, prefix: str = "weight_sync/") -> dict[str, float]:
        metrics = {
            f"{prefix}seconds": self.seconds,
            f"{prefix}gigabytes": self.bytes / 1e9,
            f"{prefix}gigabytes_per_second": self.bytes / 1e9 / self.seconds if self.seconds > 0 else 0.0,
            f"{prefix}buckets": float(self.buckets),
        }
        for stage in self.stages:
            metrics[f"{prefix}stage{stage.stage}_seconds"] = stage.seconds
            metrics[f"{prefix}stage{stage.stage}_engine_seconds"] = stage.engine_seconds
            metrics[f"{prefix}stage{stage.stage}_gigabytes"] = stage.bytes / 1e9
        return metrics


# ---------------------------------------------------------------- engine calls from the training thread


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for a training process that is not asyncio-based.

    Create the engine client anywhere and use it only through this loop (its HTTP session binds to the loop
    of its first request); close the client with `run(client.close())` before `close()`.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="engine-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> "BackgroundLoop":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _submit(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future:
    """Start an engine call on `loop`; the caller waits on the future while it does its own part."""
    return asyncio.run_coroutine_threadsafe(coroutine, loop)


def _check_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Engine calls wait on `loop` from this thread: it must be running, in another thread."""
    try:
        this_thread = asyncio.get_running_loop()
    except RuntimeError:  # no loop runs in this thread: the expected case
        this_thread = None
    if this_thread is loop:
        raise RuntimeError(
            "sync_weights blocks its thread and `loop` runs in this same thread: run the engine client's "
            "loop in another thread (e.g. BackgroundLoop) and call sync_weights from the training thread"
        )
    if not loop.is_running():
        raise RuntimeError("`loop` is not running: engine calls would never complete (see BackgroundLoop)")


# ---------------------------------------------------------------- transports


class WeightTransport(Protocol):
    def send(
        self,
        bucket: NamedTensors,
        engine: RolloutEngine,
        loop: asyncio.AbstractEventLoop,
        *,
        stage: int,
        weight_version: int,
        flush_cache: bool,
    ) -> None:
        """Hand one bucket to every server; return once they have loaded it."""
        ...


class TensorTransport:
    """/update_weights_from_tensor: handles to the sender's memory, one payload per TP rank of a server.

    CPU tensors (the CPU engine) travel as /dev/shm files. CUDA tensors travel as CUDA IPC handles, which
    only processes on the sender's node can open: every server must run on the node of every stage's sender
    (one node, or one node per stage with PP). Each of a server's TP ranks reads its own entry of the payload
    list; all entries are the same payload here, each rank maps the sender's GPU memory and copies its shard.
    """

    def __init__(self, *, engine_tp_size: int = 1, load_format: str | None = FLATTENED_BUCKET):
        _check_load_format(load_format)
        if engine_tp_size < 1:
            raise ValueError(f"engine_tp_size must be >= 1 (the servers' --tp-size), got {engine_tp_size}")
        self.engine_tp_size = engine_tp_size
        self.load_format = load_format

    def send(self, bucket, engine, loop, *, stage, weight_version, flush_cache) -> None:
        cuda = bucket[0][1].is_cuda
        serialize = (
            serialize_flattened_bucket if self.load_format == FLATTENED_BUCKET else serialize_named_tensors
        )
        with _cuda_devices_as_uuids() if cuda else contextlib.nullcontext():
            payload = serialize(bucket)
        # `bucket` stays referenced until the servers answer: the handles point into its memory.
        _submit(
            loop,
            engine.update_weights_from_tensor(
                [payload] * self.engine_tp_size,
                weight_version=weight_version,
                load_format=self.load_format,
                flush_cache=flush_cache,
            ),
        ).result()
        if cuda:
            # Blocks sent over IPC return to the allocator only once the receivers dropped them (torch counts
            # references across processes); reclaim those now rather than at some later allocation.
            torch.cuda.ipc_collect()


class BroadcastTransport:
    """/update_weights_from_distributed: each stage's sender broadcasts to every GPU of every server.

    Stage s's sender is rank 0 of its own group "{group_name}-pp{s}" (SGLang receives from rank 0), whose
    ranks 1.. are the servers' GPUs, server by server. The groups are made at the first sync and kept;
    `close` ends them. `master_address` must be an address of the senders' hosts that the servers reach.
    """

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        engine_tp_size: int = 1,
        load_format: str | None = FLATTENED_BUCKET,
        master_address: str = "127.0.0.1",
        group_name: str = "megatron_dapo",
        backend: str = "nccl",
        timeout: timedelta = timedelta(minutes=10),
    ):
        _check_load_format(load_format)
        if not server_urls or isinstance(server_urls, str):
            raise ValueError(
                f"server_urls: give a list of the URL of every rollout server, got {server_urls!r}"
            )
        if engine_tp_size < 1:
            raise ValueError(f"engine_tp_size must be >= 1 (the servers' --tp-size), got {engine_tp_size}")
        self.server_urls = [url.rstrip("/") for url in server_urls]
        self.engine_tp_size = engine_tp_size
        self.load_format = load_format
        self.master_address = master_address
        self.group_name = group_name
        self.backend = backend
        self.timeout = timeout
        self._groups: dict[int, dist.ProcessGroup] = {}  # stage -> its group, on that stage's sender

    def stage_group_name(self, stage: int) -> str:
        return f"{self.group_name}-pp{stage}"

    def send(self, bucket, engine, loop, *, stage, weight_version, flush_cache) -> None:
        group = self._connect(engine, loop, stage)
        answer = _submit(
            loop,
            engine.update_weights_from_distributed(
                [name for name, _ in bucket],
                [str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
                [list(tensor.shape) for _, tensor in bucket],
                weight_version=weight_version,
                group_name=self.stage_group_name(stage),
                load_format=self.load_format,
                flush_cache=flush_cache,
            ),
        )
        # The servers receive while they answer the call above: broadcast concurrently, from this thread.
        if self.load_format == FLATTENED_BUCKET:
            # All the bytes in one buffer, in order, unpadded, as SGLang's FlattenedTensorBucket has them.
            flat = torch.cat([tensor.contiguous().view(-1).view(torch.uint8) for _, tensor in bucket])
            dist.broadcast(flat, group=group, group_src=0)
        else:
            for _, tensor in bucket:
                dist.broadcast(tensor.contiguous(), group=group, group_src=0)
        answer.result()

    def _connect(
        self, engine: RolloutEngine, loop: asyncio.AbstractEventLoop, stage: int
    ) -> dist.ProcessGroup:
        if stage in self._groups:
            return self._groups[stage]
        port = free_port(self.master_address)
        world_size = 1 + len(self.server_urls) * self.engine_tp_size
        joins = [
            _submit(
                loop,
                engine.init_weights_update_group(
                    url,
                    master_address=self.master_address,
                    master_port=port,
                    rank_offset=1 + index * self.engine_tp_size,
                    world_size=world_size,
                    group_name=self.stage_group_name(stage),
                    backend=self.backend,
                ),
            )
            for index, url in enumerate(self.server_urls)
        ]
        self._groups[stage] = _join_as_rank_zero(
            self.backend, self.master_address, port, world_size, self.stage_group_name(stage), self.timeout
        )
        for join in joins:
            join.result()
        return self._groups[stage]

    def close(self, engine: RolloutEngine | None, loop: asyncio.AbstractEventLoop | None) -> None:
        """End this rank's groups on the servers and here (a no-op on ranks that hold none)."""
        if self._groups:
            _check_loop(loop)
        for stage, group in list(self._groups.items()):
            _submit(loop, engine.destroy_weights_update_group(self.stage_group_name(stage))).result()
            dist.destroy_process_group(group)
            del self._groups[stage]


def _join_as_rank_zero(
    backend: str, address: str, port: int, world_size: int, group_name: str, timeout: timedelta
) -> dist.ProcessGroup:
    """A process group with the servers, beside this process's training groups, joined as SGLang's servers
    join it (its `init_custom_process_group`): a TCP store at address:port under the prefix `group_name`.

    torch makes groups outside the default world only through these private helpers; SGLang, verl and slime
    use the same ones, and the store keys must match theirs exactly.
    """
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world, rendezvous

    store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(
        world_size,
        rank,
        [],
        dist.Backend(backend),
        dist.PrefixStore(group_name, store),
        group_name=group_name,
        timeout=timeout,
    )
    # Ranks of this group are its own, not the default group's: `group_src` and `src` both mean rank r.
    _world.pg_group_ranks[group] = {r: r for r in range(world_size)}
    return group


@contextlib.contextmanager
def _cuda_devices_as_uuids() -> Iterator[None]:
    """Pickle CUDA tensors with their GPU's UUID where torch writes the device index.

    SGLang's receivers (`monkey_patch_torch_reductions`) read a UUID there and look the device up among
    their own: a process's device index depends on its CUDA_VISIBLE_DEVICES, which the trainer's and the
    server's need not share. Only CUDA tensors are rewritten (CPU tensors have no device field), and only
    while this context lasts, so nothing else this process pickles is touched.
    """
    from torch.multiprocessing import reductions

    def reduce_with_uuid(tensor: Tensor):
        rebuild, args = reductions.reduce_tensor(tensor)
        if rebuild is reductions.rebuild_cuda_tensor:
            device_index = 6  # position of the device in rebuild_cuda_tensor's arguments
            uuid = str(torch.cuda.get_device_properties(args[device_index]).uuid)
            args = (*args[:device_index], uuid, *args[device_index + 1 :])
        return rebuild, args

    tensor_types = (torch.Tensor, torch.nn.Parameter)
    saved = {cls: ForkingPickler._extra_reducers.get(cls) for cls in tensor_types}
    for cls in tensor_types:
        ForkingPickler.register(cls, reduce_with_uuid)
    try:
        yield
    finally:
        for cls, reducer in saved.items():
            if reducer is None:
                ForkingPickler._extra_reducers.pop(cls, None)
            else:
                ForkingPickler.register(cls, reducer)


def _check_load_format(load_format: str | None) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format={load_format!r}: use None (one handle per tensor) or {FLATTENED_BUCKET!r}"
        )


# ---------------------------------------------------------------- the sync


def is_sender(pg_collection: ProcessGroupCollection) -> bool:
    """Whether this rank sends its pipeline stage's weights (and so needs the engine client and loop)."""
    return pg_collection.tp.rank() == 0 and pg_collection.dp_cp.rank() == 0


@torch.no_grad()
def sync_weights(
    model: nn.Module,
    hf_config: Any,
    pg_collection: ProcessGroupCollection,
    transport: WeightTransport,
    engine: RolloutEngine | None,
    loop: asyncio.AbstractEventLoop | None,
    *,
    weight_version: int,
    dtype: torch.dtype,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> SyncReport:
    """Push the policy's weights to the engine; call on every training rank. See the module docstring.

    `model` is this rank's stage (DDP / Float16Module wrappers allowed) of the model built from `hf_config`;
    `dtype` is the engine's (its --dtype); `weight_version` is the trainer's step, which the engine reports
    with every completion it generates afterwards. `engine` and `loop` are needed on sender ranks only.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes} (a few hundred MB suits GPUs)")
    start = time.perf_counter()
    stage, stages = pg_collection.pp.rank(), pg_collection.pp.size()
    sender = is_sender(pg_collection)
    if sender and (engine is None or loop is None):
        raise ValueError(
            f"rank {dist.get_rank()} sends stage {stage}'s weights (is_sender): give it the engine client "
            "and the event loop that client runs on"
        )
    if sender:
        _check_loop(loop)
    report = None
    if pg_collection.dp_cp.rank() == 0:
        mapping = HFMapping(ModelDims.from_hf_config(hf_config))
        # Stages take turns, first to last: broadcasts to the same servers in several groups at once could
        # deadlock (each server waits in one group while a sender waits for it in another), and the cache
        # is flushed once, after the last bucket of the last stage.
        for turn in range(stages):
            if turn == stage:
                report = _sync_stage(
                    stage_hf_tensors(model, mapping, pg_collection, dtype),
                    transport,
                    engine if sender else None,
                    loop,
                    stage=stage,
                    weight_version=weight_version,
                    bucket_bytes=bucket_bytes,
                    flush_at_end=stage == stages - 1,
                )
            dist.barrier(group=pg_collection.pp)
    return SyncReport(
        weight_version, _share_reports(report if sender else None, pg_collection), time.perf_counter() - start
    )


def stage_hf_tensors(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection, dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    """This stage's weights as (Hugging Face name, whole tensor in `dtype`), a Megatron parameter at a time.

    A collective of the TP group: every TP rank gathers and gets every tensor.
    """
    layers, stages, stage = mapping.dims.num_layers, pg_collection.pp.size(), pg_collection.pp.rank()
    for name, param in unwrap(model).named_parameters():
        entry = mapping.get(to_global_name(name, layers, stages, stage))
        if entry.tied_copy:  # the last stage's copy of the tied embedding: the first stage sends it
            continue
        # Cast before gathering: exact (merging only concatenates), and fewer bytes to gather.
        local = param.detach().to(dtype)
        shards = [local] if entry.layout is Layout.REPLICATED else _all_gather(local, pg_collection.tp)
        yield from mapping.to_hf(entry, shards)


def _all_gather(local: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(shards, local, group=group)
    return shards


def buckets(named: Iterable[tuple[str, Tensor]], bucket_bytes: int) -> Iterator[tuple[NamedTensors, bool]]:
    """(bucket, is_last): consecutive tensors in groups of at most `bucket_bytes`; a larger one goes alone.

    A bucket is complete when the next tensor does not fit, so knowing the last one costs no lookahead.
    """
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket, False
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket, True


def _sync_stage(
    named: Iterator[tuple[str, Tensor]],
    transport: WeightTransport,
    engine: RolloutEngine | None,
    loop: asyncio.AbstractEventLoop | None,
    *,
    stage: int,
    weight_version: int,
    bucket_bytes: int,
    flush_at_end: bool,
) -> StageReport:
    """Gather the stage's tensors and, on the sender (`engine` given), send them a bucket at a time."""
    start = time.perf_counter()
    tensors = nbytes = count = 0
    engine_seconds = 0.0
    for bucket, last in buckets(named, bucket_bytes):
        if engine is None:
            continue  # a TP rank other than the sender: it only takes part in the gathers
        send_start = time.perf_counter()
        transport.send(
            bucket,
            engine,
            loop,
            stage=stage,
            weight_version=weight_version,
            flush_cache=last and flush_at_end,
        )
        engine_seconds += time.perf_counter() - send_start
        tensors += len(bucket)
        nbytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
        count += 1
    seconds = time.perf_counter() - start
    if engine is not None:
        logger.info(
            "weight sync v%d, stage %d: %d tensors, %.3f GB in %d buckets, %.2f s (engine %.2f s)",
            weight_version, stage, tensors, nbytes / 1e9, count, seconds, engine_seconds,
        )  # fmt: skip
    return StageReport(stage, tensors, nbytes, count, seconds, engine_seconds)


def _share_reports(
    report: StageReport | None, pg_collection: ProcessGroupCollection
) -> tuple[StageReport, ...]:
    """Every stage's report, on every rank. Also the sync's end for all: no rank trains before it is done."""
    gathered: list[StageReport | None] = [None] * pg_collection.mp.size()
    dist.all_gather_object(gathered, report, group=pg_collection.mp)
    reports = [sorted((r for r in gathered if r is not None), key=lambda r: r.stage)]
    dist.broadcast_object_list(reports, group=pg_collection.dp_cp, group_src=0)
    return tuple(reports[0])
