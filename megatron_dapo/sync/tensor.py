"""TensorTransport, SGLang's /update_weights_from_tensor: the payload names shared memory, not bytes.

CUDA IPC handles for servers sharing the training job's GPUs ("colocated", rollout/weight_payload.py), a
shared-memory segment per bucket for the CPU engine (rollout/host_payload.py; the sender removes it once every
server answered). Either opens only on the node that made it.
- One node (no `colocation`): one replica (the ranks of data- and context-parallel rank 0) does the work;
  each stage's sender (its TP rank 0) hands every server, for every TP rank, the payload of its own copy.
- Several nodes (`colocation` says which training rank runs on each server GPU, sync/placement.py): every
  rank builds every stage's tensors on its own GPU (sync/gather.py), and each server's TP rank j gets a
  handle to the copy on its own GPU, made by the training rank there. The ranks on a server's GPUs gather
  their payloads to the rank on its first GPU, which posts the list (one payload per TP rank) to that
  server, and tells them when they may free their copies. Each rank holds one bucket at a time, as a sender
  does on one node.
"""

import contextlib

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.rollout.host_payload import DEFAULT_SHM_DIR, SegmentWriter
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.weight_payload import serialize_flattened_bucket, serialize_named_tensors
from megatron_dapo.sync.placement import Colocation
from megatron_dapo.sync.report import ServerGroupError, describe
from megatron_dapo.sync.transport import NamedTensors, check_load_format, is_stage_sender, submit


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
        check_load_format(load_format)
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
            return is_stage_sender(pg_collection)
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
        submit(loop, call).result()

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
                mine = (rank, None, f"rank {rank} could not serialize: {describe(error)}")
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
                        outcome[0] = describe(error)
            dist.broadcast_object_list(outcome, src=poster, group=self._server_group)
        if outcome[0] is not None:
            raise ServerGroupError(outcome[0])
