"""Where colocated rollout servers run: each server's node and GPUs, and the training rank on each of them.

A job finds its colocation with `Colocation.discover(servers_from_urls(urls, ...))`: node names and GPUs, as
launch/common.sh places one server per rollout.server_tp GPUs of each node. TensorTransport uses it to hand
each server TP rank the payload made on its own GPU (sync/tensor.py).
"""

import ipaddress
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import torch
import torch.distributed as dist


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
