"""SGLang's memory per GPU: bf16 weights and the KV cache in what `rollout.mem_fraction` leaves; whether a
server holds a full-length sequence, and whether colocated rollout fits beside the training state."""

from dataclasses import dataclass

from megatron_dapo.config import DapoConfig
from megatron_dapo.plan.assumptions import Assumptions, mean_sequence_tokens
from megatron_dapo.plan.layout import Cluster, Layout, Problem
from megatron_dapo.plan.memory import GIB, StageMemory
from megatron_dapo.plan.parameters import count_parameters
from megatron_dapo.plan.shape import ModelShape


@dataclass
class RolloutMemory:
    """One SGLang server's memory per GPU, and the sequences its KV cache holds at once."""

    weight_bytes: float
    kv_pool_bytes: float
    kv_bytes_per_token: int  # per GPU of the server
    tokens_per_server: int
    longest_sequence_tokens: int
    full_length_sequences_per_server: int
    mean_length_sequences_per_server: int


def rollout_memory(
    shape: ModelShape, cfg: DapoConfig, gpu_memory_bytes: float, assume: Assumptions
) -> RolloutMemory:
    """Per GPU of one SGLang server of TP `rollout.server_tp`: bf16 weights, then the KV pool in what
    `rollout.mem_fraction` of the GPU leaves."""
    server_tp = cfg.rollout.server_tp
    weight_bytes = count_parameters(shape) * 2 / server_tp
    kv_pool = gpu_memory_bytes * cfg.rollout.mem_fraction - weight_bytes
    # A TP rank holds ceil(groups / tp) KV heads: SGLang replicates them when TP exceeds the KV heads.
    kv_heads = -(-shape.num_query_groups // server_tp)
    kv_per_token = 2 * shape.num_layers * kv_heads * shape.head_dim * 2
    tokens = max(0, int(kv_pool // kv_per_token))
    longest = cfg.data.max_prompt_tokens + cfg.rollout.max_response_tokens
    return RolloutMemory(
        weight_bytes=weight_bytes,
        kv_pool_bytes=kv_pool,
        kv_bytes_per_token=kv_per_token,
        tokens_per_server=tokens,
        longest_sequence_tokens=longest,
        full_length_sequences_per_server=tokens // longest,
        mean_length_sequences_per_server=int(tokens // mean_sequence_tokens(cfg, assume)),
    )


def rollout_problems(
    cfg: DapoConfig,
    cluster: Cluster,
    layout: Layout,
    rollout: RolloutMemory,
    stages: list[StageMemory],
    assume: Assumptions,
) -> list[Problem]:
    problems = []
    if rollout.full_length_sequences_per_server < 1:
        problems.append(
            Problem(
                f"an SGLang server's KV cache ({max(rollout.kv_pool_bytes, 0) / GIB:.1f} GiB per GPU) cannot "
                f"hold one {rollout.longest_sequence_tokens}-token sequence"
            )
        )
    if layout.colocated and stages:
        gpu_bytes = cluster.gpu_memory_gib * GIB
        resident = max(s.resident_bytes for s in stages)
        during_rollout = resident + cfg.rollout.mem_fraction * gpu_bytes + assume.reserved_gib * GIB
        if during_rollout > gpu_bytes:
            problems.append(
                Problem(
                    f"colocated rollout needs {during_rollout / GIB:.1f} GiB per GPU: the training state "
                    f"({resident / GIB:.1f} GiB) stays while SGLang holds rollout.mem_fraction="
                    f"{cfg.rollout.mem_fraction:g} of {cluster.gpu_memory_gib:g} GiB",
                    during_rollout - gpu_bytes,
                )
            )
    return problems
