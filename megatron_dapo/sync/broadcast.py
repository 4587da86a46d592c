"""BroadcastTransport, SGLang's /init_weights_update_group + /update_weights_from_distributed: each stage's
sender joins a process group with every GPU of every server (NCCL; gloo on CPU) and broadcasts the buckets,
for servers on GPUs of their own."""

import asyncio
import logging
from collections.abc import Sequence
from datetime import timedelta

import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_dapo.rollout.engine import RolloutEngine
from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.rollout.sglang_protocol import FLATTENED_BUCKET
from megatron_dapo.rollout.weight_payload import concat_bytes, init_weight_update_group
from megatron_dapo.sync.transport import check_load_format, check_loop, is_stage_sender, submit

logger = logging.getLogger(__name__)


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
        check_load_format(load_format)
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
        return is_stage_sender(pg_collection)

    def stage_group_name(self, stage: int) -> str:
        return f"{self.group_name}-pp{stage}"

    def send(self, bucket, engine, loop, *, stage, weight_version, flush_cache) -> None:
        group = self._connect(engine, loop, stage)
        answer = submit(
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
            submit(loop, engine.destroy_weights_update_group(self.stage_group_name(stage))).result()
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
            submit(
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
            check_loop(loop)
        for stage, group in list(self._groups.items()):
            submit(loop, engine.destroy_weights_update_group(self.stage_group_name(stage))).result()
            dist.destroy_process_group(group)
            del self._groups[stage]
