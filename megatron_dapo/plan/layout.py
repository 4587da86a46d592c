"""How the GPUs are split between training and SGLang, and what stops a layout before memory counts."""

from dataclasses import dataclass

from megatron_dapo.config import DapoConfig
from megatron_dapo.plan.assumptions import Assumptions, mean_sequence_tokens
from megatron_dapo.plan.shape import ModelShape


@dataclass(frozen=True)
class Cluster:
    """The job's nodes; `rollout_nodes` of them run dedicated SGLang servers (0: colocated)."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 79.6  # what nvidia-smi reports for an 80 GB H100 (81,559 MiB)
    rollout_nodes: int = 0


@dataclass
class Layout:
    """How the GPUs are split: the training grid and the SGLang servers."""

    train_nodes: int
    train_gpus: int
    tp: int
    pp: int
    cp: int
    dp: int
    sequence_parallel: bool
    colocated: bool
    rollout_gpus: int
    server_tp: int
    servers: int


@dataclass
class Problem:
    """Why the plan cannot run; `excess_bytes` says by how much when it is memory."""

    what: str
    excess_bytes: float = 0.0


def make_layout(cfg: DapoConfig, cluster: Cluster) -> Layout:
    p = cfg.parallel
    train_nodes = cluster.nodes - cluster.rollout_nodes
    train_gpus = train_nodes * cluster.gpus_per_node
    model_parallel = p.tensor * p.pipeline * p.context
    colocated = cluster.rollout_nodes == 0
    rollout_gpus = (train_nodes if colocated else cluster.rollout_nodes) * cluster.gpus_per_node
    return Layout(
        train_nodes=train_nodes,
        train_gpus=train_gpus,
        tp=p.tensor,
        pp=p.pipeline,
        cp=p.context,
        dp=max(train_gpus // model_parallel, 0),
        sequence_parallel=p.sequence_parallel,
        colocated=colocated,
        rollout_gpus=rollout_gpus,
        server_tp=cfg.rollout.server_tp,
        servers=rollout_gpus // cfg.rollout.server_tp,
    )


def layout_problems(cfg: DapoConfig, shape: ModelShape, cluster: Cluster, layout: Layout) -> list[Problem]:
    problems = []
    if cluster.rollout_nodes and cfg.rollout.colocate:
        problems.append(Problem("--rollout-nodes gives dedicated rollout nodes: set rollout.colocate=false"))
    if not cluster.rollout_nodes and not cfg.rollout.colocate and cfg.rollout.backend == "sglang":
        problems.append(
            Problem("rollout.colocate=false needs dedicated rollout nodes: pass --rollout-nodes N")
        )
    if layout.train_nodes < 1:
        problems.append(
            Problem(f"{cluster.rollout_nodes} rollout nodes leave no training node of {cluster.nodes}")
        )
        return problems
    model_parallel = layout.tp * layout.pp * layout.cp
    if layout.train_gpus % model_parallel:
        problems.append(
            Problem(f"{layout.train_gpus} training GPUs are not divisible by TP x PP x CP = {model_parallel}")
        )
    for what, value in (
        ("num_attention_heads", shape.num_attention_heads),
        ("num_key_value_heads", shape.num_query_groups),
        ("intermediate_size", shape.ffn_hidden_size),
    ):
        if value % layout.tp:
            problems.append(Problem(f"parallel.tensor={layout.tp} does not divide {what}={value}"))
    if shape.num_layers % layout.pp:
        problems.append(
            Problem(f"parallel.pipeline={layout.pp} does not divide num_hidden_layers={shape.num_layers}")
        )
    if cfg.rollout.backend == "sglang":
        server_tp = cfg.rollout.server_tp
        if cluster.gpus_per_node % server_tp or shape.num_attention_heads % server_tp:
            problems.append(
                Problem(
                    f"rollout.server_tp={server_tp} must divide the GPUs per node ({cluster.gpus_per_node}) "
                    f"and num_attention_heads ({shape.num_attention_heads})"
                )
            )
    return problems


def layout_warnings(cfg: DapoConfig, cluster: Cluster, layout: Layout, assume: Assumptions) -> list[str]:
    warnings = []
    if assume.kernels == "local" and cfg.model.dtype != "float32":
        # Measured on CPU: the residual stream, norm statistics and attention stay fp32 there.
        warnings.append("local kernels in 16-bit keep norms and attention in fp32: activations are ~1/3 more")
    if layout.tp > cluster.gpus_per_node:
        warnings.append(f"TP {layout.tp} spans nodes: tensor-parallel all-reduces then cross the network")
    if cfg.rollout.max_staleness and layout.colocated:
        warnings.append(
            f"rollout.max_staleness={cfg.rollout.max_staleness} overlaps generation with training only on "
            "dedicated rollout GPUs (--rollout-nodes N, rollout.colocate=false): colocated, steps stay "
            "synchronous"
        )
    mean_tokens = mean_sequence_tokens(cfg, assume) * cfg.train.samples_per_minibatch
    microbatches = mean_tokens / max(layout.dp, 1) / (cfg.train.tokens_per_microbatch * layout.cp)
    if layout.pp > 1 and microbatches < layout.pp:
        warnings.append(
            f"about {microbatches:.1f} micro-batches per mini-batch per DP rank for PP {layout.pp}: "
            "the pipeline bubble dominates"
        )
    return warnings
