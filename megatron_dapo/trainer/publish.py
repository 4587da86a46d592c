"""The policy's weights to the rollout engine after each step.

Chooses the transport the placement asks for (shared GPUs: handles to memory, CUDA IPC or host-memory
segments for the CPU engine; servers on their own GPUs: an NCCL broadcast), connects every sender rank to the
servers, and around a sync has colocated servers give their GPU memory to training and take it back.
"""

import contextlib
import socket
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_dapo.config import DapoConfig
from megatron_dapo.rollout.weight_sync import (
    BroadcastTransport,
    Colocation,
    SyncReport,
    TensorTransport,
    WeightTransport,
    is_sender,
    servers_from_urls,
    sync_weights,
)
from megatron_dapo.trainer.rollout.engine import EngineConnection


class WeightPublisher:
    """Collective to build: every rank learns the servers from rank 0's `engine` and connects if it sends."""

    def __init__(
        self,
        cfg: DapoConfig,
        pg: ProcessGroupCollection,
        engine: EngineConnection | None,
        closing: contextlib.ExitStack,
    ) -> None:
        self.cfg, self.pg = cfg, pg
        r = cfg.rollout
        self.colocated = r.colocate and torch.cuda.is_available()
        self.dtype = getattr(torch, cfg.model.dtype) if r.backend == "sglang" else torch.float32
        servers = [(engine.urls, engine.api_key) if engine else None]  # senders need the servers' key
        dist.broadcast_object_list(servers, src=0)
        urls, api_key = servers[0]
        self.transport = self._transport(urls)
        self.engine = engine
        if engine is None and is_sender(pg, self.transport):
            self.engine = EngineConnection(urls, api_key=api_key)
            closing.callback(self.engine.close)
        self._released = False  # the servers gave their GPU memory to training

    def release_engine_memory(self) -> None:
        """Rank 0, after a rollout: colocated servers free the GPU memory training needs."""
        if self.colocated and dist.get_rank() == 0:
            self.engine.run(self.engine.client.release_memory())
            self._released = True

    def publish(self, model: nn.Module, hf_config: dict, version: int) -> SyncReport:
        """Collective: this rank's weights to the engine, as weight version `version`."""
        released = self._released
        if released:  # weights first, so that the KV cache does not take their memory
            self.engine.run(self.engine.client.resume_memory(["weights"]))
        report = sync_weights(
            model,
            hf_config,
            self.pg,
            self.transport,
            self.engine.client if self.engine else None,
            self.engine.loop.loop if self.engine else None,
            weight_version=version,
            dtype=self.dtype,
            bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 2**20,
        )
        if released:
            self.engine.run(self.engine.client.resume_memory(["kv_cache"]))
            self._released = False
        return report

    def _transport(self, urls: list[str]) -> WeightTransport:
        """Collective. Colocated servers named by node host names (the Slurm launch) run on several nodes:
        each then takes its weights from the training ranks on its own GPUs."""
        r = self.cfg.rollout
        if not (self.colocated or r.backend == "cpu"):
            return BroadcastTransport(urls, engine_tp_size=r.server_tp, master_address=socket.gethostname())
        colocation = None
        if self.colocated and not all(_is_loopback(url) for url in urls):
            servers = servers_from_urls(urls, base_port=r.base_port, server_tp=r.server_tp)
            colocation = Colocation.discover(servers)
        return TensorTransport(
            engine_tp_size=r.server_tp, colocation=colocation, host_memory=r.backend == "cpu"
        )


def _is_loopback(url: str) -> bool:
    return urlsplit(url).hostname in ("127.0.0.1", "localhost", "::1")
