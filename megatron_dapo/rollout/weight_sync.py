"""Weight sync: the policy's Megatron TP/PP shards to the rollout engine, in Hugging Face layout, in buckets.

Every training rank calls `sync_weights` after each optimizer step: it is a collective. The TP ranks of a
stage all-gather each parameter in turn (so memory holds one parameter, not the model), map it to Hugging
Face names and layouts with checkpoint/hf_mapping, cast it to the engine's dtype and pack the tensors into
buckets of about `bucket_bytes`; a bucket goes to the engine, which answers before the next one is built.
Each Hugging Face tensor is sent once per server, by the one stage that holds it: the final norm by the last
stage, the embedding by the first; with tied embeddings the last stage's output layer is the embedding's copy
and is skipped. Stages go in turn, first to last, and the cache is flushed with the last bucket.

Transports, as SGLang defines them:
- `TensorTransport`, /update_weights_from_tensor: the payload names shared memory, not bytes: CUDA IPC handles
  for servers sharing the training job's GPUs ("colocated", rollout/weight_payload.py), a shared-memory
  segment per bucket for the CPU engine (rollout/host_payload.py; the sender removes it once every server
  answered). Either opens only on the node that made it.
  - One node (no `colocation`): one replica (the ranks of data- and context-parallel rank 0) does the work;
    each stage's sender (its TP rank 0) hands every server, for every TP rank, the payload of its own copy.
  - Several nodes (`colocation` says which training rank runs on each server GPU): every rank builds every
    stage's tensors on its own GPU, and each server's TP rank j gets a handle to the copy on its own GPU,
    made by the training rank there. A node holds the stages of its own ranks; the others cross the network
    as shards: stage s's ranks broadcast each shard over their PP groups, then every TP group gathers it
    (slime's scheme). Every DP replica does this at once, each within its own PP groups. With the 32B recipe
    (16 nodes of 8 GPUs, TP 8 = one node, PP 2) a node receives the stage it lacks, half the model, spread
    over its 8 ranks and their NICs, and gathers over NVLink: the least any scheme can move, as a node must
    receive what it does not hold. Broadcasting gathered tensors over PP instead would move TP (8) times the
    bytes. The ranks on a server's GPUs then gather their payloads to the rank on its first GPU, which posts
    the list (one payload per TP rank) to that server, and tells them when they may free their copies. Each
    rank holds one bucket at a time, as a sender does on one node. A job finds its colocation with
    `Colocation.discover(servers_from_urls(urls, ...))`: node names and GPUs, as launch/common.sh places
    one server per rollout.server_tp GPUs of each node.
- `BroadcastTransport`, /init_weights_update_group + /update_weights_from_distributed: each stage's sender
  joins a process group with every GPU of every server (NCCL; gloo on CPU) and broadcasts the buckets, for
  servers on GPUs of their own.

Failures: an engine that refuses a bucket fails the sync on every rank, never hangs the others. The rank
that saw the error stops sending but keeps joining the collectives (gathers, broadcasts) until the sync's
last one, which carries every rank's outcome; every rank then raises the same `WeightSyncError`.

Engine calls are coroutines of the async client (rollout/sglang_client.py). `sync_weights` blocks the calling
thread, which must be the training thread (it runs collectives and, on GPUs, owns the CUDA device); the
coroutines run on `loop`, an event loop running in another thread: the trainer's rollout loop, or a
`BackgroundLoop` for a synchronous trainer. Only sender ranks (`is_sender`) need the client and the loop.
Generation must be idle during a sync: a request running across it would mix two policies.
"""

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import logging
import os
import socket
import threading
import time
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import Tensor, nn

from megatron_dapo.checkpoint.hf_mapping import HFMapping, Layout, TensorMap, to_global_name
from megatron_dapo.model.arch import GPTArch
from megatron_dapo.model.policy import unwrap
from megatron_dapo.rollout.engine import EngineError, RolloutEngine
from megatron_dapo.rollout.host_payload import DEFAULT_SHM_DIR, SegmentWriter
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.weight_payload import (
    concat_bytes,
    init_weight_update_group,
    serialize_flattened_bucket,
    serialize_named_tensors,
)

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 * 2**20  # slime's default: few HTTP calls, one bucket of memory on the sender
LOAD_FORMATS = (None, FLATTENED_BUCKET)  # per-tensor handles, or one flat buffer per bucket

NamedTensors = list[tuple[str, Tensor]]
T = TypeVar("T")


# ---------------------------------------------------------------- the report


@dataclass(frozen=True)
class StageReport:
    """What one pipeline stage's tensors cost in one sync (with several senders, the slowest one's time)."""

    stage: int
    tensors: int  # Hugging Face tensors
    bytes: int  # in the engine's dtype
    buckets: int
    seconds: float  # the stage's turn: gathering, mapping, packing, and the engine taking the buckets
    engine_seconds: float  # of which the engine calls (serialization or broadcast included)


@dataclass(frozen=True)
class SyncReport:
    """One sync, the same on every rank; `metrics()` for the trainer's logs. Sizes are per server."""

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


class WeightSyncError(RuntimeError):
    """A sync failed (an engine refused a bucket, say); raised on every rank with the same message."""


class _ServerGroupError(EngineError):
    """A failure that the ranks on one server's GPUs share: the poster's description, raised on each."""


def _describe(error: Exception) -> str:
    return str(error) if isinstance(error, _ServerGroupError) else f"{type(error).__name__}: {error}"


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


# ---------------------------------------------------------------- where colocated servers run


@dataclass(frozen=True)
class ServerPlacement:
    """Where one rollout server runs: a node, and GPUs base_gpu_id .. base_gpu_id + tp_size - 1 of it
    (SGLang's --base-gpu-id and --tp-size), numbered as the training processes of that node number theirs."""

    url: str
    node: str
    base_gpu_id: int
    tp_size: int

    @property
    def gpus(self) -> range:
        return range(self.base_gpu_id, self.base_gpu_id + self.tp_size)


def node_name(host: str) -> str:
    """A host as placements compare it: its first DNS label in lower case (an IP address whole), so that
    "gpu-3" in a server URL and "gpu-3.cluster.local" from the node's gethostname() are one node."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.split(".")[0].lower()


def servers_from_urls(urls: Sequence[str], *, base_port: int, server_tp: int) -> list[ServerPlacement]:
    """Placements of servers started as launch/common.sh starts them: on each node, the server on port
    base_port + k runs on GPUs k * server_tp .. (k + 1) * server_tp - 1 of that node."""
    placements = []
    for url in urls:
        parts = urlsplit(url)
        if parts.hostname is None or parts.port is None:
            raise ValueError(
                f"rollout.server_urls: {url!r} needs a host and a port, e.g. http://node-3:30000"
            )
        if parts.hostname == "localhost" or node_name(parts.hostname).startswith("127."):
            raise ValueError(
                f"rollout.server_urls: {url} names no node; colocated servers on several nodes are found by "
                "the node's host name (launch/common.sh writes them so)"
            )
        if parts.port < base_port:
            raise ValueError(
                f"rollout.server_urls: {url} has a port below rollout.base_port={base_port}: servers listen "
                "on base_port + (first GPU) / server_tp"
            )
        base_gpu_id = (parts.port - base_port) * server_tp
        placements.append(ServerPlacement(url.rstrip("/"), node_name(parts.hostname), base_gpu_id, server_tp))
    return placements


@dataclass(frozen=True)
class Colocation:
    """Which training rank shares each GPU of each server: server i's TP rank j runs on the GPU of training
    rank `ranks[i][j]`, which makes that TP rank's payload and whose node alone can open its handles."""

    servers: tuple[ServerPlacement, ...]
    ranks: tuple[tuple[int, ...], ...]

    @classmethod
    def from_placement(
        cls, servers: Sequence[ServerPlacement], node_of_rank: Sequence[str], gpu_of_rank: Sequence[int]
    ) -> "Colocation":
        """From where every training rank runs (its node's name and its GPU on that node), by global rank."""
        if len(node_of_rank) != len(gpu_of_rank):
            raise ValueError(
                f"{len(node_of_rank)} nodes but {len(gpu_of_rank)} GPUs: give one of each per rank"
            )
        rank_at: dict[tuple[str, int], int] = {}
        for rank, (node, gpu) in enumerate(zip(node_of_rank, gpu_of_rank, strict=True)):
            if (node, gpu) in rank_at:
                raise ValueError(
                    f"ranks {rank_at[node, gpu]} and {rank} both run on GPU {gpu} of node {node}"
                )
            rank_at[node, gpu] = rank
        taken: dict[tuple[str, int], str] = {}
        ranks = []
        for server in servers:
            if server.tp_size < 1 or server.base_gpu_id < 0:
                raise ValueError(f"{server.url}: tp_size must be >= 1 and base_gpu_id >= 0, got {server}")
            server_ranks = []
            for gpu in server.gpus:
                if (server.node, gpu) in taken:
                    raise ValueError(
                        f"{server.url} and {taken[server.node, gpu]} both use GPU {gpu} of {server.node}"
                    )
                taken[server.node, gpu] = server.url
                if (server.node, gpu) not in rank_at:
                    raise ValueError(
                        f"{server.url} runs on GPU {gpu} of node {server.node!r} with no training rank "
                        f"(training nodes: {sorted(set(node_of_rank))}): colocated servers must share the "
                        "training GPUs; check the server's node name, base GPU and TP size"
                    )
                server_ranks.append(rank_at[server.node, gpu])
            ranks.append(tuple(server_ranks))
        return cls(tuple(servers), tuple(ranks))

    @classmethod
    def discover(cls, servers: Sequence[ServerPlacement]) -> "Colocation":
        """Collective over all ranks: each rank's node is its host name, its GPU the CUDA device it uses (the
        index SGLang's --base-gpu-id counts in, when both see the node's GPUs alike), else LOCAL_RANK."""
        gpu = (
            torch.cuda.current_device() if torch.cuda.is_available() else int(os.environ.get("LOCAL_RANK", 0))
        )
        placements: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(placements, (node_name(socket.gethostname()), gpu))
        return cls.from_placement(servers, [node for node, _ in placements], [gpu for _, gpu in placements])


# ---------------------------------------------------------------- transports


class WeightTransport(Protocol):
    # True: every rank builds every stage's tensors and calls `send` with each bucket (a collective);
    # False: each stage's sender alone builds and sends that stage's buckets.
    whole_model_on_every_rank: bool

    def is_sender(self, pg_collection: ProcessGroupCollection) -> bool:
        """Whether this rank calls the engine (and so needs the engine client and loop)."""
        ...

    def send(
        self,
        bucket: NamedTensors,
        engine: RolloutEngine | None,
        loop: asyncio.AbstractEventLoop | None,
        *,
        stage: int,
        weight_version: int,
        flush_cache: bool,
    ) -> None:
        """Hand one bucket to the servers; return once they have loaded it. On failure, raise only after
        this rank has joined the collectives `send` runs, so that the others can go on."""
        ...


def _is_stage_sender(pg_collection: ProcessGroupCollection) -> bool:
    return pg_collection.tp.rank() == 0 and pg_collection.dp_cp.rank() == 0


class TensorTransport:
    """/update_weights_from_tensor: payloads naming the senders' memory, one per TP rank of a server.

    Without `colocation` every server must run on the node of every stage's sender (one node): each TP
    rank reads the sender's memory (GPU memory over NVLink) and copies its shard. With `colocation`, made on
    every rank (it builds a gloo group per server), every rank builds the whole model and each server TP
    rank gets the payload of the copy on its own GPU (see the module docstring); the colocation knows the
    servers, and a TP size given besides must agree with it. `host_memory`: the servers read host memory
    (the CPU engine), so buckets go into segments in `shm_dir` (as buckets on the CPU always do).
    """

    def __init__(
        self,
        *,
        engine_tp_size: int | None = None,
        load_format: str | None = FLATTENED_BUCKET,
        colocation: Colocation | None = None,
        host_memory: bool = False,
        shm_dir: str = DEFAULT_SHM_DIR,
    ):
        _check_load_format(load_format)
        if engine_tp_size is not None and engine_tp_size < 1:
            raise ValueError(f"engine_tp_size must be >= 1 (the servers' --tp-size), got {engine_tp_size}")
        if colocation is not None:
            tp_sizes = sorted({server.tp_size for server in colocation.servers})
            if engine_tp_size is not None and tp_sizes != [engine_tp_size]:
                raise ValueError(
                    f"engine_tp_size={engine_tp_size} but the colocation's servers have TP sizes {tp_sizes}"
                )
        self.engine_tp_size = engine_tp_size or 1
        self.load_format = load_format
        self.colocation = colocation
        self.host_memory = host_memory
        self.segments = SegmentWriter(shm_dir)  # this sender's host-memory segments, under its own token
        self._server: int | None = None  # index of the server on this rank's GPU
        self._server_group: dist.ProcessGroup | None = None  # the training ranks on that server's GPUs
        if colocation is not None:
            for index, ranks in enumerate(colocation.ranks):
                # A collective of every rank, server by server, members or not.
                group = dist.new_group(list(ranks), backend="gloo")
                if dist.get_rank() in ranks:
                    self._server, self._server_group = index, group

    @property
    def whole_model_on_every_rank(self) -> bool:
        return self.colocation is not None

    def is_sender(self, pg_collection: ProcessGroupCollection) -> bool:
        if self.colocation is None:
            return _is_stage_sender(pg_collection)
        return self._server is not None and self.colocation.ranks[self._server][0] == dist.get_rank()

    def send(self, bucket, engine, loop, *, stage, weight_version, flush_cache) -> None:
        if self.colocation is None:
            # One payload for every TP rank of every server.
            with self._payload(bucket) as payload:
                self._post(
                    [payload] * self.engine_tp_size,
                    engine,
                    loop,
                    url=None,
                    weight_version=weight_version,
                    flush_cache=flush_cache,
                )
        elif self._server is not None:
            self._send_to_own_server(
                bucket, engine, loop, weight_version=weight_version, flush_cache=flush_cache
            )
        else:
            return  # no server runs on this rank's GPU
        if bucket[0][1].is_cuda:
            # Blocks sent over IPC return to the allocator only once the receivers dropped them (torch counts
            # references across processes); reclaim those now rather than at some later allocation.
            torch.cuda.ipc_collect()

    def _payload(self, bucket: NamedTensors) -> contextlib.AbstractContextManager[str]:
        """The bucket's payload, valid until the block ends, which must outlast the servers' answers: a
        segment removed then, or CUDA IPC handles into `bucket`, which stays referenced meanwhile."""
        if self.host_memory or not bucket[0][1].is_cuda:
            return self.segments.payload(bucket)
        if self.load_format == FLATTENED_BUCKET:
            return contextlib.nullcontext(serialize_flattened_bucket(bucket))
        return contextlib.nullcontext(serialize_named_tensors(bucket))

    def _post(self, payloads, engine, loop, *, url, weight_version, flush_cache) -> None:
        call = engine.update_weights_from_tensor(
            payloads,
            weight_version=weight_version,
            load_format=self.load_format,
            flush_cache=flush_cache,
            url=url,
        )
        _submit(loop, call).result()

    def _send_to_own_server(self, bucket, engine, loop, *, weight_version, flush_cache) -> None:
        """A collective of the ranks on one server's GPUs: each serializes its own copy, the rank on the first
        GPU posts them (TP rank j reads the one made on its GPU) and tells the others how it went: they free
        their copies only then, and raise the same error if it failed."""
        server, ranks = self.colocation.servers[self._server], self.colocation.ranks[self._server]
        rank, poster = dist.get_rank(), ranks[0]
        outcome: list[str | None] = [None]
        with contextlib.ExitStack() as keep:  # this rank's payload lives until the outcome is known
            try:
                mine = (rank, keep.enter_context(self._payload(bucket)), None)
            except Exception as error:  # still join the gather below: the others wait in it
                mine = (rank, None, f"rank {rank} could not serialize: {_describe(error)}")
            gathered = [None] * len(ranks) if rank == poster else None
            dist.gather_object(mine, gathered, dst=poster, group=self._server_group)
            if rank == poster:
                outcome[0] = next((error for _, _, error in gathered if error is not None), None)
                if outcome[0] is None:
                    payload_of = {sender: payload for sender, payload, _ in gathered}
                    payloads = [payload_of[server_rank] for server_rank in ranks]  # TP rank j: GPU base + j
                    try:
                        self._post(
                            payloads, engine, loop, url=server.url, weight_version=weight_version,
                            flush_cache=flush_cache,
                        )  # fmt: skip
                    except Exception as error:
                        outcome[0] = _describe(error)
            dist.broadcast_object_list(outcome, src=poster, group=self._server_group)
        if outcome[0] is not None:
            raise _ServerGroupError(outcome[0])


class BroadcastTransport:
    """/update_weights_from_distributed: each stage's sender broadcasts to every GPU of every server.

    Stage s's sender is rank 0 of its own group "{group_name}-pp{s}" (SGLang receives from rank 0), whose
    ranks 1.. are the servers' GPUs, server by server. The groups are made at the first sync and kept;
    `close` ends them. `master_address` must be an address of the senders' hosts that the servers reach.
    """

    whole_model_on_every_rank = False

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

    def is_sender(self, pg_collection: ProcessGroupCollection) -> bool:
        return _is_stage_sender(pg_collection)

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
            sent = [concat_bytes([tensor for _, tensor in bucket])]  # SGLang's FlattenedTensorBucket bytes
        else:
            sent = [tensor.contiguous() for _, tensor in bucket]
        broadcasts = [dist.broadcast(tensor, group=group, group_src=0, async_op=True) for tensor in sent]
        try:
            # A server that refuses the call receives nothing: its answer, not the broadcast, ends the wait.
            answer.result()
        except Exception:
            self._abandon(stage, engine, loop)
            raise
        for broadcast in broadcasts:
            broadcast.wait()

    def _abandon(self, stage: int, engine: RolloutEngine, loop: asyncio.AbstractEventLoop) -> None:
        """Drop a group whose last broadcast some server never received: its ranks no longer agree on what
        comes next. The servers destroy their end (ending the broadcast); the next sync makes a new one."""
        group = self._groups.pop(stage)
        try:
            _submit(loop, engine.destroy_weights_update_group(self.stage_group_name(stage))).result()
        except Exception as error:  # the sync fails anyway; a server that lost the group needs no destroy
            logger.warning(
                "weight sync: destroying %s on the servers failed: %s", self.stage_group_name(stage), error
            )
        dist.destroy_process_group(group)

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
        self._groups[stage] = init_weight_update_group(
            backend=self.backend,
            master_address=self.master_address,
            master_port=port,
            world_size=world_size,
            rank=0,
            group_name=self.stage_group_name(stage),
            timeout=self.timeout,
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


def _check_load_format(load_format: str | None) -> None:
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format={load_format!r}: use None (one handle per tensor) or {FLATTENED_BUCKET!r}"
        )


# ---------------------------------------------------------------- the sync


def is_sender(pg_collection: ProcessGroupCollection, transport: WeightTransport | None = None) -> bool:
    """Whether this rank calls the engine in `sync_weights` (and so needs the engine client and loop).

    Without a transport: whether it sends its pipeline stage's weights, which is the answer of every
    transport but a TensorTransport with a colocation (where the rank on each server's first GPU sends).
    """
    return transport.is_sender(pg_collection) if transport is not None else _is_stage_sender(pg_collection)


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
    with every completion it generates afterwards. `engine` and `loop` are needed on sender ranks only
    (`is_sender(pg_collection, transport)`). Raises WeightSyncError on every rank if an engine call failed.
    """
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes} (a few hundred MB suits GPUs)")
    start = time.perf_counter()
    stage, stages = pg_collection.pp.rank(), pg_collection.pp.size()
    sender = transport.is_sender(pg_collection)
    if sender and (engine is None or loop is None):
        raise ValueError(
            f"rank {dist.get_rank()} calls the engine in weight syncs (is_sender): give it the engine client "
            "and the event loop that client runs on"
        )
    if sender:
        _check_loop(loop)
    mapping = HFMapping(GPTArch.from_hf_config(hf_config))
    sending = _Sending(transport, engine if sender else None, loop, weight_version, bucket_bytes)
    if transport.whole_model_on_every_rank:
        parameters = _parameters_of_every_stage(model, mapping, pg_collection)
        for turn in range(stages):
            named = every_rank_hf_tensors(model, mapping, pg_collection, dtype, turn, parameters[turn])
            sending.stage(named, turn, flush_at_end=turn == stages - 1, joins_every_send=True)
    elif pg_collection.dp_cp.rank() == 0:
        # Stages take turns, first to last: broadcasts to the same servers in several groups at once could
        # deadlock (each server waits in one group while a sender waits for it in another), and the cache
        # is flushed once, after the last bucket of the last stage.
        for turn in range(stages):
            if turn == stage:
                named = stage_hf_tensors(model, mapping, pg_collection, dtype)
                sending.stage(named, stage, flush_at_end=stage == stages - 1, joins_every_send=False)
            dist.barrier(group=pg_collection.pp)
    return _finish(sending, start)


def stage_hf_tensors(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection, dtype: torch.dtype
) -> Iterator[tuple[str, Tensor]]:
    """This stage's weights as (Hugging Face name, whole tensor in `dtype`), a Megatron parameter at a time.

    A collective of the TP group: every TP rank gathers and gets every tensor.
    """
    for name, param in _global_named_parameters(model, mapping, pg_collection):
        entry = mapping.get(name)
        if entry.tied_copy:  # the last stage's copy of the tied embedding: the first stage sends it
            continue
        # Cast before gathering: exact (merging only concatenates), and fewer bytes to gather.
        yield from _gathered_to_hf(mapping, entry, param.detach().to(dtype), pg_collection.tp)


def every_rank_hf_tensors(
    model: nn.Module,
    mapping: HFMapping,
    pg_collection: ProcessGroupCollection,
    dtype: torch.dtype,
    stage: int,
    parameters: Sequence[tuple[str, torch.Size]],
) -> Iterator[tuple[str, Tensor]]:
    """Stage `stage`'s weights as `stage_hf_tensors` gives them, on every rank: a collective of the PP and
    TP groups, in which the stage's ranks broadcast each shard over their PP groups before each TP group
    gathers it. `parameters`: the stage's (global Megatron name, this TP rank's shard shape), in order."""
    own = pg_collection.pp.rank() == stage
    local = dict(_global_named_parameters(model, mapping, pg_collection)) if own else {}
    device = next(unwrap(model).parameters()).device
    for name, shape in parameters:
        entry = mapping.get(name)
        if entry.tied_copy:
            continue
        shard = (
            local[name].detach().to(dtype).contiguous()
            if own
            else torch.empty(shape, dtype=dtype, device=device)
        )
        if pg_collection.pp.size() > 1:
            dist.broadcast(shard, group=pg_collection.pp, group_src=stage)
        yield from _gathered_to_hf(mapping, entry, shard, pg_collection.tp)


def _gathered_to_hf(
    mapping: HFMapping, entry: TensorMap, shard: Tensor, tp_group: dist.ProcessGroup
) -> list[tuple[str, Tensor]]:
    shards = [shard] if entry.layout is Layout.REPLICATED else _all_gather(shard, tp_group)
    return mapping.to_hf(entry, shards)


def _all_gather(local: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    local = local.contiguous()
    shards = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(shards, local, group=group)
    return shards


def _global_named_parameters(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection
) -> Iterator[tuple[str, nn.Parameter]]:
    """This stage's parameters under their global Megatron names (layer indices of the whole model)."""
    layers, stages, stage = mapping.dims.num_layers, pg_collection.pp.size(), pg_collection.pp.rank()
    for name, param in unwrap(model).named_parameters():
        yield to_global_name(name, layers, stages, stage), param


def _parameters_of_every_stage(
    model: nn.Module, mapping: HFMapping, pg_collection: ProcessGroupCollection
) -> list[list[tuple[str, torch.Size]]]:
    """Per stage, its parameters and this TP rank's shard shapes, which the rank's PP peers (the same TP
    rank of the other stages) know: a rank receives a stage it does not hold into buffers of these shapes."""
    mine = [(name, param.shape) for name, param in _global_named_parameters(model, mapping, pg_collection)]
    every_stage: list[Any] = [None] * pg_collection.pp.size()
    dist.all_gather_object(every_stage, mine, group=pg_collection.pp)
    return every_stage


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


class _Sending:
    """This rank's part in one sync: the buckets it sends, what they cost, and the first error, after which
    it sends no more but still builds the buckets (the gathers and broadcasts are collectives)."""

    def __init__(
        self,
        transport: WeightTransport,
        engine: RolloutEngine | None,
        loop: asyncio.AbstractEventLoop | None,
        weight_version: int,
        bucket_bytes: int,
    ):
        self.transport, self.engine, self.loop = transport, engine, loop
        self.weight_version, self.bucket_bytes = weight_version, bucket_bytes
        self.reports: list[StageReport] = []  # of the stages this rank sent, on sender ranks
        self.error: str | None = None

    def stage(
        self, named: Iterator[tuple[str, Tensor]], stage: int, *, flush_at_end: bool, joins_every_send: bool
    ) -> None:
        """Gather the stage's tensors and hand them over a bucket at a time. `joins_every_send`: every rank
        calls the transport (its sends are collectives); otherwise the sender alone does."""
        calls_send = joins_every_send or self.engine is not None
        start = time.perf_counter()
        tensors = nbytes = count = 0
        engine_seconds = 0.0
        for bucket, last in buckets(named, self.bucket_bytes):
            if not calls_send or self.error is not None:
                continue  # a rank that only takes part in the gathers, or one whose server failed
            send_start = time.perf_counter()
            try:
                self.transport.send(
                    bucket,
                    self.engine,
                    self.loop,
                    stage=stage,
                    weight_version=self.weight_version,
                    flush_cache=last and flush_at_end,
                )
            except Exception as error:
                self.error = f"stage {stage}: {_describe(error)}"
                logger.error(
                    "weight sync v%d failed on rank %d: %s", self.weight_version, dist.get_rank(), self.error
                )
                continue
            engine_seconds += time.perf_counter() - send_start
            tensors += len(bucket)
            nbytes += sum(tensor.numel() * tensor.element_size() for _, tensor in bucket)
            count += 1
        if self.engine is None:
            return
        seconds = time.perf_counter() - start
        logger.info(
            "weight sync v%d, stage %d: %d tensors, %.3f GB in %d buckets, %.2f s (engine %.2f s)",
            self.weight_version, stage, tensors, nbytes / 1e9, count, seconds, engine_seconds,
        )  # fmt: skip
        self.reports.append(StageReport(stage, tensors, nbytes, count, seconds, engine_seconds))


def _finish(sending: _Sending, start: float) -> SyncReport:
    """Every rank's reports and outcome, on every rank: the sync's end for all (no rank trains before every
    server holds the new weights), and the one place where a failure anywhere becomes an error everywhere."""
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (sending.reports, sending.error))
    failures: dict[str, list[int]] = {}
    for rank, (_, error) in enumerate(outcomes):
        if error is not None:
            failures.setdefault(error, []).append(rank)
    if failures:
        shown = "; ".join(
            f"{error} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})"
            for error, ranks in list(failures.items())[:3]
        )
        more = f"; and {len(failures) - 3} more failures" if len(failures) > 3 else ""
        raise WeightSyncError(f"weight sync to version {sending.weight_version} failed: {shown}{more}")
    by_stage: dict[int, list[StageReport]] = {}
    for reports, _ in outcomes:
        for report in reports:
            by_stage.setdefault(report.stage, []).append(report)
    # Each sender sent a stage's tensors to its own servers: the same sizes; the slowest one sets the time.
    stages = tuple(
        dataclasses.replace(
            by_stage[stage][0],
            seconds=max(report.seconds for report in by_stage[stage]),
            engine_seconds=max(report.engine_seconds for report in by_stage[stage]),
        )
        for stage in sorted(by_stage)
    )
    return SyncReport(sending.weight_version, stages, time.perf_counter() - start)
